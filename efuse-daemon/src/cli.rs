//! Command line of the `efuse` binary. Methods here turn raw arguments into
//! library configuration ([`MountConfig`]); nothing else sees them.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{BackendKind, MountConfig, Offload, ignored_option};

const MOUNT_HEADING: &str = "Mount options";
const BACKEND_HEADING: &str = "Backend options";

/// efuse: an eBPF-accelerated FUSE filesystem.
#[derive(Debug, Parser)]
#[command(
    name = "efuse",
    version,
    about,
    long_about = "efuse serves a directory (or a 3FS mount, or an in-memory tree) through FUSE and \
                  cuts the round trips to the daemon with kernel caching and BPF.\n\
                  Configuration file reference: doc/CONFIGURATION.md"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a backend (daemonizes once the mount is ready, unless --foreground).
    Mount(MountArgs),
    /// Unmount an efuse mount and wait for its daemon to exit.
    #[command(alias = "unmount")]
    Umount(UmountArgs),
    /// List efuse mounts: backend, offload tier, daemon pid.
    Status(StatusArgs),
    /// Per-opcode FUSE statistics of a mount: kernel-side upcalls and latency, daemon counters.
    Stats(StatsArgs),
    /// Switch a mount's offload tier at run time (no remount).
    Offload(OffloadArgs),
    /// Load a directory tree of a `bpf`-tier mount into its BPF maps, so
    /// its first accesses are answered in the kernel.
    Prefetch(PrefetchArgs),
    /// Run the latency comparison: raw directory, plain FUSE, efuse tiers, peer FUSE filesystems
    /// (runs the efuse-bench program installed beside efuse; `efuse bench --help` lists its options).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments of efuse-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// efuse's FUSE module with the BPF hook (efuse.ko) for this kernel:
    /// install, status, remove.
    #[command(subcommand)]
    Kmod(crate::kmod::KmodCommand),
}

/// `efuse offload`.
#[derive(Debug, Args, Clone)]
pub struct OffloadArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// The tier to switch to.
    #[arg(value_enum)]
    pub tier: Offload,
}

/// `efuse prefetch`.
#[derive(Debug, Args, Clone)]
pub struct PrefetchArgs {
    /// A directory inside an efuse mount.
    pub path: PathBuf,
    /// Most entries to load.
    #[arg(long, default_value_t = 65_536)]
    pub max: usize,
}

/// `efuse stats`.
#[derive(Debug, Args, Clone)]
pub struct StatsArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Refresh every --interval seconds, showing rates over the interval.
    #[arg(short, long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(short, long, default_value_t = 1.0)]
    pub interval: f64,
    /// Number of refreshes with --watch (0 = until interrupted).
    #[arg(short, long, default_value_t = 0)]
    pub count: u64,
    /// Print the log2 latency histogram of every opcode.
    #[arg(long)]
    pub hist: bool,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// On/off switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// `efuse mount`.
#[derive(Debug, Args, Clone)]
pub struct MountArgs {
    /// Backend source: the directory to serve (ignored by --backend mem).
    #[arg(value_name = "BACKEND")]
    pub source: PathBuf,
    /// Where to mount it (an existing, empty directory).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    /// Backend kind [default: dir].
    #[arg(long, value_enum, help_heading = BACKEND_HEADING)]
    pub backend: Option<BackendKind>,
    /// Backend wrapped by --backend sim [default: dir].
    #[arg(long, value_enum, help_heading = BACKEND_HEADING)]
    pub sim_inner: Option<BackendKind>,
    /// Offload tier: off = plain FUSE, kernel = stock kernel caching, bpf = BPF hook, auto = best available [default: auto].
    #[arg(long, value_enum, help_heading = MOUNT_HEADING)]
    pub offload: Option<Offload>,
    /// Mount options, comma-separated (ro, noatime, nosuid, nodev, noexec, allow_other, nonempty, backend=, offload=,
    /// config=, trace=, transport=, xattr=, inodes=handles|descriptors|auto, and for the kernel tier entry_timeout=, attr_timeout=, negative_timeout= (seconds),
    /// nopassthrough, zero_open, writeback_cache, nowatch).
    #[arg(short = 'o', value_delimiter = ',', help_heading = MOUNT_HEADING)]
    pub options: Vec<String>,
    /// Stay in the foreground (for systemd); logs go to stderr.
    #[arg(short = 'f', long, help_heading = MOUNT_HEADING)]
    pub foreground: bool,
    /// Print nothing on success (as a mount helper run by mount(8)).
    #[arg(long, hide = true)]
    pub quiet: bool,
    /// TOML config file with the same settings; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Worker threads of the classic transport [default: four per CPU].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256), help_heading = MOUNT_HEADING)]
    pub threads: Option<u16>,
    /// Request transport: uring = FUSE-over-io_uring (a queue per CPU), classic = /dev/fuse reads,
    /// auto = io_uring where the kernel offers it [default: auto].
    #[arg(long, value_enum, help_heading = MOUNT_HEADING)]
    pub transport: Option<crate::config::Transport>,
    /// eBPF tracing of this mount's FUSE requests [default: on].
    #[arg(long, value_enum, help_heading = MOUNT_HEADING)]
    pub trace: Option<OnOff>,
    /// Log file of the daemon [default: /run/efuse/<id>.log].
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// `efuse umount`.
#[derive(Debug, Args, Clone)]
pub struct UmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Detach now even if busy; the daemon exits when the last user leaves.
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// Abort the FUSE connection first (for a hung or stalled daemon), then detach.
    #[arg(long)]
    pub force: bool,
}

/// `efuse status`.
#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

impl MountArgs {
    /// Merge the config file (if any), `-o` settings and flags.
    pub fn mount_config(&self) -> anyhow::Result<MountConfig> {
        let mut file = self.config.clone();
        let mut generic = Vec::new();
        let mut kv_backend = None;
        let mut kv_offload = None;
        let mut kv_trace = None;
        let mut kv_transport = None;
        let mut kv_xattr = None;
        let mut kv_inodes = None;
        let mut kernel_kv: Vec<(&'static str, u64)> = Vec::new();
        for o in &self.options {
            let o = o.trim();
            if o.is_empty() || ignored_option(o) {
                continue;
            }
            match o.split_once('=') {
                Some(("backend", v)) => kv_backend = Some(parse_enum::<BackendKind>("backend", v)?),
                Some(("offload", v)) => kv_offload = Some(parse_enum::<Offload>("offload", v)?),
                Some(("xattr", v)) => kv_xattr = Some(parse_enum::<crate::config::Xattr>("xattr", v)?),
                Some(("inodes", v)) => {
                    kv_inodes = Some(parse_enum::<crate::backend::dir::nodes::InodeMode>("inodes", v)?)
                }
                Some(("transport", v)) => {
                    kv_transport = Some(parse_enum::<crate::config::Transport>("transport", v)?)
                }
                Some(("trace", v)) => kv_trace = Some(parse_enum::<OnOff>("trace", v)? == OnOff::On),
                Some(("config", v)) => file = Some(PathBuf::from(v)),
                Some(("entry_timeout", v)) => kernel_kv.push(("entry", secs_to_ms(v)?)),
                Some(("attr_timeout", v)) => kernel_kv.push(("attr", secs_to_ms(v)?)),
                Some(("negative_timeout", v)) => kernel_kv.push(("negative", secs_to_ms(v)?)),
                None if ["nopassthrough", "zero_open", "writeback_cache", "nowatch"].contains(&o) => {
                    kernel_kv.push((o_static(o), 1))
                }
                _ => generic.push(o.to_string()),
            }
        }
        let mut cfg = match &file {
            Some(f) => MountConfig::from_file(f)?,
            None => MountConfig::default(),
        };
        cfg.source = Some(self.source.clone());
        if let Some(b) = self.backend.or(kv_backend) {
            cfg.backend = b;
        }
        if let Some(b) = self.sim_inner {
            cfg.sim_inner = b;
        }
        if let Some(o) = self.offload.or(kv_offload) {
            cfg.offload = o;
        }
        if let Some(t) = self.threads {
            cfg.threads = t as usize;
        }
        if let Some(x) = kv_xattr {
            cfg.xattr = x;
        }
        if let Some(i) = kv_inodes {
            cfg.inodes = i;
        }
        if let Some(t) = self.transport.or(kv_transport) {
            cfg.transport = t;
        } else if file.is_none()
            && let Some(v) = std::env::var_os("EFUSE_TRANSPORT")
        {
            // The default for every mount of a test run (`cargo xtask test`
            // runs the suite once per transport).
            cfg.transport = parse_enum::<crate::config::Transport>("EFUSE_TRANSPORT", &v.to_string_lossy())?;
        }
        if let Some(t) = self.trace.map(|t| t == OnOff::On).or(kv_trace) {
            cfg.trace = t;
        }
        for (k, v) in kernel_kv {
            let kc = &mut cfg.kernel;
            match k {
                "entry" => kc.entry_ttl_ms = v,
                "attr" => kc.attr_ttl_ms = v,
                "negative" => kc.negative_ttl_ms = v,
                "nopassthrough" => kc.passthrough = false,
                "zero_open" => {
                    kc.zero_open = true;
                    kc.passthrough = false;
                }
                "writeback_cache" => {
                    kc.writeback_cache = true;
                    kc.passthrough = false;
                }
                "nowatch" => kc.watch = false,
                _ => unreachable!("kernel option {k}"),
            }
        }
        for o in generic {
            if !cfg.options.contains(&o) {
                cfg.options.push(o);
            }
        }
        // Records and `efuse status` show the source as given to mount(8)
        // would: absolute, whatever the caller's directory was.
        if cfg.backend != BackendKind::Mem
            && let Some(src) = &cfg.source
        {
            cfg.source = Some(crate::server::state::absolute(src)?);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Is `o` one of efuse's own `-o` options (backend=, offload=, config=,
/// trace=, the timeouts, nopassthrough...), as opposed to a mount(8) flag?
pub fn is_efuse_option(o: &str) -> bool {
    match o.split_once('=') {
        Some((k, _)) => matches!(
            k,
            "backend"
                | "offload"
                | "xattr"
                | "inodes"
                | "transport"
                | "trace"
                | "config"
                | "entry_timeout"
                | "attr_timeout"
                | "negative_timeout"
        ),
        None => ["nopassthrough", "zero_open", "writeback_cache", "nowatch"].contains(&o),
    }
}

fn secs_to_ms(v: &str) -> anyhow::Result<u64> {
    let secs: f64 = v
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid timeout {v:?}: expected seconds"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        bail!("timeout {v} out of range (0..=86400 seconds)");
    }
    Ok((secs * 1000.0) as u64)
}

fn o_static(o: &str) -> &'static str {
    match o {
        "nopassthrough" => "nopassthrough",
        "zero_open" => "zero_open",
        "writeback_cache" => "writeback_cache",
        _ => "nowatch",
    }
}

fn parse_enum<T: ValueEnum>(what: &str, v: &str) -> anyhow::Result<T> {
    T::from_str(v, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        anyhow::anyhow!("invalid {what}={v:?}; expected one of {}", names.join(", "))
    })
}

/// What `--offload auto` picks on this machine, and why (for `--help`).
pub fn auto_picks() -> String {
    match crate::kfuse::hook() {
        Ok(h) => format!("Here auto picks bpf: the BPF hook is {h}."),
        Err(_) => "Here auto picks kernel: this kernel has no efuse BPF hook (`efuse kmod install` \
                   adds it on Linux 6.9+)."
            .into(),
    }
}

/// Parse the command line. With --help, the help of `mount --offload`
/// says what `auto` picks on this machine and why.
pub fn parse(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command();
    if args.iter().any(|a| a == "--help" || a == "-h" || a == "help") {
        let picks = auto_picks();
        cmd = cmd.mut_subcommand("mount", |c| {
            c.mut_arg("offload", |a| {
                let base = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                a.help(format!("{base} {picks}"))
            })
        });
    }
    let m = cmd.try_get_matches_from(args)?;
    Cli::from_arg_matches(&m)
}

/// Translate a mount helper invocation (`mount.fuse.efuse SRC DST -o opts`,
/// as mount(8) runs it for `-t fuse.efuse` and fstab) into `efuse mount` arguments.
pub fn mount_helper_args(args: &[OsString]) -> anyhow::Result<Vec<OsString>> {
    let mut out: Vec<OsString> = vec!["efuse".into(), "mount".into()];
    let mut positional = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let v = it.next().context("-o needs a value")?;
                out.push("-o".into());
                out.push(v.clone());
            }
            Some(s) if s.starts_with("-o") && s.len() > 2 => {
                out.push("-o".into());
                out.push(s[2..].into());
            }
            // mount(8) flags: -n (no mtab), -s (sloppy), -v (verbose), -f (fake).
            Some("-n" | "-s" | "-v") => {}
            Some("-f") => bail!("fake mounts (-f) are not supported"),
            _ => positional.push(a.clone()),
        }
    }
    if positional.len() != 2 {
        bail!("usage: mount.fuse.efuse SOURCE MOUNTPOINT [-o options]");
    }
    // mount(8) applies its own defaults (suid, dev, exec) and passes only
    // the flags that differ from them, so a helper takes the absence of
    // nosuid/nodev as suid/dev, as mount.fuse3 does for root.
    let given: Vec<String> = out
        .iter()
        .filter_map(|a| a.to_str())
        .flat_map(|a| a.split(','))
        .map(str::to_string)
        .collect();
    let mut defaults = Vec::new();
    // A remount changes only what it names (mount(8) passes the current
    // flags back with it).
    let remount = given.iter().any(|g| g == "remount");
    for (off, on) in [("nosuid", "suid"), ("nodev", "dev")] {
        if !remount && !given.iter().any(|g| g == off) {
            defaults.push(on);
        }
    }
    if !defaults.is_empty() {
        // Before the given options, so that they win.
        out.insert(2, "-o".into());
        out.insert(3, defaults.join(",").into());
    }
    // A helper is silent on success, as mount(8) is.
    out.push("--quiet".into());
    out.extend(positional);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> MountArgs {
        let mut v = vec!["efuse", "mount"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Mount(m) => m,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn dash_o_carries_efuse_settings() {
        let m = parse(&[
            "/tmp",
            "/mnt",
            "-o",
            "noatime,offload=off,backend=mem,_netdev,trace=off",
        ]);
        let c = m.mount_config().unwrap();
        assert_eq!(c.backend, BackendKind::Mem);
        assert_eq!(c.offload, Offload::Off);
        assert!(!c.trace);
        assert_eq!(c.options, vec!["noatime".to_string()]);
    }

    #[test]
    fn flags_override_dash_o() {
        let m = parse(&["/tmp", "/mnt", "--backend", "mem", "-o", "backend=dir"]);
        assert_eq!(m.mount_config().unwrap().backend, BackendKind::Mem);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let m = parse(&["/tmp", "/mnt", "-o", "offload=turbo"]);
        let e = m.mount_config().unwrap_err().to_string();
        assert!(e.contains("offload") && e.contains("kernel"), "{e}");
        let m = parse(&["/tmp", "/mnt", "-o", "bogus"]);
        assert!(
            m.mount_config()
                .unwrap_err()
                .to_string()
                .contains("unknown mount option")
        );
        assert!(Cli::try_parse_from(["efuse", "mount", "/a", "/b", "--threads", "0"]).is_err());
    }

    #[test]
    fn mount_helper_translation() {
        let helper = |args: &[&str]| -> anyhow::Result<Vec<String>> {
            let a: Vec<OsString> = args.iter().map(OsString::from).collect();
            Ok(mount_helper_args(&a)?
                .iter()
                .map(|s| s.to_str().unwrap().to_string())
                .collect())
        };
        assert_eq!(
            helper(&["mount.fuse.efuse", "/src", "/dst", "-o", "rw,offload=off", "-n"]).unwrap(),
            [
                "efuse",
                "mount",
                "-o",
                "suid,dev",
                "-o",
                "rw,offload=off",
                "--quiet",
                "/src",
                "/dst"
            ]
        );
        // mount(8) passes nosuid/nodev only when asked; a remount keeps what it does not name.
        assert_eq!(
            helper(&["mount.fuse.efuse", "/src", "/dst", "-o", "nosuid,nodev"]).unwrap(),
            ["efuse", "mount", "-o", "nosuid,nodev", "--quiet", "/src", "/dst"]
        );
        assert_eq!(
            helper(&["mount.fuse.efuse", "/src", "/dst", "-o", "remount,ro"]).unwrap(),
            ["efuse", "mount", "-o", "remount,ro", "--quiet", "/src", "/dst"]
        );
        assert!(helper(&["mount.fuse.efuse", "/src"]).is_err());
    }
}
