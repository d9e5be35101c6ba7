//! Running meta requests on a shard: one store call each (plus a side-effect-free `peek` in the few
//! cases memcached's reply depends on the item's state before the call), memcached's counters, and
//! the response line with returned flags in request order.
//!
//! Counters follow memcached 1.6.18 (checked with `stats`):
//! - mg: hit `cmd_get`+`get_hits`, or with `T` `cmd_touch`+`touch_hits`; a miss is always
//!   `cmd_get`+`get_misses`, even with `T`; a vivified miss counts as a hit.
//! - ms: `cmd_set` (also for a bad data chunk); with `C` in set/replace mode also `cas_hits`,
//!   `cas_badval` or `cas_misses`. Append/prepend with `C` and add count no CAS stats.
//! - md: `delete_hits` (not with `I`: invalidation counts nothing) or `delete_misses` (also for `EX`).
//! - ma: `incr_hits`/`decr_hits`, `incr_misses`/`decr_misses`; vivify, `EX` and non-numeric count nothing.
//! - me, mn: nothing.
//!
//! Responses are appended to the caller's buffer; nothing here allocates.

use super::parse::tokens;
use super::{base64, Flags, Key, Request};
use crate::clock::{Expiry, RelTime};
use crate::shard::Shard;
use crate::store::{
    ArithRequest, ArithResult, DeleteRequest, DeleteResult, GetOptions, GetResult, ItemDebug, ItemView, StoreMode,
    StoreRequest, StoreResult,
};

pub(super) fn execute(shard: &mut Shard, request: &Request<'_>, out: &mut Vec<u8>) {
    match request {
        Request::Get { key, flags } => get(shard, key, flags, out),
        Request::Set { key, flags, mode, value } => set(shard, key, flags, *mode, value, out),
        Request::Delete { key, flags } => delete(shard, key, flags, out),
        Request::Arith { key, flags, incr } => arith(shard, key, flags, *incr, out),
        Request::Debug { key } => debug(shard, key, out),
        Request::BadDataChunk { .. } => {
            shard.counters.cmd_set.incr();
            out.extend_from_slice(b"CLIENT_ERROR bad data chunk\r\n");
        }
        Request::NoOp => {
            super::answer(request, out);
        }
    }
}

/// The decimal digits of `value`, written into `buf`.
fn decimal(mut value: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buf[start..]
}

/// Appends the decimal digits of `value`.
fn push_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(decimal(value, &mut [0u8; 20]));
}

fn push_i64(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    push_u64(out, value.unsigned_abs());
}

/// A flag and its number: ` t30`.
fn push_flag(out: &mut Vec<u8>, flag: u8, value: u64) {
    out.extend_from_slice(&[b' ', flag]);
    push_u64(out, value);
}

/// ` t<remaining>`: `-1` without expiry, else memcached's unsigned 32-bit `exptime - now` (which wraps
/// for an item that is already expired, as memcached's does).
fn push_ttl(out: &mut Vec<u8>, exptime: RelTime, now: RelTime) {
    if exptime == 0 {
        out.extend_from_slice(b" t-1");
    } else {
        push_flag(out, b't', u64::from(exptime.wrapping_sub(now)));
    }
}

/// A key as a reply shows it (`k`, `me`): its bytes, base64-encoded again when `binary`.
///
/// memcached 1.6.18 takes `binary` from the request (`b`) everywhere except in an `mg` hit and in
/// `me`, which show the key as the item remembers it: encoded if it was stored with `b`, whether or
/// not this request used `b`.
#[derive(Clone, Copy)]
struct ShownKey<'a> {
    bytes: &'a [u8],
    binary: bool,
}

impl<'a> ShownKey<'a> {
    /// As the request sent it.
    fn sent(key: &'a Key<'_>) -> ShownKey<'a> {
        ShownKey { bytes: key.bytes(), binary: key.is_binary() }
    }

    /// As the item was stored.
    fn stored(item: &'a impl ItemView) -> ShownKey<'a> {
        ShownKey { bytes: item.key(), binary: item.key_binary() }
    }
}

/// The key as shown to the client.
fn push_key_text(out: &mut Vec<u8>, key: ShownKey<'_>) {
    if key.binary {
        base64::encode_into(key.bytes, out);
    } else {
        out.extend_from_slice(key.bytes);
    }
}

/// ` k<key>`, followed by ` b` for a base64 key.
fn push_key_flag(out: &mut Vec<u8>, key: ShownKey<'_>) {
    out.extend_from_slice(b" k");
    push_key_text(out, key);
    if key.binary {
        out.extend_from_slice(b" b");
    }
}

/// Returns the flags every reply carries (`O` opaque, `k` key), in request order; `others` writes the rest.
fn push_flags(out: &mut Vec<u8>, flags: &Flags<'_>, key: ShownKey<'_>, mut others: impl FnMut(&mut Vec<u8>, u8)) {
    for token in tokens(flags.tokens) {
        match token[0] {
            b'O' => {
                out.push(b' ');
                out.extend_from_slice(token);
            }
            b'k' => push_key_flag(out, key),
            flag => others(out, flag),
        }
    }
}

/// A status code with only `O` and `k` returned (misses, `NF`, `EX`, `NS`...).
fn push_status(out: &mut Vec<u8>, code: &[u8], flags: &Flags<'_>, key: &Key<'_>) {
    out.extend_from_slice(code);
    push_flags(out, flags, ShownKey::sent(key), |_, _| {});
    out.extend_from_slice(b"\r\n");
}

/// memcached's interpretation of an `R` token as "remaining TTL below this many seconds".
fn recache_below(shard: &Shard, exptime: i32) -> u32 {
    match shard.expiry(exptime.into()) {
        Expiry::At(at) => at.saturating_sub(shard.now()),
        // R0, negative or past tokens never win.
        Expiry::Never | Expiry::Immediately => 0,
    }
}

/// The item's stored exptime before this request changes it (0 when absent, as memcached's vivified
/// item is born without one), for a `t` that precedes the `T` or `N` changing it.
fn exptime_before(shard: &Shard, key: &Key<'_>, flags: &Flags<'_>) -> Option<RelTime> {
    flags.ttl_before_change.then(|| shard.store.peek(key.bytes(), shard.now()).map_or(0, |item| item.exptime()))
}

fn get(shard: &mut Shard, key: &Key<'_>, flags: &Flags<'_>, out: &mut Vec<u8>) {
    let now = shard.now();
    let cas_enabled = shard.cas_enabled();
    let options = GetOptions {
        touch: flags.ttl.map(|exptime| shard.expiry(exptime.into())),
        no_bump: flags.no_bump,
        vivify: flags.vivify.map(|exptime| shard.expiry(exptime.into())),
        recache_below: flags.recache.map(|exptime| recache_below(shard, exptime)),
    };
    let shown_exptime = exptime_before(shard, key, flags);
    let counters = &shard.counters;
    match shard.store.get(key.bytes(), options, now) {
        GetResult::Hit(hit) => {
            if options.touch.is_some() {
                counters.cmd_touch.incr();
                counters.touch_hits.incr();
            } else {
                counters.cmd_get.incr();
                counters.get_hits.incr();
            }
            let item = &hit.item;
            let value_len = item.value_len() as u64;
            if flags.value {
                out.extend_from_slice(b"VA ");
                push_u64(out, value_len);
            } else {
                out.extend_from_slice(b"HD");
            }
            push_flags(out, flags, ShownKey::stored(item), |out, flag| match flag {
                b's' => push_flag(out, b's', value_len),
                b't' => push_ttl(out, shown_exptime.unwrap_or_else(|| item.exptime()), now),
                b'c' => push_flag(out, b'c', if cas_enabled { item.cas() } else { 0 }),
                b'f' => push_flag(out, b'f', item.client_flags().into()),
                b'l' => push_flag(out, b'l', hit.idle_secs.into()),
                b'h' => push_flag(out, b'h', hit.fetched_before.into()),
                _ => {}
            });
            // memcached's order: Z, X, then W (W and Z never both).
            if hit.already_won {
                out.extend_from_slice(b" Z");
            }
            if hit.stale {
                out.extend_from_slice(b" X");
            }
            if hit.won {
                out.extend_from_slice(b" W");
            }
            out.extend_from_slice(b"\r\n");
            if flags.value {
                item.copy_value_into(out);
                out.extend_from_slice(b"\r\n");
            }
        }
        GetResult::Miss => {
            counters.cmd_get.incr();
            counters.get_misses.incr();
            if !flags.quiet {
                push_status(out, b"EN", flags, key);
            }
        }
    }
}

fn set(shard: &mut Shard, key: &Key<'_>, flags: &Flags<'_>, mode: StoreMode, value: &[u8], out: &mut Vec<u8>) {
    let now = shard.now();
    let cas_enabled = shard.cas_enabled();
    // memcached turns set and replace with `C` into its cas command; append and prepend check `C`
    // themselves; add ignores it. `I` only means something to the cas command.
    let cas_command = flags.compare_cas.is_some() && matches!(mode, StoreMode::Set | StoreMode::Replace);
    let request = StoreRequest {
        key: key.bytes(),
        value,
        client_flags: flags.client_flags,
        expiry: shard.expiry(flags.ttl.unwrap_or(0).into()),
        mode,
        compare_cas: if mode == StoreMode::Add { None } else { flags.compare_cas },
        invalidate: flags.invalidate && cas_command,
        new_cas: None,
        vivify_on_miss: None,
        key_binary: key.is_binary(),
    };
    let result = shard.store.store(&request, now);
    let counters = &shard.counters;
    counters.cmd_set.incr();
    if cas_command {
        match result {
            StoreResult::Stored { .. } => counters.cas_hits.incr(),
            StoreResult::Exists => counters.cas_badval.incr(),
            StoreResult::NotFound => counters.cas_misses.incr(),
            _ => {}
        }
    }
    let (code, cas): (&[u8], u64) = match result {
        StoreResult::Stored { .. } if flags.quiet => return,
        StoreResult::Stored { cas } => (b"HD", if cas_enabled { cas } else { 0 }),
        StoreResult::NotStored => (b"NS", 0),
        StoreResult::Exists => (b"EX", 0),
        // Append and prepend on a missing item are "not stored", with or without `C`.
        StoreResult::NotFound if matches!(mode, StoreMode::Append | StoreMode::Prepend) => (b"NS", 0),
        StoreResult::NotFound => (b"NF", 0),
        StoreResult::TooLarge | StoreResult::OutOfMemory => {
            // memcached unlinks the old item so that a failed store leaves no stale value behind.
            let unlink = DeleteRequest {
                key: key.bytes(),
                compare_cas: None,
                invalidate: false,
                new_expiry: None,
                new_cas: None,
            };
            shard.store.delete(&unlink, now);
            out.extend_from_slice(if result == StoreResult::TooLarge {
                b"SERVER_ERROR object too large for cache\r\n"
            } else {
                b"SERVER_ERROR out of memory storing object\r\n"
            });
            return;
        }
    };
    out.extend_from_slice(code);
    // `c` shows 0 unless stored (memcached: "will return 0 on error").
    push_flags(out, flags, ShownKey::sent(key), |out, flag| {
        if flag == b'c' {
            push_flag(out, b'c', cas);
        }
    });
    out.extend_from_slice(b"\r\n");
}

fn delete(shard: &mut Shard, key: &Key<'_>, flags: &Flags<'_>, out: &mut Vec<u8>) {
    let now = shard.now();
    let request = DeleteRequest {
        key: key.bytes(),
        compare_cas: flags.compare_cas,
        invalidate: flags.invalidate,
        // `T` only counts together with `I`.
        new_expiry: flags.ttl.filter(|_| flags.invalidate).map(|exptime| shard.expiry(exptime.into())),
        new_cas: None,
    };
    let counters = &shard.counters;
    let code: &[u8] = match shard.store.delete(&request, now) {
        DeleteResult::Deleted => {
            if !flags.invalidate {
                counters.delete_hits.incr();
            }
            if flags.quiet {
                return;
            }
            b"HD"
        }
        DeleteResult::NotFound => {
            counters.delete_misses.incr();
            b"NF"
        }
        DeleteResult::Exists => {
            counters.delete_misses.incr();
            b"EX"
        }
    };
    push_status(out, code, flags, key);
}

fn arith(shard: &mut Shard, key: &Key<'_>, flags: &Flags<'_>, incr: bool, out: &mut Vec<u8>) {
    let now = shard.now();
    let cas_enabled = shard.cas_enabled();
    let vivify = flags.vivify.map(|exptime| (shard.expiry(exptime.into()), flags.initial));
    // A vivified item is answered differently (no hit counted, `q` does not hide its HD), so learn
    // beforehand whether the item exists; only when `N` is given.
    let existed = vivify.is_none() || shard.store.peek(key.bytes(), now).is_some();
    let shown_exptime = exptime_before(shard, key, flags);
    let request = ArithRequest {
        key: key.bytes(),
        incr,
        delta: flags.delta,
        vivify,
        // memcached's incr/decr treats a zero CAS as "no CAS".
        compare_cas: flags.compare_cas.filter(|&cas| cas != 0),
        new_expiry: flags.ttl.map(|exptime| shard.expiry(exptime.into())),
        new_cas: None,
    };
    let counters = &shard.counters;
    match shard.store.arith(&request, now) {
        ArithResult::Value { value, cas, exptime } => {
            if existed {
                if incr {
                    counters.incr_hits.incr()
                } else {
                    counters.decr_hits.incr()
                }
                if flags.quiet {
                    return;
                }
            }
            let mut buf = [0u8; 20];
            let digits = decimal(value, &mut buf);
            if flags.value {
                out.extend_from_slice(b"VA ");
                push_u64(out, digits.len() as u64);
            } else {
                out.extend_from_slice(b"HD");
            }
            push_flags(out, flags, ShownKey::sent(key), |out, flag| match flag {
                b'c' => push_flag(out, b'c', if cas_enabled { cas } else { 0 }),
                b't' => push_ttl(out, shown_exptime.unwrap_or(exptime), now),
                _ => {}
            });
            if flags.value {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(digits);
            }
            out.extend_from_slice(b"\r\n");
        }
        ArithResult::NotFound => {
            if incr {
                counters.incr_misses.incr()
            } else {
                counters.decr_misses.incr()
            }
            push_status(out, b"NF", flags, key);
        }
        ArithResult::Exists => push_status(out, b"EX", flags, key),
        ArithResult::NonNumeric => {
            out.extend_from_slice(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")
        }
        ArithResult::OutOfMemory if !existed => {
            out.extend_from_slice(b"SERVER_ERROR Out of memory allocating new item\r\n")
        }
        ArithResult::OutOfMemory => out.extend_from_slice(b"SERVER_ERROR out of memory\r\n"),
    }
}

fn debug(shard: &mut Shard, key: &Key<'_>, out: &mut Vec<u8>) {
    let now = shard.now();
    let cas_enabled = shard.cas_enabled();
    let Some(item) = shard.store.peek(key.bytes(), now) else {
        out.extend_from_slice(b"EN\r\n");
        return;
    };
    out.extend_from_slice(b"ME ");
    push_key_text(out, ShownKey::stored(&item));
    // memcached prints `current_time - exptime` as a signed int: minus the remaining TTL.
    out.extend_from_slice(b" exp=");
    let exptime = item.exptime();
    push_i64(out, if exptime == 0 { -1 } else { i64::from(now.wrapping_sub(exptime) as i32) });
    out.extend_from_slice(b" la=");
    push_u64(out, now.wrapping_sub(item.last_access()).into());
    out.extend_from_slice(b" cas=");
    push_u64(out, if cas_enabled { item.cas() } else { 0 });
    out.extend_from_slice(if item.fetched() { b" fetch=yes" } else { b" fetch=no" });
    // No slab classes here: an item's class is its shard's (shard + 1, as `stats items` numbers them).
    out.extend_from_slice(b" cls=");
    push_u64(out, shard.id as u64 + 1);
    out.extend_from_slice(b" size=");
    push_u64(out, item.total_size() as u64);
    out.extend_from_slice(b"\r\n");
}
