/* The C shim of dpdk-sys: DPDK's fast path is static inline in its headers (burst rx/tx through
 * rte_eth_fp_ops, mbuf alloc/free/append, the per-lcore rte_errno), so Rust cannot link to it; these
 * one-line functions give it a symbol. Also reports the C layout of the bound types for the layout test. */
#include <string.h>

#include <rte_config.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_ether.h>
#include <rte_mbuf.h>

#include "shim.h"

uint16_t tandem_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
                                 uint16_t nb_pkts) {
  return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

uint16_t tandem_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
                                 uint16_t nb_pkts) {
  return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *tandem_rte_pktmbuf_alloc(struct rte_mempool *pool) { return rte_pktmbuf_alloc(pool); }

void tandem_rte_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

void tandem_rte_pktmbuf_free_bulk(struct rte_mbuf **mbufs, unsigned int count) {
  rte_pktmbuf_free_bulk(mbufs, count);
}

void *tandem_rte_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }

uint16_t tandem_rte_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }

uint32_t tandem_rte_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }

uint16_t tandem_rte_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

uint16_t tandem_rte_pktmbuf_tailroom(const struct rte_mbuf *m) {
  return rte_pktmbuf_tailroom(rte_pktmbuf_lastseg((struct rte_mbuf *)m));
}

char *tandem_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }

int tandem_rte_errno(void) { return rte_errno; }

unsigned int tandem_rte_lcore_id(void) { return rte_lcore_id(); }

uint16_t tandem_rte_mbuf_default_buf_size(void) { return RTE_MBUF_DEFAULT_BUF_SIZE; }

uint64_t tandem_rte_eth_rss_ip_tcp_udp(void) { return RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP; }

/* One row per struct and per field that Rust reads or writes. */
#define LAYOUT_STRUCTS(X) \
  X(rte_ether_addr)       \
  X(rte_eth_conf)         \
  X(rte_eth_rxmode)       \
  X(rte_eth_txmode)       \
  X(rte_eth_rss_conf)     \
  X(rte_eth_dev_info)     \
  X(rte_eth_desc_lim)     \
  X(rte_eth_rxconf)       \
  X(rte_eth_txconf)       \
  X(rte_eth_stats)

#define LAYOUT_FIELDS(X)                         \
  X(rte_ether_addr, addr_bytes)                  \
  X(rte_eth_conf, rxmode)                        \
  X(rte_eth_conf, txmode)                        \
  X(rte_eth_conf, rx_adv_conf)                   \
  X(rte_eth_rxmode, mq_mode)                     \
  X(rte_eth_rxmode, mtu)                         \
  X(rte_eth_rxmode, offloads)                    \
  X(rte_eth_txmode, mq_mode)                     \
  X(rte_eth_txmode, offloads)                    \
  X(rte_eth_rss_conf, rss_key)                   \
  X(rte_eth_rss_conf, rss_key_len)               \
  X(rte_eth_rss_conf, rss_hf)                    \
  X(rte_eth_dev_info, driver_name)               \
  X(rte_eth_dev_info, max_rx_queues)             \
  X(rte_eth_dev_info, max_tx_queues)             \
  X(rte_eth_dev_info, rx_offload_capa)           \
  X(rte_eth_dev_info, tx_offload_capa)           \
  X(rte_eth_dev_info, flow_type_rss_offloads)    \
  X(rte_eth_dev_info, default_rxconf)            \
  X(rte_eth_dev_info, default_txconf)            \
  X(rte_eth_dev_info, rx_desc_lim)               \
  X(rte_eth_dev_info, tx_desc_lim)               \
  X(rte_eth_desc_lim, nb_max)                    \
  X(rte_eth_desc_lim, nb_min)                    \
  X(rte_eth_desc_lim, nb_align)                  \
  X(rte_eth_stats, ipackets)                     \
  X(rte_eth_stats, opackets)                     \
  X(rte_eth_stats, ibytes)                       \
  X(rte_eth_stats, obytes)                       \
  X(rte_eth_stats, imissed)                      \
  X(rte_eth_stats, ierrors)                      \
  X(rte_eth_stats, oerrors)                      \
  X(rte_eth_stats, rx_nombuf)

size_t tandem_layout_sizeof(const char *name) {
#define SIZE_ROW(s) \
  if (strcmp(name, #s) == 0) return sizeof(struct s);
  LAYOUT_STRUCTS(SIZE_ROW)
#undef SIZE_ROW
  return SIZE_MAX;
}

size_t tandem_layout_offsetof(const char *name) {
#define OFFSET_ROW(s, f) \
  if (strcmp(name, #s "." #f) == 0) return offsetof(struct s, f);
  LAYOUT_FIELDS(OFFSET_ROW)
#undef OFFSET_ROW
  return SIZE_MAX;
}
