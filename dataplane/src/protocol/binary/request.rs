//! Parsing one request packet: [`parse`] turns the front of a connection's buffer into a [`Request`]
//! that borrows its key and value from the buffer, or says what to do about bad input.
//!
//! The checks and their order are memcached 1.6.18's (`try_read_command_binary`,
//! `dispatch_bin_command`), because the order decides what a client sees:
//! 1. Fewer than 24 bytes: wait. A magic other than 0x80: close without a reply.
//! 2. Wait for the extras and the key (not the value).
//! 3. Key and extras longer than the body: "Unknown command", then close.
//! 4. A key longer than 250 bytes: "Invalid arguments", then close.
//! 5. An opcode memcached does not execute: "Unknown command"; memcached then drops `body_len` bytes
//!    *after* the extras and key it has already read, so a packet with extras or a key takes as many
//!    bytes of what follows with it. SASL opcodes are refused the same way, dropping just the body.
//! 6. Extras, key or value of the wrong size for the opcode: "Invalid arguments", then close.
//! 7. A value larger than the item size limit: "Too large.", the value swallowed.
//!
//! Requests whose body memcached does not read in full (TOUCH and the GAT family, STAT) leave the
//! rest of the body in the buffer, where it is parsed as the next request, as memcached does.

use std::borrow::Cow;

use super::response::{error_packet, Echo};
use super::wire::{
    Family, Header, Opcode, Status, HEADER_LEN, REQUEST_MAGIC, SASL_AUTH, SASL_LIST_MECHS,
    SASL_STEP,
};
use crate::protocol::{Invalid, Limits, Parse};
use crate::store::MAX_KEY_LEN;

/// One request, borrowing its key and value from the input buffer. The header's data type and
/// vbucket are ignored, as memcached ignores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub opcode: Opcode,
    /// Echoed in the response.
    pub opaque: u32,
    /// The header's CAS: 0 is none; else compare before storing, deleting, incrementing.
    pub cas: u64,
    /// The extras, decoded (their size was checked against the opcode).
    pub extras: Extras,
    pub key: &'a [u8],
    /// The value of a storage command; empty for every other opcode.
    pub value: &'a [u8],
}

/// The extras an opcode carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extras {
    None,
    /// SET, ADD, REPLACE: the client's flags and the expiration.
    Store {
        flags: u32,
        exptime: u32,
    },
    /// INCREMENT, DECREMENT: the delta, the value to create a missing item with, and its expiration
    /// ([`super::wire::ARITH_NO_CREATE`]: do not create).
    Arith {
        delta: u64,
        initial: u64,
        exptime: u32,
    },
    /// TOUCH, the GAT family (the new expiration) and FLUSH with its optional delay.
    Exptime(u32),
}

impl Extras {
    /// Encoded length.
    pub fn len(&self) -> usize {
        match self {
            Extras::None => 0,
            Extras::Store { .. } => 8,
            Extras::Arith { .. } => 20,
            Extras::Exptime(_) => 4,
        }
    }

    /// True for [`Extras::None`].
    pub fn is_empty(&self) -> bool {
        matches!(self, Extras::None)
    }

    /// Appends the encoded extras.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Extras::None => {}
            Extras::Store { flags, exptime } => {
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&exptime.to_be_bytes());
            }
            Extras::Arith {
                delta,
                initial,
                exptime,
            } => {
                out.extend_from_slice(&delta.to_be_bytes());
                out.extend_from_slice(&initial.to_be_bytes());
                out.extend_from_slice(&exptime.to_be_bytes());
            }
            Extras::Exptime(exptime) => out.extend_from_slice(&exptime.to_be_bytes()),
        }
    }
}

impl<'a> Request<'a> {
    /// What the response copies from this request.
    #[inline]
    pub fn echo(&self) -> Echo {
        Echo {
            opcode: self.opcode.byte(),
            opaque: self.opaque,
        }
    }

    /// The length of the encoded request.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.extras.len() + self.key.len() + self.value.len()
    }

    /// Appends the request as a packet (data type and vbucket 0): what a client would send. Used to
    /// hand a request to another core, and by tests.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let body_len = self.extras.len() + self.key.len() + self.value.len();
        Header {
            magic: REQUEST_MAGIC,
            opcode: self.opcode.byte(),
            key_len: self.key.len() as u16,
            extras_len: self.extras.len() as u8,
            data_type: 0,
            vbucket: 0,
            body_len: body_len as u32,
            opaque: self.opaque,
            cas: self.cas,
        }
        .encode(out);
        self.extras.encode(out);
        out.extend_from_slice(self.key);
        out.extend_from_slice(self.value);
    }
}

/// What an opcode's body must hold (memcached's `dispatch_bin_command` checks).
#[derive(Clone, Copy)]
struct Shape {
    extras: ExtrasShape,
    key: KeyRule,
    body: BodyRule,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExtrasShape {
    None,
    Store,
    Arith,
    Exptime,
    /// FLUSH: none, or the 4-byte delay.
    OptionalExptime,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyRule {
    Required,
    Forbidden,
    Optional,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyRule {
    /// The body is exactly extras and key.
    Exact,
    /// The rest of the body is the value.
    Value,
    /// Only extras and key are read; anything more stays in the buffer as the next request.
    Unread,
}

impl Shape {
    fn of(family: Family) -> Shape {
        use BodyRule::*;
        use KeyRule::*;
        let shape = |extras, key, body| Shape { extras, key, body };
        match family {
            Family::Get { .. } | Family::Delete => shape(ExtrasShape::None, Required, Exact),
            Family::Touch | Family::Gat { .. } => shape(ExtrasShape::Exptime, Required, Unread),
            Family::Store(_) => shape(ExtrasShape::Store, Required, Value),
            Family::Concat { .. } => shape(ExtrasShape::None, Required, Value),
            Family::Arith { .. } => shape(ExtrasShape::Arith, Required, Exact),
            Family::Quit | Family::Noop | Family::Version => {
                shape(ExtrasShape::None, Forbidden, Exact)
            }
            Family::Flush => shape(ExtrasShape::OptionalExptime, Forbidden, Exact),
            Family::Stat => shape(ExtrasShape::None, Optional, Unread),
        }
    }

    /// Decodes the extras if their size is right for the opcode.
    fn extras(self, bytes: &[u8]) -> Option<Extras> {
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        match (self.extras, bytes.len()) {
            (ExtrasShape::None | ExtrasShape::OptionalExptime, 0) => Some(Extras::None),
            (ExtrasShape::Store, 8) => Some(Extras::Store {
                flags: u32_at(0),
                exptime: u32_at(4),
            }),
            (ExtrasShape::Arith, 20) => Some(Extras::Arith {
                delta: u64_at(0),
                initial: u64_at(8),
                exptime: u32_at(16),
            }),
            (ExtrasShape::Exptime | ExtrasShape::OptionalExptime, 4) => {
                Some(Extras::Exptime(u32_at(0)))
            }
            _ => None,
        }
    }
}

/// Parses the request at the front of `buf`.
/// The key of the packet at the front of `buf` and the bytes [`parse`] takes for it, read from its header
/// alone (see [`crate::protocol::Codec::peek_key`]): `None` unless the header and key have arrived, the
/// opcode is known and the header's lengths agree. Opcodes without a value leave the rest of a longer
/// body unread, as memcached does, so only value-bearing ones take the whole body.
#[inline]
pub fn peek_key(buf: &[u8]) -> Option<(&[u8], usize)> {
    let header = Header::decode(buf.first_chunk::<HEADER_LEN>()?);
    let key_start = HEADER_LEN + usize::from(header.extras_len);
    let key_len = usize::from(header.key_len);
    let body_len = header.body_len as usize;
    if header.magic != REQUEST_MAGIC || key_len == 0 || key_start - HEADER_LEN + key_len > body_len {
        return None;
    }
    let len = match Shape::of(Opcode::from_byte(header.opcode)?.family()).body {
        BodyRule::Value => HEADER_LEN + body_len,
        BodyRule::Exact | BodyRule::Unread => key_start + key_len,
    };
    Some((buf.get(key_start..key_start + key_len)?, len))
}

pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Parse::Incomplete;
    };
    let header = Header::decode(header);
    if header.magic != REQUEST_MAGIC {
        return Parse::Invalid(Invalid::close(&[][..]));
    }
    let extras_len = usize::from(header.extras_len);
    let key_len = usize::from(header.key_len);
    let body_len = header.body_len as usize;
    let fixed_end = HEADER_LEN + extras_len + key_len;
    if buf.len() < fixed_end {
        return Parse::Incomplete;
    }
    let echo = Echo {
        opcode: header.opcode,
        opaque: header.opaque,
    };
    if extras_len + key_len > body_len {
        return close_with(echo, Status::UnknownCommand);
    }
    if key_len > MAX_KEY_LEN {
        return close_with(echo, Status::InvalidArguments);
    }
    let Some(opcode) = Opcode::from_byte(header.opcode) else {
        return unknown_opcode(buf, echo, extras_len, key_len, body_len);
    };

    let shape = Shape::of(opcode.family());
    let key_ok = match shape.key {
        KeyRule::Required => key_len > 0,
        KeyRule::Forbidden => key_len == 0,
        KeyRule::Optional => true,
    };
    let value_len = body_len - extras_len - key_len;
    let body_ok = shape.body != BodyRule::Exact || value_len == 0;
    let extras = match shape.extras(&buf[HEADER_LEN..HEADER_LEN + extras_len]) {
        Some(extras) if key_ok && body_ok => extras,
        _ => return close_with(echo, Status::InvalidArguments),
    };
    let key = &buf[HEADER_LEN + extras_len..fixed_end];

    let (value, consumed) = match shape.body {
        BodyRule::Exact | BodyRule::Unread => (&buf[..0], fixed_end),
        BodyRule::Value => {
            if value_len > limits.item_size_max {
                return swallow_with(buf, echo, Status::TooLarge, HEADER_LEN + body_len);
            }
            let end = fixed_end + value_len;
            if buf.len() < end {
                return Parse::Incomplete;
            }
            (&buf[fixed_end..end], end)
        }
    };
    let request = Request {
        opcode,
        opaque: header.opaque,
        cas: header.cas,
        extras,
        key,
        value,
    };
    Parse::Request { request, consumed }
}

/// memcached's answers to opcodes it does not execute (`write_bin_error(.., UNKNOWN_COMMAND, ..)`).
fn unknown_opcode<'a>(
    buf: &[u8],
    echo: Echo,
    extras_len: usize,
    key_len: usize,
    body_len: usize,
) -> Parse<Request<'a>> {
    let fixed_end = HEADER_LEN + extras_len + key_len;
    match echo.opcode {
        // Without SASL: refused, but only after the same shape checks as with it.
        SASL_LIST_MECHS if body_len == 0 => {
            swallow_with(buf, echo, Status::UnknownCommand, fixed_end)
        }
        SASL_AUTH | SASL_STEP if extras_len == 0 && key_len > 0 => {
            swallow_with(buf, echo, Status::UnknownCommand, HEADER_LEN + body_len)
        }
        SASL_LIST_MECHS | SASL_AUTH | SASL_STEP => close_with(echo, Status::InvalidArguments),
        // memcached swallows `body_len` bytes after the extras and key it has already consumed.
        _ => swallow_with(buf, echo, Status::UnknownCommand, fixed_end + body_len),
    }
}

/// Reply with `status`, then close.
fn close_with<'a>(echo: Echo, status: Status) -> Parse<Request<'a>> {
    Parse::Invalid(Invalid::close(error_packet(echo, status)))
}

/// Reply with `status`, drop `total` bytes (those not yet buffered as they arrive), keep the
/// connection.
fn swallow_with<'a>(buf: &[u8], echo: Echo, status: Status, total: usize) -> Parse<Request<'a>> {
    let consumed = total.min(buf.len());
    Parse::Invalid(Invalid {
        reply: Cow::Owned(error_packet(echo, status)),
        consumed,
        swallow: total - consumed,
        close: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::binary::response::{decode_all, Response};
    use crate::protocol::binary::wire::ARITH_NO_CREATE;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        item_size_max: 1024 * 1024,
    };
    const OPAQUE: u32 = 0xdead_beef;

    /// A request packet with every header field given (for malformed ones).
    fn raw(opcode: u8, extras: &[u8], key: &[u8], value: &[u8]) -> Vec<u8> {
        raw_with_body_len(
            opcode,
            extras,
            key,
            value,
            (extras.len() + key.len() + value.len()) as u32,
        )
    }

    fn raw_with_body_len(
        opcode: u8,
        extras: &[u8],
        key: &[u8],
        value: &[u8],
        body_len: u32,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        Header {
            magic: REQUEST_MAGIC,
            opcode,
            key_len: key.len() as u16,
            extras_len: extras.len() as u8,
            data_type: 0,
            vbucket: 0,
            body_len,
            opaque: OPAQUE,
            cas: 0,
        }
        .encode(&mut out);
        out.extend_from_slice(extras);
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        out
    }

    fn request<'a>(opcode: Opcode, extras: Extras, key: &'a [u8], value: &'a [u8]) -> Request<'a> {
        Request {
            opcode,
            opaque: OPAQUE,
            cas: 0,
            extras,
            key,
            value,
        }
    }

    fn parsed(buf: &[u8]) -> (Request<'_>, usize) {
        match parse(buf, &LIMITS) {
            Parse::Request { request, consumed } => (request, consumed),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn refused(buf: &[u8]) -> Invalid {
        match parse(buf, &LIMITS) {
            Parse::Invalid(invalid) => invalid,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    /// The one error response an invalid request replies with.
    fn reply(invalid: &Invalid) -> Response<'_> {
        let responses = decode_all(&invalid.reply);
        assert_eq!(responses.len(), 1);
        responses[0]
    }

    /// Feeds `packet` byte by byte: Incomplete until the last byte, then the same outcome as whole.
    fn assert_incremental(packet: &[u8]) {
        let whole = format!("{:?}", parse(packet, &LIMITS));
        for len in 0..packet.len() {
            assert!(
                matches!(parse(&packet[..len], &LIMITS), Parse::Incomplete),
                "{len} of {}",
                packet.len()
            );
        }
        assert_eq!(format!("{:?}", parse(packet, &LIMITS)), whole);
    }

    #[test]
    fn every_opcode_parses_from_its_wire_form() {
        let store = Extras::Store {
            flags: 0xcafe,
            exptime: 100,
        };
        let arith = Extras::Arith {
            delta: 1,
            initial: 5,
            exptime: ARITH_NO_CREATE,
        };
        let cases: Vec<(Opcode, Extras, &[u8], &[u8])> = vec![
            (Opcode::Get, Extras::None, b"k", b""),
            (Opcode::GetQ, Extras::None, b"k", b""),
            (Opcode::GetK, Extras::None, b"k", b""),
            (Opcode::GetKQ, Extras::None, b"k", b""),
            (Opcode::Set, store, b"k", b"hello"),
            (Opcode::SetQ, store, b"k", b""),
            (Opcode::Add, store, b"k", b"v"),
            (Opcode::AddQ, store, b"k", b"v"),
            (Opcode::Replace, store, b"k", b"v"),
            (Opcode::ReplaceQ, store, b"k", b"v"),
            (Opcode::Append, Extras::None, b"k", b"v"),
            (Opcode::AppendQ, Extras::None, b"k", b""),
            (Opcode::Prepend, Extras::None, b"k", b"v"),
            (Opcode::PrependQ, Extras::None, b"k", b"v"),
            (Opcode::Delete, Extras::None, b"k", b""),
            (Opcode::DeleteQ, Extras::None, b"k", b""),
            (Opcode::Increment, arith, b"k", b""),
            (Opcode::IncrementQ, arith, b"k", b""),
            (Opcode::Decrement, arith, b"k", b""),
            (Opcode::DecrementQ, arith, b"k", b""),
            (Opcode::Touch, Extras::Exptime(10), b"k", b""),
            (Opcode::Gat, Extras::Exptime(10), b"k", b""),
            (Opcode::GatQ, Extras::Exptime(10), b"k", b""),
            (Opcode::GatK, Extras::Exptime(10), b"k", b""),
            (Opcode::GatKQ, Extras::Exptime(10), b"k", b""),
            (Opcode::Flush, Extras::None, b"", b""),
            (Opcode::Flush, Extras::Exptime(5), b"", b""),
            (Opcode::FlushQ, Extras::Exptime(0), b"", b""),
            (Opcode::Noop, Extras::None, b"", b""),
            (Opcode::Version, Extras::None, b"", b""),
            (Opcode::Quit, Extras::None, b"", b""),
            (Opcode::QuitQ, Extras::None, b"", b""),
            (Opcode::Stat, Extras::None, b"", b""),
            (Opcode::Stat, Extras::None, b"items", b""),
        ];
        let mut covered: Vec<Opcode> = Vec::new();
        for (opcode, extras, key, value) in cases {
            let mut extras_bytes = Vec::new();
            extras.encode(&mut extras_bytes);
            let packet = raw(opcode.byte(), &extras_bytes, key, value);
            let expected = request(opcode, extras, key, value);
            assert_eq!(parsed(&packet), (expected, packet.len()), "{opcode:?}");
            assert_incremental(&packet);
            covered.push(opcode);
        }
        for opcode in Opcode::ALL {
            assert!(covered.contains(opcode), "{opcode:?} untested");
        }
    }

    #[test]
    fn set_extras_and_header_fields_decode() {
        let mut packet = raw(0x01, &[0, 0, 0xca, 0xfe, 0, 0, 0, 100], b"key", b"value");
        packet[16..24].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        packet[5] = 1; // data type: ignored
        packet[6..8].copy_from_slice(&[0x12, 0x34]); // vbucket: ignored
        let (request, consumed) = parsed(&packet);
        assert_eq!(consumed, 24 + 8 + 3 + 5);
        assert_eq!(request.cas, 0x0102_0304_0506_0708);
        assert_eq!(
            request.extras,
            Extras::Store {
                flags: 0xcafe,
                exptime: 100
            }
        );
        assert_eq!((request.key, request.value), (&b"key"[..], &b"value"[..]));
    }

    #[test]
    fn incr_extras_decode() {
        let mut extras = Vec::new();
        extras.extend_from_slice(&7u64.to_be_bytes());
        extras.extend_from_slice(&u64::MAX.to_be_bytes());
        extras.extend_from_slice(&0xffff_ffffu32.to_be_bytes());
        let packet = raw(0x05, &extras, b"n", b"");
        let (request, _) = parsed(&packet);
        assert_eq!(
            request.extras,
            Extras::Arith {
                delta: 7,
                initial: u64::MAX,
                exptime: ARITH_NO_CREATE
            }
        );
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let mut buf = raw(0x09, b"", b"a", b"");
        buf.extend(raw(0x0a, b"", b"", b""));
        let (first, consumed) = parsed(&buf);
        assert_eq!((first.opcode, consumed), (Opcode::GetQ, 25));
        let (second, consumed) = parsed(&buf[25..]);
        assert_eq!((second.opcode, consumed), (Opcode::Noop, 24));
    }

    #[test]
    fn bad_magic_closes_silently_once_a_header_is_in() {
        let mut packet = raw(0x0a, b"", b"", b"");
        packet[0] = 0x81;
        assert!(matches!(parse(&packet[..23], &LIMITS), Parse::Incomplete));
        assert_eq!(
            refused(&packet),
            Invalid {
                reply: Cow::Borrowed(&[]),
                consumed: 0,
                swallow: 0,
                close: true
            }
        );
    }

    #[test]
    fn key_and_extras_longer_than_body_is_unknown_command_and_close() {
        for packet in [
            raw_with_body_len(0x00, b"", b"abc", b"", 2),
            raw_with_body_len(0x1c, &[0; 4], b"abc", b"", 5),
            raw_with_body_len(0x40, &[0; 4], b"abc", b"", 5),
        ] {
            // memcached waits for the extras and key before it looks.
            assert!(matches!(
                parse(&packet[..packet.len() - 1], &LIMITS),
                Parse::Incomplete
            ));
            let invalid = refused(&packet);
            assert!(invalid.close);
            let response = reply(&invalid);
            assert_eq!((response.opcode, response.status), (packet[1], 0x81));
            assert_eq!(
                (response.value, response.opaque),
                (&b"Unknown command"[..], OPAQUE)
            );
        }
    }

    #[test]
    fn key_over_250_bytes_is_invalid_arguments_and_close() {
        let key = [b'k'; 251];
        for opcode in [0x00, 0x10, 0x40] {
            let packet = raw(opcode, b"", &key, b"");
            assert_incremental_then_invalid(&packet);
            let invalid = refused(&packet);
            assert!(invalid.close);
            let response = reply(&invalid);
            assert_eq!(
                (response.status, response.value),
                (0x04, &b"Invalid arguments"[..])
            );
        }
        let longest = raw(0x00, b"", &key[..250], b"");
        let (request, _) = parsed(&longest);
        assert_eq!(request.key.len(), 250);
    }

    /// Incomplete until the last byte, then invalid.
    fn assert_incremental_then_invalid(packet: &[u8]) {
        for len in 0..packet.len() {
            assert!(
                matches!(parse(&packet[..len], &LIMITS), Parse::Incomplete),
                "{len}"
            );
        }
        refused(packet);
    }

    #[test]
    fn wrong_shapes_are_invalid_arguments_and_close() {
        let store = [0u8; 8];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("get with extras", raw(0x00, &[0; 4], b"k", b"")),
            ("get without key", raw(0x00, b"", b"", b"")),
            ("get with value", raw(0x00, b"", b"k", b"v")),
            ("getkq with value", raw(0x0d, b"", b"k", b"v")),
            ("set without extras", raw(0x01, b"", b"k", b"v")),
            ("set with 4 extras", raw(0x01, &[0; 4], b"k", b"v")),
            ("set without key", raw(0x01, &store, b"", b"v")),
            ("addq without key", raw(0x12, &store, b"", b"v")),
            ("append with extras", raw(0x0e, &store, b"k", b"v")),
            ("prepend without key", raw(0x0f, b"", b"", b"v")),
            ("delete with extras", raw(0x04, &[0; 4], b"k", b"")),
            ("delete with value", raw(0x04, b"", b"k", b"v")),
            ("delete without key", raw(0x04, b"", b"", b"")),
            ("incr with 16 extras", raw(0x05, &[0; 16], b"k", b"")),
            ("incr with value", raw(0x05, &[0; 20], b"k", b"v")),
            ("decr without key", raw(0x06, &[0; 20], b"", b"")),
            ("touch without extras", raw(0x1c, b"", b"k", b"")),
            ("gat without key", raw(0x1d, &[0; 4], b"", b"")),
            ("gatk with 8 extras", raw(0x23, &[0; 8], b"k", b"")),
            ("flush with 8 extras", raw(0x08, &[0; 8], b"", b"")),
            ("flush with key", raw(0x08, b"", b"k", b"")),
            ("flush with value", raw(0x08, b"", b"", b"\0\0\0\0")),
            ("noop with key", raw(0x0a, b"", b"k", b"")),
            ("version with extras", raw(0x0b, &[0; 4], b"", b"")),
            ("quit with value", raw(0x07, b"", b"", b"v")),
            ("quitq with key", raw(0x17, b"", b"k", b"")),
            ("stat with extras", raw(0x10, &[0; 4], b"", b"")),
            ("sasl list with body", raw(0x20, b"", b"k", b"")),
            ("sasl auth without key", raw(0x21, b"", b"", b"\0u\0p")),
            ("sasl step with extras", raw(0x22, &[0; 4], b"PLAIN", b"")),
        ];
        for (name, packet) in cases {
            let invalid = refused(&packet);
            assert!(invalid.close, "{name}");
            let response = reply(&invalid);
            assert_eq!(response.opcode, packet[1], "{name}");
            assert_eq!(
                (response.status, response.value),
                (0x04, &b"Invalid arguments"[..]),
                "{name}"
            );
            assert_eq!((response.opaque, response.cas), (OPAQUE, 0), "{name}");
        }
    }

    #[test]
    fn unknown_opcode_swallows_body_len_after_extras_and_key() {
        // No extras or key: exactly the packet.
        let packet = raw(0x40, b"", b"", b"vvvv");
        let invalid = refused(&packet);
        assert_eq!(
            (invalid.consumed, invalid.swallow, invalid.close),
            (28, 0, false)
        );
        let response = reply(&invalid);
        assert_eq!((response.opcode, response.status), (0x40, 0x81));
        assert_eq!(response.value, b"Unknown command");

        // memcached drops body_len bytes after extras and key: 24 + 4 + 3 + 10 in all.
        let packet = raw(0x40, b"eeee", b"kkk", b"vvv");
        let invalid = refused(&packet);
        assert_eq!((invalid.consumed, invalid.swallow), (packet.len(), 7));
        // Decided once extras and key are in.
        assert!(matches!(parse(&packet[..30], &LIMITS), Parse::Incomplete));
        let early = refused(&packet[..31]);
        assert_eq!((early.consumed, early.swallow), (31, 10));
    }

    #[test]
    fn verbosity_is_an_unknown_command_in_1_6_18() {
        let packet = raw(0x1b, &1u32.to_be_bytes(), b"", b"");
        let invalid = refused(&packet);
        assert_eq!(
            (invalid.consumed, invalid.swallow, invalid.close),
            (28, 4, false)
        );
        assert_eq!(reply(&invalid).status, 0x81);
    }

    #[test]
    fn sasl_without_sasl_is_unknown_command() {
        let list = raw(0x20, b"", b"", b"");
        let invalid = refused(&list);
        assert_eq!(
            (invalid.consumed, invalid.swallow, invalid.close),
            (24, 0, false)
        );
        assert_eq!(
            (reply(&invalid).opcode, reply(&invalid).status),
            (0x20, 0x81)
        );

        for opcode in [0x21, 0x22] {
            let auth = raw(opcode, b"", b"PLAIN", b"\0user\0pass");
            let invalid = refused(&auth[..29]);
            assert_eq!(
                (invalid.consumed, invalid.swallow, invalid.close),
                (29, 10, false)
            );
            assert_eq!(reply(&invalid).status, 0x81);
            let whole = refused(&auth);
            assert_eq!((whole.consumed, whole.swallow), (auth.len(), 0));
        }
    }

    #[test]
    fn value_over_the_limit_is_too_large_and_swallowed() {
        let limits = Limits { item_size_max: 10 };
        let packet = raw(0x11, &[0; 8], b"key", &[b'v'; 11]);
        // Decided as soon as extras and key are in.
        assert!(matches!(parse(&packet[..34], &limits), Parse::Incomplete));
        let Parse::Invalid(early) = parse(&packet[..35], &limits) else {
            panic!()
        };
        assert_eq!(
            (early.consumed, early.swallow, early.close),
            (35, 11, false)
        );
        let response = reply(&early);
        assert_eq!((response.opcode, response.status), (0x11, 0x03));
        assert_eq!(response.value, b"Too large.");
        let Parse::Invalid(whole) = parse(&packet, &limits) else {
            panic!()
        };
        assert_eq!((whole.consumed, whole.swallow), (packet.len(), 0));

        // Append too; exactly the limit is fine.
        let Parse::Invalid(append) = parse(&raw(0x0e, b"", b"k", &[0; 11]), &limits) else {
            panic!()
        };
        assert_eq!(reply(&append).status, 0x03);
        let fits = raw(0x01, &[0; 8], b"key", &[b'v'; 10]);
        assert!(matches!(
            parse(&fits, &limits),
            Parse::Request { consumed: 45, .. }
        ));

        // A 4 GiB body is swallowed as it arrives.
        let huge = raw_with_body_len(0x01, &[0; 8], b"k", b"", u32::MAX);
        let Parse::Invalid(huge) = parse(&huge, &limits) else {
            panic!()
        };
        assert_eq!((huge.consumed, huge.swallow), (33, u32::MAX as usize - 9));
    }

    #[test]
    fn touch_gat_and_stat_leave_the_rest_of_the_body_unread() {
        let noop = raw(0x0a, b"", b"", b"");
        let packet = raw(0x1c, &[0; 4], b"tk", &noop);
        let (request, consumed) = parsed(&packet);
        assert_eq!(
            (request.opcode, request.key, request.value, consumed),
            (Opcode::Touch, &b"tk"[..], &b""[..], 30)
        );
        let (next, _) = parsed(&packet[consumed..]);
        assert_eq!(next.opcode, Opcode::Noop);

        let packet = raw_with_body_len(0x10, b"", b"", &noop, 24);
        let (request, consumed) = parsed(&packet);
        assert_eq!(
            (request.opcode, request.key, consumed),
            (Opcode::Stat, &b""[..], 24)
        );
    }

    #[test]
    fn empty_values_are_values() {
        let set = raw(0x01, &[0; 8], b"k0", b"");
        let (request, consumed) = parsed(&set);
        assert_eq!((request.value, consumed), (&b""[..], 34));
        let append = raw(0x0e, b"", b"k0", b"");
        let (request, _) = parsed(&append);
        assert_eq!(request.value, b"");
    }

    fn opcode() -> impl Strategy<Value = Opcode> {
        proptest::sample::select(Opcode::ALL)
    }

    prop_compose! {
        /// A valid request of any opcode: the body each opcode allows, a key of 1..=250 bytes where one
        /// is required (STAT: 0..=250).
        fn valid_request()(
            opcode in opcode(), opaque: u32, cas: u64, flags: u32, exptime: u32, delta: u64, initial: u64,
            flush_delay: Option<u32>,
            key in proptest::collection::vec(any::<u8>(), 1..=250),
            stat_group in proptest::collection::vec(any::<u8>(), 0..=250),
            value in proptest::collection::vec(any::<u8>(), 0..2048),
        ) -> (Opcode, u32, u64, Extras, Vec<u8>, Vec<u8>) {
            let (extras, key, value) = match opcode.family() {
                Family::Get { .. } | Family::Delete => (Extras::None, key, vec![]),
                Family::Touch | Family::Gat { .. } => (Extras::Exptime(exptime), key, vec![]),
                Family::Store(_) => (Extras::Store { flags, exptime }, key, value),
                Family::Concat { .. } => (Extras::None, key, value),
                Family::Arith { .. } => (Extras::Arith { delta, initial, exptime }, key, vec![]),
                Family::Quit | Family::Noop | Family::Version => (Extras::None, vec![], vec![]),
                Family::Flush => (flush_delay.map_or(Extras::None, Extras::Exptime), vec![], vec![]),
                Family::Stat => (Extras::None, stat_group, vec![]),
            };
            (opcode, opaque, cas, extras, key, value)
        }
    }

    proptest! {
        #[test]
        fn requests_round_trip((opcode, opaque, cas, extras, key, value) in valid_request()) {
            let request = Request { opcode, opaque, cas, extras, key: &key, value: &value };
            let mut packet = Vec::new();
            request.encode(&mut packet);
            prop_assert_eq!(packet.len(), request.encoded_len());
            // Followed by more input, which must stay unread.
            packet.extend_from_slice(&[0x80, 0x0a]);
            match parse(&packet, &LIMITS) {
                Parse::Request { request: parsed, consumed } => {
                    prop_assert_eq!(parsed, request);
                    prop_assert_eq!(consumed, request.encoded_len());
                }
                other => prop_assert!(false, "{:?}", other),
            }
            // A glance at the header finds the same key and length (what the worker prefetches by).
            let peeked = peek_key(&packet);
            if key.is_empty() {
                prop_assert_eq!(peeked, None);
            } else {
                prop_assert_eq!(peeked, Some((&key[..], request.encoded_len())));
            }
            // Any strict prefix is incomplete.
            let cut = packet.len() - 2;
            for len in [0, 1, 23, cut / 2, cut - 1] {
                prop_assert!(matches!(parse(&packet[..len.min(cut - 1)], &LIMITS), Parse::Incomplete));
            }
        }

        #[test]
        fn arbitrary_bytes_never_overrun(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some((key, len)) = peek_key(&bytes) {
                prop_assert!(!key.is_empty() && key.len() <= len - HEADER_LEN);
            }
            match parse(&bytes, &LIMITS) {
                Parse::Request { consumed, request } => {
                    prop_assert!(consumed <= bytes.len() && consumed >= HEADER_LEN);
                    prop_assert!(request.key.len() <= MAX_KEY_LEN);
                }
                Parse::Invalid(invalid) => prop_assert!(invalid.consumed <= bytes.len()),
                Parse::Incomplete => {}
            }
        }

        #[test]
        fn arbitrary_headers_with_magic_never_overrun(mut bytes in proptest::collection::vec(any::<u8>(), 24..600), opcode in 0u8..0x30) {
            bytes[0] = REQUEST_MAGIC;
            bytes[1] = opcode;
            bytes[2] = 0;
            match parse(&bytes, &LIMITS) {
                Parse::Request { consumed, .. } => prop_assert!(consumed <= bytes.len()),
                Parse::Invalid(invalid) => prop_assert!(invalid.consumed <= bytes.len()),
                Parse::Incomplete => {}
            }
        }
    }
}
