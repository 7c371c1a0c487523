//! `tally`: one binary, one subcommand per service (one file each under `commands/`).
//! Flags and `TALLY_*` environment variables mean the same thing; a flag wins. With no
//! subcommand it runs `standalone`.

// Vote handling allocates many small strings per vote; glibc's malloc/free took about a
// fifth of the workers' CPU in profiles (docs/BENCHMARKS.md). The `system-allocator`
// feature leaves it out, for heap profilers that hook malloc (heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod commands;
mod config;
mod demo;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = commands::Cli::parse();
    init_logging(cli.log_format());
    // Worker threads get 8 MiB stacks (tokio's default is 2 MiB): headroom for deep but
    // bounded recursion in query planning, so no request can exhaust a worker's stack.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build()?;
    runtime.block_on(cli.run())
}

/// Logs go to stderr, as text for a person or as JSON lines for a collector; `RUST_LOG`
/// picks what is logged (default `info`, which includes one access line per request).
fn init_logging(format: config::LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
