/* The C shim's interface: DPDK's static-inline fast path (burst rx/tx, mbuf alloc/free/data access,
 * rte_errno) as real functions Rust can call, and the sizeof/offsetof of the types dpdk-sys binds so a
 * test can compare them with what bindgen generated. */
#ifndef TANDEM_DPDK_SHIM_H
#define TANDEM_DPDK_SHIM_H

#include <stddef.h>
#include <stdint.h>

struct rte_mbuf;
struct rte_mempool;

uint16_t tandem_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
                                 uint16_t nb_pkts);
uint16_t tandem_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
                                 uint16_t nb_pkts);
struct rte_mbuf *tandem_rte_pktmbuf_alloc(struct rte_mempool *pool);
void tandem_rte_pktmbuf_free(struct rte_mbuf *m);
void tandem_rte_pktmbuf_free_bulk(struct rte_mbuf **mbufs, unsigned int count);
/* The first segment's data (rte_pktmbuf_mtod). */
void *tandem_rte_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t tandem_rte_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t tandem_rte_pktmbuf_pkt_len(const struct rte_mbuf *m);
uint16_t tandem_rte_pktmbuf_nb_segs(const struct rte_mbuf *m);
/* Room left at the end of the last segment (rte_pktmbuf_tailroom). */
uint16_t tandem_rte_pktmbuf_tailroom(const struct rte_mbuf *m);
/* Grows the packet by len bytes at its end; NULL when the last segment has no room. */
char *tandem_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
/* The calling thread's rte_errno. */
int tandem_rte_errno(void);
/* The calling thread's lcore id (rte_lcore_id): LCORE_ID_ANY (UINT32_MAX) on an unregistered thread. */
unsigned int tandem_rte_lcore_id(void);
/* RTE_MBUF_DEFAULT_BUF_SIZE: data room plus RTE_PKTMBUF_HEADROOM. */
uint16_t tandem_rte_mbuf_default_buf_size(void);
/* RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP (function-like macros in the headers). */
uint64_t tandem_rte_eth_rss_ip_tcp_udp(void);

/* Layout of the types dpdk-sys binds, as the C compiler sees it: name is "struct" or "struct.field".
 * Returns SIZE_MAX for a name the shim does not know. */
size_t tandem_layout_sizeof(const char *name);
size_t tandem_layout_offsetof(const char *name);

#endif
