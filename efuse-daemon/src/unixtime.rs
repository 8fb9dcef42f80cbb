//! The one conversion between `SystemTime` and Unix time (seconds, which
//! may be negative, and nanoseconds in `0..1e9`), used by the wire codec,
//! the backends and the bpf tier's maps alike.
//!
//! Both directions are total: a time the other side cannot represent
//! saturates at that side's bound instead of panicking (a SETATTR may carry
//! `tv_sec = i64::MIN`; SystemTime on Linux spans the i64 seconds range).
//! Times before 1970 keep their value: seconds are floored, nanoseconds
//! count up from there (-0.5 s is (-1, 500_000_000)), as in `struct
//! timespec` and FUSE's two's-complement `fuse_attr` times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const NS: i128 = 1_000_000_000;

/// The earliest and latest times `SystemTime` holds here.
fn bound(late: bool) -> SystemTime {
    let secs = i64::MAX as u64;
    if late {
        UNIX_EPOCH
            .checked_add(Duration::new(secs, 999_999_999))
            .or_else(|| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs + 1))
            .or_else(|| UNIX_EPOCH.checked_sub(Duration::from_secs(secs)))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// `sec` seconds and `nsec` nanoseconds after the epoch (either may be
/// negative or `nsec` out of range: it is normalised).
pub fn from_unix(sec: i64, nsec: i64) -> SystemTime {
    let total = sec as i128 * NS + nsec as i128;
    let (s, ns) = (total.div_euclid(NS), total.rem_euclid(NS) as u32);
    let t = if s >= 0 {
        u64::try_from(s)
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::new(s, ns)))
    } else {
        u64::try_from(-s)
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_sub(Duration::from_secs(s)))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(ns))))
    };
    t.unwrap_or_else(|| bound(s >= 0))
}

/// `t` as (seconds, nanoseconds) since the epoch, seconds floored and
/// saturated to the i64 range.
pub fn to_unix(t: SystemTime) -> (i64, u32) {
    let total: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    let s = total.div_euclid(NS);
    let ns = total.rem_euclid(NS) as u32;
    match i64::try_from(s) {
        Ok(s) => (s, ns),
        Err(_) if s < 0 => (i64::MIN, 0),
        Err(_) => (i64::MAX, 999_999_999),
    }
}

/// `t` as FUSE carries it: seconds in two's complement, nanoseconds.
pub fn to_fuse(t: SystemTime) -> (u64, u32) {
    let (s, ns) = to_unix(t);
    (s as u64, ns)
}

/// A FUSE time (seconds in two's complement, nanoseconds, clamped to the
/// valid range).
pub fn from_fuse(sec: u64, nsec: u32) -> SystemTime {
    from_unix(sec as i64, i64::from(nsec.min(999_999_999)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_around_the_epoch() {
        for (s, ns) in [
            (0, 0),
            (1, 5),
            (-1, 500_000_000),
            (-2, 0),
            (1_700_000_000, 999_999_999),
            (-1_700_000_000, 1),
        ] {
            assert_eq!(to_unix(from_unix(s, ns as i64)), (s, ns), "{s}.{ns}");
            assert_eq!(
                from_fuse(to_fuse(from_unix(s, ns as i64)).0, ns),
                from_unix(s, ns as i64)
            );
        }
        // Half a second before the epoch.
        let t = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(to_unix(t), (-1, 500_000_000));
        assert_eq!(to_fuse(t), ((-1i64) as u64, 500_000_000));
    }

    #[test]
    fn extremes_saturate_instead_of_panicking() {
        assert_eq!(to_unix(from_unix(i64::MIN, 0)).0, i64::MIN);
        assert_eq!(to_unix(from_unix(i64::MAX, 999_999_999)), (i64::MAX, 999_999_999));
        // Nanoseconds that push past the end saturate too.
        assert_eq!(to_unix(from_unix(i64::MAX, i64::MAX)).0, i64::MAX);
        assert_eq!(to_unix(from_unix(i64::MIN, i64::MIN)).0, i64::MIN);
        assert_eq!(from_fuse(i64::MIN as u64, 0), from_unix(i64::MIN, 0));
        assert_eq!(to_fuse(from_fuse(i64::MIN as u64, 0)), (i64::MIN as u64, 0));
        assert_eq!(from_fuse(0, u32::MAX), from_unix(0, 999_999_999));
        // Normalisation of out-of-range nanoseconds.
        assert_eq!(to_unix(from_unix(0, -1)), (-1, 999_999_999));
        assert_eq!(to_unix(from_unix(0, 1_500_000_000)), (1, 500_000_000));
    }
}
