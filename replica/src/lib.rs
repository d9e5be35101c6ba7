//! Tandem replication: the pieces that carry an active appliance's mutations to its standby.
//!
//! Built so far, each a pure library with its own tests (not yet wired into `dataplane`), in data-path
//! order:
//! - [`ids`]: [`ShardId`], [`LogSeq`], [`Epoch`], [`ReplicationId`].
//! - [`record`]: the logical, self-contained log [`Record`] and its checksummed wire encoding.
//! - [`log`]: each shard's bounded log ring (producer: the shard; consumer: the shipper), its full-ring
//!   policy, and the backlog that decides partial resync.
//! - [`frame`]: batch framing for the wire and a decoder for a byte stream fed in any pieces.
//! - [`handshake`]: mutual challenge-response authentication and the resume-or-full-sync decision.
//! - [`transport`]: the narrow link traits (TCP and RDMA to come) and an in-memory link for tests.
//!
//! Still to come: the shipper loop on the replication core, the TCP and RDMA transports, the standby's
//! receiver/apply (a trait that `dataplane` implements), full sync, roles, persisted epochs and takeover.
//! See README.md in this folder and the Replication section of DESIGN.md. This crate depends on nothing
//! in `dataplane`; `dataplane` depends on it.

pub mod backlog;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod log;
pub mod port;
pub mod receiver;
pub mod record;
pub mod shipper;
pub mod transport;
pub mod wire;

pub use ids::{Epoch, LogSeq, ReplicationId, ShardId};
pub use record::{LoggedRecord, Record};
