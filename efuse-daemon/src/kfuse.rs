//! Which kernel FUSE a mount goes through, and where the bpf tier's hook
//! comes from.
//!
//! Two FUSE implementations can serve an efuse mount:
//! - the kernel's own (`/dev/fuse`, filesystem type `fuse.efuse`,
//!   connections under `/sys/fs/fuse/connections`, tracepoints `fuse:*`);
//! - efuse's module `efuse.ko` (kernel/module/): the kernel's fs/fuse with
//!   the hook patches, renamed so it loads beside the built-in FUSE
//!   (`/dev/efuse`, type `efuse`, `/sys/fs/efuse/connections`, `efuse:*`).
//!
//! The hook is the `efuse_bpf_ops` struct_ops type: in vmlinux's BTF when a
//! patched kernel has it built in, in the module's BTF when efuse.ko is
//! loaded. A bpf-tier mount goes through whichever has it (built in
//! first); every other mount goes through the kernel's own FUSE.

use std::ffi::CStr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bpf::btf::Btf;

/// The struct_ops type of efuse's hook.
pub const OPS_STRUCT: &str = "efuse_bpf_ops";
/// Its struct_ops value wrapper.
pub const OPS_VALUE_STRUCT: &str = "bpf_struct_ops_efuse_bpf_ops";
/// The module's name (`efuse.ko`, /sys/module/efuse, /sys/kernel/btf/efuse).
pub const MODULE: &str = "efuse";

/// A kernel FUSE implementation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fuse {
    /// The kernel's own FUSE.
    #[default]
    Kernel,
    /// efuse.ko.
    Module,
}

impl Fuse {
    /// The character device a mount's connection is opened on.
    pub fn device(self) -> &'static CStr {
        match self {
            Fuse::Kernel => c"/dev/fuse",
            Fuse::Module => c"/dev/efuse",
        }
    }

    /// The filesystem type passed to mount(2) and shown in mountinfo.
    pub fn fstype(self) -> &'static str {
        match self {
            Fuse::Kernel => "fuse.efuse",
            Fuse::Module => "efuse",
        }
    }

    /// The FUSE behind a mountinfo filesystem type, if it is an efuse mount.
    pub fn of_fstype(fstype: &str) -> Option<Self> {
        match fstype {
            "fuse.efuse" => Some(Fuse::Kernel),
            "efuse" => Some(Fuse::Module),
            _ => None,
        }
    }

    /// Where its control filesystem lists connections.
    pub fn connections(self) -> &'static str {
        match self {
            Fuse::Kernel => "/sys/fs/fuse/connections",
            Fuse::Module => "/sys/fs/efuse/connections",
        }
    }

    /// The FUSE behind any FUSE mount's filesystem type (`fuse`,
    /// `fuse.NAME`, `fuseblk`, or efuse.ko's `efuse`, `efuseblk`).
    pub fn of_any_fstype(fstype: &str) -> Option<Self> {
        let base = fstype.split('.').next().unwrap_or_default();
        match base {
            "fuse" | "fuseblk" => Some(Fuse::Kernel),
            "efuse" | "efuseblk" => Some(Fuse::Module),
            _ => None,
        }
    }

    /// Its control filesystem's type.
    pub fn control_fstype(self) -> &'static str {
        match self {
            Fuse::Kernel => "fusectl",
            Fuse::Module => "efusectl",
        }
    }

    /// The tracefs system of its tracepoints.
    pub fn trace_system(self) -> &'static str {
        match self {
            Fuse::Kernel => "fuse",
            Fuse::Module => "efuse",
        }
    }

    /// The `abort` file of connection `dev`.
    pub fn abort_file(self, dev: u32) -> String {
        format!("{}/{dev}/abort", self.connections())
    }

    /// Mount the control filesystem if it is not (the module's is not
    /// mounted by the system), so connections can be aborted.
    pub fn mount_control(self) {
        let dir = self.connections();
        if Path::new(dir).join("..").exists() && !is_mounted(dir) {
            let _ = nix::mount::mount(
                Some("none"),
                dir,
                Some(self.control_fstype()),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
        }
    }

    /// Name for messages.
    pub fn label(self) -> &'static str {
        match self {
            Fuse::Kernel => "the kernel's FUSE",
            Fuse::Module => "efuse.ko",
        }
    }
}

impl std::fmt::Display for Fuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fuse::Kernel => "kernel",
            Fuse::Module => "module",
        })
    }
}

fn is_mounted(dir: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir))
}

/// Where the bpf tier's hook is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Hook {
    /// Built into the running kernel (a kernel built with kernel/patches/).
    BuiltIn,
    /// In the loaded efuse.ko.
    Module {
        /// The module's version (`modinfo efuse`, /sys/module/efuse/version).
        version: String,
    },
}

impl Hook {
    /// The FUSE a bpf-tier mount uses with this hook.
    pub fn fuse(&self) -> Fuse {
        match self {
            Hook::BuiltIn => Fuse::Kernel,
            Hook::Module { .. } => Fuse::Module,
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hook::BuiltIn => f.write_str("built into the kernel"),
            Hook::Module { version } => write!(f, "efuse.ko {version}"),
        }
    }
}

/// The version of the loaded efuse.ko, if it is loaded.
pub fn module_version() -> Option<String> {
    let dir = Path::new("/sys/module").join(MODULE);
    if !dir.exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(dir.join("version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "(no version)".into()),
    )
}

/// The module's hook: None if efuse.ko is not loaded.
fn module_hook() -> Option<Result<Hook, String>> {
    let version = module_version()?;
    Some(match Btf::module(MODULE) {
        Ok(b) if b.has_struct(OPS_STRUCT) => Ok(Hook::Module { version }),
        Ok(_) => Err(format!(
            "the loaded efuse.ko ({version}) has no `{OPS_STRUCT}` type: it is not efuse's \
             module, or too old; reinstall it with `efuse kmod install`"
        )),
        Err(e) => Err(format!(
            "efuse.ko ({version}) is loaded but its BTF cannot be read ({e:#}); it needs a kernel \
             with CONFIG_DEBUG_INFO_BTF_MODULES and a module built with pahole"
        )),
    })
}

/// Why there is no hook at all.
fn no_hook(builtin: &anyhow::Result<bool>) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let btf_note = match builtin {
        Err(e) => format!(" ({e:#})"),
        Ok(_) => String::new(),
    };
    format!(
        "--offload bpf needs efuse's BPF hook for FUSE (struct_ops `{OPS_STRUCT}`), which Linux {} \
         does not have{btf_note}: mainline has no hook that lets BPF answer a FUSE request. Install \
         efuse's FUSE module for this kernel with `efuse kmod install` (Linux 6.9+; see README, \
         \"Getting the bpf tier on your kernel\"), or use --offload kernel (or auto, which picks it \
         on this kernel)",
        release.trim()
    )
}

fn builtin_hook() -> anyhow::Result<bool> {
    Btf::vmlinux().map(|b| b.has_struct(OPS_STRUCT))
}

/// Find the hook: built in first, then the loaded module. The error says
/// why there is none and what would give one.
pub fn hook() -> Result<Hook, String> {
    let builtin = builtin_hook();
    if let Ok(true) = builtin {
        return Ok(Hook::BuiltIn);
    }
    module_hook().unwrap_or_else(|| Err(no_hook(&builtin)))
}

/// The FUSE a mount of tier `bpf` would use, or why none can.
pub fn for_bpf() -> Result<Fuse, String> {
    hook().map(|h| h.fuse())
}

/// The hook a mount that goes through `fuse` can use now, or why it has
/// none (a mount made over the kernel's FUSE cannot move to the module:
/// its connection belongs to the kernel's FUSE).
pub fn hook_for(fuse: Fuse) -> Result<Hook, String> {
    match fuse {
        Fuse::Module => module_hook().unwrap_or_else(|| {
            Err(
                "efuse.ko is no longer loaded (this mount keeps it loaded while it exists: \
                 was it built in a different way?)"
                    .into(),
            )
        }),
        Fuse::Kernel => {
            let builtin = builtin_hook();
            match (builtin, module_version()) {
                (Ok(true), _) => Ok(Hook::BuiltIn),
                (_, Some(version)) => Err(format!(
                    "this mount goes through the kernel's own FUSE, which has no BPF hook; efuse.ko \
                     ({version}) has one, but only for mounts made through it: remount with \
                     --offload bpf (or auto)"
                )),
                (b, None) => Err(no_hook(&b)),
            }
        }
    }
}
