//! One request from the front of the input buffer, read exactly as memcached 1.6.18 reads it.
//!
//! Errors in a command line come back as [`Parse::Invalid`] with memcached's reply and the line's length;
//! the bytes after the line are read as the next command, as memcached does (a refused `set` line's data
//! block then earns an `ERROR` of its own). `noreply` silences these errors, except the `ERROR` for a
//! wrong token count, which memcached sends before it looks for `noreply`.

use super::keys::{KeyList, KeyTooLong};
use super::line::{split_line, FixedTokens, Tokens};
use super::number::{signed32, unsigned32, unsigned64};
use super::reply;
use super::{Request, Retrieval, RetrievalCommand, Storage, StorageCommand};
use crate::protocol::{meta, Invalid, Limits, Parse};

/// Bytes memcached buffers without seeing a newline before it closes the connection, unless they
/// start a `get` or `gets` (whose key lists may be long).
pub const MAX_LINE_WITHOUT_NEWLINE: usize = 2048;

/// Leading spaces memcached skips when it checks such a long line for `get `.
const MAX_LEADING_SPACES: usize = 100;

/// Parses one request from the front of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
    let Some((line, line_len)) = split_line(buf) else {
        return if buf.len() > MAX_LINE_WITHOUT_NEWLINE && !starts_multiget(buf) {
            Parse::Invalid(Invalid::close(&b""[..]))
        } else {
            Parse::Incomplete
        };
    };
    if line.len() > u32::MAX as usize {
        return Parse::Invalid(Invalid::close(&b""[..]));
    }
    let tokens = FixedTokens::new(line);
    let command = tokens.get(0);
    if command.len() < 2 {
        return refuse(reply::ERROR, false, line_len);
    }
    if command.len() == 2 && command[0] == b'm' {
        return if b"gsdnae".contains(&command[1]) {
            delegate_to_meta(buf, limits)
        } else {
            refuse(reply::ERROR, false, line_len)
        };
    }
    let parsed = match command {
        b"get" | b"bget" => retrieval(line, &tokens, RetrievalCommand::Get),
        b"gets" => retrieval(line, &tokens, RetrievalCommand::Gets),
        b"gat" => retrieval(line, &tokens, RetrievalCommand::Gat { exptime: 0 }),
        b"gats" => retrieval(line, &tokens, RetrievalCommand::Gats { exptime: 0 }),
        b"set" => return storage(buf, line_len, &tokens, StorageCommand::Set, limits),
        b"add" => return storage(buf, line_len, &tokens, StorageCommand::Add, limits),
        b"replace" => return storage(buf, line_len, &tokens, StorageCommand::Replace, limits),
        b"append" => return storage(buf, line_len, &tokens, StorageCommand::Append, limits),
        b"prepend" => return storage(buf, line_len, &tokens, StorageCommand::Prepend, limits),
        b"cas" => return storage(buf, line_len, &tokens, StorageCommand::Cas { unique: 0 }, limits),
        b"delete" => delete(&tokens),
        b"incr" => arith(&tokens, true),
        b"decr" => arith(&tokens, false),
        b"touch" => touch(&tokens),
        b"flush_all" => flush_all(&tokens),
        b"verbosity" => verbosity(&tokens),
        b"cache_memlimit" => cache_memlimit(&tokens),
        b"stats" => stats(&tokens),
        b"shutdown" => shutdown(&tokens),
        b"version" => Ok(Request::Version),
        b"quit" => Ok(Request::Quit),
        b"lru_crawler" => lru_crawler(&tokens),
        // Everything else memcached knows (slabs, lru, watch, ...) is not offered here,
        // and is answered as an unknown command.
        _ => Err(Refusal::always(reply::ERROR)),
    };
    match parsed {
        Ok(request) => Parse::Request { request, consumed: line_len },
        Err(Refusal { reply, noreply }) => refuse(reply, noreply, line_len),
    }
}

/// Why a line is refused, and whether its `noreply` silences the reply.
struct Refusal {
    reply: &'static [u8],
    noreply: bool,
}

impl Refusal {
    fn always(reply: &'static [u8]) -> Refusal {
        Refusal { reply, noreply: false }
    }

    fn unless(noreply: bool, reply: &'static [u8]) -> Refusal {
        Refusal { reply, noreply }
    }
}

fn refuse<R>(reply: &'static [u8], noreply: bool, consumed: usize) -> Parse<R> {
    Parse::Invalid(Invalid::reply(if noreply { &b""[..] } else { reply }, consumed))
}

/// memcached's test for a long line without a newline that it keeps reading.
fn starts_multiget(buf: &[u8]) -> bool {
    let spaces = buf.iter().take_while(|&&byte| byte == b' ').count();
    let rest = &buf[spaces..];
    spaces <= MAX_LEADING_SPACES && (rest.starts_with(b"get ") || rest.starts_with(b"gets "))
}

/// A meta command line goes to [`meta::parse`] whole (after the spaces memcached skips before it).
fn delegate_to_meta<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
    let spaces = buf.iter().take_while(|&&byte| byte == b' ').count();
    match meta::parse(&buf[spaces..], limits) {
        Parse::Request { request, consumed } => {
            Parse::Request { request: Request::Meta(request), consumed: spaces + consumed }
        }
        Parse::Incomplete => Parse::Incomplete,
        Parse::Invalid(mut invalid) => {
            invalid.consumed += spaces;
            Parse::Invalid(invalid)
        }
    }
}

fn key_ok(key: &[u8]) -> bool {
    crate::protocol::key_token_ok(key)
}

/// `get|gets|bget <key>*`, `gat|gats <exptime> <key>*`.
fn retrieval<'a>(line: &'a [u8], tokens: &FixedTokens<'a>, command: RetrievalCommand) -> Result<Request<'a>, Refusal> {
    if tokens.count() < 2 {
        return Err(Refusal::always(reply::ERROR));
    }
    let (command, arguments) = match command {
        RetrievalCommand::Get | RetrievalCommand::Gets => (command, 1),
        RetrievalCommand::Gat { .. } | RetrievalCommand::Gats { .. } => {
            let exptime = signed32(tokens.get(1)).ok_or(Refusal::always(reply::BAD_EXPTIME))?;
            let command = match command {
                RetrievalCommand::Gat { .. } => RetrievalCommand::Gat { exptime },
                _ => RetrievalCommand::Gats { exptime },
            };
            (command, 2)
        }
    };
    let mut keys = Tokens::new(line);
    keys.by_ref().take(arguments).for_each(drop);
    let keys = KeyList::from_tokens(line, keys).map_err(|KeyTooLong| Refusal::always(reply::BAD_FORMAT))?;
    Ok(Request::Retrieval(Retrieval { command, keys }))
}

/// `set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]`,
/// `cas <key> <flags> <exptime> <bytes> <cas unique> [noreply]`, then the data block.
fn storage<'a>(
    buf: &'a [u8],
    line_len: usize,
    tokens: &FixedTokens<'a>,
    command: StorageCommand,
    limits: &Limits,
) -> Parse<Request<'a>> {
    let arguments = if matches!(command, StorageCommand::Cas { .. }) { 6 } else { 5 };
    if tokens.count() != arguments && tokens.count() != arguments + 1 {
        return refuse(reply::ERROR, false, line_len);
    }
    // memcached takes the last token for `noreply` even when it is the byte count: the line is then
    // refused, silently.
    let noreply = tokens.last() == b"noreply";
    let key = tokens.get(1);
    if !key_ok(key) {
        return refuse(reply::BAD_FORMAT, noreply, line_len);
    }
    let (Some(client_flags), Some(exptime), Some(value_len)) =
        (unsigned32(tokens.get(2)), signed32(tokens.get(3)), signed32(tokens.get(4)))
    else {
        return refuse(reply::BAD_FORMAT, noreply, line_len);
    };
    let command = match command {
        StorageCommand::Cas { .. } => match unsigned64(tokens.get(5)) {
            Some(unique) => StorageCommand::Cas { unique },
            None => return refuse(reply::BAD_FORMAT, noreply, line_len),
        },
        other => other,
    };
    // memcached adds the "\r\n" to the length in an int.
    if !(0..=i32::MAX - 2).contains(&value_len) {
        return refuse(reply::BAD_FORMAT, noreply, line_len);
    }
    let value_len = value_len as usize;
    let block_len = value_len + 2;
    if value_len > limits.item_size_max {
        // Refused before its data arrives; the data is swallowed, however large.
        let buffered = (buf.len() - line_len).min(block_len);
        return Parse::Invalid(Invalid {
            reply: (if noreply { &b""[..] } else { reply::TOO_LARGE }).into(),
            consumed: line_len + buffered,
            swallow: block_len - buffered,
            close: false,
        });
    }
    let consumed = line_len + block_len;
    if buf.len() < consumed {
        return Parse::Incomplete;
    }
    let value = &buf[line_len..line_len + value_len];
    // memcached reads exactly `bytes + 2` and checks the last two; what follows is the next command.
    let request = if &buf[line_len + value_len..consumed] == b"\r\n" {
        Request::Storage(Storage { command, key, client_flags, exptime, value, noreply })
    } else {
        Request::BadDataChunk { key, noreply }
    };
    Parse::Request { request, consumed }
}

/// `delete <key> [0] [noreply]`: memcached still accepts the legacy hold time, if it is `0`.
fn delete<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    let count = tokens.count();
    if !(2..=4).contains(&count) {
        return Err(Refusal::always(reply::ERROR));
    }
    let mut noreply = false;
    if count > 2 {
        let hold_is_zero = tokens.get(2) == b"0";
        noreply = tokens.last() == b"noreply";
        let valid = (count == 3 && (hold_is_zero || noreply)) || (count == 4 && hold_is_zero && noreply);
        if !valid {
            return Err(Refusal::unless(noreply, reply::BAD_DELETE));
        }
    }
    let key = tokens.get(1);
    if !key_ok(key) {
        return Err(Refusal::unless(noreply, reply::BAD_FORMAT));
    }
    Ok(Request::Delete { key, noreply })
}

/// `incr|decr <key> <delta> [noreply]`.
fn arith<'a>(tokens: &FixedTokens<'a>, incr: bool) -> Result<Request<'a>, Refusal> {
    let (key, delta, noreply) = key_and_argument(tokens)?;
    let delta = unsigned64(delta).ok_or(Refusal::unless(noreply, reply::BAD_DELTA))?;
    Ok(Request::Arith { key, incr, delta, noreply })
}

/// `touch <key> <exptime> [noreply]`.
fn touch<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    let (key, exptime, noreply) = key_and_argument(tokens)?;
    let exptime = signed32(exptime).ok_or(Refusal::unless(noreply, reply::BAD_EXPTIME))?;
    Ok(Request::Touch { key, exptime, noreply })
}

/// The key, the argument and `noreply` of `<command> <key> <argument> [noreply]`. memcached ignores a
/// fourth token that is not `noreply`.
fn key_and_argument<'a>(tokens: &FixedTokens<'a>) -> Result<(&'a [u8], &'a [u8], bool), Refusal> {
    if tokens.count() != 3 && tokens.count() != 4 {
        return Err(Refusal::always(reply::ERROR));
    }
    let noreply = tokens.last() == b"noreply";
    let key = tokens.get(1);
    if !key_ok(key) {
        return Err(Refusal::unless(noreply, reply::BAD_FORMAT));
    }
    Ok((key, tokens.get(2), noreply))
}

/// `flush_all [delay] [noreply]`. memcached reads the delay from the first argument whenever there is
/// one besides a final `noreply`, and ignores a last token that is not `noreply` (`flush_all 1 2` flushes
/// in a second; `flush_all noreply 5` is refused: `noreply` is not a delay).
fn flush_all<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    let count = tokens.count();
    if !(1..=3).contains(&count) {
        return Err(Refusal::always(reply::ERROR));
    }
    let noreply = tokens.last() == b"noreply";
    let delay = if count != if noreply { 2 } else { 1 } {
        signed32(tokens.get(1)).ok_or(Refusal::unless(noreply, reply::BAD_EXPTIME))?
    } else {
        0
    };
    Ok(Request::FlushAll { delay, noreply })
}

/// `lru_crawler metadump <all|hash|classids>`: the only crawler command offered. Every shard has one
/// class, so any class list dumps everything, as `all` and `hash` do.
fn lru_crawler<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    let which = tokens.get(2);
    let classes = !which.is_empty() && which.split(|&b| b == b',').all(|id| !id.is_empty() && id.iter().all(u8::is_ascii_digit));
    if tokens.count() == 3 && tokens.get(1) == b"metadump" && (which == b"all" || which == b"hash" || classes) {
        Ok(Request::MetaDump)
    } else {
        Err(Refusal::always(reply::ERROR))
    }
}

/// `verbosity <level> [noreply]`; a token after the level that is not `noreply` is ignored.
fn verbosity<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    if tokens.count() != 2 && tokens.count() != 3 {
        return Err(Refusal::always(reply::ERROR));
    }
    let noreply = tokens.last() == b"noreply";
    let level = unsigned32(tokens.get(1)).ok_or(Refusal::unless(noreply, reply::BAD_FORMAT))?;
    Ok(Request::Verbosity { level, noreply })
}

/// `cache_memlimit <megabytes> [noreply]`, with memcached's limits (8 megabytes at least, and a number
/// above 10^9 is taken for bytes). A token after the number that is not `noreply` is ignored, and
/// `noreply` silences every error, as in memcached 1.6.18.
fn cache_memlimit<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    if tokens.count() != 2 && tokens.count() != 3 {
        return Err(Refusal::always(reply::ERROR));
    }
    let noreply = tokens.last() == b"noreply";
    let megabytes = unsigned32(tokens.get(1)).ok_or(Refusal::unless(noreply, reply::ERROR))?;
    if megabytes < MEMLIMIT_LEAST_MEGABYTES {
        return Err(Refusal::unless(noreply, reply::MEMLIMIT_TOO_SMALL));
    }
    if megabytes > MEMLIMIT_MOST_MEGABYTES {
        return Err(Refusal::unless(noreply, reply::MEMLIMIT_NOT_BYTES));
    }
    Ok(Request::CacheMemlimit { megabytes, noreply })
}

/// memcached's bounds on `cache_memlimit`.
const MEMLIMIT_LEAST_MEGABYTES: u32 = 8;
const MEMLIMIT_MOST_MEGABYTES: u32 = 1_000_000_000;

/// memcached 1.6.18's slab class ids are below this; `stats cachedump` refuses the others.
const SLAB_CLASS_IDS: u32 = 64;

/// `stats cachedump <class> <limit>`, checked as memcached 1.6.18 checks it; tokens after the limit are
/// ignored.
fn cachedump<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    if tokens.count() < 4 {
        return Err(Refusal::always(reply::BAD_COMMAND_LINE));
    }
    let (Some(class), Some(limit)) = (unsigned32(tokens.get(2)), unsigned32(tokens.get(3))) else {
        return Err(Refusal::always(reply::BAD_FORMAT));
    };
    if class >= SLAB_CLASS_IDS {
        return Err(Refusal::always(reply::ILLEGAL_SLAB_ID));
    }
    Ok(Request::CacheDump { class, limit })
}

/// `stats [group ...]`: the group is the first argument (further ones are ignored, as memcached ignores
/// them for every group but `detail` and `cachedump`). `stats detail on|off|dump` keeps its argument in
/// the group name; `stats cachedump` is a request of its own; `noreply` is not special here, it is an
/// unknown group.
fn stats<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    if tokens.count() == 1 {
        return Ok(Request::Stats { group: None });
    }
    let group = match tokens.get(1) {
        b"cachedump" => return cachedump(tokens),
        b"detail" => match tokens.get(2) {
            b"on" => "detail on",
            b"off" => "detail off",
            b"dump" => "detail dump",
            _ => return Err(Refusal::always(reply::STATS_DETAIL_USAGE)),
        },
        group => std::str::from_utf8(group).map_err(|_| Refusal::always(reply::ERROR))?,
    };
    Ok(Request::Stats { group: Some(group) })
}

/// `shutdown [graceful]`.
fn shutdown<'a>(tokens: &FixedTokens<'a>) -> Result<Request<'a>, Refusal> {
    match (tokens.count(), tokens.get(1)) {
        (1, _) => Ok(Request::Shutdown { graceful: false }),
        (2, b"graceful") => Ok(Request::Shutdown { graceful: true }),
        // memcached says this only when shutdown is enabled (-A); without -A it says
        // "ERROR: shutdown not enabled" to any shutdown line.
        _ => Err(Refusal::always(reply::BAD_SHUTDOWN_MODE)),
    }
}
