//! `tally token` mints a signed voter token; `tally token-key` prints the key that signs
//! them, for platforms that mint their own.

use clap::Args;
use tally_core::secrets::Secrets;

#[derive(Args)]
pub struct TokenArgs {
    /// The poll the token is for.
    #[arg(long)]
    poll: String,
    /// The voter id the token vouches for.
    #[arg(long)]
    voter: String,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
    /// Server secret (as given to ingest).
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: String,
}

impl TokenArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let secrets = Secrets::new(self.secret.as_bytes()).map_err(anyhow::Error::msg)?;
        let expiry = tally_core::time::now_ms() / 1000 + self.ttl as i64;
        println!(
            "{}",
            tally_core::token::mint(&secrets.token_key(), &self.poll, &self.voter, expiry)
        );
        Ok(())
    }
}

/// `tally token-key`: prints the key that signs voter tokens, for a platform that mints
/// them itself. It signs tokens and nothing else: it cannot recompute voter pseudonyms.
#[derive(Args)]
pub struct TokenKeyArgs {
    /// Server secret (as given to ingest).
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: String,
}

impl TokenKeyArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let secrets = Secrets::new(self.secret.as_bytes()).map_err(anyhow::Error::msg)?;
        println!("{}", tally_core::text::hex(&secrets.token_key()));
        Ok(())
    }
}
