//! The raw bpf(2) commands aya 0.14 has no API for: loading a struct_ops
//! program, creating and filling a struct_ops map, and linking it.
//!
//! `union bpf_attr` is passed as a zeroed 160-byte buffer with the fields
//! written at their UAPI offsets (include/uapi/linux/bpf.h, stable ABI).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya_obj::generated::bpf_insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_PROG_TYPE_STRUCT_OPS: u32 = 27;
const BPF_MAP_TYPE_STRUCT_OPS: u32 = 26;
const BPF_STRUCT_OPS: u32 = 44;
const BPF_F_LINK: u32 = 1 << 13;
/// The struct_ops value type is in the BTF object `value_type_btf_obj_fd`
/// (a module's), Linux 6.9.
const BPF_F_VTYPE_BTF_OBJ_FD: u32 = 1 << 15;

#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Self([0; 160])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(&mut self, off: usize, name: &str) -> &mut Self {
        // BPF_OBJ_NAME_LEN is 16 with the NUL; only [A-Za-z0-9_.] allowed.
        let n: Vec<u8> = name
            .bytes()
            .filter(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
            .take(15)
            .collect();
        self.0[off..off + n.len()].copy_from_slice(&n);
        self
    }
}

/// bpf(2) for a command that returns a number (0 or an id).
fn bpf_call(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr-sized buffer
    // that outlives the call; pointers written into it are live.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// bpf(2) for a command that returns a new descriptor.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let r = bpf_call(cmd, attr)?;
    // SAFETY: these commands return a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// A descriptor of the kernel BTF object of module `name` (what
/// /sys/kernel/btf/NAME shows), found by walking the loaded BTF objects:
/// struct_ops types of a module are named through it.
pub fn module_btf_fd(name: &str) -> io::Result<OwnedFd> {
    let mut id = 0u32;
    loop {
        let mut a = Attr::new();
        a.u32(0, id);
        id = match bpf_call(BPF_BTF_GET_NEXT_ID, &mut a) {
            Ok(_) => u32::from_ne_bytes(a.0[4..8].try_into().expect("4 bytes")),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no BTF object of module {name} is loaded"),
                ));
            }
            Err(e) => return Err(e),
        };
        let mut a = Attr::new();
        a.u32(0, id);
        let fd = match bpf(BPF_BTF_GET_FD_BY_ID, &mut a) {
            Ok(fd) => fd,
            // Unloaded since the walk saw it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let mut obj_name = [0u8; 64];
        // struct bpf_btf_info: btf, btf_size, id, name, name_len, kernel_btf.
        let mut info = [0u8; 32];
        info[16..24].copy_from_slice(&(obj_name.as_mut_ptr() as u64).to_ne_bytes());
        info[24..28].copy_from_slice(&(obj_name.len() as u32).to_ne_bytes());
        let mut a = Attr::new();
        a.u32(0, fd.as_raw_fd() as u32)
            .u32(4, info.len() as u32)
            .u64(8, info.as_mut_ptr() as u64);
        bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
        let kernel = u32::from_ne_bytes(info[28..32].try_into().expect("4 bytes")) != 0;
        let end = obj_name.iter().position(|&c| c == 0).unwrap_or(obj_name.len());
        if kernel && &obj_name[..end] == name.as_bytes() {
            return Ok(fd);
        }
    }
}

/// Load a struct_ops program implementing member `member_index` of the
/// struct `attach_btf_id` of vmlinux, or of the module whose BTF object is
/// `module_btf`. On failure the error carries the verifier's log.
pub fn load_struct_ops_prog(
    name: &str,
    insns: &[bpf_insn],
    attach_btf_id: u32,
    member_index: u32,
    module_btf: Option<&OwnedFd>,
) -> anyhow::Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 1 << 20];
    let mut attempt = |log_level: u32| {
        let mut a = Attr::new();
        a.u32(0, BPF_PROG_TYPE_STRUCT_OPS)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .name(48, name)
            .u32(68, member_index)
            .u32(108, attach_btf_id);
        if let Some(m) = module_btf {
            // attach_btf_obj_fd
            a.u32(112, m.as_raw_fd() as u32);
        }
        if log_level > 0 {
            log.fill(0);
            a.u32(24, log_level)
                .u32(28, log.len() as u32)
                .u64(32, log.as_mut_ptr() as u64);
        }
        bpf(BPF_PROG_LOAD, &mut a)
    };
    match attempt(0) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Load again with the verifier log to say why.
            let again = attempt(1);
            let end = log.iter().position(|&c| c == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            match again {
                Ok(fd) => Ok(fd),
                Err(_) => anyhow::bail!(
                    "the kernel refused BPF program {name}: {first}\nverifier log (tail):\n{}",
                    tail.join("\n")
                ),
            }
        }
    }
}

/// Load a minimal program BTF (one `int`). The kernel wants a program BTF
/// with every struct_ops map (libbpf passes the object's); ours carries no
/// information the map uses.
fn load_stub_btf() -> io::Result<OwnedFd> {
    let strings = b"\0int\0";
    let mut blob = Vec::new();
    blob.extend_from_slice(&0xeb9fu16.to_le_bytes());
    blob.extend_from_slice(&[1, 0]);
    // hdr_len, type_off, type_len, str_off, str_len
    for v in [24u32, 0, 16, 16, strings.len() as u32] {
        blob.extend_from_slice(&v.to_le_bytes());
    }
    // [1] int: name "int", kind INT, 4 bytes, 32 bits signed
    for v in [1u32, 1 << 24, 4, (1 << 24) | 32] {
        blob.extend_from_slice(&v.to_le_bytes());
    }
    blob.extend_from_slice(strings);
    let mut a = Attr::new();
    a.u64(0, blob.as_ptr() as u64).u32(16, blob.len() as u32);
    bpf(BPF_BTF_LOAD, &mut a)
}

/// Create a struct_ops map for the value type `value_type_id`
/// (`bpf_struct_ops_<name>` of vmlinux, or of the module whose BTF object
/// is `module_btf`) of `value_size` bytes, to be linked.
pub fn create_struct_ops_map(
    name: &str,
    value_type_id: u32,
    value_size: u32,
    module_btf: Option<&OwnedFd>,
) -> io::Result<OwnedFd> {
    let btf = load_stub_btf()?;
    let mut a = Attr::new();
    a.u32(48, btf.as_raw_fd() as u32);
    let mut flags = BPF_F_LINK;
    if let Some(m) = module_btf {
        flags |= BPF_F_VTYPE_BTF_OBJ_FD;
        // value_type_btf_obj_fd
        a.u32(72, m.as_raw_fd() as u32);
    }
    a.u32(0, BPF_MAP_TYPE_STRUCT_OPS)
        .u32(4, 4)
        .u32(8, value_size)
        .u32(12, 1)
        .u32(16, flags)
        .name(28, name)
        .u32(60, value_type_id);
    bpf(BPF_MAP_CREATE, &mut a)
}

/// Write the (only) value of a struct_ops map.
pub fn update_struct_ops_map(map: &OwnedFd, value: &[u8]) -> io::Result<()> {
    let key = 0u32;
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, value.as_ptr() as u64);
    bpf_call(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// Link (register) a filled struct_ops map; dropping the link unregisters.
pub fn link_struct_ops(map: &OwnedFd) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32).u32(8, BPF_STRUCT_OPS);
    bpf(BPF_LINK_CREATE, &mut a)
}
