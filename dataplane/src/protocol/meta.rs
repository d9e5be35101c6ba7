//! memcached's meta commands (`mg` `ms` `md` `ma` `me` `mn`), byte for byte as memcached 1.6.18 speaks them.
//!
//! The text codec hands over every line that starts a meta command; this module does the rest:
//! - [`parse`]: one request from the front of a buffer (command line, and the data block of `ms`) into a
//!   [`Request`] that borrows from the buffer. Pure: the same bytes always give the same result, so a
//!   request can be re-parsed on the core that owns its key.
//! - [`route`]: where a request runs (its decoded key's shard, or the connection for `mn`).
//! - [`execute`]: runs a keyed request against a [`Shard`]'s store, bumps memcached's counters and
//!   appends the response. [`answer`]: the connection's own replies (`mn`).
//!
//! Submodules: `parse` (tokens, numbers and flags with memcached's C parsing rules), `execute`
//! (store calls and response lines), `base64` (memcached's lenient decoder for `b` keys).
//!
//! Where we differ from memcached 1.6.18, and why:
//! - Flags newer than 1.6.18 (`E`, `x`, `N` on ms, `S`...) are refused with `CLIENT_ERROR invalid flag`,
//!   as 1.6.18 refuses them. Adding one is a line in `parse::preparse` and a field in [`Flags`].
//! - memcached remembers on the item whether its key was sent in base64 and then shows it that way in
//!   `k` and `me` even to requests without `b`; the store keeps no such bit, so the request's `b` decides.
//! - `me` reports the shard's class as `cls` (no slab classes here: class = shard + 1, as `stats items`
//!   and `stats cachedump` number them) and `size=` is the store's own item footprint.
//! - Errors found after the store was touched in memcached (an opaque token longer than 32 bytes) are
//!   refused before anything runs; a refused too-large `ms` does not unlink the old item (it never reaches
//!   the shard, since its data is swallowed by the connection).

mod base64;
mod execute;
mod parse;

use std::fmt;

use super::{After, Limits, Parse, Route};
use crate::shard::Shard;
use crate::store::{StoreMode, MAX_KEY_LEN};

/// A request key: the bytes as sent, and the decoded bytes when the request carried `b`.
#[derive(Clone)]
pub struct Key<'a> {
    sent: &'a [u8],
    /// Decoded base64 (`b`): at most 186 bytes for a 250-byte token, held inline so routing and the
    /// store see raw bytes without an allocation.
    decoded: Option<([u8; MAX_KEY_LEN], u8)>,
}

impl<'a> Key<'a> {
    /// A key used as sent.
    pub fn plain(sent: &'a [u8]) -> Key<'a> {
        Key { sent, decoded: None }
    }

    /// The key the store sees (decoded when `b`).
    pub fn bytes(&self) -> &[u8] {
        match &self.decoded {
            Some((bytes, len)) => &bytes[..*len as usize],
            None => self.sent,
        }
    }

    /// The key token as it appeared on the command line.
    pub fn sent(&self) -> &'a [u8] {
        self.sent
    }

    /// Was the key sent in base64 (`b`)? Responses then return it in base64 too.
    pub fn is_binary(&self) -> bool {
        self.decoded.is_some()
    }
}

impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.sent == other.sent && self.bytes() == other.bytes() && self.is_binary() == other.is_binary()
    }
}

impl Eq for Key<'_> {}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?}", self.sent.escape_ascii().to_string())?;
        if self.is_binary() {
            write!(f, " = b{:?}", self.bytes().escape_ascii().to_string())?;
        }
        write!(f, ")")
    }
}

/// The flags of a request, parsed; `tokens` keeps them as sent, because returned flags follow request order.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Flags<'a> {
    /// The flag tokens as sent (space separated), walked again when the response is written.
    pub tokens: &'a [u8],
    /// `v`: return the value (mg, ma).
    pub value: bool,
    /// `u`: do not bump, mark fetched or update the last access (mg).
    pub no_bump: bool,
    /// `q`: suppress the nominal reply (mg `EN`; ms, md, ma `HD`).
    pub quiet: bool,
    /// `I`: invalidate (md: mark stale; ms with `C`: accept an older CAS and store stale).
    pub invalidate: bool,
    /// `T<exptime>`: new TTL (mg touch, ms TTL, md with `I`, ma on success). memcached's `int32` exptime.
    pub ttl: Option<i32>,
    /// `N<exptime>`: vivify on miss with this TTL (mg, ma).
    pub vivify: Option<i32>,
    /// `R<exptime>`: win the recache when the remaining TTL is below this (mg).
    pub recache: Option<i32>,
    /// `F<flags>`: client flags to store (ms); 0 when absent.
    pub client_flags: u32,
    /// `C<cas>`: compare CAS (ms, md, ma).
    pub compare_cas: Option<u64>,
    /// `D<delta>`: delta (ma); 1 when absent.
    pub delta: u64,
    /// `J<initial>`: initial value on vivify (ma); 0 when absent.
    pub initial: u64,
    /// A `t` comes before the `T` or `N` that changes the TTL: memcached writes flags in request order
    /// while applying them, so that `t` shows the TTL from before the change.
    pub ttl_before_change: bool,
}

impl fmt::Debug for Flags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flags")
            .field("tokens", &self.tokens.escape_ascii().to_string())
            .field("value", &self.value)
            .field("no_bump", &self.no_bump)
            .field("quiet", &self.quiet)
            .field("invalidate", &self.invalidate)
            .field("ttl", &self.ttl)
            .field("vivify", &self.vivify)
            .field("recache", &self.recache)
            .field("client_flags", &self.client_flags)
            .field("compare_cas", &self.compare_cas)
            .field("delta", &self.delta)
            .field("initial", &self.initial)
            .field("ttl_before_change", &self.ttl_before_change)
            .finish()
    }
}

/// One meta request, borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `mg <key> <flags>*`
    Get { key: Key<'a>, flags: Flags<'a> },
    /// `ms <key> <datalen> <flags>*` and its data block; `M` already resolved to a store mode.
    Set { key: Key<'a>, flags: Flags<'a>, mode: StoreMode, value: &'a [u8] },
    /// `md <key> <flags>*`
    Delete { key: Key<'a>, flags: Flags<'a> },
    /// `ma <key> <flags>*`; `M` resolved to increment or decrement.
    Arith { key: Key<'a>, flags: Flags<'a>, incr: bool },
    /// `me <key> [b]`
    Debug { key: Key<'a> },
    /// `mn`
    NoOp,
    /// An `ms` whose data block did not end in `\r\n`. memcached counts it as a set (`cmd_set`) before
    /// refusing it, so it runs on the key's shard and answers `CLIENT_ERROR bad data chunk`.
    BadDataChunk { key: Key<'a> },
}

impl<'a> Request<'a> {
    /// The request's key, if it has one.
    pub fn key(&self) -> Option<&Key<'a>> {
        match self {
            Request::Get { key, .. }
            | Request::Set { key, .. }
            | Request::Delete { key, .. }
            | Request::Arith { key, .. }
            | Request::Debug { key }
            | Request::BadDataChunk { key } => Some(key),
            Request::NoOp => None,
        }
    }
}

/// Parses one meta request from the front of `buf`, which starts at the command line.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parse<Request<'a>> {
    parse::parse(buf, limits)
}

/// Whether `req` changes the cache: ms, md, ma, and mg with a new TTL (`T`) or vivify (`N`).
pub fn mutates(req: &Request<'_>) -> bool {
    match req {
        Request::Set { .. } | Request::Delete { .. } | Request::Arith { .. } => true,
        Request::Get { flags, .. } => flags.ttl.is_some() || flags.vivify.is_some(),
        _ => false,
    }
}

/// Where `req` runs: keyed requests on the shard of their (decoded) key, `mn` on the connection.
pub fn route<'r>(req: &'r Request<'_>) -> Route<'r> {
    match req.key() {
        Some(key) => Route::Key(key.bytes()),
        None => Route::Connection,
    }
}

/// Runs a keyed request on the shard that owns its key, appending the response to `out`.
pub fn execute(shard: &mut Shard, req: &Request<'_>, out: &mut Vec<u8>) {
    execute::execute(shard, req, out)
}

/// Answers a request routed to the connection (`mn`).
pub fn answer(req: &Request<'_>, out: &mut Vec<u8>) -> After {
    match req {
        Request::NoOp => out.extend_from_slice(b"MN\r\n"),
        // Keyed requests run on a shard; answering one here is a caller bug, and memcached's
        // generic reply is the least surprising thing to send.
        _ => {
            debug_assert!(false, "meta request {req:?} routed to the connection");
            out.extend_from_slice(b"ERROR\r\n");
        }
    }
    After::Continue
}

#[cfg(test)]
mod tests;
