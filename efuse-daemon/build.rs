//! Builds the BPF programs of `efuse-ebpf` for the BPF target with aya-build,
//! so that a plain `cargo build` produces a daemon with its programs embedded.
//!
//! Without bpf-linker (a machine where `cargo xtask setup` has not run) the
//! daemon is built with an empty object and says at run time that tracing is
//! unavailable and why, instead of failing the build.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../efuse-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!("cargo:rerun-if-changed=../efuse-common/src");
    println!("cargo:rerun-if-env-changed=EFUSE_NO_BPF");
    let skip = env::var_os("EFUSE_NO_BPF").is_some();
    if skip || which::which("bpf-linker").is_err() {
        println!(
            "cargo:warning=bpf-linker not found (or EFUSE_NO_BPF set): building efuse without \
             its BPF programs; run `cargo xtask setup` to install the eBPF toolchain"
        );
        fs::write(out_dir.join("efuse"), [])?;
        fs::write(out_dir.join("efuse-ops"), [])?;
        return Ok(());
    }
    let root_dir = ebpf_dir.canonicalize()?;
    let root_dir = root_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "efuse-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
