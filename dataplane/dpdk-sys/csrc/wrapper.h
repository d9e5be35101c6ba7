/* What bindgen reads: the DPDK headers whose declarations dpdk-sys binds (see build.rs's allowlist). */
#include <rte_config.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_ethdev.h>
#include <rte_ether.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include "shim.h"
