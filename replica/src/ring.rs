//! The receive ring of one shard: fixed-size slots in a byte region that one side writes (the active,
//! with one-sided RDMA WRITEs) and the other polls (the standby), with flow control by credits.
//!
//! Nothing here does I/O. The writer encodes slots into a local mirror of the region and says which
//! byte ranges to transfer; the reader reads the region through [`RingMemory`], which another party
//! writes while it reads. That keeps the whole protocol testable without a NIC: the tests below move the
//! bytes through a simulated memory that lands every write in pieces, in any order.
//!
//! ## The slot
//!
//! The region is `slot_count` slots of `slot_size` bytes (a multiple of 8). Ring sequence numbers
//! ([`RingSeq`]) start at 1; sequence `s` lives in slot `(s - 1) % slot_count`. All integers
//! little-endian:
//!
//! ```text
//! 0        seq      u64   the slot's ring sequence number
//! 8        len      u32   payload bytes (1 ..= slot_size - 32)
//! 12       reserved u32   0
//! 16       check    u64   XXH3-64, seeded with the ring id, of bytes 0..16 and the padded payload
//! 24       payload  [len], zero-padded to a multiple of 8
//! 24+pad   seq      u64   the sequence again: the slot's last bytes
//! ```
//!
//! The check is not a CRC32C like the records' on purpose: the payload is made of frames and records
//! that each end with their own CRC32C, and a CRC over a message followed by its own CRC (same
//! polynomial) comes out the same whatever the message was. A slot CRC32C would not see a frame header
//! or a record of the previous lap left in place under a new slot header (the property test below
//! found exactly that before the change).
//!
//! A slot is applied only when its head sequence, its trailer sequence and the expected sequence agree
//! and the check holds. RDMA does not promise in which order the bytes of one WRITE become visible, so
//! the trailer is only a cheap "probably complete" test; the check, which covers every byte the
//! WRITE carries except the trailer, is what makes a torn slot ([`Polled::Incomplete`]) impossible to
//! apply. The ring id (agreed per connection) seeds the check, so a slot left in a reused region
//! by an earlier connection is never taken for a new one.
//!
//! The payload is a piece of the batch stream: batch frames exactly as [`crate::frame`] encodes them for
//! TCP. A frame that fits a slot takes one slot; a larger one is **split** across consecutive slots
//! (all reserved at once), and the reader's [`crate::frame::FrameDecoder`] reassembles it as it does a
//! TCP stream. A frame needing more slots than the ring has is refused ([`RingError::TooLarge`]).
//!
//! ## Credits and the doorbell
//!
//! The writer never overwrites a slot the reader has not consumed: it knows the reader's consumer
//! position (every slot through it is free), which the reader writes back as a [`CREDIT_LEN`]-byte
//! record into a small credit region of the writer's. The record carries the position and a check word,
//! so a torn or stale credit write is ignored, never believed ([`RingWriter::take_credit`]).
//!
//! The writer may also tell the reader how far it has written: the immediate data of a WRITE_WITH_IMM
//! (the low 32 bits of the last sequence, [`Pushed::imm`]). RC delivers it only after that WRITE's and
//! every earlier WRITE's bytes are placed, so from then on an incomplete slot at or before that sequence
//! is corruption ([`RingError::Corrupt`]), not a write in progress.
//!
//! - [`RingLayout`]: slot size and count, where a sequence lives.
//! - [`RingWriter`]: the active's side: [`RingWriter::push`], credits, stalls.
//! - [`RingReader`]: the standby's side: [`RingReader::poll`], [`RingReader::credit`], the doorbell.
//! - [`RingMemory`]: how the reader reads a region someone else writes.

use std::ops::Range;

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

/// Bytes before a slot's payload: sequence, length, reserved, check.
pub const SLOT_HEADER_LEN: usize = 24;
/// Bytes after a slot's (padded) payload: the sequence again.
pub const SLOT_TRAILER_LEN: usize = 8;
/// Bytes of a credit record: the consumer position and its check word.
pub const CREDIT_LEN: usize = 16;
/// Mixed into a credit record's check word with the ring id ("TCREDIT!").
const CREDIT_SALT: u64 = 0x5443_5245_4449_5421;

/// A position in one ring: slots are written 1, 2, 3 ...; `ZERO` is "nothing yet".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RingSeq(pub u64);

impl RingSeq {
    pub const ZERO: RingSeq = RingSeq(0);

    pub fn next(self) -> RingSeq {
        RingSeq(self.0 + 1)
    }
}

/// Why the ring refused something. [`RingError::Full`] is back-pressure (try again after a credit);
/// the others end the connection (the standby then resyncs; nothing after them is applied).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RingError {
    #[error("ring layout: {0}")]
    Layout(&'static str),
    #[error("an empty payload has no slot")]
    EmptyPayload,
    #[error("a payload of {len} bytes needs more slots than the ring has (at most {max} bytes)")]
    TooLarge { len: usize, max: usize },
    #[error("ring full: {needed} slots needed, {free} free")]
    Full { needed: usize, free: usize },
    #[error("slot {slot} holds ring seq {found}; expected {expected} or the lap before")]
    OutOfSequence { slot: usize, found: u64, expected: u64 },
    #[error("ring seq {seq} was committed by the writer but its slot is {state:?}")]
    Corrupt { seq: u64, state: Incomplete },
    #[error("ring seq {seq} was overwritten while it was read")]
    Overrun { seq: u64 },
    #[error("the credit says ring seq {consumed} was consumed; only {written} were written")]
    CreditBeyondWritten { consumed: u64, written: u64 },
}

/// Slot size and count of one ring (both ends must agree; they travel over the control channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    slot_size: usize,
    slot_count: usize,
}

impl RingLayout {
    /// `slot_size`: a multiple of 8 with room for at least 8 payload bytes, at most 4 GiB;
    /// `slot_count`: at least 2.
    pub fn new(slot_size: usize, slot_count: usize) -> Result<RingLayout, RingError> {
        if !slot_size.is_multiple_of(8) {
            return Err(RingError::Layout("slot size is not a multiple of 8"));
        }
        if slot_size < SLOT_HEADER_LEN + 8 + SLOT_TRAILER_LEN {
            return Err(RingError::Layout("slot size leaves less than 8 payload bytes"));
        }
        if u32::try_from(slot_size).is_err() {
            return Err(RingError::Layout("slot size above 4 GiB"));
        }
        if slot_count < 2 {
            return Err(RingError::Layout("fewer than 2 slots"));
        }
        if slot_size.checked_mul(slot_count).is_none() {
            return Err(RingError::Layout("region size overflows"));
        }
        Ok(RingLayout { slot_size, slot_count })
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub fn slot_count(&self) -> usize {
        self.slot_count
    }

    /// Bytes of the whole region.
    pub fn region_len(&self) -> usize {
        self.slot_size * self.slot_count
    }

    /// Most payload bytes one slot carries.
    pub fn max_payload(&self) -> usize {
        self.slot_size - SLOT_HEADER_LEN - SLOT_TRAILER_LEN
    }

    /// The slot index of `seq` (which must not be `ZERO`).
    pub fn slot_of(&self, seq: RingSeq) -> usize {
        ((seq.0 - 1) % self.slot_count as u64) as usize
    }

    /// Where `seq`'s slot starts in the region.
    pub fn slot_offset(&self, seq: RingSeq) -> usize {
        self.slot_of(seq) * self.slot_size
    }

    /// Slots a payload of `len` bytes takes.
    pub fn slots_for(&self, len: usize) -> usize {
        len.div_ceil(self.max_payload()).max(1)
    }

    /// What a slot that held nothing yet or the lap before `seq` shows as its sequence.
    fn previous_lap(&self, seq: RingSeq) -> u64 {
        seq.0.saturating_sub(self.slot_count as u64)
    }
}

/// Bytes of a slot holding `len` payload bytes: header, padded payload, trailer.
fn slot_extent(len: usize) -> usize {
    SLOT_HEADER_LEN + len.next_multiple_of(8) + SLOT_TRAILER_LEN
}

/// The slot check: XXH3-64 seeded with the ring id, over seq, len and reserved, then the padded payload.
fn slot_check(ring_id: u64, head: &[u8], padded_payload: &[u8]) -> u64 {
    let mut hasher = Xxh3::with_seed(ring_id);
    hasher.update(head);
    hasher.update(padded_payload);
    hasher.digest()
}

/// Encodes one slot at the start of `out` (at least [`slot_extent`] bytes); returns its extent.
fn encode_slot(ring_id: u64, seq: RingSeq, payload: &[u8], out: &mut [u8]) -> usize {
    let padded = payload.len().next_multiple_of(8);
    out[0..8].copy_from_slice(&seq.0.to_le_bytes());
    out[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[12..16].fill(0);
    let body = &mut out[SLOT_HEADER_LEN..SLOT_HEADER_LEN + padded];
    body[..payload.len()].copy_from_slice(payload);
    body[payload.len()..].fill(0);
    let check = slot_check(ring_id, &out[0..16], &out[SLOT_HEADER_LEN..SLOT_HEADER_LEN + padded]);
    out[16..24].copy_from_slice(&check.to_le_bytes());
    let trailer = SLOT_HEADER_LEN + padded;
    out[trailer..trailer + SLOT_TRAILER_LEN].copy_from_slice(&seq.0.to_le_bytes());
    slot_extent(payload.len())
}

/// The byte region a reader polls, written by someone else meanwhile (the NIC, in the RDMA transport).
///
/// Implementations copy out; the reader validates and hands out only its own copy, so bytes that change
/// after the check are never the bytes applied.
pub trait RingMemory {
    /// Bytes of the region.
    fn region_len(&self) -> usize;
    /// Copies `out.len()` bytes starting at `offset`.
    fn read(&self, offset: usize, out: &mut [u8]);
    /// The little-endian word at `offset` (a multiple of 8), read as one access where the memory can.
    fn read_u64(&self, offset: usize) -> u64 {
        let mut word = [0u8; 8];
        self.read(offset, &mut word);
        u64::from_le_bytes(word)
    }
}

impl RingMemory for [u8] {
    fn region_len(&self) -> usize {
        self.len()
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self[offset..offset + out.len()]);
    }
}

/// What [`RingWriter::push`] encoded: the sequences used and the mirror's byte ranges to transfer to
/// the same offsets of the peer's region (one range, or two when the ring wrapped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub first: RingSeq,
    pub last: RingSeq,
    spans: [Range<usize>; 2],
    span_count: usize,
}

impl Pushed {
    /// The byte ranges of the region to write, in order.
    pub fn spans(&self) -> &[Range<usize>] {
        &self.spans[..self.span_count]
    }

    /// The immediate data for a WRITE_WITH_IMM that commits through `last`.
    pub fn imm(&self) -> u32 {
        self.last.0 as u32
    }
}

/// The writing (active) side of one ring.
#[derive(Debug)]
pub struct RingWriter {
    layout: RingLayout,
    ring_id: u64,
    /// The next sequence to write.
    next: RingSeq,
    /// The reader's consumer position as last credited: every slot through it may be overwritten.
    consumed: RingSeq,
    /// The last push was refused for lack of credits (a stall lasts until a push succeeds).
    stalled: bool,
    stalls: u64,
}

impl RingWriter {
    /// A writer for a fresh ring (the reader expects ring seq 1 first), tagged with `ring_id`.
    pub fn new(layout: RingLayout, ring_id: u64) -> RingWriter {
        RingWriter { layout, ring_id, next: RingSeq(1), consumed: RingSeq::ZERO, stalled: false, stalls: 0 }
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The last sequence written (`ZERO` before the first).
    pub fn written(&self) -> RingSeq {
        RingSeq(self.next.0 - 1)
    }

    /// The reader's consumer position as last credited.
    pub fn consumed(&self) -> RingSeq {
        self.consumed
    }

    /// Slots that may be written now.
    pub fn free_slots(&self) -> usize {
        self.layout.slot_count - (self.written().0 - self.consumed.0) as usize
    }

    /// Times the writer ran out of credits (each stall counts once, however often the push is retried).
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// Encodes `payload` (a piece of the batch stream, usually one whole frame) into the slots after the
    /// last one written, in `mirror` (the local copy of the region: [`RingLayout::region_len`] bytes),
    /// splitting it across consecutive slots when it is larger than one. Writes nothing and returns
    /// [`RingError::Full`] when the credits do not cover every slot it needs. Allocates nothing.
    pub fn push(&mut self, payload: &[u8], mirror: &mut [u8]) -> Result<Pushed, RingError> {
        assert_eq!(mirror.len(), self.layout.region_len(), "the mirror is the size of the ring's region");
        if payload.is_empty() {
            return Err(RingError::EmptyPayload);
        }
        let needed = self.layout.slots_for(payload.len());
        if needed > self.layout.slot_count {
            let max = self.layout.slot_count * self.layout.max_payload();
            return Err(RingError::TooLarge { len: payload.len(), max });
        }
        let free = self.free_slots();
        if needed > free {
            self.stalls += u64::from(!self.stalled);
            self.stalled = true;
            return Err(RingError::Full { needed, free });
        }
        self.stalled = false;
        let first = self.next;
        let mut spans = [0..0, 0..0];
        let mut span_count = 0;
        for piece in payload.chunks(self.layout.max_payload()) {
            let offset = self.layout.slot_offset(self.next);
            let extent = encode_slot(self.ring_id, self.next, piece, &mut mirror[offset..offset + self.layout.slot_size]);
            if span_count > 0 && spans[span_count - 1].end == offset {
                spans[span_count - 1].end = offset + extent;
            } else {
                spans[span_count] = offset..offset + extent;
                span_count += 1;
            }
            self.next = self.next.next();
        }
        Ok(Pushed { first, last: self.written(), spans, span_count })
    }

    /// Takes a credit record as read from the credit region. `Ok(true)` when it moved the consumer
    /// position; `Ok(false)` when it is torn, not written yet, or older than what is known (it is ignored);
    /// an error when it claims slots that were never written (a lying or confused peer).
    pub fn take_credit(&mut self, record: &[u8; CREDIT_LEN]) -> Result<bool, RingError> {
        let consumed = u64::from_le_bytes(record[0..8].try_into().expect("8 bytes"));
        let check = u64::from_le_bytes(record[8..16].try_into().expect("8 bytes"));
        if check != credit_check(self.ring_id, consumed) || consumed <= self.consumed.0 {
            return Ok(false);
        }
        if consumed > self.written().0 {
            return Err(RingError::CreditBeyondWritten { consumed, written: self.written().0 });
        }
        self.consumed = RingSeq(consumed);
        Ok(true)
    }
}

/// A credit record's check word: XXH3 of the position, seeded with the ring id and a salt. Not a
/// byte-wise function of the position (an XOR would be): a record torn between two writes mixes bytes of
/// both, and with a byte-wise check the mix (say 0x01ff from 0x00ff and 0x0100) would check out.
fn credit_check(ring_id: u64, consumed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&consumed.to_le_bytes(), ring_id ^ CREDIT_SALT)
}

/// Why a slot that carries the expected sequence is not (yet) applicable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incomplete {
    /// The length field is out of range (not written yet, or garbage).
    Length { len: u32 },
    /// The trailer holds another sequence (the write has not landed to its end).
    Trailer { found: u64 },
    /// The check does not match (bytes in the middle have not landed, or are damaged).
    Check { stored: u64, computed: u64 },
}

/// What [`RingReader::poll`] found in the next slot.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled<'a> {
    /// The slot still holds the previous lap (or nothing): no new data.
    Empty,
    /// The slot is being written: poll again.
    Incomplete(Incomplete),
    /// A complete slot, checked and consumed; `payload` is the reader's own copy.
    Ready { seq: RingSeq, payload: &'a [u8] },
}

/// The reading (standby) side of one ring.
#[derive(Debug)]
pub struct RingReader {
    layout: RingLayout,
    ring_id: u64,
    /// The next sequence to read.
    expected: RingSeq,
    /// The writer said everything through this is written (the doorbell).
    committed: RingSeq,
    /// The consumer position last handed out as a credit.
    published: RingSeq,
    /// The last poll found nothing new: the writer may be waiting for credits.
    caught_up: bool,
    /// One slot's payload, allocated once.
    scratch: Vec<u8>,
    incomplete_polls: u64,
}

impl RingReader {
    /// A reader of a fresh ring (expects ring seq 1 first) tagged with `ring_id`. The region must start
    /// zeroed (or hold only slots of other ring ids).
    pub fn new(layout: RingLayout, ring_id: u64) -> RingReader {
        RingReader {
            layout,
            ring_id,
            expected: RingSeq(1),
            committed: RingSeq::ZERO,
            published: RingSeq::ZERO,
            caught_up: true,
            scratch: vec![0; layout.slot_size],
            incomplete_polls: 0,
        }
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The last sequence consumed.
    pub fn consumed(&self) -> RingSeq {
        RingSeq(self.expected.0 - 1)
    }

    /// Polls that found the next slot half-written so far.
    pub fn incomplete_polls(&self) -> u64 {
        self.incomplete_polls
    }

    /// The writer committed everything through `seq` (from its doorbell).
    pub fn note_committed(&mut self, seq: RingSeq) {
        self.committed = self.committed.max(seq);
    }

    /// The writer's doorbell as a WRITE_WITH_IMM's immediate data: the low 32 bits of the last sequence
    /// written, taken as the nearest such sequence to the reader's position.
    pub fn note_imm(&mut self, imm: u32) {
        const SPAN: u64 = 1 << 32;
        let here = self.expected.0;
        let mut seq = (here & !(SPAN - 1)) | u64::from(imm);
        if seq > here + SPAN / 2 && seq >= SPAN {
            seq -= SPAN;
        } else if seq + SPAN / 2 < here {
            seq += SPAN;
        }
        self.note_committed(RingSeq(seq));
    }

    /// Looks at the next slot; a complete one is copied out, checked and consumed. See the module
    /// documentation for what is checked. An error means the region cannot be trusted any more.
    pub fn poll<M: RingMemory + ?Sized>(&mut self, memory: &M) -> Result<Polled<'_>, RingError> {
        debug_assert_eq!(memory.region_len(), self.layout.region_len());
        let seq = self.expected;
        let slot = self.layout.slot_of(seq);
        let offset = slot * self.layout.slot_size;
        let head = memory.read_u64(offset);
        if head != seq.0 {
            if head != self.layout.previous_lap(seq) {
                return Err(RingError::OutOfSequence { slot, found: head, expected: seq.0 });
            }
            if seq <= self.committed {
                // The doorbell came after the bytes, yet the slot is still the old lap.
                let state = Incomplete::Trailer { found: head };
                return Err(RingError::Corrupt { seq: seq.0, state });
            }
            self.caught_up = true;
            return Ok(Polled::Empty);
        }
        match self.check(memory, offset, seq) {
            Ok(len) => {
                // The copy is checked; make sure the slot was not reused under it (credits forbid it).
                if memory.read_u64(offset) != seq.0 {
                    return Err(RingError::Overrun { seq: seq.0 });
                }
                self.expected = seq.next();
                self.caught_up = false;
                Ok(Polled::Ready { seq, payload: &self.scratch[..len] })
            }
            Err(state) if seq <= self.committed => Err(RingError::Corrupt { seq: seq.0, state }),
            Err(state) => {
                self.incomplete_polls += 1;
                Ok(Polled::Incomplete(state))
            }
        }
    }

    /// Copies the slot at `offset` into the scratch buffer and checks it; its payload length if whole.
    fn check<M: RingMemory + ?Sized>(&mut self, memory: &M, offset: usize, seq: RingSeq) -> Result<usize, Incomplete> {
        let mut header = [0u8; SLOT_HEADER_LEN];
        memory.read(offset, &mut header);
        let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if len == 0 || len as usize > self.layout.max_payload() {
            return Err(Incomplete::Length { len });
        }
        let padded = (len as usize).next_multiple_of(8);
        let trailer = memory.read_u64(offset + SLOT_HEADER_LEN + padded);
        if trailer != seq.0 {
            return Err(Incomplete::Trailer { found: trailer });
        }
        let body = &mut self.scratch[..padded];
        memory.read(offset + SLOT_HEADER_LEN, body);
        let stored = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        let computed = slot_check(self.ring_id, &header[0..16], body);
        if stored != computed {
            return Err(Incomplete::Check { stored, computed });
        }
        Ok(len as usize)
    }

    /// A credit record to write back to the writer's credit region, when one is due: a quarter of the
    /// ring consumed since the last one, or anything consumed once the reader has caught up (a writer
    /// waiting for room must hear of every free slot). Marks it published.
    pub fn credit(&mut self) -> Option<[u8; CREDIT_LEN]> {
        let unpublished = self.consumed().0 - self.published.0;
        let threshold = (self.layout.slot_count as u64 / 4).max(1);
        if unpublished == 0 || (!self.caught_up && unpublished < threshold) {
            return None;
        }
        Some(self.credit_now())
    }

    /// The credit record for the current consumer position, now; marks it published.
    pub fn credit_now(&mut self) -> [u8; CREDIT_LEN] {
        let consumed = self.consumed();
        self.published = consumed;
        let mut record = [0u8; CREDIT_LEN];
        record[0..8].copy_from_slice(&consumed.0.to_le_bytes());
        record[8..16].copy_from_slice(&credit_check(self.ring_id, consumed.0).to_le_bytes());
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, FrameDecoder};
    use crate::ids::{LogSeq, ShardId};
    use crate::record::Record;
    use proptest::prelude::*;

    const RING_ID: u64 = 0x1234_5678_9abc_def0;

    /// A writer and reader joined by plain memory: a write lands whole the moment it is delivered.
    struct Wire {
        writer: RingWriter,
        reader: RingReader,
        mirror: Vec<u8>,
        region: Vec<u8>,
    }

    impl Wire {
        fn new(slot_size: usize, slot_count: usize) -> Wire {
            let layout = RingLayout::new(slot_size, slot_count).unwrap();
            Wire {
                writer: RingWriter::new(layout, RING_ID),
                reader: RingReader::new(layout, RING_ID),
                mirror: vec![0; layout.region_len()],
                region: vec![0; layout.region_len()],
            }
        }

        fn push(&mut self, payload: &[u8]) -> Result<Pushed, RingError> {
            self.writer.push(payload, &mut self.mirror)
        }

        fn deliver(&mut self, pushed: &Pushed) {
            for span in pushed.spans() {
                self.region[span.clone()].copy_from_slice(&self.mirror[span.clone()]);
            }
        }

        fn send(&mut self, payload: &[u8]) -> Pushed {
            let pushed = self.push(payload).unwrap();
            self.deliver(&pushed);
            pushed
        }

        /// The next slot's payload, if one is ready.
        fn recv(&mut self) -> Option<(u64, Vec<u8>)> {
            match self.reader.poll(&self.region[..]).unwrap() {
                Polled::Ready { seq, payload } => Some((seq.0, payload.to_vec())),
                _ => None,
            }
        }

        fn return_credit(&mut self) {
            let record = self.reader.credit_now();
            assert!(self.writer.take_credit(&record).unwrap());
        }
    }

    fn frame(shard: u16, first_seq: u64, value_lens: &[usize]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (offset, &len) in value_lens.iter().enumerate() {
            let key = format!("key{}", first_seq + offset as u64);
            let value = vec![b'v'; len];
            let record = Record::Set { key: key.as_bytes(), flags: 3, expiry: 0, cas: 1, value: &value };
            record.encode(ShardId(shard), LogSeq(first_seq + offset as u64), &mut payload).unwrap();
        }
        let mut out = Vec::new();
        encode_frame(ShardId(shard), LogSeq(first_seq), value_lens.len() as u32, &payload, &mut out).unwrap();
        out
    }

    #[test]
    fn layouts_are_checked() {
        assert!(RingLayout::new(64, 4).is_ok());
        assert_eq!(RingLayout::new(60, 4), Err(RingError::Layout("slot size is not a multiple of 8")));
        assert!(RingLayout::new(32, 4).is_err(), "no room for a payload");
        assert!(RingLayout::new(40, 4).is_ok());
        assert!(RingLayout::new(64, 1).is_err());
        let layout = RingLayout::new(64, 4).unwrap();
        assert_eq!(layout.max_payload(), 32);
        assert_eq!(layout.region_len(), 256);
        assert_eq!((layout.slot_offset(RingSeq(1)), layout.slot_offset(RingSeq(4)), layout.slot_offset(RingSeq(5))), (0, 192, 0));
        assert_eq!((layout.slots_for(1), layout.slots_for(32), layout.slots_for(33)), (1, 1, 2));
    }

    #[test]
    fn slots_flow_in_order_with_the_sequence_at_both_ends() {
        let mut wire = Wire::new(128, 8);
        let pushed = wire.send(b"first");
        assert_eq!((pushed.first, pushed.last, pushed.spans().len()), (RingSeq(1), RingSeq(1), 1));
        assert_eq!(pushed.spans()[0], 0..24 + 8 + 8);
        assert_eq!(&wire.region[0..8], &1u64.to_le_bytes());
        assert_eq!(&wire.region[8..12], &5u32.to_le_bytes());
        assert_eq!(&wire.region[24..29], b"first");
        assert_eq!(&wire.region[32..40], &1u64.to_le_bytes(), "trailer after the padded payload");
        wire.send(b"second");
        assert_eq!(wire.recv(), Some((1, b"first".to_vec())));
        assert_eq!(wire.recv(), Some((2, b"second".to_vec())));
        assert_eq!(wire.recv(), None);
        assert_eq!(wire.reader.poll(&wire.region[..]), Ok(Polled::Empty));
        assert_eq!(wire.reader.consumed(), RingSeq(2));
    }

    #[test]
    fn the_ring_wraps_around() {
        let mut wire = Wire::new(64, 4);
        for round in 0..25u64 {
            let payload = format!("payload {round}");
            let pushed = wire.send(payload.as_bytes());
            assert_eq!(pushed.spans()[0].start, (round as usize % 4) * 64);
            assert_eq!(wire.recv(), Some((round + 1, payload.into_bytes())));
            wire.return_credit();
        }
        assert_eq!(wire.writer.stalls(), 0);
    }

    #[test]
    fn the_writer_stalls_without_credits_and_resumes_with_them() {
        let mut wire = Wire::new(64, 4);
        for number in 0..4 {
            wire.send(&[number; 10]);
        }
        assert_eq!(wire.writer.free_slots(), 0);
        let before = wire.mirror.clone();
        assert_eq!(wire.push(b"fifth"), Err(RingError::Full { needed: 1, free: 0 }));
        assert_eq!(wire.mirror, before, "a refused push writes nothing");
        assert_eq!(wire.writer.stalls(), 1);

        // Consumed but not yet credited: still no room.
        assert!(wire.recv().is_some());
        assert!(wire.recv().is_some());
        assert!(matches!(wire.push(b"fifth"), Err(RingError::Full { .. })));
        assert_eq!(wire.writer.stalls(), 1, "one stall, retried");
        // Half of the ring consumed is past the quarter that makes a credit due.
        let credit = wire.reader.credit().expect("half the ring consumed");
        assert_eq!(wire.writer.take_credit(&credit), Ok(true));
        assert_eq!(wire.writer.free_slots(), 2);
        wire.send(b"fifth");
        wire.send(b"sixth");
        let rest: Vec<u64> = std::iter::from_fn(|| wire.recv()).map(|(seq, _)| seq).collect();
        assert_eq!(rest, vec![3, 4, 5, 6]);
    }

    #[test]
    fn credits_are_due_after_a_quarter_of_the_ring_or_when_caught_up() {
        let mut wire = Wire::new(64, 16);
        for _ in 0..6 {
            wire.send(b"x");
        }
        assert_eq!(wire.reader.credit(), None, "nothing consumed");
        for _ in 0..3 {
            wire.recv().unwrap();
        }
        assert_eq!(wire.reader.credit(), None, "3 of 16, still reading");
        wire.recv().unwrap();
        assert!(wire.reader.credit().is_some(), "a quarter");
        wire.recv().unwrap();
        assert_eq!(wire.reader.credit(), None);
        wire.recv().unwrap();
        assert_eq!(wire.recv(), None, "caught up");
        let credit = wire.reader.credit().expect("caught up with unpublished slots");
        assert_eq!(u64::from_le_bytes(credit[..8].try_into().unwrap()), 6);
        assert_eq!(wire.reader.credit(), None, "already published");
    }

    #[test]
    fn a_torn_slot_is_not_applied_until_it_is_complete() {
        let mut wire = Wire::new(128, 4);
        let pushed = wire.push(b"a payload that lands in pieces").unwrap();
        let span = pushed.spans()[0].clone();
        let trailer = span.end - 8;

        // Everything but the trailer: the trailer still holds the previous lap (zero).
        wire.region[span.start..trailer].copy_from_slice(&wire.mirror[span.start..trailer]);
        assert_eq!(wire.reader.poll(&wire.region[..]), Ok(Polled::Incomplete(Incomplete::Trailer { found: 0 })));
        // Head and trailer but a hole in the middle: the check catches it.
        wire.region[trailer..span.end].copy_from_slice(&wire.mirror[trailer..span.end]);
        wire.region[28..36].fill(0);
        assert!(matches!(wire.reader.poll(&wire.region[..]), Ok(Polled::Incomplete(Incomplete::Check { .. }))));
        assert_eq!(wire.reader.consumed(), RingSeq::ZERO, "nothing consumed");
        // The rest lands: accepted.
        wire.deliver(&pushed);
        assert_eq!(wire.recv(), Some((1, b"a payload that lands in pieces".to_vec())));
        assert_eq!(wire.reader.incomplete_polls(), 2);
    }

    #[test]
    fn a_new_head_with_the_previous_laps_body_is_not_applied() {
        let mut wire = Wire::new(64, 2);
        for round in 0..2 {
            wire.send(format!("old {round}").as_bytes());
            wire.recv().unwrap();
            wire.return_credit();
        }
        // Lap 2 of slot 0: only the head (seq 3) lands; length, body and trailer are lap 1's (seq 1).
        let pushed = wire.push(b"new payload").unwrap();
        wire.region[0..8].copy_from_slice(&wire.mirror[0..8]);
        assert_eq!(wire.reader.poll(&wire.region[..]), Ok(Polled::Incomplete(Incomplete::Trailer { found: 1 })));
        // The new length, check and trailer but the old body.
        wire.region[8..24].copy_from_slice(&wire.mirror[8..24]);
        let end = pushed.spans()[0].end;
        wire.region[end - 8..end].copy_from_slice(&wire.mirror[end - 8..end]);
        assert!(matches!(wire.reader.poll(&wire.region[..]), Ok(Polled::Incomplete(Incomplete::Check { .. }))));
        wire.deliver(&pushed);
        assert_eq!(wire.recv(), Some((3, b"new payload".to_vec())));
    }

    #[test]
    fn a_frame_of_the_previous_lap_under_a_new_slot_header_is_not_applied() {
        // Frames end their header with its CRC32C and records end with theirs: a slot check that were a
        // CRC32C too would accept this mixture (see the module documentation). Same slot length, same
        // records after the frame header, only the header differs.
        let mut wire = Wire::new(64, 2);
        let old = frame(0, 1, &[0]);
        let new = frame(0, 3, &[0]);
        assert_eq!(old.len(), new.len());
        let max = wire.writer.layout().max_payload();
        wire.send(&old[..max]);
        wire.recv().unwrap();
        wire.send(b"x");
        wire.recv().unwrap();
        wire.return_credit();
        let pushed = wire.push(&new[..max]).unwrap();
        let slot = pushed.spans()[0].clone();
        wire.region[slot.start..slot.start + SLOT_HEADER_LEN].copy_from_slice(&wire.mirror[slot.start..slot.start + SLOT_HEADER_LEN]);
        wire.region[slot.end - 8..slot.end].copy_from_slice(&wire.mirror[slot.end - 8..slot.end]);
        assert!(matches!(wire.reader.poll(&wire.region[..]), Ok(Polled::Incomplete(Incomplete::Check { .. }))));
        wire.deliver(&pushed);
        assert_eq!(wire.recv(), Some((3, new[..max].to_vec())));
    }

    #[test]
    fn a_stale_or_reordered_slot_is_refused() {
        let mut wire = Wire::new(64, 2);
        wire.send(b"one");
        let lap_one = wire.region[0..64].to_vec();
        wire.recv().unwrap();
        // The same valid slot again (a replayed write): it is the previous lap of seq 3, so nothing new.
        wire.region[0..64].copy_from_slice(&lap_one);
        wire.send(b"two");
        wire.return_credit();
        wire.recv().unwrap();
        assert_eq!(wire.reader.poll(&wire.region[..]), Ok(Polled::Empty), "seq 1 where 3 is expected");
        assert_eq!(wire.reader.consumed(), RingSeq(2));

        // Seq 3 and 4 written and read; now seq 5 is expected in slot 0 and seq 1 (two laps old) turns
        // up again: refused as out of sequence.
        wire.return_credit();
        wire.send(b"three");
        wire.send(b"four");
        assert_eq!(wire.recv().unwrap().0, 3);
        assert_eq!(wire.recv().unwrap().0, 4);
        wire.region[0..64].copy_from_slice(&lap_one);
        assert_eq!(wire.reader.poll(&wire.region[..]), Err(RingError::OutOfSequence { slot: 0, found: 1, expected: 5 }));

        // A slot from a later lap than expected (a writer that ignored credits): refused.
        let mut wire = Wire::new(64, 2);
        let mut region = [0; 128];
        let mut ahead = RingWriter::new(wire.writer.layout(), RING_ID);
        ahead.push(b"skipped", &mut wire.mirror).unwrap();
        ahead.push(b"skipped", &mut wire.mirror).unwrap();
        assert_eq!(ahead.take_credit(&credit_for(2)), Ok(true));
        let pushed = ahead.push(b"lap two", &mut wire.mirror).unwrap();
        region[pushed.spans()[0].clone()].copy_from_slice(&wire.mirror[pushed.spans()[0].clone()]);
        assert_eq!(wire.reader.poll(&region[..]), Err(RingError::OutOfSequence { slot: 0, found: 3, expected: 1 }));
    }

    fn credit_for(consumed: u64) -> [u8; CREDIT_LEN] {
        let mut record = [0u8; CREDIT_LEN];
        record[0..8].copy_from_slice(&consumed.to_le_bytes());
        record[8..16].copy_from_slice(&credit_check(RING_ID, consumed).to_le_bytes());
        record
    }

    #[test]
    fn garbage_is_refused_and_never_applied() {
        let layout = RingLayout::new(64, 4).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let garbage: Vec<u8> = (0..layout.region_len())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut reader = RingReader::new(layout, RING_ID);
        assert!(matches!(reader.poll(&garbage[..]), Err(RingError::OutOfSequence { slot: 0, .. })));

        // Garbage that happens to start with the expected sequence (and even ends with it): it waits as
        // incomplete, and once the writer's doorbell covers it, it is corruption.
        let mut forged = garbage.clone();
        forged[0..8].copy_from_slice(&1u64.to_le_bytes());
        forged[8..12].copy_from_slice(&8u32.to_le_bytes());
        forged[32..40].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(reader.poll(&forged[..]), Ok(Polled::Incomplete(Incomplete::Check { .. }))));
        reader.note_imm(1);
        assert!(matches!(reader.poll(&forged[..]), Err(RingError::Corrupt { seq: 1, state: Incomplete::Check { .. } })));
        assert_eq!(reader.consumed(), RingSeq::ZERO);
    }

    #[test]
    fn a_slot_of_another_ring_id_is_never_taken() {
        // A region reused after a reconnect still holds the old connection's slot 1.
        let layout = RingLayout::new(64, 4).unwrap();
        let mut old = RingWriter::new(layout, 1);
        let mut region = vec![0; layout.region_len()];
        old.push(b"from the old connection", &mut region).unwrap();
        let mut reader = RingReader::new(layout, 2);
        assert!(matches!(reader.poll(&region[..]), Ok(Polled::Incomplete(Incomplete::Check { .. }))));
        // Its credits do not count either.
        let mut writer = RingWriter::new(layout, 2);
        let mut mirror = vec![0; layout.region_len()];
        writer.push(b"x", &mut mirror).unwrap();
        let mut old_reader = RingReader::new(layout, 1);
        old_reader.poll(&region[..]).unwrap();
        assert_eq!(writer.take_credit(&old_reader.credit_now()), Ok(false));
    }

    #[test]
    fn the_doorbell_turns_a_missing_write_into_corruption() {
        let mut wire = Wire::new(64, 4);
        let pushed = wire.push(b"never lands").unwrap();
        assert_eq!(wire.reader.poll(&wire.region[..]), Ok(Polled::Empty));
        wire.reader.note_imm(pushed.imm());
        assert!(matches!(wire.reader.poll(&wire.region[..]), Err(RingError::Corrupt { seq: 1, .. })));
    }

    #[test]
    fn the_doorbells_32_bits_are_widened_near_the_readers_position() {
        let layout = RingLayout::new(64, 4).unwrap();
        let mut reader = RingReader::new(layout, RING_ID);
        reader.expected = RingSeq((5 << 32) + 10);
        reader.note_imm(12);
        assert_eq!(reader.committed, RingSeq((5 << 32) + 12));
        reader.expected = RingSeq((5 << 32) + 2);
        reader.committed = RingSeq::ZERO;
        reader.note_imm(u32::MAX);
        assert_eq!(reader.committed, RingSeq((5 << 32) - 1), "the last of the previous 2^32");
        reader.expected = RingSeq((6 << 32) - 2);
        reader.committed = RingSeq::ZERO;
        reader.note_imm(1);
        assert_eq!(reader.committed, RingSeq((6 << 32) + 1), "just past the wrap of the low bits");
    }

    #[test]
    fn torn_stale_or_lying_credits_are_not_believed() {
        let mut wire = Wire::new(64, 4);
        for _ in 0..3 {
            wire.send(b"x");
            wire.recv().unwrap();
        }
        let good = wire.reader.credit_now();
        let mut torn = good;
        torn[8..16].copy_from_slice(&credit_for(1)[8..16]);
        assert_eq!(wire.writer.take_credit(&torn), Ok(false));
        assert_eq!(wire.writer.take_credit(&[0; CREDIT_LEN]), Ok(false), "never written");
        assert_eq!(wire.writer.take_credit(&good), Ok(true));
        assert_eq!(wire.writer.take_credit(&credit_for(2)), Ok(false), "older than known");
        assert_eq!(wire.writer.consumed(), RingSeq(3));
        assert_eq!(wire.writer.take_credit(&credit_for(9)), Err(RingError::CreditBeyondWritten { consumed: 9, written: 3 }));
    }

    #[test]
    fn a_credit_torn_between_two_records_is_not_believed() {
        // Bytes of 0x00ff's record and of 0x0100's: position 0x01ff, with each byte's check byte from the
        // same record. A check that is a byte-wise function of the position would accept it.
        let (old, new) = (credit_for(0xff), credit_for(0x100));
        for mask in 0u32..(1 << 16) {
            let mut torn = old;
            for (byte, slot) in torn.iter_mut().enumerate() {
                if mask & (1 << byte) != 0 {
                    *slot = new[byte];
                }
            }
            if torn == old || torn == new {
                continue;
            }
            let consumed = u64::from_le_bytes(torn[0..8].try_into().unwrap());
            let check = u64::from_le_bytes(torn[8..16].try_into().unwrap());
            assert_ne!(check, credit_check(RING_ID, consumed), "torn record {torn:?} checks out");
        }
    }

    #[test]
    fn a_frame_larger_than_a_slot_is_split_and_reassembled() {
        let mut wire = Wire::new(128, 6);
        let big = frame(3, 4, &[100, 10, 120]);
        let slots = wire.writer.layout().slots_for(big.len());
        assert!((3..=5).contains(&slots), "{} bytes take {slots} slots", big.len());
        // Three small frames first, so that the big one wraps from slot 3 to slot 0.
        let mut decoder = FrameDecoder::default();
        for seq in 1..=3 {
            wire.send(&frame(3, seq, &[5]));
            decoder.feed(&wire.recv().unwrap().1);
            decoder.next_frame().unwrap().expect("a small frame");
        }
        wire.return_credit();
        let pushed = wire.send(&big);
        assert_eq!(pushed.last.0 - pushed.first.0 + 1, slots as u64);
        assert_eq!(pushed.spans(), &[3 * 128..6 * 128, 0..pushed.spans()[1].end][..], "wrapped");

        while let Some((_, piece)) = wire.recv() {
            decoder.feed(&piece);
        }
        let frame = decoder.next_frame().unwrap().expect("reassembled");
        assert_eq!((frame.header.first_seq, frame.header.count), (LogSeq(4), 3));
        let values: Vec<usize> = frame.records().map(|r| match r.record {
            Record::Set { value, .. } => value.len(),
            _ => 0,
        }).collect();
        assert_eq!(values, vec![100, 10, 120]);

        // Larger than the whole ring: refused, nothing written.
        let whole = 6 * wire.writer.layout().max_payload();
        assert_eq!(wire.push(&vec![0; whole + 1]), Err(RingError::TooLarge { len: whole + 1, max: whole }));
        assert_eq!(wire.push(&[]), Err(RingError::EmptyPayload));
    }

    /// One write in flight through the simulated network: bytes for `at..` of the target that have not
    /// landed yet, as ranges (relative to `at`).
    #[derive(Debug)]
    struct InFlight {
        at: usize,
        bytes: Vec<u8>,
        missing: Vec<Range<usize>>,
        /// For slot writes: the last sequence, rung as the doorbell once this and every earlier write
        /// has landed (as RC delivers WRITE_WITH_IMM).
        imm: Option<u32>,
    }

    impl InFlight {
        fn new(at: usize, bytes: Vec<u8>, imm: Option<u32>) -> InFlight {
            let len = bytes.len();
            let mut missing = Vec::with_capacity(4);
            missing.push(0..len);
            InFlight { at, bytes, missing, imm }
        }

        /// Lands a piece of up to `len` bytes at position `pick` (modulo its length) of the missing range
        /// `which` (modulo their count).
        fn land(&mut self, target: &mut [u8], which: usize, pick: usize, len: usize) {
            if self.missing.is_empty() {
                return;
            }
            let index = which % self.missing.len();
            let range = self.missing[index].clone();
            let start = range.start + pick % range.len();
            let end = (start + len.max(1)).min(range.end);
            target[self.at + start..self.at + end].copy_from_slice(&self.bytes[start..end]);
            self.missing.remove(index);
            if end < range.end {
                self.missing.insert(index, end..range.end);
            }
            if range.start < start {
                self.missing.insert(index, range.start..start);
            }
        }

        fn landed(&self) -> bool {
            self.missing.is_empty()
        }

        /// Forgets missing bytes the target already holds: landing them would change nothing now. An
        /// RC queue pair places its WRITEs in order, so once a later write is posted (after a credit for
        /// the slot), an earlier write's bytes cannot arrive over it: without this, a write whose last
        /// bytes equal the previous lap's would "land" after the reader consumed it and a newer lap was
        /// written, which no RC link does.
        fn settle(&mut self, target: &[u8]) {
            let (at, bytes) = (self.at, &self.bytes);
            self.missing.retain(|range| target[at + range.start..at + range.end] != bytes[range.clone()]);
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// The writer pushes its next frame (if credits allow) and takes any credit that landed.
        Push,
        /// A piece of one slot write in flight lands (writes in flight land in any order).
        LandSlot(usize, usize, usize, usize),
        /// A piece of the oldest credit write lands (credit writes land in order, pieces in any order).
        LandCredit(usize, usize, usize),
        /// The reader polls and, if a credit is due, sends it.
        Poll,
    }

    fn any_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => Just(Step::Push),
            5 => (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..80)
                .prop_map(|(write, range, pick, len)| Step::LandSlot(write, range, pick, len)),
            2 => (any::<usize>(), any::<usize>(), 1usize..17).prop_map(|(range, pick, len)| Step::LandCredit(range, pick, len)),
            3 => Just(Step::Poll),
        ]
    }

    /// Both ends and the network between them.
    struct Simulation {
        writer: RingWriter,
        reader: RingReader,
        mirror: Vec<u8>,
        region: Vec<u8>,
        credit_region: [u8; CREDIT_LEN],
        slot_writes: Vec<InFlight>,
        credit_writes: std::collections::VecDeque<InFlight>,
        frames: Vec<Vec<u8>>,
        pushed: usize,
        decoder: FrameDecoder,
        received: Vec<(u64, u32)>,
    }

    impl Simulation {
        fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
            match step {
                Step::Push => {
                    let record: [u8; CREDIT_LEN] = self.credit_region;
                    self.writer.take_credit(&record).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if self.pushed == self.frames.len() {
                        return Ok(());
                    }
                    for write in &mut self.slot_writes {
                        write.settle(&self.region);
                    }
                    match self.writer.push(&self.frames[self.pushed], &mut self.mirror) {
                        Ok(pushed) => {
                            let spans = pushed.spans();
                            for (index, span) in spans.iter().enumerate() {
                                let imm = (index + 1 == spans.len()).then(|| pushed.imm());
                                self.slot_writes.push(InFlight::new(span.start, self.mirror[span.clone()].to_vec(), imm));
                            }
                            self.pushed += 1;
                        }
                        Err(RingError::Full { .. }) => {}
                        Err(error) => return Err(TestCaseError::fail(error.to_string())),
                    }
                }
                Step::LandSlot(which, range, pick, len) => {
                    if !self.slot_writes.is_empty() {
                        let index = which % self.slot_writes.len();
                        self.slot_writes[index].land(&mut self.region, range, pick, len);
                    }
                    // The doorbell: the oldest writes, once landed, complete in order.
                    while self.slot_writes.first().is_some_and(InFlight::landed) {
                        if let Some(imm) = self.slot_writes.remove(0).imm {
                            self.reader.note_imm(imm);
                        }
                    }
                }
                Step::LandCredit(range, pick, len) => {
                    if let Some(write) = self.credit_writes.front_mut() {
                        write.land(&mut self.credit_region, range, pick, len);
                        if write.landed() {
                            self.credit_writes.pop_front();
                        }
                    }
                }
                Step::Poll => {
                    loop {
                        match self.reader.poll(&self.region[..]) {
                            Ok(Polled::Ready { payload, .. }) => self.decoder.feed(payload),
                            Ok(_) => break,
                            Err(error) => return Err(TestCaseError::fail(error.to_string())),
                        }
                    }
                    while let Some(frame) = self.decoder.next_frame().map_err(|e| TestCaseError::fail(e.to_string()))? {
                        self.received.push((frame.header.first_seq.0, frame.header.count));
                    }
                    if let Some(record) = self.reader.credit() {
                        self.credit_writes.push_back(InFlight::new(0, record.to_vec(), None));
                    }
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Any interleaving of pushes, pieces of writes landing in any order, polls and credits: the
        /// reader hands out exactly the frames pushed, in order, never an error, and the writer never
        /// overwrites a slot the reader has not consumed (it would show as an error or a lost frame).
        #[test]
        fn any_interleaving_delivers_every_frame_in_order(
            slot_words in 5usize..24,
            slot_count in 2usize..6,
            batches in proptest::collection::vec(proptest::collection::vec(0usize..120, 1..4), 1..25),
            steps in proptest::collection::vec(any_step(), 0..400),
        ) {
            let layout = RingLayout::new(slot_words * 8, slot_count).unwrap();
            let mut frames = Vec::new();
            let mut next_seq = 1;
            for values in &batches {
                let bytes = frame(0, next_seq, values);
                if layout.slots_for(bytes.len()) <= slot_count {
                    frames.push(bytes);
                    next_seq += values.len() as u64;
                }
            }
            let expected: Vec<(u64, u32)> = frames.iter().map(|bytes| {
                let header = crate::frame::parse_frame(bytes, usize::MAX).unwrap().header;
                (header.first_seq.0, header.count)
            }).collect();
            let mut sim = Simulation {
                writer: RingWriter::new(layout, RING_ID),
                reader: RingReader::new(layout, RING_ID),
                mirror: vec![0; layout.region_len()],
                region: vec![0; layout.region_len()],
                credit_region: [0; CREDIT_LEN],
                slot_writes: Vec::new(),
                credit_writes: Default::default(),
                frames,
                pushed: 0,
                decoder: FrameDecoder::default(),
                received: Vec::new(),
            };
            for step in steps {
                sim.step(step)?;
            }
            // Then let everything run to the end: land whole writes, poll, push, until all arrived.
            for _ in 0..10_000 {
                if sim.received.len() == expected.len() {
                    break;
                }
                sim.step(Step::LandSlot(0, 0, 0, usize::MAX / 2))?;
                sim.step(Step::LandCredit(0, 0, CREDIT_LEN))?;
                sim.step(Step::Poll)?;
                sim.step(Step::Push)?;
            }
            prop_assert_eq!(&sim.received, &expected);
            prop_assert_eq!(sim.decoder.buffered(), 0);
        }
    }
}
