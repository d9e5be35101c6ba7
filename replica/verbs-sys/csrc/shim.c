/* The C shim of verbs-sys: the fast-path verbs (post send/recv, poll and arm a CQ) and the extended
 * queries are static inline in <infiniband/verbs.h>, calling through the provider's ops table, so Rust
 * cannot link to them; these one-line functions give them a symbol. Also reports the C layout of the
 * bound types for the layout test. */
#include <string.h>

#include <infiniband/verbs.h>

#include "shim.h"

int tandem_ibv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr) {
  return ibv_post_send(qp, wr, bad_wr);
}

int tandem_ibv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr) {
  return ibv_post_recv(qp, wr, bad_wr);
}

int tandem_ibv_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc) {
  return ibv_poll_cq(cq, num_entries, wc);
}

int tandem_ibv_req_notify_cq(struct ibv_cq *cq, int solicited_only) {
  return ibv_req_notify_cq(cq, solicited_only);
}

int tandem_ibv_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *port_attr) {
  return ibv_query_port(context, port_num, port_attr);
}

int tandem_ibv_query_gid_ex(struct ibv_context *context, uint32_t port_num, uint32_t gid_index,
                            struct ibv_gid_entry *entry) {
  return ibv_query_gid_ex(context, port_num, gid_index, entry, 0);
}

uint32_t tandem_ibv_qp_num(const struct ibv_qp *qp) { return qp->qp_num; }

int tandem_ibv_cq_cqe(const struct ibv_cq *cq) { return cq->cqe; }

/* One row per type and per field that Rust reads or writes. */
#define LAYOUT_TYPES(X)        \
  X(union, ibv_gid)            \
  X(struct, ibv_gid_entry)     \
  X(struct, ibv_sge)           \
  X(struct, ibv_send_wr)       \
  X(struct, ibv_recv_wr)       \
  X(struct, ibv_wc)            \
  X(struct, ibv_mr)            \
  X(struct, ibv_port_attr)     \
  X(struct, ibv_device_attr)   \
  X(struct, ibv_global_route)  \
  X(struct, ibv_ah_attr)       \
  X(struct, ibv_qp_cap)        \
  X(struct, ibv_qp_init_attr)  \
  X(struct, ibv_qp_attr)

#define LAYOUT_FIELDS(X)                            \
  X(union, ibv_gid, raw)                            \
  X(struct, ibv_gid_entry, gid)                     \
  X(struct, ibv_gid_entry, gid_index)               \
  X(struct, ibv_gid_entry, port_num)                \
  X(struct, ibv_gid_entry, gid_type)                \
  X(struct, ibv_gid_entry, ndev_ifindex)            \
  X(struct, ibv_sge, addr)                          \
  X(struct, ibv_sge, length)                        \
  X(struct, ibv_sge, lkey)                          \
  X(struct, ibv_send_wr, wr_id)                     \
  X(struct, ibv_send_wr, next)                      \
  X(struct, ibv_send_wr, sg_list)                   \
  X(struct, ibv_send_wr, num_sge)                   \
  X(struct, ibv_send_wr, opcode)                    \
  X(struct, ibv_send_wr, send_flags)                \
  X(struct, ibv_send_wr, imm_data)                  \
  X(struct, ibv_send_wr, wr)                        \
  X(struct, ibv_send_wr, wr.rdma.remote_addr)       \
  X(struct, ibv_send_wr, wr.rdma.rkey)              \
  X(struct, ibv_recv_wr, wr_id)                     \
  X(struct, ibv_recv_wr, next)                      \
  X(struct, ibv_recv_wr, sg_list)                   \
  X(struct, ibv_recv_wr, num_sge)                   \
  X(struct, ibv_wc, wr_id)                          \
  X(struct, ibv_wc, status)                         \
  X(struct, ibv_wc, opcode)                         \
  X(struct, ibv_wc, vendor_err)                     \
  X(struct, ibv_wc, byte_len)                       \
  X(struct, ibv_wc, imm_data)                       \
  X(struct, ibv_wc, qp_num)                         \
  X(struct, ibv_wc, wc_flags)                       \
  X(struct, ibv_mr, context)                        \
  X(struct, ibv_mr, pd)                             \
  X(struct, ibv_mr, addr)                           \
  X(struct, ibv_mr, length)                         \
  X(struct, ibv_mr, handle)                         \
  X(struct, ibv_mr, lkey)                           \
  X(struct, ibv_mr, rkey)                           \
  X(struct, ibv_port_attr, state)                   \
  X(struct, ibv_port_attr, max_mtu)                 \
  X(struct, ibv_port_attr, active_mtu)              \
  X(struct, ibv_port_attr, gid_tbl_len)             \
  X(struct, ibv_port_attr, max_msg_sz)              \
  X(struct, ibv_port_attr, lid)                     \
  X(struct, ibv_port_attr, link_layer)              \
  X(struct, ibv_port_attr, port_cap_flags2)         \
  X(struct, ibv_device_attr, fw_ver)                \
  X(struct, ibv_device_attr, node_guid)             \
  X(struct, ibv_device_attr, max_qp_wr)             \
  X(struct, ibv_device_attr, max_sge)               \
  X(struct, ibv_device_attr, max_cqe)               \
  X(struct, ibv_device_attr, max_mr_size)           \
  X(struct, ibv_device_attr, max_qp_rd_atom)        \
  X(struct, ibv_device_attr, phys_port_cnt)         \
  X(struct, ibv_global_route, dgid)                 \
  X(struct, ibv_global_route, flow_label)           \
  X(struct, ibv_global_route, sgid_index)           \
  X(struct, ibv_global_route, hop_limit)            \
  X(struct, ibv_global_route, traffic_class)        \
  X(struct, ibv_ah_attr, grh)                       \
  X(struct, ibv_ah_attr, dlid)                      \
  X(struct, ibv_ah_attr, sl)                        \
  X(struct, ibv_ah_attr, src_path_bits)             \
  X(struct, ibv_ah_attr, static_rate)               \
  X(struct, ibv_ah_attr, is_global)                 \
  X(struct, ibv_ah_attr, port_num)                  \
  X(struct, ibv_qp_cap, max_send_wr)                \
  X(struct, ibv_qp_cap, max_recv_wr)                \
  X(struct, ibv_qp_cap, max_send_sge)               \
  X(struct, ibv_qp_cap, max_recv_sge)               \
  X(struct, ibv_qp_cap, max_inline_data)            \
  X(struct, ibv_qp_init_attr, qp_context)           \
  X(struct, ibv_qp_init_attr, send_cq)              \
  X(struct, ibv_qp_init_attr, recv_cq)              \
  X(struct, ibv_qp_init_attr, srq)                  \
  X(struct, ibv_qp_init_attr, cap)                  \
  X(struct, ibv_qp_init_attr, qp_type)              \
  X(struct, ibv_qp_init_attr, sq_sig_all)           \
  X(struct, ibv_qp_attr, qp_state)                  \
  X(struct, ibv_qp_attr, path_mtu)                  \
  X(struct, ibv_qp_attr, qp_access_flags)           \
  X(struct, ibv_qp_attr, rq_psn)                    \
  X(struct, ibv_qp_attr, sq_psn)                    \
  X(struct, ibv_qp_attr, dest_qp_num)               \
  X(struct, ibv_qp_attr, cap)                       \
  X(struct, ibv_qp_attr, ah_attr)                   \
  X(struct, ibv_qp_attr, pkey_index)                \
  X(struct, ibv_qp_attr, max_rd_atomic)             \
  X(struct, ibv_qp_attr, max_dest_rd_atomic)        \
  X(struct, ibv_qp_attr, min_rnr_timer)             \
  X(struct, ibv_qp_attr, port_num)                  \
  X(struct, ibv_qp_attr, timeout)                   \
  X(struct, ibv_qp_attr, retry_cnt)                 \
  X(struct, ibv_qp_attr, rnr_retry)

size_t tandem_verbs_layout_sizeof(const char *name) {
#define SIZE_ROW(kind, t) \
  if (strcmp(name, #t) == 0) return sizeof(kind t);
  LAYOUT_TYPES(SIZE_ROW)
#undef SIZE_ROW
  return SIZE_MAX;
}

size_t tandem_verbs_layout_offsetof(const char *name) {
#define OFFSET_ROW(kind, t, f) \
  if (strcmp(name, #t "." #f) == 0) return offsetof(kind t, f);
  LAYOUT_FIELDS(OFFSET_ROW)
#undef OFFSET_ROW
  return SIZE_MAX;
}
