//! Batch framing: how a run of one shard's encoded records crosses the wire, and a decoder for a byte
//! stream that arrives in pieces of any size.
//!
//! A batch is a fixed header followed by whole records ([`crate::record`] encoding), all of one shard,
//! with consecutive sequence numbers starting at `first_seq`. All integers little-endian:
//!
//! ```text
//! 0  magic       [u8; 4] = b"TNDB"
//! 4  version     u8      = FRAME_VERSION
//! 5  reserved    u8      = 0
//! 6  shard       u16
//! 8  first_seq   u64
//! 16 count       u32     records in the batch
//! 20 payload_len u32     bytes of records after the header
//! 24 crc32c      u32     of header bytes 0..24
//! 28 records
//! ```
//!
//! The header checksum covers the header only: every record carries its own crc32c, and the decoder
//! checks each record, that they belong to the header's shard, that their sequence numbers run on from
//! `first_seq` without a gap, and that exactly `count` of them fill exactly `payload_len` bytes. A frame
//! that passes all that is handed out; anything else is a typed [`FrameError`], after which the decoder
//! refuses further input (a byte stream that lied once cannot be trusted to be aligned again).
//!
//! The same framing serves every transport: TCP writes frames into the socket, and RDMA will write the
//! same frames into the standby's per-shard receive rings.
//!
//! - [`encode_frame`] writes one batch; [`begin_frame`] and [`finish_frame`] build one in place around
//!   records drained straight into the output buffer; [`FrameHeader`] is its parsed header.
//! - [`FrameDecoder`] takes bytes with [`FrameDecoder::feed`] and yields [`Frame`]s from
//!   [`FrameDecoder::next_frame`]; [`Frame::records`] walks the records, borrowing keys and values.

use crate::ids::{LogSeq, ShardId};
use crate::record::{self, DecodeError, LoggedRecord};
use thiserror::Error;

/// The first bytes of every batch frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TNDB";
/// The frame format this crate writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 28;
/// Default bound on one frame's payload the decoder accepts (large values are up to 8 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;

/// A batch frame's parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub shard: ShardId,
    /// Sequence number of the first record; the rest follow one by one.
    pub first_seq: LogSeq,
    pub count: u32,
    pub payload_len: u32,
}

impl FrameHeader {
    /// Sequence number of the last record (or the one before `first_seq` for an empty batch).
    pub fn last_seq(&self) -> LogSeq {
        LogSeq((self.first_seq.0 + u64::from(self.count)).wrapping_sub(1))
    }

    fn write(&self, out: &mut [u8; FRAME_HEADER_LEN]) {
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4] = FRAME_VERSION;
        out[5] = 0;
        out[6..8].copy_from_slice(&self.shard.0.to_le_bytes());
        out[8..16].copy_from_slice(&self.first_seq.0.to_le_bytes());
        out[16..20].copy_from_slice(&self.count.to_le_bytes());
        out[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses and checks a header (magic, version, checksum); says nothing yet about the records.
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let stored = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&bytes[..24]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum { stored, computed });
        }
        if bytes[4] != FRAME_VERSION {
            return Err(FrameError::UnknownVersion(bytes[4]));
        }
        Ok(FrameHeader {
            shard: ShardId(u16::from_le_bytes([bytes[6], bytes[7]])),
            first_seq: LogSeq(u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"))),
            count: u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")),
            payload_len: u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes")),
        })
    }
}

/// Why bytes are not a valid batch frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a batch frame: magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unknown frame version {0}")]
    UnknownVersion(u8),
    #[error("frame header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("record {index} of the frame: {error}")]
    Record { index: u32, error: DecodeError },
    #[error("record {index} belongs to {found}, the frame to {expected}")]
    WrongShard { index: u32, expected: ShardId, found: ShardId },
    #[error("record {index} has {found}, expected {expected}")]
    SeqGap { index: u32, expected: LogSeq, found: LogSeq },
    #[error("frame header says {header} records, payload holds {found}")]
    CountMismatch { header: u32, found: u32 },
    #[error("{0} bytes are too few for a frame header")]
    Short(usize),
    #[error("frame header promises {header} payload bytes, the message holds {found}")]
    Truncated { header: usize, found: usize },
    #[error("frame payload of {0} bytes does not fit a u32")]
    PayloadTooLong(usize),
}

/// Appends one batch frame to `out`: the header, then `records`, which must be `count` whole records of
/// `shard` numbered from `first_seq` (as the log ring hands them out). Allocates only if `out` lacks room.
pub fn encode_frame(
    shard: ShardId,
    first_seq: LogSeq,
    count: u32,
    records: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = begin_frame(out);
    out.extend_from_slice(records);
    finish_frame(out, start, shard, first_seq, count)
}

/// Starts a frame in place: reserves its header at the end of `out` and returns where the frame begins.
/// Append the records to `out` (e.g. with `log::LogConsumer::drain_batch`, saving a copy), then call
/// [`finish_frame`].
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    start
}

/// Completes the frame [`begin_frame`] started at `start`: everything after its header is the payload.
pub fn finish_frame(
    out: &mut [u8],
    start: usize,
    shard: ShardId,
    first_seq: LogSeq,
    count: u32,
) -> Result<(), FrameError> {
    let payload = out.len() - start - FRAME_HEADER_LEN;
    let payload_len = u32::try_from(payload).map_err(|_| FrameError::PayloadTooLong(payload))?;
    let header: &mut [u8; FRAME_HEADER_LEN] =
        (&mut out[start..start + FRAME_HEADER_LEN]).try_into().expect("begin_frame reserved the header");
    FrameHeader { shard, first_seq, count, payload_len }.write(header);
    Ok(())
}

/// A checked batch: its header and its records' bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    /// The records, exactly `header.count` of them, already checked.
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The records in order, borrowing keys and values from the frame.
    pub fn records(&self) -> Records<'a> {
        Records { rest: self.payload }
    }
}

/// Iterator over a checked frame's records (see [`Frame::records`]).
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = LoggedRecord<'a>;

    fn next(&mut self) -> Option<LoggedRecord<'a>> {
        // The decoder checked every record before handing the frame out, so this cannot fail; should it
        // ever, the iteration ends rather than panicking on peer data.
        let (logged, len) = record::decode(self.rest).ok()?;
        self.rest = &self.rest[len..];
        Some(logged)
    }
}

/// Checks that `payload` is exactly the records `header` promises.
fn check_payload(header: &FrameHeader, payload: &[u8]) -> Result<(), FrameError> {
    let mut rest = payload;
    let mut index = 0u32;
    let mut expected = header.first_seq;
    while !rest.is_empty() {
        if index == header.count {
            return Err(FrameError::CountMismatch { header: header.count, found: index + 1 });
        }
        let (logged, len) = record::decode(rest).map_err(|error| FrameError::Record { index, error })?;
        if logged.shard != header.shard {
            return Err(FrameError::WrongShard { index, expected: header.shard, found: logged.shard });
        }
        if logged.seq != expected {
            return Err(FrameError::SeqGap { index, expected, found: logged.seq });
        }
        expected = expected.next();
        index += 1;
        rest = &rest[len..];
    }
    if index != header.count {
        return Err(FrameError::CountMismatch { header: header.count, found: index });
    }
    Ok(())
}

/// Checks one whole batch frame held in `bytes` (a message of a transport that frames its own stream):
/// exactly one frame, with nothing after it.
pub fn parse_frame(bytes: &[u8], max_payload: usize) -> Result<Frame<'_>, FrameError> {
    let Some(header_bytes) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(FrameError::Short(bytes.len()));
    };
    let header = FrameHeader::parse(header_bytes)?;
    let payload_len = header.payload_len as usize;
    if payload_len > max_payload {
        return Err(FrameError::TooLarge { len: payload_len, max: max_payload });
    }
    if bytes.len() != FRAME_HEADER_LEN + payload_len {
        return Err(FrameError::Truncated { header: payload_len, found: bytes.len() - FRAME_HEADER_LEN });
    }
    let payload = &bytes[FRAME_HEADER_LEN..];
    check_payload(&header, payload)?;
    Ok(Frame { header, payload })
}

/// Reassembles batch frames from a byte stream fed in chunks of any size.
///
/// Keeps one growing buffer; consumed bytes are discarded on the next [`FrameDecoder::feed`], so the
/// buffer's size settles at about one frame plus one read and then allocates no more.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_payload: usize,
    failed: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames whose payload is longer than `max_payload` bytes.
    pub fn new(max_payload: usize) -> FrameDecoder {
        FrameDecoder { buf: Vec::new(), start: 0, max_payload, failed: None }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet handed out as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that stops the stream
    /// (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.check_next() {
            Ok(None) => Ok(None),
            Ok(Some((header, payload_start, end))) => {
                self.start = end;
                Ok(Some(Frame { header, payload: &self.buf[payload_start..end] }))
            }
            Err(error) => {
                self.failed = Some(error.clone());
                Err(error)
            }
        }
    }

    /// Checks the frame at `start`: its header and where its payload lies, if it is all there.
    fn check_next(&self) -> Result<Option<(FrameHeader, usize, usize)>, FrameError> {
        let available = &self.buf[self.start..];
        let Some(header_bytes) = available.first_chunk::<FRAME_HEADER_LEN>() else {
            // Catch a wrong magic before a whole header has arrived: the stream is not ours.
            let seen = available.len().min(FRAME_MAGIC.len());
            if available[..seen] != FRAME_MAGIC[..seen] {
                let mut magic = [0u8; 4];
                magic[..seen].copy_from_slice(&available[..seen]);
                return Err(FrameError::BadMagic(magic));
            }
            return Ok(None);
        };
        let header = FrameHeader::parse(header_bytes)?;
        let payload_len = header.payload_len as usize;
        if payload_len > self.max_payload {
            return Err(FrameError::TooLarge { len: payload_len, max: self.max_payload });
        }
        if available.len() < FRAME_HEADER_LEN + payload_len {
            return Ok(None);
        }
        let payload_start = self.start + FRAME_HEADER_LEN;
        let end = payload_start + payload_len;
        check_payload(&header, &self.buf[payload_start..end])?;
        Ok(Some((header, payload_start, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{any_record, Owned};
    use crate::record::Record;
    use proptest::prelude::*;

    /// Encodes `records` of `shard` from `first_seq` as one frame.
    fn frame_of(shard: u16, first_seq: u64, records: &[Record<'_>]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (offset, record) in records.iter().enumerate() {
            record.encode(ShardId(shard), LogSeq(first_seq + offset as u64), &mut payload).unwrap();
        }
        let mut out = Vec::new();
        encode_frame(ShardId(shard), LogSeq(first_seq), records.len() as u32, &payload, &mut out).unwrap();
        out
    }

    /// Feeds `bytes` in pieces of `piece` bytes and collects every frame as (header, records).
    fn decode_in_pieces(bytes: &[u8], piece: usize) -> Result<Vec<(FrameHeader, Vec<String>)>, FrameError> {
        let mut decoder = FrameDecoder::default();
        let mut frames = Vec::new();
        for chunk in bytes.chunks(piece.max(1)) {
            decoder.feed(chunk);
            while let Some(frame) = decoder.next_frame()? {
                frames.push((frame.header, frame.records().map(|r| format!("{r:?}")).collect()));
            }
        }
        assert_eq!(decoder.buffered(), 0, "no bytes left over");
        Ok(frames)
    }

    #[test]
    fn a_frame_round_trips() {
        let records = [Record::Delete { key: b"a" }, Record::Flush { at: 9 }];
        let bytes = frame_of(2, 10, &records);
        let mut decoder = FrameDecoder::default();
        decoder.feed(&bytes);
        let frame = decoder.next_frame().unwrap().unwrap();
        let payload_len = (bytes.len() - FRAME_HEADER_LEN) as u32;
        assert_eq!(frame.header, FrameHeader { shard: ShardId(2), first_seq: LogSeq(10), count: 2, payload_len });
        assert_eq!(frame.header.last_seq(), LogSeq(11));
        let decoded: Vec<_> = frame.records().map(|r| (r.seq, r.record)).collect();
        assert_eq!(decoded, vec![(LogSeq(10), records[0]), (LogSeq(11), records[1])]);
        assert_eq!(decoder.next_frame(), Ok(None));
    }

    #[test]
    fn a_frame_built_in_place_equals_one_encoded_whole() {
        let records = [Record::Touch { key: b"k", expiry: 3 }, Record::Delete { key: b"k" }];
        let whole = frame_of(1, 5, &records);
        let mut out = b"previous frame".to_vec();
        let start = begin_frame(&mut out);
        records[0].encode(ShardId(1), LogSeq(5), &mut out).unwrap();
        records[1].encode(ShardId(1), LogSeq(6), &mut out).unwrap();
        finish_frame(&mut out, start, ShardId(1), LogSeq(5), 2).unwrap();
        assert_eq!(&out[start..], &whole[..]);
    }

    #[test]
    fn a_gap_in_sequence_numbers_is_refused() {
        let mut payload = Vec::new();
        Record::Flush { at: 1 }.encode(ShardId(0), LogSeq(1), &mut payload).unwrap();
        Record::Flush { at: 2 }.encode(ShardId(0), LogSeq(3), &mut payload).unwrap();
        let mut bytes = Vec::new();
        encode_frame(ShardId(0), LogSeq(1), 2, &payload, &mut bytes).unwrap();
        let mut decoder = FrameDecoder::default();
        decoder.feed(&bytes);
        assert_eq!(decoder.next_frame(), Err(FrameError::SeqGap { index: 1, expected: LogSeq(2), found: LogSeq(3) }));
        assert!(decoder.next_frame().is_err(), "the decoder stays failed");
    }

    #[test]
    fn records_of_another_shard_or_a_wrong_count_are_refused() {
        let mut payload = Vec::new();
        Record::Flush { at: 1 }.encode(ShardId(1), LogSeq(1), &mut payload).unwrap();
        let mut bytes = Vec::new();
        encode_frame(ShardId(0), LogSeq(1), 1, &payload, &mut bytes).unwrap();
        let mut decoder = FrameDecoder::default();
        decoder.feed(&bytes);
        assert!(matches!(decoder.next_frame(), Err(FrameError::WrongShard { .. })));

        let mut payload = Vec::new();
        Record::Flush { at: 1 }.encode(ShardId(0), LogSeq(1), &mut payload).unwrap();
        for count in [0, 2] {
            let mut bytes = Vec::new();
            encode_frame(ShardId(0), LogSeq(1), count, &payload, &mut bytes).unwrap();
            let mut decoder = FrameDecoder::default();
            decoder.feed(&bytes);
            assert!(matches!(decoder.next_frame(), Err(FrameError::CountMismatch { .. })), "count {count}");
        }
    }

    #[test]
    fn a_foreign_stream_is_refused_at_its_first_byte() {
        let mut decoder = FrameDecoder::default();
        decoder.feed(b"G");
        assert_eq!(decoder.next_frame(), Err(FrameError::BadMagic(*b"G\0\0\0")));
    }

    #[test]
    fn an_oversized_payload_is_refused_before_it_is_buffered() {
        let mut bytes = Vec::new();
        encode_frame(ShardId(0), LogSeq(1), 1, &[0u8; 100], &mut bytes).unwrap();
        let mut decoder = FrameDecoder::new(99);
        decoder.feed(&bytes[..FRAME_HEADER_LEN]);
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge { len: 100, max: 99 }));
    }

    fn any_frames() -> impl Strategy<Value = Vec<(u16, u64, Vec<Owned>)>> {
        proptest::collection::vec(
            (any::<u16>(), 0u64..u64::MAX / 2, proptest::collection::vec(any_record(), 0..6)),
            1..5,
        )
    }

    fn stream_of(frames: &[(u16, u64, Vec<Owned>)]) -> Vec<u8> {
        let mut stream = Vec::new();
        for (shard, first_seq, records) in frames {
            let borrowed: Vec<Record<'_>> = records.iter().map(Owned::borrow).collect();
            stream.extend(frame_of(*shard, *first_seq, &borrowed));
        }
        stream
    }

    proptest! {
        #[test]
        fn frames_round_trip_whatever_the_piece_size(frames in any_frames(), piece in 1usize..4000) {
            let stream = stream_of(&frames);
            let whole = decode_in_pieces(&stream, stream.len()).unwrap();
            prop_assert_eq!(whole.len(), frames.len());
            for ((header, records), (shard, first_seq, owned)) in whole.iter().zip(&frames) {
                prop_assert_eq!(header.shard, ShardId(*shard));
                prop_assert_eq!(header.first_seq, LogSeq(*first_seq));
                let expected: Vec<String> = owned.iter().enumerate().map(|(i, o)| format!("{:?}", LoggedRecord {
                    shard: ShardId(*shard), seq: LogSeq(first_seq + i as u64), record: o.borrow() })).collect();
                prop_assert_eq!(records, &expected);
            }
            prop_assert_eq!(&decode_in_pieces(&stream, 1).unwrap(), &whole, "byte by byte");
            prop_assert_eq!(&decode_in_pieces(&stream, piece).unwrap(), &whole);
        }

        #[test]
        fn flipping_any_byte_of_a_frame_is_caught(
            frames in any_frames(), position: prop::sample::Index, mask in 1u8..=255,
        ) {
            let mut stream = stream_of(&frames);
            let at = position.index(stream.len());
            stream[at] ^= mask;
            // Either an error, or (a flipped length) a frame still waiting for bytes that never come;
            // never the original frames as if nothing happened.
            let mut decoder = FrameDecoder::default();
            decoder.feed(&stream);
            let mut good = 0;
            let failed = loop {
                match decoder.next_frame() {
                    Ok(Some(_)) => good += 1,
                    Ok(None) => break false,
                    Err(_) => break true,
                }
            };
            prop_assert!(failed || good < frames.len(), "flip at {} went unnoticed", at);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024), piece in 1usize..64) {
            let mut decoder = FrameDecoder::new(4096);
            for chunk in bytes.chunks(piece) {
                decoder.feed(chunk);
                while let Ok(Some(frame)) = decoder.next_frame() {
                    let _ = frame.records().count();
                }
            }
        }

        #[test]
        fn arbitrary_payloads_behind_a_valid_header_never_panic(
            shard: u16, first_seq: u64, count in 0u32..5, payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = Vec::new();
            encode_frame(ShardId(shard), LogSeq(first_seq), count, &payload, &mut bytes).unwrap();
            let mut decoder = FrameDecoder::default();
            decoder.feed(&bytes);
            let _ = decoder.next_frame();
        }
    }
}
