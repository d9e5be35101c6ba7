//! The messages of a replication stream over a byte transport (TCP), and their reassembly.
//!
//! Every message is `[u32 length][u8 kind][payload]` (little-endian; the length counts kind and payload).
//! The handshake ([`crate::handshake`]) runs first, one [`Kind::Handshake`] message per step; then:
//!
//! | kind | direction | payload |
//! |---|---|---|
//! | `Batch` | active -> standby | one batch frame ([`crate::frame`]): records with consecutive sequence numbers |
//! | `SnapshotBegin` | active -> standby | shard u16, at u64: wipe the shard; the log continues after `at` |
//! | `SnapshotItems` | active -> standby | shard u16, then whole SET records of the shard (each checksummed) |
//! | `SnapshotEnd` | active -> standby | shard u16: the shard's snapshot is complete |
//! | `Ack` | standby -> active | shard u16, seq u64: every record up to `seq` is applied |
//! | `Heartbeat` | both | epoch u64, sender's clock in ms u64 |
//! | `Handover` | active -> standby | epoch u64, then per shard the last seq u64: a planned switchover; every record that exists is through these; take over once they are applied |
//! | `HandoverReply` | standby -> active | accepted u8 (1 or 0), then why, UTF-8 (at most [`HANDOVER_REASON_MAX`] bytes) |
//! | `RdmaOffer` | standby -> active | the RDMA transport's ring offer (see `rdma::link`): endpoint, ring region, layout, ring id |
//! | `RdmaAccept` | active -> standby | the active's endpoint and credit region |
//! | `RdmaReady` | standby -> active | empty: the standby's queue pair is connected; the data stream may start |
//!
//! `Batch` and `Snapshot*` form the data stream ([`crate::transport`]): on the TCP connection with the
//! TCP transport, in the standby's ring with the RDMA transport; every other kind is control and always
//! travels on the TCP connection.
//!
//! [`MessageReader`] reassembles messages from reads of any size and checks each one completely before
//! handing it out (frames and records carry their own checksums). A stream that breaks any rule is
//! refused for good: nothing after the first bad byte is trusted or applied.

use thiserror::Error;

use crate::frame::{self, Frame, FrameError};
use crate::ids::{Epoch, LogSeq, ShardId};
use crate::record::{self, DecodeError, Record};

/// Bytes of the length prefix and kind.
pub const MESSAGE_HEADER_LEN: usize = 5;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Handshake = 1,
    Batch = 2,
    SnapshotBegin = 3,
    SnapshotItems = 4,
    SnapshotEnd = 5,
    Ack = 6,
    Heartbeat = 7,
    Handover = 8,
    HandoverReply = 9,
    RdmaOffer = 10,
    RdmaAccept = 11,
    RdmaReady = 12,
}

/// Longest reason a standby gives with its answer to a handover.
pub const HANDOVER_REASON_MAX: usize = 1024;

/// One checked message, borrowing from the reader's buffer.
#[derive(Debug)]
pub enum Message<'a> {
    Handshake(&'a [u8]),
    Batch(Frame<'a>),
    SnapshotBegin { shard: ShardId, at: LogSeq },
    /// Whole, checked SET records of `shard` (walk them with [`snapshot_records`]).
    SnapshotItems { shard: ShardId, records: &'a [u8] },
    SnapshotEnd { shard: ShardId },
    Ack { shard: ShardId, seq: LogSeq },
    Heartbeat { epoch: Epoch, millis: u64 },
    /// A planned switchover: the active stopped taking writes at `through` (per shard) in `epoch`.
    Handover { epoch: Epoch, through: Vec<LogSeq> },
    /// The standby's answer: it takes over (and is gone from this stream), or why not.
    HandoverReply { accepted: bool, reason: &'a [u8] },
    /// The standby's ring offer (decoded by the RDMA transport).
    RdmaOffer(&'a [u8]),
    /// The active's answer to an offer (decoded by the RDMA transport).
    RdmaAccept(&'a [u8]),
    RdmaReady,
}

impl Message<'_> {
    /// Whether the message belongs to the data stream (the rest is control).
    pub fn is_data(&self) -> bool {
        matches!(self, Message::Batch(_) | Message::SnapshotBegin { .. } | Message::SnapshotItems { .. } | Message::SnapshotEnd { .. })
    }
}

/// Why a stream was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty message")]
    Empty,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message kind {kind:?} with a payload of {len} bytes")]
    BadLength { kind: Kind, len: usize },
    #[error("batch: {0}")]
    Frame(#[from] FrameError),
    #[error("snapshot record: {0}")]
    Record(#[from] DecodeError),
    #[error("snapshot record of {found} in a message of {expected}, or not a SET")]
    SnapshotRecord { expected: ShardId, found: ShardId },
}

/// Appends a message with `payload` (already encoded) to `out`.
pub fn encode(kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len() + 1).expect("messages are far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
}

/// Starts a message whose payload the caller appends to `out`; returns where it begins.
pub fn begin(kind: Kind, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind as u8]);
    start
}

/// Completes a message started by [`begin`] at `start`.
pub fn finish(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start - 4).expect("messages are far below 4 GiB");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

pub fn encode_snapshot_begin(shard: ShardId, at: LogSeq, out: &mut Vec<u8>) {
    let mut payload = [0u8; 10];
    payload[..2].copy_from_slice(&shard.0.to_le_bytes());
    payload[2..].copy_from_slice(&at.0.to_le_bytes());
    encode(Kind::SnapshotBegin, &payload, out);
}

pub fn encode_snapshot_end(shard: ShardId, out: &mut Vec<u8>) {
    encode(Kind::SnapshotEnd, &shard.0.to_le_bytes(), out);
}

pub fn encode_ack(shard: ShardId, seq: LogSeq, out: &mut Vec<u8>) {
    let mut payload = [0u8; 10];
    payload[..2].copy_from_slice(&shard.0.to_le_bytes());
    payload[2..].copy_from_slice(&seq.0.to_le_bytes());
    encode(Kind::Ack, &payload, out);
}

pub fn encode_heartbeat(epoch: Epoch, millis: u64, out: &mut Vec<u8>) {
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(&epoch.0.to_le_bytes());
    payload[8..].copy_from_slice(&millis.to_le_bytes());
    encode(Kind::Heartbeat, &payload, out);
}

pub fn encode_handover(epoch: Epoch, through: &[LogSeq], out: &mut Vec<u8>) {
    let start = begin(Kind::Handover, out);
    out.extend_from_slice(&epoch.0.to_le_bytes());
    for seq in through {
        out.extend_from_slice(&seq.0.to_le_bytes());
    }
    finish(out, start);
}

pub fn encode_handover_reply(accepted: bool, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(HANDOVER_REASON_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let start = begin(Kind::HandoverReply, out);
    out.push(u8::from(accepted));
    out.extend_from_slice(&reason.as_bytes()[..end]);
    finish(out, start);
}

/// The records of a [`Message::SnapshotItems`] (already checked by the reader).
pub fn snapshot_records(records: &[u8]) -> impl Iterator<Item = Record<'_>> {
    let mut rest = records;
    std::iter::from_fn(move || {
        let (logged, len) = record::decode(rest).ok()?;
        rest = &rest[len..];
        Some(logged.record)
    })
}

/// Reassembles and checks messages from a byte stream.
#[derive(Debug)]
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
    max: usize,
    failed: Option<WireError>,
}

impl MessageReader {
    /// A reader that refuses messages longer than `max` bytes.
    pub fn new(max: usize) -> MessageReader {
        MessageReader { buf: Vec::new(), start: 0, max, failed: None }
    }

    /// Room to read into: the buffer's spare capacity after compaction, at least `want` bytes.
    pub fn spare(&mut self, want: usize) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(want);
        &mut self.buf
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).extend_from_slice(bytes);
    }

    /// Bytes received and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole message, `Ok(None)` when more bytes are needed, or the error that ends the stream.
    pub fn next_message(&mut self) -> Result<Option<Message<'_>>, WireError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let available = &self.buf[self.start..];
        let Some(prefix) = available.first_chunk::<4>() else { return Ok(None) };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len == 0 {
            self.failed = Some(WireError::Empty);
            return Err(WireError::Empty);
        }
        if len > self.max {
            let error = WireError::TooLarge { len, max: self.max };
            self.failed = Some(error.clone());
            return Err(error);
        }
        if available.len() < 4 + len {
            return Ok(None);
        }
        let body_start = self.start + 4;
        self.start = body_start + len;
        let body = &self.buf[body_start..body_start + len];
        match parse(body[0], &body[1..], self.max) {
            Ok(message) => Ok(Some(message)),
            Err(error) => {
                self.failed = Some(error.clone());
                Err(error)
            }
        }
    }
}

fn shard_of(payload: &[u8]) -> ShardId {
    ShardId(u16::from_le_bytes([payload[0], payload[1]]))
}

fn u64_at(payload: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"))
}

fn parse(kind: u8, payload: &[u8], max: usize) -> Result<Message<'_>, WireError> {
    let want = |kind: Kind, len: usize| if payload.len() == len { Ok(()) } else { Err(WireError::BadLength { kind, len: payload.len() }) };
    Ok(match kind {
        1 => Message::Handshake(payload),
        2 => Message::Batch(frame::parse_frame(payload, max)?),
        3 => {
            want(Kind::SnapshotBegin, 10)?;
            Message::SnapshotBegin { shard: shard_of(payload), at: LogSeq(u64_at(payload, 2)) }
        }
        4 => {
            if payload.len() < 2 {
                return Err(WireError::BadLength { kind: Kind::SnapshotItems, len: payload.len() });
            }
            let shard = shard_of(payload);
            let records = &payload[2..];
            let mut rest = records;
            while !rest.is_empty() {
                let (logged, len) = record::decode(rest)?;
                if logged.shard != shard || !matches!(logged.record, Record::Set { .. }) {
                    return Err(WireError::SnapshotRecord { expected: shard, found: logged.shard });
                }
                rest = &rest[len..];
            }
            Message::SnapshotItems { shard, records }
        }
        5 => {
            want(Kind::SnapshotEnd, 2)?;
            Message::SnapshotEnd { shard: shard_of(payload) }
        }
        6 => {
            want(Kind::Ack, 10)?;
            Message::Ack { shard: shard_of(payload), seq: LogSeq(u64_at(payload, 2)) }
        }
        7 => {
            want(Kind::Heartbeat, 16)?;
            Message::Heartbeat { epoch: Epoch(u64_at(payload, 0)), millis: u64_at(payload, 8) }
        }
        8 => {
            if payload.len() < 8 || !payload.len().is_multiple_of(8) {
                return Err(WireError::BadLength { kind: Kind::Handover, len: payload.len() });
            }
            let through = payload[8..].chunks_exact(8).map(|c| LogSeq(u64::from_le_bytes(c.try_into().expect("8 bytes")))).collect();
            Message::Handover { epoch: Epoch(u64_at(payload, 0)), through }
        }
        9 => {
            if payload.is_empty() || payload.len() > 1 + HANDOVER_REASON_MAX || payload[0] > 1 {
                return Err(WireError::BadLength { kind: Kind::HandoverReply, len: payload.len() });
            }
            Message::HandoverReply { accepted: payload[0] == 1, reason: &payload[1..] }
        }
        10 => Message::RdmaOffer(payload),
        11 => Message::RdmaAccept(payload),
        12 => {
            want(Kind::RdmaReady, 0)?;
            Message::RdmaReady
        }
        other => return Err(WireError::UnknownKind(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_stream() -> Vec<u8> {
        let mut out = Vec::new();
        encode(Kind::Handshake, b"hello", &mut out);
        let mut records = Vec::new();
        Record::Set { key: b"a", flags: 1, expiry: 0, cas: 9, value: b"xyz" }.encode(ShardId(1), LogSeq(5), &mut records).unwrap();
        Record::Delete { key: b"b" }.encode(ShardId(1), LogSeq(6), &mut records).unwrap();
        let start = begin(Kind::Batch, &mut out);
        frame::encode_frame(ShardId(1), LogSeq(5), 2, &records, &mut out).unwrap();
        finish(&mut out, start);
        encode_snapshot_begin(ShardId(1), LogSeq(4), &mut out);
        let start = begin(Kind::SnapshotItems, &mut out);
        out.extend_from_slice(&1u16.to_le_bytes());
        Record::Set { key: b"c", flags: 0, expiry: 7, cas: 3, value: b"v" }.encode(ShardId(1), LogSeq(4), &mut out).unwrap();
        finish(&mut out, start);
        encode_snapshot_end(ShardId(1), &mut out);
        encode_ack(ShardId(1), LogSeq(6), &mut out);
        encode_heartbeat(Epoch(3), 1234, &mut out);
        out
    }

    fn describe(reader: &mut MessageReader) -> Result<Vec<String>, WireError> {
        let mut seen = Vec::new();
        while let Some(message) = reader.next_message()? {
            seen.push(match message {
                Message::Batch(frame) => format!("batch {} {} {}", frame.header.shard.0, frame.header.first_seq.0, frame.header.count),
                Message::SnapshotItems { shard, records } => {
                    format!("items {} {}", shard.0, snapshot_records(records).count())
                }
                other => format!("{other:?}"),
            });
        }
        Ok(seen)
    }

    /// Every record the stream delivers, batches and snapshot chunks alike, as (shard, seq, record).
    fn records_of(stream: &[u8]) -> Result<Vec<String>, WireError> {
        let mut reader = MessageReader::new(1 << 20);
        reader.feed(stream);
        let mut seen = Vec::new();
        while let Some(message) = reader.next_message()? {
            match message {
                Message::Batch(frame) => seen.extend(frame.records().map(|r| format!("{r:?}"))),
                Message::SnapshotItems { shard, records } => {
                    seen.extend(snapshot_records(records).map(|r| format!("{shard:?} {r:?}")))
                }
                _ => {}
            }
        }
        Ok(seen)
    }

    #[test]
    fn every_kind_round_trips() {
        let mut reader = MessageReader::new(1 << 20);
        reader.feed(&sample_stream());
        let seen = describe(&mut reader).unwrap();
        assert_eq!(seen.len(), 7, "{seen:?}");
        assert_eq!(seen[1], "batch 1 5 2");
        assert_eq!(seen[3], "items 1 1");
        assert!(seen[5].contains("Ack"));
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn a_handover_and_its_answers_round_trip() {
        let mut out = Vec::new();
        encode_handover(Epoch(4), &[LogSeq(10), LogSeq(0), LogSeq(7)], &mut out);
        encode_handover_reply(true, "", &mut out);
        encode_handover_reply(false, &"é".repeat(HANDOVER_REASON_MAX), &mut out);
        let mut reader = MessageReader::new(1 << 20);
        reader.feed(&out);
        match reader.next_message().unwrap() {
            Some(Message::Handover { epoch, through }) => {
                assert_eq!((epoch, through), (Epoch(4), vec![LogSeq(10), LogSeq(0), LogSeq(7)]));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(reader.next_message().unwrap(), Some(Message::HandoverReply { accepted: true, reason: b"" })));
        match reader.next_message().unwrap() {
            Some(Message::HandoverReply { accepted: false, reason }) => {
                assert!(reason.len() <= HANDOVER_REASON_MAX && std::str::from_utf8(reason).is_ok(), "cut at a character boundary");
            }
            other => panic!("{other:?}"),
        }
        let mut bad = Vec::new();
        encode(Kind::Handover, &[0; 12], &mut bad);
        let mut reader = MessageReader::new(1 << 20);
        reader.feed(&bad);
        assert!(matches!(reader.next_message(), Err(WireError::BadLength { kind: Kind::Handover, len: 12 })));
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_it_is_buffered() {
        let mut reader = MessageReader::new(16);
        reader.feed(&100u32.to_le_bytes());
        assert_eq!(reader.next_message().unwrap_err(), WireError::TooLarge { len: 100, max: 16 });
        assert!(reader.next_message().is_err(), "the stream stays refused");
    }

    proptest! {
        #[test]
        fn pieces_of_any_size_give_the_same_messages(piece in 1usize..64) {
            let stream = sample_stream();
            let mut reader = MessageReader::new(1 << 20);
            let mut seen = Vec::new();
            for chunk in stream.chunks(piece) {
                reader.feed(chunk);
                seen.extend(describe(&mut reader).unwrap());
            }
            prop_assert_eq!(seen.len(), 7);
        }

        /// Records (in batches and snapshot chunks) carry checksums; control messages rely on TCP's. So a
        /// flipped byte may end the stream or change a control message, but never delivers a record that
        /// was not sent.
        #[test]
        fn a_flipped_byte_never_yields_a_record_that_was_not_sent(at in 0usize..200, bit in 0u8..8) {
            let clean = sample_stream();
            let sent = records_of(&clean).unwrap();
            let mut stream = clean.clone();
            let at = at % stream.len();
            stream[at] ^= 1 << bit;
            if let Ok(seen) = records_of(&stream) {
                for record in &seen {
                    prop_assert!(sent.contains(record), "{record:?} was never sent");
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut reader = MessageReader::new(1 << 16);
            reader.feed(&bytes);
            let _ = describe(&mut reader);
        }
    }
}
