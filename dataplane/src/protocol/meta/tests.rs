//! Tests of the meta codec. Expected bytes were recorded from memcached 1.6.18 (Debian) over a socket.
//!
//! - Parser: every error and flag, exact reply bytes; each case is also fed byte by byte (Incomplete
//!   until the last byte); property tests round-trip generated requests and throw noise at the parser.
//! - Executors: whole sessions against a real [`Shard`]; `#[ignore]`d until the store engine lands.

use std::borrow::Cow;

use proptest::prelude::*;

use super::*;
use crate::protocol::Invalid;

const LIMITS: Limits = Limits { item_size_max: 1024 };

/// Parses `input`, which holds exactly one request (or one refused command line), after checking
/// that every proper prefix of it is Incomplete.
fn parse_whole(input: &[u8]) -> Parse<Request<'_>> {
    for end in 0..input.len() {
        match parse(&input[..end], &LIMITS) {
            Parse::Incomplete => {}
            other => panic!(
                "prefix {:?} of {:?} gave {other:?}",
                &input[..end].escape_ascii().to_string(),
                input.escape_ascii().to_string()
            ),
        }
    }
    let whole = parse(input, &LIMITS);
    // Bytes after the request change nothing.
    let mut longer = input.to_vec();
    longer.extend_from_slice(b"mn\r\n");
    assert_eq!(format!("{:?}", parse(&longer, &LIMITS)), format!("{whole:?}"));
    whole
}

/// The request in `input`, which must be valid and use all of it.
fn request(input: &[u8]) -> Request<'_> {
    match parse_whole(input) {
        Parse::Request { request, consumed } => {
            assert_eq!(consumed, input.len(), "{request:?}");
            request
        }
        other => panic!("{:?} gave {other:?}", input.escape_ascii().to_string()),
    }
}

/// The refusal of `input`, which must be refused using all of it.
fn refusal(input: &[u8]) -> Invalid {
    match parse_whole(input) {
        Parse::Invalid(invalid) => {
            assert_eq!(invalid.consumed, input.len(), "{invalid:?}");
            invalid
        }
        other => panic!("{:?} gave {other:?}", input.escape_ascii().to_string()),
    }
}

fn reply(input: &[u8]) -> String {
    let invalid = refusal(input);
    assert_eq!((invalid.swallow, invalid.close), (0, false), "{invalid:?}");
    String::from_utf8(invalid.reply.into_owned()).unwrap()
}

/// The reply to an `ms` line refused after its datalen was read: the data block is swallowed.
fn reply_swallowing(input: &[u8], swallow: usize) -> String {
    let invalid = refusal(input);
    assert_eq!((invalid.swallow, invalid.close), (swallow, false), "{invalid:?}");
    String::from_utf8(invalid.reply.into_owned()).unwrap()
}

fn flags_of<'r>(request: &'r Request<'_>) -> &'r Flags<'r> {
    match request {
        Request::Get { flags, .. }
        | Request::Set { flags, .. }
        | Request::Delete { flags, .. }
        | Request::Arith { flags, .. } => flags,
        other => panic!("no flags in {other:?}"),
    }
}

#[test]
fn missing_keys_and_unknown_commands() {
    assert_eq!(reply(b"mg\r\n"), "ERROR\r\n");
    assert_eq!(reply(b"mg \r\n"), "ERROR\r\n");
    assert_eq!(reply(b"ms\r\n"), "ERROR\r\n");
    assert_eq!(reply(b"md\r\n"), "ERROR\r\n");
    assert_eq!(reply(b"ma\r\n"), "ERROR\r\n");
    // me wants its key differently.
    assert_eq!(reply(b"me\r\n"), "CLIENT_ERROR bad command line format\r\n");
    // ms without a datalen.
    assert_eq!(reply(b"ms foo\r\n"), "CLIENT_ERROR bad command line format\r\n");
    assert_eq!(reply(b"mz foo\r\n"), "ERROR\r\n");
    assert_eq!(reply(b"mgg foo\r\n"), "ERROR\r\n");
    assert_eq!(reply(b"\r\n"), "ERROR\r\n");
}

#[test]
fn mn_ignores_arguments_and_answers_mn() {
    for input in [&b"mn\r\n"[..], b"mn\n", b"mn foo\r\n", b"  mn\r\n"] {
        let request = request(input);
        assert_eq!(request, Request::NoOp);
        assert_eq!(route(&request), Route::Connection);
        let mut out = Vec::new();
        assert_eq!(answer(&request, &mut out), After::Continue);
        assert_eq!(out, b"MN\r\n");
    }
}

#[test]
fn mg_flags_parse() {
    let request = request(b"mg foo s v t c f l h O123 k q u P/path L/x T30 N60 R5\r\n");
    let Request::Get { key, flags } = &request else { panic!("{request:?}") };
    assert_eq!(key.bytes(), b"foo");
    assert!(!key.is_binary());
    assert_eq!(flags.tokens, b" s v t c f l h O123 k q u P/path L/x T30 N60 R5");
    assert!(flags.value && flags.quiet && flags.no_bump && !flags.invalidate);
    assert_eq!((flags.ttl, flags.vivify, flags.recache), (Some(30), Some(60), Some(5)));
    assert!(flags.ttl_before_change, "t precedes T");
    assert_eq!(route(&request), Route::Key(b"foo"));

    let plain = request_flags(b"mg foo\r\n");
    assert_eq!(plain, Flags { tokens: b"", delta: 1, ..Flags::default() });
    // Only the first byte names a flag: `vv` is `v` (memcached answers VA).
    assert!(request_flags(b"mg foo vv\r\n").value);
    assert!(!request_flags(b"mg foo T30 t\r\n").ttl_before_change);
    // Flags of other commands are accepted and validated, then ignored.
    let borrowed = request_flags(b"mg foo I F5 C7 D2 J3 ME\r\n");
    assert_eq!((borrowed.client_flags, borrowed.compare_cas, borrowed.delta, borrowed.initial), (5, Some(7), 2, 3));
}

fn request_flags(input: &[u8]) -> Flags<'_> {
    match request(input) {
        Request::Get { flags, .. }
        | Request::Set { flags, .. }
        | Request::Delete { flags, .. }
        | Request::Arith { flags, .. } => flags,
        other => panic!("no flags in {other:?}"),
    }
}

#[test]
fn flag_errors_in_memcached_order_and_words() {
    assert_eq!(reply(b"mg foo Y\r\n"), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply(b"mg foo 1\r\n"), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply(b"mg foo S\r\n"), "CLIENT_ERROR invalid flag\r\n");
    // Flags of later memcached versions.
    assert_eq!(reply(b"mg foo E5\r\n"), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply(b"mg foo v v\r\n"), "CLIENT_ERROR duplicate flag\r\n");
    // Bytes >= 127 are "duplicates" too.
    assert_eq!(reply(b"mg foo \xff\r\n"), "CLIENT_ERROR duplicate flag\r\n");
    for bad in
        [&b"mg foo T\r\n"[..], b"mg foo Tx\r\n", b"mg foo N\r\n", b"mg foo R\r\n", b"mg foo C-1\r\n", b"mg foo T1x\r\n"]
    {
        assert_eq!(reply(bad), "CLIENT_ERROR bad token in command line format\r\n");
    }
    // A bad F keeps the default message.
    assert_eq!(reply(b"mg foo Fx\r\n"), "CLIENT_ERROR bad command line format\r\n");
    assert_eq!(reply(b"mg foo F-1\r\n"), "CLIENT_ERROR bad command line format\r\n");
    assert_eq!(reply(b"mg foo MEE\r\n"), "CLIENT_ERROR incorrect length for M token\r\n");
    assert_eq!(reply(b"mg foo Jx\r\n"), "CLIENT_ERROR invalid numeric initial value\r\n");
    assert_eq!(reply(b"mg foo D18446744073709551616\r\n"), "CLIENT_ERROR invalid numeric delta value\r\n");
    // Token errors are remembered while the pass goes on: a later unknown flag wins at once, the
    // last message wins otherwise, and F does not overwrite.
    assert_eq!(reply(b"mg foo Tx Y\r\n"), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply(b"mg foo Tx Tx\r\n"), "CLIENT_ERROR duplicate flag\r\n");
    assert_eq!(reply(b"mg foo Jx Dx\r\n"), "CLIENT_ERROR invalid numeric delta value\r\n");
    assert_eq!(reply(b"mg foo Tx Fx\r\n"), "CLIENT_ERROR bad token in command line format\r\n");
    assert_eq!(reply(b"mg foo Fx Tx\r\n"), "CLIENT_ERROR bad token in command line format\r\n");
    // md and ma say the same thing about every pre-pass error.
    for bad in
        [&b"md foo Y\r\n"[..], b"md foo v v\r\n", b"md foo Tx\r\n", b"md Zm b\r\n", b"md foo x\r\n", b"md foo E9\r\n"]
    {
        assert_eq!(reply(bad), "CLIENT_ERROR invalid or duplicate flag\r\n");
    }
    for bad in [&b"ma foo Dx\r\n"[..], b"ma foo D-1\r\n", b"ma foo Jx\r\n", b"ma foo MII\r\n", b"ma Zm b\r\n"] {
        assert_eq!(reply(bad), "CLIENT_ERROR invalid or duplicate flag\r\n");
    }
    assert_eq!(reply(b"ma foo MX\r\n"), "CLIENT_ERROR invalid mode for ma M token\r\n");
}

#[test]
fn opaque_tokens_up_to_31_bytes() {
    let opaque = [b'x'; 31];
    let line = [&b"mg foo O"[..], &opaque, b"\r\n"].concat();
    assert_eq!(request_flags(&line).tokens, [&b" O"[..], &opaque].concat());
    let long = [&b"mg foo k O"[..], &opaque, b"x q\r\n"].concat();
    assert_eq!(reply(&long), "CLIENT_ERROR opaque token too long\r\n");
    assert_eq!(
        reply(&[&b"md foo O"[..], &[b'1'; 32]].concat().iter().chain(b"\r\n").copied().collect::<Vec<u8>>()),
        "CLIENT_ERROR opaque token too long\r\n"
    );
    // An empty opaque is fine (memcached answers `EN O`).
    assert_eq!(request_flags(b"mg foo O\r\n").tokens, b" O");
}

#[test]
fn keys_up_to_250_bytes() {
    let key = [b'a'; 250];
    let get = [&b"mg "[..], &key, b" k\r\n"].concat();
    assert_eq!(route(&request(&get)), Route::Key(&key));
    let long = [b'a'; 251];
    for command in [&b"mg "[..], b"md ", b"ma ", b"me "] {
        assert_eq!(reply(&[command, &long, b"\r\n"].concat()), "CLIENT_ERROR bad command line format\r\n");
    }
    // ms refuses before reading the datalen: the data block is not swallowed (memcached answers
    // ERROR to it next).
    assert_eq!(reply(&[&b"ms "[..], &long, b" 2\r\n"].concat()), "CLIENT_ERROR bad command line format\r\n");
}

#[test]
fn flag_count_limits() {
    let flags17 = b" k v c f s t h l O1 u P L T0 R1 N0 I q";
    let ok = [&b"mg c1"[..], flags17, b"\r\n"].concat();
    assert!(matches!(request(&ok), Request::Get { .. }));
    let too_many = [&b"mg c1"[..], flags17, b" J\r\n"].concat();
    assert_eq!(reply(&too_many), "CLIENT_ERROR options flags are too long\r\n");
    // Counting comes before the flags are checked.
    assert_eq!(
        reply(&[&b"mg c1"[..], &b" P".repeat(18), b"\r\n"].concat()),
        "CLIENT_ERROR options flags are too long\r\n"
    );
    assert_eq!(reply(&[&b"mg c1"[..], &b" P".repeat(17), b"\r\n"].concat()), "CLIENT_ERROR duplicate flag\r\n");
    assert_eq!(reply(&[&b"md c1"[..], &b" P".repeat(18), b"\r\n"].concat()), "CLIENT_ERROR options flags too long\r\n");
    assert_eq!(reply(&[&b"ma c1"[..], &b" P".repeat(18), b"\r\n"].concat()), "CLIENT_ERROR options flags too long\r\n");
    // ms has its datalen among the tokens: 16 flags, and the 17th is refused without swallowing.
    let flags16 = b" k c O1 P L T0 F1 I q v s t f h l u";
    assert!(matches!(request(&[&b"ms c1 2"[..], flags16, b"\r\nhi\r\n"].concat()), Request::Set { .. }));
    assert_eq!(reply(&[&b"ms c1 2"[..], flags16, b" N\r\n"].concat()), "CLIENT_ERROR options flags too long\r\n");
}

#[test]
fn ms_parses_value_modes_and_flags() {
    let request = request(b"ms foo 2 T90 F5 C12 I c k O1 q\r\nhi\r\n");
    let Request::Set { key, flags, mode, value } = &request else { panic!("{request:?}") };
    assert_eq!((key.bytes(), *mode, *value), (&b"foo"[..], StoreMode::Set, &b"hi"[..]));
    assert_eq!((flags.ttl, flags.client_flags, flags.compare_cas), (Some(90), 5, Some(12)));
    assert!(flags.invalidate && flags.quiet);
    assert_eq!(flags.tokens, b" T90 F5 C12 I c k O1 q");

    for (token, expected) in [
        ("S", StoreMode::Set),
        ("E", StoreMode::Add),
        ("A", StoreMode::Append),
        ("P", StoreMode::Prepend),
        ("R", StoreMode::Replace),
    ] {
        let input = format!("ms foo 1 M{token}\r\nx\r\n");
        let Request::Set { mode, .. } = self::request(input.as_bytes()) else { panic!() };
        assert_eq!(mode, expected);
    }
    // An empty value, a binary value with CR and LF inside, and C's leniency on the datalen.
    assert!(matches!(self::request(b"ms foo 0\r\n\r\n"), Request::Set { value: b"", .. }));
    assert!(matches!(self::request(b"ms foo 4\r\n\r\n\r\n\r\n"), Request::Set { value: b"\r\n\r\n", .. }));
    assert!(matches!(self::request(b"ms foo +2\r\nhi\r\n"), Request::Set { value: b"hi", .. }));
    assert!(matches!(self::request(b"ms foo 02\r\nhi\r\n"), Request::Set { value: b"hi", .. }));
    // A 64-bit strtol truncated to int32: 4294967298 is 2.
    assert!(matches!(self::request(b"ms foo 4294967298\r\nhi\r\n"), Request::Set { value: b"hi", .. }));
    // Up to the limit, inclusive.
    let value = vec![b'v'; 1024];
    let input = [&b"ms big 1024\r\n"[..], &value, b"\r\n"].concat();
    assert!(matches!(self::request(&input), Request::Set { value: v, .. } if v.len() == 1024));
}

#[test]
fn ms_refusals_and_what_they_swallow() {
    // Refused before the datalen is understood: nothing swallowed.
    for bad in
        [&b"ms foo bar\r\n"[..], b"ms foo -1\r\n", b"ms foo 2x\r\n", b"ms foo 2147483646\r\n", b"ms foo 2147483647\r\n"]
    {
        assert_eq!(reply(bad), "CLIENT_ERROR bad command line format\r\n");
    }
    assert_eq!(reply_swallowing(b"ms foo 2 Y\r\n", 4), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 E999 c\r\n", 4), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 S2\r\n", 4), "CLIENT_ERROR invalid flag\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 c c\r\n", 4), "CLIENT_ERROR duplicate flag\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 MX\r\n", 4), "CLIENT_ERROR invalid mode for ms M token\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 MEE\r\n", 4), "CLIENT_ERROR incorrect length for M token\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 Fx\r\n", 4), "CLIENT_ERROR bad command line format\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 F\r\n", 4), "CLIENT_ERROR bad command line format\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 Cx\r\n", 4), "CLIENT_ERROR bad token in command line format\r\n");
    assert_eq!(reply_swallowing(b"ms foo 2 T\r\n", 4), "CLIENT_ERROR bad token in command line format\r\n");
    assert_eq!(reply_swallowing(b"ms c1 2 b\r\n", 4), "CLIENT_ERROR error decoding key\r\n");
    let long_opaque = [&b"ms foo 2 O"[..], &[b'x'; 32], b"\r\n"].concat();
    assert_eq!(reply_swallowing(&long_opaque, 4), "CLIENT_ERROR opaque token too long\r\n");
    // The mode is checked before the opaque.
    let both = [&b"ms foo 2 MX O"[..], &[b'x'; 32], b"\r\n"].concat();
    assert_eq!(reply_swallowing(&both, 4), "CLIENT_ERROR invalid mode for ms M token\r\n");
    // Over -I: swallowed too, however large (2 GB is not buffered, it is dropped as it arrives).
    assert_eq!(reply_swallowing(b"ms foo 1025\r\n", 1027), "SERVER_ERROR object too large for cache\r\n");
    assert_eq!(
        reply_swallowing(b"ms foo 2147483645 T0\r\n", 2147483647),
        "SERVER_ERROR object too large for cache\r\n"
    );
}

#[test]
fn ms_bad_data_chunk_uses_exactly_datalen_plus_two() {
    // memcached reads "hix\r", refuses it, then reads the lone "\n" as an (empty, ERROR) command.
    let input = b"ms foo 2\r\nhix\r\n";
    match parse(input, &LIMITS) {
        Parse::Request { request, consumed } => {
            assert_eq!(consumed, 14);
            assert_eq!(request, Request::BadDataChunk { key: Key::plain(b"foo") });
            assert_eq!(route(&request), Route::Key(b"foo"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(request(b"ms foo 2\r\nhi\n\n"), Request::BadDataChunk { .. }));
}

#[test]
fn base64_keys() {
    let request = request(b"mg Zm9v b k v\r\n");
    let Request::Get { key, .. } = &request else { panic!() };
    assert_eq!((key.sent(), key.bytes(), key.is_binary()), (&b"Zm9v"[..], &b"foo"[..], true));
    assert_eq!(route(&request), Route::Key(b"foo"));
    // The decoder's leniency is memcached's.
    assert_eq!(route(&self::request(b"mg Zh== b\r\n")), Route::Key(b"f"));
    for bad in [
        &b"mg Zm9v= b\r\n"[..],
        b"mg Zm9 b\r\n",
        b"mg Z b\r\n",
        b"mg Zm9v==== b\r\n",
        b"mg Zm$v b\r\n",
        b"mg ==== b\r\n",
        b"mg Zg b\r\n",
    ] {
        assert_eq!(reply(bad), "CLIENT_ERROR error decoding key\r\n");
    }
    // 250 base64 bytes decode to at most 186.
    let key = [b'/'; 248];
    let input = [&b"md "[..], &key, b" b\r\n"].concat();
    assert!(
        matches!(route(&self::request(&input)), Route::Key(bytes) if bytes.len() == 186 && bytes.iter().all(|&b| b == 0xff))
    );
}

#[test]
fn me_takes_only_b() {
    let decoded = request(b"me Zm9v b\r\n");
    assert_eq!(route(&decoded), Route::Key(b"foo"));
    assert!(decoded.key().unwrap().is_binary());
    // Anything but a lone `b` is ignored, and the key is taken as sent.
    for input in [&b"me Zm9v x\r\n"[..], b"me Zm9v bb\r\n", b"me Zm9v q k\r\n"] {
        assert_eq!(route(&request(input)), Route::Key(b"Zm9v"));
    }
    assert!(matches!(request(b"me Zm9v b x\r\n"), Request::Debug { ref key } if key.bytes() == b"foo"));
    assert_eq!(reply(b"me Zm b\r\n"), "CLIENT_ERROR bad command line format\r\n");
}

#[test]
fn ma_modes_and_defaults() {
    let check = |input: &[u8], expected_incr: bool, delta: u64, initial: u64| {
        let Request::Arith { flags, incr, .. } = request(input) else { panic!() };
        assert_eq!(
            (incr, flags.delta, flags.initial),
            (expected_incr, delta, initial),
            "{:?}",
            input.escape_ascii().to_string()
        );
    };
    check(b"ma foo\r\n", true, 1, 0);
    check(b"ma foo MI D5\r\n", true, 5, 0);
    check(b"ma foo M+ D18446744073709551615\r\n", true, u64::MAX, 0);
    check(b"ma foo MD N0 J42\r\n", false, 1, 42);
    check(b"ma foo M- D0\r\n", false, 0, 0);
    let Request::Arith { flags, .. } = request(b"ma foo t N0 v\r\n") else { panic!() };
    assert!(flags.ttl_before_change && flags.value);
    assert_eq!(flags.vivify, Some(0));
}

#[test]
fn md_flags() {
    let Request::Delete { key, flags } = request(b"md foo I T30 C9 q k O5\r\n") else { panic!() };
    assert_eq!(key.bytes(), b"foo");
    assert!(flags.invalidate && flags.quiet);
    assert_eq!((flags.ttl, flags.compare_cas), (Some(30), Some(9)));
}

#[test]
fn lines_are_read_like_memcached_reads_them() {
    // Spaces around tokens, LF alone, and only one CR stripped.
    assert_eq!(route(&request(b" mg  c1 v \r\n")), Route::Key(b"c1"));
    assert!(flags_of(&request(b"mg c1 v\n")).value);
    assert_eq!(flags_of(&request(b"mg c1 v\r\r\n")).tokens, b" v\r");
    // A tab is part of the key, as are other control characters (memcached 1.6.18 checks only the length).
    assert_eq!(route(&request(b"mg c1\tv\r\n")), Route::Key(b"c1\tv"));
    assert_eq!(route(&request(b"mg \x10\x01\x7f\rk v\r\n")), Route::Key(b"\x10\x01\x7f\rk"));
    assert_eq!(&*refusal(&[&b"mg "[..], &[b'\x01'; 251], b" v\r\n"].concat()).reply, b"CLIENT_ERROR bad command line format\r\n");
    // A NUL ends the line for memcached's C tokenizer (`mg n1\0junk v` is `mg n1`).
    let request = request(b"mg n1\0junk v\r\n");
    assert_eq!(route(&request), Route::Key(b"n1"));
    assert!(!flags_of(&request).value);
}

#[test]
fn long_lines_without_newline_close_the_connection() {
    let line = [&b"mg c1 O"[..], &[b'x'; 2041]].concat();
    assert_eq!(line.len(), 2048);
    assert!(matches!(parse(&line, &LIMITS), Parse::Incomplete));
    let longer = [&line[..], b"x"].concat();
    match parse(&longer, &LIMITS) {
        Parse::Invalid(invalid) => {
            assert_eq!(invalid, Invalid { reply: Cow::Borrowed(b""), consumed: 0, swallow: 0, close: true })
        }
        other => panic!("{other:?}"),
    }
    // With its newline in the buffer, a long line is read (memcached then refuses the opaque).
    let complete = [&longer[..], b"\r\n"].concat();
    assert!(matches!(parse(&complete, &LIMITS), Parse::Invalid(Invalid { close: false, .. })));
}

#[test]
fn pipelined_requests_parse_one_at_a_time() {
    let input = b"mg a v\r\nms b 2 T0\r\nhi\r\nmd c q\r\nma d\r\nme e\r\nmn\r\n";
    let mut rest = &input[..];
    let mut keys = Vec::new();
    while !rest.is_empty() {
        let Parse::Request { request, consumed } = parse(rest, &LIMITS) else { panic!() };
        keys.push(request.key().map(|key| key.bytes().to_vec()));
        rest = &rest[consumed..];
    }
    assert_eq!(
        keys,
        [Some(b"a".to_vec()), Some(b"b".to_vec()), Some(b"c".to_vec()), Some(b"d".to_vec()), Some(b"e".to_vec()), None]
    );
}

/// A generated request: what a client meant, written out by [`Spec::encode`].
#[derive(Debug, Clone)]
struct Spec {
    command: u8,
    key: Vec<u8>,
    binary: bool,
    flags: Vec<SpecFlag>,
    value: Vec<u8>,
}

#[derive(Debug, Clone)]
enum SpecFlag {
    Bare(u8),
    Ttl(u8, i32),
    ClientFlags(u32),
    Cas(u64),
    Delta(u64),
    Initial(u64),
    Opaque(Vec<u8>),
    Mode(u8),
}

impl Spec {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![b'm', self.command, b' '];
        if self.binary {
            base64::encode_into(&self.key, &mut out);
        } else {
            out.extend_from_slice(&self.key);
        }
        if self.command == b's' {
            out.extend_from_slice(format!(" {}", self.value.len()).as_bytes());
        }
        if self.binary {
            out.extend_from_slice(b" b");
        }
        for flag in &self.flags {
            out.push(b' ');
            match flag {
                SpecFlag::Bare(letter) => out.push(*letter),
                SpecFlag::Ttl(letter, exptime) => {
                    out.extend_from_slice(format!("{}{exptime}", *letter as char).as_bytes())
                }
                SpecFlag::ClientFlags(value) => out.extend_from_slice(format!("F{value}").as_bytes()),
                SpecFlag::Cas(value) => out.extend_from_slice(format!("C{value}").as_bytes()),
                SpecFlag::Delta(value) => out.extend_from_slice(format!("D{value}").as_bytes()),
                SpecFlag::Initial(value) => out.extend_from_slice(format!("J{value}").as_bytes()),
                SpecFlag::Opaque(opaque) => {
                    out.push(b'O');
                    out.extend_from_slice(opaque);
                }
                SpecFlag::Mode(mode) => out.extend_from_slice(&[b'M', *mode]),
            }
        }
        out.extend_from_slice(b"\r\n");
        if self.command == b's' {
            out.extend_from_slice(&self.value);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn mode(&self) -> Option<u8> {
        self.flags.iter().find_map(|flag| match flag {
            SpecFlag::Mode(mode) => Some(*mode),
            _ => None,
        })
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    let command = prop::sample::select(vec![b'g', b's', b'd', b'a']);
    let plain_key =
        prop::collection::vec(prop::sample::select((1u8..=9).chain(11..=31).chain(0x21..=0xff).collect::<Vec<u8>>()), 1..=250);
    let binary_key = prop::collection::vec(any::<u8>(), 1..=186);
    let key = prop_oneof![plain_key.prop_map(|key| (key, false)), binary_key.prop_map(|key| (key, true))];
    (command, key, prop::collection::vec(any::<u8>(), 0..64))
        .prop_flat_map(|(command, (key, binary), value)| {
            let mut choices: Vec<BoxedStrategy<SpecFlag>> =
                [b'c', b'f', b'h', b'k', b'l', b'q', b's', b't', b'u', b'v', b'I', b'P', b'L']
                    .into_iter()
                    .map(|letter| Just(SpecFlag::Bare(letter)).boxed())
                    .collect();
            for letter in [b'T', b'N', b'R'] {
                choices.push(any::<i32>().prop_map(move |exptime| SpecFlag::Ttl(letter, exptime)).boxed());
            }
            choices.push(any::<u32>().prop_map(SpecFlag::ClientFlags).boxed());
            choices.push(any::<u64>().prop_map(SpecFlag::Cas).boxed());
            choices.push(any::<u64>().prop_map(SpecFlag::Delta).boxed());
            choices.push(any::<u64>().prop_map(SpecFlag::Initial).boxed());
            choices.push(
                prop::collection::vec(prop::sample::select(b"0123456789abcdefXYZ:/-_".to_vec()), 0..=31)
                    .prop_map(SpecFlag::Opaque)
                    .boxed(),
            );
            let modes: &[u8] = match command {
                b's' => b"SEAPR",
                b'a' => b"I+D-",
                _ => b"SEAPRID+-",
            };
            choices.push(prop::sample::select(modes.to_vec()).prop_map(SpecFlag::Mode).boxed());
            // Distinct flags (at most 16 beside `b`, which fits every command's token limit), in any order.
            let flags = prop::sample::subsequence(choices, 0..=15).prop_flat_map(|chosen| chosen.prop_shuffle());
            (Just(command), Just(key), Just(binary), flags, Just(value))
        })
        .prop_map(|(command, key, binary, flags, value)| Spec { command, key, binary, flags, value })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_requests_round_trip(spec in spec()) {
        let bytes = spec.encode();
        let parsed = request(&bytes);
        let key = parsed.key().unwrap();
        prop_assert_eq!(key.bytes(), &spec.key[..]);
        prop_assert_eq!(key.is_binary(), spec.binary);
        let flags = flags_of(&parsed);
        let has = |letter: u8| spec.flags.iter().any(|flag| matches!(flag, SpecFlag::Bare(l) if *l == letter));
        prop_assert_eq!(flags.value, has(b'v'));
        prop_assert_eq!(flags.quiet, has(b'q'));
        prop_assert_eq!(flags.no_bump, has(b'u'));
        prop_assert_eq!(flags.invalidate, has(b'I'));
        let mut ttl_at = None;
        let mut change_at = None;
        for (position, flag) in spec.flags.iter().enumerate() {
            match flag {
                SpecFlag::Ttl(letter, exptime) => {
                    let field = match letter { b'T' => flags.ttl, b'N' => flags.vivify, _ => flags.recache };
                    prop_assert_eq!(field, Some(*exptime));
                    if *letter != b'R' { change_at.get_or_insert(position); }
                }
                SpecFlag::Bare(b't') => ttl_at = Some(position),
                SpecFlag::ClientFlags(value) => prop_assert_eq!(flags.client_flags, *value),
                SpecFlag::Cas(value) => prop_assert_eq!(flags.compare_cas, Some(*value)),
                SpecFlag::Delta(value) => prop_assert_eq!(flags.delta, *value),
                SpecFlag::Initial(value) => prop_assert_eq!(flags.initial, *value),
                _ => {}
            }
        }
        prop_assert_eq!(flags.ttl_before_change, matches!((ttl_at, change_at), (Some(t), Some(c)) if t < c));
        match &parsed {
            Request::Set { value, mode, .. } => {
                prop_assert_eq!(*value, &spec.value[..]);
                let expected = match spec.mode() {
                    Some(b'E') => StoreMode::Add,
                    Some(b'A') => StoreMode::Append,
                    Some(b'P') => StoreMode::Prepend,
                    Some(b'R') => StoreMode::Replace,
                    _ => StoreMode::Set,
                };
                prop_assert_eq!(*mode, expected);
            }
            Request::Arith { incr, .. } => prop_assert_eq!(*incr, !matches!(spec.mode(), Some(b'D' | b'-'))),
            Request::Get { .. } => prop_assert_eq!(spec.command, b'g'),
            Request::Delete { .. } => prop_assert_eq!(spec.command, b'd'),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn noise_never_panics_and_never_overreads(input in prop::collection::vec(prop::sample::select(b"mgsdaenb OTNRvqkcFCMDJIP0123456789\r\n\0\xff=+/-".to_vec()), 0..400)) {
        let mut rest = &input[..];
        loop {
            match parse(rest, &LIMITS) {
                Parse::Request { request, consumed } => {
                    prop_assert!(consumed > 0 && consumed <= rest.len());
                    let _ = route(&request);
                    rest = &rest[consumed..];
                }
                Parse::Incomplete => break,
                Parse::Invalid(invalid) => {
                    prop_assert!(invalid.consumed <= rest.len());
                    if invalid.close || invalid.consumed == 0 { break; }
                    rest = &rest[(invalid.consumed + invalid.swallow).min(rest.len())..];
                }
            }
        }
    }
}

/// Executor tests: whole sessions on a real shard, bytes in, bytes out, as memcached 1.6.18 answered.
mod sessions {
    use std::sync::Arc;

    use super::*;
    use crate::config::Settings;
    use crate::store::{Store, StoreConfig};

    fn shard_with(settings: Settings) -> Shard {
        let store = Store::new(StoreConfig {
            memory_bytes: 16 << 20,
            item_size_max: 1 << 20,
            evict: true,
            shard_index: 0,
            shard_count: 1,
            try_hugepages: false,
            memory_file: None,
            clock_origin: 0,
        })
        .expect("store");
        Shard::new(0, store, Arc::new(settings))
    }

    /// Feeds `input` the way a connection would and returns everything written back.
    fn session(shard: &mut Shard, input: &[u8]) -> String {
        let limits = Limits { item_size_max: 1 << 20 };
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            match parse(rest, &limits) {
                Parse::Request { request, consumed } => {
                    match route(&request) {
                        Route::Key(_) => execute(shard, &request, &mut out),
                        _ => {
                            answer(&request, &mut out);
                        }
                    }
                    rest = &rest[consumed..];
                }
                Parse::Invalid(invalid) => {
                    out.extend_from_slice(&invalid.reply);
                    rest = &rest[(invalid.consumed + invalid.swallow).min(rest.len())..];
                }
                Parse::Incomplete => panic!("incomplete input {:?}", rest.escape_ascii().to_string()),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The CAS of `key`, read with `mg <key> c`.
    fn cas_of(shard: &mut Shard, key: &str) -> u64 {
        let reply = session(shard, format!("mg {key} c\r\n").as_bytes());
        reply.trim_end().split(' ').find_map(|token| token.strip_prefix('c')).unwrap().parse().unwrap()
    }

    fn counter(shard: &Shard, name: &str) -> u64 {
        let mut found = None;
        shard.counters.for_each(|counter, value| {
            if counter == name {
                found = Some(value)
            }
        });
        found.unwrap()
    }

    #[test]
    fn vivify_wins_once() {
        let mut shard = shard_with(Settings::default());
        let first = session(&mut shard, b"mg foo N30 v c t s\r\n");
        let cas = cas_of(&mut shard, "foo");
        assert_eq!(first, format!("VA 0 c{cas} t30 s0 W\r\n\r\n"));
        assert_eq!(session(&mut shard, b"mg foo N30 v c t s\r\n"), format!("VA 0 c{cas} t30 s0 Z\r\n\r\n"));
        // Z sticks for plain reads too, and q does not hide a vivified hit.
        assert_eq!(session(&mut shard, b"mg foo c\r\n"), format!("HD c{cas} Z\r\n"));
        assert_eq!(session(&mut shard, b"mg bar N30 q v\r\nmg bar N30 q v\r\n"), "VA 0 W\r\n\r\nVA 0 Z\r\n\r\n");
        // A `t` before the N sees the item as born: without TTL.
        assert_eq!(session(&mut shard, b"mg baz t N30\r\nmg baz t\r\n"), "HD t-1 W\r\nHD t30 Z\r\n");
        // A stored value ends the game.
        assert_eq!(session(&mut shard, b"ms foo 2 T0\r\nhi\r\nmg foo N30 v t\r\n"), "HD\r\nVA 2 t-1\r\nhi\r\n");
    }

    #[test]
    fn invalidation_marks_stale_and_hands_out_one_win() {
        let mut shard = shard_with(Settings::default());
        session(&mut shard, b"ms d2 2 T100\r\nhi\r\n");
        let before = cas_of(&mut shard, "d2");
        assert_eq!(session(&mut shard, b"md d2 I T30 q\r\n"), "");
        let after = cas_of(&mut shard, "d2");
        assert!(after > before);
        assert_eq!(session(&mut shard, b"mg d2 t v\r\n"), "VA 2 t30 Z X\r\nhi\r\n");
        // (The cas_of read above took the win: the next reader sees Z X.)
        assert_eq!(session(&mut shard, b"ms d2 3\r\nnew\r\nmg d2 v\r\n"), "HD\r\nVA 3\r\nnew\r\n");

        // ms I with a lower CAS stores, stale.
        session(&mut shard, b"ms d4 2\r\nhi\r\n");
        assert_eq!(session(&mut shard, b"ms d4 3 I C1 q\r\nold\r\n"), "");
        assert_eq!(session(&mut shard, b"mg d4 v\r\nmg d4 v\r\n"), "VA 3 X W\r\nold\r\nVA 3 Z X\r\nold\r\n");
        // A higher CAS is refused, and `c` then shows 0.
        assert_eq!(session(&mut shard, b"ms d4 3 I C999999999 c\r\nxxx\r\n"), "EX c0\r\n");
    }

    #[test]
    fn recache_wins_below_the_threshold() {
        let mut shard = shard_with(Settings::default());
        session(&mut shard, b"ms d5 2 T100\r\nhi\r\nms d6 2\r\nhi\r\n");
        assert_eq!(session(&mut shard, b"mg d5 R30 t\r\n"), "HD t100\r\n");
        assert_eq!(session(&mut shard, b"mg d5 R200 t\r\n"), "HD t100 W\r\n");
        assert_eq!(session(&mut shard, b"mg d5 R200 t\r\n"), "HD t100 Z\r\n");
        // No TTL, no win.
        assert_eq!(session(&mut shard, b"mg d6 R200 t\r\n"), "HD t-1\r\n");
    }

    #[test]
    fn mg_returns_flags_in_request_order() {
        let mut shard = shard_with(Settings::default());
        session(&mut shard, b"ms foo 2 F5 T0\r\nhi\r\n");
        let cas = cas_of(&mut shard, "foo");
        assert_eq!(
            session(&mut shard, b"mg foo O1 s v t k c f q\r\n"),
            format!("VA 2 O1 s2 t-1 kfoo c{cas} f5\r\nhi\r\n")
        );
        // h and l report the state from before this read.
        assert_eq!(session(&mut shard, b"ms new 1\r\nx\r\nmg new h l\r\nmg new h\r\n"), "HD\r\nHD h0 l0\r\nHD h1\r\n");
        // A miss returns only O and k, or nothing with q.
        assert_eq!(session(&mut shard, b"mg nope v s t O9 k c\r\nmg nope q k\r\nmn\r\n"), "EN O9 knope\r\nMN\r\n");
        // A t before the T shows the TTL from before the touch.
        assert_eq!(
            session(&mut shard, b"ms c2 2 T100\r\nhi\r\nmg c2 t T30\r\nmg c2 t\r\n"),
            "HD\r\nHD t100\r\nHD t30\r\n"
        );
        assert_eq!(session(&mut shard, b"mg c2 T0 t\r\n"), "HD t-1\r\n");
    }

    #[test]
    fn base64_keys_come_back_encoded() {
        let mut shard = shard_with(Settings::default());
        let reply = session(&mut shard, b"ms AAFiaW4ga2V5/w== 2 b k\r\nhi\r\nmg AAFiaW4ga2V5/w== k b v\r\n");
        assert_eq!(reply, "HD kAAFiaW4ga2V5/w== b\r\nVA 2 kAAFiaW4ga2V5/w== b\r\nhi\r\n");
        assert_eq!(session(&mut shard, b"mg Zh== b k\r\n"), "EN kZg== b\r\n");
        // memcached 1.6.18: a hit shows the key as it was stored, other replies as this request sent it.
        assert_eq!(session(&mut shard, b"ms Zm9v 1 b\r\nx\r\nmg foo k v\r\n"), "HD\r\nVA 1 kZm9v b\r\nx\r\n");
        assert_eq!(
            session(&mut shard, b"ms bar 1\r\n7\r\nmg YmFy b k\r\nma YmFy b k\r\n"),
            "HD\r\nHD kbar\r\nHD kYmFy b\r\n"
        );
        assert_eq!(
            session(&mut shard, b"md AAFiaW4ga2V5/w== b k q\r\nmd AAFiaW4ga2V5/w== b k q\r\n"),
            "NF kAAFiaW4ga2V5/w== b\r\n"
        );
    }

    #[test]
    fn ms_modes_cas_and_quiet() {
        let mut shard = shard_with(Settings::default());
        assert_eq!(session(&mut shard, b"ms q1 2 q\r\nhi\r\n"), "");
        assert_eq!(session(&mut shard, b"ms q1 2 q MR C999\r\nhi\r\n"), "EX\r\n");
        assert_eq!(session(&mut shard, b"ms q2 2 q ME\r\nhi\r\nms q2 2 q ME\r\nhi\r\n"), "NS\r\n");
        assert_eq!(session(&mut shard, b"ms none 2 MA\r\nhi\r\nms none 2 MA C1\r\nhi\r\n"), "NS\r\nNS\r\n");
        assert_eq!(
            session(&mut shard, b"ms none 2 MR\r\nhi\r\nms none 2 MR C1\r\nhi\r\nms none 2 C1\r\nhi\r\n"),
            "NS\r\nNF\r\nNF\r\n"
        );
        assert_eq!(session(&mut shard, b"ms none 2 ME C1\r\nhi\r\n"), "HD\r\n");
        let cas = cas_of(&mut shard, "q1");
        let reply = session(&mut shard, format!("ms q1 3 C{cas} c k O7\r\nnew\r\n").as_bytes());
        let new_cas = cas_of(&mut shard, "q1");
        assert_eq!(reply, format!("HD c{new_cas} kq1 O7\r\n"));
        assert_eq!(
            session(&mut shard, b"ms q1 1 MA\r\n!\r\nms q1 1 MP\r\n<\r\nmg q1 v\r\n"),
            "HD\r\nHD\r\nVA 5\r\n<new!\r\n"
        );
        assert_eq!(session(&mut shard, b"ms q1 2\r\nhix\r\n"), "CLIENT_ERROR bad data chunk\r\nERROR\r\n");
    }

    #[test]
    fn md_and_ma_replies() {
        let mut shard = shard_with(Settings::default());
        assert_eq!(session(&mut shard, b"ms q2 2\r\nhi\r\nmd q2 q\r\nmd q2 q\r\n"), "HD\r\nNF\r\n");
        assert_eq!(session(&mut shard, b"ms x 2\r\nhi\r\nmd x C1 k O2\r\n"), "HD\r\nEX kx O2\r\n");
        // ma: NF is not hidden by q, a vivified HD is not either, an incremented one is.
        assert_eq!(
            session(&mut shard, b"ma q3 q\r\nma q3 q N0\r\nma q3 q v\r\nma q3 v\r\n"),
            "NF\r\nHD\r\nVA 1\r\n2\r\n"
        );
        assert_eq!(
            session(&mut shard, b"ma m2 N100 J42 v t k O9\r\nma m2 T0 t v\r\n"),
            "VA 2 t100 km2 O9\r\n42\r\nVA 2 t-1\r\n43\r\n"
        );
        assert_eq!(session(&mut shard, b"ma m2 T50 t\r\nma m2 t T10\r\n"), "HD t50\r\nHD t50\r\n");
        assert_eq!(
            session(&mut shard, b"ms m1 2\r\n10\r\nma m1 MD v\r\nma m1 M- D100 v\r\n"),
            "HD\r\nVA 1\r\n9\r\nVA 1\r\n0\r\n"
        );
        assert_eq!(
            session(&mut shard, b"ma m1 D18446744073709551615 v\r\nma m1 D2 v\r\n"),
            "VA 20\r\n18446744073709551615\r\nVA 1\r\n1\r\n"
        );
        assert_eq!(session(&mut shard, b"ma m4 q k O1\r\n"), "NF km4 O1\r\n");
        assert_eq!(
            session(&mut shard, b"ms m5 1\r\nx\r\nma m5\r\n"),
            "HD\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        );
        assert_eq!(session(&mut shard, b"ma m2 C1\r\n"), "EX\r\n");
        // C0 means "no CAS" to incr/decr (42, then four increments: memcached 1.6.18 answers 46).
        assert_eq!(session(&mut shard, b"ma m2 C0 v\r\n"), "VA 2\r\n46\r\n");
    }

    #[test]
    fn me_dumps_metadata() {
        let mut shard = shard_with(Settings::default());
        session(&mut shard, b"ms e1 5 T100 F3\r\nhello\r\n");
        let cas = cas_of(&mut shard, "e1");
        let reply = session(&mut shard, b"me e1\r\n");
        let prefix = format!("ME e1 exp=-100 la=0 cas={cas} fetch=yes cls=1 size=");
        assert!(reply.starts_with(&prefix) && reply.ends_with("\r\n"), "{reply}");
        assert_eq!(session(&mut shard, b"me nokey\r\n"), "EN\r\n");
        session(&mut shard, b"ms Zm9v 1 b\r\nx\r\n");
        assert!(session(&mut shard, b"me Zm9v b\r\n").starts_with("ME Zm9v exp=-1 la=0 cas="));
        assert!(session(&mut shard, b"me foo\r\n").contains("fetch=no"));
    }

    #[test]
    fn counters_match_memcached() {
        let mut shard = shard_with(Settings::default());
        let delta = |shard: &mut Shard, input: &str, name: &str| {
            let before = counter(shard, name);
            session(shard, input.as_bytes());
            counter(shard, name) - before
        };
        assert_eq!(delta(&mut shard, "mg a1 v\r\n", "get_misses"), 1);
        assert_eq!(delta(&mut shard, "mg a1 T30 v\r\n", "get_misses"), 1);
        assert_eq!(delta(&mut shard, "mg a1 T30 v\r\n", "touch_misses"), 0);
        session(&mut shard, b"ms a2 2\r\nhi\r\n");
        assert_eq!(delta(&mut shard, "mg a2\r\n", "get_hits"), 1);
        assert_eq!(delta(&mut shard, "mg a2 T30\r\n", "touch_hits"), 1);
        assert_eq!(delta(&mut shard, "mg a2 T30\r\n", "cmd_get"), 0);
        assert_eq!(delta(&mut shard, "mg a3 N30\r\n", "get_hits"), 1);
        assert_eq!(delta(&mut shard, "ms a4 2\r\nhix\r\n", "cmd_set"), 1);
        assert_eq!(delta(&mut shard, "ms a4 2 Y\r\nhi\r\n", "cmd_set"), 0);
        assert_eq!(delta(&mut shard, "ms a5 2 C5\r\nhi\r\n", "cas_misses"), 1);
        assert_eq!(delta(&mut shard, "ms a2 2 C5\r\nhi\r\n", "cas_badval"), 1);
        assert_eq!(delta(&mut shard, "ms a2 2 MA C5\r\nhi\r\n", "cas_badval"), 0);
        assert_eq!(delta(&mut shard, "md a2 I\r\n", "delete_hits"), 0);
        assert_eq!(delta(&mut shard, "md a2 C1\r\n", "delete_misses"), 1);
        assert_eq!(delta(&mut shard, "md a2\r\n", "delete_hits"), 1);
        assert_eq!(delta(&mut shard, "ma a6 MD\r\n", "decr_misses"), 1);
        assert_eq!(delta(&mut shard, "ma a6 N0\r\n", "incr_hits"), 0);
        assert_eq!(delta(&mut shard, "ma a6\r\n", "incr_hits"), 1);
        assert_eq!(delta(&mut shard, "me a6\r\n", "cmd_get"), 0);
    }

    #[test]
    fn cas_disabled_shows_zero() {
        let mut shard = shard_with(Settings { cas_enabled: false, ..Settings::default() });
        assert_eq!(session(&mut shard, b"ms z 2 c\r\nhi\r\nmg z c v\r\n"), "HD c0\r\nVA 2 c0\r\nhi\r\n");
        assert_eq!(session(&mut shard, b"ma zz N0 c v\r\nmg zzz N0 c\r\n"), "VA 1 c0\r\n0\r\nHD c0 W\r\n");
        assert!(session(&mut shard, b"me z\r\n").contains(" cas=0 "));
    }
}
