//! Running a key request on the shard that owns its key: memcached 1.6.18's binary semantics
//! (`process_bin_get_or_touch`, `process_bin_update`, `complete_update_bin`, `process_bin_delete`,
//! `complete_incr_bin`) over the store API, with the counters memcached bumps for each.
//!
//! What a client sees, beyond the obvious:
//! - A SET, ADD or REPLACE carrying a CAS is a compare-and-swap whatever its opcode (ADD with a
//!   matching CAS replaces). APPEND and PREPEND compare too but a missing item is "Not stored.", and
//!   they bump no `cas_*` counter. With `-C` items have no CAS: storage commands ignore the field,
//!   DELETE and INCREMENT compare it with 0 and so refuse any existing item.
//! - TOUCH and the GAT family count as touches (`cmd_touch`, `touch_hits`/`touch_misses`), never
//!   as gets.
//! - An increment that creates its missing item counts neither a hit nor a miss.
//! - A SET the store cannot take (too large, out of memory) drops the item it would have replaced.
//!
//! Quiet opcodes write nothing on success, and GETQ/GETKQ/GATQ/GATKQ nothing on a miss.
//! The hot paths write into the caller's buffer and allocate nothing themselves.

use super::request::{Extras, Request};
use super::response::{body_len, write_header, write_ok, write_status, write_text};
use super::wire::{
    Family, Status, StoreKind, ARITH_NO_CREATE, OOM_ALLOCATING_ITEM, OOM_ALLOCATING_NEW_ITEM,
    OOM_INCREMENTING,
};
use crate::shard::Shard;
use crate::store::{
    ArithRequest, ArithResult, DeleteRequest, DeleteResult, GetOptions, GetResult, ItemView,
    StoreMode, StoreRequest, StoreResult,
};

/// Runs a request routed to its key's shard ([`crate::protocol::Route::Key`]) and appends the
/// response, if any, to `out`.
pub fn execute(shard: &mut Shard, request: &Request<'_>, out: &mut Vec<u8>) {
    match request.opcode.family() {
        Family::Get { with_key } => retrieve(shard, request, None, with_key, out),
        Family::Touch => retrieve(shard, request, Some(exptime_of(request)), false, out),
        Family::Gat { with_key } => {
            retrieve(shard, request, Some(exptime_of(request)), with_key, out)
        }
        Family::Store(kind) => store(shard, request, kind, out),
        Family::Concat { append } => concat(shard, request, append, out),
        Family::Delete => delete(shard, request, out),
        Family::Arith { incr } => arith(shard, request, incr, out),
        // Routed to the connection or the server, never here; answer rather than panic.
        Family::Quit | Family::Flush | Family::Noop | Family::Version | Family::Stat => {
            write_status(out, request.echo(), Status::UnknownCommand)
        }
    }
}

/// The new expiration of a TOUCH or GAT.
fn exptime_of(request: &Request<'_>) -> u32 {
    match request.extras {
        Extras::Exptime(exptime) => exptime,
        _ => 0,
    }
}

/// GET, GETK, TOUCH, GAT, GATK and their quiet forms (`touch`: the new expiration).
fn retrieve(
    shard: &mut Shard,
    request: &Request<'_>,
    touch: Option<u32>,
    with_key: bool,
    out: &mut Vec<u8>,
) {
    let now = shard.now();
    let cas_enabled = shard.cas_enabled();
    let options = GetOptions {
        touch: touch.map(|exptime| shard.expiry(i64::from(exptime))),
        ..GetOptions::default()
    };
    // TOUCH answers with the flags alone.
    let with_value = request.opcode.family() != Family::Touch;
    let counters = &shard.counters;
    match shard.store.get(request.key, options, now) {
        GetResult::Hit(hit) => {
            if touch.is_some() {
                counters.cmd_touch.incr();
                counters.touch_hits.incr();
            } else {
                counters.cmd_get.incr();
                counters.get_hits.incr();
            }
            let item = &hit.item;
            let key: &[u8] = if with_key { request.key } else { &[] };
            let value_len = if with_value { item.value_len() } else { 0 };
            let cas = if cas_enabled { item.cas() } else { 0 };
            let body = body_len(4 + key.len() + value_len);
            write_header(
                out,
                request.echo(),
                Status::Ok,
                cas,
                4,
                key.len() as u16,
                body,
            );
            out.extend_from_slice(&item.client_flags().to_be_bytes());
            out.extend_from_slice(key);
            if with_value {
                item.copy_value_into(out);
            }
        }
        GetResult::Miss => {
            if touch.is_some() {
                counters.cmd_touch.incr();
                counters.touch_misses.incr();
            } else {
                counters.cmd_get.incr();
                counters.get_misses.incr();
            }
            if request.opcode.is_quiet() {
            } else if with_key {
                // GETK and GATK misses carry the key instead of the text.
                let key_len = request.key.len() as u16;
                write_header(
                    out,
                    request.echo(),
                    Status::KeyNotFound,
                    0,
                    0,
                    key_len,
                    body_len(request.key.len()),
                );
                out.extend_from_slice(request.key);
            } else {
                write_status(out, request.echo(), Status::KeyNotFound);
            }
        }
    }
}

/// SET, ADD, REPLACE and their quiet forms.
fn store(shard: &mut Shard, request: &Request<'_>, kind: StoreKind, out: &mut Vec<u8>) {
    let (flags, exptime) = match request.extras {
        Extras::Store { flags, exptime } => (flags, exptime),
        _ => (0, 0),
    };
    let now = shard.now();
    // memcached makes any of the three a compare-and-swap when the request carries a CAS.
    let compare_cas = compare_cas(shard, request);
    let mode = match (kind, compare_cas) {
        (_, Some(_)) | (StoreKind::Set, None) => StoreMode::Set,
        (StoreKind::Add, None) => StoreMode::Add,
        (StoreKind::Replace, None) => StoreMode::Replace,
    };
    let store_request = StoreRequest {
        key: request.key,
        value: request.value,
        client_flags: flags,
        expiry: shard.expiry(i64::from(exptime)),
        mode,
        compare_cas,
        invalidate: false,
        new_cas: None,
        vivify_on_miss: None,
        key_binary: false,
    };
    let result = shard.store.store(&store_request, now);
    let counters = &shard.counters;
    if !matches!(result, StoreResult::TooLarge | StoreResult::OutOfMemory) {
        // memcached counts the set once the value has a place, whatever the outcome.
        counters.cmd_set.incr();
    }
    if compare_cas.is_some() {
        match result {
            StoreResult::Stored { .. } => counters.cas_hits.incr(),
            StoreResult::Exists => counters.cas_badval.incr(),
            StoreResult::NotFound => counters.cas_misses.incr(),
            _ => {}
        }
    }
    let echo = request.echo();
    match result {
        StoreResult::Stored { cas } => write_success(out, request, shown_cas(shard, cas)),
        StoreResult::Exists => write_status(out, echo, Status::KeyExists),
        StoreResult::NotFound => write_status(out, echo, Status::KeyNotFound),
        StoreResult::NotStored => {
            let status = match mode {
                StoreMode::Add => Status::KeyExists,
                StoreMode::Replace => Status::KeyNotFound,
                _ => Status::NotStored,
            };
            write_status(out, echo, status);
        }
        StoreResult::TooLarge | StoreResult::OutOfMemory => {
            // memcached fails to allocate before storing; a SET then unlinks the old item so that no
            // stale value outlives the failed write.
            if kind == StoreKind::Set {
                shard.store.delete(&plain_delete(request.key), now);
            }
            if result == StoreResult::TooLarge {
                write_status(out, echo, Status::TooLarge);
            } else {
                write_text(out, echo, Status::OutOfMemory, OOM_ALLOCATING_ITEM);
            }
        }
    }
}

/// APPEND, PREPEND and their quiet forms.
fn concat(shard: &mut Shard, request: &Request<'_>, append: bool, out: &mut Vec<u8>) {
    let now = shard.now();
    let store_request = StoreRequest {
        key: request.key,
        value: request.value,
        client_flags: 0,
        expiry: shard.expiry(0),
        mode: if append {
            StoreMode::Append
        } else {
            StoreMode::Prepend
        },
        compare_cas: compare_cas(shard, request),
        invalidate: false,
        new_cas: None,
        vivify_on_miss: None,
        key_binary: false,
    };
    let result = shard.store.store(&store_request, now);
    if result != StoreResult::OutOfMemory {
        shard.counters.cmd_set.incr();
    }
    let echo = request.echo();
    match result {
        StoreResult::Stored { cas } => write_success(out, request, shown_cas(shard, cas)),
        StoreResult::Exists => write_status(out, echo, Status::KeyExists),
        // A missing item, with or without a CAS, and a joined value over the limit: "Not stored.".
        StoreResult::NotFound | StoreResult::NotStored | StoreResult::TooLarge => {
            write_status(out, echo, Status::NotStored)
        }
        StoreResult::OutOfMemory => write_text(out, echo, Status::OutOfMemory, OOM_ALLOCATING_ITEM),
    }
}

/// The CAS a request asks to compare with: none for 0, none with `-C` (see
/// [`cas_mismatch_without_cas`] for the commands that compare even then).
fn compare_cas(shard: &Shard, request: &Request<'_>) -> Option<u64> {
    (shard.cas_enabled() && request.cas != 0).then_some(request.cas)
}

/// A CAS as responses show it: 0 with `-C`.
fn shown_cas(shard: &Shard, cas: u64) -> u64 {
    if shard.cas_enabled() {
        cas
    } else {
        0
    }
}

/// The empty success of a storage command or delete, unless the opcode is quiet.
fn write_success(out: &mut Vec<u8>, request: &Request<'_>, cas: u64) {
    if !request.opcode.is_quiet() {
        write_ok(out, request.echo(), cas);
    }
}

/// A delete with no conditions.
fn plain_delete(key: &[u8]) -> DeleteRequest<'_> {
    DeleteRequest {
        key,
        compare_cas: None,
        invalidate: false,
        new_expiry: None,
        new_cas: None,
    }
}

/// With `-C`, memcached compares a request's CAS with the item's, which is always 0: any existing
/// item is a mismatch. True when that applies to `request`.
fn cas_mismatch_without_cas(shard: &Shard, request: &Request<'_>) -> bool {
    !shard.cas_enabled() && request.cas != 0 && shard.store.peek(request.key, shard.now()).is_some()
}

/// DELETE and DELETEQ.
fn delete(shard: &mut Shard, request: &Request<'_>, out: &mut Vec<u8>) {
    let echo = request.echo();
    if cas_mismatch_without_cas(shard, request) {
        return write_status(out, echo, Status::KeyExists);
    }
    let now = shard.now();
    let delete_request = DeleteRequest {
        compare_cas: compare_cas(shard, request),
        ..plain_delete(request.key)
    };
    match shard.store.delete(&delete_request, now) {
        DeleteResult::Deleted => {
            shard.counters.delete_hits.incr();
            write_success(out, request, 0);
        }
        DeleteResult::NotFound => {
            shard.counters.delete_misses.incr();
            write_status(out, echo, Status::KeyNotFound);
        }
        // A CAS mismatch counts neither a hit nor a miss.
        DeleteResult::Exists => write_status(out, echo, Status::KeyExists),
    }
}

/// INCREMENT, DECREMENT and their quiet forms.
fn arith(shard: &mut Shard, request: &Request<'_>, incr: bool, out: &mut Vec<u8>) {
    let (delta, initial, exptime) = match request.extras {
        Extras::Arith {
            delta,
            initial,
            exptime,
        } => (delta, initial, exptime),
        _ => (0, 0, ARITH_NO_CREATE),
    };
    let echo = request.echo();
    if cas_mismatch_without_cas(shard, request) {
        return write_status(out, echo, Status::KeyExists);
    }
    let now = shard.now();
    let arith_request = ArithRequest {
        key: request.key,
        incr,
        delta,
        // A miss is handled below, as memcached does: a plain add of the initial value.
        vivify: None,
        compare_cas: compare_cas(shard, request),
        new_expiry: None,
        new_cas: None,
    };
    let counters = &shard.counters;
    match shard.store.arith(&arith_request, now) {
        ArithResult::Value { value, cas, .. } => {
            if incr {
                counters.incr_hits.incr();
            } else {
                counters.decr_hits.incr();
            }
            if !request.opcode.is_quiet() {
                write_number(out, request, value, shown_cas(shard, cas));
            }
        }
        ArithResult::NonNumeric => write_status(out, echo, Status::NonNumeric),
        ArithResult::Exists => write_status(out, echo, Status::KeyExists),
        ArithResult::OutOfMemory => write_text(out, echo, Status::OutOfMemory, OOM_INCREMENTING),
        ArithResult::NotFound if exptime == ARITH_NO_CREATE => {
            if incr {
                counters.incr_misses.incr();
            } else {
                counters.decr_misses.incr();
            }
            write_status(out, echo, Status::KeyNotFound);
        }
        ArithResult::NotFound => {
            // Create the item holding the initial value in decimal, flags 0 (no counter bumped).
            let mut digits = [0u8; 20];
            let create = StoreRequest {
                key: request.key,
                value: decimal(initial, &mut digits),
                client_flags: 0,
                expiry: shard.expiry(i64::from(exptime)),
                mode: StoreMode::Add,
                compare_cas: None,
                invalidate: false,
                new_cas: None,
                vivify_on_miss: None,
                key_binary: false,
            };
            match shard.store.store(&create, now) {
                StoreResult::Stored { cas } => {
                    if !request.opcode.is_quiet() {
                        write_number(out, request, initial, shown_cas(shard, cas));
                    }
                }
                StoreResult::TooLarge | StoreResult::OutOfMemory => {
                    write_text(out, echo, Status::OutOfMemory, OOM_ALLOCATING_NEW_ITEM)
                }
                StoreResult::NotStored | StoreResult::Exists | StoreResult::NotFound => {
                    write_status(out, echo, Status::NotStored)
                }
            }
        }
    }
}

/// The answer to an increment or decrement: the new value, 8 bytes big-endian.
fn write_number(out: &mut Vec<u8>, request: &Request<'_>, value: u64, cas: u64) {
    write_header(out, request.echo(), Status::Ok, cas, 0, 0, 8);
    out.extend_from_slice(&value.to_be_bytes());
}

/// `value` in decimal ASCII, written into `digits` (20 digits hold any u64).
fn decimal(mut value: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &digits[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::protocol::binary::response::{decode_all, Response};
    use crate::protocol::binary::wire::Opcode;
    use crate::store::{Store, StoreConfig};
    use std::sync::Arc;

    #[test]
    fn decimal_formats_like_printf_llu() {
        let mut digits = [0u8; 20];
        assert_eq!(decimal(0, &mut digits), b"0");
        assert_eq!(decimal(5, &mut digits), b"5");
        assert_eq!(decimal(1234567890, &mut digits), b"1234567890");
        assert_eq!(decimal(u64::MAX, &mut digits), b"18446744073709551615");
    }

    const OPAQUE: u32 = 0x0102_0304;

    fn shard_with(configure: impl FnOnce(&mut Settings)) -> Shard {
        let mut settings = Settings::default();
        configure(&mut settings);
        let store = Store::new(StoreConfig {
            memory_bytes: 16 << 20,
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
        shard_with(|_| {})
    }

    /// Runs a request; the decoded responses, owned.
    fn run(
        shard: &mut Shard,
        opcode: Opcode,
        extras: Extras,
        key: &[u8],
        value: &[u8],
        cas: u64,
    ) -> Vec<Owned> {
        let request = Request {
            opcode,
            opaque: OPAQUE,
            cas,
            extras,
            key,
            value,
        };
        let mut out = Vec::new();
        execute(shard, &request, &mut out);
        decode_all(&out).into_iter().map(Owned::from).collect()
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        opcode: u8,
        status: u16,
        cas: u64,
        extras: Vec<u8>,
        key: Vec<u8>,
        value: Vec<u8>,
    }

    impl From<Response<'_>> for Owned {
        fn from(r: Response<'_>) -> Owned {
            assert_eq!(r.opaque, OPAQUE);
            Owned {
                opcode: r.opcode,
                status: r.status,
                cas: r.cas,
                extras: r.extras.into(),
                key: r.key.into(),
                value: r.value.into(),
            }
        }
    }

    fn set(shard: &mut Shard, key: &[u8], value: &[u8], flags: u32) -> u64 {
        let r = run(
            shard,
            Opcode::Set,
            Extras::Store { flags, exptime: 0 },
            key,
            value,
            0,
        );
        assert_eq!(r[0].status, 0);
        r[0].cas
    }

    fn get(shard: &mut Shard, key: &[u8]) -> Owned {
        run(shard, Opcode::Get, Extras::None, key, b"", 0).remove(0)
    }

    fn status_of(responses: &[Owned]) -> (u16, &[u8]) {
        assert_eq!(responses.len(), 1, "{responses:?}");
        (responses[0].status, &responses[0].value[..])
    }

    /// The named counters of `shard`, in the order asked.
    fn counters<const N: usize>(shard: &Shard, names: [&str; N]) -> [u64; N] {
        let mut values = [u64::MAX; N];
        shard.counters.for_each(|name, value| {
            if let Some(at) = names.iter().position(|n| *n == name) {
                values[at] = value;
            }
        });
        values
    }

    #[test]
    fn get_family_hits_and_misses() {
        let mut shard = shard();
        let cas = set(&mut shard, b"k1", b"hello", 0xcafe);
        assert_ne!(cas, 0);
        let hit = get(&mut shard, b"k1");
        assert_eq!(
            hit,
            Owned {
                opcode: 0,
                status: 0,
                cas,
                extras: vec![0, 0, 0xca, 0xfe],
                key: vec![],
                value: b"hello".to_vec()
            }
        );
        let getk = run(&mut shard, Opcode::GetK, Extras::None, b"k1", b"", 0);
        assert_eq!(
            (getk[0].opcode, &getk[0].key[..], &getk[0].value[..]),
            (0x0c, &b"k1"[..], &b"hello"[..])
        );
        let getq = run(&mut shard, Opcode::GetQ, Extras::None, b"k1", b"", 0);
        assert_eq!((getq[0].opcode, &getq[0].value[..]), (0x09, &b"hello"[..]));
        let getkq = run(&mut shard, Opcode::GetKQ, Extras::None, b"k1", b"", 0);
        assert_eq!((getkq[0].opcode, &getkq[0].key[..]), (0x0d, &b"k1"[..]));

        assert_eq!(
            status_of(&[get(&mut shard, b"nokey")]),
            (1, &b"Not found"[..])
        );
        let getk_miss = run(&mut shard, Opcode::GetK, Extras::None, b"nokey", b"", 0);
        assert_eq!(
            getk_miss,
            [Owned {
                opcode: 0x0c,
                status: 1,
                cas: 0,
                extras: vec![],
                key: b"nokey".to_vec(),
                value: vec![]
            }]
        );
        assert!(run(&mut shard, Opcode::GetQ, Extras::None, b"nokey", b"", 0).is_empty());
        assert!(run(&mut shard, Opcode::GetKQ, Extras::None, b"nokey", b"", 0).is_empty());

        assert_eq!(
            counters(&shard, ["cmd_get", "get_hits", "get_misses", "cmd_touch"]),
            [8, 4, 4, 0]
        );
    }

    #[test]
    fn touch_and_gat_count_as_touches() {
        let mut shard = shard();
        let cas = set(&mut shard, b"t1", b"tv", 9);
        let touch = run(
            &mut shard,
            Opcode::Touch,
            Extras::Exptime(100),
            b"t1",
            b"",
            0,
        );
        assert_eq!(
            touch,
            [Owned {
                opcode: 0x1c,
                status: 0,
                cas,
                extras: vec![0, 0, 0, 9],
                key: vec![],
                value: vec![]
            }]
        );
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::Touch,
                Extras::Exptime(100),
                b"tm",
                b"",
                0
            )),
            (1, &b"Not found"[..])
        );
        let gat = run(&mut shard, Opcode::Gat, Extras::Exptime(100), b"t1", b"", 0);
        assert_eq!(
            (gat[0].status, &gat[0].extras[..], &gat[0].value[..]),
            (0, &[0, 0, 0, 9][..], &b"tv"[..])
        );
        let gatk = run(
            &mut shard,
            Opcode::GatK,
            Extras::Exptime(100),
            b"t1",
            b"",
            0,
        );
        assert_eq!(&gatk[0].key[..], b"t1");
        let gatk_miss = run(
            &mut shard,
            Opcode::GatK,
            Extras::Exptime(100),
            b"tm",
            b"",
            0,
        );
        assert_eq!(
            (
                gatk_miss[0].status,
                &gatk_miss[0].key[..],
                &gatk_miss[0].value[..]
            ),
            (1, &b"tm"[..], &b""[..])
        );
        assert_eq!(
            run(
                &mut shard,
                Opcode::GatQ,
                Extras::Exptime(100),
                b"t1",
                b"",
                0
            )
            .len(),
            1
        );
        assert!(run(
            &mut shard,
            Opcode::GatQ,
            Extras::Exptime(100),
            b"tm",
            b"",
            0
        )
        .is_empty());
        assert!(run(
            &mut shard,
            Opcode::GatKQ,
            Extras::Exptime(100),
            b"tm",
            b"",
            0
        )
        .is_empty());

        assert_eq!(
            counters(
                &shard,
                ["cmd_touch", "touch_hits", "touch_misses", "cmd_get"]
            ),
            [8, 4, 4, 0]
        );
    }

    #[test]
    fn storage_commands() {
        let mut shard = shard();
        let store = Extras::Store {
            flags: 1,
            exptime: 0,
        };
        set(&mut shard, b"k1", b"v1", 0);
        assert!(run(&mut shard, Opcode::SetQ, store, b"k1", b"v2", 0).is_empty());
        // Errors are sent whether the opcode is quiet or not.
        let refusals = [
            (Opcode::Add, store, &b"k1"[..], Status::KeyExists),
            (Opcode::AddQ, store, b"k1", Status::KeyExists),
            (Opcode::Replace, store, b"nokey", Status::KeyNotFound),
            (Opcode::ReplaceQ, store, b"nokey", Status::KeyNotFound),
            (Opcode::Append, Extras::None, b"nokey", Status::NotStored),
            (Opcode::PrependQ, Extras::None, b"nokey", Status::NotStored),
        ];
        for (opcode, extras, key, status) in refusals {
            let response = run(&mut shard, opcode, extras, key, b"v", 0);
            assert_eq!(
                status_of(&response),
                (status.code(), status.message()),
                "{opcode:?}"
            );
        }
        assert_eq!(
            run(&mut shard, Opcode::Append, Extras::None, b"k1", b"A", 0)[0].status,
            0
        );
        assert!(run(&mut shard, Opcode::PrependQ, Extras::None, b"k1", b"P", 0).is_empty());
        let got = get(&mut shard, b"k1");
        assert_eq!(
            (&got.value[..], &got.extras[..]),
            (&b"Pv2A"[..], &[0, 0, 0, 1][..])
        );
        assert_eq!(counters(&shard, ["cmd_set"]), [10]);
    }

    #[test]
    fn cas_on_storage_commands() {
        let mut shard = shard();
        let store = Extras::Store {
            flags: 7,
            exptime: 0,
        };
        let cas = set(&mut shard, b"c1", b"one", 0);
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Set, store, b"c1", b"x", cas + 100)).0,
            2
        );
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Set, store, b"cmiss", b"x", 5)).0,
            1
        );
        let stored = run(&mut shard, Opcode::Set, store, b"c1", b"two", cas);
        assert!(stored[0].status == 0 && stored[0].cas != cas);
        // ADD with a matching CAS replaces; ADD and REPLACE with a CAS on a missing key: not found.
        let cas = get(&mut shard, b"c1").cas;
        assert_eq!(
            run(&mut shard, Opcode::Add, store, b"c1", b"three", cas)[0].status,
            0
        );
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Add, store, b"cmiss", b"x", cas)).0,
            1
        );
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::Replace,
                store,
                b"cmiss",
                b"x",
                cas
            ))
            .0,
            1
        );
        assert_eq!(
            counters(&shard, ["cas_hits", "cas_badval", "cas_misses"]),
            [2, 1, 3]
        );
        // APPEND with a CAS: mismatch exists, missing is not stored, no cas_* counter.
        let cas = get(&mut shard, b"c1").cas;
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::Append,
                Extras::None,
                b"c1",
                b"A",
                cas + 1
            ))
            .0,
            2
        );
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::Append,
                Extras::None,
                b"cmiss",
                b"A",
                cas
            ))
            .0,
            5
        );
        assert_eq!(
            run(&mut shard, Opcode::Append, Extras::None, b"c1", b"A", cas)[0].status,
            0
        );
        assert_eq!(
            counters(&shard, ["cas_hits", "cas_badval", "cas_misses"]),
            [2, 1, 3]
        );
        assert_eq!(get(&mut shard, b"c1").value, b"threeA");
    }

    #[test]
    fn delete_with_and_without_cas() {
        let mut shard = shard();
        let cas = set(&mut shard, b"d", b"v", 0);
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::Delete,
                Extras::None,
                b"d",
                b"",
                cas + 1
            ))
            .0,
            2
        );
        let deleted = run(&mut shard, Opcode::Delete, Extras::None, b"d", b"", cas);
        assert_eq!(
            deleted,
            [Owned {
                opcode: 4,
                status: 0,
                cas: 0,
                extras: vec![],
                key: vec![],
                value: vec![]
            }]
        );
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Delete, Extras::None, b"d", b"", 0)),
            (1, &b"Not found"[..])
        );
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::DeleteQ,
                Extras::None,
                b"d",
                b"",
                0
            ))
            .0,
            1
        );
        set(&mut shard, b"d", b"v", 0);
        assert!(run(&mut shard, Opcode::DeleteQ, Extras::None, b"d", b"", 0).is_empty());
        assert_eq!(counters(&shard, ["delete_hits", "delete_misses"]), [2, 2]);
    }

    #[test]
    fn increment_and_decrement() {
        let mut shard = shard();
        let arith = |delta, initial, exptime| Extras::Arith {
            delta,
            initial,
            exptime,
        };
        let miss = run(
            &mut shard,
            Opcode::Increment,
            arith(1, 5, ARITH_NO_CREATE),
            b"n",
            b"",
            0,
        );
        assert_eq!(status_of(&miss), (1, &b"Not found"[..]));
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::DecrementQ,
                arith(1, 5, ARITH_NO_CREATE),
                b"n",
                b"",
                0
            ))
            .0,
            1
        );
        let created = run(&mut shard, Opcode::Increment, arith(1, 5, 0), b"n", b"", 0);
        assert_eq!(
            (created[0].status, &created[0].value[..]),
            (0, &5u64.to_be_bytes()[..])
        );
        assert!(created[0].cas != 0);
        let got = get(&mut shard, b"n");
        assert_eq!(
            (&got.value[..], &got.extras[..]),
            (&b"5"[..], &[0, 0, 0, 0][..])
        );
        assert_eq!(
            run(&mut shard, Opcode::Increment, arith(10, 5, 0), b"n", b"", 0)[0].value,
            15u64.to_be_bytes()
        );
        assert_eq!(
            run(
                &mut shard,
                Opcode::Decrement,
                arith(100, 5, 0),
                b"n",
                b"",
                0
            )[0]
            .value,
            0u64.to_be_bytes()
        );
        assert!(run(
            &mut shard,
            Opcode::IncrementQ,
            arith(100, 5, 0),
            b"n",
            b"",
            0
        )
        .is_empty());
        let cas = get(&mut shard, b"n").cas;
        assert_eq!(
            status_of(&run(
                &mut shard,
                Opcode::Increment,
                arith(1, 5, 0),
                b"n",
                b"",
                cas + 1
            ))
            .0,
            2
        );
        assert_eq!(
            run(
                &mut shard,
                Opcode::Increment,
                arith(1, 5, 0),
                b"n",
                b"",
                cas
            )[0]
            .value,
            101u64.to_be_bytes()
        );
        // A CAS on a missing key still creates it.
        assert_eq!(
            run(
                &mut shard,
                Opcode::Increment,
                arith(1, 7, 0),
                b"n3",
                b"",
                cas
            )[0]
            .value,
            7u64.to_be_bytes()
        );
        set(&mut shard, b"nn", b"abc", 0);
        let non_numeric = run(&mut shard, Opcode::Increment, arith(1, 5, 0), b"nn", b"", 0);
        assert_eq!(
            status_of(&non_numeric),
            (6, &b"Non-numeric server-side value for incr or decr"[..])
        );
        set(&mut shard, b"big", b"18446744073709551615", 0);
        assert_eq!(
            run(
                &mut shard,
                Opcode::Increment,
                arith(2, 0, 0),
                b"big",
                b"",
                0
            )[0]
            .value,
            1u64.to_be_bytes()
        );
        // Creation counts neither hit nor miss.
        assert_eq!(counters(&shard, ["incr_hits", "incr_misses"]), [4, 1]);
        assert_eq!(counters(&shard, ["decr_hits", "decr_misses"]), [1, 1]);
    }

    #[test]
    fn without_cas_responses_carry_zero_and_compares_fail() {
        let mut shard = shard_with(|settings| settings.cas_enabled = false);
        let store = Extras::Store {
            flags: 1,
            exptime: 0,
        };
        assert_eq!(set(&mut shard, b"c", b"5", 1), 0);
        assert_eq!(get(&mut shard, b"c").cas, 0);
        // The set family ignores the field (ADD stays an add).
        assert_eq!(
            run(&mut shard, Opcode::Set, store, b"c", b"5", 1)[0].status,
            0
        );
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Add, store, b"c", b"5", 1)).0,
            2
        );
        assert_eq!(
            run(&mut shard, Opcode::Append, Extras::None, b"c", b"1", 99)[0].status,
            0
        );
        // DELETE and INCREMENT compare with 0.
        let arith = Extras::Arith {
            delta: 1,
            initial: 0,
            exptime: 0,
        };
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Increment, arith, b"c", b"", 5)).0,
            2
        );
        assert_eq!(
            status_of(&run(&mut shard, Opcode::Delete, Extras::None, b"c", b"", 5)).0,
            2
        );
        assert_eq!(get(&mut shard, b"c").value, b"51");
        let incr = run(&mut shard, Opcode::Increment, arith, b"c", b"", 0);
        assert_eq!(
            (incr[0].value.clone(), incr[0].cas),
            (52u64.to_be_bytes().to_vec(), 0)
        );
    }

    #[test]
    fn set_too_large_for_the_store_drops_the_old_item() {
        let mut shard = shard();
        set(&mut shard, b"big", b"old", 0);
        let value = vec![b'v'; shard.settings.item_size_max];
        let store = Extras::Store {
            flags: 0,
            exptime: 0,
        };
        let response = run(&mut shard, Opcode::SetQ, store, b"big", &value, 0);
        // Whether a value of exactly -I fits is the store's call (memcached counts its header too).
        if response.is_empty() {
            return;
        }
        assert_eq!(status_of(&response), (3, &b"Too large."[..]));
        assert_eq!(get(&mut shard, b"big").status, 1);
    }
}
