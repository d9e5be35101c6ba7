/* The C shim's interface: the verbs that are static inline in <infiniband/verbs.h> (they call through
 * the provider's ops table, or pick the extended ABI by the caller's sizeof) as real functions Rust can
 * call, a few field reads of structs Rust keeps opaque, and the sizeof/offsetof of the types verbs-sys
 * binds so a test can compare them with what bindgen generated. */
#ifndef TANDEM_VERBS_SHIM_H
#define TANDEM_VERBS_SHIM_H

#include <stddef.h>
#include <stdint.h>

struct ibv_context;
struct ibv_cq;
struct ibv_qp;
struct ibv_send_wr;
struct ibv_recv_wr;
struct ibv_wc;
struct ibv_port_attr;
struct ibv_gid_entry;

/* ibv_post_send: hands a chain of work requests to the send queue; *bad_wr names the first refused. */
int tandem_ibv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
/* ibv_post_recv: a receive work request (a WRITE_WITH_IMM consumes one at the responder). */
int tandem_ibv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr);
/* ibv_poll_cq: up to num_entries completions into wc; the count, or a negative value on error. */
int tandem_ibv_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
/* ibv_req_notify_cq: arm the CQ's completion channel for the next (solicited) completion. */
int tandem_ibv_req_notify_cq(struct ibv_cq *cq, int solicited_only);
/* ibv_query_port (the macro): the extended query with this header's sizeof(struct ibv_port_attr). */
int tandem_ibv_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *port_attr);
/* ibv_query_gid_ex: one GID table entry with its type (IB, RoCE v1, RoCE v2) and netdev. */
int tandem_ibv_query_gid_ex(struct ibv_context *context, uint32_t port_num, uint32_t gid_index,
                            struct ibv_gid_entry *entry);
/* qp->qp_num, cq->cqe: fields of structs Rust keeps opaque. */
uint32_t tandem_ibv_qp_num(const struct ibv_qp *qp);
int tandem_ibv_cq_cqe(const struct ibv_cq *cq);

/* Layout of the types verbs-sys binds, as the C compiler sees it: name is "struct" or "struct.field"
 * (a field may be a path through members: "ibv_send_wr.wr.rdma.rkey"). SIZE_MAX for an unknown name. */
size_t tandem_verbs_layout_sizeof(const char *name);
size_t tandem_verbs_layout_offsetof(const char *name);

#endif
