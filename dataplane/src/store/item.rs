//! The packed item layout: a variable-length header, then the key, then the value, with no padding.
//!
//! ```text
//! offset  size  field
//! 0       1     key_len
//! 1       1     bits: FETCHED, ACCESSED, STALE, WIN_SENT, KEY_BINARY (state), DEAD and HAS_FLAGS
//! 2       2     last_access: RelTime mod 2^16
//! 4       4     exptime: RelTime, 0 = never
//! 8       8     cas
//! 16      0|4   client_flags, present only when nonzero (HAS_FLAGS)
//! 16|20   1..5  value_len, LEB128
//! ```
//!
//! The fields that change in place (bits, last_access, exptime, cas) sit at fixed offsets, so a touch,
//! a read's bump or an invalidation rewrites a few bytes and never moves the item. A typical header is
//! 17 bytes (no client flags, value under 128 bytes). All access is by byte copies: items are not
//! aligned.
//!
//! `last_access` keeps only 16 bits of the clock, so an idle time (`now - last_access`) is exact for
//! items touched within the last 18 hours and wraps beyond that. memcached's `mg l` and `me` report it;
//! nothing in eviction depends on it.
//!
//! Also here: [`ValueChunks`], the allocation-free iterator over the contiguous pieces of a value.

use super::segment::{SegmentMeta, SEGMENT_SHIFT, SEGMENT_SIZE};
use crate::clock::RelTime;

/// The item was read since it was stored (mg `h`, `expired_unfetched`, `evicted_unfetched`).
pub const FETCHED: u8 = 0x01;
/// The item was read since it was last written or re-appended: it earns a second chance at reclaim.
pub const ACCESSED: u8 = 0x02;
/// Invalidated by md/ms `I`: still served, flagged stale.
pub const STALE: u8 = 0x04;
/// A reader was already given the win (mg `W`); later readers see `Z`.
pub const WIN_SENT: u8 = 0x08;
/// The key arrived base64-encoded (meta `b`); meta `mg k` and `me` show it encoded again.
pub const KEY_BINARY: u8 = 0x10;
/// This copy of the item is no longer its key's item (replaced, deleted, evicted, reclaimed or moved):
/// a store rebuilt from a memory file skips it. Set once, never cleared; kept by [`set_bits`].
const DEAD: u8 = 0x40;
/// Layout bit: the header carries 4 bytes of client flags.
const HAS_FLAGS: u8 = 0x80;
/// The state bits callers may set; [`HAS_FLAGS`] is managed by the codec.
pub const STATE_BITS: u8 = FETCHED | ACCESSED | STALE | WIN_SENT | KEY_BINARY;

const KEY_LEN_AT: usize = 0;
const BITS_AT: usize = 1;
const LAST_ACCESS_AT: usize = 2;
const EXPTIME_AT: usize = 4;
const CAS_AT: usize = 8;
const FIXED_LEN: usize = 16;
const FLAGS_LEN: usize = 4;
/// LEB128 of a u32 takes at most 5 bytes.
const MAX_VARINT_LEN: usize = 5;
/// The longest header: fixed part, client flags, a 5-byte length.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + FLAGS_LEN + MAX_VARINT_LEN;

/// A decoded item header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub key_len: u8,
    /// State bits only ([`STATE_BITS`]).
    pub bits: u8,
    pub last_access: u16,
    pub exptime: RelTime,
    pub cas: u64,
    pub client_flags: u32,
    pub value_len: u32,
}

impl Header {
    /// Bytes the encoded header takes.
    #[inline]
    pub fn encoded_len(&self) -> usize {
        let flags = if self.client_flags != 0 { FLAGS_LEN } else { 0 };
        FIXED_LEN + flags + varint_len(self.value_len)
    }

    /// Bytes the whole item takes: header, key and value.
    #[inline]
    pub fn total_len(&self) -> usize {
        self.encoded_len() + self.key_len as usize + self.value_len as usize
    }

    /// Whether the item is dead by expiry at `now`.
    #[inline]
    pub fn is_expired(&self, now: RelTime) -> bool {
        is_expired(self.exptime, now)
    }

    /// Idle seconds at `now`, modulo 2^16 (see the module docs).
    #[inline]
    pub fn idle_secs(&self, now: RelTime) -> u32 {
        (now as u16).wrapping_sub(self.last_access) as u32
    }

    /// Writes the header at the start of `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let len = self.encoded_len();
        debug_assert!(len <= MAX_HEADER_LEN);
        let out = &mut out[..len];
        out[KEY_LEN_AT] = self.key_len;
        let layout = if self.client_flags != 0 { HAS_FLAGS } else { 0 };
        out[BITS_AT] = (self.bits & STATE_BITS) | layout;
        out[LAST_ACCESS_AT..EXPTIME_AT].copy_from_slice(&self.last_access.to_le_bytes());
        out[EXPTIME_AT..CAS_AT].copy_from_slice(&self.exptime.to_le_bytes());
        out[CAS_AT..FIXED_LEN].copy_from_slice(&self.cas.to_le_bytes());
        let mut at = FIXED_LEN;
        if self.client_flags != 0 {
            out[at..at + FLAGS_LEN].copy_from_slice(&self.client_flags.to_le_bytes());
            at += FLAGS_LEN;
        }
        write_varint(self.value_len, &mut out[at..]);
        len
    }

    /// Reads a header from the start of `item` (which must hold at least the whole header).
    pub fn decode(item: &[u8]) -> Header {
        let layout = item[BITS_AT];
        let mut at = FIXED_LEN;
        let client_flags = if layout & HAS_FLAGS != 0 {
            at += FLAGS_LEN;
            read_u32(&item[FIXED_LEN..])
        } else {
            0
        };
        Header {
            key_len: item[KEY_LEN_AT],
            bits: layout & STATE_BITS,
            last_access: u16::from_le_bytes([item[LAST_ACCESS_AT], item[LAST_ACCESS_AT + 1]]),
            exptime: read_u32(&item[EXPTIME_AT..]),
            cas: u64::from_le_bytes(item[CAS_AT..FIXED_LEN].try_into().expect("8 bytes")),
            client_flags,
            value_len: read_varint(&item[at..]),
        }
    }
}

/// `exptime != 0 && exptime <= now`: memcached's rule.
#[inline]
pub fn is_expired(exptime: RelTime, now: RelTime) -> bool {
    exptime != 0 && exptime <= now
}

/// The key of the encoded item at the start of `item`, decoding only what locating it needs.
#[inline]
pub fn key_of(item: &[u8]) -> &[u8] {
    let key_len = item[KEY_LEN_AT] as usize;
    let mut at = FIXED_LEN;
    if item[BITS_AT] & HAS_FLAGS != 0 {
        at += FLAGS_LEN;
    }
    at += varint_len_at(&item[at..]);
    &item[at..at + key_len]
}

/// Rewrites the state bits of the encoded item at the start of `item`.
#[inline]
pub fn set_bits(item: &mut [u8], bits: u8) {
    item[BITS_AT] = (item[BITS_AT] & (HAS_FLAGS | DEAD)) | (bits & STATE_BITS);
}

/// Marks the encoded item at the start of `item` dead (see [`DEAD`]).
#[inline]
pub fn mark_dead(item: &mut [u8]) {
    item[BITS_AT] |= DEAD;
}

/// Whether the encoded item at the start of `item` is marked dead.
#[inline]
pub fn is_marked_dead(item: &[u8]) -> bool {
    item[BITS_AT] & DEAD != 0
}

/// The length of the header encoded at the start of `bytes` and its key length, if the bytes hold a
/// plausible whole header (a memory file's contents are checked before they are believed).
pub fn checked_header_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < FIXED_LEN + 1 || bytes[BITS_AT] & !(STATE_BITS | DEAD | HAS_FLAGS) != 0 {
        return None;
    }
    let mut at = FIXED_LEN;
    if bytes[BITS_AT] & HAS_FLAGS != 0 {
        at += FLAGS_LEN;
    }
    let varint = bytes.get(at..)?;
    let len = varint.iter().take(MAX_VARINT_LEN).position(|b| b & 0x80 == 0)? + 1;
    (at + len <= bytes.len()).then_some(at + len)
}

/// Rewrites the last access time in place.
#[inline]
pub fn set_last_access(item: &mut [u8], now: RelTime) {
    item[LAST_ACCESS_AT..EXPTIME_AT].copy_from_slice(&(now as u16).to_le_bytes());
}

/// Rewrites the expiry in place.
#[inline]
pub fn set_exptime(item: &mut [u8], exptime: RelTime) {
    item[EXPTIME_AT..CAS_AT].copy_from_slice(&exptime.to_le_bytes());
}

/// Rewrites the CAS in place.
#[inline]
pub fn set_cas(item: &mut [u8], cas: u64) {
    item[CAS_AT..FIXED_LEN].copy_from_slice(&cas.to_le_bytes());
}

#[inline]
fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

#[inline]
fn varint_len(mut value: u32) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

/// Length of the LEB128 number at the start of `bytes`.
#[inline]
fn varint_len_at(bytes: &[u8]) -> usize {
    bytes.iter().take(MAX_VARINT_LEN).position(|b| b & 0x80 == 0).map_or(MAX_VARINT_LEN, |i| i + 1)
}

#[inline]
fn write_varint(mut value: u32, out: &mut [u8]) {
    let mut at = 0;
    while value >= 0x80 {
        out[at] = (value as u8) | 0x80;
        value >>= 7;
        at += 1;
    }
    out[at] = value as u8;
}

#[inline]
fn read_varint(bytes: &[u8]) -> u32 {
    let mut value = 0u32;
    for (i, &byte) in bytes.iter().take(MAX_VARINT_LEN).enumerate() {
        value |= ((byte & 0x7f) as u32) << (7 * i);
        if byte & 0x80 == 0 {
            break;
        }
    }
    value
}

/// Iterator over the contiguous pieces of a value: one piece, or one per segment the value touches
/// when the item spans segments (following the log order). Borrowed from the store; allocates nothing.
pub struct ValueChunks<'a> {
    arena: &'a [u8],
    /// Segment links, to follow a spanning value; empty for a plain slice.
    segments: &'a [SegmentMeta],
    at: usize,
    remaining: usize,
}

impl<'a> ValueChunks<'a> {
    /// The value `remaining` bytes long starting at arena address `at`.
    pub(super) fn in_arena(arena: &'a [u8], segments: &'a [SegmentMeta], at: usize, remaining: usize) -> Self {
        ValueChunks { arena, segments, at, remaining }
    }

    /// A value that is one contiguous slice (for item views that are not in an arena).
    pub fn single(value: &'a [u8]) -> Self {
        ValueChunks { arena: value, segments: &[], at: 0, remaining: value.len() }
    }
}

impl<'a> From<&'a [u8]> for ValueChunks<'a> {
    fn from(value: &'a [u8]) -> Self {
        ValueChunks::single(value)
    }
}

impl<'a> Iterator for ValueChunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.remaining == 0 {
            return None;
        }
        if self.segments.is_empty() {
            let chunk = &self.arena[self.at..self.at + self.remaining];
            self.remaining = 0;
            return Some(chunk);
        }
        let segment = self.at >> SEGMENT_SHIFT;
        let segment_end = (segment + 1) << SEGMENT_SHIFT;
        let len = self.remaining.min(segment_end - self.at);
        let chunk = &self.arena[self.at..self.at + len];
        self.remaining -= len;
        if self.remaining > 0 {
            // The value continues at the start of the next segment in log order.
            self.at = (self.segments[segment].next as usize) * SEGMENT_SIZE;
        }
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(header: Header) {
        let mut buf = [0u8; MAX_HEADER_LEN + 8];
        let len = header.encode(&mut buf);
        assert_eq!(len, header.encoded_len());
        assert_eq!(Header::decode(&buf), header);
    }

    #[test]
    fn header_round_trips_with_and_without_flags() {
        let base = Header {
            key_len: 10,
            bits: FETCHED | STALE,
            last_access: 0xbeef,
            exptime: 12345,
            cas: 0x0102_0304_0506_0708,
            client_flags: 0,
            value_len: 100,
        };
        round_trip(base);
        assert_eq!(base.encoded_len(), 17, "the typical header is 17 bytes");
        round_trip(Header { client_flags: 0xdead_beef, ..base });
        assert_eq!(Header { client_flags: 1, ..base }.encoded_len(), 21);
    }

    #[test]
    fn header_round_trips_large_lengths() {
        for value_len in [0, 127, 128, 16_383, 16_384, 1 << 20, (1 << 30) + 7, u32::MAX] {
            let header = Header {
                key_len: 250,
                bits: STATE_BITS,
                last_access: 0,
                exptime: u32::MAX,
                cas: u64::MAX,
                client_flags: u32::MAX,
                value_len,
            };
            round_trip(header);
        }
        assert_eq!(
            Header { key_len: 1, bits: 0, last_access: 0, exptime: 0, cas: 1, client_flags: 0, value_len: u32::MAX }
                .encoded_len(),
            FIXED_LEN + 5
        );
    }

    #[test]
    fn in_place_updates_touch_only_their_field() {
        let header =
            Header { key_len: 3, bits: 0, last_access: 1, exptime: 2, cas: 3, client_flags: 7, value_len: 300 };
        let mut buf = [0u8; 64];
        let len = header.encode(&mut buf);
        buf[len..len + 3].copy_from_slice(b"abc");
        set_bits(&mut buf, ACCESSED | WIN_SENT);
        set_last_access(&mut buf, 0x1_0005);
        set_exptime(&mut buf, 99);
        set_cas(&mut buf, 42);
        let updated = Header::decode(&buf);
        assert_eq!(updated, Header { bits: ACCESSED | WIN_SENT, last_access: 5, exptime: 99, cas: 42, ..header });
        assert_eq!(key_of(&buf), b"abc");
        assert!(!is_marked_dead(&buf));
        mark_dead(&mut buf);
        set_bits(&mut buf, FETCHED);
        assert!(is_marked_dead(&buf), "state updates keep the dead mark");
        assert_eq!(Header::decode(&buf).bits, FETCHED, "the dead mark is not a state bit");
        assert_eq!(Header::decode(&buf).client_flags, 7);
        assert_eq!(checked_header_len(&buf), Some(len));
        assert_eq!(checked_header_len(&buf[..len - 1]), None);
    }

    #[test]
    fn idle_time_wraps_at_16_bits() {
        let header =
            Header { key_len: 1, bits: 0, last_access: 65530, exptime: 0, cas: 1, client_flags: 0, value_len: 0 };
        assert_eq!(header.idle_secs(65536 + 4), 10);
        assert_eq!(header.idle_secs(65530), 0);
    }

    #[test]
    fn expiry_rule_matches_memcached() {
        assert!(!is_expired(0, 100));
        assert!(is_expired(100, 100));
        assert!(!is_expired(101, 100));
        assert!(is_expired(1, 2));
    }
}
