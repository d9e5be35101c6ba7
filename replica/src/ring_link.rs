//! The data stream in a receive ring written one-sided: the RDMA transport's logic, independent of verbs.
//!
//! The active's [`RingSink`] cuts its queue of wire messages into [`crate::ring`] slots (a piece of the
//! stream per push, split across slots as needed) and has them written into the standby's ring by a
//! [`RingPort`]: with verbs, RDMA WRITEs, the last of each push a WRITE_WITH_IMM whose immediate data
//! is the doorbell. It reads the standby's credits from its own credit region and never pushes beyond
//! them. The standby's [`RingSource`] polls the ring through a [`RingHome`], feeds every checked slot
//! payload to the connection's [`MessageReader`] (the same reader, and the same checks, as TCP), and
//! writes its consumer position back as a credit.
//!
//! One ring per connection, not one per shard: the stream interleaves shards' batches and snapshot
//! chunks in the order the shipper chose, the receiver already hands each message to its shard's queue
//! and stops reading when one is full (as with TCP), so per-shard rings would add queue pairs, regions
//! and credit words without adding independence; one ring keeps the TCP and RDMA streams identical.
//!
//! - [`RingPort`], [`RingHome`]: what the transport needs of the hardware; [`crate::rdma::link`]
//!   implements them over verbs (feature `rdma`), [`memory`] over plain shared memory for tests.
//! - [`RingSink`], [`RingSource`]: the [`StreamSink`] and [`StreamSource`] over them.

use crate::ring::{RingError, RingLayout, RingMemory, RingReader, RingWriter, Polled, CREDIT_LEN};
use crate::transport::{LinkError, LinkStats, StreamSink, StreamSource};
use crate::wire::MessageReader;

/// The active's one-sided access to a standby's ring, and the credit region the standby writes.
pub trait RingPort {
    /// Writes `bytes` to `offset` of the standby's ring; `doorbell` makes it a WRITE_WITH_IMM.
    fn write(&mut self, offset: usize, bytes: &[u8], doorbell: Option<u32>) -> Result<(), LinkError>;
    /// Writes that can be posted now (the send queue's room).
    fn room(&self) -> usize;
    /// Takes the completions that arrived; a failed one is an error.
    fn poll(&mut self) -> Result<(), LinkError>;
    /// The credit record as the standby last wrote it (possibly torn: the ring checks it).
    fn credit(&self) -> [u8; CREDIT_LEN];
    fn stats(&self) -> LinkStats;
}

/// The standby's ring memory, its doorbells, and its one-sided path to the active's credit region.
pub trait RingHome {
    type Memory: RingMemory + ?Sized;
    fn memory(&self) -> &Self::Memory;
    /// Appends the doorbells (immediate data) received since the last call; a failed completion is an
    /// error.
    fn doorbells(&mut self, out: &mut Vec<u32>) -> Result<(), LinkError>;
    /// Writes a credit record into the active's credit region.
    fn write_credit(&mut self, record: &[u8; CREDIT_LEN]) -> Result<(), LinkError>;
    fn stats(&self) -> LinkStats;
}

/// Most stream bytes in one push (several slots; each push ends with a doorbell).
const PUSH_SLOTS: usize = 16;

/// The active's end: a [`StreamSink`] into a standby's ring.
pub struct RingSink<P: RingPort> {
    writer: RingWriter,
    /// The local copy of the ring's region that slots are encoded into before they are written.
    mirror: Vec<u8>,
    queue: Vec<u8>,
    /// Bytes at the front of `queue` already pushed.
    pushed: usize,
    port: P,
    high_water: usize,
}

impl<P: RingPort> RingSink<P> {
    pub fn new(layout: RingLayout, ring_id: u64, port: P) -> RingSink<P> {
        RingSink {
            writer: RingWriter::new(layout, ring_id),
            mirror: vec![0; layout.region_len()],
            queue: Vec::new(),
            pushed: 0,
            port,
            high_water: layout.region_len(),
        }
    }

    pub fn port(&mut self) -> &mut P {
        &mut self.port
    }

    fn take_credit(&mut self) -> Result<(), LinkError> {
        self.writer.take_credit(&self.port.credit())?;
        Ok(())
    }
}

impl<P: RingPort> StreamSink for RingSink<P> {
    fn room(&self) -> usize {
        self.high_water.saturating_sub(self.queue.len() - self.pushed)
    }

    fn queue(&mut self) -> &mut Vec<u8> {
        &mut self.queue
    }

    fn pump(&mut self) -> Result<bool, LinkError> {
        self.port.poll()?;
        self.take_credit()?;
        let max_payload = self.writer.layout().max_payload();
        let mut moved = false;
        while self.pushed < self.queue.len() && self.port.room() >= 2 {
            let free = self.writer.free_slots();
            let len = (self.queue.len() - self.pushed).min(free.clamp(1, PUSH_SLOTS) * max_payload);
            let piece = &self.queue[self.pushed..self.pushed + len];
            let pushed = match self.writer.push(piece, &mut self.mirror) {
                Ok(pushed) => pushed,
                // Out of credits (counted as a stall): the next pump looks again.
                Err(RingError::Full { .. }) => break,
                Err(error) => return Err(error.into()),
            };
            let spans = pushed.spans();
            for (index, span) in spans.iter().enumerate() {
                let doorbell = (index + 1 == spans.len()).then(|| pushed.imm());
                self.port.write(span.start, &self.mirror[span.clone()], doorbell)?;
            }
            self.pushed += len;
            moved = true;
        }
        if self.pushed == self.queue.len() {
            self.queue.clear();
            self.pushed = 0;
        } else if self.pushed > (1 << 20) {
            self.queue.drain(..self.pushed);
            self.pushed = 0;
        }
        Ok(moved)
    }

    fn wants_poll(&self) -> bool {
        self.pushed < self.queue.len()
    }

    fn stats(&self) -> LinkStats {
        LinkStats { credit_stalls: self.writer.stalls(), ..self.port.stats() }
    }
}

/// The standby's end: a [`StreamSource`] out of its ring.
pub struct RingSource<H: RingHome> {
    reader: RingReader,
    home: H,
    doorbells: Vec<u32>,
    slots: u64,
}

impl<H: RingHome> RingSource<H> {
    /// `home`'s ring memory must start zeroed (or hold only other ring ids' slots).
    pub fn new(layout: RingLayout, ring_id: u64, home: H) -> RingSource<H> {
        RingSource { reader: RingReader::new(layout, ring_id), home, doorbells: Vec::new(), slots: 0 }
    }

    pub fn home(&mut self) -> &mut H {
        &mut self.home
    }
}

impl<H: RingHome> StreamSource for RingSource<H> {
    fn receive(&mut self, reader: &mut MessageReader, budget: usize) -> Result<usize, LinkError> {
        self.doorbells.clear();
        self.home.doorbells(&mut self.doorbells)?;
        for &imm in &self.doorbells {
            self.reader.note_imm(imm);
        }
        let mut got = 0;
        while got < budget {
            match self.reader.poll(self.home.memory())? {
                Polled::Ready { payload, .. } => {
                    reader.feed(payload);
                    got += payload.len();
                    self.slots += 1;
                }
                Polled::Empty | Polled::Incomplete(_) => break,
            }
        }
        if let Some(record) = self.reader.credit() {
            self.home.write_credit(&record)?;
        }
        Ok(got)
    }

    fn wants_poll(&self) -> bool {
        true
    }

    fn stats(&self) -> LinkStats {
        LinkStats { slots: self.slots, incomplete_polls: self.reader.incomplete_polls(), ..self.home.stats() }
    }
}

/// The ring over plain shared memory: writes land whole and at once, or never (a "dead" link), or
/// corrupted. The test double for the transport's logic; the verbs implementation is tested in guests.
pub mod memory {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What both ends share: the standby's ring region and the active's credit region.
    #[derive(Default)]
    struct Shared {
        ring: Vec<u8>,
        credit: [u8; CREDIT_LEN],
        /// Doorbells not yet taken by the standby.
        doorbells: Vec<u32>,
        /// The link failed: both ends see an error at their next call (as a QP in the error state).
        failed: bool,
        /// Flip a byte of the ring at this offset right after the next write covering it.
        corrupt_at: Option<usize>,
    }

    /// The active's port.
    pub struct MemoryPort {
        shared: Arc<Mutex<Shared>>,
        stats: LinkStats,
    }

    /// The standby's ring.
    pub struct MemoryHome {
        ring: SharedRing,
        stats: LinkStats,
    }

    /// The shared ring region, read through [`RingMemory`] (a lock per read).
    pub struct SharedRing(Arc<Mutex<Shared>>);

    impl RingMemory for SharedRing {
        fn region_len(&self) -> usize {
            self.0.lock().unwrap().ring.len()
        }

        fn read(&self, offset: usize, out: &mut [u8]) {
            out.copy_from_slice(&self.0.lock().unwrap().ring[offset..offset + out.len()]);
        }
    }

    /// Handles to break the link from a test.
    #[derive(Clone)]
    pub struct Faults(Arc<Mutex<Shared>>);

    impl Faults {
        /// Every later call on either end fails (a queue pair forced into the error state).
        pub fn fail(&self) {
            self.0.lock().unwrap().failed = true;
        }

        /// The byte at `offset` of the ring is damaged by the next write that covers it.
        pub fn corrupt_at(&self, offset: usize) {
            self.0.lock().unwrap().corrupt_at = Some(offset);
        }
    }

    /// A connected pair over a zeroed ring of `layout`.
    pub fn pair(layout: RingLayout, ring_id: u64) -> (RingSink<MemoryPort>, RingSource<MemoryHome>, Faults) {
        let shared = Arc::new(Mutex::new(Shared { ring: vec![0; layout.region_len()], ..Shared::default() }));
        let port = MemoryPort { shared: shared.clone(), stats: LinkStats::default() };
        let home = MemoryHome { ring: SharedRing(shared.clone()), stats: LinkStats::default() };
        (RingSink::new(layout, ring_id, port), RingSource::new(layout, ring_id, home), Faults(shared))
    }

    fn failed() -> LinkError {
        LinkError::Rdma("Work Request Flushed Error (the memory link was failed)".into())
    }

    impl RingPort for MemoryPort {
        fn write(&mut self, offset: usize, bytes: &[u8], doorbell: Option<u32>) -> Result<(), LinkError> {
            let mut shared = self.shared.lock().unwrap();
            if shared.failed {
                self.stats.errors += 1;
                return Err(failed());
            }
            shared.ring[offset..offset + bytes.len()].copy_from_slice(bytes);
            if let Some(at) = shared.corrupt_at.filter(|at| (offset..offset + bytes.len()).contains(at)) {
                shared.ring[at] ^= 0x40;
                shared.corrupt_at = None;
            }
            shared.doorbells.extend(doorbell);
            self.stats.writes_posted += 1;
            self.stats.completions += 1;
            Ok(())
        }

        fn room(&self) -> usize {
            usize::MAX
        }

        fn poll(&mut self) -> Result<(), LinkError> {
            if self.shared.lock().unwrap().failed {
                return Err(failed());
            }
            Ok(())
        }

        fn credit(&self) -> [u8; CREDIT_LEN] {
            self.shared.lock().unwrap().credit
        }

        fn stats(&self) -> LinkStats {
            self.stats
        }
    }

    impl RingHome for MemoryHome {
        type Memory = SharedRing;

        fn memory(&self) -> &SharedRing {
            &self.ring
        }

        fn doorbells(&mut self, out: &mut Vec<u32>) -> Result<(), LinkError> {
            let mut shared = self.ring.0.lock().unwrap();
            if shared.failed {
                self.stats.errors += 1;
                return Err(failed());
            }
            self.stats.doorbells += shared.doorbells.len() as u64;
            self.stats.completions += shared.doorbells.len() as u64;
            out.append(&mut shared.doorbells);
            Ok(())
        }

        fn write_credit(&mut self, record: &[u8; CREDIT_LEN]) -> Result<(), LinkError> {
            let mut shared = self.ring.0.lock().unwrap();
            if shared.failed {
                self.stats.errors += 1;
                return Err(failed());
            }
            shared.credit = *record;
            self.stats.writes_posted += 1;
            Ok(())
        }

        fn stats(&self) -> LinkStats {
            self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::pair;
    use super::*;
    use crate::ids::{LogSeq, ShardId};
    use crate::record::Record;
    use crate::wire::{self, Kind, Message, WireError};

    const RING_ID: u64 = 0x0005_eed0_fa11;

    /// Queues Batch messages of `records` one-record frames with values of `value_len` bytes.
    fn queue_batches(sink: &mut impl StreamSink, first: u64, records: u64, value_len: usize) {
        for seq in first..first + records {
            let key = format!("key{seq}");
            let value = vec![seq as u8; value_len];
            let mut encoded = Vec::new();
            Record::Set { key: key.as_bytes(), flags: 0, expiry: 0, cas: seq, value: &value }.encode(ShardId(1), LogSeq(seq), &mut encoded).unwrap();
            let out = sink.queue();
            let start = wire::begin(Kind::Batch, out);
            crate::frame::encode_frame(ShardId(1), LogSeq(seq), 1, &encoded, out).unwrap();
            wire::finish(out, start);
        }
    }

    fn batches(reader: &mut MessageReader) -> Result<Vec<u64>, WireError> {
        let mut seqs = Vec::new();
        while let Some(message) = reader.next_message()? {
            let Message::Batch(frame) = message else { panic!("only batches were sent") };
            seqs.extend(frame.records().map(|r| r.seq.0));
        }
        Ok(seqs)
    }

    #[test]
    fn the_stream_crosses_a_small_ring_in_order_with_credit_stalls() {
        // 8 slots of 128 bytes: far less than the stream, whose messages also straddle slots.
        let layout = RingLayout::new(128, 8).unwrap();
        let (mut sink, mut source, _) = pair(layout, RING_ID);
        queue_batches(&mut sink, 1, 300, 90);
        let mut reader = MessageReader::new(1 << 20);
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            sink.pump().unwrap();
            // A small budget: the standby takes a few slots at a time.
            source.receive(&mut reader, 300).unwrap();
            seen.extend(batches(&mut reader).unwrap());
            if !sink.wants_poll() && seen.len() == 300 {
                break;
            }
        }
        assert_eq!(seen, (1..=300).collect::<Vec<_>>());
        let stats = sink.stats();
        assert!(stats.credit_stalls > 10, "{stats:?}");
        assert!(stats.writes_posted > 0 && source.stats().doorbells > 0 && source.stats().slots > 300, "{:?}", source.stats());
    }

    #[test]
    fn a_standby_that_stops_reading_stops_the_writer_without_losing_anything() {
        let layout = RingLayout::new(256, 4).unwrap();
        let (mut sink, mut source, _) = pair(layout, RING_ID);
        queue_batches(&mut sink, 1, 50, 100);
        for _ in 0..20 {
            sink.pump().unwrap();
        }
        // The ring holds at most 4 slots: the rest waits in the queue, and the sink says so.
        assert!(sink.wants_poll());
        assert!(sink.room() < layout.region_len());
        let mut reader = MessageReader::new(1 << 20);
        let mut seen = Vec::new();
        while seen.len() < 50 {
            source.receive(&mut reader, usize::MAX).unwrap();
            seen.extend(batches(&mut reader).unwrap());
            sink.pump().unwrap();
        }
        assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn a_slot_damaged_after_its_doorbell_ends_the_stream_and_nothing_after_it_is_applied() {
        let layout = RingLayout::new(256, 8).unwrap();
        let (mut sink, mut source, faults) = pair(layout, RING_ID);
        queue_batches(&mut sink, 1, 3, 20);
        sink.pump().unwrap();
        let mut reader = MessageReader::new(1 << 20);
        source.receive(&mut reader, usize::MAX).unwrap();
        assert_eq!(batches(&mut reader).unwrap(), vec![1, 2, 3]);
        // The next push's first slot is damaged in the middle of its payload.
        let next = sink.writer.written().next();
        let next_slot = layout.slot_offset(next);
        faults.corrupt_at(next_slot + 40);
        queue_batches(&mut sink, 4, 3, 20);
        sink.pump().unwrap();
        let result = source.receive(&mut reader, usize::MAX);
        assert!(matches!(result, Err(LinkError::Ring(RingError::Corrupt { seq, .. })) if seq == next.0), "{result:?}");
        assert_eq!(batches(&mut reader).unwrap(), Vec::<u64>::new(), "nothing of the damaged slot was fed");
    }

    #[test]
    fn a_failed_link_is_an_error_at_both_ends() {
        let layout = RingLayout::new(256, 8).unwrap();
        let (mut sink, mut source, faults) = pair(layout, RING_ID);
        faults.fail();
        queue_batches(&mut sink, 1, 1, 10);
        assert!(matches!(sink.pump(), Err(LinkError::Rdma(_))));
        assert!(matches!(source.receive(&mut MessageReader::new(1 << 20), usize::MAX), Err(LinkError::Rdma(_))));
    }

    #[test]
    fn a_ring_left_by_an_earlier_connection_is_not_read_as_this_ones() {
        let layout = RingLayout::new(256, 8).unwrap();
        let (mut old_sink, mut old_source, _) = pair(layout, RING_ID);
        queue_batches(&mut old_sink, 1, 5, 20);
        old_sink.pump().unwrap();
        old_source.receive(&mut MessageReader::new(1 << 20), usize::MAX).unwrap();
        // A new connection over the same (unzeroed) memory with another ring id: the old slots carry
        // ring seqs 1.. too, but their checks are seeded with the old id.
        let ring = old_source.home().memory();
        let mut copy = vec![0u8; layout.region_len()];
        ring.read(0, &mut copy);
        let mut reader = RingReader::new(layout, RING_ID + 1);
        let polled = reader.poll(&copy[..]);
        assert!(matches!(polled, Ok(Polled::Incomplete(_))), "{polled:?}");
    }
}
