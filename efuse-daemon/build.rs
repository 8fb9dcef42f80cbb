//! Builds the BPF programs of `efuse-ebpf` for the BPF target with aya-build,
//! so that a plain `cargo build` produces a daemon with its programs embedded.
//!
//! Without bpf-linker (a machine where `cargo xtask setup` has not run) the
//! daemon is built with an empty object and says at run time that tracing is
//! unavailable and why, instead of failing the build.
use std::{env, fs, path::PathBuf};

/// Embed the kernel module's sources (kernel/patches, kernel/module) so
/// that `efuse kmod install` needs nothing but the efuse binary: a table of
/// (path under kernel/, contents).
fn embed_kernel_files(manifest_dir: &std::path::Path, out_dir: &std::path::Path) -> anyhow::Result<()> {
    let kernel = manifest_dir.join("../kernel").canonicalize()?;
    let mut rows = Vec::new();
    for sub in ["patches", "module"] {
        let dir = kernel.join(sub);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().and_then(|n| n.to_str()).expect("utf-8 name");
            rows.push(format!(
                "    ({:?}, include_str!({:?})),\n",
                format!("{sub}/{name}"),
                f.display().to_string()
            ));
        }
    }
    fs::write(
        out_dir.join("kernel_files.rs"),
        format!("&[\n{}]\n", rows.concat()),
    )?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    embed_kernel_files(&manifest_dir, &out_dir)?;
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
