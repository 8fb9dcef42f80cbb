//! Just enough of a BTF reader to find a struct and its members in the
//! kernel's type information (`/sys/kernel/btf/vmlinux`): the struct_ops
//! loader needs the type ids of `fuse_bpf_ops` and its value wrapper, and
//! member offsets and indices.

use anyhow::{Context, bail, ensure};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One member of a struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Index among the struct's members.
    pub index: u32,
    /// Offset in bytes.
    pub offset: u32,
}

/// A struct found in BTF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Struct {
    /// Type id.
    pub id: u32,
    /// Size in bytes.
    pub size: u32,
    /// Members in order.
    pub members: Vec<Member>,
}

impl Struct {
    /// The member called `name`.
    pub fn member(&self, name: &str) -> anyhow::Result<&Member> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .with_context(|| format!("BTF struct (id {}) has no member `{name}`", self.id))
    }
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let s = b.get(off..off + 4).context("truncated BTF")?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

/// Parsed BTF: raw type records and the string section. A module's BTF is
/// split BTF on top of vmlinux's: its type ids continue after the base's
/// and its string offsets after the base's string section.
pub struct Btf {
    data: Vec<u8>,
    types: (usize, usize),
    strings: (usize, usize),
    base: Option<Box<Btf>>,
    /// Id of the first type of this blob (1, or one past the base's last).
    first_id: u32,
    /// String offsets below this are the base's.
    str_base: u32,
}

/// Where the kernel publishes BTF: `vmlinux`, and one file per module.
pub const SYS_BTF: &str = "/sys/kernel/btf";

/// One type record: id, kind, name offset, size, vlen, kflag, and where its
/// body (the kind-specific part) starts.
struct Record {
    id: u32,
    kind: u32,
    name_off: u32,
    size: u32,
    vlen: usize,
    kflag: bool,
    body: usize,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> anyhow::Result<Self> {
        let path = format!("{SYS_BTF}/vmlinux");
        let data = std::fs::read(&path)
            .with_context(|| format!("reading {path} (the kernel needs CONFIG_DEBUG_INFO_BTF)"))?;
        Self::parse(data)
    }

    /// The BTF of loaded module `name`, on top of vmlinux's.
    pub fn module(name: &str) -> anyhow::Result<Self> {
        let path = format!("{SYS_BTF}/{name}");
        let data = std::fs::read(&path).with_context(|| {
            format!("reading {path} (module {name} is not loaded, or was built without BTF)")
        })?;
        Self::parse_split(data, Self::vmlinux()?)
    }

    /// Parse little-endian BTF.
    pub fn parse(data: Vec<u8>) -> anyhow::Result<Self> {
        Self::parse_with(data, None)
    }

    /// Parse split BTF whose base is `base`.
    pub fn parse_split(data: Vec<u8>, base: Btf) -> anyhow::Result<Self> {
        Self::parse_with(data, Some(Box::new(base)))
    }

    fn parse_with(data: Vec<u8>, base: Option<Box<Btf>>) -> anyhow::Result<Self> {
        ensure!(data.len() >= 24, "BTF too short");
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(magic == MAGIC, "not little-endian BTF (magic {magic:#x})");
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let types = (hdr_len + type_off, hdr_len + type_off + type_len);
        let strings = (hdr_len + str_off, hdr_len + str_off + str_len);
        ensure!(
            types.1 <= data.len() && strings.1 <= data.len(),
            "BTF sections out of bounds"
        );
        let (first_id, str_base) = match &base {
            Some(b) => (b.end_id()?, b.str_end()),
            None => (1, 0),
        };
        Ok(Self {
            data,
            types,
            strings,
            base,
            first_id,
            str_base,
        })
    }

    /// One past the last type id of this blob.
    fn end_id(&self) -> anyhow::Result<u32> {
        let mut end = self.first_id;
        self.walk(|r| {
            end = r.id + 1;
            Ok(false)
        })?;
        Ok(end)
    }

    /// One past the last string offset of this blob (and its base).
    fn str_end(&self) -> u32 {
        self.str_base + (self.strings.1 - self.strings.0) as u32
    }

    fn string(&self, off: u32) -> anyhow::Result<&str> {
        if off < self.str_base {
            let base = self
                .base
                .as_ref()
                .context("BTF string offset in a base that is missing")?;
            return base.string(off);
        }
        let s = &self.data[self.strings.0..self.strings.1];
        let tail = s
            .get((off - self.str_base) as usize..)
            .context("BTF string offset out of bounds")?;
        let end = tail
            .iter()
            .position(|&c| c == 0)
            .context("unterminated BTF string")?;
        std::str::from_utf8(&tail[..end]).context("BTF string not UTF-8")
    }

    /// Call `f` on each type record of this blob (not its base) in id order
    /// until it returns true.
    fn walk(&self, mut f: impl FnMut(&Record) -> anyhow::Result<bool>) -> anyhow::Result<()> {
        let mut off = self.types.0;
        let mut id = self.first_id;
        while off < self.types.1 {
            let info = u32_at(&self.data, off + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let r = Record {
                id,
                kind,
                name_off: u32_at(&self.data, off)?,
                size: u32_at(&self.data, off + 8)?,
                vlen,
                kflag: info >> 31 == 1,
                body: off + 12,
            };
            if f(&r)? {
                return Ok(());
            }
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                _ => 0,
            };
            off = r.body + extra;
            id += 1;
        }
        Ok(())
    }

    /// The struct called `name` (in this blob, then in its base).
    pub fn find_struct(&self, name: &str) -> anyhow::Result<Struct> {
        let mut found = None;
        self.walk(|r| {
            if r.kind != KIND_STRUCT || r.name_off == 0 || self.string(r.name_off)? != name {
                return Ok(false);
            }
            let mut members = Vec::with_capacity(r.vlen);
            for i in 0..r.vlen {
                let m = r.body + i * 12;
                let bits = u32_at(&self.data, m + 8)?;
                let bit_off = if r.kflag { bits & 0xff_ffff } else { bits };
                members.push(Member {
                    name: self.string(u32_at(&self.data, m)?)?.to_owned(),
                    index: i as u32,
                    offset: bit_off / 8,
                });
            }
            found = Some(Struct {
                id: r.id,
                size: r.size,
                members,
            });
            Ok(true)
        })?;
        match (found, &self.base) {
            (Some(s), _) => Ok(s),
            (None, Some(base)) => base.find_struct(name),
            (None, None) => bail!("the kernel's BTF has no struct `{name}`"),
        }
    }

    /// Does this BTF (or its base) have a struct called `name`?
    pub fn has_struct(&self, name: &str) -> bool {
        self.find_struct(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` and `struct s { int a; int b; }`.
    /// A BTF blob of `types` (u32 words) and `strings`.
    fn assemble(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(types);
        b.extend_from_slice(strings);
        b
    }

    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0";
        let mut types = Vec::new();
        let mut put = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] int, 4 bytes
        put(1);
        put(KIND_INT << 24);
        put(4);
        put(32);
        // [2] struct s, 8 bytes, 2 members
        put(5);
        put((KIND_STRUCT << 24) | 2);
        put(8);
        put(7);
        put(1);
        put(0);
        put(9);
        put(1);
        put(32);
        assemble(&types, strings)
    }

    #[test]
    fn finds_struct_members() {
        let btf = Btf::parse(blob()).unwrap();
        let s = btf.find_struct("s").unwrap();
        assert_eq!((s.id, s.size), (2, 8));
        assert_eq!(s.member("b").unwrap().offset, 4);
        assert_eq!(s.member("b").unwrap().index, 1);
        assert!(btf.find_struct("int").is_err(), "int is not a struct");
        assert!(btf.find_struct("t").is_err());
    }

    /// Split BTF on top of `blob()`: `struct t { s x; }` whose name is new
    /// and whose member name `a` is the base's string.
    fn split_blob() -> Vec<u8> {
        let strings = b"\0t\0";
        let mut types = Vec::new();
        let mut put = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [3] struct t, 8 bytes, 1 member of type [2] named "a" (base offset 7)
        let base_strs = b"\0int\0s\0a\0b\0".len() as u32;
        put(base_strs + 1);
        put((KIND_STRUCT << 24) | 1);
        put(8);
        put(7);
        put(2);
        put(0);
        assemble(&types, strings)
    }

    #[test]
    fn split_btf_continues_ids_and_strings_of_its_base() {
        let base = Btf::parse(blob()).unwrap();
        let m = Btf::parse_split(split_blob(), base).unwrap();
        let t = m.find_struct("t").unwrap();
        assert_eq!((t.id, t.size), (3, 8), "ids continue after the base's two types");
        assert_eq!(
            t.member("a").unwrap().offset,
            0,
            "member names may be base strings"
        );
        assert_eq!(
            m.find_struct("s").unwrap().id,
            2,
            "base types are found through the module"
        );
        assert!(m.has_struct("t") && !m.has_struct("u"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        assert!(Btf::parse(vec![0; 64]).is_err());
    }
}
