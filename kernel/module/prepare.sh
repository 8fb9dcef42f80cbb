#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Prepare the source of efuse.ko from a kernel's own fs/fuse:
#
#   prepare.sh FUSE_SRC OUT [KERNEL_BUILD_DIR]
#
# FUSE_SRC is the fs/fuse directory of the target kernel's sources (the
# distribution's kernel source package of the same version); OUT receives
# a directory that `make -C KERNEL_BUILD_DIR M=OUT modules` builds. The
# steps:
#   1. copy the FUSE core (no CUSE, virtiofs or DAX);
#   2. apply kernel/patches/*.patch, the same series an in-tree build uses;
#   3. apply the rename layer below, so that the module coexists with the
#      kernel's FUSE (built in or modular): filesystem types efuse and
#      efuseblk, the misc device /dev/efuse (dynamic minor), the control
#      filesystem efusectl under /sys/fs/efuse/connections, the tracepoint
#      system efuse, no exported symbols and no module aliases that would
#      make the kernel load efuse.ko for "fuse";
#   4. add the module's build files (Kbuild, efuse_config.h, version).
# Module parameters live under /sys/module/efuse/ by the module's name.
#
# With KERNEL_BUILD_DIR it also checks that the target kernel can take the
# module (6.9+ for struct_ops in modules, module BTF, backing files).
#
# Every step checks that it did what it says; a FUSE source that does not
# take the patches or the renames is refused with the step that failed.
set -eu

die() {
	echo "efuse module: $*" >&2
	exit 1
}

[ $# -ge 2 ] || die "usage: prepare.sh FUSE_SRC OUT [KERNEL_BUILD_DIR]"
src=$1
out=$2
kdir=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
patches=${EFUSE_PATCHES:-$here/../patches}
version=${EFUSE_VERSION:-0.0.0}

[ -f "$src/fuse_i.h" ] && [ -f "$src/dev.c" ] ||
	die "$src is not a kernel's fs/fuse directory (no fuse_i.h/dev.c)"

if [ -n "$kdir" ]; then
	[ -f "$kdir/Makefile" ] && [ -f "$kdir/.config" ] ||
		die "$kdir is not a kernel build directory (install the kernel headers for this kernel)"
	kv=$(make -s -C "$kdir" kernelversion 2>/dev/null || true)
	major=${kv%%.*}
	minor=${kv#*.}
	minor=${minor%%.*}
	case $major$minor in
	'' | *[!0-9]*) die "cannot read the kernel version of $kdir (make kernelversion said '$kv')" ;;
	esac
	if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 9 ]; }; then
		die "kernel $kv is too old: a module can register a struct_ops type since Linux 6.9"
	fi
	for opt in CONFIG_MODULES CONFIG_BPF_SYSCALL CONFIG_BPF_JIT CONFIG_DEBUG_INFO_BTF CONFIG_DEBUG_INFO_BTF_MODULES CONFIG_FS_STACK; do
		grep -q "^$opt=y" "$kdir/.config" ||
			die "the target kernel lacks $opt=y, which efuse.ko needs"
	done
fi

rm -rf "$out"
mkdir -p "$out"
for f in "$src"/*.c "$src"/*.h "$src"/Makefile "$src"/Kconfig; do
	case $(basename "$f") in
	cuse.c | virtio_fs.c | dax.c) ;;
	*) cp "$f" "$out/" ;;
	esac
done

# 2. The patch series (paths a/fs/fuse/X: strip three components).
for p in "$patches"/*.patch; do
	patch -s -p3 -d "$out" --batch --forward --no-backup-if-mismatch -i "$p" </dev/null ||
		die "$(basename "$p") does not apply to this FUSE source ($src); efuse's series targets Linux 6.12"
done

# 3. The rename layer. Each expression must change something.
rename() {
	file=$1
	expr=$2
	what=$3
	before=$(cksum <"$out/$file")
	sed -i -E "$expr" "$out/$file"
	[ "$(cksum <"$out/$file")" != "$before" ] ||
		die "rename layer: $what not found in $file (this FUSE source differs from the one efuse knows)"
}
rename inode.c 's/^([[:space:]]*\.name[[:space:]]*= )"fuse",/\1"efuse",/' 'the filesystem type "fuse"'
rename inode.c 's/^([[:space:]]*\.name[[:space:]]*= )"fuseblk",/\1"efuseblk",/' 'the filesystem type "fuseblk"'
rename inode.c '/^MODULE_ALIAS_FS\("fuse(blk)?"\);/d' 'the filesystem aliases'
rename inode.c 's/kobject_create_and_add\("fuse", fs_kobj\)/kobject_create_and_add("efuse", fs_kobj)/' 'the sysfs directory /sys/fs/fuse'
rename control.c 's/^([[:space:]]*\.name[[:space:]]*= )"fusectl",/\1"efusectl",/' 'the control filesystem "fusectl"'
rename control.c '/^MODULE_ALIAS_FS\("fusectl"\);/d' 'the control filesystem alias'
rename dev.c '/^MODULE_ALIAS(_MISCDEV\(FUSE_MINOR\)|\("devname:fuse"\));/d' 'the /dev/fuse aliases'
rename dev.c 's/^([[:space:]]*\.minor[[:space:]]*= )FUSE_MINOR,/\1MISC_DYNAMIC_MINOR,/' 'the /dev/fuse minor'
rename dev.c 's/^([[:space:]]*\.name[[:space:]]*= )"fuse",/\1"efuse",/' 'the device name "fuse"'
rename fuse_trace.h 's/^#define TRACE_SYSTEM fuse$/#define TRACE_SYSTEM efuse/' 'the tracepoint system'
# Exported symbols would clash with the kernel's FUSE; nothing links
# against efuse.ko.
for f in "$out"/*.c; do
	sed -i -E '/^EXPORT_SYMBOL(_GPL)?\(/d' "$f"
done
! grep -n 'EXPORT_SYMBOL' "$out"/*.c || die "rename layer: exported symbols left"

# 4. Build files.
# Kbuild takes precedence over the kernel's Makefile, which stays as it was.
cp "$here/Kbuild" "$here/efuse_config.h" "$here/efuse_version.c" "$out/"
series=$(cat "$patches"/*.patch | cksum | cut -d' ' -f1)
printf '#define EFUSE_VERSION "%s"\n#define EFUSE_SERIES "%s"\n' "$version" "$series" >"$out/efuse_version.h"
echo "efuse module: source prepared in $out (series $series)"
