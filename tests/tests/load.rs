//! Serving while other work keeps every CPU busy. A file of its own: its
//! busy loops (nice -20, one per CPU) would disturb the timing of other
//! tests running beside it in the same test binary.

use std::fs;
use std::time::{Duration, Instant};

use efuse_tests::TestMount;

fn uring_offered() -> bool {
    fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

/// io_uring where the kernel offers it.
fn best() -> &'static str {
    if uring_offered() { "uring" } else { "classic" }
}

fn possible_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn requests_are_served_while_other_work_keeps_every_cpu_busy() {
    // The io_uring queue threads run SCHED_IDLE for the round trip's sake;
    // other work must not starve them. One busy loop per CPU at the
    // highest ordinary priority (nice -20): a starved queue thread left
    // these requests waiting for minutes.
    let m = TestMount::with_args(&["--offload", "off", "--transport", best()]);
    fs::write(m.b("f"), b"x").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..possible_cpus())
        .map(|cpu| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -20);
                }
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
            })
        })
        .collect();
    let p = m.m("f");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let r: std::io::Result<()> = (|| {
            for i in 0..300u32 {
                fs::metadata(&p)?;
                fs::write(&p, i.to_ne_bytes())?;
                fs::read(&p)?;
            }
            Ok(())
        })();
        let _ = tx.send((r.map_err(|e| e.to_string()), t.elapsed()));
    });
    let got = rx.recv_timeout(Duration::from_secs(120));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    let (r, took) = got.expect("900 requests were not served within 120 s while the CPUs were busy");
    assert_eq!(r, Ok(()));
    eprintln!("900 requests with every CPU busy took {took:.1?}");
    assert_eq!(fs::read(m.m("f")).unwrap(), 299u32.to_ne_bytes());
}
