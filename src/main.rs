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
    #[cfg(all(unix, not(feature = "system-allocator")))]
    allocator_settings();
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

/// mimalloc's settings: memory it reserves is committed as it is used, not all at once, so
/// what it frees goes back to the system after its purge delay. With its defaults it keeps
/// what a peak touched (an export holding 31 MiB left +95 MiB resident, see
/// docs/BENCHMARKS.md); with this, +36 MiB. mimalloc reads its settings from the
/// environment before `main` runs, and has no safe call to change them after, so when the
/// setting is missing the binary runs itself again with it, in the same process (`exec`:
/// same pid, arguments and descriptors). A setting in the environment is kept.
#[cfg(all(unix, not(feature = "system-allocator")))]
fn allocator_settings() {
    use std::os::unix::process::CommandExt;
    const SETTING: (&str, &str) = ("MIMALLOC_ARENA_EAGER_COMMIT", "0");
    if std::env::var_os(SETTING.0).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    command.args(args).env(SETTING.0, SETTING.1);
    // Returns only when the binary could not run again (it was replaced on disk, say):
    // then it carries on with mimalloc's defaults.
    let _ = command.exec();
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
