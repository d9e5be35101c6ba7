//! Tandem's dataplane: a memcached-compatible cache server built as one shard per core.
//!
//! The data path, in the order a request travels it (see DESIGN.md):
//! - [`net`]: the transports. `net::kernel` (epoll over kernel sockets) is the default backend.
//! - [`protocol`]: pure codecs with no I/O: bytes in, [`protocol::Codec::Request`] out, responses
//!   composed into a buffer. Text (with meta commands) and binary.
//! - [`route`]: which shard owns a key.
//! - [`shard`]: one core's state (its [`store::Store`] and counters); executes requests on it.
//! - [`store`]: the per-shard item store: an arena of segments, an index, expiry and eviction.
//! - [`runtime`]: pinned worker threads, their poll loops and the rings between them.
//! - [`config`], [`stats`], [`clock`]: operator settings, counters, and the server's notion of time.
//! - [`notify`]: readiness and the watchdog for systemd (`Type=notify`, `WatchdogSec=`).
//! - [`replication`], [`failover`]: the node's part in a pair; [`roles`]: role changes on demand, and
//!   [`admin`]: the endpoint `tandemctl` asks for them on.
//! - [`test_support`]: for tests that need root or other things a CI machine has: skip, or fail in CI.

pub mod admin;
pub mod clock;
pub mod config;
pub mod failover;
pub mod failover_guard;
pub mod net;
pub mod notify;
pub mod protocol;
pub mod replication;
pub mod roles;
pub mod route;
pub mod runtime;
pub mod shard;
pub mod stats;
pub mod store;
pub mod test_support;

/// The version reported by `version` and `stats`.
pub const VERSION: &str = concat!("1.6.18-tandem-", env!("CARGO_PKG_VERSION"));
