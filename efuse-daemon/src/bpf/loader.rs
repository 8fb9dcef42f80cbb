//! Loading the bpf tier's programs and attaching them to one FUSE
//! connection through the `efuse_bpf_ops` hook (kernel/patches/), built
//! into the kernel or in efuse.ko (`crate::kfuse`).
//!
//! aya 0.14 cannot load struct_ops (aya issue 220), so this does it with
//! raw bpf(2) calls (`sys`): aya creates the maps and aya-obj
//! relocates the programs' map references; then each program is loaded as
//! BPF_PROG_TYPE_STRUCT_OPS against the hook's BTF (vmlinux's or the
//! module's), a struct_ops map is filled with the program descriptors and
//! the connection number, and a link registers it. Dropping the link
//! unregisters: the kernel waits for running programs (RCU) before the
//! unlink returns.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{Context, bail};
use aya::maps::{Map, MapData, MapError as AyaMapError, RingBuf};
use aya::{Ebpf, EbpfLoader};
use efuse_common::ops::{
    MAP_ATTRS, MAP_COUNTERS, MAP_ENTRIES, MAP_LOOKUPS, MAP_MISSES, MAP_NOXATTR, MAP_OPENS, PROG_GETATTR,
    PROG_GETXATTR, PROG_IOCTL, PROG_LOOKUP, PROG_OPEN,
};
use parking_lot::Mutex;

use super::events::Misses;
use super::maps::{Answers, BpfMaps};
use super::{btf, sys};
use crate::config::BpfConfig;

static OPS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/efuse-ops"));

use crate::kfuse::{Hook, OPS_STRUCT, OPS_VALUE_STRUCT};

/// The programs attached to one connection: dropping this unregisters
/// them, and returns once none runs any more.
pub struct Programs {
    _link: OwnedFd,
    _ops_map: OwnedFd,
}

fn data(m: &Map) -> Option<&MapData> {
    match m {
        Map::Array(d) | Map::HashMap(d) | Map::PerCpuArray(d) | Map::RingBuf(d) | Map::LruHashMap(d) => {
            Some(d)
        }
        _ => None,
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = AyaMapError>,
{
    let m = ebpf
        .take_map(name)
        .with_context(|| format!("BPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("BPF map {name}"))
}

/// Is the ops object part of this build?
pub fn programs_built() -> bool {
    !OPS_OBJECT.is_empty()
}

/// Load the programs and maps and attach them through `hook` to FUSE
/// connection `dev` (the number under /sys/fs/fuse/connections, or
/// /sys/fs/efuse/connections for the module). The programs' miss events
/// are read from the returned [`Misses`].
pub fn attach(hook: &Hook, dev: u32, cfg: &BpfConfig) -> anyhow::Result<(Arc<BpfMaps>, Programs, Misses)> {
    if !programs_built() {
        bail!(
            "this efuse was built without its BPF programs (bpf-linker missing); run `cargo xtask setup` and rebuild"
        );
    }
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_ENTRIES, cfg.entries)
        .map_max_entries(MAP_ATTRS, cfg.attrs)
        .map_max_entries(MAP_LOOKUPS, cfg.lookups)
        .map_max_entries(MAP_OPENS, cfg.backing_max.max(1))
        .map_max_entries(MAP_NOXATTR, cfg.attrs)
        .load(OPS_OBJECT)
        .context("creating the bpf tier's maps")?;

    // Relocate the programs against the maps aya created.
    let mut obj = aya_obj::Object::parse(OPS_OBJECT).context("parsing the BPF ops object")?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let fds: Vec<(String, i32)> = ebpf
        .maps()
        .filter_map(|(n, m)| data(m).map(|d| (n.to_owned(), d.fd().as_fd().as_raw_fd())))
        .collect();
    let objmaps = obj.maps.clone();
    let reloc = fds
        .iter()
        .filter_map(|(n, fd)| objmaps.get(n).map(|m| (n.as_str(), *fd, m)));
    obj.relocate_maps(reloc, &text_sections)
        .context("relocating map references")?;
    obj.relocate_calls(&text_sections).context("relocating calls")?;

    // A module's struct_ops type is named by its BTF object.
    let (btf, module_btf) = match hook {
        Hook::BuiltIn => (btf::Btf::vmlinux()?, None),
        Hook::Module { .. } => (
            btf::Btf::module(crate::kfuse::MODULE)?,
            Some(sys::module_btf_fd(crate::kfuse::MODULE).context("finding efuse.ko's BTF object")?),
        ),
    };
    let ops = btf
        .find_struct(OPS_STRUCT)
        .with_context(|| format!("the efuse FUSE BPF hook ({hook}) has no {OPS_STRUCT}"))?;
    let value = btf.find_struct(OPS_VALUE_STRUCT)?;
    let data_off = value.member("data")?.offset as usize;

    let mut kvalue = vec![0u8; value.size as usize];
    let mut progs = Vec::new();
    let mut answers = Answers::default();
    // lookup and getattr are the hook's first patch; the others came later
    // (kernel/patches/0002-0004) and are used where the kernel has them.
    let wanted = [
        (PROG_LOOKUP, "lookup", true),
        (PROG_GETATTR, "getattr", true),
        (PROG_OPEN, "open", cfg.backing_max > 0),
        (PROG_IOCTL, "ioctl", true),
        (PROG_GETXATTR, "getxattr", true),
    ];
    for (prog, member, want) in wanted {
        let m = match ops.member(member) {
            Ok(m) => m,
            Err(e) if prog == PROG_LOOKUP || prog == PROG_GETATTR => return Err(e),
            Err(_) => {
                tracing::info!(
                    "this kernel's {OPS_STRUCT} has no `{member}`: {member} requests go to the daemon \
                     (apply kernel/patches/ in full)"
                );
                continue;
            }
        };
        if !want {
            continue;
        }
        let p = obj
            .programs
            .get(prog)
            .with_context(|| format!("BPF object has no program {prog}"))?;
        let insns = &obj.functions[&p.function_key()].instructions;
        let fd = sys::load_struct_ops_prog(prog, insns, ops.id, m.index, module_btf.as_ref())?;
        let off = data_off + m.offset as usize;
        kvalue[off..off + 8].copy_from_slice(&(fd.as_raw_fd() as u64).to_ne_bytes());
        progs.push(fd);
        match member {
            "open" => answers.open = true,
            "ioctl" => answers.ioctl = true,
            "getxattr" => answers.getxattr = true,
            _ => {}
        }
    }
    let off = data_off + ops.member("dev")?.offset as usize;
    kvalue[off..off + 4].copy_from_slice(&dev.to_ne_bytes());

    let ops_map = sys::create_struct_ops_map("efuse_ops", value.id, value.size, module_btf.as_ref())
        .with_context(|| {
            format!(
                "creating the {OPS_STRUCT} struct_ops map (value type {OPS_VALUE_STRUCT} id {}, {} bytes)",
                value.id, value.size
            )
        })?;
    sys::update_struct_ops_map(&ops_map, &kvalue)
        .with_context(|| format!("filling the {OPS_STRUCT} struct_ops map"))?;
    // The map holds the programs now.
    drop(progs);

    let ring: RingBuf<MapData> = take(&mut ebpf, MAP_MISSES)?;
    let maps = Arc::new(BpfMaps {
        entries: Mutex::new(take(&mut ebpf, MAP_ENTRIES)?),
        attrs: Mutex::new(take(&mut ebpf, MAP_ATTRS)?),
        lookups: Mutex::new(take(&mut ebpf, MAP_LOOKUPS)?),
        counters: take(&mut ebpf, MAP_COUNTERS)?,
        opens: Mutex::new(take(&mut ebpf, MAP_OPENS)?),
        noxattr: Mutex::new(take(&mut ebpf, MAP_NOXATTR)?),
        answers,
        capacities: (cfg.entries as usize, cfg.attrs as usize),
    });

    let link = sys::link_struct_ops(&ops_map).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => anyhow::anyhow!("FUSE connection {dev} already has BPF programs attached"),
        Some(libc::ENOENT) => anyhow::anyhow!("no FUSE connection {dev} to attach the BPF programs to"),
        _ => anyhow::Error::new(e).context(format!("linking the {OPS_STRUCT} struct_ops")),
    })?;

    tracing::info!(dev, %hook, "bpf tier: programs attached to FUSE connection {dev}");
    Ok((
        maps,
        Programs {
            _link: link,
            _ops_map: ops_map,
        },
        Misses::new(ring),
    ))
}
