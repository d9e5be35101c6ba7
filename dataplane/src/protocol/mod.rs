//! Protocol codecs: bytes in, requests out; responses composed into a buffer. No I/O here.
//!
//! - [`text`]: memcached's text protocol; lines that start a meta command are handed to [`meta`].
//! - [`meta`]: the meta commands (mg ms md ma mn me).
//! - [`binary`]: memcached's binary protocol.
//!
//! A connection speaks text or binary, decided by its first byte (0x80 is binary), and drives a
//! [`Codec`]: [`Codec::parse`] one request, ask [`Codec::route`] where it runs, run it with
//! [`Codec::execute`] on the shard that owns its key (locally, or on another core from a frame the
//! request wrote of itself), and let [`Codec::answer`] / [`Codec::answer_admin`] reply to what the
//! connection or the server as a whole answers. Responses are appended to a caller's pooled buffer:
//! nothing here allocates per request on the hot path.

pub mod binary;
pub mod meta;
pub mod text;

use std::borrow::Cow;

use crate::shard::Shard;

/// Whether a key sent as a text or meta token is acceptable: at most 250 bytes, and nothing else is
/// checked, as memcached 1.6.18 checks it. The tokenizer already split on spaces and cut the line at its
/// first NUL, so a token holds any other byte: control characters (`\x01`, a tab, DEL, a `\r` inside
/// the line) and bytes >= 0x80 are stored and returned as sent, though protocol.txt asks clients not to
/// send them (memaslap's keys start with `\x10` bytes). Binary-protocol keys and base64-decoded meta keys
/// are binary-safe and not checked here.
#[inline]
pub fn key_token_ok(token: &[u8]) -> bool {
    token.len() <= crate::store::MAX_KEY_LEN
}

/// Limits the parsers enforce.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest value accepted (`-I`); larger ones are refused and their data swallowed.
    pub item_size_max: usize,
}

/// Outcome of parsing the front of a connection's input buffer.
#[derive(Debug)]
pub enum Parse<R> {
    /// A whole request, and how many bytes of the buffer it used (command line plus data block).
    Request { request: R, consumed: usize },
    /// Not enough bytes yet; call again when more arrive.
    Incomplete,
    /// The input is not a valid request.
    Invalid(Invalid),
}

/// What to do about invalid input: reply, drop bytes, maybe close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Bytes to send back (may be empty).
    pub reply: Cow<'static, [u8]>,
    /// Bytes to drop from the buffer now (the offending line or packet header); at most what was given.
    pub consumed: usize,
    /// Further bytes to drop as they arrive (the data block of a refused value, which may be larger than
    /// anything buffered: a 2 GB value is swallowed, not stored).
    pub swallow: usize,
    /// Close the connection after sending `reply` (memcached closes, e.g., on a line too long or a bad
    /// binary magic).
    pub close: bool,
}

impl Invalid {
    /// Reply and drop `consumed` bytes, keep the connection.
    pub fn reply(reply: impl Into<Cow<'static, [u8]>>, consumed: usize) -> Invalid {
        Invalid { reply: reply.into(), consumed, swallow: 0, close: false }
    }

    /// Reply, then close.
    pub fn close(reply: impl Into<Cow<'static, [u8]>>) -> Invalid {
        Invalid { reply: reply.into(), consumed: 0, swallow: 0, close: true }
    }
}

/// Where a parsed request runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'r> {
    /// On the shard that owns this key (raw key bytes: a meta base64 key is already decoded).
    Key(&'r [u8]),
    /// A retrieval of this many keys, each run on its own shard with [`Codec::execute_key`], in order,
    /// then closed with [`Codec::finish_keys`].
    Keys(usize),
    /// Run on every shard in turn with [`Codec::execute`], replies in shard order, then closed with
    /// [`Codec::finish_keys`] (`lru_crawler metadump`).
    AllShards,
    /// Run with [`Codec::execute`] on the shard whose slab class this is, then closed with
    /// [`Codec::finish_keys`] (`stats cachedump`). Tandem has no slab classes: each shard's store is one
    /// class, numbered shard + 1 as `stats items` and `stats slabs` show them; a class no shard has is
    /// empty, and runs on the connection's own shard, which finds nothing.
    SlabClass(u32),
    /// Answered by the connection alone with [`Codec::answer`] (version, mn, noop, quit, errors...).
    Connection,
    /// Needs the server as a whole; answered with [`Codec::answer_admin`].
    Admin(Admin<'r>),
}

/// Requests about the whole server.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Admin<'r> {
    /// `stats [group]`; binary STAT with an optional key. `None` is the general group.
    Stats(Option<&'r str>),
    /// `flush_all [delay]`; binary FLUSH with its expiration extra. Delay in seconds, 0 now.
    Flush { delay: i64 },
    /// `verbosity N`.
    Verbosity(u32),
    /// `cache_memlimit <megabytes>`: the new memory limit in bytes, split across shards like `-m`.
    MemoryLimit(usize),
    /// `shutdown` (only when enabled with -A).
    Shutdown,
}

/// The server's answer to an [`Admin`] request, for the codec to encode.
#[derive(Debug)]
pub enum AdminReply<'a> {
    /// Statistics as (name, value) pairs, in order.
    Stats(&'a [(Cow<'a, str>, String)]),
    /// `stats reset` done.
    Reset,
    /// Flush accepted.
    Flushed,
    /// Flush refused because of -F.
    FlushDisabled,
    /// Verbosity set.
    VerbosityOk,
    /// Memory limit changed.
    MemoryLimitSet,
    /// Memory limit refused: outside what the store can take (see [`crate::store::Store::set_memory_limit`]).
    MemoryLimitRefused,
    /// Shutdown accepted; the server will stop.
    ShutdownAccepted,
    /// Shutdown refused because -A was not given.
    ShutdownDisabled,
    /// An unknown stats group or bad argument: `ERROR`-style reply chosen by the codec.
    BadArgument,
}

/// What the connection does after [`Codec::answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// Close once everything queued before is sent (quit).
    Close,
}

/// One wire protocol. Implemented by [`text::TextCodec`] (with meta) and [`binary::BinaryCodec`].
pub trait Codec {
    type Request<'a>: std::fmt::Debug;

    /// Parses one request from the front of `buf`.
    fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Self::Request<'a>>;

    /// The key of the request at the front of `buf` and that request's length in bytes, when a glance
    /// tells both (no full parse), so that the store lookups of a pipelined batch can be prefetched
    /// before the batch runs; `None` when the request is incomplete, has no key, or the codec cannot
    /// tell cheaply. A hint: the request is still parsed and checked by [`Codec::parse`].
    fn peek_key(_buf: &[u8]) -> Option<(&[u8], usize)> {
        None
    }

    /// Where `request` runs.
    fn route<'r>(request: &'r Self::Request<'_>) -> Route<'r>;

    /// Runs a [`Route::Key`] request on the shard that owns its key, appending the response to `out`.
    fn execute(shard: &mut Shard, request: &Self::Request<'_>, out: &mut Vec<u8>);

    /// The key at `index` of a [`Route::Keys`] request.
    fn key_at<'r>(request: &'r Self::Request<'_>, index: usize) -> &'r [u8];

    /// Runs key `index` of a [`Route::Keys`] request on its shard (no terminator).
    fn execute_key(shard: &mut Shard, request: &Self::Request<'_>, index: usize, out: &mut Vec<u8>);

    /// Writes the bytes of a single-key request equivalent to key `index` of a [`Route::Keys`] request,
    /// so another core can parse and run it with [`Codec::execute_key`] at index 0.
    fn key_frame(request: &Self::Request<'_>, index: usize, out: &mut Vec<u8>);

    /// Closes the response of a [`Route::Keys`] request (text: `END\r\n`).
    fn finish_keys(request: &Self::Request<'_>, out: &mut Vec<u8>);

    /// Answers a [`Route::Connection`] request.
    fn answer(request: &Self::Request<'_>, out: &mut Vec<u8>) -> After;

    /// Encodes the server's reply to a [`Route::Admin`] request (nothing for a quiet binary flush).
    fn answer_admin(request: &Self::Request<'_>, reply: AdminReply<'_>, out: &mut Vec<u8>);

    /// Whether the request changes the cache: stores, deletes, incr/decr, touch and get-and-touch,
    /// vivifying reads, flush_all. A read-only standby refuses these with [`Codec::refuse_read_only`].
    fn mutates(request: &Self::Request<'_>) -> bool;

    /// The refusal of a request that [`Codec::mutates`] on a read-only standby (sent even when the
    /// request asked for no reply, as memcached sends errors).
    fn refuse_read_only(request: &Self::Request<'_>, out: &mut Vec<u8>);
}

/// What a read-only standby answers a write with, in the text and meta protocols.
pub const READ_ONLY_STANDBY: &[u8] = b"SERVER_ERROR read-only standby\r\n";
