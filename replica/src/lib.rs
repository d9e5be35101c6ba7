//! Tandem replication (not built yet): the per-shard log record format, the shipper that runs on the
//! replication core, the TCP and RDMA transports, the standby's receiver and apply, roles and epochs.
//! See README.md in this folder and the Replication section of DESIGN.md; this crate depends on nothing
//! in `dataplane`.
