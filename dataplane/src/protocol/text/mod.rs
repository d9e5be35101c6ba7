//! memcached's text protocol: command lines and data blocks in, replies out, as memcached 1.6.18 does it.
//!
//! The contract is memcached's `doc/protocol.txt` and what `proto_text.c` does beyond it that a client
//! can see: tokens split on spaces only, a NUL ends a line, numbers read the way C's `strtol` family
//! reads them, `noreply` silences errors too, a line over 2048 bytes without a newline closes the
//! connection unless it starts a `get`/`gets`, and a refused storage line leaves its data block to be
//! read as the next command.
//!
//! - `parse`: one [`Request`] from the front of a buffer; lines starting a meta command (`mg ms md ma mn
//!   me`) go to [`super::meta`].
//! - `execute`: runs a keyed request on the shard that owns its key, with memcached's counters.
//! - `reply`: memcached's reply lines and their encoders.
//! - [`KeyList`]: the keys of a multi-key retrieval, without allocating for up to 24.
//! - `line`, `number`: cutting a line into tokens and reading numbers from them.
//! - [`TextCodec`]: all of that behind [`Codec`].

mod execute;
mod keys;
mod line;
mod number;
mod parse;
mod reply;
#[cfg(test)]
mod tests;

pub use keys::{KeyList, INLINE_KEYS};
pub use parse::{parse, MAX_LINE_WITHOUT_NEWLINE};

use super::{meta, Admin, AdminReply, After, Codec, Limits, Parse, Route};
use crate::shard::Shard;

/// A text protocol request, borrowing its key(s) and value from the input buffer.
#[derive(Debug)]
pub enum Request<'a> {
    /// `set`, `add`, `replace`, `append`, `prepend`, `cas`, with the data block.
    Storage(Storage<'a>),
    /// A storage command whose data block was not followed by `\r\n`. memcached counts it as a set and
    /// answers `CLIENT_ERROR bad data chunk` (unless `noreply`).
    BadDataChunk {
        key: &'a [u8],
        noreply: bool,
    },
    /// `get`, `gets`, `gat`, `gats` (and memcached's old alias `bget`).
    Retrieval(Retrieval<'a>),
    Delete {
        key: &'a [u8],
        noreply: bool,
    },
    /// `incr` (`incr: true`) or `decr`.
    Arith {
        key: &'a [u8],
        incr: bool,
        delta: u64,
        noreply: bool,
    },
    Touch {
        key: &'a [u8],
        exptime: i32,
        noreply: bool,
    },
    /// `flush_all [delay]`; a delay of 0 or less is now.
    FlushAll {
        delay: i32,
        noreply: bool,
    },
    Verbosity {
        level: u32,
        noreply: bool,
    },
    /// `cache_memlimit <megabytes> [noreply]`, at least 8 and at most 10^9 megabytes.
    CacheMemlimit {
        megabytes: u32,
        noreply: bool,
    },
    /// `stats cachedump <class> <limit>`: up to `limit` items (0: all, within 2 MiB of reply) of a slab
    /// class, which in Tandem is a shard's store (see [`Route::SlabClass`]).
    CacheDump {
        class: u32,
        limit: u32,
    },
    /// `stats [group]`: `None` is the general group.
    Stats {
        group: Option<&'a str>,
    },
    Shutdown {
        graceful: bool,
    },
    Version,
    Quit,
    /// `lru_crawler metadump all`: one line per live item of every shard, then `END`.
    MetaDump,
    Meta(meta::Request<'a>),
}

/// A storage command and its value.
#[derive(Debug, Clone)]
pub struct Storage<'a> {
    pub command: StorageCommand,
    pub key: &'a [u8],
    pub client_flags: u32,
    /// As sent (after memcached's truncation to 32 bits); see [`crate::clock::Clock::expiry`].
    pub exptime: i32,
    pub value: &'a [u8],
    pub noreply: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageCommand {
    Set,
    Add,
    Replace,
    /// Keeps the item's flags and exptime; the ones sent are ignored.
    Append,
    Prepend,
    /// Store only if the item's CAS is still `unique`.
    Cas {
        unique: u64,
    },
}

impl StorageCommand {
    /// The command's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            StorageCommand::Set => "set",
            StorageCommand::Add => "add",
            StorageCommand::Replace => "replace",
            StorageCommand::Append => "append",
            StorageCommand::Prepend => "prepend",
            StorageCommand::Cas { .. } => "cas",
        }
    }
}

/// A retrieval and its keys (possibly none: `gat 10` answers `END`).
#[derive(Debug, Clone)]
pub struct Retrieval<'a> {
    pub command: RetrievalCommand,
    pub keys: KeyList<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrievalCommand {
    Get,
    Gets,
    /// Get and touch.
    Gat {
        exptime: i32,
    },
    Gats {
        exptime: i32,
    },
}

impl RetrievalCommand {
    /// Whether `VALUE` lines carry the CAS.
    pub fn returns_cas(self) -> bool {
        matches!(self, RetrievalCommand::Gets | RetrievalCommand::Gats { .. })
    }

    /// The new exptime of a get-and-touch.
    pub fn exptime(self) -> Option<i32> {
        match self {
            RetrievalCommand::Gat { exptime } | RetrievalCommand::Gats { exptime } => Some(exptime),
            RetrievalCommand::Get | RetrievalCommand::Gets => None,
        }
    }

    /// The command's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            RetrievalCommand::Get => "get",
            RetrievalCommand::Gets => "gets",
            RetrievalCommand::Gat { .. } => "gat",
            RetrievalCommand::Gats { .. } => "gats",
        }
    }
}

/// The text protocol, meta commands included.
pub struct TextCodec;

impl Codec for TextCodec {
    type Request<'a> = Request<'a>;

    fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
        parse::parse(buf, limits)
    }

    fn route<'r>(request: &'r Request<'_>) -> Route<'r> {
        match request {
            Request::Storage(storage) => Route::Key(storage.key),
            Request::BadDataChunk { key, .. }
            | Request::Delete { key, .. }
            | Request::Arith { key, .. }
            | Request::Touch { key, .. } => Route::Key(key),
            Request::Retrieval(retrieval) if retrieval.keys.is_empty() => Route::Connection,
            Request::Retrieval(retrieval) => Route::Keys(retrieval.keys.len()),
            Request::FlushAll { delay, .. } => Route::Admin(Admin::Flush { delay: (*delay).into() }),
            Request::Verbosity { level, .. } => Route::Admin(Admin::Verbosity(*level)),
            Request::CacheMemlimit { megabytes, .. } => Route::Admin(Admin::MemoryLimit(*megabytes as usize * (1 << 20))),
            Request::CacheDump { class, .. } => Route::SlabClass(*class),
            Request::Stats { group } => Route::Admin(Admin::Stats(*group)),
            Request::Shutdown { .. } => Route::Admin(Admin::Shutdown),
            Request::Version | Request::Quit => Route::Connection,
            Request::MetaDump => Route::AllShards,
            Request::Meta(request) => meta::route(request),
        }
    }

    fn execute(shard: &mut Shard, request: &Request<'_>, out: &mut Vec<u8>) {
        execute::execute(shard, request, out)
    }

    fn mutates(request: &Request<'_>) -> bool {
        match request {
            Request::Storage(_)
            | Request::Delete { .. }
            | Request::Arith { .. }
            | Request::Touch { .. }
            | Request::FlushAll { .. } => true,
            Request::Retrieval(retrieval) => {
                matches!(retrieval.command, RetrievalCommand::Gat { .. } | RetrievalCommand::Gats { .. })
            }
            Request::Meta(request) => meta::mutates(request),
            _ => false,
        }
    }

    fn refuse_read_only(_request: &Request<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(crate::protocol::READ_ONLY_STANDBY);
    }

    fn key_at<'r>(request: &'r Request<'_>, index: usize) -> &'r [u8] {
        match request {
            Request::Retrieval(retrieval) => retrieval.keys.get(index),
            other => {
                debug_assert!(false, "key_at on a request that is not a retrieval: {other:?}");
                &[]
            }
        }
    }

    fn execute_key(shard: &mut Shard, request: &Request<'_>, index: usize, out: &mut Vec<u8>) {
        match request {
            Request::Retrieval(retrieval) => execute::retrieve(shard, retrieval, index, out),
            other => debug_assert!(false, "execute_key on a request that is not a retrieval: {other:?}"),
        }
    }

    /// `get <key>\r\n`, `gats <exptime> <key>\r\n`, ...: a one-key retrieval of key `index`.
    fn key_frame(request: &Request<'_>, index: usize, out: &mut Vec<u8>) {
        let Request::Retrieval(retrieval) = request else {
            debug_assert!(false, "key_frame on a request that is not a retrieval: {request:?}");
            return;
        };
        out.extend_from_slice(retrieval.command.name().as_bytes());
        out.push(b' ');
        if let Some(exptime) = retrieval.command.exptime() {
            if exptime < 0 {
                out.push(b'-');
            }
            reply::push_decimal(out, exptime.unsigned_abs().into());
            out.push(b' ');
        }
        out.extend_from_slice(retrieval.keys.get(index));
        out.extend_from_slice(b"\r\n");
    }

    fn finish_keys(_request: &Request<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(reply::END);
    }

    fn answer(request: &Request<'_>, out: &mut Vec<u8>) -> After {
        match request {
            Request::Version => {
                out.extend_from_slice(b"VERSION ");
                out.extend_from_slice(crate::VERSION.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            // memcached sends nothing more and closes once what is queued is out.
            Request::Quit => return After::Close,
            // A retrieval of no keys (`gat 10`).
            Request::Retrieval(_) => out.extend_from_slice(reply::END),
            Request::Meta(request) => return meta::answer(request, out),
            other => debug_assert!(false, "answer on a request the connection does not answer: {other:?}"),
        }
        After::Continue
    }

    fn answer_admin(request: &Request<'_>, reply: AdminReply<'_>, out: &mut Vec<u8>) {
        let noreply = match request {
            Request::FlushAll { noreply, .. }
            | Request::Verbosity { noreply, .. }
            | Request::CacheMemlimit { noreply, .. } => *noreply,
            _ => false,
        };
        match reply {
            AdminReply::Stats(pairs) => reply::push_stats(out, pairs),
            AdminReply::Reset => out.extend_from_slice(reply::RESET),
            AdminReply::Flushed | AdminReply::VerbosityOk | AdminReply::MemoryLimitSet => reply::push(out, reply::OK, noreply),
            AdminReply::MemoryLimitRefused => reply::push(out, reply::MEMLIMIT_FAILED, noreply),
            AdminReply::FlushDisabled => reply::push(out, reply::FLUSH_DISABLED, noreply),
            // memcached closes the connection at once, without a reply (even to commands before it).
            AdminReply::ShutdownAccepted => {}
            AdminReply::ShutdownDisabled => out.extend_from_slice(reply::SHUTDOWN_DISABLED),
            // `stats <unknown group>`.
            AdminReply::BadArgument => out.extend_from_slice(reply::ERROR),
        }
    }
}
