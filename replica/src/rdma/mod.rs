//! The RDMA transport (feature `rdma`): one-sided RDMA WRITEs of batch frames into the standby's
//! per-shard receive rings ([`crate::ring`]), over reliable-connected queue pairs.
//!
//! - [`verbs`]: the narrow safe layer over libibverbs (`verbs-sys`): devices, ports, the GID table,
//!   protection domains, completion queues, registered regions, RC queue pairs, RDMA WRITE and
//!   WRITE_WITH_IMM, completions with every error by name.
//!
//! Still to come (issue 8): the link over it (setup and rkeys over the authenticated TCP control
//! channel, a ring per shard, credits, the doorbell), wired into the shipper and receiver.

pub mod verbs;
