// SPDX-License-Identifier: GPL-2.0
/*
 * Identity of efuse.ko: the efuse release and the hash of the patch series
 * it was built from (EFUSE_VERSION and EFUSE_SERIES are set by prepare.sh
 * in efuse_version.h), shown by modinfo and `efuse kmod status`.
 */
#include <linux/module.h>

#include "efuse_version.h"

MODULE_VERSION(EFUSE_VERSION);
MODULE_INFO(efuse_series, EFUSE_SERIES);
