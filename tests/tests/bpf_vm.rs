//! The `bpf` tier, tested in a VM running the patched kernel.
//!
//! The host's kernel has no `fuse_bpf_ops` hook, so this test binary (no
//! libtest harness) boots the kernel built by `cargo xtask kernel` under
//! qemu with itself and the efuse binary in the initramfs, and runs its
//! scenarios there (`EFUSE_IN_VM=1`). Each scenario mounts for real over a
//! tmpfs backing directory and compares results with the backing directory;
//! the host test fails unless every scenario passed in the guest.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use efuse_tests::{TestMount, daemon_count, efuse, efuse_bin, eventually, mount_stats, upcalls};

const NAME: &str = "bpf_vm";

type Scenario = (&'static str, fn());

const SCENARIOS: &[Scenario] = &[
    ("programs_attach_and_answer", programs_attach_and_answer),
    ("cold_walk_after_prefetch", cold_walk_after_prefetch),
    ("misses_prefetch_their_directory", misses_prefetch_their_directory),
    ("changes_are_never_served_stale", changes_are_never_served_stale),
    (
        "names_in_the_maps_keep_their_directory_watched",
        names_in_the_maps_keep_their_directory_watched,
    ),
    ("lookup_counts_balance", lookup_counts_balance),
    ("detach_under_load", detach_under_load),
    ("two_mounts_are_isolated", two_mounts_are_isolated),
    (
        "full_maps_fall_back_to_the_daemon",
        full_maps_fall_back_to_the_daemon,
    ),
    ("full_maps_keep_the_recent_names", full_maps_keep_the_recent_names),
    ("warm_read_path_wakes_no_daemon", warm_read_path_wakes_no_daemon),
    ("kernel_opens_are_never_stale", kernel_opens_are_never_stale),
    ("writers_reach_the_daemon", writers_reach_the_daemon),
    (
        "backing_ids_are_bounded_and_released",
        backing_ids_are_bounded_and_released,
    ),
    ("expired_answers_are_renewed", expired_answers_are_renewed),
    (
        "allow_root_keeps_the_kernel_tier",
        allow_root_keeps_the_kernel_tier,
    ),
    ("times_before_1970_from_the_maps", times_before_1970_from_the_maps),
    ("module_beside_the_kernels_fuse", module_beside_the_kernels_fuse),
    // Last: it unloads the module (and loads it again).
    ("module_unloads_after_unmount", module_unloads_after_unmount),
];

fn main() {
    if std::env::var_os("EFUSE_IN_VM").is_some() {
        std::process::exit(guest());
    }
    // Behave like a libtest binary towards `cargo test <filter>` and `--list`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        return;
    }
    host();
}

/// Boot the VM kernel (Debian's stock kernel with efuse.ko, as `cargo
/// xtask test` sets it up) and run the scenarios in it.
fn host() {
    let guest = efuse_tests::vm::Guest::from_env().unwrap_or_else(|| {
        panic!(
            "no VM kernel: run this test through `cargo xtask test` (it fetches Debian's kernel and \
             builds efuse.ko for it), or set EFUSE_VM_KERNEL (and EFUSE_VM_MODULE)"
        )
    });
    let me = std::env::current_exe().expect("current exe");
    let exe = me.file_name().unwrap().to_string_lossy().into_owned();
    let full = if std::env::var_os("EFUSE_VM_FULL_SCALE").is_some() {
        "EFUSE_VM_FULL_SCALE=1 "
    } else {
        ""
    };
    // EFUSE_VM_ONLY: run only the scenarios whose names contain it (by hand).
    let only = std::env::var("EFUSE_VM_ONLY").unwrap_or_default();
    let expected = SCENARIOS
        .iter()
        .filter(|(n, _)| only.is_empty() || n.contains(only.as_str()))
        .count();
    let cmd = format!("{full}EFUSE_IN_VM=1 EFUSE_LOG=warn /bin/{exe} {only}");
    eprintln!(
        "{NAME}: booting {} {} with the scenarios",
        guest.kernel.display(),
        guest
            .module
            .as_ref()
            .map(|m| format!("and {}", m.display()))
            .unwrap_or_default()
    );
    let started = Instant::now();
    let r =
        efuse_tests::vm::run(&guest, &[me, efuse_bin()], &cmd, Duration::from_secs(900)).expect("run the VM");
    eprintln!("{NAME}: VM run took {:.1?}", started.elapsed());
    let passed = r.console.lines().filter(|l| l.starts_with("PASS ")).count();
    assert_eq!(
        r.code,
        Some(0),
        "bpf tier scenarios failed in the VM ({passed}/{expected} passed); console above"
    );
    assert_eq!(passed, expected, "not every scenario reported");
    if guest.module.is_some() {
        assert!(
            r.console.contains("efuse-vm: efuse.ko") && r.console.contains(" loaded"),
            "the module was not reported loaded"
        );
    }
}

fn guest() -> i32 {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let mut failed = 0;
    for (name, f) in SCENARIOS {
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let t = Instant::now();
        match std::panic::catch_unwind(f) {
            Ok(()) => println!("PASS {name} ({:.1?})", t.elapsed()),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("FAIL {name}: {msg}");
                failed += 1;
            }
        }
    }
    i32::from(failed > 0)
}

fn bpf_mount() -> TestMount {
    TestMount::with_args(&["--offload", "bpf"])
}

fn prefetch(p: &Path) -> u64 {
    let (code, out, err) = efuse(&[OsStr::new("prefetch"), p.as_os_str()]);
    assert_eq!(code, 0, "efuse prefetch failed: {err}");
    out.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("prefetch output: {out}"))
}

fn bpf(v: &serde_json::Value, key: &str) -> u64 {
    v["bpf"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no bpf.{key} in stats"))
}

fn offload(m: &TestMount, tier: &str) {
    let (code, _, err) = efuse(&[OsStr::new("offload"), m.mnt().as_os_str(), OsStr::new(tier)]);
    assert_eq!(code, 0, "efuse offload {tier}: {err}");
}

/// What stat(2) must agree on between the mount and the backing directory:
/// mode, size, nlink, uid, gid, mtime (s, ns), ctime.
type StatKey = (u32, u64, u64, u32, u32, i64, i64, i64);

fn stat_key(p: &Path) -> std::io::Result<StatKey> {
    let m = fs::symlink_metadata(p)?;
    Ok((
        m.mode(),
        m.size(),
        m.nlink(),
        m.uid(),
        m.gid(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
    ))
}

/// statx(2) with AT_STATX_FORCE_SYNC: mode, size, mtime.
fn statx_sync(p: &Path) -> (u32, u64, i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed plain-data out struct.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            &mut sx,
        )
    };
    assert_eq!(
        rc,
        0,
        "statx {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    (u32::from(sx.stx_mode), sx.stx_size, sx.stx_mtime.tv_sec)
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"2").expect("drop_caches");
}

/// Drop the kernel's caches until it holds no inode of `m` (its FORGETs
/// arrive after drop_caches returns), within `bound` (a hang guard).
fn kernel_forgets_all(m: &TestMount, bound: Duration) {
    assert!(
        eventually(bound, || {
            drop_caches();
            mount_stats(&m.mnt())["inodes"][1] == 0
        }),
        "the kernel still holds inodes after {bound:?}: {}",
        mount_stats(&m.mnt())["inodes"]
    );
}

/// `dirs` directories of `per_dir` files each, plus the directories.
fn make_tree(root: &Path, dirs: usize, per_dir: usize) -> Vec<PathBuf> {
    let mut rel = Vec::new();
    for d in 0..dirs {
        let dir = PathBuf::from(format!("d{d:03}"));
        fs::create_dir_all(root.join(&dir)).unwrap();
        rel.push(dir.clone());
        for f in 0..per_dir {
            let p = dir.join(format!("f{f:03}"));
            fs::write(root.join(&p), vec![b'x'; (d * 7 + f) % 97]).unwrap();
            rel.push(p);
        }
    }
    rel
}

fn walk(m: &TestMount, paths: &[PathBuf]) {
    for p in paths {
        assert_eq!(
            stat_key(&m.m(p)).unwrap(),
            stat_key(&m.b(p)).unwrap(),
            "stat of {}",
            p.display()
        );
    }
}

fn lookups_and_getattrs(v: &serde_json::Value) -> (u64, u64) {
    (
        upcalls(v, "LOOKUP") + upcalls(v, "GETATTR"),
        daemon_count(v, "LOOKUP") + daemon_count(v, "GETATTR"),
    )
}

fn programs_attach_and_answer() {
    let m = bpf_mount();
    m.seed_file("a/b", b"hello");
    m.settle();
    let s = mount_stats(&m.mnt());
    assert_eq!(s["offload"], "bpf");
    assert!(
        s["bpf"]["attached"].as_bool().unwrap(),
        "programs not attached: {}",
        s["bpf"]
    );
    assert!(prefetch(&m.mnt()) >= 1);
    let before = mount_stats(&m.mnt());
    assert_eq!(stat_key(&m.m("a")).unwrap(), stat_key(&m.b("a")).unwrap());
    let after = mount_stats(&m.mnt());
    assert_eq!(bpf(&after, "lookup_hits"), bpf(&before, "lookup_hits") + 1);
    assert_eq!(daemon_count(&after, "LOOKUP"), daemon_count(&before, "LOOKUP"));
    // A GETATTR the kernel must send (statx with AT_STATX_FORCE_SYNC) is
    // answered from the attribute map.
    let before = mount_stats(&m.mnt());
    let want = stat_key(&m.b("a")).unwrap();
    assert_eq!(statx_sync(&m.m("a")), (want.0, want.1, want.5));
    let after = mount_stats(&m.mnt());
    assert_eq!(bpf(&after, "getattr_hits"), bpf(&before, "getattr_hits") + 1);
    assert_eq!(daemon_count(&after, "GETATTR"), daemon_count(&before, "GETATTR"));
    assert_eq!(fs::read(m.m("a/b")).unwrap(), b"hello");
    // Names the kernel will not ask BPF about still work.
    let long = "n".repeat(255);
    fs::write(m.b(&long), b"long").unwrap();
    assert_eq!(fs::read(m.m(&long)).unwrap(), b"long");
    assert_eq!(
        fs::metadata(m.m("n".repeat(256))).unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
}

fn cold_walk_after_prefetch() {
    let tiers = ["kernel", "bpf"];
    let mut counts = BTreeMap::new();
    for tier in tiers {
        let m = TestMount::with_args(&["--offload", tier]);
        // 100 directories x 99 files + the directories = 10,000 entries.
        let paths = make_tree(&m.backing(), 100, 99);
        assert_eq!(paths.len(), 10_000);
        m.settle();
        if tier == "bpf" {
            let t = Instant::now();
            let n = prefetch(&m.mnt());
            println!("prefetched {n} entries in {:.1?}", t.elapsed());
            assert_eq!(n, 10_000);
        }
        let before = mount_stats(&m.mnt());
        let t = Instant::now();
        walk(&m, &paths);
        let took = t.elapsed();
        let after = mount_stats(&m.mnt());
        let (k0, d0) = lookups_and_getattrs(&before);
        let (k1, d1) = lookups_and_getattrs(&after);
        println!(
            "cold walk of 10000 entries, {tier} tier: {} LOOKUP+GETATTR upcalls (tracepoints), {} (daemon), {:.1?}; bpf answers {}",
            k1 - k0,
            d1 - d0,
            took,
            bpf(&after, "lookup_hits") + bpf(&after, "getattr_hits")
        );
        counts.insert(tier, (k1 - k0, d1 - d0));
    }
    let (kk, kd) = counts["kernel"];
    let (bk, bd) = counts["bpf"];
    assert!(
        kk >= 10_000 && kd >= 10_000,
        "kernel tier walk made {kk}/{kd} upcalls"
    );
    assert!(
        bk * 10 <= kk,
        "bpf tier: {bk} upcalls vs {kk} on the kernel tier (tracepoints)"
    );
    assert!(
        bd * 10 <= kd,
        "bpf tier: {bd} upcalls vs {kd} on the kernel tier (daemon)"
    );
    println!(
        "bpf tier saves {:.1}% of LOOKUP+GETATTR upcalls on a cold walk",
        100.0 * (1.0 - bk as f64 / kk as f64)
    );
}

fn misses_prefetch_their_directory() {
    let m = bpf_mount();
    let paths = make_tree(&m.backing(), 1, 50);
    m.settle();
    // No explicit prefetch: the first lookup in d000 misses in BPF, the
    // miss event makes the daemon load the whole directory.
    assert_eq!(
        stat_key(&m.m("d000/f000")).unwrap(),
        stat_key(&m.b("d000/f000")).unwrap()
    );
    assert!(
        eventually(ASYNC, || {
            let s = mount_stats(&m.mnt());
            bpf(&s, "prefetches") >= 2 && bpf(&s, "entries") >= 50
        }),
        "miss events did not prefetch: {}",
        mount_stats(&m.mnt())["bpf"]
    );
    let before = mount_stats(&m.mnt());
    walk(&m, &paths[2..]);
    let after = mount_stats(&m.mnt());
    assert!(bpf(&before, "events") >= 1);
    assert_eq!(
        daemon_count(&after, "LOOKUP"),
        daemon_count(&before, "LOOKUP"),
        "siblings of a missed name still went to the daemon"
    );
    assert_eq!(bpf(&after, "lookup_hits") - bpf(&before, "lookup_hits"), 49);
}

fn names_in_the_maps_keep_their_directory_watched() {
    // The maps name entries of "dir" while the kernel holds nothing of it
    // and the map's own entry for "dir" goes (its mode changed behind the
    // mount): "dir" must stay watched, or a removal in it goes unseen and
    // the maps answer the removed name for the watched TTL (an hour).
    let m = bpf_mount();
    m.seed_file("dir/f", b"f");
    m.seed_file("dir/g", b"g");
    m.settle();
    assert_eq!(prefetch(&m.mnt()), 3);
    kernel_forgets_all(&m, ASYNC);
    fs::set_permissions(m.b("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    m.settle();
    fs::remove_file(m.b("dir/g")).unwrap();
    m.settle();
    assert_eq!(stat_key(&m.m("dir")).unwrap(), stat_key(&m.b("dir")).unwrap());
    assert_eq!(
        fs::metadata(m.m("dir/g")).map(|_| ()).unwrap_err().raw_os_error(),
        Some(libc::ENOENT),
        "a name removed behind the mount is still answered"
    );
    assert_eq!(fs::read(m.m("dir/f")).unwrap(), b"f");
}

fn changes_are_never_served_stale() {
    let m = bpf_mount();
    m.seed_file("dir/f", b"12345");
    m.seed_file("dir/g", b"g");
    m.settle();
    prefetch(&m.mnt());
    let hits = bpf(&mount_stats(&m.mnt()), "lookup_hits");
    assert_eq!(stat_key(&m.m("dir/f")).unwrap(), stat_key(&m.b("dir/f")).unwrap());
    assert!(
        bpf(&mount_stats(&m.mnt()), "lookup_hits") > hits,
        "not answered by BPF"
    );

    // Metadata changed behind the mount: seen once the watch fires, and
    // never reverted by a later BPF answer.
    fs::set_permissions(m.b("dir/f"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.b("dir/f"), b"1234567890").unwrap();
    m.settle();
    assert_eq!(
        stat_key(&m.m("dir/f")).unwrap(),
        stat_key(&m.b("dir/f")).unwrap(),
        "metadata change behind the mount not seen"
    );
    for _ in 0..3 {
        drop_caches();
        assert_eq!(stat_key(&m.m("dir/f")).unwrap(), stat_key(&m.b("dir/f")).unwrap());
    }

    // Entries changed behind the mount.
    fs::remove_file(m.b("dir/g")).unwrap();
    fs::write(m.b("dir/new"), b"n").unwrap();
    fs::rename(m.b("dir/f"), m.b("dir/f2")).unwrap();
    m.settle();
    for gone in ["dir/g", "dir/f"] {
        assert_eq!(
            fs::metadata(m.m(gone)).unwrap_err().raw_os_error(),
            Some(libc::ENOENT),
            "{gone} removed behind the mount, still seen"
        );
    }
    assert_eq!(fs::read(m.m("dir/new")).unwrap(), b"n");
    assert_eq!(fs::read(m.m("dir/f2")).unwrap(), b"1234567890");
    drop_caches();
    assert_eq!(
        fs::metadata(m.m("dir/g")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );

    // Through the mount: visible at once, no waiting.
    prefetch(&m.mnt());
    fs::set_permissions(m.m("dir/f2"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        stat_key(&m.m("dir/f2")).unwrap(),
        stat_key(&m.b("dir/f2")).unwrap()
    );
    fs::write(m.m("dir/f2"), b"abc").unwrap();
    drop_caches();
    assert_eq!(
        stat_key(&m.m("dir/f2")).unwrap(),
        stat_key(&m.b("dir/f2")).unwrap()
    );
    fs::rename(m.m("dir/f2"), m.m("dir/f3")).unwrap();
    drop_caches();
    assert_eq!(
        fs::metadata(m.m("dir/f2")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(fs::read(m.m("dir/f3")).unwrap(), b"abc");
    fs::remove_file(m.m("dir/f3")).unwrap();
    drop_caches();
    assert_eq!(
        fs::metadata(m.m("dir/f3")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    fs::hard_link(m.m("dir/new"), m.m("dir/link")).unwrap();
    drop_caches();
    assert_eq!(
        stat_key(&m.m("dir/new")).unwrap(),
        stat_key(&m.b("dir/new")).unwrap()
    );
    assert_eq!(fs::metadata(m.m("dir/new")).unwrap().nlink(), 2);
}

fn lookup_counts_balance() {
    let m = bpf_mount();
    let paths = make_tree(&m.backing(), 5, 40);
    m.settle();
    prefetch(&m.mnt());
    for _ in 0..3 {
        walk(&m, &paths);
        drop_caches();
    }
    let s = mount_stats(&m.mnt());
    assert!(
        bpf(&s, "lookup_hits") >= 3 * paths.len() as u64 / 2,
        "BPF answered too little: {}",
        s["bpf"]
    );
    assert!(
        daemon_count(&s, "FORGET") + daemon_count(&s, "BATCH_FORGET") > 0,
        "no FORGET arrived"
    );
    kernel_forgets_all(&m, ASYNC);
    let s = mount_stats(&m.mnt());
    assert_eq!(s["excess_forgets"], 0, "a FORGET exceeded the counted lookups");
    assert!(bpf(&s, "reconciled") > 0, "no BPF lookup was taken over");
    // The files are still served after all those forgets.
    walk(&m, &paths);
    let st = m.unmount();
    assert!(st.success(), "daemon exit {st}");
}

/// Programs and maps of the bpf tier loaded in the kernel now.
fn loaded_objects() -> (usize, usize) {
    let progs = efuse_tests::bpf_objects(true)
        .into_iter()
        .filter(|n| n.starts_with("efuse_lookup") || n.starts_with("efuse_getattr"))
        .count();
    let maps = efuse_tests::bpf_objects(false)
        .into_iter()
        .filter(|n| n.starts_with("EFUSE_ENTRIES") || n.starts_with("efuse_ops"))
        .count();
    (progs, maps)
}

/// How long what the kernel or the daemon does after a syscall returned
/// (FORGET after drop_caches, a prefetch on a miss event) may take in the
/// emulated guest: a bound against hangs, not a speed.
const ASYNC: Duration = Duration::from_secs(60);

/// How long the kernel may take to free a detached struct_ops map and its
/// programs: the link's release returns once no program runs (RCU), the
/// memory goes later, from a workqueue after an RCU-tasks grace period
/// (seconds under TCG). A bound against leaks, not a speed.
const FREE_GRACE: Duration = Duration::from_secs(60);

fn detach_under_load() {
    // Objects of earlier scenarios may still be on their way out.
    assert!(
        eventually(FREE_GRACE, || loaded_objects() == (0, 0)),
        "objects of earlier scenarios left: {:?}",
        loaded_objects()
    );
    let m = bpf_mount();
    let paths = make_tree(&m.backing(), 4, 50);
    m.settle();
    prefetch(&m.mnt());
    assert_eq!(loaded_objects(), (2, 2));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (stop, done) = (stop.clone(), done.clone());
        let (mnt, back, paths) = (m.mnt(), m.backing(), paths.clone());
        readers.push(std::thread::spawn(move || {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let p = &paths[i % paths.len()];
                let a = stat_key(&mnt.join(p)).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
                assert_eq!(a, stat_key(&back.join(p)).unwrap(), "{}", p.display());
                if back.join(p).is_file() {
                    // Opens answered by BPF, or by the daemon once detached.
                    assert_eq!(
                        py_read(&mnt.join(p)).0,
                        fs::read(back.join(p)).unwrap(),
                        "{}",
                        p.display()
                    );
                }
                if i % 50 == 0 {
                    drop_caches();
                }
                i += 7;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        offload(&m, "kernel");
        assert!(!mount_stats(&m.mnt())["bpf"]["attached"].as_bool().unwrap());
        assert!(
            eventually(FREE_GRACE, || loaded_objects().0 == 0),
            "programs left after detach: {:?}",
            loaded_objects()
        );
        std::thread::sleep(Duration::from_millis(300));
        offload(&m, "bpf");
        prefetch(&m.mnt());
    }
    std::thread::sleep(Duration::from_millis(300));
    offload(&m, "off");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("a reader failed while the tier switched");
    }
    assert!(done.load(Ordering::Relaxed) > 100, "readers made no progress");
    let s = mount_stats(&m.mnt());
    assert_eq!(s["offload"], "off");
    assert!(!s["bpf"]["attached"].as_bool().unwrap());
    assert_eq!(s["excess_forgets"], 0);
    let st = m.unmount();
    assert!(st.success(), "daemon exit {st}");
    assert!(
        eventually(FREE_GRACE, || loaded_objects() == (0, 0)),
        "programs or maps leaked: {:?}",
        loaded_objects()
    );
}

fn two_mounts_are_isolated() {
    let a = bpf_mount();
    let b = bpf_mount();
    let c = TestMount::with_args(&["--offload", "kernel"]);
    for (i, m) in [&a, &b, &c].into_iter().enumerate() {
        for n in 0..20 {
            fs::write(m.b(format!("same{n}")), vec![b'z'; i * 100 + n]).unwrap();
        }
    }
    for m in [&a, &b, &c] {
        m.settle();
    }
    prefetch(&a.mnt());
    prefetch(&b.mnt());
    let hits = |m: &TestMount| bpf(&mount_stats(&m.mnt()), "lookup_hits");
    let (a0, b0) = (hits(&a), hits(&b));
    for n in 0..20 {
        let p = format!("same{n}");
        assert_eq!(stat_key(&a.m(&p)).unwrap(), stat_key(&a.b(&p)).unwrap());
    }
    assert_eq!(hits(&a), a0 + 20, "mount a's programs answered a's lookups");
    assert_eq!(hits(&b), b0, "mount b's programs answered for mount a");
    for n in 0..20 {
        let p = format!("same{n}");
        assert_eq!(stat_key(&b.m(&p)).unwrap(), stat_key(&b.b(&p)).unwrap());
        assert_eq!(stat_key(&c.m(&p)).unwrap(), stat_key(&c.b(&p)).unwrap());
    }
    assert_eq!(hits(&b), b0 + 20);
    assert_eq!(hits(&a), a0 + 20, "mount a's programs answered for b or c");
    assert!(!mount_stats(&c.mnt())["bpf"]["attached"].as_bool().unwrap());
}

fn full_maps_fall_back_to_the_daemon() {
    let m = TestMount::with_config(
        "[bpf]\nentries = 16\nattrs = 16\nlookups = 16\n",
        &["--offload", "bpf"],
    );
    let paths = make_tree(&m.backing(), 2, 30);
    m.settle();
    let n = prefetch(&m.mnt());
    assert_eq!(n, paths.len() as u64, "every entry is offered");
    let s = mount_stats(&m.mnt());
    // The LRU entry map evicted to make room; the mirror notices within
    // an eighth of the capacity.
    assert!(bpf(&s, "entries") <= 18, "{}", s["bpf"]);
    assert!(bpf(&s, "evicted") > 0, "{}", s["bpf"]);
    for _ in 0..2 {
        walk(&m, &paths);
        drop_caches();
    }
    let s = mount_stats(&m.mnt());
    assert!(
        daemon_count(&s, "LOOKUP") > 0,
        "the daemon answered what did not fit"
    );
    assert!(bpf(&s, "lookup_hits") > 0, "what fit was answered by BPF");
    kernel_forgets_all(&m, ASYNC);
    assert_eq!(mount_stats(&m.mnt())["excess_forgets"], 0);
}

fn full_maps_keep_the_recent_names() {
    // A tree ten times the entry map. The walk fills the maps; the kernel
    // evicts the least recently used names, so the most recent ones stay
    // answerable in the kernel (instead of only the first ones ever seen),
    // and every lookup the programs answer is counted.
    // Names enter the maps as the daemon answers them (no directory
    // prefetch: what stays is decided by use alone). EFUSE_VM_FULL_SCALE
    // (passed in by the host) runs the measurement of the scale issue:
    // 200,000 files, maps of 65,536, the 60,000 most recent names.
    let full = std::env::var_os("EFUSE_VM_FULL_SCALE").is_some();
    let (dirs, map, recent_n) = if full {
        (200, 65_536, 60_000)
    } else {
        (10, 1000, 700)
    };
    let m = TestMount::with_config(
        &format!(
            "[bpf]\nentries = {map}\nattrs = {map}\nlookups = {}\nprefetch_max = 0\n",
            dirs * 1000 * 2
        ),
        &["--offload", "bpf"],
    );
    let paths = make_tree(&m.backing(), dirs, 1000);
    m.settle();
    let t = Instant::now();
    walk(&m, &paths);
    let first = t.elapsed();
    // The kernel forgets its dentries; the maps keep their names.
    drop_caches();
    let recent: Vec<PathBuf> = paths[paths.len() - recent_n..].to_vec();
    let before = mount_stats(&m.mnt());
    let t = Instant::now();
    walk(&m, &recent);
    let second = t.elapsed();
    let after = mount_stats(&m.mnt());
    let (upcalled, _) = sent(&before, &after, "LOOKUP");
    let hits = bpf(&after, "lookup_hits") - bpf(&before, "lookup_hits");
    println!(
        "{} files, maps of {map}: the {recent_n} most recent names again after drop_caches: {hits} \
         answered in the kernel, {upcalled} LOOKUPs reached the daemon ({} evicted; walks {first:.1?} \
         and {second:.1?})",
        paths.len(),
        bpf(&after, "evicted")
    );
    assert!(
        hits >= recent_n as u64 * 9 / 10 && upcalled <= recent_n as u64 / 10,
        "of the {recent_n} most recent names, {hits} were answered in the kernel and {upcalled} went \
         to the daemon: {}",
        after["bpf"]
    );
    assert!(bpf(&after, "evicted") > 0, "{}", after["bpf"]);
    // (A bound against a hang only: at the full scale, tens of thousands
    // of FORGETs take a while under TCG.)
    kernel_forgets_all(&m, Duration::from_secs(120));
    assert_eq!(mount_stats(&m.mnt())["excess_forgets"], 0);
}

/// What Python's `open(p, 'rb').read()` does: open, fstat, isatty (TCGETS),
/// read, close. Returns the bytes and the errno of the TCGETS.
fn py_read(p: &Path) -> (Vec<u8>, i32) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let st = f.metadata().unwrap();
    // SAFETY: zeroed plain-data out struct.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, &mut t) };
    assert_eq!(rc, -1, "TCGETS succeeded on {}", p.display());
    let tty_errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut buf = Vec::with_capacity(st.len() as usize + 1);
    f.read_to_end(&mut buf).unwrap();
    (buf, tty_errno)
}

/// lgetxattr(2): Ok(value length) or the errno.
fn lgetxattr(p: &Path, name: &str, size: usize) -> Result<usize, i32> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings and a buffer of `size` bytes.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as usize)
    }
}

type LsLine = (Vec<u8>, StatKey, Result<usize, i32>, Result<usize, i32>);

/// What GNU `ls -l` asks of each entry: lstat, the SELinux label and the
/// access ACL (the VM's busybox ls asks neither, so this does it).
fn ls_l(dir: &Path) -> Vec<LsLine> {
    let mut out: Vec<LsLine> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let p = e.path();
            (
                e.file_name().as_encoded_bytes().to_vec(),
                stat_key(&p).unwrap(),
                lgetxattr(&p, "security.selinux", 255),
                lgetxattr(&p, "system.posix_acl_access", 0),
            )
        })
        .collect();
    out.sort();
    out
}

/// Upcalls (tracepoints) and daemon counts of `op` between two stats.
fn sent(before: &serde_json::Value, after: &serde_json::Value, op: &str) -> (u64, u64) {
    (
        upcalls(after, op) - upcalls(before, op),
        daemon_count(after, op) - daemon_count(before, op),
    )
}

const WARM_OPS: [&str; 6] = ["OPEN", "RELEASE", "FLUSH", "IOCTL", "GETXATTR", "GETATTR"];

fn warm_read_path_wakes_no_daemon() {
    let m = bpf_mount();
    let n = 1000;
    fs::create_dir(m.b("data")).unwrap();
    let files: Vec<PathBuf> = (0..n).map(|i| PathBuf::from(format!("data/f{i:04}"))).collect();
    for (i, p) in files.iter().enumerate() {
        fs::write(m.b(p), format!("file {i}\n").repeat(i % 7 + 1)).unwrap();
    }
    m.settle();
    assert!(prefetch(&m.mnt()) > n as u64);
    let s = mount_stats(&m.mnt());
    let answers = &s["bpf"]["answers"];
    assert!(
        answers["open"].as_bool().unwrap()
            && answers["ioctl"].as_bool().unwrap()
            && answers["getxattr"].as_bool().unwrap(),
        "the kernel's hook lacks ops: {answers}"
    );
    assert_eq!(
        bpf(&s, "opens"),
        n as u64,
        "open map after prefetch: {}",
        s["bpf"]
    );
    // cat(1) of 100 files, twice: every open, read and close stays in the
    // kernel (the read is passthrough), nothing wakes the daemon.
    let before = mount_stats(&m.mnt());
    for _ in 0..2 {
        let out = std::process::Command::new("cat")
            .args(files.iter().take(100).map(|p| m.m(p)))
            .output()
            .expect("run cat");
        assert!(
            out.status.success(),
            "cat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: Vec<u8> = files
            .iter()
            .take(100)
            .flat_map(|p| fs::read(m.b(p)).unwrap())
            .collect();
        assert_eq!(out.stdout, want, "cat through the mount");
    }
    let after = mount_stats(&m.mnt());
    for op in ["OPEN", "RELEASE", "FLUSH", "GETATTR", "IOCTL"] {
        assert_eq!(
            sent(&before, &after, op),
            (0, 0),
            "cat of 100 files twice: {op} reached the daemon (upcalls, daemon count)"
        );
    }
    let before = mount_stats(&m.mnt());
    for p in &files {
        let (data, tty) = py_read(&m.m(p));
        assert_eq!(data, fs::read(m.b(p)).unwrap(), "{}", p.display());
        assert_eq!(tty, libc::ENOTTY, "isatty of {}", p.display());
    }
    let want = ls_l(&m.b("data"));
    for _ in 0..2 {
        let got = ls_l(&m.m("data"));
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            // atime may lag on the mount (SEMANTICS.md); the rest must agree.
            assert_eq!(g, w, "ls -l entry {}", String::from_utf8_lossy(&g.0));
        }
    }
    let after = mount_stats(&m.mnt());
    for op in WARM_OPS {
        assert_eq!(
            sent(&before, &after, op),
            (0, 0),
            "{op} reached the daemon (upcalls, daemon count)"
        );
    }
    assert_eq!(bpf(&after, "open_hits") - bpf(&before, "open_hits"), n as u64);
    assert!(bpf(&after, "ioctl_hits") - bpf(&before, "ioctl_hits") >= n as u64);
    assert!(bpf(&after, "getxattr_hits") - bpf(&before, "getxattr_hits") >= 2 * n as u64);
    // Read again, then a second time with every dentry dropped: the
    // lookups come back from the maps, the opens still from BPF.
    drop_caches();
    let before = mount_stats(&m.mnt());
    for p in files.iter().step_by(10) {
        assert_eq!(py_read(&m.m(p)).0, fs::read(m.b(p)).unwrap());
    }
    let after = mount_stats(&m.mnt());
    for op in ["OPEN", "RELEASE", "FLUSH", "IOCTL"] {
        assert_eq!(sent(&before, &after, op), (0, 0), "{op} after drop_caches");
    }
}

fn kernel_opens_are_never_stale() {
    let m = bpf_mount();
    m.seed_file("k/a", b"version 1");
    m.seed_file("k/b", b"bbbb");
    m.seed_file("k/x", b"x");
    m.settle();
    prefetch(&m.mnt());
    let hits = |m: &TestMount| bpf(&mount_stats(&m.mnt()), "open_hits");
    let h = hits(&m);
    assert_eq!(py_read(&m.m("k/a")).0, b"version 1");
    assert_eq!(hits(&m), h + 1, "not opened by BPF");

    // Through the mount: each change is seen by the next open, BPF or not.
    fs::write(m.m("k/a"), b"version 2, longer").unwrap();
    assert_eq!(py_read(&m.m("k/a")).0, b"version 2, longer");
    assert_eq!(stat_key(&m.m("k/a")).unwrap(), stat_key(&m.b("k/a")).unwrap());
    prefetch(&m.mnt());
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.m("k/a"))
        .unwrap();
    assert_eq!(py_read(&m.m("k/a")).0, b"");
    assert_eq!(fs::metadata(m.m("k/a")).unwrap().len(), 0);
    prefetch(&m.mnt());
    fs::rename(m.m("k/b"), m.m("k/a")).unwrap();
    assert_eq!(py_read(&m.m("k/a")).0, b"bbbb");
    assert_eq!(stat_key(&m.m("k/a")).unwrap(), stat_key(&m.b("k/a")).unwrap());
    prefetch(&m.mnt());
    // xattrs: an inode recorded as having none gets one.
    assert_eq!(lgetxattr(&m.m("k/x"), "user.tag", 64), Err(libc::ENODATA));
    xattr_set(&m.m("k/x"), "user.tag", b"v1");
    assert_eq!(lgetxattr(&m.m("k/x"), "user.tag", 64), Ok(2));
    assert_eq!(lgetxattr(&m.b("k/x"), "user.tag", 64), Ok(2));

    // Behind the mount: seen once the watch fires, never reverted later.
    prefetch(&m.mnt());
    assert_eq!(py_read(&m.m("k/a")).0, b"bbbb");
    fs::write(m.b("k/a"), b"changed behind").unwrap();
    m.settle();
    assert_eq!(py_read(&m.m("k/a")).0, b"changed behind");
    assert_eq!(stat_key(&m.m("k/a")).unwrap(), stat_key(&m.b("k/a")).unwrap());
    m.seed_file("k/y", b"y");
    m.settle();
    prefetch(&m.mnt());
    assert_eq!(lgetxattr(&m.m("k/y"), "user.tag", 64), Err(libc::ENODATA));
    xattr_set(&m.b("k/y"), "user.tag", b"behind");
    m.settle();
    assert_eq!(
        lgetxattr(&m.m("k/y"), "user.tag", 64),
        Ok(6),
        "an xattr set behind the mount was not seen"
    );
    for _ in 0..3 {
        drop_caches();
        assert_eq!(py_read(&m.m("k/a")).0, b"changed behind");
        assert_eq!(lgetxattr(&m.m("k/y"), "user.tag", 64), Ok(6));
    }
}

fn xattr_set(p: &Path, name: &str, v: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and value buffer.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn writers_reach_the_daemon() {
    use std::io::{Read, Seek, Write};
    let m = bpf_mount();
    m.seed_file("w/f", b"0123456789");
    m.seed_file("w/secret", b"s");
    fs::set_permissions(m.b("w/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    m.settle();
    prefetch(&m.mnt());
    // A reader opened by BPF stays open while a writer comes.
    let h = bpf(&mount_stats(&m.mnt()), "open_hits");
    let mut reader = fs::File::open(m.m("w/f")).unwrap();
    assert_eq!(bpf(&mount_stats(&m.mnt()), "open_hits"), h + 1);
    for (what, opts) in [
        ("O_WRONLY", fs::OpenOptions::new().write(true).clone()),
        ("O_RDWR", fs::OpenOptions::new().read(true).write(true).clone()),
    ] {
        let before = mount_stats(&m.mnt());
        let mut w = opts
            .open(m.m("w/f"))
            .unwrap_or_else(|e| panic!("{what} open beside a BPF reader: {e}"));
        w.write_all(b"AB").unwrap();
        drop(w);
        let after = mount_stats(&m.mnt());
        assert_eq!(
            sent(&before, &after, "OPEN").1,
            1,
            "{what} open did not reach the daemon"
        );
    }
    // The reader reads the file itself (passthrough), so it sees the write.
    let mut got = String::new();
    reader.rewind().unwrap();
    reader.read_to_string(&mut got).unwrap();
    assert_eq!(got, "AB23456789");
    drop(reader);
    let before = mount_stats(&m.mnt());
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.m("w/f"))
        .unwrap();
    let after = mount_stats(&m.mnt());
    assert_eq!(
        sent(&before, &after, "OPEN").1,
        1,
        "O_TRUNC open did not reach the daemon"
    );
    assert_eq!(fs::read(m.m("w/f")).unwrap(), b"");
    // Permission: refused for another user exactly as on the plain directory.
    let (mnt_p, back_p) = (m.m("w/secret"), m.b("w/secret"));
    let errs = std::thread::spawn(move || {
        // SAFETY: per-thread fsuid/fsgid change, for this thread only.
        unsafe {
            libc::setfsgid(65534);
            libc::setfsuid(65534);
        }
        let e = |p: &Path| fs::File::open(p).err().and_then(|e| e.raw_os_error());
        (e(&mnt_p), e(&back_p))
    })
    .join()
    .unwrap();
    assert_eq!(errs, (Some(libc::EACCES), Some(libc::EACCES)));
    assert_eq!(fs::read(m.m("w/secret")).unwrap(), b"s");
}

fn backing_ids_are_bounded_and_released() {
    let t = efuse_tests::Tmpfs::new();
    let cfg = t.path().join("small.toml");
    fs::write(&cfg, "[bpf]\nbacking_max = 10\n").unwrap();
    let m = TestMount::with_args_in(t.path(), &["--offload", "bpf", "--config", cfg.to_str().unwrap()]);
    let paths = make_tree(&m.backing(), 1, 50);
    m.settle();
    prefetch(&m.mnt());
    let s = mount_stats(&m.mnt());
    assert_eq!(bpf(&s, "backing_held"), 10, "{}", s["bpf"]);
    assert_eq!(bpf(&s, "opens"), 10);
    assert!(bpf(&s, "backing_full") >= 40);
    // Beyond the bound the daemon answers, and every byte is right.
    let before = mount_stats(&m.mnt());
    for p in paths.iter().filter(|p| m.b(p).is_file()) {
        assert_eq!(py_read(&m.m(p)).0, fs::read(m.b(p)).unwrap(), "{}", p.display());
    }
    let after = mount_stats(&m.mnt());
    assert_eq!(bpf(&after, "open_hits") - bpf(&before, "open_hits"), 10);
    assert_eq!(sent(&before, &after, "OPEN").1, 40);
    // Detached: the held ids go with the inodes the kernel forgets.
    offload(&m, "kernel");
    drop_caches();
    assert!(
        eventually(ASYNC, || {
            drop_caches();
            let s = mount_stats(&m.mnt());
            bpf(&s, "backing_held") == 0 && bpf(&s, "backing_ids") == 0
        }),
        "backing ids left after detach: {}",
        mount_stats(&m.mnt())["bpf"]
    );
    offload(&m, "bpf");
    prefetch(&m.mnt());
    assert_eq!(bpf(&mount_stats(&m.mnt()), "backing_held"), 10);
    // Unmounted: no backing file stays open, so the backing filesystem
    // unmounts without MNT_DETACH.
    assert!(m.unmount().success());
    let c = std::ffi::CString::new(t.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    assert_eq!(
        rc,
        0,
        "backing tmpfs busy after unmount: {}",
        std::io::Error::last_os_error()
    );
}

fn expired_answers_are_renewed() {
    // Plain TTLs everywhere (a watched directory's entries would live an
    // hour), and no prefetch on misses: every answer in the maps was
    // written while a syscall of this test waited for the daemon.
    const TTL: Duration = Duration::from_secs(4);
    let m = TestMount::with_config(
        &format!(
            "[kernel]\nentry_ttl_ms = {ms}\nattr_ttl_ms = {ms}\nwatched_ttl_ms = 0\n\
             [bpf]\nprefetch_max = 0\n",
            ms = TTL.as_millis()
        ),
        &["--offload", "bpf"],
    );
    m.seed_file("r/f", b"renewed");
    m.settle();
    let hits = |m: &TestMount| {
        let s = mount_stats(&m.mnt());
        (bpf(&s, "open_hits"), bpf(&s, "getxattr_hits"))
    };
    let (mut o, mut x) = hits(&m);
    let (mut renewed, mut attempts) = (0, 0);
    while renewed < 3 {
        attempts += 1;
        assert!(
            attempts <= 8,
            "the guest never ran stat, open, read and getxattr within the {TTL:?} TTL"
        );
        // Nothing is cached in the kernel or the maps any more (the last
        // answers were made before the previous sleep, or never): this
        // stat asks the daemon, whose LOOKUP reply makes the open and
        // xattr answers, valid until at least `t0 + TTL`.
        let t0 = Instant::now();
        assert_eq!(stat_key(&m.m("r/f")).unwrap(), stat_key(&m.b("r/f")).unwrap());
        assert_eq!(py_read(&m.m("r/f")).0, b"renewed");
        assert_eq!(
            lgetxattr(&m.m("r/f"), "security.selinux", 255),
            lgetxattr(&m.b("r/f"), "security.selinux", 255)
        );
        let took = t0.elapsed();
        let (o2, x2) = hits(&m);
        if took < TTL {
            assert_eq!(o2, o + 1, "round {renewed}: open not answered by BPF");
            assert!(x2 > x, "round {renewed}: getxattr not answered by BPF");
            renewed += 1;
        } else {
            // The answers may have expired again before they were used:
            // this round says nothing.
            println!("stat to getxattr took {took:?}, not within the {TTL:?} TTL: round not counted");
        }
        (o, x) = (o2, x2);
        // Everything made in this round expires.
        std::thread::sleep(TTL + Duration::from_millis(500));
    }
}

fn allow_root_keeps_the_kernel_tier() {
    // allow_root lets every user through the kernel and leaves refusing
    // them to the daemon, which BPF answers would skip.
    let (_t, src, mnt) = efuse_tests::src_and_mnt();
    fs::write(src.join("f"), b"f").unwrap();
    let _guard = efuse_tests::Daemonized { mnt: mnt.clone() };
    let mount = |tier: &str| {
        efuse(&[
            OsStr::new("mount"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("-o"),
            OsStr::new("allow_root"),
            OsStr::new("--offload"),
            OsStr::new(tier),
        ])
    };
    let (code, _, err) = mount("bpf");
    assert_ne!(code, 0, "allow_root with --offload bpf was mounted");
    assert!(err.contains("allow_root"), "{err}");
    assert!(efuse_tests::mount_connection(&mnt).is_none());
    let (code, _, err) = mount("auto");
    assert_eq!(code, 0, "{err}");
    assert_eq!(mount_stats(&mnt)["offload"], "kernel");
    let (code, _, err) = efuse(&[OsStr::new("offload"), mnt.as_os_str(), OsStr::new("bpf")]);
    assert_ne!(code, 0);
    assert!(err.contains("allow_root"), "{err}");
    assert_eq!(mount_stats(&mnt)["offload"], "kernel");
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"f");
    let (code, _, err) = efuse(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
}

/// The kernel's FUSE of this boot: built in with the hook (a patched
/// kernel), or efuse.ko beside the kernel's own.
fn module_loaded() -> bool {
    Path::new("/sys/module/efuse").exists()
}

fn fstype_of(mnt: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (Path::new(f[4]) == mnt).then(|| f[sep + 1].to_string())
        })
        .next_back()
        .unwrap_or_default()
}

fn module_beside_the_kernels_fuse() {
    if !module_loaded() {
        println!("hook built in: no module to test beside the kernel's FUSE");
        return;
    }
    // A kernel-tier mount goes through the kernel's own FUSE, a bpf-tier
    // mount through efuse.ko; both serve at once.
    let k = TestMount::with_args(&["--offload", "kernel"]);
    let b = bpf_mount();
    assert_eq!(fstype_of(&k.mnt()), "fuse.efuse");
    assert_eq!(fstype_of(&b.mnt()), "efuse");
    for m in [&k, &b] {
        m.seed_file("d/f", b"side by side");
        m.seed_file("d/g", b"g");
    }
    k.settle();
    b.settle();
    prefetch(&b.mnt());
    for m in [&k, &b] {
        let before = mount_stats(&m.mnt());
        for p in ["d", "d/f", "d/g"] {
            assert_eq!(stat_key(&m.m(p)).unwrap(), stat_key(&m.b(p)).unwrap(), "{p}");
        }
        assert_eq!(fs::read(m.m("d/f")).unwrap(), b"side by side");
        fs::write(m.m("d/new"), b"written").unwrap();
        assert_eq!(fs::read(m.b("d/new")).unwrap(), b"written");
        let mut names: Vec<_> = fs::read_dir(m.m("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["f", "g", "new"]);
        let after = mount_stats(&m.mnt());
        // Tracing works on both FUSEs: the create reached the daemon and
        // was seen by the tracepoints of the FUSE the mount goes through.
        assert!(
            upcalls(&after, "CREATE") > upcalls(&before, "CREATE"),
            "no CREATE traced on {}: {}",
            fstype_of(&m.mnt()),
            after["trace"]
        );
    }
    let ks = mount_stats(&k.mnt());
    let bs = mount_stats(&b.mnt());
    assert_eq!(
        (ks["fuse"].as_str(), ks["offload"].as_str()),
        (Some("kernel"), Some("kernel"))
    );
    assert_eq!(
        (bs["fuse"].as_str(), bs["offload"].as_str()),
        (Some("module"), Some("bpf"))
    );
    assert_eq!(bs["hook"]["kind"], "module", "{}", bs["hook"]);
    assert!(bpf(&bs, "lookup_hits") > 0);
    // efuse status names the FUSE of each mount.
    let (code, out, err) = efuse(&[OsStr::new("status")]);
    assert_eq!(code, 0, "{err}");
    for (m, fuse) in [(&k, "kernel"), (&b, "module")] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&*m.mnt().to_string_lossy()))
            .unwrap_or_else(|| panic!("{} not in status:\n{out}", m.mnt().display()));
        assert!(line.split_whitespace().any(|w| w == fuse), "{line}");
    }
    // The kernel's FUSE has no hook: switching that mount to bpf is refused
    // with the way to get it, and changes nothing.
    let (code, _, err) = efuse(&[OsStr::new("offload"), k.mnt().as_os_str(), OsStr::new("bpf")]);
    assert_ne!(code, 0);
    assert!(err.contains("efuse.ko") && err.contains("remount"), "{err}");
    assert_eq!(mount_stats(&k.mnt())["offload"], "kernel");
    // The module mount switches tiers at run time like any other.
    offload(&b, "kernel");
    assert_eq!(fs::read(b.m("d/g")).unwrap(), b"g");
    offload(&b, "bpf");
    prefetch(&b.mnt());
    assert_eq!(fs::read(b.m("d/g")).unwrap(), b"g");
    // Busy: the kernel refuses to unload a module whose filesystem is
    // mounted (or whose struct_ops are attached).
    let st = std::process::Command::new("rmmod").arg("efuse").status().unwrap();
    assert!(!st.success(), "rmmod efuse succeeded with a mount");
    assert!(module_loaded());
    assert_eq!(fs::read(b.m("d/f")).unwrap(), b"side by side");
    assert!(k.unmount().success());
    assert!(b.unmount().success());
}

fn module_unloads_after_unmount() {
    if !module_loaded() {
        println!("hook built in: no module to unload");
        return;
    }
    let m = bpf_mount();
    m.seed_file("x", b"x");
    m.settle();
    prefetch(&m.mnt());
    assert_eq!(fs::read(m.m("x")).unwrap(), b"x");
    assert!(m.unmount().success());
    // The control filesystem holds the module too.
    let st = std::process::Command::new("umount")
        .arg("/sys/fs/efuse/connections")
        .status()
        .unwrap();
    assert!(st.success());
    // A detached struct_ops map keeps its module until the kernel frees it.
    assert!(
        eventually(FREE_GRACE, || std::process::Command::new("rmmod")
            .arg("efuse")
            .status()
            .is_ok_and(|s| s.success())),
        "rmmod efuse kept failing after unmount"
    );
    // Nothing left: device, filesystem types, sysfs, BTF, tracepoints.
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap();
    for gone in [
        "/dev/efuse",
        "/sys/module/efuse",
        "/sys/fs/efuse",
        "/sys/kernel/btf/efuse",
        "/sys/kernel/tracing/events/efuse",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after rmmod");
    }
    assert!(
        !filesystems
            .lines()
            .any(|l| l.ends_with("\tefuse") || l.ends_with("\tefuseblk")),
        "{filesystems}"
    );
    // The kernel's own FUSE is untouched and the bpf tier is refused now.
    assert!(Path::new("/dev/fuse").exists());
    let k = TestMount::with_args(&["--offload", "kernel"]);
    k.seed_file("y", b"y");
    assert_eq!(fs::read(k.m("y")).unwrap(), b"y");
    let (code, _, err) = efuse(&[OsStr::new("offload"), k.mnt().as_os_str(), OsStr::new("bpf")]);
    assert_ne!(code, 0);
    assert!(err.contains("efuse kmod install"), "{err}");
    assert!(k.unmount().success());
    // Load it again: the module comes back whole.
    let st = std::process::Command::new("insmod")
        .arg("/lib/efuse.ko")
        .status()
        .unwrap();
    assert!(st.success(), "insmod efuse.ko again");
    assert!(Path::new("/dev/efuse").exists() && Path::new("/sys/kernel/btf/efuse").exists());
    let m = bpf_mount();
    m.seed_file("z", b"z");
    assert_eq!(fs::read(m.m("z")).unwrap(), b"z");
    assert_eq!(mount_stats(&m.mnt())["fuse"], "module");
    assert!(m.unmount().success());
}

fn times_before_1970_from_the_maps() {
    // The maps carry the same time conversion as the daemon's replies:
    // before 1970 and at the ends of the range, a stat answered in the
    // kernel shows what the backing directory shows.
    let m = bpf_mount();
    let cases = [
        (-1i64, 500_000_000i64),
        (-86_400 * 365 * 30, 1),
        (i64::MIN, 0),
        (i64::MAX, 999_999_999),
    ];
    for (i, (sec, nsec)) in cases.iter().enumerate() {
        let p = m.b(format!("old{i}"));
        fs::write(&p, b"o").unwrap();
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let ts = [libc::timespec {
            tv_sec: *sec,
            tv_nsec: *nsec,
        }; 2];
        // SAFETY: valid C string and two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
        assert_eq!(rc, 0);
    }
    m.settle();
    assert!(prefetch(&m.mnt()) >= cases.len() as u64);
    let before = mount_stats(&m.mnt());
    for i in 0..cases.len() {
        let p = format!("old{i}");
        let (a, b) = (fs::metadata(m.m(&p)).unwrap(), fs::metadata(m.b(&p)).unwrap());
        assert_eq!(
            (a.mtime(), a.mtime_nsec(), a.atime(), a.atime_nsec()),
            (b.mtime(), b.mtime_nsec(), b.atime(), b.atime_nsec()),
            "{p}"
        );
    }
    let after = mount_stats(&m.mnt());
    assert!(
        bpf(&after, "lookup_hits") - bpf(&before, "lookup_hits") >= cases.len() as u64,
        "the stats were not answered from the maps"
    );
}
