//! memcached's binary protocol, as memcached 1.6.18 speaks it (memcached deprecates it, clients
//! still use it).
//!
//! - [`wire`]: the packet layout: header, opcodes, status codes and their texts.
//! - [`request`]: [`parse`] one request packet into a [`Request`] borrowing from the input, or say
//!   what memcached does about bad input (reply, swallow, close).
//! - [`response`]: composing response packets into a caller's buffer.
//! - `execute`: running a key request against its shard's store, with memcached's counters.
//!
//! [`BinaryCodec`] ties them to the [`Codec`] trait. Every opcode that names a key runs on that key's
//! shard; NOOP, VERSION, QUIT and QUITQ are answered by the connection; STAT and FLUSH go to the
//! server. memcached 1.6.18 does not implement VERBOSITY (0x1b) or, without SASL, the SASL opcodes:
//! both are answered "Unknown command" by the parser, as it does.

mod execute;
pub mod request;
pub mod response;
pub mod wire;

pub use request::{parse, Extras, Request};
pub use wire::{Opcode, Status};

use response::{write_ok, write_stat, write_status, write_text};
use wire::Family;

use crate::protocol::{Admin, AdminReply, After, Codec, Limits, Parse, Route};
use crate::shard::Shard;

/// The binary protocol's [`Codec`].
pub struct BinaryCodec;

impl Codec for BinaryCodec {
    type Request<'a> = Request<'a>;

    fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
        request::parse(buf, limits)
    }

    fn peek_key(buf: &[u8]) -> Option<(&[u8], usize)> {
        request::peek_key(buf)
    }

    fn route<'r>(request: &'r Request<'_>) -> Route<'r> {
        match request.opcode.family() {
            Family::Noop | Family::Version | Family::Quit => Route::Connection,
            Family::Flush => {
                let delay = match request.extras {
                    Extras::Exptime(exptime) => i64::from(exptime),
                    _ => 0,
                };
                Route::Admin(Admin::Flush { delay })
            }
            Family::Stat if request.key.is_empty() => Route::Admin(Admin::Stats(None)),
            // A group that is not UTF-8 names no group: the connection answers "Not found".
            Family::Stat => match std::str::from_utf8(request.key) {
                Ok(group) => Route::Admin(Admin::Stats(Some(group))),
                Err(_) => Route::Connection,
            },
            Family::Get { .. }
            | Family::Touch
            | Family::Gat { .. }
            | Family::Store(_)
            | Family::Concat { .. }
            | Family::Delete
            | Family::Arith { .. } => Route::Key(request.key),
        }
    }

    fn execute(shard: &mut Shard, request: &Request<'_>, out: &mut Vec<u8>) {
        execute::execute(shard, request, out)
    }

    // Binary requests name one key each, so `Route::Keys` never occurs. Should a caller still treat
    // one as a retrieval of one key, the four methods below run it as exactly that: its key, its own
    // packet as the frame, its own response, no terminator.

    fn key_at<'r>(request: &'r Request<'_>, _index: usize) -> &'r [u8] {
        request.key
    }

    fn execute_key(shard: &mut Shard, request: &Request<'_>, _index: usize, out: &mut Vec<u8>) {
        execute::execute(shard, request, out)
    }

    fn mutates(request: &Request<'_>) -> bool {
        matches!(
            request.opcode.family(),
            Family::Touch
                | Family::Gat { .. }
                | Family::Store(_)
                | Family::Concat { .. }
                | Family::Delete
                | Family::Arith { .. }
                | Family::Flush
        )
    }

    fn refuse_read_only(request: &Request<'_>, out: &mut Vec<u8>) {
        write_text(out, request.echo(), Status::NotSupported, b"read-only standby");
    }

    fn key_frame(request: &Request<'_>, _index: usize, out: &mut Vec<u8>) {
        request.encode(out)
    }

    fn finish_keys(_request: &Request<'_>, _out: &mut Vec<u8>) {}

    fn answer(request: &Request<'_>, out: &mut Vec<u8>) -> After {
        let echo = request.echo();
        match request.opcode.family() {
            Family::Noop => write_ok(out, echo, 0),
            Family::Version => write_text(out, echo, Status::Ok, crate::VERSION.as_bytes()),
            Family::Quit => {
                if !request.opcode.is_quiet() {
                    write_ok(out, echo, 0);
                }
                return After::Close;
            }
            // A STAT group that is not UTF-8 (see `route`).
            Family::Stat => write_status(out, echo, Status::KeyNotFound),
            // Not routed here; answer rather than panic.
            _ => write_status(out, echo, Status::UnknownCommand),
        }
        After::Continue
    }

    fn answer_admin(request: &Request<'_>, reply: AdminReply<'_>, out: &mut Vec<u8>) {
        let echo = request.echo();
        match reply {
            // One packet per statistic, then the empty one that ends the answer.
            AdminReply::Stats(pairs) => {
                for (name, value) in pairs {
                    write_stat(out, echo.opaque, name.as_bytes(), value.as_bytes());
                }
                write_stat(out, echo.opaque, b"", b"");
            }
            // `stats reset` (and `detail on|off`): the end packet alone.
            AdminReply::Reset => write_stat(out, echo.opaque, b"", b""),
            AdminReply::Flushed | AdminReply::VerbosityOk | AdminReply::MemoryLimitSet => {
                if !request.opcode.is_quiet() {
                    write_ok(out, echo, 0);
                }
            }
            // memcached's answer to FLUSH and FLUSHQ under -F.
            AdminReply::FlushDisabled => write_status(out, echo, Status::AuthError),
            // An unknown stats group.
            AdminReply::BadArgument => write_status(out, echo, Status::KeyNotFound),
            // Binary has no shutdown command, nor cache_memlimit.
            AdminReply::ShutdownAccepted | AdminReply::ShutdownDisabled | AdminReply::MemoryLimitRefused => {
                write_status(out, echo, Status::UnknownCommand)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use response::{decode_all, decode_response};
    use std::borrow::Cow;

    const LIMITS: Limits = Limits {
        item_size_max: 1 << 20,
    };

    fn request(opcode: Opcode, extras: Extras, key: &[u8]) -> Request<'_> {
        Request {
            opcode,
            opaque: 0xabcd,
            cas: 0,
            extras,
            key,
            value: b"",
        }
    }

    #[test]
    fn routes() {
        let key = request(Opcode::GetKQ, Extras::None, b"k");
        assert_eq!(BinaryCodec::route(&key), Route::Key(b"k"));
        let set = request(
            Opcode::SetQ,
            Extras::Store {
                flags: 0,
                exptime: 0,
            },
            b"s",
        );
        assert_eq!(BinaryCodec::route(&set), Route::Key(b"s"));
        for opcode in [Opcode::Noop, Opcode::Version, Opcode::Quit, Opcode::QuitQ] {
            assert_eq!(
                BinaryCodec::route(&request(opcode, Extras::None, b"")),
                Route::Connection
            );
        }
        let stat = request(Opcode::Stat, Extras::None, b"");
        assert_eq!(BinaryCodec::route(&stat), Route::Admin(Admin::Stats(None)));
        let items = request(Opcode::Stat, Extras::None, b"items");
        assert_eq!(
            BinaryCodec::route(&items),
            Route::Admin(Admin::Stats(Some("items")))
        );
        let bad = request(Opcode::Stat, Extras::None, b"\xff\xfe");
        assert_eq!(BinaryCodec::route(&bad), Route::Connection);
        let flush = request(Opcode::Flush, Extras::None, b"");
        assert_eq!(
            BinaryCodec::route(&flush),
            Route::Admin(Admin::Flush { delay: 0 })
        );
        let delayed = request(Opcode::FlushQ, Extras::Exptime(30), b"");
        assert_eq!(
            BinaryCodec::route(&delayed),
            Route::Admin(Admin::Flush { delay: 30 })
        );
        let every_key_opcode_routes_to_its_key = Opcode::ALL.iter().all(|&opcode| {
            let is_key = !matches!(
                opcode.family(),
                Family::Noop | Family::Version | Family::Quit | Family::Flush | Family::Stat
            );
            !is_key || BinaryCodec::route(&request(opcode, Extras::None, b"x")) == Route::Key(b"x")
        });
        assert!(every_key_opcode_routes_to_its_key);
    }

    /// A response with status 0, no body, CAS 0 and the tests' opaque, byte for byte.
    fn empty_ok(opcode: u8) -> [u8; 24] {
        let mut packet = [0; 24];
        packet[0] = 0x81;
        packet[1] = opcode;
        packet[14..16].copy_from_slice(&[0xab, 0xcd]);
        packet
    }

    fn answered(request: &Request<'_>) -> (Vec<u8>, After) {
        let mut out = Vec::new();
        let after = BinaryCodec::answer(request, &mut out);
        (out, after)
    }

    #[test]
    fn noop_version_quit() {
        let (out, after) = answered(&request(Opcode::Noop, Extras::None, b""));
        assert_eq!(after, After::Continue);
        assert_eq!(out, empty_ok(0x0a));

        let (out, after) = answered(&request(Opcode::Version, Extras::None, b""));
        assert_eq!(after, After::Continue);
        let version = decode_all(&out);
        assert_eq!((version[0].opcode, version[0].status), (0x0b, 0));
        assert_eq!(version[0].value, crate::VERSION.as_bytes());
        assert!(version[0].value.starts_with(b"1.6.18"));

        let (out, after) = answered(&request(Opcode::Quit, Extras::None, b""));
        assert_eq!(after, After::Close);
        assert_eq!(out, empty_ok(0x07));

        let (out, after) = answered(&request(Opcode::QuitQ, Extras::None, b""));
        assert_eq!((out.len(), after), (0, After::Close));

        let (out, after) = answered(&request(Opcode::Stat, Extras::None, b"\xff"));
        assert_eq!(after, After::Continue);
        assert_eq!(decode_all(&out)[0].value, b"Not found");
    }

    fn admin(request: &Request<'_>, reply: AdminReply<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        BinaryCodec::answer_admin(request, reply, &mut out);
        out
    }

    #[test]
    fn stats_are_one_packet_each_then_an_empty_one() {
        let pairs = [
            (Cow::Borrowed("pid"), "8583".to_string()),
            (Cow::Borrowed("uptime"), "52".to_string()),
        ];
        let out = admin(
            &request(Opcode::Stat, Extras::None, b""),
            AdminReply::Stats(&pairs),
        );
        let packets = decode_all(&out);
        assert_eq!(packets.len(), 3);
        for packet in &packets {
            assert_eq!(
                (packet.opcode, packet.status, packet.opaque, packet.cas),
                (0x10, 0, 0xabcd, 0)
            );
        }
        assert_eq!(
            (packets[0].key, packets[0].value),
            (&b"pid"[..], &b"8583"[..])
        );
        assert_eq!(
            (packets[1].key, packets[1].value),
            (&b"uptime"[..], &b"52"[..])
        );
        assert_eq!((packets[2].key, packets[2].value), (&b""[..], &b""[..]));

        let reset = admin(
            &request(Opcode::Stat, Extras::None, b"reset"),
            AdminReply::Reset,
        );
        assert_eq!(reset, empty_ok(0x10));

        let bogus = admin(
            &request(Opcode::Stat, Extras::None, b"bogus"),
            AdminReply::BadArgument,
        );
        let (response, _) = decode_response(&bogus).unwrap();
        assert_eq!((response.status, response.value), (1, &b"Not found"[..]));
    }

    #[test]
    fn flush_answers() {
        let flush = request(Opcode::Flush, Extras::None, b"");
        assert_eq!(admin(&flush, AdminReply::Flushed).len(), 24);
        let flushq = request(Opcode::FlushQ, Extras::Exptime(0), b"");
        assert!(admin(&flushq, AdminReply::Flushed).is_empty());
        // -F: "Auth failure.", quiet or not.
        for request in [flush, flushq] {
            let out = admin(&request, AdminReply::FlushDisabled);
            let (response, _) = decode_response(&out).unwrap();
            assert_eq!(
                (response.opcode, response.status),
                (request.opcode.byte(), 0x20)
            );
            assert_eq!(response.value, b"Auth failure.");
        }
    }

    #[test]
    fn keys_methods_treat_the_request_as_its_only_key() {
        let get = request(Opcode::Get, Extras::None, b"k");
        assert_eq!(BinaryCodec::key_at(&get, 0), b"k");
        let mut frame = Vec::new();
        BinaryCodec::key_frame(&get, 0, &mut frame);
        match BinaryCodec::parse(&frame, &LIMITS) {
            Parse::Request { request, consumed } => {
                assert_eq!((request, consumed), (get, frame.len()))
            }
            other => panic!("{other:?}"),
        }
        let mut out = Vec::new();
        BinaryCodec::finish_keys(&get, &mut out);
        assert!(out.is_empty());
    }
}
