//! Fuzzing the request path without a mount: arbitrary bytes through the
//! codec of both transports, and arbitrary (mostly well-formed) requests
//! through the dispatcher over the `mem` backend.
//!
//! Properties: nothing panics (a panic in the dispatcher would be answered
//! EIO by `transport::dispatch`; here it is caught and fails the test);
//! every request but FORGET gets exactly one well-formed reply that fits
//! its buffer; lookup counts never exceed the lookups handed out (they
//! never go "negative").
//!
//! `cargo test` runs a short pass (EFUSE_FUZZ_CASES, default 4,000 cases a
//! property); `cargo xtask soak` runs 100,000. Every crash found is kept
//! below as a named regression test.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use efuse::backend::mem::MemBackend;
use efuse::config::{KernelTierConfig, Offload};
use efuse::dispatch::{Dispatcher, Done};
use efuse::fs::EfuseFs;
use efuse::metrics::Metrics;
use efuse::transport::abi::{IN_HEADER_LEN, opcode as op};
use efuse::transport::wire::{self, InHeader, Out};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("EFUSE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes as a /dev/fuse request: split and decode give an
    /// errno or a request, never a panic.
    #[test]
    fn classic_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok((h, fixed, tail)) = wire::split(&bytes) {
            let _ = wire::decode(h.opcode, fixed, tail);
        }
    }

    /// A valid header over arbitrary arguments, every opcode.
    #[test]
    fn any_opcode_over_any_arguments(
        opcode in prop_oneof![0u32..60, any::<u32>()],
        extlen in prop_oneof![Just(0u16), any::<u16>()],
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut req = header(opcode, 7, 1, IN_HEADER_LEN + body.len(), extlen);
        req.extend_from_slice(&body);
        if let Ok((h, fixed, tail)) = wire::split(&req) {
            let _ = wire::decode(h.opcode, fixed, tail);
        }
    }

    /// The io_uring split with arbitrary header, op_in, payload size.
    #[test]
    fn uring_split_never_panics(
        hdr in prop::collection::vec(any::<u8>(), 0..64),
        op_in in prop::collection::vec(any::<u8>(), 0..128),
        payload_sz in any::<u32>(),
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Ok((h, fixed, tail)) = wire::split_uring(&hdr, &op_in, payload_sz as usize, &payload) {
            prop_assert!(tail.len() <= payload.len());
            let _ = wire::decode(h.opcode, fixed, tail);
        }
    }

    /// Sequences of requests through the dispatcher over `mem`.
    #[test]
    fn dispatcher_sequences(steps in prop::collection::vec(step(), 1..60), kernel_tier in any::<bool>()) {
        run_sequence(&steps, if kernel_tier { Offload::Kernel } else { Offload::Off });
    }
}

fn header(opcode: u32, unique: u64, nodeid: u64, len: usize, extlen: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_ne_bytes());
    v.extend_from_slice(&opcode.to_ne_bytes());
    v.extend_from_slice(&unique.to_ne_bytes());
    v.extend_from_slice(&nodeid.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes()); // uid
    v.extend_from_slice(&0u32.to_ne_bytes()); // gid
    v.extend_from_slice(&1u32.to_ne_bytes()); // pid
    v.extend_from_slice(&extlen.to_ne_bytes());
    v.extend_from_slice(&[0u8; 2]);
    v
}

/// One request of a sequence: an opcode, which node it names (an index
/// into the nodes handed out so far), a name, and arbitrary argument bytes
/// (zeroes mostly, so that requests get past the decoder and reach the
/// filesystem).
#[derive(Clone, Debug)]
struct Step {
    opcode: u32,
    node: usize,
    name: Vec<u8>,
    fixed: Vec<u8>,
    data: Vec<u8>,
}

const OPS: &[u32] = &[
    op::LOOKUP,
    op::LOOKUP,
    op::FORGET,
    op::BATCH_FORGET,
    op::GETATTR,
    op::SETATTR,
    op::READLINK,
    op::SYMLINK,
    op::MKNOD,
    op::MKDIR,
    op::MKDIR,
    op::UNLINK,
    op::RMDIR,
    op::RENAME,
    op::RENAME2,
    op::LINK,
    op::OPEN,
    op::READ,
    op::WRITE,
    op::STATFS,
    op::RELEASE,
    op::FSYNC,
    op::SETXATTR,
    op::GETXATTR,
    op::LISTXATTR,
    op::REMOVEXATTR,
    op::FLUSH,
    op::OPENDIR,
    op::READDIR,
    op::READDIRPLUS,
    op::RELEASEDIR,
    op::ACCESS,
    op::CREATE,
    op::CREATE,
    op::FALLOCATE,
    op::LSEEK,
    op::COPY_FILE_RANGE,
    op::IOCTL,
    op::INTERRUPT,
    op::STATX,
    op::TMPFILE,
    op::DESTROY,
    99,
];

fn step() -> impl Strategy<Value = Step> {
    (
        prop::sample::select(OPS),
        0usize..8,
        prop_oneof![
            prop::sample::select(vec![&b"a"[..], b"b", b"dir", b".", b"..", b""]).prop_map(|s| s.to_vec()),
            prop::collection::vec(any::<u8>(), 0..300),
        ],
        prop_oneof![
            3 => Just(vec![0u8; 96]),
            1 => prop::collection::vec(any::<u8>(), 0..96),
        ],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(opcode, node, name, fixed, data)| Step {
            opcode,
            node,
            name,
            fixed,
            data,
        })
}

/// A dispatcher over `fs`, connected as the daemon connects it, with
/// /dev/null standing in for the session: no INIT here grants
/// passthrough, so no backing id is ever registered, and notifications go
/// nowhere.
fn dispatcher(fs: &Arc<EfuseFs>) -> Dispatcher {
    let dev = Arc::new(OwnedFd::from(
        std::fs::File::open("/dev/null").expect("/dev/null"),
    ));
    fs.connect(efuse::fs::SessionLink {
        connection: 0,
        fuse: efuse::kfuse::Fuse::Kernel,
        notifier: Arc::new(efuse::transport::reply::Notify::new(dev.clone())),
        passthrough: Arc::new(efuse::fs::passthrough::Passthrough::new(dev)),
    });
    Dispatcher::new(fs.clone(), Arc::new(Metrics::default()))
}

fn run_sequence(steps: &[Step], tier: Offload) {
    let fs = Arc::new(EfuseFs::new(
        Arc::new(MemBackend::new()),
        tier,
        KernelTierConfig::default(),
    ));
    let disp = dispatcher(&fs);
    // Node ids the dispatcher handed out (entry replies), and how many
    // lookups of each it reported.
    let mut nodes: Vec<u64> = vec![1];
    let mut handed_out = 0u64;
    let mut reply = vec![0u8; 1 << 17];
    for (unique, s) in steps.iter().enumerate() {
        let nodeid = nodes[s.node % nodes.len()];
        let other = nodes[(s.node + 1) % nodes.len()];
        let mut fixed = s.fixed.clone();
        let mut tail = Vec::new();
        match s.opcode {
            op::LOOKUP | op::MKDIR | op::MKNOD | op::CREATE | op::UNLINK | op::RMDIR | op::LINK => {
                tail.extend_from_slice(&s.name);
                tail.push(0);
                if s.opcode == op::LINK && fixed.len() >= 8 {
                    fixed[..8].copy_from_slice(&other.to_ne_bytes());
                }
                if s.opcode == op::MKDIR && fixed.len() >= 4 {
                    fixed[..4].copy_from_slice(&0o755u32.to_ne_bytes());
                }
                if matches!(s.opcode, op::CREATE | op::MKNOD) && fixed.len() >= 8 {
                    fixed[..4].copy_from_slice(&0o100_644u32.to_ne_bytes());
                    if s.opcode == op::CREATE {
                        fixed[..4].copy_from_slice(&(libc::O_RDWR as u32).to_ne_bytes());
                        fixed[4..8].copy_from_slice(&0o100_644u32.to_ne_bytes());
                    }
                }
            }
            op::RENAME | op::RENAME2 => {
                if fixed.len() >= 8 {
                    fixed[..8].copy_from_slice(&other.to_ne_bytes());
                }
                tail.extend_from_slice(&s.name);
                tail.push(0);
                tail.extend_from_slice(b"renamed\0");
            }
            op::SYMLINK => {
                tail.extend_from_slice(&s.name);
                tail.push(0);
                tail.extend_from_slice(b"target\0");
            }
            op::FORGET => {
                // The kernel forgets at most what it looked up; a
                // malformed count must not take the table below zero.
                if fixed.len() >= 8 {
                    let n = u64::from_ne_bytes(fixed[..8].try_into().unwrap()) % 4;
                    fixed[..8].copy_from_slice(&n.to_ne_bytes());
                }
            }
            op::BATCH_FORGET => {
                if fixed.len() >= 4 {
                    fixed[..4].copy_from_slice(&2u32.to_ne_bytes());
                }
                for n in [nodeid, other] {
                    tail.extend_from_slice(&n.to_ne_bytes());
                    tail.extend_from_slice(&1u64.to_ne_bytes());
                }
            }
            op::WRITE => {
                if fixed.len() >= 40 {
                    fixed[16..20].copy_from_slice(&(s.data.len() as u32).to_ne_bytes());
                }
                tail.extend_from_slice(&s.data);
            }
            op::READ | op::READDIR | op::READDIRPLUS => {
                if fixed.len() >= 40 {
                    fixed[16..20].copy_from_slice(&4096u32.to_ne_bytes());
                }
            }
            op::SETXATTR => {
                if fixed.len() >= 8 {
                    fixed[..4].copy_from_slice(&(s.data.len() as u32).to_ne_bytes());
                    fixed[4..8].copy_from_slice(&0u32.to_ne_bytes());
                }
                tail.extend_from_slice(b"user.");
                tail.extend_from_slice(&s.name);
                tail.push(0);
                tail.extend_from_slice(&s.data);
            }
            op::GETXATTR | op::REMOVEXATTR => {
                if fixed.len() >= 4 {
                    fixed[..4].copy_from_slice(&256u32.to_ne_bytes());
                }
                tail.extend_from_slice(b"user.");
                tail.extend_from_slice(&s.name);
                tail.push(0);
            }
            _ => tail.extend_from_slice(&s.data),
        }
        let mut body = fixed;
        body.truncate(wire::fixed_len(s.opcode).max(if s.opcode == op::SETXATTR { 8 } else { 0 }));
        body.extend_from_slice(&tail);
        let mut req = header(s.opcode, unique as u64 + 1, nodeid, IN_HEADER_LEN + body.len(), 0);
        req.extend_from_slice(&body);
        let Ok((h, f, t)) = wire::split(&req) else {
            panic!("a request built to be well formed did not split: {s:?}")
        };
        let cap = reply.len();
        let mut out = Out::new(&mut reply[..]);
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            efuse::transport::dispatch(&disp, &h, f, t, &mut out)
        }))
        .unwrap_or_else(|_| panic!("the request path panicked (not contained) on {s:?}"));
        check_reply(&h, &done, out.len(), cap);
        // Entry replies hand out a node and a lookup.
        if done == Done::Reply
            && matches!(
                h.opcode,
                op::LOOKUP | op::MKDIR | op::MKNOD | op::CREATE | op::SYMLINK | op::LINK
            )
            && out.len() >= 8
        {
            let id = u64::from_ne_bytes(out.bytes()[..8].try_into().unwrap());
            if id != 0 {
                handed_out += 1;
                if !nodes.contains(&id) {
                    nodes.push(id);
                }
            }
        }
        let (_, sum) = fs.inodes().totals();
        assert!(
            sum <= handed_out + 1,
            "lookup counts ({sum}) exceed the lookups handed out ({handed_out}): a count went below zero"
        );
    }
}

fn check_reply(h: &InHeader, done: &Done, len: usize, cap: usize) {
    match (h.opcode, done) {
        (op::FORGET | op::BATCH_FORGET, Done::NoReply) => {}
        (op::FORGET | op::BATCH_FORGET, d) => panic!("FORGET answered: {d:?}"),
        // INTERRUPT has no reply of its own either.
        (op::INTERRUPT, _) => {}
        (_, Done::NoReply) => panic!("opcode {} got no reply", h.opcode),
        (_, Done::Error(e)) => assert!(*e > 0 && *e < 4096, "errno {e} of opcode {}", h.opcode),
        (_, Done::Reply) => assert!(len <= cap, "reply of {len} bytes in a buffer of {cap}"),
    }
}

// Regressions found by the fuzzer are kept here by name.

#[test]
fn a_malformed_forget_gets_no_reply() {
    // Found by `dispatcher_sequences`: a FORGET whose fixed part is short
    // was answered EINVAL; the kernel expects no reply to a FORGET.
    let steps = [Step {
        opcode: op::FORGET,
        node: 0,
        name: vec![],
        fixed: vec![1, 2, 3],
        data: vec![],
    }];
    run_sequence(&steps, Offload::Kernel);
}

#[test]
fn a_huge_truncate_of_a_mem_file_is_efbig_not_an_abort() {
    // Found by `dispatcher_sequences`: SETATTR of size 2^59 on a `mem` file
    // made the daemon allocate it (the process aborted).
    let fs = Arc::new(EfuseFs::new(
        Arc::new(MemBackend::new()),
        Offload::Kernel,
        KernelTierConfig::default(),
    ));
    let disp = dispatcher(&fs);
    let mut reply = vec![0u8; 4096];
    let mut send = |opcode: u32, nodeid: u64, body: &[u8]| {
        let mut req = header(opcode, 1, nodeid, IN_HEADER_LEN + body.len(), 0);
        req.extend_from_slice(body);
        let (h, f, t) = wire::split(&req).unwrap();
        let mut out = Out::new(&mut reply[..]);
        let done = efuse::transport::dispatch(&disp, &h, f, t, &mut out);
        let first = out
            .bytes()
            .get(..8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()));
        (done, first)
    };
    let mut create = vec![0u8; 16];
    create[..4].copy_from_slice(&(libc::O_RDWR as u32).to_ne_bytes());
    create[4..8].copy_from_slice(&0o100_644u32.to_ne_bytes());
    create.extend_from_slice(b"big\0");
    let (done, ino) = send(op::CREATE, 1, &create);
    assert_eq!(done, Done::Reply);
    let ino = ino.unwrap();
    for size in [1u64 << 59, u64::MAX, i64::MAX as u64] {
        let mut setattr = vec![0u8; 88];
        setattr[..4].copy_from_slice(&(1u32 << 3).to_ne_bytes()); // FATTR_SIZE
        setattr[16..24].copy_from_slice(&size.to_ne_bytes());
        assert_eq!(
            send(op::SETATTR, ino, &setattr).0,
            Done::Error(libc::EFBIG),
            "size {size}"
        );
    }
    // Still serving, the file unchanged.
    assert_eq!(send(op::GETATTR, ino, &[0u8; 16]).0, Done::Reply);
}

#[test]
fn forget_of_more_than_was_looked_up_saturates() {
    let steps = [Step {
        opcode: op::FORGET,
        node: 0,
        name: vec![],
        fixed: 3u64.to_ne_bytes().to_vec(),
        data: vec![],
    }];
    run_sequence(&steps, Offload::Kernel);
}
