//! Mount configuration: a TOML file with the same settings as the command
//! line; flags override the file. See `doc/CONFIGURATION.md`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::backend::sim::SimConfig;

/// Which backend serves the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A local directory (or a 3FS FUSE mount), jailed at its root.
    #[default]
    Dir,
    /// An in-memory tree (the source argument is ignored).
    Mem,
    /// `sim_inner` wrapped in simulated 3FS latency and faults.
    Sim,
}

/// How much of the work the kernel does without asking the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// Plain FUSE: no kernel caching, every operation reaches the daemon.
    #[default]
    Off,
    /// Stock kernel caching: long TTLs kept coherent by invalidation,
    /// READDIRPLUS, passthrough reads.
    Kernel,
    /// BPF programs answer lookup/getattr in the kernel (patched kernel).
    Bpf,
    /// The best tier this kernel supports.
    Auto,
}

impl std::fmt::Display for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Kernel => "kernel",
            Self::Bpf => "bpf",
            Self::Auto => "auto",
        })
    }
}

/// How requests travel between the kernel and the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// io_uring where the kernel offers it, else classic.
    #[default]
    Auto,
    /// FUSE-over-io_uring (Linux 6.14+, fuse module parameter enable_uring=1):
    /// one queue per CPU, served by a thread pinned to it.
    Uring,
    /// read(2)/write(2) on /dev/fuse by a pool of worker threads.
    Classic,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Classic => "classic",
        })
    }
}

/// Whether the mount serves extended attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Xattr {
    /// Where the backend keeps them (`dir` over a filesystem with xattrs, `mem`).
    #[default]
    Auto,
    /// Always pass them to the backend.
    On,
    /// None: the first xattr request is answered ENOSYS, after which the
    /// kernel answers every one with EOPNOTSUPP without asking.
    Off,
}

impl std::fmt::Display for Xattr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Dir => "dir",
            Self::Mem => "mem",
            Self::Sim => "sim",
        })
    }
}

/// Settings of the `kernel` offload tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelTierConfig {
    /// How long the kernel trusts a name -> inode binding (ms).
    pub entry_ttl_ms: u64,
    /// How long the kernel trusts attributes (ms).
    pub attr_ttl_ms: u64,
    /// How long the kernel remembers that a name does not exist (ms); 0 = never.
    pub negative_ttl_ms: u64,
    /// Serve reads and mmap straight from the backing file (FUSE passthrough,
    /// Linux 6.9+); otherwise the kernel page cache is kept across opens.
    pub passthrough: bool,
    /// Zero-message opens: the kernel stops sending OPEN/FLUSH/RELEASE for
    /// files and serves reads from its page cache. Fastest for small files;
    /// excludes passthrough, and lasts for the life of the mount.
    pub zero_open: bool,
    /// Let the kernel buffer writes (off by default; excludes passthrough).
    pub writeback_cache: bool,
    /// Watch the `dir` backend with inotify and invalidate kernel caches
    /// when the tree changes behind the mount.
    pub watch: bool,
    /// TTL (ms) of entries in directories the watch covers (and of the
    /// attributes of their files with one link): invalidation keeps them
    /// coherent, so they may outlive `entry_ttl_ms`; 0 = use the plain TTLs.
    pub watched_ttl_ms: u64,
    /// Remote backends: on the first lookup miss in a directory, fetch up
    /// to this many of its entries in one batch and answer later lookups
    /// from memory; 0 = off.
    pub prefetch_max: usize,
    /// How long a prefetched listing answers lookups (ms).
    pub prefetch_ttl_ms: u64,
    /// Remote backends with passthrough: stage files opened read-only into
    /// this local directory [default: /var/cache/efuse/<mount id>].
    pub staging_dir: Option<std::path::PathBuf>,
    /// Size bound of the staging cache (MiB); 0 = no staging.
    pub staging_max_mib: u64,
    /// Files larger than this (MiB) are read through the page cache instead.
    pub staging_max_file_mib: u64,
}

impl Default for KernelTierConfig {
    fn default() -> Self {
        // 3FS's own FUSE client uses 30 s for attributes and entries, 5 s
        // for negative entries.
        Self {
            entry_ttl_ms: 30_000,
            attr_ttl_ms: 30_000,
            negative_ttl_ms: 5_000,
            passthrough: true,
            zero_open: false,
            writeback_cache: false,
            watch: true,
            watched_ttl_ms: 3_600_000,
            prefetch_max: 4096,
            prefetch_ttl_ms: 5_000,
            staging_dir: None,
            staging_max_mib: 1024,
            staging_max_file_mib: 256,
        }
    }
}

/// Settings of the `bpf` offload tier: sizes of the maps the programs
/// answer from. A full map is not an error: what does not fit is answered
/// by the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BpfConfig {
    /// Entries of the (parent, name) -> inode map (~420 bytes each).
    pub entries: u32,
    /// Entries of the inode -> attributes map (~120 bytes each).
    pub attrs: u32,
    /// Inodes whose BPF-answered lookups can be counted at once.
    pub lookups: u32,
    /// Prefetch a directory into the maps at most once per this many ms
    /// (miss events of one directory are coalesced).
    pub prefetch_every_ms: u64,
    /// Entries one directory prefetch takes at most.
    pub prefetch_max: usize,
    /// Regular files whose read-only opens the kernel may answer at once:
    /// each holds one passthrough backing id (about 1 KiB of kernel memory,
    /// no daemon descriptor) until the kernel forgets the inode. Beyond
    /// this, opens go to the daemon. 0 turns open offload off.
    pub backing_max: u32,
}

impl Default for BpfConfig {
    fn default() -> Self {
        Self {
            entries: efuse_common::ops::DEFAULT_ENTRIES,
            attrs: efuse_common::ops::DEFAULT_ATTRS,
            lookups: efuse_common::ops::DEFAULT_LOOKUPS,
            prefetch_every_ms: 1_000,
            prefetch_max: 65_536,
            backing_max: efuse_common::ops::DEFAULT_OPENS,
        }
    }
}

/// Everything a mount needs, after merging the config file and the flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MountConfig {
    /// Backend kind.
    pub backend: BackendKind,
    /// Backend source (a directory for `dir` and `sim` over `dir`).
    pub source: Option<PathBuf>,
    /// Backend under `sim`.
    pub sim_inner: BackendKind,
    /// Offload tier.
    pub offload: Offload,
    /// Mount options (`-o`), e.g. `ro`, `noatime`, `allow_other`.
    pub options: Vec<String>,
    /// Worker threads of the classic transport; 0 = four per CPU.
    pub threads: usize,
    /// Request transport.
    pub transport: Transport,
    /// Extended attributes.
    pub xattr: Xattr,
    /// How the `dir` backend holds the inodes the kernel knows: `handles`
    /// (file handles and a bounded descriptor cache: no descriptor per
    /// inode), `descriptors` (one per inode), `auto` (handles where the
    /// backing filesystem and the daemon's privileges allow).
    pub inodes: crate::backend::dir::nodes::InodeMode,
    /// eBPF tracing of this mount (on by default where the kernel has the
    /// fuse tracepoints).
    pub trace: bool,
    /// Requests slower than this (microseconds) are reported one by one.
    pub trace_slow_us: u64,
    /// Latency and faults of the `sim` backend.
    pub sim: SimConfig,
    /// Settings of the `kernel` tier.
    pub kernel: KernelTierConfig,
    /// Settings of the `bpf` tier.
    pub bpf: BpfConfig,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Dir,
            source: None,
            sim_inner: BackendKind::Dir,
            // A user who installs an accelerated filesystem expects the
            // acceleration: the best tier this kernel has.
            offload: Offload::Auto,
            options: Vec::new(),
            threads: 0,
            transport: Transport::Auto,
            xattr: Xattr::Auto,
            inodes: Default::default(),
            trace: true,
            trace_slow_us: 10_000,
            sim: SimConfig::default(),
            kernel: KernelTierConfig::default(),
            bpf: BpfConfig::default(),
        }
    }
}

impl MountConfig {
    /// Read a TOML config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Check the merged configuration.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.threads > 256 {
            bail!(
                "threads must be between 1 and 256 (0 = four per CPU), got {}",
                self.threads
            );
        }
        if self.backend == BackendKind::Sim && self.sim_inner == BackendKind::Sim {
            bail!("sim_inner cannot be sim");
        }
        let needs_source = match self.backend {
            BackendKind::Dir => true,
            BackendKind::Mem => false,
            BackendKind::Sim => self.sim_inner == BackendKind::Dir,
        };
        if needs_source {
            let Some(src) = &self.source else {
                bail!("the {} backend needs a source directory", self.backend);
            };
            let md = std::fs::metadata(src)
                .with_context(|| format!("backend directory {} does not exist", src.display()))?;
            if !md.is_dir() {
                bail!("backend {} is not a directory", src.display());
            }
        }
        self.sim.validate()?;
        if self.kernel.zero_open && self.offload == Offload::Off {
            bail!(
                "-o zero_open removes OPEN messages in the kernel tier; with --offload off every open \
                 reaches the daemon and it would have no effect: use --offload kernel (or auto), or drop it"
            );
        }
        if self.kernel.zero_open && self.kernel.passthrough {
            bail!(
                "kernel.zero_open and kernel.passthrough exclude each other (-o zero_open implies nopassthrough)"
            );
        }
        if self.bpf.entries == 0 || self.bpf.attrs == 0 || self.bpf.lookups == 0 {
            bail!("bpf.entries, bpf.attrs and bpf.lookups must be at least 1");
        }
        for o in &self.options {
            mount_option_known(o)?;
        }
        Ok(())
    }

    /// Short description of the backend for `efuse status`.
    pub fn backend_label(&self) -> String {
        match self.backend {
            BackendKind::Sim => format!("sim+{}", self.sim_inner),
            b => b.to_string(),
        }
    }
}

/// Mount options efuse understands (beyond its own `backend=`, `offload=`...).
const KNOWN_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "noatime",
    "atime",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "sync",
    "async",
    "dirsync",
    "allow_other",
    "allow_root",
    "nonempty",
    "default_permissions",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "nosymfollow",
    "symfollow",
    "remount",
];

/// Options mount(8) and fstab pass that have no meaning for the filesystem.
pub const IGNORED_OPTIONS: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "loud",
    "silent",
    "iversion",
    "noiversion",
    "mand",
    "nomand",
    "diratime",
    "nodiratime",
];

/// Prefixes of options to ignore: userspace ones (`x-`, `comment=`), and
/// the FUSE kernel's own (`user_id=`...), which mount(8) passes back on a
/// remount as mountinfo lists them.
const IGNORED_PREFIXES: &[&str] = &[
    "x-",
    "comment=",
    "user_id=",
    "group_id=",
    "rootmode=",
    "fd=",
    "max_read=",
    "blksize=",
    "fsname=",
    "subtype=",
];

/// True for an option efuse accepts and ignores (logged at debug level).
pub fn ignored_option(opt: &str) -> bool {
    let ignored = IGNORED_OPTIONS.contains(&opt) || IGNORED_PREFIXES.iter().any(|p| opt.starts_with(p));
    if ignored {
        tracing::debug!(option = opt, "mount option ignored: it does not apply to efuse");
    }
    ignored
}

/// Refuse an option efuse does not know, with the list it does.
pub fn mount_option_known(opt: &str) -> anyhow::Result<()> {
    if KNOWN_OPTIONS.contains(&opt) || ignored_option(opt) {
        Ok(())
    } else {
        bail!(
            "unknown mount option {opt:?}; known: {}, and backend=, offload=, config=, trace=, \
             entry_timeout=, attr_timeout=, negative_timeout=, nopassthrough, zero_open, writeback_cache, nowatch",
            KNOWN_OPTIONS.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_a_valid_config() {
        // doc/CONFIGURATION.md's example names every section: it must parse
        // (unknown keys are refused) and its values must be the defaults.
        let doc = include_str!("../../doc/CONFIGURATION.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("its end");
        let c: MountConfig = toml::from_str(&doc[start..end]).expect("the documented config parses");
        let d = MountConfig::default();
        assert_eq!(c.bpf, d.bpf, "documented [bpf] values differ from the defaults");
        assert_eq!(
            c.kernel, d.kernel,
            "documented [kernel] values differ from the defaults"
        );
    }

    #[test]
    fn toml_roundtrip_and_unknown_keys_refused() {
        let c: MountConfig = toml::from_str(
            r#"
            backend = "sim"
            sim_inner = "mem"
            offload = "off"
            options = ["noatime"]
            [sim]
            meta_us = 50
            "#,
        )
        .unwrap();
        assert_eq!(c.backend, BackendKind::Sim);
        assert_eq!(c.sim.meta_us, 50);
        c.validate().unwrap();
        assert!(toml::from_str::<MountConfig>("bogus = 1").is_err());
    }

    #[test]
    fn unknown_mount_option_is_refused() {
        assert!(mount_option_known("noatime").is_ok());
        assert!(mount_option_known("_netdev").is_ok());
        let e = mount_option_known("frobnicate").unwrap_err().to_string();
        assert!(e.contains("frobnicate"), "{e}");
    }

    #[test]
    fn dir_backend_needs_existing_source() {
        let c = MountConfig {
            source: Some("/nonexistent/efuse".into()),
            ..Default::default()
        };
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
    }
}
