//! Composing response packets into a caller's buffer.
//!
//! - [`write_header`]: the 24 bytes every response starts with; the caller appends the body.
//! - [`write_status`]: a body-less success, or an error with memcached's text for its status.
//! - [`write_text`]: a packet whose value is a text: the version, memcached's out-of-memory errors.
//! - [`write_stat`]: one `name = value` packet of a STAT answer (the empty one ends it).
//! - [`error_packet`]: an error as an owned packet, for [`crate::protocol::Invalid`] replies.
//!
//! Nothing here allocates except [`error_packet`], which only invalid input reaches.

use super::wire::{Header, Opcode, Status, HEADER_LEN, RESPONSE_MAGIC};

/// What every response copies from its request: the opcode byte (a quiet one stays quiet) and the
/// opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo {
    pub opcode: u8,
    pub opaque: u32,
}

/// Appends a response header whose body (extras, key, value: `body_len` bytes) the caller appends.
pub fn write_header(
    out: &mut Vec<u8>,
    echo: Echo,
    status: Status,
    cas: u64,
    extras_len: u8,
    key_len: u16,
    body_len: u32,
) {
    Header {
        magic: RESPONSE_MAGIC,
        opcode: echo.opcode,
        key_len,
        extras_len,
        data_type: 0,
        vbucket: status.code(),
        body_len,
        opaque: echo.opaque,
        cas,
    }
    .encode(out);
}

/// Appends a packet with no extras and no key whose value is `body` (a text), CAS 0.
pub fn write_text(out: &mut Vec<u8>, echo: Echo, status: Status, body: &[u8]) {
    write_header(out, echo, status, 0, 0, 0, body_len(body.len()));
    out.extend_from_slice(body);
}

/// Appends `status` with memcached's text for it as the body ([`Status::Ok`]: an empty packet).
pub fn write_status(out: &mut Vec<u8>, echo: Echo, status: Status) {
    write_text(out, echo, status, status.message());
}

/// Appends an empty success carrying `cas` (stores answer with the new item's CAS).
pub fn write_ok(out: &mut Vec<u8>, echo: Echo, cas: u64) {
    write_header(out, echo, Status::Ok, cas, 0, 0, 0);
}

/// Appends one packet of a STAT answer: the stat's name as key, its value as value. An empty name and
/// value make the packet that ends the answer.
pub fn write_stat(out: &mut Vec<u8>, opaque: u32, name: &[u8], value: &[u8]) {
    let key_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let name = &name[..usize::from(key_len)];
    let echo = Echo {
        opcode: Opcode::Stat.byte(),
        opaque,
    };
    write_header(
        out,
        echo,
        Status::Ok,
        0,
        0,
        key_len,
        body_len(name.len() + value.len()),
    );
    out.extend_from_slice(name);
    out.extend_from_slice(value);
}

/// An error response as an owned packet (for replies to invalid input, which has no output buffer).
pub fn error_packet(echo: Echo, status: Status) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + status.message().len());
    write_status(&mut out, echo, status);
    out
}

/// A body length for the header. Bodies are bounded by the item size limit, far below 4 GiB.
#[inline]
pub(super) fn body_len(len: usize) -> u32 {
    debug_assert!(len <= u32::MAX as usize, "response body of {len} bytes");
    len as u32
}

/// A decoded response packet, borrowed from the bytes it came from (for tests and tools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub opcode: u8,
    pub status: u16,
    pub opaque: u32,
    pub cas: u64,
    pub extras: &'a [u8],
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Decodes the response at the front of `buf` and how many bytes it used; `None` if it is not a
/// whole, well-formed response.
pub fn decode_response(buf: &[u8]) -> Option<(Response<'_>, usize)> {
    let header = Header::decode(buf.first_chunk::<HEADER_LEN>()?);
    let extras_len = usize::from(header.extras_len);
    let key_len = usize::from(header.key_len);
    let total = HEADER_LEN + usize::try_from(header.body_len).ok()?;
    if header.magic != RESPONSE_MAGIC
        || extras_len + key_len > total - HEADER_LEN
        || buf.len() < total
    {
        return None;
    }
    let body = &buf[HEADER_LEN..total];
    let (extras, rest) = body.split_at(extras_len);
    let (key, value) = rest.split_at(key_len);
    let response = Response {
        opcode: header.opcode,
        status: header.vbucket,
        opaque: header.opaque,
        cas: header.cas,
        extras,
        key,
        value,
    };
    Some((response, total))
}

/// Decodes a buffer of whole responses; panics on anything else (for tests).
#[cfg(test)]
pub fn decode_all(mut buf: &[u8]) -> Vec<Response<'_>> {
    let mut responses = Vec::new();
    while !buf.is_empty() {
        let (response, used) = decode_response(buf).expect("a whole response");
        responses.push(response);
        buf = &buf[used..];
    }
    responses
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn not_found_is_memcacheds_packet() {
        let mut out = Vec::new();
        write_status(
            &mut out,
            Echo {
                opcode: 0x00,
                opaque: 0xdead_beef,
            },
            Status::KeyNotFound,
        );
        let mut expected = vec![
            0x81, 0x00, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef,
        ];
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(b"Not found");
        assert_eq!(out, expected);
    }

    #[test]
    fn ok_packet_carries_cas_and_nothing_else() {
        let mut out = Vec::new();
        write_ok(
            &mut out,
            Echo {
                opcode: 0x01,
                opaque: 7,
            },
            0x0102,
        );
        assert_eq!(
            out,
            [0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 1, 2]
        );
    }

    #[test]
    fn stat_packets_and_terminator() {
        let mut out = Vec::new();
        write_stat(&mut out, 5, b"pid", b"8583");
        write_stat(&mut out, 5, b"", b"");
        let packets = decode_all(&out);
        assert_eq!(packets.len(), 2);
        assert_eq!(
            (packets[0].opcode, packets[0].key, packets[0].value),
            (0x10, &b"pid"[..], &b"8583"[..])
        );
        assert_eq!(
            out[24 + 7..],
            [0x81, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    fn status() -> impl Strategy<Value = Status> {
        proptest::sample::select(Status::ALL)
    }

    proptest! {
        #[test]
        fn headers_decode_back(
            opcode: u8, status in status(), opaque: u32, cas: u64,
            extras in proptest::collection::vec(any::<u8>(), 0..24),
            key in proptest::collection::vec(any::<u8>(), 0..300),
            value in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut out = Vec::new();
            let body = extras.len() + key.len() + value.len();
            write_header(&mut out, Echo { opcode, opaque }, status, cas, extras.len() as u8, key.len() as u16, body as u32);
            out.extend_from_slice(&extras);
            out.extend_from_slice(&key);
            out.extend_from_slice(&value);
            let (response, used) = decode_response(&out).unwrap();
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(response, Response {
                opcode, status: status.code(), opaque, cas, extras: &extras, key: &key, value: &value,
            });
        }

        #[test]
        fn errors_decode_back(opcode: u8, status in status(), opaque: u32) {
            let packet = error_packet(Echo { opcode, opaque }, status);
            let (response, used) = decode_response(&packet).unwrap();
            prop_assert_eq!(used, packet.len());
            prop_assert_eq!((response.opcode, response.status, response.opaque, response.cas),
                (opcode, status.code(), opaque, 0));
            prop_assert_eq!(response.value, status.message());
            prop_assert!(response.extras.is_empty() && response.key.is_empty());
        }

        #[test]
        fn stats_decode_back(opaque: u32, name in "[a-z_]{0,40}", value in "[0-9a-z. ]{0,40}") {
            let mut out = Vec::new();
            write_stat(&mut out, opaque, name.as_bytes(), value.as_bytes());
            let (response, _) = decode_response(&out).unwrap();
            prop_assert_eq!((response.opcode, response.opaque, response.key, response.value),
                (0x10, opaque, name.as_bytes(), value.as_bytes()));
        }
    }
}
