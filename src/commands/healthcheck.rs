//! `tally healthcheck`: asks a tally service on this host whether it is ready, for container
//! healthchecks in images that carry no HTTP client (the tally image has none).
//!
//! Exits 0 when the probe answers 2xx within the timeout, 1 otherwise, printing why.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Args)]
pub struct HealthcheckArgs {
    /// Probe to ask: http://host:port/path (plain HTTP; a service's own listener).
    #[arg(default_value = "http://127.0.0.1:8080/readyz")]
    url: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout_seconds: u64,
}

impl HealthcheckArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let (authority, path) = split_url(&self.url)?;
        let timeout = Duration::from_secs(self.timeout_seconds.max(1));
        let status = tokio::time::timeout(timeout, probe(authority, path))
            .await
            .with_context(|| format!("{} did not answer within {timeout:?}", self.url))??;
        if !(200..300).contains(&status) {
            bail!("{} answered {status}", self.url);
        }
        println!("{} answered {status}", self.url);
        Ok(())
    }
}

/// `http://host:port/path` as (`host:port`, `/path`).
fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("`{url}` is not a plain http:// URL (the probe talks to a service's own listener)");
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    if authority.is_empty() || !authority.contains(':') {
        bail!("`{url}` names no host:port");
    }
    Ok((authority, path))
}

/// The status code of `GET path` on `authority`.
async fn probe(authority: &str, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: tally-healthcheck\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The status line is all that is read: a probe's body is small, but nothing here needs it.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buf[..read]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("{authority} answered no HTTP status line"))?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:8081/readyz").unwrap(),
            ("127.0.0.1:8081", "/readyz")
        );
        assert_eq!(split_url("http://query:8081").unwrap(), ("query:8081", "/"));
        assert!(split_url("https://a:1/").is_err());
        assert!(split_url("http:///readyz").is_err());
        assert!(split_url("http://host/readyz").is_err());
    }
}
