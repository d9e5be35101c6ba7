//! The load tester's codec: encode one request (set, get, touch, delete) in the text, meta or binary
//! protocol into a buffer, and parse one reply from the front of a buffer into an [`Outcome`].
//!
//! No I/O here; the blast loop and the blocking verifier both drive it. Encoding appends to a caller's
//! buffer and parsing borrows the receive buffer, so a request costs no allocation of its own.

use std::fmt;
use std::ops::Range;

/// Which memcached protocol to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Text,
    Meta,
    Binary,
}

/// The commands the load tester sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Set,
    Get,
    Touch,
    Delete,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Set, OpKind::Get, OpKind::Touch, OpKind::Delete];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Set => "set",
            OpKind::Get => "get",
            OpKind::Touch => "touch",
            OpKind::Delete => "delete",
        }
    }
}

/// What a well-formed reply said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// A get hit; the value's bytes are at this range of the parsed buffer.
    Hit(Range<usize>),
    /// get, touch or delete of an absent key.
    Miss,
    Touched,
    Deleted,
}

impl Outcome {
    /// Whether this is an answer `kind` may legitimately receive.
    pub fn answers(&self, kind: OpKind) -> bool {
        matches!(
            (kind, self),
            (OpKind::Set, Outcome::Stored)
                | (OpKind::Get, Outcome::Hit(_) | Outcome::Miss)
                | (OpKind::Touch, Outcome::Touched | Outcome::Miss)
                | (OpKind::Delete, Outcome::Deleted | Outcome::Miss)
        )
    }

    pub fn is_hit(&self) -> bool {
        !matches!(self, Outcome::Miss)
    }
}

/// A reply that is not one a correct server sends for the request: the text says what arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadReply(pub String);

impl fmt::Display for BadReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The result of looking at the front of a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole reply yet; read more.
    Incomplete,
    /// One reply of `len` bytes.
    Reply { len: usize, outcome: Outcome },
}

const BINARY_HEADER: usize = 24;
const BINARY_REQUEST: u8 = 0x80;
const BINARY_RESPONSE: u8 = 0x81;
const BINARY_GET: u8 = 0x00;
const BINARY_SET: u8 = 0x01;
const BINARY_DELETE: u8 = 0x04;
const BINARY_TOUCH: u8 = 0x1c;
const BINARY_KEY_NOT_FOUND: u16 = 0x0001;

/// Appends one request to `out`. `opaque` is echoed by binary replies and checked by [`parse_reply`].
pub fn encode(protocol: Protocol, kind: OpKind, key: &[u8], value: &[u8], opaque: u32, out: &mut Vec<u8>) {
    match protocol {
        Protocol::Text => encode_text(kind, key, value, out),
        Protocol::Meta => encode_meta(kind, key, value, out),
        Protocol::Binary => encode_binary(kind, key, value, opaque, out),
    }
}

fn push_decimal(out: &mut Vec<u8>, mut number: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (number % 10) as u8;
        number /= 10;
        if number == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn encode_text(kind: OpKind, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    match kind {
        OpKind::Set => {
            out.extend_from_slice(b"set ");
            out.extend_from_slice(key);
            out.extend_from_slice(b" 0 0 ");
            push_decimal(out, value.len());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(value);
        }
        OpKind::Get => {
            out.extend_from_slice(b"get ");
            out.extend_from_slice(key);
        }
        OpKind::Touch => {
            out.extend_from_slice(b"touch ");
            out.extend_from_slice(key);
            out.extend_from_slice(b" 0");
        }
        OpKind::Delete => {
            out.extend_from_slice(b"delete ");
            out.extend_from_slice(key);
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn encode_meta(kind: OpKind, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    match kind {
        OpKind::Set => {
            out.extend_from_slice(b"ms ");
            out.extend_from_slice(key);
            out.push(b' ');
            push_decimal(out, value.len());
            out.extend_from_slice(b" T0\r\n");
            out.extend_from_slice(value);
        }
        OpKind::Get => {
            out.extend_from_slice(b"mg ");
            out.extend_from_slice(key);
            out.extend_from_slice(b" v");
        }
        // Meta has no touch command of its own: a get with a new TTL and no value is one.
        OpKind::Touch => {
            out.extend_from_slice(b"mg ");
            out.extend_from_slice(key);
            out.extend_from_slice(b" T0");
        }
        OpKind::Delete => {
            out.extend_from_slice(b"md ");
            out.extend_from_slice(key);
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn encode_binary(kind: OpKind, key: &[u8], value: &[u8], opaque: u32, out: &mut Vec<u8>) {
    let (opcode, extras, value): (u8, &[u8], &[u8]) = match kind {
        // flags 0, expiry 0
        OpKind::Set => (BINARY_SET, &[0; 8], value),
        OpKind::Get => (BINARY_GET, &[], &[]),
        OpKind::Touch => (BINARY_TOUCH, &[0; 4], &[]),
        OpKind::Delete => (BINARY_DELETE, &[], &[]),
    };
    let body = extras.len() + key.len() + value.len();
    out.push(BINARY_REQUEST);
    out.push(opcode);
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.push(extras.len() as u8);
    out.push(0); // data type
    out.extend_from_slice(&[0, 0]); // vbucket
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out.extend_from_slice(&opaque.to_be_bytes());
    out.extend_from_slice(&[0; 8]); // cas
    out.extend_from_slice(extras);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Parses the reply to (`kind`, `key`, `opaque`) at the front of `buf`. A reply that is well formed but
/// wrong for the request (a STORED to a get, a value for another key, an error line) is a [`BadReply`].
pub fn parse_reply(protocol: Protocol, kind: OpKind, key: &[u8], opaque: u32, buf: &[u8]) -> Result<Parsed, BadReply> {
    let parsed = match protocol {
        Protocol::Text => parse_text(kind, key, buf)?,
        Protocol::Meta => parse_meta(kind, buf)?,
        Protocol::Binary => parse_binary(kind, opaque, buf)?,
    };
    if let Parsed::Reply { outcome, .. } = &parsed {
        if !outcome.answers(kind) {
            return Err(BadReply(format!("{outcome:?} in answer to {}", kind.name())));
        }
    }
    Ok(parsed)
}

fn find_line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn printable(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(80)];
    String::from_utf8_lossy(cut).escape_debug().to_string()
}

fn parse_decimal(bytes: &[u8]) -> Option<usize> {
    if bytes.is_empty() || bytes.len() > 19 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(bytes.iter().fold(0, |n, d| n * 10 + (d - b'0') as usize))
}

fn parse_text(kind: OpKind, key: &[u8], buf: &[u8]) -> Result<Parsed, BadReply> {
    let Some(eol) = find_line(buf) else { return Ok(Parsed::Incomplete) };
    let line = &buf[..eol];
    let simple = |outcome| Ok(Parsed::Reply { len: eol + 2, outcome });
    match line {
        b"STORED" => simple(Outcome::Stored),
        b"END" if kind == OpKind::Get => simple(Outcome::Miss),
        b"NOT_FOUND" => simple(Outcome::Miss),
        b"TOUCHED" => simple(Outcome::Touched),
        b"DELETED" => simple(Outcome::Deleted),
        _ if line.starts_with(b"VALUE ") => {
            let mut fields = line[6..].split(|&b| b == b' ');
            let (got_key, _flags, size) = (fields.next(), fields.next(), fields.next().and_then(parse_decimal));
            let Some(size) = size else { return Err(BadReply(format!("bad VALUE line {:?}", printable(line)))) };
            if got_key != Some(key) {
                return Err(BadReply(format!("VALUE for another key: {:?}", printable(line))));
            }
            let start = eol + 2;
            let end = start + size;
            if buf.len() < end + 7 {
                return Ok(Parsed::Incomplete);
            }
            if &buf[end..end + 7] != b"\r\nEND\r\n" {
                return Err(BadReply(format!("value of {size} bytes not followed by END: {:?}", printable(&buf[end..]))));
            }
            Ok(Parsed::Reply { len: end + 7, outcome: Outcome::Hit(start..end) })
        }
        _ => Err(BadReply(format!("{:?}", printable(line)))),
    }
}

fn parse_meta(kind: OpKind, buf: &[u8]) -> Result<Parsed, BadReply> {
    let Some(eol) = find_line(buf) else { return Ok(Parsed::Incomplete) };
    let line = &buf[..eol];
    let simple = |outcome| Ok(Parsed::Reply { len: eol + 2, outcome });
    let code = &line[..line.len().min(2)];
    let rest = &line[code.len()..];
    if !(rest.is_empty() || rest[0] == b' ') {
        return Err(BadReply(format!("{:?}", printable(line))));
    }
    match (kind, code) {
        (OpKind::Set, b"HD") => simple(Outcome::Stored),
        (OpKind::Touch, b"HD") => simple(Outcome::Touched),
        (OpKind::Delete, b"HD") => simple(Outcome::Deleted),
        (OpKind::Get | OpKind::Touch, b"EN") | (OpKind::Delete, b"NF") => simple(Outcome::Miss),
        (OpKind::Get, b"VA") => {
            let size = rest.get(1..).and_then(|r| r.split(|&b| b == b' ').next()).and_then(parse_decimal);
            let Some(size) = size else { return Err(BadReply(format!("bad VA line {:?}", printable(line)))) };
            let start = eol + 2;
            let end = start + size;
            if buf.len() < end + 2 {
                return Ok(Parsed::Incomplete);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(BadReply(format!("value of {size} bytes not followed by CRLF")));
            }
            Ok(Parsed::Reply { len: end + 2, outcome: Outcome::Hit(start..end) })
        }
        _ => Err(BadReply(format!("{:?} in answer to {}", printable(line), kind.name()))),
    }
}

fn parse_binary(kind: OpKind, opaque: u32, buf: &[u8]) -> Result<Parsed, BadReply> {
    if buf.len() < BINARY_HEADER {
        return Ok(Parsed::Incomplete);
    }
    if buf[0] != BINARY_RESPONSE {
        return Err(BadReply(format!("magic {:#04x}, not a binary response", buf[0])));
    }
    let key_len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let extras_len = buf[4] as usize;
    let status = u16::from_be_bytes([buf[6], buf[7]]);
    let body = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    let got_opaque = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if buf.len() < BINARY_HEADER + body {
        return Ok(Parsed::Incomplete);
    }
    let len = BINARY_HEADER + body;
    let expected_opcode = match kind {
        OpKind::Set => BINARY_SET,
        OpKind::Get => BINARY_GET,
        OpKind::Touch => BINARY_TOUCH,
        OpKind::Delete => BINARY_DELETE,
    };
    if buf[1] != expected_opcode || got_opaque != opaque {
        return Err(BadReply(format!(
            "opcode {:#04x} opaque {got_opaque} in answer to {} opaque {opaque}",
            buf[1],
            kind.name()
        )));
    }
    if extras_len + key_len > body {
        return Err(BadReply(format!("body {body} shorter than extras {extras_len} + key {key_len}")));
    }
    let outcome = match (status, kind) {
        (0, OpKind::Set) => Outcome::Stored,
        (0, OpKind::Get) => Outcome::Hit(BINARY_HEADER + extras_len + key_len..len),
        (0, OpKind::Touch) => Outcome::Touched,
        (0, OpKind::Delete) => Outcome::Deleted,
        (BINARY_KEY_NOT_FOUND, OpKind::Get | OpKind::Touch | OpKind::Delete) => Outcome::Miss,
        _ => {
            let message = printable(&buf[BINARY_HEADER + extras_len + key_len..len]);
            return Err(BadReply(format!("status {status:#06x} ({message}) in answer to {}", kind.name())));
        }
    };
    Ok(Parsed::Reply { len, outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(protocol: Protocol, kind: OpKind, bytes: &[u8]) -> Result<Parsed, BadReply> {
        parse_reply(protocol, kind, b"k1", 7, bytes)
    }

    #[test]
    fn text_replies() {
        let hit = b"VALUE k1 0 3\r\nabc\r\nEND\r\n";
        assert_eq!(reply(Protocol::Text, OpKind::Get, hit), Ok(Parsed::Reply { len: hit.len(), outcome: Outcome::Hit(14..17) }));
        assert_eq!(reply(Protocol::Text, OpKind::Get, &hit[..20]), Ok(Parsed::Incomplete));
        assert!(reply(Protocol::Text, OpKind::Get, b"VALUE k2 0 3\r\nabc\r\nEND\r\n").is_err());
        assert!(reply(Protocol::Text, OpKind::Get, b"STORED\r\n").is_err());
        assert!(reply(Protocol::Text, OpKind::Set, b"SERVER_ERROR out of memory\r\n").is_err());
        assert_eq!(reply(Protocol::Text, OpKind::Delete, b"NOT_FOUND\r\n"), Ok(Parsed::Reply { len: 11, outcome: Outcome::Miss }));
    }

    #[test]
    fn meta_replies() {
        let hit = b"VA 3\r\nabc\r\n";
        assert_eq!(reply(Protocol::Meta, OpKind::Get, hit), Ok(Parsed::Reply { len: hit.len(), outcome: Outcome::Hit(6..9) }));
        assert_eq!(reply(Protocol::Meta, OpKind::Touch, b"HD\r\n"), Ok(Parsed::Reply { len: 4, outcome: Outcome::Touched }));
        assert!(reply(Protocol::Meta, OpKind::Set, b"NS\r\n").is_err());
        assert!(reply(Protocol::Meta, OpKind::Get, b"HDX\r\n").is_err());
    }

    #[test]
    fn binary_round_trip_header() {
        let mut request = Vec::new();
        encode(Protocol::Binary, OpKind::Set, b"k1", b"abc", 7, &mut request);
        assert_eq!(request.len(), 24 + 8 + 2 + 3);
        let mut response = vec![0x81, BINARY_GET, 0, 0, 4, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 7];
        response.extend_from_slice(&[0; 8]);
        response.extend_from_slice(&[0, 0, 0, 0, b'x', b'y', b'z']);
        assert_eq!(reply(Protocol::Binary, OpKind::Get, &response), Ok(Parsed::Reply { len: 31, outcome: Outcome::Hit(28..31) }));
        response[15] = 8;
        assert!(reply(Protocol::Binary, OpKind::Get, &response).is_err());
    }
}
