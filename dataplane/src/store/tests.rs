//! Behaviour tests of the whole store: memcached semantics, a model-based property test, eviction
//! quality (size shift, second chance), `-M`, and the per-item memory overhead.

use super::*;
use crate::clock::Expiry;
use proptest::prelude::*;
use std::collections::HashMap;

const MIB: usize = 1 << 20;

fn store_with(memory_bytes: usize, evict: bool) -> Store {
    Store::new(StoreConfig {
        memory_bytes,
        item_size_max: MIB,
        evict,
        shard_index: 0,
        shard_count: 1,
        try_hugepages: false,
    })
    .expect("store")
}

fn request<'a>(mode: StoreMode, key: &'a [u8], value: &'a [u8]) -> StoreRequest<'a> {
    StoreRequest {
        key,
        value,
        client_flags: 0,
        expiry: Expiry::Never,
        mode,
        compare_cas: None,
        invalidate: false,
        new_cas: None,
        vivify_on_miss: None,
    }
}

fn set(store: &mut Store, key: &[u8], value: &[u8], now: RelTime) -> StoreResult {
    store.store(&request(StoreMode::Set, key, value), now)
}

fn value_of(item: &impl ItemView) -> Vec<u8> {
    let mut out = Vec::new();
    item.copy_value_into(&mut out);
    out
}

fn get_value(store: &mut Store, key: &[u8], now: RelTime) -> Option<Vec<u8>> {
    match store.get(key, GetOptions::default(), now) {
        GetResult::Hit(hit) => Some(value_of(&hit.item)),
        GetResult::Miss => None,
    }
}

fn hit_flags(result: GetResult<'_>) -> Option<(bool, bool, bool, bool)> {
    match result {
        GetResult::Hit(hit) => Some((hit.won, hit.already_won, hit.stale, hit.fetched_before)),
        GetResult::Miss => None,
    }
}

fn cas_of(store: &Store, key: &[u8], now: RelTime) -> u64 {
    store.peek(key, now).expect("present").cas()
}

#[test]
fn set_get_overwrite_and_delete() {
    let mut store = store_with(8 * MIB, true);
    assert_eq!(set(&mut store, b"k", b"one", 10), StoreResult::Stored { cas: 1 });
    assert_eq!(get_value(&mut store, b"k", 10).as_deref(), Some(&b"one"[..]));
    assert_eq!(set(&mut store, b"k", b"", 10), StoreResult::Stored { cas: 2 });
    assert_eq!(get_value(&mut store, b"k", 10).as_deref(), Some(&b""[..]));
    let delete = DeleteRequest { key: b"k", compare_cas: None, invalidate: false, new_expiry: None, new_cas: None };
    assert_eq!(store.delete(&delete, 10), DeleteResult::Deleted);
    assert_eq!(store.delete(&delete, 10), DeleteResult::NotFound);
    assert!(get_value(&mut store, b"k", 10).is_none());
    assert_eq!(store.stats().curr_items.get(), 0);
    assert_eq!(store.stats().total_items.get(), 2);
    store.check_invariants();
}

#[test]
fn cas_values_are_unique_across_shards() {
    let config = |shard_index| StoreConfig {
        memory_bytes: 4 * MIB,
        item_size_max: MIB,
        evict: true,
        shard_index,
        shard_count: 3,
        try_hugepages: false,
    };
    let mut stores: Vec<Store> = (0..3).map(|i| Store::new(config(i)).unwrap()).collect();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        for store in &mut stores {
            let StoreResult::Stored { cas } = set(store, b"k", b"v", 1) else { panic!() };
            assert!(cas != 0 && seen.insert(cas), "cas {cas} repeated");
        }
    }
}

#[test]
fn store_modes_follow_memcached() {
    let mut store = store_with(8 * MIB, true);
    let now = 5;
    assert_eq!(store.store(&request(StoreMode::Replace, b"k", b"x"), now), StoreResult::NotStored);
    assert_eq!(store.store(&request(StoreMode::Append, b"k", b"x"), now), StoreResult::NotStored);
    assert_eq!(store.store(&request(StoreMode::Prepend, b"k", b"x"), now), StoreResult::NotStored);
    assert!(matches!(store.store(&request(StoreMode::Add, b"k", b"mid"), now), StoreResult::Stored { .. }));
    assert_eq!(store.store(&request(StoreMode::Add, b"k", b"other"), now), StoreResult::NotStored);
    // Append/prepend keep flags and expiry, and get a new CAS.
    let flagged = StoreRequest { client_flags: 5, expiry: Expiry::At(100), ..request(StoreMode::Set, b"k", b"mid") };
    store.store(&flagged, now);
    let before = cas_of(&store, b"k", now);
    let append = StoreRequest { client_flags: 7, expiry: Expiry::At(3), ..request(StoreMode::Append, b"k", b"+") };
    assert!(matches!(store.store(&append, now), StoreResult::Stored { cas } if cas > before));
    store.store(&request(StoreMode::Prepend, b"k", b"-"), now);
    let item = store.peek(b"k", now).unwrap();
    assert_eq!((value_of(&item), item.client_flags(), item.exptime()), (b"-mid+".to_vec(), 5, 100));
    assert_eq!(store.store(&request(StoreMode::Replace, b"k", b"r"), now), StoreResult::Stored { cas: cas_of(&store, b"k", now) });
    // Append with vivify creates the item on a miss.
    let vivify = StoreRequest { vivify_on_miss: Some(Expiry::At(50)), ..request(StoreMode::Append, b"new", b"abc") };
    assert!(matches!(store.store(&vivify, now), StoreResult::Stored { .. }));
    assert_eq!(store.peek(b"new", now).map(|i| (value_of(&i), i.exptime())), Some((b"abc".to_vec(), 50)));
    store.check_invariants();
}

#[test]
fn compare_and_swap() {
    let mut store = store_with(8 * MIB, true);
    let cas_set = |cas| StoreRequest { compare_cas: Some(cas), ..request(StoreMode::Set, b"k", b"new") };
    assert_eq!(store.store(&cas_set(1), 1), StoreResult::NotFound);
    set(&mut store, b"k", b"old", 1);
    let cas = cas_of(&store, b"k", 1);
    assert_eq!(store.store(&cas_set(cas + 1), 1), StoreResult::Exists);
    assert_eq!(store.store(&cas_set(0), 1), StoreResult::Exists);
    assert!(matches!(store.store(&cas_set(cas), 1), StoreResult::Stored { .. }));
    assert_eq!(store.store(&cas_set(cas), 1), StoreResult::Exists, "the CAS changed");
    // E: the caller picks the new CAS.
    let explicit = StoreRequest { new_cas: Some(777), ..request(StoreMode::Set, b"k", b"e") };
    assert_eq!(store.store(&explicit, 1), StoreResult::Stored { cas: 777 });
    // Append with a wrong CAS.
    let append = StoreRequest { compare_cas: Some(1), ..request(StoreMode::Append, b"k", b"x") };
    assert_eq!(store.store(&append, 1), StoreResult::Exists);
    let append = StoreRequest { compare_cas: Some(777), ..request(StoreMode::Append, b"k", b"x") };
    assert!(matches!(store.store(&append, 1), StoreResult::Stored { .. }));
    assert_eq!(get_value(&mut store, b"k", 1).unwrap(), b"ex");
}

/// Checked against memcached 1.6.18: `ms k S1 I C<lower>` keeps the TTL, marks stale; the first
/// reader gets W (and X), later readers Z; `md k I T30` re-opens the win.
#[test]
fn invalidation_and_stale_wins() {
    let mut store = store_with(8 * MIB, true);
    let now = 10;
    set(&mut store, b"other", b"x", now); // so that k's CAS is above 1
    store.store(&StoreRequest { expiry: Expiry::At(110), ..request(StoreMode::Set, b"k", b"v") }, now);
    let cas = cas_of(&store, b"k", now);
    let higher = StoreRequest { compare_cas: Some(cas + 5), invalidate: true, ..request(StoreMode::Set, b"k", b"w") };
    assert_eq!(store.store(&higher, now), StoreResult::Exists);
    let lower = StoreRequest {
        compare_cas: Some(cas - 1),
        invalidate: true,
        expiry: Expiry::At(15),
        ..request(StoreMode::Set, b"k", b"w")
    };
    assert!(matches!(store.store(&lower, now), StoreResult::Stored { .. }));
    assert_eq!(store.peek(b"k", now).unwrap().exptime(), 110, "stale set keeps the old TTL");
    assert_eq!(hit_flags(store.get(b"k", GetOptions::default(), now)), Some((true, false, true, false)));
    assert_eq!(hit_flags(store.get(b"k", GetOptions::default(), now)), Some((false, true, true, true)));
    // md I T30: stale, new CAS, new TTL, the next reader wins again.
    let before = cas_of(&store, b"k", now);
    let md = DeleteRequest { key: b"k", compare_cas: None, invalidate: true, new_expiry: Some(Expiry::At(40)), new_cas: None };
    assert_eq!(store.delete(&md, now), DeleteResult::Deleted);
    let item = store.peek(b"k", now).unwrap();
    assert!(item.cas() > before);
    assert_eq!(item.exptime(), 40);
    assert_eq!(hit_flags(store.get(b"k", GetOptions::default(), now)), Some((true, false, true, true)));
    // Delete with a wrong CAS.
    let md = DeleteRequest { key: b"k", compare_cas: Some(1), invalidate: false, new_expiry: None, new_cas: None };
    assert_eq!(store.delete(&md, now), DeleteResult::Exists);
}

/// memcached 1.6.18, `mg key N30 v s c` twice: `VA 0 s0 c1 W`, then `VA 0 s0 c1 Z` (and h0, then h1).
#[test]
fn vivify_gives_one_win() {
    let mut store = store_with(8 * MIB, true);
    let options = GetOptions { vivify: Some(Expiry::At(130)), ..GetOptions::default() };
    match store.get(b"key", options, 100) {
        GetResult::Hit(hit) => {
            assert!(hit.won && !hit.already_won && !hit.stale && !hit.fetched_before);
            assert_eq!((hit.item.value_len(), hit.item.cas(), hit.item.exptime()), (0, 1, 130));
        }
        GetResult::Miss => panic!("vivify hits"),
    }
    assert_eq!(hit_flags(store.get(b"key", options, 101)), Some((false, true, false, true)));
    assert_eq!(hit_flags(store.get(b"key", options, 102)), Some((false, true, false, true)));
}

#[test]
fn recache_below_wins_once() {
    let mut store = store_with(8 * MIB, true);
    store.store(&StoreRequest { expiry: Expiry::At(120), ..request(StoreMode::Set, b"k", b"v") }, 100);
    store.store(&request(StoreMode::Set, b"forever", b"v"), 100);
    let r = |below| GetOptions { recache_below: Some(below), ..GetOptions::default() };
    assert_eq!(hit_flags(store.get(b"k", r(20), 100)), Some((false, false, false, false)), "20s left is not < 20");
    assert_eq!(hit_flags(store.get(b"k", r(30), 100)), Some((true, false, false, true)));
    assert_eq!(hit_flags(store.get(b"k", r(30), 101)), Some((false, true, false, true)));
    assert_eq!(hit_flags(store.get(b"forever", r(30), 100)).map(|f| f.0), Some(false), "no TTL, no recache");
}

#[test]
fn touch_no_bump_and_idle_time() {
    let mut store = store_with(8 * MIB, true);
    set(&mut store, b"k", b"v", 100);
    let peek = GetOptions { no_bump: true, ..GetOptions::default() };
    match store.get(b"k", peek, 130) {
        GetResult::Hit(hit) => assert_eq!((hit.idle_secs, hit.fetched_before), (30, false)),
        GetResult::Miss => panic!(),
    }
    let touch = GetOptions { touch: Some(Expiry::At(200)), ..GetOptions::default() };
    match store.get(b"k", touch, 140) {
        GetResult::Hit(hit) => {
            assert_eq!((hit.idle_secs, hit.fetched_before, hit.item.exptime()), (40, false, 200));
            assert_eq!(hit.item.last_access(), 140);
            assert!(hit.item.fetched());
        }
        GetResult::Miss => panic!(),
    }
    assert!(store.peek(b"k", 199).is_some());
    assert!(get_value(&mut store, b"k", 200).is_none(), "expired at its exptime");
    assert_eq!(store.stats().get_expired.get(), 1);
    assert_eq!(store.stats().curr_items.get(), 0, "lazy expiry removes it");
}

#[test]
fn expiry_immediately_and_tick() {
    let mut store = store_with(8 * MIB, true);
    store.store(&StoreRequest { expiry: Expiry::Immediately, ..request(StoreMode::Set, b"gone", b"v") }, 10);
    assert!(store.peek(b"gone", 10).is_none());
    for i in 0..2000u32 {
        let key = format!("key{i}");
        let expiry = if i % 2 == 0 { Expiry::At(20) } else { Expiry::Never };
        store.store(&StoreRequest { expiry, ..request(StoreMode::Set, key.as_bytes(), b"value") }, 10);
    }
    assert_eq!(store.tick(15), 0, "nothing expired yet");
    let mut removed = 0;
    for _ in 0..(store.index_bytes() / 8).div_ceil(4096) + 1 {
        removed += store.tick(20);
    }
    assert_eq!(removed, 1001, "1000 keys and `gone`");
    assert_eq!(store.stats().reclaimed.get(), 1001);
    assert_eq!(store.stats().expired_unfetched.get(), 1001);
    assert_eq!(store.stats().curr_items.get(), 1000);
    store.check_invariants();
}

#[test]
fn arith_follows_memcached() {
    let mut store = store_with(8 * MIB, true);
    let now = 3;
    let arith = |key, incr, delta| ArithRequest {
        key,
        incr,
        delta,
        vivify: None,
        compare_cas: None,
        new_expiry: None,
        new_cas: None,
    };
    assert_eq!(store.arith(&arith(&b"n"[..], true, 1), now), ArithResult::NotFound);
    store.store(&StoreRequest { client_flags: 9, expiry: Expiry::At(50), ..request(StoreMode::Set, b"n", b"99") }, now);
    let ArithResult::Value { value, cas, exptime } = store.arith(&arith(b"n", true, 1), now) else { panic!() };
    assert_eq!((value, exptime), (100, 50));
    let item = store.peek(b"n", now).unwrap();
    assert_eq!((value_of(&item), item.cas(), item.client_flags()), (b"100".to_vec(), cas, 9));
    assert!(matches!(store.arith(&arith(b"n", false, 1000), now), ArithResult::Value { value: 0, .. }));
    assert_eq!(get_value(&mut store, b"n", now).unwrap(), b"0", "no space padding");
    set(&mut store, b"max", b"18446744073709551615", now);
    assert!(matches!(store.arith(&arith(b"max", true, 2), now), ArithResult::Value { value: 1, .. }));
    set(&mut store, b"same", b"10", now);
    assert!(matches!(store.arith(&arith(b"same", true, 5), now), ArithResult::Value { value: 15, .. }));
    assert_eq!(get_value(&mut store, b"same", now).unwrap(), b"15");
    for bad in [&b""[..], b"abc", b"-1", b"12a", b"18446744073709551616", b" "] {
        set(&mut store, b"bad", bad, now);
        assert_eq!(store.arith(&arith(b"bad", true, 1), now), ArithResult::NonNumeric, "{bad:?}");
    }
    let cas_mismatch = ArithRequest { compare_cas: Some(12345), ..arith(b"same", true, 1) };
    assert_eq!(store.arith(&cas_mismatch, now), ArithResult::Exists);
    let vivify = ArithRequest { vivify: Some((Expiry::At(90), 42)), new_expiry: None, ..arith(b"fresh", true, 5) };
    assert!(matches!(store.arith(&vivify, now), ArithResult::Value { value: 42, exptime: 90, .. }));
    assert!(matches!(store.arith(&vivify, now), ArithResult::Value { value: 47, exptime: 90, .. }));
    let touch = ArithRequest { new_expiry: Some(Expiry::At(77)), ..arith(b"fresh", false, 7) };
    assert!(matches!(store.arith(&touch, now), ArithResult::Value { value: 40, exptime: 77, .. }));
    store.check_invariants();
}

#[test]
fn too_large_values_and_failed_sets() {
    let mut store = store_with(8 * MIB, true);
    set(&mut store, b"k", b"old", 1);
    let big = vec![7u8; MIB + 1];
    assert_eq!(set(&mut store, b"k", &big, 1), StoreResult::TooLarge);
    assert!(store.peek(b"k", 1).is_none(), "memcached drops the old item when a set fails");
    set(&mut store, b"a", b"old", 1);
    assert_eq!(store.store(&request(StoreMode::Replace, b"a", &big), 1), StoreResult::TooLarge);
    assert!(store.peek(b"a", 1).is_some(), "other modes keep it");
    // Appending past the limit: memcached answers NOT_STORED and keeps the item.
    let most = vec![1u8; MIB - 1];
    set(&mut store, b"a", &most, 1);
    assert_eq!(store.store(&request(StoreMode::Append, b"a", b"xy"), 1), StoreResult::NotStored);
    assert_eq!(store.peek(b"a", 1).unwrap().value_len(), MIB - 1);
    // An item the shard could never hold.
    let mut huge_limit = Store::new(StoreConfig {
        memory_bytes: 4 * MIB,
        item_size_max: 64 * MIB,
        evict: true,
        shard_index: 0,
        shard_count: 1,
        try_hugepages: false,
    })
    .unwrap();
    assert_eq!(set(&mut huge_limit, b"k", &vec![0u8; 4 * MIB], 1), StoreResult::TooLarge);
    assert!(matches!(set(&mut huge_limit, b"k", &vec![3u8; 2 * MIB + 5], 1), StoreResult::Stored { .. }));
    assert_eq!(get_value(&mut huge_limit, b"k", 1).unwrap(), vec![3u8; 2 * MIB + 5]);
    huge_limit.check_invariants();
}

#[test]
fn spanning_items_read_back_byte_for_byte() {
    let mut store = Store::new(StoreConfig {
        memory_bytes: 16 * MIB,
        item_size_max: 4 * MIB,
        evict: true,
        shard_index: 0,
        shard_count: 1,
        try_hugepages: false,
    })
    .unwrap();
    let pattern = |len: usize, seed: u8| (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
    set(&mut store, b"small", &pattern(1000, 1), 1);
    let values = [pattern(SEGMENT_SIZE + 17, 2), pattern(3 * SEGMENT_SIZE + 1, 3), pattern(200_000, 4)];
    for (i, value) in values.iter().enumerate() {
        set(&mut store, format!("big{i}").as_bytes(), value, 1);
    }
    set(&mut store, b"after", &pattern(50, 5), 1);
    for (i, value) in values.iter().enumerate() {
        let item = store.peek(format!("big{i}").as_bytes(), 1).unwrap();
        let chunks: Vec<&[u8]> = item.value_chunks().collect();
        assert!(chunks.len() >= 2 || value.len() < SEGMENT_SIZE, "value {i} spans segments");
        assert!(chunks.iter().all(|c| !c.is_empty()));
        assert_eq!(&value_of(&item), value, "value {i}");
    }
    assert_eq!(get_value(&mut store, b"small", 1).unwrap(), pattern(1000, 1));
    assert_eq!(get_value(&mut store, b"after", 1).unwrap(), pattern(50, 5));
    // Appending to a spanning item.
    store.store(&request(StoreMode::Append, b"big0", b"tail"), 1);
    let mut expected = values[0].clone();
    expected.extend_from_slice(b"tail");
    assert_eq!(get_value(&mut store, b"big0", 1).unwrap(), expected);
    store.check_invariants();
}

#[test]
fn flush_removes_everything() {
    let mut store = store_with(8 * MIB, true);
    for i in 0..1000 {
        set(&mut store, format!("k{i}").as_bytes(), b"value", 1);
    }
    store.flush();
    assert!(get_value(&mut store, b"k1", 1).is_none());
    assert_eq!(store.stats().curr_items.get(), 0);
    assert_eq!(store.stats().segments_used.get(), 0);
    set(&mut store, b"k1", b"again", 1);
    assert_eq!(get_value(&mut store, b"k1", 1).unwrap(), b"again");
    store.check_invariants();
}
