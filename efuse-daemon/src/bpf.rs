//! Loader of the `bpf` tier: attaches efuse's struct_ops programs
//! (`efuse-ebpf/src/ops.rs`) to one FUSE connection through the
//! `efuse_bpf_ops` hook (kernel/patches/), built into the kernel or in
//! efuse.ko (`crate::kfuse`).
//!
//! aya 0.14 cannot load struct_ops (aya issue 220), so this does it with
//! raw bpf(2) calls: aya creates the maps and aya-obj relocates the
//! programs' map references; then each program is loaded as
//! BPF_PROG_TYPE_STRUCT_OPS against the hook's BTF (vmlinux's or the module's), a
//! struct_ops map is filled with the program descriptors and the
//! connection number, and a link registers it. Dropping the link
//! unregisters: the kernel waits for running programs (RCU) before the
//! unlink returns.

pub mod btf;
mod sys;

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError as AyaMapError, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader};
use efuse_common::ops::{
    AttrValue, COUNTERS, EntryValue, MAP_ATTRS, MAP_COUNTERS, MAP_ENTRIES, MAP_LOOKUPS, MAP_MISSES,
    MAP_NOXATTR, MAP_OPENS, MissEvent, NameKey, NoXattr, OpenValue, PROG_GETATTR, PROG_GETXATTR, PROG_IOCTL,
    PROG_LOOKUP, PROG_OPEN,
};
use parking_lot::Mutex;

use crate::config::BpfConfig;
use crate::offload::{Answers, KernelMaps, MapError};

static OPS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/efuse-ops"));

use crate::kfuse::{Hook, OPS_STRUCT, OPS_VALUE_STRUCT};

/// The maps of an attached instance, as [`KernelMaps`].
pub struct BpfMaps {
    entries: Mutex<BpfHashMap<MapData, NameKey, EntryValue>>,
    attrs: Mutex<BpfHashMap<MapData, u64, AttrValue>>,
    lookups: Mutex<BpfHashMap<MapData, u64, u64>>,
    counters: PerCpuArray<MapData, u64>,
    opens: Mutex<BpfHashMap<MapData, u64, OpenValue>>,
    noxattr: Mutex<BpfHashMap<MapData, u64, NoXattr>>,
    answers: Answers,
    /// Capacities of the entry and attribute maps.
    capacities: (usize, usize),
}

fn map_error(e: AyaMapError) -> MapError {
    if let AyaMapError::SyscallError(s) = &e
        && matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
        )
    {
        return MapError::Full;
    }
    MapError::Other(e.to_string())
}

fn is_absent(e: &AyaMapError) -> bool {
    matches!(e, AyaMapError::KeyNotFound)
        || matches!(e, AyaMapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

impl KernelMaps for BpfMaps {
    fn put_entry(&self, key: &NameKey, value: &EntryValue) -> Result<(), MapError> {
        self.entries.lock().insert(key, value, 0).map_err(map_error)
    }
    fn del_entry(&self, key: &NameKey) {
        if let Err(e) = self.entries.lock().remove(key)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF entry map: {e}");
        }
    }
    fn put_attr(&self, ino: u64, value: &AttrValue) -> Result<(), MapError> {
        self.attrs.lock().insert(ino, value, 0).map_err(map_error)
    }
    fn del_attr(&self, ino: u64) {
        if let Err(e) = self.attrs.lock().remove(&ino)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF attribute map: {e}");
        }
    }
    fn lookups(&self, ino: u64) -> u64 {
        match self.lookups.lock().get(&ino, 0) {
            Ok(n) => n,
            Err(e) if is_absent(&e) => 0,
            Err(e) => {
                tracing::error!(ino, "cannot read the BPF lookup count: {e}");
                0
            }
        }
    }
    fn del_lookups(&self, ino: u64) {
        let _ = self.lookups.lock().remove(&ino);
    }
    fn counters(&self) -> [u64; COUNTERS as usize] {
        let mut out = [0; COUNTERS as usize];
        for (i, o) in out.iter_mut().enumerate() {
            if let Ok(v) = self.counters.get(&(i as u32), 0) {
                *o = v.iter().sum();
            }
        }
        out
    }
    fn answers(&self) -> Answers {
        self.answers
    }
    fn put_open(&self, ino: u64, value: &OpenValue) -> Result<(), MapError> {
        self.opens.lock().insert(ino, value, 0).map_err(map_error)
    }
    fn del_open(&self, ino: u64) {
        if let Err(e) = self.opens.lock().remove(&ino)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF open map: {e}");
        }
    }
    fn put_noxattr(&self, ino: u64, value: &NoXattr) -> Result<(), MapError> {
        self.noxattr.lock().insert(ino, value, 0).map_err(map_error)
    }
    fn del_noxattr(&self, ino: u64) {
        if let Err(e) = self.noxattr.lock().remove(&ino)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF no-xattr map: {e}");
        }
    }
    fn capacities(&self) -> (usize, usize) {
        self.capacities
    }
    fn entry_keys(&self) -> Vec<NameKey> {
        self.entries.lock().keys().filter_map(Result::ok).collect()
    }
    fn attr_keys(&self) -> Vec<u64> {
        self.attrs.lock().keys().filter_map(Result::ok).collect()
    }
    fn noxattr_keys(&self) -> Vec<u64> {
        self.noxattr.lock().keys().filter_map(Result::ok).collect()
    }
}

/// The programs attached to one connection. Drop (or [`Self::unlink`])
/// to detach.
pub struct Attachment {
    link: Option<OwnedFd>,
    _ops_map: OwnedFd,
    stop: Arc<AtomicBool>,
    events: Option<JoinHandle<()>>,
}

impl Attachment {
    /// Unregister the programs (returns once none runs any more) and stop
    /// the miss-event thread.
    pub fn unlink(&mut self) {
        self.link.take();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.events.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.unlink();
    }
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
/// /sys/fs/efuse/connections for the module). Miss events are handed to
/// `on_miss` on a thread of their own.
pub fn attach(
    hook: &Hook,
    dev: u32,
    cfg: &BpfConfig,
    on_miss: impl Fn(MissEvent) + Send + 'static,
) -> anyhow::Result<(Arc<BpfMaps>, Attachment)> {
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

    let mut ring: RingBuf<MapData> = take(&mut ebpf, MAP_MISSES)?;
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

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let events = std::thread::Builder::new()
        .name("efuse-misses".into())
        .spawn(move || {
            let fd = ring.as_raw_fd();
            while !stop2.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<MissEvent>() {
                        // SAFETY: the record holds a MissEvent written by
                        // the programs; read unaligned from the ring.
                        let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MissEvent>()) };
                        on_miss(ev);
                    }
                }
            }
        })
        .context("spawning the miss-event thread")?;
    tracing::info!(dev, %hook, "bpf tier: programs attached to FUSE connection {dev}");
    Ok((
        maps,
        Attachment {
            link: Some(link),
            _ops_map: ops_map,
            stop,
            events: Some(events),
        },
    ))
}
