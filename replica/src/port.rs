//! What a shard's core and the replication core share: the few atomics and queues that cross between
//! them, apart from the log ring itself ([`crate::log`]).
//!
//! - [`ShardPort`], one per shard. On the active: the acknowledged watermark the shipper publishes (sync
//!   mode releases held replies by it), the snapshot the shipper asks for, and the snapshot chunks the
//!   shard streams back. On the standby: what the receiver hands the shard to apply ([`Inbound`]), and
//!   the highest sequence number the shard has applied.
//! - [`Bell`]: wakes the replication core's poll loop, with a syscall only when it sleeps.
//! - [`Wake`]: how the replication core wakes a shard's core (the server implements it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;

use crate::ids::{Epoch, LogSeq, ReplicationId};

/// Snapshot chunks in flight from a shard to the shipper (each up to [`SNAPSHOT_CHUNK_BYTES`]).
pub const SNAPSHOT_QUEUE: usize = 8;
/// About how many bytes of records a snapshot chunk carries.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Messages in flight from the receiver to one shard on a standby.
pub const INBOUND_QUEUE: usize = 256;
/// Emptied receive buffers kept per shard for reuse.
pub const SPARE_BUFFERS: usize = 4;
/// `acked` when no standby is streaming: nothing to wait for (sync mode degrades to async, see
/// [`crate::shipper`]).
pub const ACKED_ALL: u64 = u64::MAX;

/// Wakes one shard's core.
pub trait Wake: Send + Sync {
    fn wake(&self, shard: usize);
}

/// One part of a shard's snapshot, produced on the shard's core.
#[derive(Debug)]
pub struct SnapshotChunk {
    /// Which request this answers ([`ShardPort::snapshot_wanted`]).
    pub id: u64,
    /// The shard's newest log sequence number when the chunk was cut: the chunk reflects every record up
    /// to it and none after.
    pub at: LogSeq,
    pub part: SnapshotPart,
}

#[derive(Debug)]
pub enum SnapshotPart {
    Begin,
    /// Whole encoded SET records of the shard.
    Items(Vec<u8>),
    End,
}

/// What the receiver hands a standby's shard, in stream order.
#[derive(Debug)]
pub enum Inbound {
    /// Records `first..first + count`, encoded back to back and already checked.
    Batch { first: LogSeq, count: u32, records: Vec<u8> },
    /// A new connection resumes the shard's stream after `after` (what the shard last applied, or 0 when
    /// a snapshot was cut off: then the whole log follows).
    Resume { after: LogSeq },
    /// Wipe the shard: a snapshot follows and the log continues after `at`.
    SnapshotBegin { at: LogSeq },
    /// Checked SET records of the snapshot.
    SnapshotItems(Vec<u8>),
    SnapshotEnd,
}

/// The per-shard meeting point of the shard's core and the replication core.
pub struct ShardPort {
    /// Active: every record up to this is acknowledged as the ack policy requires ([`ACKED_ALL`]: no
    /// standby to wait for).
    pub acked: AtomicU64,
    /// Active: the snapshot the shipper asks this shard for; 0 cancels one under way. A shard streams
    /// each id once.
    pub snapshot_wanted: AtomicU64,
    /// Active: snapshot chunks, shard to shipper.
    pub snapshot: ArrayQueue<SnapshotChunk>,
    /// Standby: what to apply, receiver to shard.
    pub inbound: ArrayQueue<Inbound>,
    /// Standby: the highest sequence number applied ([`LogSeq::ZERO`] while a snapshot is incomplete).
    pub applied: AtomicU64,
    /// Standby: emptied buffers of applied messages, back to the receiver for reuse.
    pub spare: ArrayQueue<Vec<u8>>,
    /// Standby: the history and epoch of the stream the receiver accepted last, set before it hands the
    /// shard anything of it (a shard that keeps its contents across restarts records its position in it).
    pub following: Mutex<Option<(ReplicationId, Epoch)>>,
}

impl Default for ShardPort {
    fn default() -> Self {
        ShardPort {
            acked: AtomicU64::new(ACKED_ALL),
            snapshot_wanted: AtomicU64::new(0),
            snapshot: ArrayQueue::new(SNAPSHOT_QUEUE),
            inbound: ArrayQueue::new(INBOUND_QUEUE),
            applied: AtomicU64::new(0),
            spare: ArrayQueue::new(SPARE_BUFFERS),
            following: Mutex::new(None),
        }
    }
}

impl ShardPort {
    pub fn applied(&self) -> LogSeq {
        LogSeq(self.applied.load(Ordering::Acquire))
    }

    /// The history and epoch of the stream accepted last (see [`ShardPort::following`]).
    pub fn following(&self) -> Option<(ReplicationId, Epoch)> {
        *self.following.lock().unwrap()
    }

    /// A copy of `bytes` in a recycled buffer when one is spare.
    pub fn copy_of(&self, bytes: &[u8]) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        buf
    }

    /// Gives an applied message's buffer back for reuse (dropped when enough are kept).
    pub fn recycle(&self, buf: Vec<u8>) {
        let _ = self.spare.push(buf);
    }
}

/// Wakes the replication core's poll loop; a ring costs a syscall only while that loop sleeps.
pub struct Bell {
    sleeping: AtomicBool,
    waker: mio::Waker,
}

impl Bell {
    pub fn new(waker: mio::Waker) -> Arc<Bell> {
        Arc::new(Bell { sleeping: AtomicBool::new(false), waker })
    }

    /// Wakes the loop if it sleeps (or is about to).
    pub fn ring(&self) {
        if self.sleeping.load(Ordering::Acquire) {
            self.sleeping.store(false, Ordering::Release);
            let _ = self.waker.wake();
        }
    }

    /// Wakes the loop whatever it does (shutdown).
    pub fn ring_always(&self) {
        let _ = self.waker.wake();
    }

    /// The loop is about to sleep; it must check its queues once more after this.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::Release);
    }
}
