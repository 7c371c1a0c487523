//! `tally`: one binary, one subcommand per service (one file each under `commands/`).
//! Flags and `TALLY_*` environment variables mean the same thing; a flag wins. With no
//! subcommand it runs `standalone`.

// Vote handling allocates many small strings per vote; glibc's malloc/free took about a
// fifth of the workers' CPU in profiles (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod commands;
mod config;
mod demo;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    commands::Cli::parse().run().await
}
