//! The tools people use, run whole on efuse and on a plain directory:
//! tar, cp -a, rsync, mv across filesystems, git and SQLite. Each scenario
//! is one shell script run twice, with `$R` the efuse mount and then a
//! plain directory (the twin beside the backing directory); the exit code
//! of every step, what the script prints (listings with modes, sizes, link
//! counts, mtimes, symlink targets and the sha256 of every file) and the
//! resulting trees must be the same. `$OUT` is a fresh directory on a
//! tmpfs, so moves and copies out of either root cross filesystems.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use efuse_tests::{TestMount, Tmpfs, snapshot};

/// Tiers on the dir backend, and the in-memory backend.
const SETUPS: &[&[&str]] = &[
    &["--offload", "off"],
    &["--offload", "kernel"],
    &["--offload", "off", "--backend", "mem"],
    &["--offload", "kernel", "--backend", "mem"],
];

/// Shell functions every script may use: `s LABEL CMD...` runs a step and
/// prints its exit code; `L DIR` lists a tree the way the comparison needs.
const PRELUDE: &str = r#"
set -u
export LC_ALL=C TZ=UTC GIT_AUTHOR_DATE='2026-01-01T00:00:00Z' GIT_COMMITTER_DATE='2026-01-01T00:00:00Z'
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@example.com
export GIT_CONFIG_NOSYSTEM=1 HOME="$OUT/home"
mkdir -p "$HOME"
git config --global init.defaultBranch main
git config --global safe.directory '*'
git config --global pack.threads 1
s() { label=$1; shift; "$@" >"$OUT/log.$label" 2>&1; echo "$label exit $?"; }
L() {
    echo "== listing"
    # mtimes a tool preserved (the source's are from 2020/2021) are shown;
    # those of files made now read "now".
    (cd "$1" && find . -mindepth 1 ! -type d -printf '%T@ %M %s %n %P -> %l\n' \
        | awk '{ if ($1 + 0 > 1700000000) $1 = "now"; print }' | sort -k5
     find . -mindepth 1 -type d -printf '%T@ %M %P\n' | awk '{ if ($1 + 0 > 1700000000) $1 = "now"; print }' | sort -k3
     find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
}
"#;

/// A source tree with what tools trip over: nested directories, an empty
/// one, sizes from 0 to 1 MiB, an executable, symlinks (relative, absolute,
/// dangling, to a directory), hard links, a name with spaces and one that
/// is not UTF-8, a file of 255 bytes' name, odd modes, old mtimes.
fn make_source(root: &Path) {
    use std::os::unix::fs::{PermissionsExt, symlink};
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("with space/inner")).unwrap();
    let mut seed = 12345u64;
    for i in 0..40u64 {
        let size = match i % 8 {
            0 => 0,
            1 => 1,
            2 => 4095,
            3 => 4096,
            4 => 4097,
            5 => 65536 + i as usize * 37,
            6 => 200_000,
            _ => 1 + (i as usize * 7919) % 30_000,
        };
        let data: Vec<u8> = (0..size)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect();
        let dir = ["", "a", "a/b", "a/b/c", "with space"][(i % 5) as usize];
        fs::write(root.join(dir).join(format!("f{i}.dat")), data).unwrap();
    }
    fs::write(root.join("big"), vec![0xabu8; 1 << 20]).unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("private"), b"secret").unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(root.join("with space/inner/file name.txt"), b"spaces").unwrap();
    let bad = std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe");
    fs::write(root.join(bad), b"bytes").unwrap();
    fs::write(root.join("n".repeat(255)), b"long name").unwrap();
    symlink("f1.dat", root.join("rel-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("a/b", root.join("dir-link")).unwrap();
    fs::hard_link(root.join("f0.dat"), root.join("a/hard-of-f0")).unwrap();
    fs::hard_link(root.join("big"), root.join("with space/hard big")).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    // Old, distinct mtimes, so preserving them is visible.
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 ! -type l -exec touch -d '2020-05-05 05:05:05.123456789' {} + && touch -h -d '2021-01-01' rel-link")
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Run `script` on the mount and on the plain twin and compare everything.
fn compare(setup: &[&str], name: &str, script: &str) {
    let scratch = Tmpfs::new();
    let src = scratch.path().join("src");
    make_source(&src);
    let m = TestMount::with_args(setup);
    let mut outputs = Vec::new();
    let mut outs: Vec<PathBuf> = Vec::new();
    for (side, root) in [("mount", m.mnt()), ("plain", m.twin())] {
        let out = scratch.path().join(format!("out-{side}"));
        fs::create_dir(&out).unwrap();
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("{PRELUDE}\n{script}"))
            .env("R", &root)
            .env("SRC", &src)
            .env("OUT", &out)
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout)
            .replace(root.to_str().unwrap(), "$R")
            .replace(out.to_str().unwrap(), "$OUT");
        outputs.push((
            o.status.code(),
            text,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ));
        outs.push(out);
    }
    let logs = |out: &Path| {
        let mut s = String::new();
        for e in fs::read_dir(out).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("log.") {
                s += &format!(
                    "--- {}\n{}\n",
                    e.file_name().to_string_lossy(),
                    fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        s
    };
    let (mount, plain) = (&outputs[0], &outputs[1]);
    assert!(
        mount.1 == plain.1,
        "{setup:?} {name}: results differ\n{}\nefuse logs:\n{}\nstderr: {}",
        diff(&mount.1, &plain.1),
        logs(&outs[0]),
        mount.2
    );
    assert_eq!(mount.0, plain.0, "{setup:?} {name}: script exit differs");
    // The scripts only run steps that succeed on a plain directory, so a
    // failing step there is a mistake in the script, not a finding.
    let failed: Vec<&str> = plain
        .1
        .lines()
        .filter(|l| l.rsplit_once(" exit ").is_some_and(|(_, code)| code != "0"))
        .collect();
    assert!(
        failed.is_empty(),
        "{name}: steps fail on the plain directory: {failed:?}"
    );
    same_tree(&m.mnt(), &m.twin(), name);
    same_tree(&outs[0], &outs[1], name);
    if !setup.contains(&"mem") {
        same_tree(&m.backing(), &m.twin(), name);
    }
}

/// The two trees hold the same names, types, modes, sizes, link counts and
/// bytes, leaving out what records where it was made rather than what it
/// holds: git's own directories (the index caches inode numbers, configs
/// and worktree links name absolute paths; the scripts compare their
/// objects by hash instead) and the scripts' step logs.
fn same_tree(a: &Path, b: &Path, name: &str) {
    let keep = |k: &Vec<u8>| {
        let p = String::from_utf8_lossy(k);
        !p.split('/').any(|c| c == ".git") && !p.starts_with("log.")
    };
    let (sa, sb) = (snapshot(a), snapshot(b));
    let ka: Vec<String> = sa
        .keys()
        .filter(|k| keep(k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let kb: Vec<String> = sb
        .keys()
        .filter(|k| keep(k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        ka,
        kb,
        "{name}: {} and {} hold different names",
        a.display(),
        b.display()
    );
    for (k, va) in sa.iter().filter(|(k, _)| keep(k)) {
        let vb = &sb[k];
        assert!(
            va == vb,
            "{name}: {:?} differs between {} and {}: mode {:o}/{:o}, size {}/{}, links {}/{}, same bytes: {}",
            String::from_utf8_lossy(k),
            a.display(),
            b.display(),
            va.mode,
            vb.mode,
            va.size,
            vb.size,
            va.nlink,
            vb.nlink,
            va.data == vb.data
        );
    }
}

/// The lines of `a` (efuse) and `b` (plain) that differ, at most 30.
fn diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    let mut shown = 0;
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (
            la.get(i).copied().unwrap_or("<none>"),
            lb.get(i).copied().unwrap_or("<none>"),
        );
        if x != y && shown < 30 {
            out += &format!("line {i}:\n  efuse: {x}\n  plain: {y}\n");
            shown += 1;
        }
    }
    out
}

fn every_setup(name: &str, script: &str) {
    for setup in SETUPS {
        compare(setup, name, script);
    }
}

#[test]
fn tar_into_and_out_of_the_mount() {
    every_setup(
        "tar",
        r#"
s tar_c_src tar cf "$OUT/src.tar" -C "$SRC" .
mkdir "$R/x"
s tar_x_in tar xpf "$OUT/src.tar" -C "$R/x"
L "$R/x"
s tar_c_mount tar --sort=name -cf "$OUT/back.tar" -C "$R/x" .
mkdir "$OUT/y"
s tar_x_out tar xpf "$OUT/back.tar" -C "$OUT/y"
L "$OUT/y"
s tar_diff tar df "$OUT/src.tar" -C "$R/x"
s tar_list sh -c "tar tvf '$OUT/back.tar' --full-time | grep -v ' \./$' | sort -k6 > '$OUT/list'"
cat "$OUT/list"
s gzip_pipe sh -c "tar czf - -C '$R/x' a | tar xzf - -C '$OUT'"
L "$OUT/a"
# The archives hold the mtime of the directory each run made for them.
rm "$OUT/src.tar" "$OUT/back.tar"
"#,
    );
}

#[test]
fn cp_a_into_and_out_of_the_mount() {
    every_setup(
        "cp",
        r#"
s cp_in cp -a "$SRC" "$R/c"
L "$R/c"
s cp_out cp -a "$R/c" "$OUT/c"
L "$OUT/c"
s cp_P cp -P "$R/c/rel-link" "$R/c/dangling" "$OUT/"
s cp_r cp -r "$R/c/a" "$R/a-copy"
s cp_update cp -au "$SRC/." "$R/c/"
s cp_reflink cp --reflink=auto --sparse=always "$R/c/big" "$R/big2"
s cmp cmp "$R/c/big" "$R/big2"
L "$R"
"#,
    );
}

#[test]
fn rsync_both_ways_with_and_without_delete() {
    every_setup(
        "rsync",
        r#"
s rs_in rsync -aH "$SRC/" "$R/r/"
L "$R/r"
echo "second pass transfers:"; rsync -aHi "$SRC/" "$R/r/" | wc -l
cp -a "$SRC" "$OUT/s2"
rm -r "$OUT/s2/a/b/c" "$OUT/s2/f3.dat"; echo new > "$OUT/s2/added"; echo changed > "$OUT/s2/f5.dat"
s rs_delete_in rsync -aH --delete "$OUT/s2/" "$R/r/"
L "$R/r"
s rs_out rsync -aH "$R/r/" "$OUT/back/"
cp -a "$SRC" "$OUT/back2"
s rs_delete_out rsync -aH --delete "$R/r/" "$OUT/back2/"
L "$OUT/back2"
L "$OUT/back"
echo "out second pass transfers:"; rsync -aHi "$R/r/" "$OUT/back/" | wc -l
s rs_checksum rsync -aHc --delete "$OUT/back/" "$R/r2/"
L "$R/r2"
"#,
    );
}

#[test]
fn mv_to_and_from_another_filesystem() {
    every_setup(
        "mv",
        r#"
cp -a "$SRC" "$OUT/m1"
s mv_in mv "$OUT/m1" "$R/m1"
L "$R/m1"
s mv_out mv "$R/m1" "$OUT/m2"
L "$OUT/m2"
s gone test ! -e "$R/m1"
cp -a "$SRC/big" "$OUT/one"
s mv_file_in mv "$OUT/one" "$R/one"
s mv_file_out mv "$R/one" "$OUT/two"
mkdir "$R/d"; cp -a "$SRC/a" "$R/d/"
s mv_rename mv "$R/d/a" "$R/d/renamed"
L "$R"
"#,
    );
}

#[test]
fn git_init_add_commit_status_fsck_gc_clone() {
    every_setup(
        "git",
        r#"
s init git init -q "$R/g"
cd "$R/g"
cp -a "$SRC/." .
printf '*.log\nbuild/\n!keep.log\n' > .gitignore
echo ignored > a.log; echo kept > keep.log; mkdir build; echo obj > build/o
s add git add -A
echo "staged:"; git ls-files | sort
s commit git commit -qm initial
echo "status:"; git status --porcelain --ignored
s fsck git fsck --full --strict
echo "tree: $(git rev-parse HEAD^{tree}) commit: $(git rev-parse HEAD)"
echo more >> f5.dat; s mv git mv f10.dat moved.dat; s rm git rm -q f15.dat
s commit2 git commit -qam second
s gc git gc -q --aggressive
s fsck2 git fsck --full --strict
echo "ignored: $(git check-ignore a.log build/o keep.log f5.dat)"
echo "count: $(git count-objects -v | grep -E '^(count|in-pack|packs)')"
cd "$OUT"
s clone_out git clone -q "$R/g" "$OUT/clone"
(cd "$OUT/clone" && git log --format='%H %T %s' && git ls-files | sort | sha256sum)
s clone_in git clone -q "$OUT/clone" "$R/g2"
cd "$R/g2"
s fsck3 git fsck --full --strict
echo "g2 status:"; git status --porcelain
git log --format='%H %T %s'
s worktree git worktree add -q "$R/wt" HEAD~1
s stash sh -c 'echo wip >> "$R/g2/f5.dat" && git -C "$R/g2" stash -q && git -C "$R/g2" stash pop -q'
cd "$R"
rm -rf "$R/g/.git/index"; s reset git -C "$R/g" reset -q
echo "g status after index rebuild:"; git -C "$R/g" status --porcelain
"#,
    );
}

#[test]
fn sqlite_transactions_and_integrity() {
    every_setup(
        "sqlite",
        r#"
for mode in delete truncate wal; do
s create_$mode sqlite3 "$R/db-$mode" "pragma journal_mode=$mode; create table t(a integer primary key, b text, c blob);"
s insert_$mode sqlite3 "$R/db-$mode" "begin; with recursive n(i) as (select 1 union all select i+1 from n where i < 5000) insert into t(b, c) select 'row ' || i, printf('%0*d', 64 + i % 500, i) from n; commit;"
s rollback_$mode sqlite3 "$R/db-$mode" "begin; delete from t; rollback;"
s update_$mode sqlite3 "$R/db-$mode" "begin; update t set b = upper(b) where a % 3 = 0; delete from t where a % 7 = 0; commit; create index ib on t(b); vacuum;"
echo "$mode: $(sqlite3 "$R/db-$mode" "pragma integrity_check; select count(*), sum(a), sum(length(c)) > 0, count(distinct b) from t;")"
echo "$mode quick: $(sqlite3 "$R/db-$mode" "pragma quick_check;")"
s dump_$mode sh -c "sqlite3 '$R/db-$mode' '.dump t' | grep -c INSERT"
done
"#,
    );
}

#[test]
fn acls_survive_setfacl_cp_tar_and_rsync() {
    // The dir backend passes ACLs to the backing file; `mem` keeps none.
    for setup in &SETUPS[..2] {
        compare(
            setup,
            "acl",
            r#"
# getfacl of every entry of a tree, in name order (readdir order is the
# filesystem's own).
A() { (cd "$1" && find . | sort | while read -r p; do getfacl -p "$p"; done); }
mkdir "$R/acl"; echo x > "$R/acl/f"; mkdir "$R/acl/d"; echo y > "$R/acl/d/g"
s setfacl setfacl -m u:nobody:rw,g:daemon:r,m::rw "$R/acl/f"
s setfacl_default setfacl -d -m u:nobody:rwx "$R/acl/d"
s inherit sh -c "echo z > '$R/acl/d/new' && mkdir '$R/acl/d/sub'"
A "$R/acl"
ls -l "$R/acl/f" | cut -c1-11
s cp_acl cp -a "$R/acl" "$OUT/acl-cp"
A "$OUT/acl-cp"
s tar_acl tar --acls -cf "$OUT/acl.tar" -C "$R" acl
mkdir "$OUT/acl-tar"
s untar_acl tar --acls -xf "$OUT/acl.tar" -C "$OUT/acl-tar"
A "$OUT/acl-tar/acl"
s rsync_out rsync -aA "$R/acl/" "$OUT/acl-rs/"
s rsync_in rsync -aA "$OUT/acl-rs/" "$R/acl-back/"
A "$R/acl-back"
s setfacl_remove setfacl -b "$R/acl/f"
(cd "$R" && getfacl -p acl/f)
rm "$OUT/acl.tar"
"#,
        );
    }
}
