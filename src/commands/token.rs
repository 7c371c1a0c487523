//! `tally token`: mints a signed voter token.

use clap::Args;

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
        let expiry = tally_core::time::now_ms() / 1000 + self.ttl as i64;
        println!(
            "{}",
            tally_core::token::mint(self.secret.as_bytes(), &self.poll, &self.voter, expiry)
        );
        Ok(())
    }
}
