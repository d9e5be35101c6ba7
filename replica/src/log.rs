//! A shard's replication log: a bounded single-producer / single-consumer ring of encoded records, plus
//! the backlog of already-shipped records that lets a reconnecting standby resume instead of full-syncing.
//!
//! - [`channel`] makes one shard's log and returns its two ends.
//! - [`LogProducer`] lives on the shard's core: [`LogProducer::append`] encodes a [`Record`] and gives it
//!   the next [`LogSeq`]; [`LogProducer::flush`] hands what was appended this poll round to the consumer.
//! - [`LogConsumer`] lives on the replication core: [`LogConsumer::drain_batch`] copies whole records,
//!   up to a byte budget, ready for one batch frame; [`LogConsumer::resume_from`] decides whether a
//!   standby that has applied everything up to some sequence number can resume from the backlog.
//! - [`LogStats`]: counters both ends can read.
//!
//! # How the ring is built
//! Records travel in chunks (about [`LogConfig::chunk_bytes`] each): the producer fills one, then pushes it
//! through a bounded lock-free queue (one slot per chunk, so one handover per batch, not per record); the
//! consumer keeps the chunks it received in a deque with a read cursor. Chunks behind the cursor are the
//! backlog; when the backlog grows past [`LogConfig::backlog_bytes`] its oldest chunks go back to the
//! producer through a second queue, so in steady state neither side allocates. No locks, no `unsafe`.
//!
//! # When the ring is full
//! The ring is bounded by bytes: at most [`LogConfig::ring_bytes`] of appended records may await the
//! consumer. Nothing is ever dropped silently. An append that finds no room:
//! 1. applies back-pressure: it hands over its current chunk and waits, at most [`LogConfig::full_wait`],
//!    for the consumer to make room (counted in [`LogStats::full_events`] and [`LogStats::full_wait_nanos`]);
//! 2. if the wait runs out, the record is not logged but still consumes its sequence number, so the gap is
//!    visible; the standby is marked for resync: the consumer's next [`LogConsumer::drain_batch`] returns
//!    [`Drained::ResyncRequired`], and no resume to a point before the gap is possible afterwards
//!    (counted in [`LogStats::resyncs_marked`] and [`LogStats::records_lost`]);
//! 3. until room appears again, further appends do not wait (a shard does not stall on a standby that is
//!    already going to full-sync); each lost record is counted, and logging resumes as soon as it fits.
//!
//! The shard's mutation itself always happens: the log never fails a client request.

use crate::ids::{LogSeq, ShardId};
use crate::record::{self, EncodeError, Record};
use crossbeam_queue::ArrayQueue;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Sizes and the full-ring policy of one shard's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Bytes of appended records that may await the consumer; also the largest record that can be logged.
    pub ring_bytes: usize,
    /// About how many bytes travel in one chunk (a record larger than this gets a chunk of its own).
    pub chunk_bytes: usize,
    /// Most chunks in flight from producer to consumer at once.
    pub ring_chunks: usize,
    /// Bytes of shipped records kept for partial resync (rounded up to whole chunks).
    pub backlog_bytes: usize,
    /// How long an append waits for room in a full ring before it marks the standby for resync.
    pub full_wait: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            ring_bytes: 16 << 20,
            chunk_bytes: 64 << 10,
            ring_chunks: 1024,
            backlog_bytes: 64 << 20,
            full_wait: Duration::from_millis(1),
        }
    }
}

/// Counters of one shard's log (monotonic, except `outstanding_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records logged.
    pub appended: u64,
    /// Records the consumer has drained for the first time.
    pub drained: u64,
    /// Appends that found the ring full and applied back-pressure.
    pub full_events: u64,
    /// Nanoseconds spent waiting in back-pressure.
    pub full_wait_nanos: u64,
    /// Times the standby was marked for resync because the ring stayed full.
    pub resyncs_marked: u64,
    /// Records not logged because the ring stayed full (each behind a resync mark).
    pub records_lost: u64,
    /// Bytes appended and not yet drained.
    pub outstanding_bytes: u64,
}

/// What one [`LogProducer::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The record is in the log at this sequence number.
    Logged(LogSeq),
    /// The ring stayed full: the record took this sequence number but is not in the log, and the standby
    /// is marked for resync.
    Lost(LogSeq),
}

/// What one [`LogConsumer::drain_batch`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Nothing to ship.
    Empty,
    /// `count` records with consecutive sequence numbers from `first_seq`, `bytes` long, were appended to
    /// the output buffer.
    Batch { first_seq: LogSeq, count: u32, bytes: usize },
    /// Records up to `through` were lost to a full ring: the standby needs a full sync. Records after
    /// `through` keep flowing from the next call.
    ResyncRequired { through: LogSeq },
}

/// A standby cannot resume from the backlog: it needs a full sync.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("cannot resume after {after}: the backlog holds {oldest_after} onwards up to {newest}")]
pub struct FullSyncNeeded {
    /// Where the standby asked to resume after.
    pub after: LogSeq,
    /// The oldest point a resume can start after.
    pub oldest_after: LogSeq,
    /// The newest record this log knows.
    pub newest: LogSeq,
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    drained: AtomicU64,
    full_events: AtomicU64,
    full_wait_nanos: AtomicU64,
    resyncs_marked: AtomicU64,
    records_lost: AtomicU64,
}

/// What both ends of one shard's log share.
struct Shared {
    shard: ShardId,
    config: LogConfig,
    /// Filled chunks, producer to consumer.
    ready: ArrayQueue<Vec<u8>>,
    /// Emptied chunks, consumer back to producer.
    free: ArrayQueue<Vec<u8>>,
    /// Bytes appended and not yet drained.
    outstanding: AtomicUsize,
    /// The highest sequence number lost to a full ring (0: none).
    last_lost: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn stats(&self) -> LogStats {
        let c = &self.counters;
        LogStats {
            appended: c.appended.load(Ordering::Relaxed),
            drained: c.drained.load(Ordering::Relaxed),
            full_events: c.full_events.load(Ordering::Relaxed),
            full_wait_nanos: c.full_wait_nanos.load(Ordering::Relaxed),
            resyncs_marked: c.resyncs_marked.load(Ordering::Relaxed),
            records_lost: c.records_lost.load(Ordering::Relaxed),
            outstanding_bytes: self.outstanding.load(Ordering::Relaxed) as u64,
        }
    }
}

/// Makes the log of `shard`, whose last record before this log began was `last_seq` (`LogSeq::ZERO` for
/// a new history; after a promotion, the last sequence number the new active applied). A standby can
/// resume only after a point this log holds, so a resume to before `last_seq` needs a full sync.
pub fn channel(shard: ShardId, last_seq: LogSeq, config: LogConfig) -> (LogProducer, LogConsumer) {
    let slots = config.ring_chunks.max(1);
    let shared = Arc::new(Shared {
        shard,
        ready: ArrayQueue::new(slots),
        free: ArrayQueue::new(slots),
        outstanding: AtomicUsize::new(0),
        last_lost: AtomicU64::new(0),
        counters: Counters::default(),
        config,
    });
    let producer = LogProducer {
        shared: Arc::clone(&shared),
        current: Vec::new(),
        next_seq: last_seq.next(),
        losing: false,
    };
    let consumer = LogConsumer {
        shared,
        chunks: VecDeque::new(),
        cursor_chunk: 0,
        cursor_offset: 0,
        backlog: 0,
        floor: last_seq,
        max_drained: last_seq,
        reported_lost: 0,
    };
    (producer, consumer)
}

/// The shard's end of its log. Owned by the shard's core; `Send` so it can be moved there.
pub struct LogProducer {
    shared: Arc<Shared>,
    /// The chunk being filled; handed over by [`LogProducer::flush`] or when it is full.
    current: Vec<u8>,
    next_seq: LogSeq,
    /// The ring stayed full and records are being lost until room appears.
    losing: bool,
}

impl LogProducer {
    /// The shard this log belongs to.
    pub fn shard(&self) -> ShardId {
        self.shared.shard
    }

    /// The sequence number the next append will take.
    pub fn next_seq(&self) -> LogSeq {
        self.next_seq
    }

    /// Counters of this log.
    pub fn stats(&self) -> LogStats {
        self.shared.stats()
    }

    /// Logs `record` under the next sequence number, following the full-ring policy in the module
    /// documentation. Fails only for a record the format cannot carry (then no sequence number is used).
    pub fn append(&mut self, record: &Record<'_>) -> Result<Appended, EncodeError> {
        let len = record.encoded_len()?;
        let seq = self.next_seq;
        if !self.has_room(len) {
            let waited = !self.losing && self.wait_for_room(len);
            if !waited {
                self.lose(seq);
                return Ok(Appended::Lost(seq));
            }
        }
        self.losing = false;
        if !self.current.is_empty() && self.current.len() + len > self.current.capacity() {
            // Hand over a chunk rather than grow it (if the queue is full, it grows after all).
            self.flush();
        }
        if self.current.capacity() == 0 {
            self.current = self.shared.free.pop().unwrap_or_default();
            self.current.reserve(self.shared.config.chunk_bytes.max(len));
        }
        record.encode(self.shared.shard, seq, &mut self.current)?;
        self.next_seq = seq.next();
        self.shared.outstanding.fetch_add(len, Ordering::AcqRel);
        self.shared.counters.appended.fetch_add(1, Ordering::Relaxed);
        if self.current.len() >= self.shared.config.chunk_bytes {
            self.flush();
        }
        Ok(Appended::Logged(seq))
    }

    /// Whether records appended since the last successful [`LogProducer::flush`] wait here.
    pub fn has_unflushed(&self) -> bool {
        !self.current.is_empty()
    }

    /// Hands the records appended so far to the consumer (call once per poll round). Returns whether
    /// everything is handed over: if the hand-over queue is full the records stay here (still counted
    /// against the ring) and go with the next flush.
    pub fn flush(&mut self) -> bool {
        if self.current.is_empty() {
            return true;
        }
        let chunk = std::mem::take(&mut self.current);
        match self.shared.ready.push(chunk) {
            Ok(()) => true,
            Err(chunk) => {
                self.current = chunk;
                false
            }
        }
    }

    fn has_room(&self, len: usize) -> bool {
        self.shared.outstanding.load(Ordering::Acquire) + len <= self.shared.config.ring_bytes
    }

    /// Back-pressure: hands over what is pending and waits up to `full_wait` for room.
    fn wait_for_room(&mut self, len: usize) -> bool {
        let counters = &self.shared.counters;
        counters.full_events.fetch_add(1, Ordering::Relaxed);
        if len > self.shared.config.ring_bytes {
            return false;
        }
        let start = Instant::now();
        let deadline = start + self.shared.config.full_wait;
        let mut spins = 0u32;
        let fits = loop {
            self.flush();
            if self.has_room(len) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        };
        let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.counters.full_wait_nanos.fetch_add(waited, Ordering::Relaxed);
        fits
    }

    /// Gives up on `seq`: it stays unlogged, the gap is published and the standby marked for resync.
    fn lose(&mut self, seq: LogSeq) {
        let counters = &self.shared.counters;
        if !self.losing {
            self.losing = true;
            counters.resyncs_marked.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(shard = self.shared.shard.0, seq = seq.0, "replication log full: standby marked for resync");
        }
        counters.records_lost.fetch_add(1, Ordering::Relaxed);
        self.shared.last_lost.store(seq.0, Ordering::Release);
        self.next_seq = seq.next();
    }
}

/// The replication core's end of a shard's log: drains batches and keeps the backlog.
pub struct LogConsumer {
    shared: Arc<Shared>,
    /// Received chunks: those before the cursor are backlog, the rest wait to be drained.
    chunks: VecDeque<Vec<u8>>,
    cursor_chunk: usize,
    cursor_offset: usize,
    /// Bytes before the cursor.
    backlog: usize,
    /// Records at or before this are unusable for a resume (lost, or before this log began).
    floor: LogSeq,
    /// The highest sequence number ever drained (or the log's starting point).
    max_drained: LogSeq,
    /// The last `last_lost` reported as [`Drained::ResyncRequired`].
    reported_lost: u64,
}

impl LogConsumer {
    /// The shard this log belongs to.
    pub fn shard(&self) -> ShardId {
        self.shared.shard
    }

    /// Counters of this log.
    pub fn stats(&self) -> LogStats {
        self.shared.stats()
    }

    /// Bytes of shipped records held for partial resync.
    pub fn backlog_bytes(&self) -> usize {
        self.backlog
    }

    /// Appends up to `max_bytes` of whole records (at least one, however large) with consecutive
    /// sequence numbers to `out`, ready to be framed; or says the standby must resync.
    pub fn drain_batch(&mut self, max_bytes: usize, out: &mut Vec<u8>) -> Drained {
        if let Some(resync) = self.take_lost() {
            return resync;
        }
        self.receive_chunks();
        let mut first_seq = LogSeq::ZERO;
        let mut count = 0u32;
        let mut bytes = 0usize;
        while let Some((header, start)) = self.record_at_cursor() {
            if header.seq <= self.floor {
                self.advance(header.seq, header.len);
                continue;
            }
            if header.seq > self.max_drained.max(self.floor).next() {
                // A gap: records were lost after this chunk was handed over. Having received the chunk,
                // the loss is visible now; end the batch before it and report it.
                if count > 0 {
                    break;
                }
                if let Some(resync) = self.take_lost() {
                    return resync;
                }
                debug_assert!(false, "a gap in the log at {} without a loss", header.seq);
            }
            if count > 0 && (header.seq != LogSeq(first_seq.0 + u64::from(count)) || bytes + header.len > max_bytes) {
                break;
            }
            if count == 0 {
                first_seq = header.seq;
            }
            out.extend_from_slice(&self.chunks[self.cursor_chunk][start..start + header.len]);
            count += 1;
            bytes += header.len;
            self.advance(header.seq, header.len);
        }
        self.trim_backlog();
        if count == 0 {
            Drained::Empty
        } else {
            Drained::Batch { first_seq, count, bytes }
        }
    }

    /// Reports a loss the producer published since the last report, once.
    fn take_lost(&mut self) -> Option<Drained> {
        let lost = self.shared.last_lost.load(Ordering::Acquire);
        if lost <= self.reported_lost {
            return None;
        }
        self.reported_lost = lost;
        self.floor = self.floor.max(LogSeq(lost));
        self.drop_backlog();
        let shard = self.shared.shard.0;
        tracing::warn!(shard, through = lost, "replication log lost records: standby needs a full sync");
        Some(Drained::ResyncRequired { through: LogSeq(lost) })
    }

    /// Positions the log so the next batch starts right after `after`, the last record a standby applied,
    /// if every record since is still here (in the backlog or not yet drained); otherwise the standby needs
    /// a full sync. Resuming at the newest record (nothing to re-send) is fine.
    pub fn resume_from(&mut self, after: LogSeq) -> Result<(), FullSyncNeeded> {
        self.receive_chunks();
        // Everything up to the floor is accounted for: drained, lost, or before this log began.
        let mut newest = self.max_drained.max(self.floor);
        let mut oldest_after = None;
        let mut target = None;
        for (index, chunk) in self.chunks.iter().enumerate() {
            let mut offset = 0;
            while offset < chunk.len() {
                let header = record::peek_header(&chunk[offset..]).expect("the log wrote this record");
                if header.seq > self.floor {
                    oldest_after.get_or_insert(LogSeq(header.seq.0 - 1));
                    if header.seq == after.next() {
                        target = Some((index, offset));
                    }
                    newest = newest.max(header.seq);
                }
                offset += header.len;
            }
        }
        let oldest_after = oldest_after.unwrap_or(newest).max(self.floor);
        let position = match target {
            Some(position) if after >= self.floor => position,
            // The standby has everything this log holds: resume at the end.
            None if after == newest && after >= self.floor => (self.chunks.len(), 0),
            _ => return Err(FullSyncNeeded { after, oldest_after, newest }),
        };
        // Records skipped over by a forward move count as drained.
        while (self.cursor_chunk, self.cursor_offset) < position {
            let Some((header, _)) = self.record_at_cursor() else { break };
            self.advance(header.seq, header.len);
        }
        (self.cursor_chunk, self.cursor_offset) = position;
        self.backlog = self.chunks.iter().take(self.cursor_chunk).map(Vec::len).sum::<usize>() + self.cursor_offset;
        Ok(())
    }

    /// Moves chunks the producer handed over into the deque.
    fn receive_chunks(&mut self) {
        while let Some(chunk) = self.shared.ready.pop() {
            self.chunks.push_back(chunk);
        }
    }

    /// The header of the record at the cursor and its offset in the cursor's chunk.
    fn record_at_cursor(&mut self) -> Option<(record::RecordHeader, usize)> {
        loop {
            let chunk = self.chunks.get(self.cursor_chunk)?;
            if self.cursor_offset < chunk.len() {
                let header = record::peek_header(&chunk[self.cursor_offset..]).expect("the log wrote this record");
                return Some((header, self.cursor_offset));
            }
            self.cursor_chunk += 1;
            self.cursor_offset = 0;
        }
    }

    /// Steps the cursor over one record; the first time a record is passed, its bytes leave the ring.
    fn advance(&mut self, seq: LogSeq, len: usize) {
        self.cursor_offset += len;
        self.backlog += len;
        if seq > self.max_drained {
            self.max_drained = seq;
            self.shared.outstanding.fetch_sub(len, Ordering::AcqRel);
            self.shared.counters.drained.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns backlog chunks beyond the configured size to the producer.
    fn trim_backlog(&mut self) {
        while self.cursor_chunk > 0 {
            // Keep at least `backlog_bytes` (so at most one chunk more).
            if self.backlog - self.chunks[0].len() < self.shared.config.backlog_bytes {
                break;
            }
            self.recycle_front();
        }
    }

    /// Forgets the whole backlog (after a gap it can serve no resume).
    fn drop_backlog(&mut self) {
        while self.cursor_chunk > 0 {
            self.recycle_front();
        }
        self.backlog = self.cursor_offset;
    }

    fn recycle_front(&mut self) {
        let mut chunk = self.chunks.pop_front().expect("a chunk before the cursor");
        self.backlog -= chunk.len();
        self.cursor_chunk -= 1;
        chunk.clear();
        let _ = self.shared.free.push(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{decode, LoggedRecord};

    fn config(ring_bytes: usize, chunk_bytes: usize, backlog_bytes: usize) -> LogConfig {
        LogConfig { ring_bytes, chunk_bytes, ring_chunks: 64, backlog_bytes, full_wait: Duration::ZERO }
    }

    /// A SET whose value names its number: 16 header + 26 fields + 3 key + 4 value + 4 crc = 53 bytes.
    fn set(number: u32) -> Vec<u8> {
        format!("{number:04}").into_bytes()
    }

    fn append_set(producer: &mut LogProducer, number: u32) -> Appended {
        let value = set(number);
        producer.append(&Record::Set { key: b"key", flags: number, expiry: 0, cas: 1, value: &value }).unwrap()
    }

    /// Decodes the records of one drained batch into (seq, flags).
    fn records_of(bytes: &[u8]) -> Vec<(u64, u32)> {
        let mut rest = bytes;
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let (LoggedRecord { seq, record, .. }, len) = decode(rest).unwrap();
            let Record::Set { flags, .. } = record else { panic!("not a set") };
            seen.push((seq.0, flags));
            rest = &rest[len..];
        }
        seen
    }

    fn drain_all(consumer: &mut LogConsumer, max_bytes: usize) -> Vec<(u64, u32)> {
        let mut seen = Vec::new();
        loop {
            let mut out = Vec::new();
            match consumer.drain_batch(max_bytes, &mut out) {
                Drained::Empty => return seen,
                Drained::Batch { first_seq, count, bytes } => {
                    let batch = records_of(&out);
                    assert_eq!((batch[0].0, batch.len(), out.len()), (first_seq.0, count as usize, bytes));
                    seen.extend(batch);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn records_arrive_in_order_after_a_flush() {
        let (mut producer, mut consumer) = channel(ShardId(1), LogSeq::ZERO, config(1 << 20, 1 << 10, 0));
        for number in 1..=3 {
            assert_eq!(append_set(&mut producer, number), Appended::Logged(LogSeq(number.into())));
        }
        assert_eq!(consumer.drain_batch(1 << 20, &mut Vec::new()), Drained::Empty, "not flushed yet");
        producer.flush();
        assert_eq!(drain_all(&mut consumer, 1 << 20), vec![(1, 1), (2, 2), (3, 3)]);
        let stats = consumer.stats();
        assert_eq!((stats.appended, stats.drained, stats.outstanding_bytes), (3, 3, 0));
    }

    #[test]
    fn batches_respect_the_byte_budget_but_always_carry_one_record() {
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(1 << 20, 100, 0));
        for number in 1..=5 {
            append_set(&mut producer, number);
        }
        producer.flush();
        let mut out = Vec::new();
        assert_eq!(consumer.drain_batch(120, &mut out), Drained::Batch { first_seq: LogSeq(1), count: 2, bytes: 106 });
        out.clear();
        assert_eq!(consumer.drain_batch(1, &mut out), Drained::Batch { first_seq: LogSeq(3), count: 1, bytes: 53 });
        assert_eq!(drain_all(&mut consumer, 1000), vec![(4, 4), (5, 5)]);
    }

    #[test]
    fn a_log_that_continues_a_history_numbers_on_from_it() {
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq(41), config(1 << 20, 1 << 10, 1 << 20));
        assert_eq!(append_set(&mut producer, 1), Appended::Logged(LogSeq(42)));
        producer.flush();
        assert_eq!(drain_all(&mut consumer, 1000), vec![(42, 1)]);
        assert!(consumer.resume_from(LogSeq(40)).is_err(), "before this log began");
        assert_eq!(consumer.resume_from(LogSeq(41)), Ok(()));
    }

    #[test]
    fn a_full_ring_marks_the_standby_for_resync_and_counts_what_it_lost() {
        // Room for two 53-byte records.
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(106, 1 << 10, 1 << 20));
        assert_eq!(append_set(&mut producer, 1), Appended::Logged(LogSeq(1)));
        assert_eq!(append_set(&mut producer, 2), Appended::Logged(LogSeq(2)));
        assert_eq!(append_set(&mut producer, 3), Appended::Lost(LogSeq(3)));
        assert_eq!(append_set(&mut producer, 4), Appended::Lost(LogSeq(4)));
        let stats = producer.stats();
        assert_eq!((stats.full_events, stats.resyncs_marked, stats.records_lost), (1, 1, 2));

        let mut out = Vec::new();
        assert_eq!(consumer.drain_batch(1000, &mut out), Drained::ResyncRequired { through: LogSeq(4) });
        // Records before the gap are of no use to a standby that must full-sync; they leave the ring.
        assert_eq!(drain_all(&mut consumer, 1000), vec![]);
        assert_eq!(consumer.stats().outstanding_bytes, 0);
        // Room again: logging goes on after the gap, and only a resume after it is possible.
        assert_eq!(append_set(&mut producer, 5), Appended::Logged(LogSeq(5)));
        producer.flush();
        assert_eq!(drain_all(&mut consumer, 1000), vec![(5, 5)]);
        assert!(consumer.resume_from(LogSeq(2)).is_err());
        assert_eq!(consumer.resume_from(LogSeq(4)), Ok(()));
        assert_eq!(drain_all(&mut consumer, 1000), vec![(5, 5)], "re-sent from the backlog");
        assert_eq!(producer.stats().resyncs_marked, 1);
    }

    #[test]
    fn a_snapshot_taken_right_after_a_loss_can_be_followed_by_the_stream() {
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(53, 1 << 10, 1 << 20));
        assert_eq!(append_set(&mut producer, 1), Appended::Logged(LogSeq(1)));
        assert_eq!(append_set(&mut producer, 2), Appended::Lost(LogSeq(2)));
        assert_eq!(consumer.drain_batch(1000, &mut Vec::new()), Drained::ResyncRequired { through: LogSeq(2) });
        // A full sync's snapshot includes record 2; the stream goes on after it.
        assert_eq!(consumer.resume_from(LogSeq(2)), Ok(()));
        assert!(consumer.resume_from(LogSeq(1)).is_err());
        assert_eq!(append_set(&mut producer, 3), Appended::Logged(LogSeq(3)));
        producer.flush();
        assert_eq!(drain_all(&mut consumer, 1000), vec![(3, 3)]);
    }

    #[test]
    fn a_record_larger_than_the_ring_is_lost_not_waited_for() {
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(50, 1 << 10, 0));
        assert_eq!(append_set(&mut producer, 1), Appended::Lost(LogSeq(1)));
        assert_eq!(consumer.drain_batch(1000, &mut Vec::new()), Drained::ResyncRequired { through: LogSeq(1) });
    }

    #[test]
    fn back_pressure_waits_for_the_consumer_within_the_bound() {
        let mut config = config(106, 1 << 10, 0);
        config.full_wait = Duration::from_secs(10);
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config);
        append_set(&mut producer, 1);
        append_set(&mut producer, 2);
        let drainer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let seen = drain_all(&mut consumer, 1000);
            (seen, consumer)
        });
        assert_eq!(append_set(&mut producer, 3), Appended::Logged(LogSeq(3)), "waited for room");
        let (seen, mut consumer) = drainer.join().unwrap();
        assert_eq!(seen, vec![(1, 1), (2, 2)]);
        producer.flush();
        assert_eq!(drain_all(&mut consumer, 1000), vec![(3, 3)]);
        let stats = producer.stats();
        assert_eq!((stats.full_events, stats.resyncs_marked), (1, 0));
        assert!(stats.full_wait_nanos > 0);
    }

    #[test]
    fn a_standby_resumes_from_the_backlog_or_needs_a_full_sync() {
        // Chunks of two records; keep at least 212 bytes (four records) of backlog.
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(1 << 20, 106, 212));
        for number in 1..=10 {
            append_set(&mut producer, number);
        }
        producer.flush();
        assert_eq!(drain_all(&mut consumer, 1 << 20).len(), 10);
        assert!(consumer.backlog_bytes() >= 212 && consumer.backlog_bytes() <= 212 + 106);
        let err = consumer.resume_from(LogSeq(2)).unwrap_err();
        assert_eq!((err.after, err.newest), (LogSeq(2), LogSeq(10)));
        assert!(err.oldest_after > LogSeq(2) && err.oldest_after <= LogSeq(6));
        assert_eq!(consumer.resume_from(LogSeq(7)), Ok(()));
        assert_eq!(drain_all(&mut consumer, 1 << 20), vec![(8, 8), (9, 9), (10, 10)]);
        assert_eq!(consumer.resume_from(LogSeq(10)), Ok(()), "up to date: nothing to re-send");
        assert_eq!(drain_all(&mut consumer, 1 << 20), vec![]);
        assert!(consumer.resume_from(LogSeq(11)).is_err(), "ahead of this log: another history");
        assert_eq!(consumer.stats().drained, 10, "re-sent records are not counted twice");
    }

    #[test]
    fn a_snapshot_point_ahead_of_the_cursor_skips_forward() {
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(1 << 20, 1 << 10, 1 << 20));
        for number in 1..=5 {
            append_set(&mut producer, number);
        }
        producer.flush();
        assert_eq!(consumer.resume_from(LogSeq(3)), Ok(()));
        assert_eq!(drain_all(&mut consumer, 1 << 20), vec![(4, 4), (5, 5)]);
        assert_eq!(consumer.stats().outstanding_bytes, 0);
    }

    #[test]
    fn a_new_log_resumes_a_standby_with_nothing_applied() {
        let (_producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, LogConfig::default());
        assert_eq!(consumer.resume_from(LogSeq::ZERO), Ok(()));
    }

    #[test]
    fn a_producer_thread_and_a_consumer_thread_deliver_every_record_in_order() {
        const RECORDS: u32 = 50_000;
        let config = LogConfig {
            ring_bytes: 4096,
            chunk_bytes: 512,
            ring_chunks: 8,
            backlog_bytes: 1024,
            full_wait: Duration::from_secs(30),
        };
        let (mut producer, mut consumer) = channel(ShardId(3), LogSeq::ZERO, config);
        let shard = std::thread::spawn(move || {
            for number in 1..=RECORDS {
                assert_eq!(append_set(&mut producer, number), Appended::Logged(LogSeq(number.into())));
                if number % 7 == 0 {
                    producer.flush();
                }
            }
            while !producer.flush() {
                std::thread::yield_now();
            }
            producer.stats()
        });
        let shipper = std::thread::spawn(move || {
            let mut expected = 1u32;
            let mut out = Vec::new();
            while expected <= RECORDS {
                out.clear();
                match consumer.drain_batch(700, &mut out) {
                    Drained::Empty => std::thread::yield_now(),
                    Drained::Batch { .. } => {
                        for (seq, flags) in records_of(&out) {
                            assert_eq!((seq, flags), (u64::from(expected), expected));
                            expected += 1;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            consumer.stats()
        });
        let produced = shard.join().unwrap();
        let consumed = shipper.join().unwrap();
        assert_eq!(produced.records_lost, 0);
        assert_eq!(consumed.drained, u64::from(RECORDS));
        assert_eq!(consumed.outstanding_bytes, 0);
    }

    #[test]
    fn a_slow_consumer_loses_records_visibly_never_silently() {
        // Two threads, a tiny ring and no patience: whatever is not delivered is reported as a loss.
        const RECORDS: u32 = 20_000;
        let (mut producer, mut consumer) = channel(ShardId(0), LogSeq::ZERO, config(600, 200, 0));
        let shard = std::thread::spawn(move || {
            for number in 1..=RECORDS {
                append_set(&mut producer, number);
                producer.flush();
            }
            producer.stats()
        });
        let mut delivered = Vec::new();
        let mut resyncs = 0;
        let mut last_lost = 0;
        let mut out = Vec::new();
        loop {
            out.clear();
            match consumer.drain_batch(300, &mut out) {
                Drained::Batch { .. } => delivered.extend(records_of(&out)),
                Drained::ResyncRequired { through } => {
                    resyncs += 1;
                    last_lost = through.0;
                }
                Drained::Empty if shard.is_finished() => {
                    if consumer.drain_batch(300, &mut out) == Drained::Empty {
                        break;
                    }
                    delivered.extend(records_of(&out));
                }
                Drained::Empty => std::thread::yield_now(),
            }
        }
        let stats = shard.join().unwrap();
        assert!(delivered.windows(2).all(|pair| pair[0].0 < pair[1].0), "in order");
        // One loss episode may be reported more than once (as its end moves on); every report is one
        // the consumer saw, and there is a report exactly when something was lost.
        assert_eq!(resyncs > 0, stats.records_lost > 0);
        assert_eq!(stats.resyncs_marked > 0, stats.records_lost > 0);
        assert!(delivered.len() as u64 + stats.records_lost <= u64::from(RECORDS));
        if stats.records_lost > 0 {
            assert!(last_lost > 0);
        }
        // Every record is either delivered, lost and counted, or (behind a gap) discarded as useless.
        assert_eq!(stats.appended + stats.records_lost, u64::from(RECORDS));
    }
}
