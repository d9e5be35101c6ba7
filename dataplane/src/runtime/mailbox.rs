//! Bounded rings between cores: how one worker asks another to run requests on its shard.
//!
//! Every ordered pair of workers (a, b) has one single-producer/single-consumer ring of *batches*:
//! worker a collects everything for b during a poll round in an outbox and pushes it as one batch, so a
//! round costs one ring slot and at most one wake-up per peer. Emptied batch vectors travel back on a
//! second ring so steady state allocates nothing, and the byte buffers inside messages come back inside
//! replies (a request's frame buffer is reused for its reply).
//!
//! Wake-ups are skipped while the receiver is running: a worker publishes `sleeping` before it blocks
//! in epoll and rechecks its rings after; a sender wakes it only if it saw `sleeping` after pushing
//! (both sides use SeqCst, so one of them always sees the other).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::route::ShardId;

/// Batches in flight per ordered pair of workers before the sender holds back.
const RING_BATCHES: usize = 256;

/// Identifies a connection on its worker: slab index plus a generation, so a reply for a connection
/// that closed (and whose slot was reused) is recognised and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub index: u32,
    pub generation: u32,
}

/// Which codec a frame is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Text,
    Binary,
}

/// A message between workers.
#[derive(Debug)]
pub enum Msg {
    /// Run `frame` (one single-key request, in wire form) on the receiver's shard and reply.
    /// `key_only`: the frame is one key of a multi-key retrieval (no terminator in the reply).
    Request { conn: ConnRef, slot: u64, proto: Proto, key_only: bool, frame: Vec<u8> },
    /// The response bytes for `slot` of connection `conn`.
    /// `log_seq`: in sync replication, the sender's log position the reply must wait for (0: none).
    Reply { conn: ConnRef, slot: u64, bytes: Vec<u8>, log_seq: u64 },
    /// Flush the receiver's shard now or after `delay` seconds.
    Flush { delay: i64 },
    /// Reset the receiver's counters (`stats reset`).
    ResetStats,
    /// Set the receiver's store memory limit to `bytes` (its share of `cache_memlimit`).
    MemoryLimit { bytes: usize },
}

/// One direction of one pair: the batch ring and the ring returning empty batches.
struct Lane {
    batches: ArrayQueue<Vec<Msg>>,
    empties: ArrayQueue<Vec<Msg>>,
}

/// Something that can wake a sleeping worker (its poller's waker).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// The per-worker doorbell: whether it sleeps, and how to wake it.
pub struct Doorbell {
    sleeping: AtomicBool,
    waker: Box<dyn Wake>,
}

impl Doorbell {
    pub fn new(waker: Box<dyn Wake>) -> Doorbell {
        Doorbell { sleeping: AtomicBool::new(false), waker }
    }

    /// Rings unconditionally (shutdown, signals).
    pub fn ring(&self) {
        self.waker.wake();
    }

    /// Rings only if the worker sleeps (it rechecks its queues after announcing sleep).
    pub fn nudge(&self) {
        if self.sleeping.load(SeqCst) {
            self.waker.wake();
        }
    }
}

/// All rings of the server; shared by every worker, each using only its own row and column.
pub struct Mailboxes {
    workers: usize,
    /// lanes[from * workers + to]
    lanes: Vec<Lane>,
    doorbells: Vec<Arc<Doorbell>>,
}

impl Mailboxes {
    pub fn new(doorbells: Vec<Arc<Doorbell>>) -> Arc<Mailboxes> {
        let workers = doorbells.len();
        let lanes = (0..workers * workers)
            .map(|_| Lane { batches: ArrayQueue::new(RING_BATCHES), empties: ArrayQueue::new(RING_BATCHES) })
            .collect();
        Arc::new(Mailboxes { workers, lanes, doorbells })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn doorbell(&self, worker: ShardId) -> &Arc<Doorbell> {
        &self.doorbells[worker]
    }

    fn lane(&self, from: ShardId, to: ShardId) -> &Lane {
        &self.lanes[from * self.workers + to]
    }
}

/// One worker's end of the mailboxes: its outboxes, and its view of its inbound rings.
pub struct Postbox {
    me: ShardId,
    boxes: Arc<Mailboxes>,
    /// Messages collected this round, per destination worker.
    outbox: Vec<Vec<Msg>>,
    /// Spare byte buffers for frames and replies.
    buffers: Vec<Vec<u8>>,
}

/// Largest buffer kept for reuse; bigger ones (large values) are freed.
const KEEP_BUFFER_BYTES: usize = 64 * 1024;
/// Spare buffers kept per worker.
const KEEP_BUFFERS: usize = 4096;

impl Postbox {
    pub fn new(me: ShardId, boxes: Arc<Mailboxes>) -> Postbox {
        let outbox = (0..boxes.workers()).map(|_| Vec::new()).collect();
        Postbox { me, boxes, outbox, buffers: Vec::new() }
    }

    pub fn me(&self) -> ShardId {
        self.me
    }

    /// A cleared buffer from the pool.
    pub fn buffer(&mut self) -> Vec<u8> {
        self.buffers.pop().unwrap_or_default()
    }

    /// Returns a buffer to the pool.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() <= KEEP_BUFFER_BYTES && self.buffers.len() < KEEP_BUFFERS {
            buf.clear();
            self.buffers.push(buf);
        }
    }

    /// Queues a message for `to`; it leaves at the next [`Postbox::flush`].
    pub fn send(&mut self, to: ShardId, msg: Msg) {
        self.outbox[to].push(msg);
    }

    /// Queues a message for every other worker.
    pub fn broadcast(&mut self, mut make: impl FnMut() -> Msg) {
        for to in 0..self.boxes.workers() {
            if to != self.me {
                let msg = make();
                self.outbox[to].push(msg);
            }
        }
    }

    /// Pushes each non-empty outbox as one batch and wakes receivers that sleep. A full ring keeps the
    /// batch here for the next round (back-pressure, nothing dropped). Returns true if anything stayed.
    pub fn flush(&mut self) -> bool {
        let mut held = false;
        for to in 0..self.outbox.len() {
            if self.outbox[to].is_empty() {
                continue;
            }
            let lane = self.boxes.lane(self.me, to);
            let spare = lane.empties.pop().unwrap_or_default();
            let batch = std::mem::replace(&mut self.outbox[to], spare);
            match lane.batches.push(batch) {
                Ok(()) => {
                    let bell = &self.boxes.doorbells[to];
                    if bell.sleeping.load(SeqCst) {
                        bell.waker.wake();
                    }
                }
                Err(batch) => {
                    // Ring full: put the batch back in front of anything queued meanwhile.
                    let newer = std::mem::replace(&mut self.outbox[to], batch);
                    self.outbox[to].extend(newer);
                    held = true;
                }
            }
        }
        held
    }

    /// Takes every batch waiting for this worker, calling `handle` on each message in order per sender.
    pub fn drain(&mut self, mut handle: impl FnMut(&mut Postbox, ShardId, Msg)) -> usize {
        let mut handled = 0;
        // One handle for the whole drain: `handle` needs `self` mutably while a lane is borrowed.
        let boxes = Arc::clone(&self.boxes);
        for from in 0..boxes.workers() {
            if from == self.me {
                continue;
            }
            let lane = boxes.lane(from, self.me);
            while let Some(mut batch) = lane.batches.pop() {
                handled += batch.len();
                for msg in batch.drain(..) {
                    handle(self, from, msg);
                }
                let _ = lane.empties.push(batch);
            }
        }
        handled
    }

    /// Whether this round queued messages not yet flushed.
    pub fn has_outbound(&self) -> bool {
        self.outbox.iter().any(|batch| !batch.is_empty())
    }

    /// Whether any inbound ring holds a batch.
    pub fn has_inbound(&self) -> bool {
        (0..self.boxes.workers()).any(|from| from != self.me && !self.boxes.lane(from, self.me).batches.is_empty())
    }

    /// Announces that this worker is about to block. Returns false (and stays awake) if mail arrived.
    pub fn prepare_sleep(&self) -> bool {
        let bell = &self.boxes.doorbells[self.me];
        bell.sleeping.store(true, SeqCst);
        if self.has_inbound() {
            bell.sleeping.store(false, SeqCst);
            return false;
        }
        true
    }

    /// Announces that this worker is running again.
    pub fn awake(&self) {
        self.boxes.doorbells[self.me].sleeping.store(false, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct CountingWaker(Arc<AtomicUsize>);
    impl Wake for CountingWaker {
        fn wake(&self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn boxes(n: usize) -> (Arc<Mailboxes>, Vec<Arc<AtomicUsize>>) {
        let counts: Vec<_> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let bells = counts.iter().map(|c| Arc::new(Doorbell::new(Box::new(CountingWaker(c.clone()))))).collect();
        (Mailboxes::new(bells), counts)
    }

    #[test]
    fn messages_arrive_in_order_and_only_sleepers_are_woken() {
        let (mb, wakes) = boxes(2);
        let mut a = Postbox::new(0, mb.clone());
        let mut b = Postbox::new(1, mb.clone());
        for slot in 0..10 {
            a.send(1, Msg::Reply { conn: ConnRef { index: 0, generation: 0 }, slot, bytes: vec![], log_seq: 0 });
        }
        assert!(!a.flush());
        assert_eq!(wakes[1].load(SeqCst), 0, "b was awake");
        let mut seen = vec![];
        b.drain(|_, from, msg| {
            assert_eq!(from, 0);
            if let Msg::Reply { slot, .. } = msg {
                seen.push(slot)
            }
        });
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert!(b.prepare_sleep());
        a.send(1, Msg::ResetStats);
        a.flush();
        assert_eq!(wakes[1].load(SeqCst), 1, "b slept, so it is woken");
        assert!(!b.prepare_sleep(), "mail is waiting");
    }

    #[test]
    fn a_full_ring_holds_batches_back_without_losing_any() {
        let (mb, _) = boxes(2);
        let mut a = Postbox::new(0, mb.clone());
        let mut b = Postbox::new(1, mb);
        let mut sent = 0u64;
        for _ in 0..RING_BATCHES + 10 {
            a.send(1, Msg::Reply { conn: ConnRef { index: 0, generation: 0 }, slot: sent, bytes: vec![], log_seq: 0 });
            sent += 1;
            a.flush();
        }
        let mut got = vec![];
        let collect = |b: &mut Postbox, got: &mut Vec<u64>| {
            b.drain(|_, _, msg| {
                if let Msg::Reply { slot, .. } = msg {
                    got.push(slot)
                }
            })
        };
        collect(&mut b, &mut got);
        assert!(!a.flush());
        collect(&mut b, &mut got);
        assert_eq!(got, (0..sent).collect::<Vec<_>>());
    }
}
