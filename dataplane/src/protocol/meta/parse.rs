//! Parsing meta command lines with memcached 1.6.18's rules: its tokenizer, its C number parsing
//! (`safe_strtol` and friends) and its flag pre-pass, with the same error precedence and messages.
//!
//! Every check runs on the bytes alone, before any store access, and nothing allocates.

use std::borrow::Cow;

use super::{base64, Flags, Key, Request};
use crate::protocol::{Invalid, Limits, Parse};
use crate::store::{StoreMode, MAX_KEY_LEN};

/// memcached closes a connection whose buffered input has no newline within this many bytes.
pub const MAX_LINE_WITHOUT_NEWLINE: usize = 2048;

/// memcached's `MFLAG_MAX_OPT_LENGTH`: at most this many tokens, counting the command, the key (and
/// the datalen of ms) and one for the end of the line; so 17 flags for mg, md, ma and 16 for ms.
const MAX_TOKENS: usize = 20;

/// memcached's `MFLAG_MAX_OPAQUE_LENGTH`, which counts the `O` itself: opaques carry up to 31 bytes.
const MAX_OPAQUE_TOKEN: usize = 32;

const ERROR: &[u8] = b"ERROR\r\n";
const BAD_FORMAT: &[u8] = b"CLIENT_ERROR bad command line format\r\n";
const BAD_TOKEN: &[u8] = b"CLIENT_ERROR bad token in command line format\r\n";
const DUPLICATE_FLAG: &[u8] = b"CLIENT_ERROR duplicate flag\r\n";
const INVALID_FLAG: &[u8] = b"CLIENT_ERROR invalid flag\r\n";
const INVALID_OR_DUPLICATE_FLAG: &[u8] = b"CLIENT_ERROR invalid or duplicate flag\r\n";
const BAD_KEY_ENCODING: &[u8] = b"CLIENT_ERROR error decoding key\r\n";
const BAD_MODE_LENGTH: &[u8] = b"CLIENT_ERROR incorrect length for M token\r\n";
const BAD_INITIAL: &[u8] = b"CLIENT_ERROR invalid numeric initial value\r\n";
const BAD_DELTA: &[u8] = b"CLIENT_ERROR invalid numeric delta value\r\n";
const OPAQUE_TOO_LONG: &[u8] = b"CLIENT_ERROR opaque token too long\r\n";
/// mg words this one differently from the other commands.
const GET_TOO_MANY_FLAGS: &[u8] = b"CLIENT_ERROR options flags are too long\r\n";
const TOO_MANY_FLAGS: &[u8] = b"CLIENT_ERROR options flags too long\r\n";
const BAD_SET_MODE: &[u8] = b"CLIENT_ERROR invalid mode for ms M token\r\n";
const BAD_ARITH_MODE: &[u8] = b"CLIENT_ERROR invalid mode for ma M token\r\n";
const TOO_LARGE: &[u8] = b"SERVER_ERROR object too large for cache\r\n";

/// Splits off the first space-separated token (memcached separates tokens by spaces only: a tab is
/// part of a token). Returns the token and what follows it.
pub(super) fn next_token(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let start = line.iter().position(|&b| b != b' ')?;
    let line = &line[start..];
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    Some((&line[..end], &line[end..]))
}

/// The tokens of `line`, in order.
pub(super) fn tokens(mut line: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (token, rest) = next_token(line)?;
        line = rest;
        Some(token)
    })
}

/// C's `isspace` in the "C" locale.
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What C's `strtol` family reads from a token: skipped whitespace, a sign, decimal digits.
struct CNumber {
    negative: bool,
    /// The digits' value; `None` when it does not fit in 64 bits (ERANGE for every variant).
    magnitude: Option<u64>,
}

/// Reads a number the way memcached's `safe_strto*` do: `strto*` must consume at least one digit, and
/// what follows must be the end of the token or a whitespace byte (after which anything is ignored).
fn c_number(token: &[u8]) -> Option<CNumber> {
    let mut rest = token;
    while let [first, tail @ ..] = rest {
        if !is_c_space(*first) {
            break;
        }
        rest = tail;
    }
    let negative = match rest.first() {
        Some(b'-') => {
            rest = &rest[1..];
            true
        }
        Some(b'+') => {
            rest = &rest[1..];
            false
        }
        _ => false,
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    match rest.get(digits) {
        None => {}
        Some(&next) if is_c_space(next) => {}
        Some(_) => return None,
    }
    let magnitude =
        rest[..digits].iter().try_fold(0u64, |acc, d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')));
    Some(CNumber { negative, magnitude })
}

/// memcached's `safe_strtol` on LP64: `strtol` into a 64-bit long, then truncated to `int32_t` (so
/// `T4294967326` is 30). Used for exptimes and the ms datalen.
pub(super) fn c_strtol_i32(token: &[u8]) -> Option<i32> {
    let number = c_number(token)?;
    let magnitude = number.magnitude?;
    let value: i64 = if number.negative {
        if magnitude > 1 << 63 {
            return None;
        }
        (magnitude as i64).wrapping_neg()
    } else {
        i64::try_from(magnitude).ok()?
    };
    Some(value as i32)
}

/// memcached's `safe_strtoull`: `strtoull` (which negates a `-` number modulo 2^64), refused when the
/// result is negative as a signed number and the token has a `-`.
pub(super) fn c_strtoull(token: &[u8]) -> Option<u64> {
    let number = c_number(token)?;
    let magnitude = number.magnitude?;
    let value = if number.negative { magnitude.wrapping_neg() } else { magnitude };
    if (value as i64) < 0 && token.contains(&b'-') {
        return None;
    }
    Some(value)
}

/// memcached's `safe_strtoul`: as [`c_strtoull`], then truncated to 32 bits (`F4294967297` is 1).
pub(super) fn c_strtoul_u32(token: &[u8]) -> Option<u32> {
    c_strtoull(token).map(|value| value as u32)
}

fn refuse(reply: &'static [u8], consumed: usize) -> Parse<Request<'static>> {
    Parse::Invalid(Invalid::reply(Cow::Borrowed(reply), consumed))
}

/// Parses one meta request from the front of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_LINE_WITHOUT_NEWLINE {
            // memcached drops the connection without a word.
            return Parse::Invalid(Invalid::close(Cow::Borrowed(&b""[..])));
        }
        return Parse::Incomplete;
    };
    let line_len = newline + 1;
    let mut line = &buf[..newline];
    // memcached strips one `\r` before the newline, unless the line is only "\r\n".
    if newline > 1 && line[newline - 1] == b'\r' {
        line = &line[..newline - 1];
    }
    // memcached tokenizes a C string: a NUL ends the line.
    if let Some(nul) = line.iter().position(|&b| b == 0) {
        line = &line[..nul];
    }

    let Some((command, rest)) = next_token(line) else {
        return refuse(ERROR, line_len);
    };
    match command {
        b"mn" => Parse::Request { request: Request::NoOp, consumed: line_len },
        b"me" => parse_debug(rest, line_len),
        b"mg" => parse_keyed(Command::Get, rest, line_len),
        b"md" => parse_keyed(Command::Delete, rest, line_len),
        b"ma" => parse_keyed(Command::Arith, rest, line_len),
        b"ms" => parse_set(buf, rest, line_len, limits),
        _ => refuse(ERROR, line_len),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Command {
    Get,
    Delete,
    Arith,
}

/// Counts tokens up to just past `MAX_TOKENS` (all memcached needs to know).
fn too_many_tokens(fixed: usize, flag_tokens: &[u8]) -> bool {
    fixed + 1 + tokens(flag_tokens).take(MAX_TOKENS).count() > MAX_TOKENS
}

fn parse_keyed(command: Command, rest: &[u8], line_len: usize) -> Parse<Request<'_>> {
    let Some((key_token, flag_tokens)) = next_token(rest) else {
        return refuse(ERROR, line_len);
    };
    if !crate::protocol::key_token_ok(key_token) {
        return refuse(BAD_FORMAT, line_len);
    }
    if too_many_tokens(2, flag_tokens) {
        let reply = if command == Command::Get { GET_TOO_MANY_FLAGS } else { TOO_MANY_FLAGS };
        return refuse(reply, line_len);
    }
    let (key, flags, mode) = match preparse(key_token, flag_tokens) {
        Ok(parsed) => parsed,
        // md and ma report every pre-pass error with one message.
        Err(reply) if command == Command::Get => return refuse(reply, line_len),
        Err(_) => return refuse(INVALID_OR_DUPLICATE_FLAG, line_len),
    };
    let request = match command {
        Command::Get => Request::Get { key, flags },
        Command::Delete => Request::Delete { key, flags },
        Command::Arith => {
            let incr = match mode {
                None | Some(b'I') | Some(b'+') => true,
                Some(b'D') | Some(b'-') => false,
                Some(_) => return refuse(BAD_ARITH_MODE, line_len),
            };
            Request::Arith { key, flags, incr }
        }
    };
    if opaque_too_long(flag_tokens) {
        return refuse(OPAQUE_TOO_LONG, line_len);
    }
    Parse::Request { request, consumed: line_len }
}

fn parse_set<'a>(buf: &'a [u8], rest: &'a [u8], line_len: usize, limits: &Limits) -> Parse<Request<'a>> {
    let Some((key_token, rest)) = next_token(rest) else {
        return refuse(ERROR, line_len);
    };
    // Errors before the datalen is known cannot swallow the data block: memcached then reads the
    // data as commands.
    if !crate::protocol::key_token_ok(key_token) {
        return refuse(BAD_FORMAT, line_len);
    }
    let Some((datalen_token, flag_tokens)) = next_token(rest) else {
        return refuse(BAD_FORMAT, line_len);
    };
    if too_many_tokens(3, flag_tokens) {
        return refuse(TOO_MANY_FLAGS, line_len);
    }
    let value_len = match c_strtol_i32(datalen_token) {
        Some(len) if (0..=i32::MAX - 2).contains(&len) => len as usize,
        _ => return refuse(BAD_FORMAT, line_len),
    };
    // From here on errors swallow the data block, like memcached's conn_swallow.
    let block_len = value_len + 2;
    let refuse_block = |reply: &'static [u8]| {
        Parse::Invalid(Invalid { reply: Cow::Borrowed(reply), consumed: line_len, swallow: block_len, close: false })
    };
    let (key, flags, mode) = match preparse(key_token, flag_tokens) {
        Ok(parsed) => parsed,
        Err(reply) => return refuse_block(reply),
    };
    let mode = match mode {
        None | Some(b'S') => StoreMode::Set,
        Some(b'E') => StoreMode::Add,
        Some(b'A') => StoreMode::Append,
        Some(b'P') => StoreMode::Prepend,
        Some(b'R') => StoreMode::Replace,
        Some(_) => return refuse_block(BAD_SET_MODE),
    };
    if opaque_too_long(flag_tokens) {
        return refuse_block(OPAQUE_TOO_LONG);
    }
    if value_len > limits.item_size_max {
        return refuse_block(TOO_LARGE);
    }
    let Some(block) = buf.get(line_len..line_len + block_len) else {
        return Parse::Incomplete;
    };
    let consumed = line_len + block_len;
    let (value, terminator) = block.split_at(value_len);
    if terminator != b"\r\n" {
        return Parse::Request { request: Request::BadDataChunk { key }, consumed };
    }
    Parse::Request { request: Request::Set { key, flags, mode, value }, consumed }
}

fn parse_debug(rest: &[u8], line_len: usize) -> Parse<Request<'_>> {
    // Unlike the other commands, a missing key is a CLIENT_ERROR, and only a second token of exactly
    // `b` means anything; more tokens are ignored.
    let Some((key_token, rest)) = next_token(rest) else {
        return refuse(BAD_FORMAT, line_len);
    };
    if !crate::protocol::key_token_ok(key_token) {
        return refuse(BAD_FORMAT, line_len);
    }
    let key = match next_token(rest) {
        Some((b"b", _)) => match decode_key(key_token) {
            Some(key) => key,
            None => return refuse(BAD_FORMAT, line_len),
        },
        _ => Key::plain(key_token),
    };
    Parse::Request { request: Request::Debug { key }, consumed: line_len }
}

fn decode_key(token: &[u8]) -> Option<Key<'_>> {
    let mut bytes = [0u8; MAX_KEY_LEN];
    let len = base64::decode(token, &mut bytes)?;
    Some(Key { sent: token, decoded: Some((bytes, len as u8)) })
}

fn opaque_too_long(flag_tokens: &[u8]) -> bool {
    tokens(flag_tokens).any(|token| token[0] == b'O' && token.len() > MAX_OPAQUE_TOKEN)
}

/// memcached's `_meta_flag_preparse`, shared by mg, ms, md and ma: every command accepts every flag
/// any of them knows, and ignores the ones it has no use for. Duplicates, bytes >= 127 and unknown
/// flags stop at once; a bad token is remembered (the last message wins) and the pass goes on.
/// Returns the key (decoded for `b`), the flags and the raw `M` mode byte.
fn preparse<'a>(key_token: &'a [u8], flag_tokens: &'a [u8]) -> Result<(Key<'a>, Flags<'a>, Option<u8>), &'static [u8]> {
    let mut seen = [false; 127];
    let mut error: Option<&'static [u8]> = None;
    let mut key = Key::plain(key_token);
    let mut mode = None;
    let mut flags = Flags { tokens: flag_tokens, delta: 1, ..Flags::default() };
    // Positions of `t` and of the first TTL change, for `ttl_before_change`.
    let mut ttl_shown_at = None;
    let mut ttl_changed_at = None;
    for (position, token) in tokens(flag_tokens).enumerate() {
        let flag = token[0];
        if flag >= 127 || seen[flag as usize] {
            return Err(DUPLICATE_FLAG);
        }
        seen[flag as usize] = true;
        let argument = &token[1..];
        match flag {
            b'b' => match decode_key(key_token) {
                Some(decoded) => key = decoded,
                None => error = Some(BAD_KEY_ENCODING),
            },
            b'N' | b'T' | b'R' => match c_strtol_i32(argument) {
                Some(exptime) => {
                    let field = match flag {
                        b'N' => &mut flags.vivify,
                        b'T' => &mut flags.ttl,
                        _ => &mut flags.recache,
                    };
                    *field = Some(exptime);
                    if flag != b'R' {
                        ttl_changed_at.get_or_insert(position);
                    }
                }
                None => error = Some(BAD_TOKEN),
            },
            b't' => ttl_shown_at = Some(position),
            b'O' | b'P' | b'L' | b'k' | b's' | b'c' | b'f' | b'l' | b'h' => {}
            b'v' => flags.value = true,
            b'u' => flags.no_bump = true,
            b'q' => flags.quiet = true,
            b'I' => flags.invalidate = true,
            // A bad F keeps whatever message was set before (by default "bad command line format").
            b'F' => match c_strtoul_u32(argument) {
                Some(client_flags) => flags.client_flags = client_flags,
                None => {
                    error.get_or_insert(BAD_FORMAT);
                }
            },
            b'C' => match c_strtoull(argument) {
                Some(cas) => flags.compare_cas = Some(cas),
                None => error = Some(BAD_TOKEN),
            },
            b'M' => match argument {
                [mode_byte] => mode = Some(*mode_byte),
                _ => error = Some(BAD_MODE_LENGTH),
            },
            b'J' => match c_strtoull(argument) {
                Some(initial) => flags.initial = initial,
                None => error = Some(BAD_INITIAL),
            },
            b'D' => match c_strtoull(argument) {
                Some(delta) => flags.delta = delta,
                None => error = Some(BAD_DELTA),
            },
            _ => return Err(INVALID_FLAG),
        }
    }
    flags.ttl_before_change = matches!((ttl_shown_at, ttl_changed_at), (Some(shown), Some(changed)) if shown < changed);
    match error {
        Some(reply) => Err(reply),
        None => Ok((key, flags, mode)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_c_rules() {
        assert_eq!(c_strtol_i32(b"30"), Some(30));
        assert_eq!(c_strtol_i32(b"+2"), Some(2));
        assert_eq!(c_strtol_i32(b"-1"), Some(-1));
        assert_eq!(c_strtol_i32(b"\t7"), Some(7));
        assert_eq!(c_strtol_i32(b"7\tjunk"), Some(7));
        assert_eq!(c_strtol_i32(b"7x"), None);
        assert_eq!(c_strtol_i32(b""), None);
        assert_eq!(c_strtol_i32(b"-"), None);
        assert_eq!(c_strtol_i32(b"x"), None);
        // Truncation to int32 after a 64-bit strtol (memcached 1.6.18 accepts T2147483648: it expires).
        assert_eq!(c_strtol_i32(b"2147483648"), Some(i32::MIN));
        assert_eq!(c_strtol_i32(b"4294967298"), Some(2));
        assert_eq!(c_strtol_i32(b"-2147483649"), Some(i32::MAX));
        assert_eq!(c_strtol_i32(b"9223372036854775807"), Some(-1));
        assert_eq!(c_strtol_i32(b"9223372036854775808"), None);
        assert_eq!(c_strtol_i32(b"-9223372036854775808"), Some(0));
        assert_eq!(c_strtol_i32(b"-9223372036854775809"), None);

        assert_eq!(c_strtoull(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(c_strtoull(b"18446744073709551616"), None);
        assert_eq!(c_strtoull(b"-1"), None);
        assert_eq!(c_strtoull(b"-0"), Some(0));
        assert_eq!(c_strtoull(b"9223372036854775808"), Some(1 << 63));
        assert_eq!(c_strtoul_u32(b"4294967297"), Some(1));
        assert_eq!(c_strtoul_u32(b"4294967296"), Some(0));
        assert_eq!(c_strtoul_u32(b"-1"), None);
    }

    #[test]
    fn tokens_split_on_spaces_only() {
        let all: Vec<&[u8]> = tokens(b"  a\tb  c ").collect();
        assert_eq!(all, [&b"a\tb"[..], b"c"]);
        assert_eq!(tokens(b"   ").count(), 0);
    }
}
