//! Signed voter tokens on a `require_token` poll: minted by the admin endpoint and the CLI,
//! refused when missing (401) or forged, expired, or made for another poll or voter (403).

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::cluster::{slug, Cluster, Deployment, ADMIN_KEY, SECRET};

async fn mint(cluster: &Cluster, poll: &str, voter: &str) -> Result<String> {
    let response = cluster
        .http
        .post(format!("{}/v1/polls/{poll}/tokens", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"voter_id": voter, "ttl_seconds": 600}))
        .send()
        .await?;
    ensure!(
        response.status() == 201,
        "minting answered {}",
        response.status()
    );
    let body: Value = response.json().await?;
    Ok(body["token"].as_str().unwrap_or_default().to_owned())
}

fn decode_hex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len().is_multiple_of(2), "odd hex: {text}");
    (0..text.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&text[i..i + 2], 16)?))
        .collect()
}

crate::for_each_deployment!(voter_tokens_gate_require_token_polls);

async fn voter_tokens_gate_require_token_polls(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    for id in ["vip", "other"] {
        cluster
            .create_poll(json!({"id": id, "title": "VIP", "question": "Q", "kind": "single", "require_token": true,
                "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}))
            .await?;
    }
    let (status, answer) = cluster
        .vote("vip", &json!({"voter_id": "u1", "choice": "a"}))
        .await?;
    ensure!(
        status == 401 && slug(&answer) == "token-required",
        "{status} {answer}"
    );

    let token = mint(&cluster, "vip", "u1").await?;
    let other_poll = mint(&cluster, "other", "u1").await?;
    let token_key = tally_core::secrets::Secrets::new(SECRET.as_bytes())
        .map_err(anyhow::Error::msg)?
        .token_key();
    let expired = tally_core::token::mint(
        &token_key,
        "vip",
        "u1",
        tally_core::time::now_ms() / 1000 - 1,
    );
    // Signed with the server secret itself rather than the token key derived from it.
    let forged = tally_core::token::mint(
        SECRET.as_bytes(),
        "vip",
        "u1",
        tally_core::time::now_ms() / 1000 + 600,
    );
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["token", "--poll", "vip", "--voter", "u2", "--ttl", "600"])
        .env("TALLY_SECRET", SECRET)
        .output()?;
    ensure!(cli.status.success());
    let from_cli = String::from_utf8(cli.stdout)?.trim().to_owned();
    // An integration mints its own tokens with the key `tally token-key` prints.
    let key_cli = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("token-key")
        .env("TALLY_SECRET", SECRET)
        .output()?;
    ensure!(key_cli.status.success());
    let integration_key = String::from_utf8(key_cli.stdout)?.trim().to_owned();
    let from_integration = tally_core::token::mint(
        &decode_hex(&integration_key)?,
        "vip",
        "u4",
        tally_core::time::now_ms() / 1000 + 600,
    );

    for (name, voter, token) in [
        ("another poll's token", "u1", other_poll.as_str()),
        ("expired", "u1", expired.as_str()),
        ("forged", "u1", forged.as_str()),
        ("another voter's token", "u3", token.as_str()),
        ("garbage", "u1", "12.zz"),
    ] {
        let (status, answer) = cluster
            .vote(
                "vip",
                &json!({"voter_id": voter, "choice": "a", "token": token}),
            )
            .await?;
        ensure!(
            status == 403 && slug(&answer) == "invalid-token",
            "{name}: {status} {answer}"
        );
    }
    let (status, _) = cluster
        .vote(
            "vip",
            &json!({"voter_id": "u1", "choice": "a", "token": token}),
        )
        .await?;
    ensure!(status == 202, "a valid token is accepted");
    let (status, _) = cluster
        .vote(
            "vip",
            &json!({"voter_id": "u2", "choice": "b", "token": from_cli}),
        )
        .await?;
    ensure!(status == 202, "a CLI-minted token is accepted");
    let (status, _) = cluster
        .vote(
            "vip",
            &json!({"voter_id": "u4", "choice": "b", "token": from_integration}),
        )
        .await?;
    ensure!(
        status == 202,
        "a token minted with the token key is accepted"
    );
    cluster
        .wait_for_total("vip", 3, Duration::from_secs(30))
        .await?;
    ensure!(cluster.results("other").await?["total_votes"] == 0);
    Ok(())
}
