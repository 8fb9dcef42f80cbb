//! efuse: an eBPF-accelerated FUSE filesystem.
//!
//! The tree follows a request (doc/DEVELOPMENT.md draws it); each folder's
//! `mod.rs` says what it owns. Dependencies point down this list:
//! - [`cli`] parses the command line; [`cmd`] runs the client commands
//!   (mount, umount, status, stats, offload, prefetch) and [`kmod`] the
//!   module ones, talking to running daemons over the [`control`]
//!   protocol.
//! - [`server`]: one mount's daemon: preflight, tier choice, mount(2),
//!   serving, the control socket, state records, exit.
//! - [`transport`]: the FUSE codec and the two transports (classic
//!   /dev/fuse, FUSE-over-io_uring), feeding the [`dispatch`]er, which maps
//!   one decoded request to one filesystem call, counting it in
//!   [`metrics`].
//! - [`fs`]: filesystem logic: open policy, set-ID rules, lookup counts
//!   (the inode table), metadata cache, staging, passthrough ids.
//! - [`bpf`]: the bpf tier (loader, maps, mirror, miss events), present
//!   only while attached; [`trace`] counts upcalls per mount from the fuse
//!   tracepoints; [`kfuse`] says which FUSE (the kernel's, or efuse.ko)
//!   a mount goes through.
//! - [`backend`]: the storage (`dir`, `mem`, `sim`).
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod backend;
pub mod bpf;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod fs;
pub mod kfuse;
pub mod kmod;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod server;
pub mod trace;
pub mod transport;
pub mod unixtime;

/// Run the command line; returns the process exit code.
pub fn run(args: Vec<std::ffi::OsString>) -> i32 {
    let args = match mount_helper(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("efuse: {e:#}");
            return 2;
        }
    };
    let cli = match cli::parse(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    logging::init(false);
    if !matches!(cli.command, cli::Command::Mount(_)) {
        // Reporting commands end quietly when their reader goes away
        // (`efuse stats | head`); the daemon keeps ignoring SIGPIPE.
        // SAFETY: setting a signal disposition has no memory-safety preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let res = match &cli.command {
        cli::Command::Mount(m) => cmd::mount(m),
        cli::Command::Umount(u) => cmd::umount(u),
        cli::Command::Status(s) => cmd::status(s),
        cli::Command::Stats(s) => cmd::stats::run(s),
        cli::Command::Bench { args } => run_bench(args),
        cli::Command::Offload(o) => cmd::offload(o),
        cli::Command::Prefetch(p) => cmd::prefetch(p),
        cli::Command::Kmod(k) => match k {
            kmod::KmodCommand::Install(a) => kmod::install(a),
            kmod::KmodCommand::Status => kmod::status(),
            kmod::KmodCommand::Remove => kmod::remove(),
        },
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("efuse: {e:#}");
            1
        }
    }
}

/// `efuse bench`: the benchmark and its plots are a program of their own
/// (`efuse-bench`, crate efuse-bench), so the daemon links no plotting;
/// this runs the one installed beside `efuse`, else the one on PATH.
fn run_bench(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("efuse-bench")))
        .filter(|p| p.exists());
    let prog = beside.unwrap_or_else(|| "efuse-bench".into());
    let e = std::process::Command::new(&prog).args(args).exec();
    anyhow::bail!(
        "cannot run {} ({e}): `efuse bench` runs the efuse-bench program; build it with \
         `cargo build --release -p efuse-bench` and install it beside efuse",
        prog.display()
    )
}

/// Invoked as `mount.fuse.efuse` (mount(8), fstab): translate the arguments.
fn mount_helper(args: &[std::ffi::OsString]) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let argv0 = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if argv0.starts_with("mount.") {
        cli::mount_helper_args(args)
    } else {
        Ok(args.to_vec())
    }
}
