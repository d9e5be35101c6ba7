//! The text codec against memcached 1.6.18's observed behaviour.
//!
//! Every expected reply here was checked against a real memcached 1.6.18 (`-p ... -U 0`, and `-C`, `-F`,
//! `-A`, `-I 2m` where said). Parser tests need no store; executor tests at the end do, and are ignored
//! until the store engine lands.

use std::borrow::Cow;

use proptest::prelude::*;

use super::reply::*;
use super::*;
use crate::protocol::{Admin, AdminReply, After, Codec, Invalid, Limits, Parse, Route};
use crate::store::MAX_KEY_LEN;

const LIMITS: Limits = Limits { item_size_max: 1 << 20 };

/// An owned copy of a [`Request`], to compare and to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Model {
    Storage { command: StorageCommand, key: Vec<u8>, client_flags: u32, exptime: i32, value: Vec<u8>, noreply: bool },
    BadDataChunk { key: Vec<u8>, noreply: bool },
    Retrieval { command: RetrievalCommand, keys: Vec<Vec<u8>> },
    Delete { key: Vec<u8>, noreply: bool },
    Arith { key: Vec<u8>, incr: bool, delta: u64, noreply: bool },
    Touch { key: Vec<u8>, exptime: i32, noreply: bool },
    FlushAll { delay: i32, noreply: bool },
    Verbosity { level: u32, noreply: bool },
    CacheMemlimit { megabytes: u32, noreply: bool },
    CacheDump { class: u32, limit: u32 },
    Stats { group: Option<String> },
    Shutdown { graceful: bool },
    Version,
    Quit,
    MetaDump,
    Meta,
}

fn model(request: &Request<'_>) -> Model {
    match request {
        Request::Storage(s) => Model::Storage {
            command: s.command,
            key: s.key.to_vec(),
            client_flags: s.client_flags,
            exptime: s.exptime,
            value: s.value.to_vec(),
            noreply: s.noreply,
        },
        Request::BadDataChunk { key, noreply } => Model::BadDataChunk { key: key.to_vec(), noreply: *noreply },
        Request::Retrieval(r) => {
            Model::Retrieval { command: r.command, keys: r.keys.iter().map(<[u8]>::to_vec).collect() }
        }
        Request::Delete { key, noreply } => Model::Delete { key: key.to_vec(), noreply: *noreply },
        Request::Arith { key, incr, delta, noreply } => {
            Model::Arith { key: key.to_vec(), incr: *incr, delta: *delta, noreply: *noreply }
        }
        Request::Touch { key, exptime, noreply } => {
            Model::Touch { key: key.to_vec(), exptime: *exptime, noreply: *noreply }
        }
        Request::FlushAll { delay, noreply } => Model::FlushAll { delay: *delay, noreply: *noreply },
        Request::Verbosity { level, noreply } => Model::Verbosity { level: *level, noreply: *noreply },
        Request::CacheMemlimit { megabytes, noreply } => Model::CacheMemlimit { megabytes: *megabytes, noreply: *noreply },
        Request::CacheDump { class, limit } => Model::CacheDump { class: *class, limit: *limit },
        Request::Stats { group } => Model::Stats { group: group.map(str::to_owned) },
        Request::Shutdown { graceful } => Model::Shutdown { graceful: *graceful },
        Request::MetaDump => Model::MetaDump,
        Request::Version => Model::Version,
        Request::Quit => Model::Quit,
        Request::Meta(_) => Model::Meta,
    }
}

/// The canonical wire form of a request (test-only encoder).
fn encode(request: &Model) -> Vec<u8> {
    fn noreply_suffix(noreply: bool) -> &'static [u8] {
        if noreply {
            b" noreply"
        } else {
            b""
        }
    }
    let mut out = Vec::new();
    match request {
        Model::MetaDump => out.extend_from_slice(b"lru_crawler metadump all\r\n"),
        Model::Storage { command, key, client_flags, exptime, value, noreply } => {
            out.extend_from_slice(command.name().as_bytes());
            out.push(b' ');
            out.extend_from_slice(key);
            out.extend_from_slice(format!(" {client_flags} {exptime} {}", value.len()).as_bytes());
            if let StorageCommand::Cas { unique } = command {
                out.extend_from_slice(format!(" {unique}").as_bytes());
            }
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        Model::BadDataChunk { key, noreply } => {
            out.extend_from_slice(b"set ");
            out.extend_from_slice(key);
            out.extend_from_slice(b" 0 0 1");
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\nxyz");
        }
        Model::Retrieval { command, keys } => {
            out.extend_from_slice(command.name().as_bytes());
            if let Some(exptime) = command.exptime() {
                out.extend_from_slice(format!(" {exptime}").as_bytes());
            }
            for key in keys {
                out.push(b' ');
                out.extend_from_slice(key);
            }
            out.extend_from_slice(b"\r\n");
        }
        Model::Delete { key, noreply } => {
            out.extend_from_slice(b"delete ");
            out.extend_from_slice(key);
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
        }
        Model::Arith { key, incr, delta, noreply } => {
            out.extend_from_slice(if *incr { b"incr " } else { b"decr " });
            out.extend_from_slice(key);
            out.extend_from_slice(format!(" {delta}").as_bytes());
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
        }
        Model::Touch { key, exptime, noreply } => {
            out.extend_from_slice(b"touch ");
            out.extend_from_slice(key);
            out.extend_from_slice(format!(" {exptime}").as_bytes());
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
        }
        Model::FlushAll { delay, noreply } => {
            out.extend_from_slice(format!("flush_all {delay}").as_bytes());
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
        }
        Model::Verbosity { level, noreply } => {
            out.extend_from_slice(format!("verbosity {level}").as_bytes());
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
        }
        Model::CacheMemlimit { megabytes, noreply } => {
            out.extend_from_slice(format!("cache_memlimit {megabytes}").as_bytes());
            out.extend_from_slice(noreply_suffix(*noreply));
            out.extend_from_slice(b"\r\n");
        }
        Model::CacheDump { class, limit } => out.extend_from_slice(format!("stats cachedump {class} {limit}\r\n").as_bytes()),
        Model::Stats { group: None } => out.extend_from_slice(b"stats\r\n"),
        Model::Stats { group: Some(group) } => out.extend_from_slice(format!("stats {group}\r\n").as_bytes()),
        Model::Shutdown { graceful: false } => out.extend_from_slice(b"shutdown\r\n"),
        Model::Shutdown { graceful: true } => out.extend_from_slice(b"shutdown graceful\r\n"),
        Model::Version => out.extend_from_slice(b"version\r\n"),
        Model::Quit => out.extend_from_slice(b"quit\r\n"),
        Model::Meta => out.extend_from_slice(b"mn\r\n"),
    }
    out
}

/// A parse result in owned form. An `Invalid` is compared by what it drops in all (`consumed +
/// swallow`), since how much of that is already buffered depends on how the bytes arrived.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Request(Model, usize),
    Incomplete,
    Invalid { reply: Vec<u8>, drops: usize, close: bool },
}

fn outcome(buf: &[u8]) -> Outcome {
    match parse(buf, &LIMITS) {
        Parse::Request { request, consumed } => {
            assert!(consumed <= buf.len());
            Outcome::Request(model(&request), consumed)
        }
        Parse::Incomplete => Outcome::Incomplete,
        Parse::Invalid(Invalid { reply, consumed, swallow, close }) => {
            assert!(consumed <= buf.len());
            Outcome::Invalid { reply: reply.into_owned(), drops: consumed + swallow, close }
        }
    }
}

/// Checks that `wire` parses the same whole, byte by byte, and followed by more requests: the parser
/// says Incomplete until the last byte it needs has arrived, then decides exactly as with all of it.
fn outcome_incrementally(wire: &[u8]) -> Outcome {
    let whole = outcome(wire);
    let needed = (0..=wire.len()).find(|&len| outcome(&wire[..len]) != Outcome::Incomplete);
    match &whole {
        Outcome::Incomplete => assert_eq!(needed, None, "{:?} decided early", wire.escape_ascii().to_string()),
        _ => {
            let needed = needed.expect("decided");
            assert_eq!(outcome(&wire[..needed]), whole, "{:?} fed byte by byte", wire.escape_ascii().to_string());
            if let Outcome::Request(_, consumed) = whole {
                assert_eq!(consumed, needed, "a request is recognised when its last byte arrives");
            }
        }
    }
    if !matches!(whole, Outcome::Incomplete | Outcome::Invalid { close: true, .. }) {
        let mut pipelined = wire.to_vec();
        pipelined.extend_from_slice(b"get next\r\n");
        assert_eq!(outcome(&pipelined), whole, "followed by another request");
    }
    whole
}

fn assert_request(wire: &[u8], expected: Model) {
    assert_eq!(
        outcome_incrementally(wire),
        Outcome::Request(expected, wire.len()),
        "{:?}",
        wire.escape_ascii().to_string()
    );
}

/// `wire` is one refused line: `reply` is sent and the line dropped, the connection stays.
fn assert_refused(wire: &[u8], reply: &[u8]) {
    assert_eq!(
        outcome_incrementally(wire),
        Outcome::Invalid { reply: reply.to_vec(), drops: wire.len(), close: false },
        "{:?}",
        wire.escape_ascii().to_string()
    );
}

/// Parses a pipeline as a connection would, returning each outcome.
fn outcomes(mut wire: &[u8]) -> Vec<Outcome> {
    let mut all = Vec::new();
    loop {
        let next = outcome(wire);
        let used = match &next {
            Outcome::Request(_, consumed) => *consumed,
            Outcome::Invalid { drops, close: false, .. } => *drops,
            Outcome::Incomplete | Outcome::Invalid { close: true, .. } => {
                all.push(next);
                return all;
            }
        };
        all.push(next);
        wire = &wire[used.min(wire.len())..];
        if wire.is_empty() {
            return all;
        }
    }
}

fn key(len: usize) -> Vec<u8> {
    vec![b'k'; len]
}

fn storage(command: StorageCommand, key: &[u8], client_flags: u32, exptime: i32, value: &[u8], noreply: bool) -> Model {
    Model::Storage { command, key: key.to_vec(), client_flags, exptime, value: value.to_vec(), noreply }
}

fn retrieval(command: RetrievalCommand, keys: &[&[u8]]) -> Model {
    Model::Retrieval { command, keys: keys.iter().map(|key| key.to_vec()).collect() }
}

fn error_outcome(reply: &[u8], drops: usize) -> Outcome {
    Outcome::Invalid { reply: reply.to_vec(), drops, close: false }
}

// ---- storage commands

#[test]
fn storage_commands() {
    use StorageCommand::*;
    assert_request(b"set k 5 10 3\r\nabc\r\n", storage(Set, b"k", 5, 10, b"abc", false));
    assert_request(b"add k 0 0 1\r\nx\r\n", storage(Add, b"k", 0, 0, b"x", false));
    assert_request(b"replace k 0 0 1 noreply\r\nx\r\n", storage(Replace, b"k", 0, 0, b"x", true));
    assert_request(b"append k 1 2 1\r\nx\r\n", storage(Append, b"k", 1, 2, b"x", false));
    assert_request(b"prepend k 1 2 1\r\nx\r\n", storage(Prepend, b"k", 1, 2, b"x", false));
    assert_request(b"cas k 1 2 1 99\r\nx\r\n", storage(Cas { unique: 99 }, b"k", 1, 2, b"x", false));
    assert_request(
        b"cas k 0 0 1 18446744073709551615 noreply\r\nx\r\n",
        storage(Cas { unique: u64::MAX }, b"k", 0, 0, b"x", true),
    );
    assert_request(b"set k 0 0 0\r\n\r\n", storage(Set, b"k", 0, 0, b"", false));
    assert_request(b"set k 0 0 4\r\na\r\nb\r\n", storage(Set, b"k", 0, 0, b"a\r\nb", false));
    assert_request(b"set k 0 -1 1\n1\r\n", storage(Set, b"k", 0, -1, b"1", false));
    assert_request(b"  set   k 0 0 1  \r\n1\r\n", storage(Set, b"k", 0, 0, b"1", false));
    // A sixth token that is not `noreply` is ignored.
    assert_request(b"set k 0 0 1 garbage\r\nq\r\n", storage(Set, b"k", 0, 0, b"q", false));
    assert_request(
        &[b"set ".to_vec(), key(MAX_KEY_LEN), b" 0 0 1\r\nq\r\n".to_vec()].concat(),
        storage(Set, &key(MAX_KEY_LEN), 0, 0, b"q", false),
    );
    // Only spaces separate tokens, so a tab lands in the key; like memcached 1.6.18, any byte but a space,
    // NUL or newline may be part of a key (memaslap's keys start with \x10).
    assert_request(b"set t\tk 0 0 1\r\nq\r\n", storage(Set, b"t\tk", 0, 0, b"q", false));
    assert_request(b"set \x10\x10JR\x01\x7f\rk 0 0 1\r\nq\r\n", storage(Set, b"\x10\x10JR\x01\x7f\rk", 0, 0, b"q", false));
}

#[test]
fn storage_numbers_read_like_strtol() {
    use StorageCommand::Set;
    assert_request(b"set b 4294967295 0 1\r\nq\r\n", storage(Set, b"b", u32::MAX, 0, b"q", false));
    assert_request(b"set b 4294967296 0 1\r\nq\r\n", storage(Set, b"b", 0, 0, b"q", false));
    assert_request(b"set b 18446744073709551615 0 1\r\nq\r\n", storage(Set, b"b", u32::MAX, 0, b"q", false));
    assert_request(b"set b +5 0 1\r\nq\r\n", storage(Set, b"b", 5, 0, b"q", false));
    assert_request(b"set b -0 0 1\r\nq\r\n", storage(Set, b"b", 0, 0, b"q", false));
    assert_request(b"set b 5\t 0 1\r\nq\r\n", storage(Set, b"b", 5, 0, b"q", false));
    assert_request(b"set b \t5 0 1\r\nq\r\n", storage(Set, b"b", 5, 0, b"q", false));
    assert_request(b"set b 0 4294967306 1\r\nq\r\n", storage(Set, b"b", 0, 10, b"q", false));
    assert_request(b"set b 0 2147483648 1\r\nq\r\n", storage(Set, b"b", 0, i32::MIN, b"q", false));
    // The byte count is truncated to 32 bits too.
    assert_request(b"set v 0 0 4294967297\r\nq\r\n", storage(Set, b"v", 0, 0, b"q", false));
    assert_request(b"set v 0 0 -4294967295\r\nq\r\n", storage(Set, b"v", 0, 0, b"q", false));
}

#[test]
fn bad_storage_lines_leave_the_data_to_be_read_as_a_command() {
    for line in [
        &b"set b 0 0 -1\r\n"[..],
        b"set b 0 0 x\r\n",
        b"set b -1 0 1\r\n",
        b"set b 18446744073709551616 0 1\r\n",
        b"set b 5x 0 1\r\n",
        b"set b 0 x 1\r\n",
        b"set b 0 0 2147483647\r\n",
        b"set b 0 0 2147483646\r\n",
        b"cas b 0 0 1 x\r\n",
        b"cas b 0 0 1 -1\r\n",
    ] {
        assert_refused(line, BAD_FORMAT);
        let wire = [line, b"abc\r\n"].concat();
        assert_eq!(outcomes(&wire), [error_outcome(BAD_FORMAT, line.len()), error_outcome(ERROR, 5)]);
    }
    let long_key = [b"set ".to_vec(), key(MAX_KEY_LEN + 1), b" 0 0 1\r\n".to_vec()].concat();
    assert_refused(&long_key, BAD_FORMAT);
    assert_refused(&[b"set ".to_vec(), key(MAX_KEY_LEN + 1), b" 0 0 1 noreply\r\n".to_vec()].concat(), b"");
    // `noreply` silences the error, even when it stands where the byte count should be.
    assert_refused(b"set b 0 0 -1 noreply\r\n", b"");
    assert_refused(b"set b 0 0 noreply\r\n", b"");
    // Wrong token counts are answered before `noreply` is looked for.
    assert_refused(b"set b 0 0\r\n", ERROR);
    assert_refused(b"set b 0 0 1 noreply extra\r\n", ERROR);
    assert_refused(b"cas b 0 0 1\r\n", ERROR);
    assert_refused(b"cas b 0 0 1 2 noreply x\r\n", ERROR);
}

#[test]
fn bad_data_chunk() {
    let bad = |key: &[u8], noreply| Model::BadDataChunk { key: key.to_vec(), noreply };
    // memcached reads `bytes + 2` and checks the last two; the rest is the next command.
    assert_eq!(outcomes(b"set b 0 0 1\r\nabcd\r\n"), [Outcome::Request(bad(b"b", false), 16), error_outcome(ERROR, 3)]);
    assert_eq!(outcomes(b"set b 0 0 1 noreply\r\nabcd\r\n")[0], Outcome::Request(bad(b"b", true), 24));
    assert_request(b"set b 0 0 3\r\nabc\rg", bad(b"b", false));
    assert_request(b"set b 0 0 3\r\nabc\ng", bad(b"b", false));
    assert_request(b"set b 0 0 0\r\nab", bad(b"b", false));
}

#[test]
fn too_large_values_are_refused_and_swallowed() {
    let line = b"set big 0 0 2000000\r\n";
    let block = 2_000_002;
    // Refused as soon as the line is in; what has not arrived yet is swallowed later.
    let mut wire = line.to_vec();
    wire.extend_from_slice(&[b'x'; 100]);
    match parse(&wire, &LIMITS) {
        Parse::Invalid(invalid) => assert_eq!(
            invalid,
            Invalid { reply: Cow::Borrowed(TOO_LARGE), consumed: line.len() + 100, swallow: block - 100, close: false }
        ),
        other => panic!("{other:?}"),
    }
    // All of it buffered, and a command after it.
    wire.extend_from_slice(&vec![b'x'; block - 100]);
    wire.extend_from_slice(b"get a\r\n");
    match parse(&wire, &LIMITS) {
        Parse::Invalid(invalid) => {
            assert_eq!((invalid.consumed, invalid.swallow), (line.len() + block, 0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        outcome_incrementally(b"set big 0 0 1048577 noreply\r\n"),
        Outcome::Invalid { reply: Vec::new(), drops: 29 + 1048579, close: false }
    );
    // Exactly the limit is accepted by the parser (the store has the last word).
    assert_eq!(outcome(b"set big 0 0 1048576\r\n"), Outcome::Incomplete);
    assert_eq!(
        outcome(b"set b 0 0 2147483645\r\n"),
        Outcome::Invalid { reply: TOO_LARGE.to_vec(), drops: 22 + 2147483647, close: false }
    );
}

// ---- retrieval commands

#[test]
fn retrieval_commands() {
    use RetrievalCommand::*;
    assert_request(b"get a\r\n", retrieval(Get, &[b"a"]));
    assert_request(b"get a\n", retrieval(Get, &[b"a"]));
    assert_request(b"get a b  c \r\n", retrieval(Get, &[b"a", b"b", b"c"]));
    assert_request(b" get a\r\n", retrieval(Get, &[b"a"]));
    assert_request(b"bget a\r\n", retrieval(Get, &[b"a"]));
    assert_request(b"gets a a\r\n", retrieval(Gets, &[b"a", b"a"]));
    assert_request(b"gat 10 a b\r\n", retrieval(Gat { exptime: 10 }, &[b"a", b"b"]));
    assert_request(b"gats -1 a\r\n", retrieval(Gats { exptime: -1 }, &[b"a"]));
    assert_request(b"gat 4294967306 a\r\n", retrieval(Gat { exptime: 10 }, &[b"a"]));
    // No keys after the exptime: memcached answers END.
    assert_request(b"gat 10\r\n", retrieval(Gat { exptime: 10 }, &[]));
    // Retrievals have no noreply.
    assert_request(b"get a noreply\r\n", retrieval(Get, &[b"a", b"noreply"]));
    assert_request(b"get t\tk a\x01\x7f\x80\r\n", retrieval(Get, &[b"t\tk", b"a\x01\x7f\x80"]));
    // A NUL ends the line for memcached.
    assert_request(b"get t\0zz\r\n", retrieval(Get, &[b"t"]));
    // Only one CR is stripped; the other is part of the key, as in memcached.
    assert_request(b"get a\r\r\n", retrieval(Get, &[b"a\r"]));
    assert_request(
        &[b"get ".to_vec(), key(MAX_KEY_LEN)].concat().into_iter().chain(*b"\r\n").collect::<Vec<_>>(),
        retrieval(Get, &[&key(MAX_KEY_LEN)]),
    );
}

#[test]
fn many_keys() {
    for count in [INLINE_KEYS, INLINE_KEYS + 1, 500] {
        let keys: Vec<Vec<u8>> = (0..count).map(|i| format!("key:{i}").into_bytes()).collect();
        let wire = [b"gets ".to_vec(), keys.join(&b' '), b"\r\n".to_vec()].concat();
        let expected = Model::Retrieval { command: RetrievalCommand::Gets, keys };
        assert_eq!(outcome(&wire), Outcome::Request(expected.clone(), wire.len()));
        if count <= INLINE_KEYS + 1 {
            assert_request(&wire, expected);
        }
    }
}

#[test]
fn bad_retrievals() {
    assert_refused(b"get\r\n", ERROR);
    assert_refused(b"gets  \r\n", ERROR);
    assert_refused(b"gat\r\n", ERROR);
    assert_refused(b"gat foo\r\n", BAD_EXPTIME);
    assert_refused(b"gats x a\r\n", BAD_EXPTIME);
    assert_refused(b"getx a\r\n", ERROR);
    let long = [b"get a ".to_vec(), key(MAX_KEY_LEN + 1), b" b\r\n".to_vec()].concat();
    assert_refused(&long, BAD_FORMAT);
    assert_refused(&[b"gat 1 ".to_vec(), key(MAX_KEY_LEN + 1), b"\r\n".to_vec()].concat(), BAD_FORMAT);
}

// ---- lines

#[test]
fn unknown_and_empty_lines() {
    for line in [
        &b"\n"[..],
        b"\r\n",
        b" \r\n",
        b"x\r\n",
        b"xx\r\n",
        b"GET a\r\n",
        b"get\ta\r\n",
        b"versionx\r\n",
        b"set\r\n",
        b"\0get a\r\n",
        b"mx a\r\n",
        b"m a\r\n",
        b"slabs automove 1\r\n",
        b"lru_crawler crawl all\r\n",
        b"lru tune 1 1 1 1\r\n",
        b"watch\r\n",
        b"misbehave\r\n",
        b"debugtime 1\r\n",
        b"extstore x y\r\n",
    ] {
        assert_refused(line, ERROR);
    }
}

#[test]
fn long_lines_without_a_newline() {
    let limit = MAX_LINE_WITHOUT_NEWLINE;
    assert_eq!(outcome(&vec![b'x'; limit]), Outcome::Incomplete);
    let close = Outcome::Invalid { reply: Vec::new(), drops: 0, close: true };
    assert_eq!(outcome(&vec![b'x'; limit + 1]), close);
    // With its newline buffered, a long line is an ordinary line (fed slowly, it would be closed).
    let mut long = vec![b'x'; 4096];
    long.extend_from_slice(b"\r\n");
    assert_eq!(outcome(&long), error_outcome(ERROR, long.len()));
    let long_set = [b"set a 0 0 1 ".to_vec(), vec![b'x'; 3000], b"\r\nq\r\n".to_vec()].concat();
    assert_eq!(
        outcome(&long_set),
        Outcome::Request(storage(StorageCommand::Set, b"a", 0, 0, b"q", false), long_set.len())
    );
    // Only get and gets lines may grow without bound (after at most 100 spaces).
    let keys = b"a ".repeat(4096);
    for prefix in [&b"get "[..], b"gets ", b"  gets ", &[b' '; 100].iter().chain(b"get ").copied().collect::<Vec<_>>()]
    {
        assert_eq!(outcome(&[prefix, &keys].concat()), Outcome::Incomplete, "{:?}", prefix.escape_ascii().to_string());
    }
    for prefix in [
        &b"gat 1 "[..],
        b"gats 1 ",
        b"mg ",
        b"getx ",
        b"set ",
        &[b' '; 101].iter().chain(b"get ").copied().collect::<Vec<_>>(),
    ] {
        assert_eq!(outcome(&[prefix, &keys].concat()), close, "{:?}", prefix.escape_ascii().to_string());
    }
    let long_key = [b"get ".to_vec(), vec![b'a'; 4096], b"\r\n".to_vec()].concat();
    assert_eq!(outcome(&long_key), error_outcome(BAD_FORMAT, long_key.len()));
}

// ---- other keyed commands

#[test]
fn delete() {
    let delete = |noreply| Model::Delete { key: b"a".to_vec(), noreply };
    assert_request(b"delete a\r\n", delete(false));
    assert_request(b"delete a 0\r\n", delete(false));
    assert_request(b"delete a noreply\r\n", delete(true));
    assert_request(b"delete a 0 noreply\r\n", delete(true));
    assert_request(b"delete noreply\r\n", Model::Delete { key: b"noreply".to_vec(), noreply: false });
    assert_refused(b"delete\r\n", ERROR);
    assert_refused(b"delete a x y z\r\n", ERROR);
    for line in [&b"delete a 5\r\n"[..], b"delete a 0 0\r\n", b"delete a noreply 0\r\n", b"delete a 00\r\n"] {
        assert_refused(line, BAD_DELETE);
    }
    assert_refused(b"delete a 5 noreply\r\n", b"");
    assert_refused(&[b"delete ".to_vec(), key(MAX_KEY_LEN + 1), b"\r\n".to_vec()].concat(), BAD_FORMAT);
    assert_refused(&[b"delete ".to_vec(), key(MAX_KEY_LEN + 1), b" noreply\r\n".to_vec()].concat(), b"");
}

#[test]
fn incr_decr() {
    let arith = |incr, delta, noreply| Model::Arith { key: b"n".to_vec(), incr, delta, noreply };
    assert_request(b"incr n 5\r\n", arith(true, 5, false));
    assert_request(b"decr n 100\r\n", arith(false, 100, false));
    assert_request(b"incr n 18446744073709551615\r\n", arith(true, u64::MAX, false));
    assert_request(b"incr n -0\r\n", arith(true, 0, false));
    assert_request(b"incr n +3\r\n", arith(true, 3, false));
    assert_request(b"incr n 1 2\r\n", arith(true, 1, false));
    assert_request(b"decr n 1 noreply\r\n", arith(false, 1, true));
    for line in [&b"incr n 18446744073709551616\r\n"[..], b"incr n -1\r\n", b"incr n x\r\n", b"decr n 1x\r\n"] {
        assert_refused(line, BAD_DELTA);
    }
    assert_refused(b"incr n abc noreply\r\n", b"");
    assert_refused(b"incr n\r\n", ERROR);
    assert_refused(b"decr n 1 2 3\r\n", ERROR);
    assert_refused(&[b"incr ".to_vec(), key(MAX_KEY_LEN + 1), b" 1\r\n".to_vec()].concat(), BAD_FORMAT);
}

#[test]
fn touch() {
    let touch = |exptime, noreply| Model::Touch { key: b"n".to_vec(), exptime, noreply };
    assert_request(b"touch n 10\r\n", touch(10, false));
    assert_request(b"touch n 10 noreply\r\n", touch(10, true));
    assert_request(b"touch n 1 2\r\n", touch(1, false));
    assert_request(b"touch n 4294967296\r\n", touch(0, false));
    assert_request(b"touch n -2147483649\r\n", touch(i32::MAX, false));
    assert_refused(b"touch n\r\n", ERROR);
    assert_refused(b"touch n 10 a b\r\n", ERROR);
    assert_refused(b"touch n x\r\n", BAD_EXPTIME);
    assert_refused(b"touch n x noreply\r\n", b"");
    assert_refused(&[b"touch ".to_vec(), key(MAX_KEY_LEN + 1), b" 1\r\n".to_vec()].concat(), BAD_FORMAT);
}

// ---- connection and server commands

#[test]
fn flush_all() {
    let flush = |delay, noreply| Model::FlushAll { delay, noreply };
    assert_request(b"flush_all\r\n", flush(0, false));
    assert_request(b"flush_all 0\r\n", flush(0, false));
    assert_request(b"flush_all 10 noreply\r\n", flush(10, true));
    assert_request(b"flush_all noreply\r\n", flush(0, true));
    assert_request(b"flush_all -1\r\n", flush(-1, false));
    assert_request(b"flush_all 1 2\r\n", flush(1, false));
    assert_refused(b"flush_all x\r\n", BAD_EXPTIME);
    assert_refused(b"flush_all x noreply\r\n", b"");
    assert_refused(b"flush_all noreply 5\r\n", BAD_EXPTIME);
    assert_refused(b"flush_all 1 2 3\r\n", ERROR);
}

#[test]
fn verbosity() {
    let verbosity = |level, noreply| Model::Verbosity { level, noreply };
    assert_request(b"verbosity 1\r\n", verbosity(1, false));
    assert_request(b"verbosity 1 noreply\r\n", verbosity(1, true));
    assert_request(b"verbosity 1 2\r\n", verbosity(1, false));
    assert_request(b"verbosity 4294967296\r\n", verbosity(0, false));
    assert_refused(b"verbosity\r\n", ERROR);
    assert_refused(b"verbosity 1 2 3\r\n", ERROR);
    assert_refused(b"verbosity x\r\n", BAD_FORMAT);
    assert_refused(b"verbosity -1\r\n", BAD_FORMAT);
    assert_refused(b"verbosity x noreply\r\n", b"");
    assert_refused(b"verbosity noreply\r\n", b"");
}

#[test]
fn cache_memlimit() {
    let memlimit = |megabytes, noreply| Model::CacheMemlimit { megabytes, noreply };
    assert_request(b"cache_memlimit 50\r\n", memlimit(50, false));
    assert_request(b"cache_memlimit 8\r\n", memlimit(8, false));
    assert_request(b"cache_memlimit 1000000000\r\n", memlimit(1_000_000_000, false));
    assert_request(b"cache_memlimit 50 noreply\r\n", memlimit(50, true));
    // A last token that is not `noreply` is ignored; the number is truncated to 32 bits as memcached
    // 1.6.18 truncates it (4294967304 is 8).
    assert_request(b"cache_memlimit 50 foo\r\n", memlimit(50, false));
    assert_request(b"cache_memlimit 4294967304\r\n", memlimit(8, false));
    assert_refused(b"cache_memlimit\r\n", ERROR);
    assert_refused(b"cache_memlimit 50 foo bar\r\n", ERROR);
    assert_refused(b"cache_memlimit x\r\n", ERROR);
    assert_refused(b"cache_memlimit 5x\r\n", ERROR);
    assert_refused(b"cache_memlimit -1\r\n", ERROR);
    assert_refused(b"cache_memlimit 7\r\n", MEMLIMIT_TOO_SMALL);
    assert_refused(b"cache_memlimit 1000000001\r\n", MEMLIMIT_NOT_BYTES);
    // noreply silences every error.
    assert_refused(b"cache_memlimit 7 noreply\r\n", b"");
    assert_refused(b"cache_memlimit x noreply\r\n", b"");
    assert_refused(b"cache_memlimit noreply\r\n", b"");
}

#[test]
fn stats_cachedump() {
    let dump = |class, limit| Model::CacheDump { class, limit };
    assert_request(b"stats cachedump 1 0\r\n", dump(1, 0));
    assert_request(b"stats cachedump 63 1\r\n", dump(63, 1));
    assert_request(b"stats cachedump 0 5 x\r\n", dump(0, 5));
    assert_refused(b"stats cachedump\r\n", BAD_COMMAND_LINE);
    assert_refused(b"stats cachedump 1\r\n", BAD_COMMAND_LINE);
    assert_refused(b"stats cachedump x 1\r\n", BAD_FORMAT);
    assert_refused(b"stats cachedump 1 x\r\n", BAD_FORMAT);
    assert_refused(b"stats cachedump -1 1\r\n", BAD_FORMAT);
    assert_refused(b"stats cachedump 1 -1\r\n", BAD_FORMAT);
    assert_refused(b"stats cachedump 64 1\r\n", ILLEGAL_SLAB_ID);
}

#[test]
fn stats() {
    let stats = |group: Option<&str>| Model::Stats { group: group.map(str::to_owned) };
    assert_request(b"stats\r\n", stats(None));
    assert_request(b"stats  \r\n", stats(None));
    assert_request(b"stats settings\r\n", stats(Some("settings")));
    assert_request(b"stats settings x\r\n", stats(Some("settings")));
    assert_request(b"stats reset x\r\n", stats(Some("reset")));
    // Not special: an unknown group, which the server answers with ERROR.
    assert_request(b"stats noreply\r\n", stats(Some("noreply")));
    assert_request(b"stats detail on\r\n", stats(Some("detail on")));
    assert_request(b"stats detail dump x\r\n", stats(Some("detail dump")));
    assert_refused(b"stats detail\r\n", STATS_DETAIL_USAGE);
    assert_refused(b"stats detail x\r\n", STATS_DETAIL_USAGE);
    assert_refused(b"stats \xff\r\n", ERROR);
}

#[test]
fn version_quit_shutdown() {
    assert_request(b"version\r\n", Model::Version);
    assert_request(b"version x y\r\n", Model::Version);
    assert_request(b"quit\r\n", Model::Quit);
    assert_request(b"quit now\r\n", Model::Quit);
    assert_request(b"shutdown\r\n", Model::Shutdown { graceful: false });
    assert_request(b"shutdown graceful\r\n", Model::Shutdown { graceful: true });
    assert_refused(b"shutdown x\r\n", BAD_SHUTDOWN_MODE);
    assert_refused(b"shutdown graceful x\r\n", BAD_SHUTDOWN_MODE);
}

#[test]
fn meta_lines_are_delegated() {
    assert_request(b"mn\r\n", Model::Meta);
    assert_request(b"  mn\r\n", Model::Meta);
    assert_eq!(outcome(b"mg foo v\r\nget a\r\n"), Outcome::Request(Model::Meta, 10));
}

// ---- the codec around the parser

fn parsed(wire: &[u8]) -> Request<'_> {
    match parse(wire, &LIMITS) {
        Parse::Request { request, .. } => request,
        other => panic!("{other:?}"),
    }
}

#[test]
fn routes() {
    let route = |wire: &'static [u8]| -> String { format!("{:?}", TextCodec::route(&parsed(wire))) };
    assert_eq!(route(b"set k 0 0 1\r\nx\r\n"), format!("{:?}", Route::Key(b"k")));
    assert_eq!(route(b"set k 0 0 1\r\nxyz"), format!("{:?}", Route::Key(b"k")));
    assert_eq!(route(b"delete k\r\n"), format!("{:?}", Route::Key(b"k")));
    assert_eq!(route(b"incr k 1\r\n"), format!("{:?}", Route::Key(b"k")));
    assert_eq!(route(b"touch k 1\r\n"), format!("{:?}", Route::Key(b"k")));
    assert_eq!(route(b"get a b c\r\n"), format!("{:?}", Route::Keys(3)));
    assert_eq!(route(b"gat 1\r\n"), format!("{:?}", Route::Connection));
    assert_eq!(route(b"version\r\n"), format!("{:?}", Route::Connection));
    assert_eq!(route(b"quit\r\n"), format!("{:?}", Route::Connection));
    assert_eq!(route(b"flush_all 5\r\n"), format!("{:?}", Route::Admin(Admin::Flush { delay: 5 })));
    assert_eq!(route(b"verbosity 2\r\n"), format!("{:?}", Route::Admin(Admin::Verbosity(2))));
    assert_eq!(route(b"stats\r\n"), format!("{:?}", Route::Admin(Admin::Stats(None))));
    assert_eq!(route(b"stats items\r\n"), format!("{:?}", Route::Admin(Admin::Stats(Some("items")))));
    assert_eq!(route(b"shutdown\r\n"), format!("{:?}", Route::Admin(Admin::Shutdown)));
    assert_eq!(route(b"cache_memlimit 50\r\n"), format!("{:?}", Route::Admin(Admin::MemoryLimit(50 << 20))));
    assert_eq!(route(b"stats cachedump 2 10\r\n"), format!("{:?}", Route::SlabClass(2)));
}

#[test]
fn key_frames_reparse_to_one_key_retrievals() {
    for wire in [&b"get a bb\r\n"[..], b"bget a bb\r\n", b"gets a bb\r\n", b"gat 10 a bb\r\n", b"gats -7 a bb\r\n"] {
        let request = parsed(wire);
        let Request::Retrieval(whole) = &request else { panic!() };
        for index in 0..2 {
            assert_eq!(TextCodec::key_at(&request, index), [&b"a"[..], b"bb"][index]);
            let mut frame = Vec::new();
            TextCodec::key_frame(&request, index, &mut frame);
            let Request::Retrieval(single) = parsed(&frame) else { panic!() };
            assert_eq!(single.command, whole.command);
            assert_eq!(single.keys.iter().collect::<Vec<_>>(), [whole.keys.get(index)]);
        }
    }
    let mut out = Vec::new();
    TextCodec::key_frame(&parsed(b"gats -7 a\r\n"), 0, &mut out);
    assert_eq!(out, b"gats -7 a\r\n");
}

#[test]
fn connection_answers() {
    let answer = |wire: &'static [u8]| {
        let mut out = Vec::new();
        let after = TextCodec::answer(&parsed(wire), &mut out);
        (out, after)
    };
    assert_eq!(answer(b"version\r\n"), (format!("VERSION {}\r\n", crate::VERSION).into_bytes(), After::Continue));
    assert_eq!(answer(b"quit\r\n"), (Vec::new(), After::Close));
    assert_eq!(answer(b"gat 10\r\n"), (END.to_vec(), After::Continue));
    let mut out = Vec::new();
    TextCodec::finish_keys(&parsed(b"get a\r\n"), &mut out);
    assert_eq!(out, END);
}

#[test]
fn admin_answers() {
    let answer = |wire: &'static [u8], reply: AdminReply<'_>| {
        let mut out = Vec::new();
        TextCodec::answer_admin(&parsed(wire), reply, &mut out);
        String::from_utf8(out).unwrap()
    };
    let pairs = [(Cow::Borrowed("pid"), "7".to_string()), (Cow::Owned("curr_items".to_string()), "0".to_string())];
    assert_eq!(answer(b"stats\r\n", AdminReply::Stats(&pairs)), "STAT pid 7\r\nSTAT curr_items 0\r\nEND\r\n");
    assert_eq!(answer(b"stats items\r\n", AdminReply::Stats(&[])), "END\r\n");
    assert_eq!(answer(b"stats reset\r\n", AdminReply::Reset), "RESET\r\n");
    assert_eq!(answer(b"stats nonsense\r\n", AdminReply::BadArgument), "ERROR\r\n");
    assert_eq!(answer(b"flush_all\r\n", AdminReply::Flushed), "OK\r\n");
    assert_eq!(answer(b"flush_all noreply\r\n", AdminReply::Flushed), "");
    assert_eq!(answer(b"flush_all\r\n", AdminReply::FlushDisabled), "CLIENT_ERROR flush_all not allowed\r\n");
    assert_eq!(answer(b"flush_all 0 noreply\r\n", AdminReply::FlushDisabled), "");
    assert_eq!(answer(b"verbosity 1\r\n", AdminReply::VerbosityOk), "OK\r\n");
    assert_eq!(answer(b"verbosity 1 noreply\r\n", AdminReply::VerbosityOk), "");
    assert_eq!(answer(b"shutdown\r\n", AdminReply::ShutdownDisabled), "ERROR: shutdown not enabled\r\n");
    assert_eq!(answer(b"shutdown graceful\r\n", AdminReply::ShutdownAccepted), "");
    assert_eq!(answer(b"cache_memlimit 50\r\n", AdminReply::MemoryLimitSet), "OK\r\n");
    assert_eq!(answer(b"cache_memlimit 50 noreply\r\n", AdminReply::MemoryLimitSet), "");
    assert_eq!(
        answer(b"cache_memlimit 5000\r\n", AdminReply::MemoryLimitRefused),
        "MEMLIMIT_ADJUST_FAILED out of bounds or unable to adjust\r\n"
    );
}

// ---- properties

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Any byte but the space that separates tokens, the NUL that ends a line for memcached and the newline
    // that ends it (control characters included, see `key_token_ok`).
    proptest::collection::vec(prop_oneof![1u8..=9, 11u8..=31, 0x21u8..=0xff], 1..=MAX_KEY_LEN)
}

fn short_key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![b'a'..=b'z', 0x80u8..=0xff], 1..12)
}

fn storage_command() -> impl Strategy<Value = StorageCommand> {
    prop_oneof![
        Just(StorageCommand::Set),
        Just(StorageCommand::Add),
        Just(StorageCommand::Replace),
        Just(StorageCommand::Append),
        Just(StorageCommand::Prepend),
        any::<u64>().prop_map(|unique| StorageCommand::Cas { unique }),
    ]
}

fn retrieval_command() -> impl Strategy<Value = RetrievalCommand> {
    prop_oneof![
        Just(RetrievalCommand::Get),
        Just(RetrievalCommand::Gets),
        any::<i32>().prop_map(|exptime| RetrievalCommand::Gat { exptime }),
        any::<i32>().prop_map(|exptime| RetrievalCommand::Gats { exptime }),
    ]
}

fn request_strategy() -> impl Strategy<Value = Model> {
    prop_oneof![
        (
            storage_command(),
            key_strategy(),
            any::<u32>(),
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<bool>()
        )
            .prop_map(|(command, key, client_flags, exptime, value, noreply)| Model::Storage {
                command,
                key,
                client_flags,
                exptime,
                value,
                noreply
            }),
        (key_strategy(), any::<bool>()).prop_map(|(key, noreply)| Model::BadDataChunk { key, noreply }),
        (retrieval_command(), proptest::collection::vec(short_key(), 1..40))
            .prop_map(|(command, keys)| Model::Retrieval { command, keys }),
        (key_strategy(), any::<bool>()).prop_map(|(key, noreply)| Model::Delete { key, noreply }),
        (key_strategy(), any::<bool>(), any::<u64>(), any::<bool>())
            .prop_map(|(key, incr, delta, noreply)| Model::Arith { key, incr, delta, noreply }),
        (key_strategy(), any::<i32>(), any::<bool>()).prop_map(|(key, exptime, noreply)| Model::Touch {
            key,
            exptime,
            noreply
        }),
        (any::<i32>(), any::<bool>()).prop_map(|(delay, noreply)| Model::FlushAll { delay, noreply }),
        (any::<u32>(), any::<bool>()).prop_map(|(level, noreply)| Model::Verbosity { level, noreply }),
        (8u32..=1_000_000_000, any::<bool>()).prop_map(|(megabytes, noreply)| Model::CacheMemlimit { megabytes, noreply }),
        (0u32..64, any::<u32>()).prop_map(|(class, limit)| Model::CacheDump { class, limit }),
        prop_oneof![
            Just(None),
            Just(Some("settings")),
            Just(Some("items")),
            Just(Some("slabs")),
            Just(Some("reset")),
            Just(Some("detail off"))
        ]
        .prop_map(|group| Model::Stats { group: group.map(str::to_owned) }),
        any::<bool>().prop_map(|graceful| Model::Shutdown { graceful }),
        Just(Model::Version),
        Just(Model::Quit),
        Just(Model::Meta),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(request in request_strategy()) {
        let wire = encode(&request);
        prop_assert_eq!(outcome(&wire), Outcome::Request(request, wire.len()));
    }

    #[test]
    fn pipelines_round_trip(requests in proptest::collection::vec(request_strategy(), 1..8)) {
        let wire: Vec<u8> = requests.iter().flat_map(encode).collect();
        let expected: Vec<Outcome> = requests.iter().map(|request| Outcome::Request(request.clone(), encode(request).len())).collect();
        prop_assert_eq!(outcomes(&wire), expected);
    }

    #[test]
    fn requests_parse_the_same_byte_by_byte(request in request_strategy()) {
        let wire = encode(&request);
        prop_assert_eq!(outcome_incrementally(&wire), Outcome::Request(request, wire.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(prop_oneof![
        any::<u8>(),
        Just(b' '), Just(b'\r'), Just(b'\n'), Just(b'0'), Just(b'1'), Just(b'-'),
    ], 0..400), prefix in prop_oneof![
        Just(&b""[..]), Just(&b"set k 0 0 "[..]), Just(&b"get "[..]), Just(&b"gat "[..]), Just(&b"cas k 0 0 1 "[..]),
        Just(&b"delete k "[..]), Just(&b"incr k "[..]), Just(&b"touch k "[..]), Just(&b"flush_all "[..]),
        Just(&b"verbosity "[..]), Just(&b"stats "[..]), Just(&b"shutdown "[..]),
    ]) {
        let wire = [prefix, &wire].concat();
        outcomes(&wire);
    }
}

// ---- execution (needs the store engine)

mod executor {
    use std::sync::Arc;

    use super::*;
    use crate::config::Settings;
    use crate::shard::Shard;
    use crate::store::{Store, StoreConfig};

    fn shard_with(settings: Settings) -> Shard {
        let store = Store::new(StoreConfig {
            memory_bytes: 64 << 20,
            item_size_max: settings.item_size_max,
            evict: settings.evictions,
            shard_index: 0,
            shard_count: 1,
            try_hugepages: false,
            memory_file: None,
            clock_origin: 0,
        })
        .expect("store");
        Shard::new(0, store, Arc::new(settings))
    }

    fn shard() -> Shard {
        shard_with(Settings::default())
    }

    /// Plays `wire` through parse, route and execute as a one-shard connection would, returning the
    /// bytes sent back (admin requests are answered as the server would by default).
    fn run(shard: &mut Shard, mut wire: &[u8]) -> String {
        let limits = Limits { item_size_max: shard.settings.item_size_max };
        let mut out = Vec::new();
        let mut swallow = 0usize;
        while !wire.is_empty() {
            if swallow > 0 {
                let skip = swallow.min(wire.len());
                swallow -= skip;
                wire = &wire[skip..];
                continue;
            }
            let consumed = match TextCodec::parse(wire, &limits) {
                Parse::Incomplete => break,
                Parse::Invalid(invalid) => {
                    out.extend_from_slice(&invalid.reply);
                    if invalid.close {
                        break;
                    }
                    swallow = invalid.swallow;
                    invalid.consumed
                }
                Parse::Request { request, consumed } => {
                    match TextCodec::route(&request) {
                        Route::Key(_) => TextCodec::execute(shard, &request, &mut out),
                        Route::AllShards | Route::SlabClass(_) => {
                            TextCodec::execute(shard, &request, &mut out);
                            TextCodec::finish_keys(&request, &mut out);
                        }
                        Route::Keys(count) => {
                            for index in 0..count {
                                TextCodec::execute_key(shard, &request, index, &mut out);
                            }
                            TextCodec::finish_keys(&request, &mut out);
                        }
                        Route::Connection => {
                            if TextCodec::answer(&request, &mut out) == After::Close {
                                break;
                            }
                        }
                        Route::Admin(Admin::Flush { delay }) => {
                            shard.flush(delay);
                            TextCodec::answer_admin(&request, AdminReply::Flushed, &mut out);
                        }
                        Route::Admin(Admin::Verbosity(_)) => {
                            TextCodec::answer_admin(&request, AdminReply::VerbosityOk, &mut out)
                        }
                        Route::Admin(_) => TextCodec::answer_admin(&request, AdminReply::BadArgument, &mut out),
                    }
                    consumed
                }
            };
            wire = &wire[consumed..];
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn counters(shard: &Shard) -> Vec<(&'static str, u64)> {
        let mut all = Vec::new();
        shard.counters.for_each(|name, value| {
            if value != 0 {
                all.push((name, value))
            }
        });
        all
    }

    /// Each of `expected` is among the shard's counters (others may be counted too).
    fn assert_counted(shard: &Shard, expected: &[(&'static str, u64)]) {
        let counted = counters(shard);
        for pair in expected {
            assert!(counted.contains(pair), "{pair:?} in {counted:?}");
        }
    }

    #[test]
    fn set_get_gets() {
        let mut shard = shard();
        assert_eq!(run(&mut shard, b"set a 5 0 1\r\nx\r\nget a b\r\n"), "STORED\r\nVALUE a 5 1\r\nx\r\nEND\r\n");
        let gets = run(&mut shard, b"gets a\r\n");
        assert!(gets.starts_with("VALUE a 5 1 ") && gets.ends_with("\r\nx\r\nEND\r\n"), "{gets}");
        assert_eq!(run(&mut shard, b"get a a\r\n"), "VALUE a 5 1\r\nx\r\nVALUE a 5 1\r\nx\r\nEND\r\n");
        // memcached 1.6.18 counts per key: 2 + 1 + 2 gets, one of them (`b`) a miss.
        assert_eq!(counters(&shard), [("cmd_get", 5), ("cmd_set", 1), ("get_hits", 4), ("get_misses", 1)]);
    }

    #[test]
    fn storage_modes_and_cas() {
        let mut shard = shard();
        assert_eq!(
            run(
                &mut shard,
                b"set a 0 0 1\r\n5\r\nappend a 5 100 1\r\n6\r\nprepend a 0 0 1\r\n4\r\nget a\r\n\
                  add a 0 0 1\r\nx\r\nreplace zz 0 0 1\r\nx\r\nappend zz 0 0 1\r\nx\r\nadd b 0 0 1\r\nx\r\n"
            ),
            "STORED\r\nSTORED\r\nSTORED\r\nVALUE a 0 3\r\n456\r\nEND\r\nNOT_STORED\r\nNOT_STORED\r\nNOT_STORED\r\nSTORED\r\n"
        );
        let gets = run(&mut shard, b"gets a\r\n");
        let cas: u64 = gets.split_whitespace().nth(4).unwrap().parse().unwrap();
        let wire = format!(
            "cas a 0 0 1 {}\r\ny\r\ncas a 0 0 1 {cas}\r\nz\r\ncas a 0 0 1 {cas}\r\nz\r\ncas nx 0 0 1 1\r\nz\r\n",
            cas + 1
        );
        assert_eq!(run(&mut shard, wire.as_bytes()), "EXISTS\r\nSTORED\r\nEXISTS\r\nNOT_FOUND\r\n");
        // memcached 1.6.18 counts 11 sets here: seven storage commands and four cas.
        assert_counted(&shard, &[("cas_badval", 2), ("cas_hits", 1), ("cas_misses", 1), ("cmd_set", 11)]);
    }

    #[test]
    fn cas_disabled() {
        let mut shard = shard_with(Settings { cas_enabled: false, ..Settings::default() });
        assert_eq!(
            run(&mut shard, b"set a 0 0 1\r\nx\r\ngets a\r\ncas a 0 0 1 0\r\ny\r\ncas zz 0 0 1 0\r\ny\r\nget a\r\n"),
            "STORED\r\nVALUE a 0 1 0\r\nx\r\nEND\r\nEXISTS\r\nNOT_FOUND\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
        );
    }

    #[test]
    fn noreply_silences_everything() {
        let mut shard = shard();
        assert_eq!(
            run(
                &mut shard,
                b"set a 0 0 1 noreply\r\n1\r\nadd a 0 0 1 noreply\r\n1\r\nincr a 5 noreply\r\nincr zz 1 noreply\r\n\
                  touch a 10 noreply\r\ndelete zz noreply\r\nset b 0 0 1 noreply\r\nabcd\r\nget a\r\n"
            ),
            // "d\r\n", the rest of the bad data chunk, is a command of its own.
            "ERROR\r\nVALUE a 0 1\r\n6\r\nEND\r\n"
        );
    }

    #[test]
    fn incr_decr() {
        let mut shard = shard();
        assert_eq!(
            run(
                &mut shard,
                b"set n 0 0 2\r\n10\r\nincr n 5\r\ndecr n 100\r\nincr n 18446744073709551615\r\nincr n 1\r\n\
                  incr zz 1\r\ndecr zz 1\r\nset s 0 0 1\r\nx\r\nincr s 1\r\nset e 0 0 0\r\n\r\nincr e 1\r\n"
            ),
            "STORED\r\n15\r\n0\r\n18446744073709551615\r\n0\r\nNOT_FOUND\r\nNOT_FOUND\r\nSTORED\r\n\
             CLIENT_ERROR cannot increment or decrement non-numeric value\r\nSTORED\r\n\
             CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        );
        assert_counted(&shard, &[("incr_hits", 3), ("incr_misses", 1), ("decr_hits", 1), ("decr_misses", 1)]);
    }

    #[test]
    fn touch_gat_and_delete() {
        let mut shard = shard();
        assert_eq!(
            run(
                &mut shard,
                b"set a 0 0 1\r\n1\r\ntouch a 100\r\ntouch b 100\r\ngat 0 a b\r\ngats 0 a\r\ngat -1 a\r\nget a\r\n"
            )
            .split("VALUE a 0 1 ")
            .next()
            .unwrap(),
            "STORED\r\nTOUCHED\r\nNOT_FOUND\r\nVALUE a 0 1\r\n1\r\nEND\r\n"
        );
        // gat counts as a touch, not as a get.
        assert_counted(
            &shard,
            &[("cmd_touch", 6), ("touch_hits", 4), ("touch_misses", 2), ("cmd_get", 1), ("get_misses", 1)],
        );
        assert_eq!(
            run(&mut shard, b"set d 0 0 1\r\n1\r\ndelete d 0\r\ndelete d\r\n"),
            "STORED\r\nDELETED\r\nNOT_FOUND\r\n"
        );
        assert_counted(&shard, &[("delete_hits", 1), ("delete_misses", 1)]);
    }

    #[test]
    fn bad_chunks_count_as_sets_and_too_large_values_do_not() {
        let mut shard = shard();
        let mut wire = b"set a 0 0 1\r\nxyz\r\nset q 0 0 2000000\r\n".to_vec();
        wire.extend_from_slice(&vec![b'x'; 2_000_002]);
        wire.extend_from_slice(b"get a\r\n");
        assert_eq!(
            run(&mut shard, &wire),
            "CLIENT_ERROR bad data chunk\r\nERROR\r\nSERVER_ERROR object too large for cache\r\nEND\r\n"
        );
        assert_eq!(counters(&shard), [("cmd_get", 1), ("cmd_set", 1), ("get_misses", 1)]);
    }

    #[test]
    fn cachedump_lists_the_shards_class_oldest_first() {
        let mut shard = shard();
        let started = crate::clock::Clock::global().to_unix(0);
        let expires = crate::clock::Clock::global().to_unix(shard.now() + 100);
        assert!(expires > started);
        run(&mut shard, b"set foo 0 0 3\r\nbar\r\nset ex 5 100 2\r\nhi\r\nset gone 0 -1 1\r\nx\r\n");
        run(&mut shard, b"ms YmluYXJ5 1 b\r\nv\r\n");
        // Shard 0's class is 1; others are empty, as memcached's empty classes are.
        assert_eq!(
            run(&mut shard, b"stats cachedump 1 0\r\n"),
            format!("ITEM foo [3 b; 0 s]\r\nITEM ex [2 b; {expires} s]\r\nEND\r\n")
        );
        assert_eq!(run(&mut shard, b"stats cachedump 1 1\r\n"), "ITEM foo [3 b; 0 s]\r\nEND\r\n");
        assert_eq!(run(&mut shard, b"stats cachedump 2 0\r\nstats cachedump 0 0\r\n"), "END\r\nEND\r\n");
    }

    #[test]
    fn cachedump_stops_at_two_megabytes() {
        let mut shard = shard();
        let key = "k".repeat(240);
        let mut wire = Vec::new();
        for i in 0..10_000 {
            wire.extend_from_slice(format!("set {key}{i} 0 0 1\r\nx\r\n").as_bytes());
        }
        run(&mut shard, &wire);
        let dump = run(&mut shard, b"stats cachedump 1 0\r\n");
        assert!(dump.ends_with("\r\nEND\r\n"));
        let line = format!("ITEM {key}0 [1 b; 0 s]\r\n").len();
        assert!(dump.len() < 2 << 20 && dump.len() + line + 1 > 2 << 20, "{} bytes", dump.len());
    }

    #[test]
    fn flush_all_and_expiry() {
        let mut shard = shard();
        assert_eq!(
            run(
                &mut shard,
                b"set a 0 0 1\r\n1\r\nset b 0 -1 1\r\n1\r\nget a b\r\nflush_all\r\nget a\r\nflush_all noreply\r\n"
            ),
            "STORED\r\nSTORED\r\nVALUE a 0 1\r\n1\r\nEND\r\nOK\r\nEND\r\n"
        );
    }
}
