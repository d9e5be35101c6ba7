//! Running keyed requests on the shard that owns their keys: the store call, the counters memcached
//! keeps for it, and the reply.
//!
//! Counting follows memcached 1.6.18: every storage command whose data arrived counts `cmd_set` (a bad
//! data chunk too; a value refused as too large or for memory does not); `cas` counts `cas_misses`,
//! `cas_hits` or `cas_badval`; `get`/`gets` count `cmd_get` and `get_hits`/`get_misses` per key, while
//! `gat`/`gats` count only `cmd_touch` and `touch_hits`/`touch_misses`, like `touch`.

use super::reply::{self, push};
use super::{Request, Retrieval, Storage, StorageCommand};
use crate::protocol::meta;
use crate::shard::Shard;
use crate::stats::CommandCounters;
use crate::store::{
    ArithRequest, ArithResult, DeleteRequest, DeleteResult, GetOptions, GetResult, ItemView, StoreMode, StoreRequest,
    StoreResult,
};

/// Runs a request routed to one key ([`crate::protocol::Route::Key`]).
pub fn execute(shard: &mut Shard, request: &Request<'_>, out: &mut Vec<u8>) {
    match request {
        Request::Storage(storage) => store(shard, storage, out),
        Request::BadDataChunk { noreply, .. } => {
            shard.counters.cmd_set.incr();
            push(out, reply::BAD_DATA_CHUNK, *noreply);
        }
        Request::Delete { key, noreply } => delete(shard, key, *noreply, out),
        Request::Arith { key, incr, delta, noreply } => arith(shard, key, *incr, *delta, *noreply, out),
        Request::Touch { key, exptime, noreply } => touch(shard, key, *exptime, *noreply, out),
        Request::Meta(request) => meta::execute(shard, request, out),
        Request::MetaDump => metadump(shard, out),
        Request::CacheDump { class, limit } => cachedump(shard, *class, *limit, out),
        other => debug_assert!(false, "not a keyed request: {other:?}"),
    }
}

fn store(shard: &mut Shard, request: &Storage<'_>, out: &mut Vec<u8>) {
    let now = shard.now();
    let (mode, compare_cas) = match request.command {
        StorageCommand::Set => (StoreMode::Set, None),
        StorageCommand::Add => (StoreMode::Add, None),
        StorageCommand::Replace => (StoreMode::Replace, None),
        StorageCommand::Append => (StoreMode::Append, None),
        StorageCommand::Prepend => (StoreMode::Prepend, None),
        StorageCommand::Cas { unique } => (StoreMode::Set, Some(unique)),
    };
    let counters = &shard.counters;
    if compare_cas.is_some() && !shard.cas_enabled() {
        // With -C memcached's items carry no CAS and `cas` never matches one, whatever the unique.
        counters.cmd_set.incr();
        let reply = if shard.store.peek(request.key, now).is_some() {
            counters.cas_badval.incr();
            reply::EXISTS
        } else {
            counters.cas_misses.incr();
            reply::NOT_FOUND
        };
        return push(out, reply, request.noreply);
    }
    let store_request = StoreRequest {
        key: request.key,
        value: request.value,
        client_flags: request.client_flags,
        expiry: shard.expiry(request.exptime.into()),
        mode,
        compare_cas,
        invalidate: false,
        new_cas: None,
        vivify_on_miss: None,
        key_binary: false,
    };
    let result = shard.store.store(&store_request, now);
    let is_cas = compare_cas.is_some();
    let reply = match result {
        StoreResult::Stored { .. } => {
            counters.cmd_set.incr();
            if is_cas {
                counters.cas_hits.incr();
            }
            reply::STORED
        }
        StoreResult::NotStored => {
            counters.cmd_set.incr();
            reply::NOT_STORED
        }
        StoreResult::Exists => {
            counters.cmd_set.incr();
            counters.cas_badval.incr();
            reply::EXISTS
        }
        StoreResult::NotFound => {
            counters.cmd_set.incr();
            if is_cas {
                counters.cas_misses.incr();
            }
            reply::NOT_FOUND
        }
        StoreResult::TooLarge | StoreResult::OutOfMemory => {
            if request.command == StorageCommand::Set {
                // memcached drops the old value of a `set` it could not store, rather than serve stale data.
                shard.store.delete(&plain_delete(request.key), now);
            }
            if result == StoreResult::TooLarge {
                reply::TOO_LARGE
            } else {
                reply::OUT_OF_MEMORY_STORING
            }
        }
    };
    push(out, reply, request.noreply);
}

/// Runs key `index` of a retrieval: its `VALUE` block on a hit, nothing on a miss.
pub fn retrieve(shard: &mut Shard, request: &Retrieval<'_>, index: usize, out: &mut Vec<u8>) {
    let key = request.keys.get(index);
    let now = shard.now();
    let touch = request.command.exptime().map(|exptime| shard.expiry(exptime.into()));
    let cas_enabled = shard.cas_enabled();
    let counters = &shard.counters;
    let options = GetOptions { touch, ..GetOptions::default() };
    match shard.store.get(key, options, now) {
        GetResult::Hit(hit) => {
            count_read(counters, touch.is_some(), true);
            let item = &hit.item;
            let cas = request.command.returns_cas().then(|| if cas_enabled { item.cas() } else { 0 });
            reply::push_value_header(out, item.key(), item.client_flags(), item.value_len(), cas);
            item.copy_value_into(out);
            out.extend_from_slice(b"\r\n");
        }
        GetResult::Miss => count_read(counters, touch.is_some(), false),
    }
}

/// A read counts as memcached counts it: a touch (`touch`, `gat`, `gats`) or a get, a hit or a miss.
fn count_read(counters: &CommandCounters, touch: bool, hit: bool) {
    let (commands, outcome) = match (touch, hit) {
        (true, true) => (&counters.cmd_touch, &counters.touch_hits),
        (true, false) => (&counters.cmd_touch, &counters.touch_misses),
        (false, true) => (&counters.cmd_get, &counters.get_hits),
        (false, false) => (&counters.cmd_get, &counters.get_misses),
    };
    commands.incr();
    outcome.incr();
}

fn plain_delete(key: &[u8]) -> DeleteRequest<'_> {
    DeleteRequest { key, compare_cas: None, invalidate: false, new_expiry: None, new_cas: None }
}

fn delete(shard: &mut Shard, key: &[u8], noreply: bool, out: &mut Vec<u8>) {
    let now = shard.now();
    let reply = match shard.store.delete(&plain_delete(key), now) {
        DeleteResult::Deleted => {
            shard.counters.delete_hits.incr();
            reply::DELETED
        }
        DeleteResult::NotFound => {
            shard.counters.delete_misses.incr();
            reply::NOT_FOUND
        }
        // Only a compare CAS gives Exists, and text delete has none.
        DeleteResult::Exists => reply::EXISTS,
    };
    push(out, reply, noreply);
}

fn arith(shard: &mut Shard, key: &[u8], incr: bool, delta: u64, noreply: bool, out: &mut Vec<u8>) {
    let now = shard.now();
    let request = ArithRequest { key, incr, delta, vivify: None, compare_cas: None, new_expiry: None, new_cas: None };
    let counters = &shard.counters;
    let (hits, misses) =
        if incr { (&counters.incr_hits, &counters.incr_misses) } else { (&counters.decr_hits, &counters.decr_misses) };
    match shard.store.arith(&request, now) {
        ArithResult::Value { value, .. } => {
            hits.incr();
            if !noreply {
                reply::push_decimal(out, value);
                out.extend_from_slice(b"\r\n");
            }
        }
        ArithResult::NotFound => {
            misses.incr();
            push(out, reply::NOT_FOUND, noreply);
        }
        ArithResult::NonNumeric => push(out, reply::NON_NUMERIC, noreply),
        ArithResult::OutOfMemory => push(out, reply::OUT_OF_MEMORY, noreply),
        // Only a compare CAS gives Exists, and text incr/decr has none.
        ArithResult::Exists => push(out, reply::EXISTS, noreply),
    }
}

fn touch(shard: &mut Shard, key: &[u8], exptime: i32, noreply: bool, out: &mut Vec<u8>) {
    let now = shard.now();
    let options = GetOptions { touch: Some(shard.expiry(exptime.into())), ..GetOptions::default() };
    let hit = matches!(shard.store.get(key, options, now), GetResult::Hit(_));
    count_read(&shard.counters, true, hit);
    push(out, if hit { reply::TOUCHED } else { reply::NOT_FOUND }, noreply);
}

/// memcached's buffer for a `stats cachedump` reply: 2 MiB.
const CACHEDUMP_MAX_BYTES: usize = 2 << 20;

/// `stats cachedump <class> <limit>` on the shard whose class it is (class = shard + 1; another class is
/// empty): `ITEM <key> [<value bytes> b; <exptime as unix time, 0 never> s]` per live item, oldest
/// first, up to `limit` (0: no limit) and to a reply of 2 MiB, as memcached 1.6.18 writes them. Keys
/// stored base64-encoded (meta `b`) are skipped, as memcached skips binary keys. Without `END`.
fn cachedump(shard: &mut Shard, class: u32, limit: u32, out: &mut Vec<u8>) {
    use std::io::Write;
    use std::ops::ControlFlow;
    if class as usize != shard.id + 1 {
        return;
    }
    let clock = crate::clock::Clock::global();
    let start = out.len();
    let mut shown = 0;
    shard.store.for_each_live_oldest_first(shard.now(), |item| {
        if limit != 0 && shown >= limit {
            return ControlFlow::Break(());
        }
        if item.key_binary() {
            return ControlFlow::Continue(());
        }
        let line = out.len();
        let exptime = if item.exptime() == 0 { 0 } else { clock.to_unix(item.exptime()) };
        out.extend_from_slice(b"ITEM ");
        out.extend_from_slice(item.key());
        let _ = write!(out, " [{} b; {exptime} s]\r\n", item.value_len());
        // memcached keeps a byte of its buffer for a NUL after `END\r\n`.
        if out.len() - start + reply::END.len() + 1 > CACHEDUMP_MAX_BYTES {
            out.truncate(line);
            return ControlFlow::Break(());
        }
        shown += 1;
        ControlFlow::Continue(())
    });
}

/// This shard's lines of `lru_crawler metadump`, in memcached 1.6.18's format:
/// `key=<uri-encoded> exp=<unix|-1> la=<unix> cas=<cas> fetch=<yes|no> cls=<shard + 1> size=<bytes>`.
fn metadump(shard: &mut Shard, out: &mut Vec<u8>) {
    use crate::store::ItemDebug;
    use std::io::Write;
    let clock = crate::clock::Clock::global();
    shard.store.for_each_live(shard.now(), |item| {
        out.extend_from_slice(b"key=");
        for &b in item.key() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(b);
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
        let exp = if item.exptime() == 0 { -1 } else { clock.to_unix(item.exptime()) as i64 };
        let fetch = if item.fetched() { "yes" } else { "no" };
        let _ = writeln!(
            out,
            " exp={exp} la={} cas={} fetch={fetch} cls={} size={}",
            clock.to_unix(item.last_access()),
            item.cas(),
            shard.id + 1,
            item.total_size()
        );
    });
}
