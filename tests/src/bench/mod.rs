//! `tandem-bench`, the load tester, as a library: the binary in `src/bin/tandem-bench.rs` is only its
//! command line.
//!
//! - [`protocol`]: encode set/get/touch/delete in text, meta or binary and check each reply.
//! - [`workload`]: command ratios, value-size distributions, key names, verifiable values, a PRNG.
//! - [`blast`]: the non-blocking load loop with a latency histogram.
//! - [`verify`]: `setget` and `sizes`, byte-exact checks over a blocking connection.
//! - [`stats`]: the server's `stats`, and its CPU per request between two snapshots.
//! - [`compare`]: memcached and tandemd side by side, medians and ratios.
//! - [`memaslap`]: the same load driven by libmemcached-tools' memaslap instead of [`blast`].
//! - [`report`]: a blast's result for people (`Display`) and programs (`--json`).

pub mod blast;
pub mod compare;
pub mod memaslap;
pub mod protocol;
pub mod replication;
pub mod report;
pub mod stats;
pub mod verify;
pub mod workload;
