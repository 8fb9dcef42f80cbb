//! Logging setup: `tracing` to stderr (the log file when daemonized).
//! `EFUSE_LOG` overrides the filter (e.g. `EFUSE_LOG=efuse=debug`).

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `verbose` raises the default level to debug.
pub fn init(verbose: bool) {
    let default = if verbose { "efuse=debug,info" } else { "info" };
    let filter = EnvFilter::try_from_env("EFUSE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
