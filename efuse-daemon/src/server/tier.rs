//! Which tier a mount starts in, and the FUSE it goes through: `auto`
//! is the bpf tier where the hook exists (built in, or efuse.ko) and the
//! mount may use it, else the kernel tier; the bpf tier goes through the
//! FUSE that has the hook, every other tier through the kernel's own.

use crate::config::{MountConfig, Offload};
use crate::kfuse::Fuse;

/// Why `allow_root` mounts do not get the bpf tier: its programs answer
/// any process the kernel lets in, and with allow_root the kernel lets in
/// every user (allow_other), leaving the daemon to refuse all but the owner
/// and root; answers given in the kernel would skip that.
pub const ALLOW_ROOT_NO_BPF: &str = "-o allow_root mounts use the kernel tier: the bpf tier answers every \
     user the kernel admits (allow_root admits all and leaves refusing them to the daemon); use \
     allow_other, or no option, for the bpf tier";

/// Does the mount use `allow_root`?
pub fn allow_root(cfg: &MountConfig) -> bool {
    cfg.options.iter().any(|o| o == "allow_root")
}

/// Resolve `auto` in `cfg` and say which FUSE the mount goes through.
/// Looks the hook up once (it reads the kernel's BTF). A `bpf` mount
/// whose hook is missing was refused by preflight; this says why again.
pub fn choose(cfg: &mut MountConfig) -> anyhow::Result<Fuse> {
    let hook = matches!(cfg.offload, Offload::Auto | Offload::Bpf).then(crate::kfuse::hook);
    if cfg.offload == Offload::Auto {
        cfg.offload = match &hook {
            Some(Ok(_)) => Offload::Bpf,
            _ => Offload::Kernel,
        };
        if cfg.offload == Offload::Bpf && allow_root(cfg) {
            tracing::info!("{ALLOW_ROOT_NO_BPF}");
            cfg.offload = Offload::Kernel;
        }
        tracing::info!(tier = %cfg.offload, "offload auto: picked the best tier this kernel has");
    }
    Ok(match (cfg.offload, hook) {
        (Offload::Bpf, Some(h)) => h.map_err(|e| anyhow::anyhow!(e))?.fuse(),
        _ => Fuse::Kernel,
    })
}
