//! The POSIX rules a FUSE server applies itself, checked as root and as an
//! unprivileged user against the same steps on a plain directory:
//! clearing set-user-ID/set-group-ID on write, truncate and fallocate,
//! group and set-group-ID inheritance in set-group-ID directories, and
//! the modes a create keeps.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use efuse_tests::TestMount;

const SETUPS: &[&[&str]] = &[
    &["--offload", "off", "-o", "allow_other"],
    &["--offload", "kernel", "-o", "allow_other"],
    &["--offload", "kernel", "-o", "allow_other", "--backend", "mem"],
];

/// `U cmd...` runs a command as nobody:nogroup with no other groups and
/// umask 0; `S path...` prints mode, owner and group.
const PRELUDE: &str = r#"
set -u
U() { setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "umask 0; $*"; echo "U[$*] exit $?"; }
S() { for p in "$@"; do stat -c '%n %A %u %g' "$p" | sed "s|^$R/||"; [ -f "$p" ] && stat -c 'size %s' "$p"; done; }
"#;

/// `all_ok`: every `U` step succeeds on the plain directory (a check of
/// the script itself); scripts that test refusals pass false.
fn compare(setup: &[&str], script: &str, all_ok: bool) {
    let m = TestMount::with_args(setup);
    for p in [m.scratch(), &m.scratch().join("mounts"), &m.twin(), &m.mnt()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let run = |root: &Path| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("{PRELUDE}\ncd \"$R\"\n{script}"))
            .env("R", root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&o.stdout).replace(root.to_str().unwrap(), "$R"),
            String::from_utf8_lossy(&o.stderr).replace(root.to_str().unwrap(), "$R"),
        )
    };
    let (plain, plain_err) = run(&m.twin());
    let (mount, mount_err) = run(&m.mnt());
    assert!(
        !all_ok
            || !plain
                .lines()
                .any(|l| l.starts_with("U[") && !l.ends_with("exit 0")),
        "the script fails on the plain directory:\n{plain}{plain_err}"
    );
    assert_eq!(
        mount, plain,
        "{setup:?}: efuse (left) and the plain directory (right) differ\n{mount_err}"
    );
}

#[test]
fn write_truncate_and_fallocate_clear_setid_bits_as_on_a_local_filesystem() {
    let script = r#"
for f in sgid sgid_x suid both own; do echo data > $f; done
chmod 2666 sgid; chmod 2676 sgid_x; chmod 4666 suid; chmod 6676 both
U "echo more >> $R/sgid"; U "echo more >> $R/sgid_x"; U "echo more >> $R/suid"; U "echo more >> $R/both"
S sgid sgid_x suid both
for f in t_sgid t_suid f_sgid f_suid; do echo data > $f; done
chmod 2666 t_sgid f_sgid; chmod 4666 t_suid f_suid
U "truncate -s 1 $R/t_sgid"; U "truncate -s 2 $R/t_suid"
U "fallocate -l 65536 $R/f_sgid"; U "fallocate -l 65536 $R/f_suid"
S t_sgid t_suid f_sgid f_suid
# Root writes (CAP_FSETID): nothing is cleared.
echo x > r; chmod 6666 r; echo more >> r; truncate -s 1 r; S r
# The owner's own group: a member keeps S_ISGID on write.
mkdir ud; chmod 0777 ud
U "echo mine > $R/ud/own2 && chmod 2666 $R/ud/own2 && echo more >> $R/ud/own2"; S ud/own2
"#;
    for setup in SETUPS {
        compare(setup, script, true);
    }
}

#[test]
fn creates_in_a_setgid_directory_take_its_group_and_bit() {
    let script = r#"
mkdir sg; chmod 2777 sg; chgrp 4 sg
U "touch $R/sg/f"; U "mkdir $R/sg/sub"; U "mkdir -m 0700 $R/sg/private"
U "python3 -c 'import os; os.close(os.open(\"$R/sg/g\", os.O_CREAT | os.O_WRONLY, 0o2775))'"
U "python3 -c 'import os; os.close(os.open(\"$R/sg/h\", os.O_CREAT | os.O_WRONLY, 0o2755))'"
U "mknod $R/sg/fifo p"; U "ln -s f $R/sg/link"
U "touch $R/sg/sub/deeper"; U "mkdir $R/sg/sub/deeper-dir"
S sg sg/f sg/sub sg/private sg/g sg/h sg/fifo sg/sub/deeper sg/sub/deeper-dir
stat -c '%n %u %g' sg/link | sed "s|^$R/||"
# Root creating there: same inheritance.
touch sg/rootfile; mkdir sg/rootdir; S sg/rootfile sg/rootdir
# Without the bit: the creator's group.
mkdir plain; chmod 0777 plain; U "touch $R/plain/f"; U "mkdir $R/plain/d"; S plain/f plain/d
# A create keeps the set-ID bits its mode asks for.
mkdir own; chmod 0777 own
U "python3 -c 'import os; os.close(os.open(\"$R/own/s\", os.O_CREAT | os.O_WRONLY, 0o6755))'"
python3 -c "import os; os.close(os.open('own/r', os.O_CREAT | os.O_WRONLY, 0o6755))"
U "mkdir -m 2755 $R/own/d"
S own/s own/r own/d
"#;
    for setup in SETUPS {
        compare(setup, script, true);
    }
}

#[test]
fn posix_acls_are_enforced_inherited_and_follow_chmod() {
    let script = r#"
echo secret > f; chmod 600 f
U "cat $R/f"
s() { setfacl "$@"; echo "setfacl $* exit $?"; }
s -m u:nobody:r f
U "cat $R/f"; U "echo no >> $R/f"
getfacl -cp f; ls -l f | cut -c1-11
chmod 640 f; getfacl -cp f
s -m m::- f; U "cat $R/f"; getfacl -cp f
s -b f; getfacl -cp f; ls -l f | cut -c1-11
# Default ACLs: inherited by new files and directories, in place of the umask.
mkdir dd; s -m u:nobody:rwx dd; s -d -m u:nobody:rwx,g::r-x,o::- dd
U "umask 077; touch $R/dd/new; mkdir $R/dd/sub; mkdir -m 0700 $R/dd/tight"
S dd/new dd/sub dd/tight
getfacl -cp dd/new dd/sub dd/tight
# A directory's ACL grants traversal.
mkdir -m 700 locked; echo in > locked/x; U "cat $R/locked/x"
s -m u:nobody:x locked; U "cat $R/locked/x"
# Without a default ACL, the umask applies.
mkdir -m 777 open; U "umask 027; touch $R/open/u; mkdir $R/open/ud"; S open/u open/ud
"#;
    for setup in &SETUPS[..2] {
        compare(setup, script, false);
    }
}

#[test]
fn an_access_acl_set_by_a_user_outside_the_group_clears_set_group_id() {
    // posix_acl_update_mode(): setting an access ACL clears S_ISGID unless
    // the caller is in the file's group or has CAP_FSETID.
    let script = r#"
mkdir d; chmod 0777 d
for f in other member byroot dir; do echo x > d/$f; done
rm d/dir; mkdir d/dir
chown 65534:0 d/other d/dir; chown 65534:65534 d/member; chown 65534:0 d/byroot
chmod 2755 d/other d/member d/byroot d/dir
U "setfacl -m u::rwx,g::rwx,o::rwx $R/d/other"
U "setfacl -m u::rwx,g::rwx,o::rwx $R/d/member"
U "setfacl -m u::rwx,g::rwx,o::rwx $R/d/dir"
setfacl -m u::rwx,g::rwx,o::rwx d/byroot
S d/other d/member d/byroot d/dir
# A default ACL is not an access ACL: the bit stays.
mkdir d/dd; chown 65534:0 d/dd; chmod 2755 d/dd
U "setfacl -d -m u::rwx $R/d/dd"; S d/dd
"#;
    for setup in &SETUPS[..2] {
        compare(setup, script, true);
    }
}

#[test]
fn file_flags_are_kept_and_enforced_as_on_the_backing_filesystem() {
    // chattr/lsattr through the mount reach the backing file (ext4 here,
    // like the plain directory), and append-only and immutable are
    // enforced as there: for root and for a user, with the kernel's rule
    // that only CAP_LINUX_IMMUTABLE sets them.
    let script = r#"
l() { lsattr -d "$@" 2>&1 | sed "s|$R/||"; }
mkdir d; chmod 0777 d
echo x > d/a; echo x > d/i; echo x > d/u; chown 65534 d/u; chmod 666 d/a d/i
chattr +a d/a; echo "chattr +a exit $?"; chattr +i d/i; echo "chattr +i exit $?"
l d/a d/i d/u
echo more >> d/a; echo "append exit $?"
echo over > d/a; echo "overwrite exit $?"
rm -f d/a; echo "rm append-only exit $?"
echo over > d/i; echo "write immutable exit $?"
mv d/i d/j; echo "rename immutable exit $?"
ln d/i d/link; echo "link immutable exit $?"
chmod 600 d/i; echo "chmod immutable exit $?"
U "echo more >> $R/d/a"; U "echo over > $R/d/i"
# A user may not set them, not even on a file of their own; the owner
# may set an ordinary flag.
U "chattr +a $R/d/u"; U "chattr +i $R/d/u"; U "chattr +d $R/d/u"; l d/u
U "chattr -a $R/d/a"
chattr -a d/a; chattr -i d/i; l d/a d/i
echo over > d/i; echo "write after -i exit $?"; cat d/a d/i
# Directories: an immutable directory takes no new names.
mkdir d/sealed; chattr +i d/sealed; touch d/sealed/x; echo "create in immutable dir exit $?"
chattr -i d/sealed; l d/sealed
"#;
    for setup in &SETUPS[..2] {
        compare(setup, script, false);
    }
}
