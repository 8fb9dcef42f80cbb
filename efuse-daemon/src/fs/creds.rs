//! What a FUSE request does not carry about its caller: supplementary
//! groups and capabilities, read from `/proc/<pid>/status` for the few
//! rules the server must apply itself (set-group-ID clearing).
//!
//! A caller whose status cannot be read (it exited, or the pid is 0 for a
//! request the kernel sends on its own) counts as neither in the group nor
//! capable: the safe side of a permission rule.

use crate::backend::Caller;

/// `CAP_FSETID` (include/uapi/linux/capability.h).
pub const CAP_FSETID: u32 = 4;

/// True if `who` is in group `gid` (primary or supplementary) or holds
/// capability `cap` in its effective set, as the kernel's
/// in_group_or_capable() decides.
pub fn in_group_or_capable(who: Caller, gid: u32, cap: u32) -> bool {
    if who.gid == gid {
        return true;
    }
    if who.pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", who.pid)) else {
        return false;
    };
    parse_status(&status, gid, cap)
}

fn parse_status(status: &str, gid: u32, cap: u32) -> bool {
    for line in status.lines() {
        if let Some(groups) = line.strip_prefix("Groups:")
            && groups.split_whitespace().any(|g| g.parse::<u32>() == Ok(gid))
        {
            return true;
        }
        if let Some(eff) = line.strip_prefix("CapEff:")
            && u64::from_str_radix(eff.trim(), 16).is_ok_and(|bits| bits & (1 << cap) != 0)
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_capabilities_are_read_from_status() {
        let s = "Name:\tsh\nGroups:\t4 24 100 \nCapEff:\t0000000000000000\n";
        assert!(parse_status(s, 24, CAP_FSETID));
        assert!(!parse_status(s, 25, CAP_FSETID));
        let root = "Groups:\t\nCapEff:\t000001ffffffffff\n";
        assert!(parse_status(root, 25, CAP_FSETID));
        let fsetid_only = "Groups:\nCapEff:\t0000000000000010\n";
        assert!(parse_status(fsetid_only, 7, CAP_FSETID));
    }

    #[test]
    fn primary_group_and_missing_process() {
        let who = Caller {
            uid: 1000,
            gid: 7,
            pid: 0,
            umask: 0,
        };
        assert!(in_group_or_capable(who, 7, CAP_FSETID));
        assert!(!in_group_or_capable(who, 8, CAP_FSETID));
    }
}
