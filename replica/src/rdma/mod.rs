//! The RDMA transport (feature `rdma`): one-sided RDMA WRITEs of the data stream into the standby's
//! receive ring ([`crate::ring`], [`crate::ring_link`]), over reliable-connected queue pairs.
//!
//! - [`verbs`]: the narrow safe layer over libibverbs (`verbs-sys`): devices, ports, the GID table,
//!   protection domains, completion queues, registered regions, RC queue pairs, RDMA WRITE and
//!   WRITE_WITH_IMM, completions with every error by name.
//! - [`link`]: the transport's two ends over verbs ([`crate::ring_link::RingPort`] and
//!   [`crate::ring_link::RingHome`]) and their setup over the authenticated TCP control connection.

pub mod link;
pub mod verbs;
