//! The replication log record: one logical, self-contained mutation of one shard, and its wire encoding.
//!
//! A [`Record`] says what the standby must do, never how the active computed it: `incr`, `decr`,
//! `append`, `prepend` and `cas` ship as the [`Record::Set`] of their result, so the standby never
//! re-executes logic. Expiry is absolute (unix seconds, `0` = never), so a record means the same thing
//! whenever it is applied. A [`LoggedRecord`] is a record with its place: shard and [`LogSeq`].
//!
//! Encoding (all integers little-endian), the same in the shard's log ring, in batch frames and on disk:
//!
//! ```text
//! 0  version  u8   = RECORD_VERSION
//! 1  kind     u8   1 SET, 2 DELETE, 3 TOUCH, 4 FLUSH
//! 2  shard    u16
//! 4  length   u32  of the whole record, this header and the checksum included
//! 8  seq      u64
//! 16 fields        SET:    flags u32, expiry u64, cas u64, key_len u16, value_len u32, key, value
//!                  DELETE: key_len u16, key
//!                  TOUCH:  expiry u64, key_len u16, key
//!                  FLUSH:  at u64 (unix seconds; items stored at or before it are gone)
//! ..  crc32c  u32  (Castagnoli) of every byte before it
//! ```
//!
//! [`decode`] borrows key and value from the input (zero copy) and returns a typed [`DecodeError`] for
//! every way bytes can be wrong: too few, a checksum that does not match, an unknown version or kind, or
//! lengths that contradict each other.

use crate::ids::{LogSeq, ShardId};
use thiserror::Error;

/// The record format this crate writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before the fields: version, kind, shard, length, seq.
pub const HEADER_LEN: usize = 16;
/// Bytes of the trailing checksum.
pub const CRC_LEN: usize = 4;
/// The longest key a record carries (the binary protocol's limit; memcached's own is 250).
pub const MAX_KEY_LEN: usize = u16::MAX as usize;

const KIND_SET: u8 = 1;
const KIND_DELETE: u8 = 2;
const KIND_TOUCH: u8 = 3;
const KIND_FLUSH: u8 = 4;

/// One logical mutation of a shard. Borrows key and value, from the store on the active and from the
/// received bytes on the standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Store `value` under `key`, replacing what was there (also the result of incr/decr/append/prepend/cas).
    Set { key: &'a [u8], flags: u32, expiry: u64, cas: u64, value: &'a [u8] },
    /// Remove `key`.
    Delete { key: &'a [u8] },
    /// Give `key` a new absolute expiry (unix seconds, `0` = never).
    Touch { key: &'a [u8], expiry: u64 },
    /// Invalidate every item stored at or before unix time `at` (memcached's `flush_all [delay]`).
    Flush { at: u64 },
}

/// A record at its place in a shard's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedRecord<'a> {
    pub shard: ShardId,
    pub seq: LogSeq,
    pub record: Record<'a>,
}

/// Why a record cannot be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    #[error("key of {0} bytes is longer than a record carries ({MAX_KEY_LEN})")]
    KeyTooLong(usize),
    #[error("record of {0} bytes does not fit a u32 length")]
    TooLarge(usize),
}

/// Why bytes are not a valid record.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record needs; `needed` is the total the record would take, when known.
    #[error("truncated record: have {have} bytes, need {needed}")]
    Truncated { have: usize, needed: usize },
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// The length field, or a key/value length, contradicts the bytes that are there.
    #[error("record lengths do not add up: {0}")]
    BadLength(&'static str),
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
}

impl<'a> Record<'a> {
    /// Bytes of the fields of this kind of record.
    fn fields_len(&self) -> usize {
        match self {
            Record::Set { key, value, .. } => 4 + 8 + 8 + 2 + 4 + key.len() + value.len(),
            Record::Delete { key } => 2 + key.len(),
            Record::Touch { key, .. } => 8 + 2 + key.len(),
            Record::Flush { .. } => 8,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Record::Set { .. } => KIND_SET,
            Record::Delete { .. } => KIND_DELETE,
            Record::Touch { .. } => KIND_TOUCH,
            Record::Flush { .. } => KIND_FLUSH,
        }
    }

    /// The key this record changes; `None` for a flush.
    pub fn key(&self) -> Option<&'a [u8]> {
        match *self {
            Record::Set { key, .. } | Record::Delete { key } | Record::Touch { key, .. } => Some(key),
            Record::Flush { .. } => None,
        }
    }

    /// Bytes [`Record::encode`] will append, or why it cannot.
    pub fn encoded_len(&self) -> Result<usize, EncodeError> {
        if let Some(key) = self.key() {
            if key.len() > MAX_KEY_LEN {
                return Err(EncodeError::KeyTooLong(key.len()));
            }
        }
        let total = HEADER_LEN + self.fields_len() + CRC_LEN;
        if u32::try_from(total).is_err() {
            return Err(EncodeError::TooLarge(total));
        }
        Ok(total)
    }

    /// Appends the encoding of this record, logged at `seq` of `shard`, to `out`; returns its length.
    /// Allocates only if `out` lacks the capacity.
    pub fn encode(&self, shard: ShardId, seq: LogSeq, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        let total = self.encoded_len()?;
        let start = out.len();
        out.reserve(total);
        out.push(RECORD_VERSION);
        out.push(self.kind());
        out.extend_from_slice(&shard.0.to_le_bytes());
        out.extend_from_slice(&(total as u32).to_le_bytes());
        out.extend_from_slice(&seq.0.to_le_bytes());
        match *self {
            Record::Set { key, flags, expiry, cas, value } => {
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&expiry.to_le_bytes());
                out.extend_from_slice(&cas.to_le_bytes());
                out.extend_from_slice(&(key.len() as u16).to_le_bytes());
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(value);
            }
            Record::Delete { key } => {
                out.extend_from_slice(&(key.len() as u16).to_le_bytes());
                out.extend_from_slice(key);
            }
            Record::Touch { key, expiry } => {
                out.extend_from_slice(&expiry.to_le_bytes());
                out.extend_from_slice(&(key.len() as u16).to_le_bytes());
                out.extend_from_slice(key);
            }
            Record::Flush { at } => out.extend_from_slice(&at.to_le_bytes()),
        }
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, total);
        Ok(total)
    }
}

/// Where one encoded record sits, read from its header without checking the rest: what the log ring
/// needs to step from record to record in bytes it wrote itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub shard: ShardId,
    pub seq: LogSeq,
    /// Bytes of the whole record.
    pub len: usize,
}

/// Reads the header at the start of `bytes` (no checksum or field checks: use [`decode`] for that).
pub fn peek_header(bytes: &[u8]) -> Result<RecordHeader, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated { have: bytes.len(), needed: HEADER_LEN });
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    if len < HEADER_LEN + CRC_LEN {
        return Err(DecodeError::BadLength("record length shorter than header and checksum"));
    }
    Ok(RecordHeader {
        shard: ShardId(u16::from_le_bytes([bytes[2], bytes[3]])),
        seq: LogSeq(u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"))),
        len,
    })
}

/// A little-endian reader over a record's fields that reports lying lengths instead of panicking.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::BadLength("a field runs past the record's end"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::BadLength("bytes left over after the record's fields"))
        }
    }
}

/// Decodes the record at the start of `bytes`; returns it (borrowing key and value) and its length.
/// Bytes after the record are left alone.
pub fn decode(bytes: &[u8]) -> Result<(LoggedRecord<'_>, usize), DecodeError> {
    if let Some(&version) = bytes.first() {
        if version != RECORD_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
    }
    let header = peek_header(bytes)?;
    if bytes.len() < header.len {
        return Err(DecodeError::Truncated { have: bytes.len(), needed: header.len });
    }
    let body_end = header.len - CRC_LEN;
    let stored = u32::from_le_bytes(bytes[body_end..header.len].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..body_end]);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    let mut fields = Fields { bytes: &bytes[HEADER_LEN..body_end] };
    let record = match bytes[1] {
        KIND_SET => {
            let flags = fields.u32()?;
            let expiry = fields.u64()?;
            let cas = fields.u64()?;
            let key_len = usize::from(fields.u16()?);
            let value_len = fields.u32()? as usize;
            let key = fields.take(key_len)?;
            let value = fields.take(value_len)?;
            Record::Set { key, flags, expiry, cas, value }
        }
        KIND_DELETE => {
            let key_len = usize::from(fields.u16()?);
            Record::Delete { key: fields.take(key_len)? }
        }
        KIND_TOUCH => {
            let expiry = fields.u64()?;
            let key_len = usize::from(fields.u16()?);
            Record::Touch { key: fields.take(key_len)?, expiry }
        }
        KIND_FLUSH => Record::Flush { at: fields.u64()? },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    fields.finish()?;
    Ok((LoggedRecord { shard: header.shard, seq: header.seq, record }, header.len))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An owned record, so proptest can generate what [`Record`] borrows.
    #[derive(Clone, Debug)]
    pub(crate) enum Owned {
        Set { key: Vec<u8>, flags: u32, expiry: u64, cas: u64, value: Vec<u8> },
        Delete { key: Vec<u8> },
        Touch { key: Vec<u8>, expiry: u64 },
        Flush { at: u64 },
    }

    impl Owned {
        pub(crate) fn borrow(&self) -> Record<'_> {
            match self {
                Owned::Set { key, flags, expiry, cas, value } => {
                    Record::Set { key, flags: *flags, expiry: *expiry, cas: *cas, value }
                }
                Owned::Delete { key } => Record::Delete { key },
                Owned::Touch { key, expiry } => Record::Touch { key, expiry: *expiry },
                Owned::Flush { at } => Record::Flush { at: *at },
            }
        }
    }

    pub(crate) fn any_record() -> impl Strategy<Value = Owned> {
        let key = proptest::collection::vec(any::<u8>(), 0..300);
        let value = proptest::collection::vec(any::<u8>(), 0..2000);
        prop_oneof![
            (key.clone(), any::<u32>(), any::<u64>(), any::<u64>(), value).prop_map(
                |(key, flags, expiry, cas, value)| Owned::Set { key, flags, expiry, cas, value }
            ),
            key.clone().prop_map(|key| Owned::Delete { key }),
            (key, any::<u64>()).prop_map(|(key, expiry)| Owned::Touch { key, expiry }),
            any::<u64>().prop_map(|at| Owned::Flush { at }),
        ]
    }

    fn encoded(record: Record<'_>, shard: u16, seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        record.encode(ShardId(shard), LogSeq(seq), &mut out).unwrap();
        out
    }

    /// Re-seals `bytes` with a correct checksum after a test edits them on purpose.
    fn reseal(bytes: &mut [u8]) {
        let end = bytes.len() - CRC_LEN;
        let crc = crc32c::crc32c(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn set_round_trips_and_borrows_key_and_value() {
        let record = Record::Set { key: b"k", flags: 7, expiry: 1_900_000_000, cas: 42, value: b"hello" };
        let bytes = encoded(record, 3, 9);
        let (logged, len) = decode(&bytes).unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(logged, LoggedRecord { shard: ShardId(3), seq: LogSeq(9), record });
        let Record::Set { value, .. } = logged.record else { panic!("not a set") };
        assert_eq!(value.as_ptr(), bytes[bytes.len() - CRC_LEN - 5..].as_ptr(), "value is borrowed");
    }

    #[test]
    fn decode_leaves_following_bytes_alone() {
        let mut bytes = encoded(Record::Delete { key: b"a" }, 0, 1);
        let first = bytes.len();
        bytes.extend(encoded(Record::Flush { at: 5 }, 0, 2));
        let (logged, len) = decode(&bytes).unwrap();
        assert_eq!((logged.seq, len), (LogSeq(1), first));
        assert_eq!(decode(&bytes[len..]).unwrap().0.record, Record::Flush { at: 5 });
    }

    #[test]
    fn truncated_input_says_how_much_is_needed() {
        let bytes = encoded(Record::Touch { key: b"key", expiry: 1 }, 0, 1);
        assert_eq!(decode(&[]), Err(DecodeError::Truncated { have: 0, needed: HEADER_LEN }));
        assert_eq!(decode(&bytes[..10]), Err(DecodeError::Truncated { have: 10, needed: HEADER_LEN }));
        let short = &bytes[..bytes.len() - 1];
        assert_eq!(decode(short), Err(DecodeError::Truncated { have: short.len(), needed: bytes.len() }));
    }

    #[test]
    fn unknown_version_and_kind_are_named() {
        let mut bytes = encoded(Record::Flush { at: 1 }, 0, 1);
        bytes[0] = 2;
        reseal(&mut bytes);
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownVersion(2)));
        bytes[0] = RECORD_VERSION;
        bytes[1] = 9;
        reseal(&mut bytes);
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(9)));
    }

    #[test]
    fn lengths_that_lie_are_refused_even_with_a_good_checksum() {
        // key_len says 200 bytes but the record holds 3.
        let mut bytes = encoded(Record::Delete { key: b"abc" }, 0, 1);
        bytes[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&200u16.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(decode(&bytes), Err(DecodeError::BadLength(_))));
        // key_len says 1 byte: two bytes are left over.
        bytes[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&1u16.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(decode(&bytes), Err(DecodeError::BadLength(_))));
        // The record length is shorter than a header.
        let mut bytes = encoded(Record::Flush { at: 1 }, 0, 1);
        bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(DecodeError::BadLength(_))));
    }

    #[test]
    fn bad_checksum_is_reported() {
        let mut bytes = encoded(Record::Set { key: b"k", flags: 0, expiry: 0, cas: 1, value: b"v" }, 1, 1);
        let last = bytes.len() - CRC_LEN - 1;
        bytes[last] ^= 1;
        assert!(matches!(decode(&bytes), Err(DecodeError::BadChecksum { .. })));
    }

    #[test]
    fn keys_longer_than_the_format_allows_are_refused() {
        let key = vec![b'k'; MAX_KEY_LEN + 1];
        let mut out = Vec::new();
        let err = Record::Delete { key: &key }.encode(ShardId(0), LogSeq(1), &mut out);
        assert_eq!(err, Err(EncodeError::KeyTooLong(MAX_KEY_LEN + 1)));
        assert!(out.is_empty());
    }

    #[test]
    fn every_single_bit_flip_of_every_kind_is_caught() {
        let kinds = [
            Record::Set { key: b"key", flags: 1, expiry: 2, cas: 3, value: b"value" },
            Record::Delete { key: b"key" },
            Record::Touch { key: b"key", expiry: 9 },
            Record::Flush { at: 1_700_000_000 },
        ];
        for record in kinds {
            let bytes = encoded(record, 5, 77);
            for at in 0..bytes.len() {
                for bit in 0..8 {
                    let mut flipped = bytes.clone();
                    flipped[at] ^= 1 << bit;
                    assert!(decode(&flipped).is_err(), "{record:?}: bit {bit} of byte {at} went unnoticed");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_record_round_trips(record in any_record(), shard: u16, seq: u64) {
            let bytes = encoded(record.borrow(), shard, seq);
            prop_assert_eq!(bytes.len(), record.borrow().encoded_len().unwrap());
            let (logged, len) = decode(&bytes).unwrap();
            prop_assert_eq!(len, bytes.len());
            prop_assert_eq!(logged, LoggedRecord { shard: ShardId(shard), seq: LogSeq(seq), record: record.borrow() });
        }

        #[test]
        fn flipping_any_byte_never_decodes_as_the_whole_record(
            record in any_record(), seq: u64, position: prop::sample::Index, mask in 1u8..=255,
        ) {
            let mut bytes = encoded(record.borrow(), 0, seq);
            let at = position.index(bytes.len());
            bytes[at] ^= mask;
            prop_assert!(decode(&bytes).is_err(), "flipped byte {} of {} decoded", at, bytes.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = peek_header(&bytes);
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(
            kind in 0u8..6, len in 0u32..600, body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![RECORD_VERSION, kind, 0, 0];
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&1u64.to_le_bytes());
            bytes.extend_from_slice(&body);
            if bytes.len() >= HEADER_LEN + CRC_LEN && (len as usize) <= bytes.len() && len as usize >= HEADER_LEN + CRC_LEN {
                // Seal so decoding reaches the field parser instead of stopping at the checksum.
                let end = len as usize - CRC_LEN;
                let crc = crc32c::crc32c(&bytes[..end]);
                bytes[end..end + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = decode(&bytes);
        }
    }
}
