//! Tandem replication: the pieces that carry an active appliance's mutations to its standby.
//!
//! In data-path order:
//! - [`ids`]: [`ShardId`], [`LogSeq`], [`Epoch`], [`ReplicationId`].
//! - [`record`]: the logical, self-contained log [`Record`] and its checksummed wire encoding.
//! - [`log`]: each shard's bounded log ring (producer: the shard; consumer: the replication core) and its
//!   full-ring policy.
//! - [`backlog`]: the replication core's copy of each shard's recent records, read by every standby
//!   at its own pace with its own cursor; decides partial resync or full sync.
//! - [`frame`]: batch framing, and [`wire`]: the messages of a replication stream over TCP.
//! - [`ring`]: the per-shard receive ring of fixed-size slots, with credits, that the RDMA transport
//!   writes batch frames into; no I/O, so it is tested everywhere.
//! - [`ring_link`]: the data stream through such a ring, written one-sided (the RDMA transport's logic,
//!   over a [`ring_link::RingPort`] and [`ring_link::RingHome`] that verbs or plain memory implement).
//! - [`rdma`] (feature `rdma`, needs the system libibverbs): the verbs layer the RDMA transport uses.
//! - [`handshake`]: mutual challenge-response authentication and the resume-or-full-sync decision.
//! - [`port`]: what a shard's core and the replication core share (acks, snapshot requests and chunks,
//!   records to apply, the applied position).
//! - [`shipper`]: the active's replication core; [`receiver`]: the standby's.
//! - [`stall`]: how long a thread was kept from running, so the standby counts the active's silence
//!   on its own running time.
//! - [`handover`]: a planned switchover from an active to a caught-up standby, over the same link.
//! - [`transport`]: the data stream's narrow traits ([`transport::StreamSink`] on the active,
//!   [`transport::StreamSource`] on the standby), the TCP control connection that also carries the
//!   stream with the TCP transport, and an in-memory link for tests.
//!
//! The server (`dataplane`) implements the rest: its store reports changes into the log and applies
//! records, and its workers run their per-round duties (see `dataplane::replication`); roles and epochs
//! on disk, failover and the service address are `dataplane::failover`'s. This crate depends on
//! nothing in `dataplane`; `dataplane` depends on it.

pub mod backlog;
pub mod frame;
pub mod handover;
pub mod handshake;
pub mod ids;
pub mod log;
pub mod port;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod receiver;
pub mod record;
pub mod ring;
pub mod ring_link;
pub mod shipper;
pub mod stall;
pub mod transport;
pub mod wire;

pub use ids::{Epoch, LogSeq, ReplicationId, ShardId};
pub use record::{LoggedRecord, Record};
