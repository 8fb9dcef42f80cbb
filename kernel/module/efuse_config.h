/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Force-included into every object of efuse.ko (Kbuild: -include): the
 * configuration of this build, overriding the target kernel's .config for
 * the FUSE options. It is read after include/generated/autoconf.h.
 */
#ifndef _EFUSE_CONFIG_H
#define _EFUSE_CONFIG_H

/* The hook this module exists for. */
#undef CONFIG_FUSE_BPF
#define CONFIG_FUSE_BPF 1

/* The open answers pass through to backing files. */
#undef CONFIG_FUSE_PASSTHROUGH
#define CONFIG_FUSE_PASSTHROUGH 1

/* DAX belongs to virtiofs, which this module leaves to the kernel. */
#undef CONFIG_FUSE_DAX

/* Messages name the module. */
#define pr_fmt(fmt) "efuse: " fmt

#endif
