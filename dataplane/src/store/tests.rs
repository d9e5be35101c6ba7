//! Behaviour tests of the whole store: memcached semantics, a model-based property test, eviction
//! quality (size shift, second chance), `-M`, and the per-item memory overhead.

use super::*;
use crate::clock::Expiry;
use proptest::prelude::*;
use std::collections::HashMap;

const MIB: usize = 1 << 20;

fn store_with(memory_bytes: usize, evict: bool) -> Store {
    store_sized(memory_bytes, MIB, evict)
}

fn store_sized(memory_bytes: usize, item_size_max: usize, evict: bool) -> Store {
    Store::new(StoreConfig { memory_bytes, item_size_max, evict, shard_index: 0, shard_count: 1, try_hugepages: false, memory_file: None, clock_origin: 0 })
        .expect("store")
}

#[test]
fn a_store_can_move_to_its_shard_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
}

#[test]
fn tiny_memory_is_refused() {
    let config = StoreConfig {
        memory_bytes: 2 * MIB,
        item_size_max: MIB,
        evict: true,
        shard_index: 0,
        shard_count: 1,
        try_hugepages: false,
        memory_file: None,
        clock_origin: 0,
    };
    assert!(matches!(Store::new(config), Err(StoreError::TooSmall { .. })));
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
        key_binary: false,
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
        memory_file: None,
        clock_origin: 0,
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
    assert_eq!(
        store.store(&request(StoreMode::Replace, b"k", b"r"), now),
        StoreResult::Stored { cas: cas_of(&store, b"k", now) }
    );
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
    let md = DeleteRequest {
        key: b"k",
        compare_cas: None,
        invalidate: true,
        new_expiry: Some(Expiry::At(40)),
        new_cas: None,
    };
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
    // Longer: a new item of the new length, keeping flags and expiry.
    let ArithResult::Value { value, cas, exptime } = store.arith(&arith(b"n", true, 1), now) else { panic!() };
    assert_eq!((value, exptime), (100, 50));
    let item = store.peek(b"n", now).unwrap();
    assert_eq!((value_of(&item), item.cas(), item.client_flags()), (b"100".to_vec(), cas, 9));
    // Not longer: rewritten in place, space-padded to the stored length (memcached 1.6.18: set "100",
    // decr 1 answers 99 and `get` returns "99 ").
    assert!(matches!(store.arith(&arith(b"n", false, 1), now), ArithResult::Value { value: 99, .. }));
    assert_eq!(get_value(&mut store, b"n", now).unwrap(), b"99 ");
    assert!(matches!(store.arith(&arith(b"n", false, 1000), now), ArithResult::Value { value: 0, .. }));
    assert_eq!(get_value(&mut store, b"n", now).unwrap(), b"0  ");
    // The padded text parses again, and grows back only when the digits need more room.
    assert!(matches!(store.arith(&arith(b"n", true, 12), now), ArithResult::Value { value: 12, .. }));
    assert_eq!(get_value(&mut store, b"n", now).unwrap(), b"12 ");
    assert!(matches!(store.arith(&arith(b"n", true, 988), now), ArithResult::Value { value: 1000, .. }));
    assert_eq!(get_value(&mut store, b"n", now).unwrap(), b"1000");
    set(&mut store, b"max", b"18446744073709551615", now);
    assert!(matches!(store.arith(&arith(b"max", true, 1), now), ArithResult::Value { value: 0, .. }));
    assert_eq!(get_value(&mut store, b"max", now).unwrap(), format!("{:<20}", 0).into_bytes());
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
    let mut huge_limit = store_sized(4 * MIB, 64 * MIB, true);
    assert_eq!(set(&mut huge_limit, b"k", &vec![0u8; 4 * MIB], 1), StoreResult::TooLarge);
    assert!(matches!(set(&mut huge_limit, b"k", &vec![3u8; 2 * MIB + 5], 1), StoreResult::Stored { .. }));
    assert_eq!(get_value(&mut huge_limit, b"k", 1).unwrap(), vec![3u8; 2 * MIB + 5]);
    huge_limit.check_invariants();
}

/// Bytes of the segments the log holds: what the store keeps resident for items.
fn segment_bytes(store: &Store) -> usize {
    store.stats().segments_used.get() as usize * SEGMENT_SIZE
}

#[test]
fn a_lowered_memory_limit_is_a_real_cap() {
    let mut store = store_with(16 * MIB, true);
    let value = vec![5u8; 1000];
    for i in 0..40_000u32 {
        set(&mut store, format!("before{i}").as_bytes(), &value, 1);
    }
    assert_eq!(store.stats().segments_used.get(), 15, "full, the reserve left free");
    // Out of range: below the fewest segments a store runs with, above what was mapped at start-up.
    assert!(matches!(store.set_memory_limit(2 * MIB), Err(StoreError::LimitOutOfRange { .. })));
    assert!(matches!(store.set_memory_limit(17 * MIB), Err(StoreError::LimitOutOfRange { .. })));
    store.set_memory_limit(6 * MIB + 1000).expect("6 segments");
    assert_eq!(store.stats().segments_total.get(), 6);
    assert_eq!(segment_bytes(&store), 15 * MIB, "nothing is evicted before a write needs room");
    // The first write reclaims down to the new limit; from then on the store stays within it.
    set(&mut store, b"after0", &value, 2);
    assert!(segment_bytes(&store) <= 5 * MIB, "{} bytes of segments", segment_bytes(&store));
    for i in 1..20_000u32 {
        set(&mut store, format!("after{i}").as_bytes(), &value, 2);
        assert!(segment_bytes(&store) <= 6 * MIB);
    }
    store.check_invariants();
    assert!(store.stats().bytes.get() as usize <= 6 * MIB);
    let resident = (0..20_000u32).filter(|i| store.peek(format!("after{i}").as_bytes(), 2).is_some()).count();
    assert!((3_000..6 * MIB / 1000).contains(&resident), "{resident} of the newest items resident");
    assert!(store.peek(b"before39999", 2).is_none(), "older items were evicted");
    // An item too large for the lowered limit is refused as such, not stored by emptying the store.
    let mut big = store_sized(16 * MIB, 8 * MIB, true);
    big.set_memory_limit(4 * MIB).unwrap();
    assert_eq!(set(&mut big, b"big", &vec![1u8; 4 * MIB], 1), StoreResult::TooLarge);
    // Raised again (up to the start-up size): the store grows back into the arena.
    store.set_memory_limit(16 * MIB).unwrap();
    for i in 0..20_000u32 {
        set(&mut store, format!("again{i}").as_bytes(), &value, 3);
    }
    assert_eq!(store.stats().segments_used.get(), 15);
    store.check_invariants();
}

#[test]
fn a_lowered_limit_without_eviction_refuses_writes() {
    let mut store = store_with(8 * MIB, false);
    let value = vec![5u8; 1000];
    let mut stored = 0;
    while matches!(set(&mut store, format!("k{stored}").as_bytes(), &value, 1), StoreResult::Stored { .. }) {
        stored += 1;
    }
    store.set_memory_limit(4 * MIB).unwrap();
    assert_eq!(set(&mut store, b"more", &value, 1), StoreResult::OutOfMemory, "-M: no eviction to make room");
    for i in 0..stored {
        store.delete(&DeleteRequest { key: format!("k{i}").as_bytes(), compare_cas: None, invalidate: false, new_expiry: None, new_cas: None }, 1);
    }
    assert!(matches!(set(&mut store, b"more", &value, 1), StoreResult::Stored { .. }));
    assert!(segment_bytes(&store) <= 4 * MIB);
    store.check_invariants();
}

#[test]
fn live_items_are_visited_oldest_first() {
    let mut store = store_with(8 * MIB, true);
    for key in [&b"a"[..], b"b", b"c", b"d"] {
        set(&mut store, key, b"v", 1);
    }
    set(&mut store, b"b", b"newer", 1);
    store.delete(&DeleteRequest { key: b"c", compare_cas: None, invalidate: false, new_expiry: None, new_cas: None }, 1);
    let mut keys = Vec::new();
    store.for_each_live_oldest_first(1, |item| {
        keys.push(item.key().to_vec());
        std::ops::ControlFlow::Continue(())
    });
    assert_eq!(keys, [&b"a"[..], b"d", b"b"]);
    let mut first = Vec::new();
    store.for_each_live_oldest_first(1, |item| {
        first.push(item.key().to_vec());
        std::ops::ControlFlow::Break(())
    });
    assert_eq!(first, [b"a"]);
}

#[test]
fn spanning_items_read_back_byte_for_byte() {
    let mut store = store_sized(16 * MIB, 4 * MIB, true);
    let pattern =
        |len: usize, seed: u8| (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
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

/// Ticks until `curr_items` stops falling (a full pass over the index at most).
fn tick_until_settled(store: &mut Store, now: RelTime) {
    let passes = store.index_bytes() / 8 / 4096 + 2;
    for _ in 0..passes {
        store.tick(now);
    }
}

/// memcached 1.6.18: after `flush_all`, a get of an old key is a miss counting `get_flushed`, a second
/// get of it a plain miss; add succeeds, replace does not; flushed items leave as they are reclaimed.
#[test]
fn flush_is_lazy_and_counts_flushed_reads_once() {
    let mut store = store_with(8 * MIB, true);
    for i in 0..1000 {
        set(&mut store, format!("k{i}").as_bytes(), b"value", 1);
    }
    store.flush(1);
    assert!(store.peek(b"k0", 1).is_none(), "peek hides flushed items");
    assert!(get_value(&mut store, b"k1", 1).is_none());
    assert_eq!(store.stats().get_flushed.get(), 1);
    assert!(get_value(&mut store, b"k1", 1).is_none());
    assert_eq!(store.stats().get_flushed.get(), 1, "the first read removed it");
    assert_eq!(store.stats().curr_items.get(), 999, "only reclaimed items leave curr_items");
    assert!(matches!(store.store(&request(StoreMode::Add, b"k2", b"new"), 1), StoreResult::Stored { .. }));
    assert_eq!(store.store(&request(StoreMode::Replace, b"k3", b"new"), 1), StoreResult::NotStored);
    let delete = DeleteRequest { key: b"k4", compare_cas: None, invalidate: false, new_expiry: None, new_cas: None };
    assert_eq!(store.delete(&delete, 1), DeleteResult::NotFound);
    set(&mut store, b"k5", b"again", 1);
    assert_eq!(get_value(&mut store, b"k2", 1).unwrap(), b"new");
    assert_eq!(get_value(&mut store, b"k5", 1).unwrap(), b"again");
    assert_eq!(store.stats().get_flushed.get(), 5, "every command's lookup counts, as in memcached");
    assert_eq!(store.stats().evictions.get(), 0);
    // Within the grace period tick leaves flushed items for reads to find.
    tick_until_settled(&mut store, 2);
    assert_eq!(store.stats().curr_items.get(), 997);
    assert!(get_value(&mut store, b"k6", 2).is_none());
    assert_eq!(store.stats().get_flushed.get(), 6);
    // Then it reclaims them like expired items; items written since stay.
    tick_until_settled(&mut store, 3);
    assert_eq!(store.stats().curr_items.get(), 2);
    assert_eq!(store.stats().reclaimed.get(), 994);
    let live_bytes = [&b"k2"[..], b"k5"].map(|key| store.peek(key, 3).unwrap().total_size() as u64);
    assert_eq!(store.stats().bytes.get(), live_bytes.iter().sum::<u64>());
    assert_eq!(get_value(&mut store, b"k5", 3).unwrap(), b"again");
    store.check_invariants();
}

#[test]
fn flush_with_nothing_written_after_resets_the_store() {
    let mut store = store_with(8 * MIB, true);
    for i in 0..1000 {
        set(&mut store, format!("k{i}").as_bytes(), b"value", 1);
    }
    store.flush(1);
    assert_eq!(store.tick(2), 0, "grace period");
    assert_eq!(store.tick(3), 1000, "one reset, no scan");
    let stats = store.stats();
    assert_eq!((stats.curr_items.get(), stats.bytes.get(), stats.segments_used.get()), (0, 0, 0));
    assert_eq!(stats.reclaimed.get(), 1000);
    assert!(get_value(&mut store, b"k1", 3).is_none());
    assert_eq!(store.stats().get_flushed.get(), 0, "reclaimed items are plain misses");
    set(&mut store, b"k1", b"again", 3);
    assert_eq!(get_value(&mut store, b"k1", 3).unwrap(), b"again");
    store.check_invariants();
    // An empty store is reset at once; the watermark still holds for what follows.
    store.delete(
        &DeleteRequest { key: b"k1", compare_cas: None, invalidate: false, new_expiry: None, new_cas: None },
        3,
    );
    store.flush(3);
    assert_eq!(store.stats().segments_used.get(), 0);
    set(&mut store, b"k1", b"third", 3);
    assert_eq!(get_value(&mut store, b"k1", 3).unwrap(), b"third");
    store.check_invariants();
}

/// Flushed items cost nothing to reclaim: a full store, flushed, takes as much again without any tick,
/// evicting nothing, with or without eviction (`-M`).
#[test]
fn flushed_memory_is_reusable() {
    for evict in [true, false] {
        let mut store = store_with(8 * MIB, evict);
        let value = vec![b'x'; 1000];
        let mut stored = 0;
        while let StoreResult::Stored { .. } = set(&mut store, format!("old:{stored}").as_bytes(), &value, 1) {
            stored += 1;
            if evict && store.stats().segments_used.get() == store.stats().segments_total.get() - 1 {
                break;
            }
        }
        store.flush(1);
        for i in 0..stored {
            let result = set(&mut store, format!("new:{i}").as_bytes(), &value, 1);
            assert!(matches!(result, StoreResult::Stored { .. }), "evict={evict} new:{i}: {result:?}");
        }
        assert_eq!(store.stats().evictions.get(), 0, "evict={evict}");
        assert!(store.stats().reclaimed.get() > 0, "evict={evict}");
        assert!(get_value(&mut store, b"old:0", 1).is_none());
        assert_eq!(get_value(&mut store, format!("new:{}", stored - 1).as_bytes(), 1).unwrap(), value);
        store.check_invariants();
    }
}

/// memcached 1.6.18 remembers a base64 key (`ms <b64> S b`) for the item written from that request;
/// a combined append/prepend item and an incr/decr that grows the value are fresh items without it.
#[test]
fn base64_keys_are_remembered_per_item() {
    let mut store = store_with(8 * MIB, true);
    let binary = |mode, value| StoreRequest { key_binary: true, ..request(mode, b"k", value) };
    let key_binary = |store: &Store| store.peek(b"k", 1).unwrap().key_binary();
    store.store(&binary(StoreMode::Set, b"10"), 1);
    assert!(key_binary(&store));
    match store.get(b"k", GetOptions::default(), 1) {
        GetResult::Hit(hit) => assert!(hit.item.key_binary()),
        GetResult::Miss => panic!(),
    }
    let arith = |delta| ArithRequest {
        key: b"k",
        incr: true,
        delta,
        vivify: None,
        compare_cas: None,
        new_expiry: None,
        new_cas: None,
    };
    store.arith(&arith(1), 1);
    assert!(key_binary(&store), "in place");
    let invalidate = DeleteRequest { key: b"k", compare_cas: None, invalidate: true, new_expiry: None, new_cas: None };
    store.delete(&invalidate, 1);
    assert!(key_binary(&store), "invalidated");
    store.arith(&arith(100), 1);
    assert!(!key_binary(&store), "grown: a new item");
    store.store(&binary(StoreMode::Set, b"v"), 1);
    store.store(&binary(StoreMode::Append, b"w"), 1);
    assert!(!key_binary(&store), "combined: a new item");
    store.store(&binary(StoreMode::Set, b"v"), 1);
    store.store(&request(StoreMode::Set, b"k", b"v"), 1);
    assert!(!key_binary(&store), "the last write decides");
    // Vivified items never have it (`mg <b64> b N30 k` answers with the plain key).
    let options = GetOptions { vivify: Some(Expiry::Never), ..GetOptions::default() };
    match store.get(b"fresh", options, 1) {
        GetResult::Hit(hit) => assert!(!hit.item.key_binary()),
        GetResult::Miss => panic!(),
    }
    store.check_invariants();
}

// ---- model-based property tests ----

/// A client TTL choice.
#[derive(Clone, Copy, Debug)]
enum Ttl {
    Never,
    In(u32),
    Immediately,
}

impl Ttl {
    fn expiry(self, now: RelTime) -> Expiry {
        match self {
            Ttl::Never => Expiry::Never,
            Ttl::In(secs) => Expiry::At(now + secs),
            Ttl::Immediately => Expiry::Immediately,
        }
    }
}

/// Which CAS a request carries.
#[derive(Clone, Copy, Debug)]
enum CasChoice {
    None,
    Current,
    Wrong,
}

#[derive(Clone, Debug)]
enum Op {
    Store { mode: StoreMode, key: u8, len: usize, flags: u32, ttl: Ttl, cas: CasChoice },
    SetNumber { key: u8, number: u64 },
    Delete { key: u8, cas: CasChoice },
    Arith { key: u8, incr: bool, delta: u64 },
    Get { key: u8 },
    Touch { key: u8, ttl: Ttl },
    Advance { secs: u32 },
    Flush,
}

fn ttl_strategy() -> impl Strategy<Value = Ttl> {
    prop_oneof![4 => Just(Ttl::Never), 3 => (1u32..4).prop_map(Ttl::In), 1 => Just(Ttl::Immediately)]
}

fn cas_strategy() -> impl Strategy<Value = CasChoice> {
    prop_oneof![6 => Just(CasChoice::None), 2 => Just(CasChoice::Current), 1 => Just(CasChoice::Wrong)]
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => Just(0usize),
        30 => 1usize..300,
        4 => 300usize..20_000,
        1 => (SEGMENT_SIZE - 100)..(SEGMENT_SIZE + SEGMENT_SIZE / 4),
    ]
}

fn mode_strategy() -> impl Strategy<Value = StoreMode> {
    prop_oneof![
        4 => Just(StoreMode::Set),
        1 => Just(StoreMode::Add),
        1 => Just(StoreMode::Replace),
        1 => Just(StoreMode::Append),
        1 => Just(StoreMode::Prepend),
    ]
}

fn op_strategy(keys: u8) -> impl Strategy<Value = Op> {
    let flags = prop_oneof![Just(0u32), any::<u32>()];
    prop_oneof![
        8 => (mode_strategy(), 0..keys, len_strategy(), flags, ttl_strategy(), cas_strategy())
            .prop_map(|(mode, key, len, flags, ttl, cas)| Op::Store { mode, key, len, flags, ttl, cas }),
        2 => (0..keys, prop_oneof![0u64..1000, Just(u64::MAX - 1)])
            .prop_map(|(key, number)| Op::SetNumber { key, number }),
        2 => (0..keys, cas_strategy()).prop_map(|(key, cas)| Op::Delete { key, cas }),
        3 => (0..keys, any::<bool>(), prop_oneof![0u64..10, Just(u64::MAX)])
            .prop_map(|(key, incr, delta)| Op::Arith { key, incr, delta }),
        6 => (0..keys).prop_map(|key| Op::Get { key }),
        2 => (0..keys, ttl_strategy()).prop_map(|(key, ttl)| Op::Touch { key, ttl }),
        2 => (0u32..3).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Flush),
    ]
}

/// Distinct, recognizable bytes for the `serial`th value.
fn value_bytes(len: usize, serial: u32) -> Vec<u8> {
    let seed = serial.to_le_bytes();
    (0..len).map(|i| seed[i % 4] ^ (i as u8).wrapping_mul(7)).collect()
}

fn key_bytes(key: u8) -> Vec<u8> {
    format!("key:{key}").into_bytes()
}

#[derive(Clone, Debug, PartialEq)]
struct ModelItem {
    value: Vec<u8>,
    flags: u32,
    exptime: RelTime,
    cas: u64,
}

/// memcached's semantics over a HashMap, with memory to spare.
struct Model {
    items: HashMap<u8, ModelItem>,
    cas_sequence: u64,
    item_size_max: usize,
}

impl Model {
    fn live(&mut self, key: u8, now: RelTime) -> Option<&mut ModelItem> {
        if self.items.get(&key).is_some_and(|item| item.exptime != 0 && item.exptime <= now) {
            self.items.remove(&key);
        }
        self.items.get_mut(&key)
    }

    fn next_cas(&mut self) -> u64 {
        self.cas_sequence += 1;
        self.cas_sequence
    }

    fn insert(&mut self, key: u8, value: Vec<u8>, flags: u32, exptime: RelTime) -> StoreResult {
        let cas = self.next_cas();
        self.items.insert(key, ModelItem { value, flags, exptime, cas });
        StoreResult::Stored { cas }
    }

    fn store(&mut self, key: u8, request: &StoreRequest<'_>, now: RelTime) -> StoreResult {
        if request.value.len() > self.item_size_max {
            if request.mode == StoreMode::Set && request.compare_cas.is_none() {
                self.items.remove(&key);
            }
            return StoreResult::TooLarge;
        }
        let cas_command = request.compare_cas.is_some() && matches!(request.mode, StoreMode::Set | StoreMode::Replace);
        let (value, flags, exptime) = (request.value.to_vec(), request.client_flags, request.expiry.as_rel());
        let Some(old) = self.live(key, now).cloned() else {
            return match request.mode {
                _ if cas_command => StoreResult::NotFound,
                StoreMode::Set | StoreMode::Add => self.insert(key, value, flags, exptime),
                _ => StoreResult::NotStored,
            };
        };
        let cas_ok = match request.compare_cas {
            None | Some(0) => !cas_command,
            Some(cas) => cas == old.cas,
        };
        match request.mode {
            StoreMode::Add => StoreResult::NotStored,
            _ if !cas_ok => StoreResult::Exists,
            StoreMode::Set | StoreMode::Replace => self.insert(key, value, flags, exptime),
            StoreMode::Append | StoreMode::Prepend => {
                if old.value.len() + value.len() > self.item_size_max {
                    return StoreResult::NotStored;
                }
                let combined = if request.mode == StoreMode::Append {
                    [&old.value[..], &value[..]].concat()
                } else {
                    [&value[..], &old.value[..]].concat()
                };
                self.insert(key, combined, old.flags, old.exptime)
            }
        }
    }

    fn arith(&mut self, key: u8, incr: bool, delta: u64, now: RelTime) -> ArithResult {
        let cas = self.cas_sequence + 1;
        let Some(item) = self.live(key, now) else { return ArithResult::NotFound };
        // The parser's memcached rules (whitespace, signs) are tested on their own in `decimal`.
        let Some(current) = super::decimal::parse_u64(&item.value) else {
            return ArithResult::NonNumeric;
        };
        let value = if incr { current.wrapping_add(delta) } else { current.saturating_sub(delta) };
        item.value = arith_text(&item.value, value);
        item.cas = cas;
        let exptime = item.exptime;
        self.cas_sequence += 1;
        ArithResult::Value { value, cas, exptime }
    }
}

/// What memcached stores for an incr/decr result over `old`: the digits, space-padded to the old length
/// when they fit in it.
fn arith_text(old: &[u8], value: u64) -> Vec<u8> {
    let digits = value.to_string();
    format!("{digits:<width$}", width = old.len().max(digits.len())).into_bytes()
}

fn cas_for(choice: CasChoice, current: Option<u64>) -> Option<u64> {
    match choice {
        CasChoice::None => None,
        CasChoice::Current => Some(current.unwrap_or(424_242)),
        CasChoice::Wrong => Some(current.map_or(1, |cas| cas + 1_000)),
    }
}

fn model_item(item: &impl ItemView) -> ModelItem {
    ModelItem { value: value_of(item), flags: item.client_flags(), exptime: item.exptime(), cas: item.cas() }
}

/// Runs `ops` against a store with plenty of memory and against the model; every result must agree.
fn run_against_model(ops: &[Op]) -> Result<(), TestCaseError> {
    let item_size_max = SEGMENT_SIZE + SEGMENT_SIZE / 8;
    let mut store = store_sized(128 * MIB, item_size_max, true);
    let mut model = Model { items: HashMap::new(), cas_sequence: 0, item_size_max };
    let mut now: RelTime = 100;
    for (serial, op) in ops.iter().enumerate() {
        match *op {
            Op::Store { mode, key, len, flags, ttl, cas } => {
                let value = value_bytes(len, serial as u32);
                let k = key_bytes(key);
                let current = model.live(key, now).map(|item| item.cas);
                let request = StoreRequest {
                    client_flags: flags,
                    expiry: ttl.expiry(now),
                    compare_cas: cas_for(cas, current),
                    ..request(mode, &k, &value)
                };
                let expected = model.store(key, &request, now);
                prop_assert_eq!(store.store(&request, now), expected, "{:?}", op);
            }
            Op::SetNumber { key, number } => {
                let k = key_bytes(key);
                let text = number.to_string();
                let request = request(StoreMode::Set, &k, text.as_bytes());
                let expected = model.store(key, &request, now);
                prop_assert_eq!(store.store(&request, now), expected);
            }
            Op::Delete { key, cas } => {
                let current = model.live(key, now).map(|item| item.cas);
                let compare_cas = cas_for(cas, current);
                let expected = match current {
                    None => DeleteResult::NotFound,
                    Some(cas) if compare_cas.is_some_and(|c| c != cas) => DeleteResult::Exists,
                    Some(_) => {
                        model.items.remove(&key);
                        DeleteResult::Deleted
                    }
                };
                let k = key_bytes(key);
                let request =
                    DeleteRequest { key: &k, compare_cas, invalidate: false, new_expiry: None, new_cas: None };
                prop_assert_eq!(store.delete(&request, now), expected);
            }
            Op::Arith { key, incr, delta } => {
                let k = key_bytes(key);
                let expected = model.arith(key, incr, delta, now);
                let request = ArithRequest {
                    key: &k,
                    incr,
                    delta,
                    vivify: None,
                    compare_cas: None,
                    new_expiry: None,
                    new_cas: None,
                };
                prop_assert_eq!(store.arith(&request, now), expected);
            }
            Op::Get { key } | Op::Touch { key, .. } => {
                let touch = match *op {
                    Op::Touch { ttl, .. } => Some(ttl.expiry(now)),
                    _ => None,
                };
                let mut expected = model.live(key, now).cloned();
                if let (Some(item), Some(expiry)) = (model.items.get_mut(&key), touch) {
                    item.exptime = expiry.as_rel();
                    expected = Some(item.clone());
                }
                let got = match store.get(&key_bytes(key), GetOptions { touch, ..GetOptions::default() }, now) {
                    GetResult::Hit(hit) => Some(model_item(&hit.item)),
                    GetResult::Miss => None,
                };
                prop_assert_eq!(got, expected, "{:?}", op);
            }
            Op::Advance { secs } => {
                now += secs;
                store.tick(now);
            }
            Op::Flush => {
                store.flush(now);
                model.items.clear();
            }
        }
    }
    prop_assert_eq!(store.stats().evictions.get(), 0, "the model test must not evict");
    for key in 0..=u8::MAX {
        let stored = store.peek(&key_bytes(key), now).map(|item| model_item(&item));
        prop_assert_eq!(stored, model.live(key, now).cloned());
    }
    store.check_invariants();
    Ok(())
}

/// Tiny memory: whatever is evicted, a hit always returns the last value stored for its key.
fn run_tiny(ops: &[Op], evict: bool) -> Result<(), TestCaseError> {
    let memory = 4 * MIB;
    let mut store = store_sized(memory, 2 * MIB, evict);
    let mut model: HashMap<u8, Vec<u8>> = HashMap::new();
    let mut now: RelTime = 100;
    let keys: Vec<u8> = ops
        .iter()
        .filter_map(|op| match *op {
            Op::Store { key, .. } | Op::SetNumber { key, .. } | Op::Delete { key, .. } => Some(key),
            Op::Arith { key, .. } | Op::Get { key } | Op::Touch { key, .. } => Some(key),
            Op::Advance { .. } | Op::Flush => None,
        })
        .collect();
    for (serial, op) in ops.iter().enumerate() {
        match *op {
            Op::Store { mode, key, len, flags, ttl, cas } => {
                // Larger values than the model test's, so that 4 MiB fills up (up to 1.9 MiB).
                let len = if len >= SEGMENT_SIZE / 2 { len * 3 / 2 } else { (len * 100).min(2 * MIB - 4096) };
                let value = value_bytes(len, serial as u32);
                let k = key_bytes(key);
                let current = store.peek(&k, now).map(|item| item.cas());
                let request = StoreRequest {
                    client_flags: flags,
                    expiry: ttl.expiry(now),
                    compare_cas: cas_for(cas, current),
                    ..request(mode, &k, &value)
                };
                if let StoreResult::Stored { .. } = store.store(&request, now) {
                    let old = model.remove(&key).unwrap_or_default();
                    let new = match mode {
                        StoreMode::Append => [&old[..], &value[..]].concat(),
                        StoreMode::Prepend => [&value[..], &old[..]].concat(),
                        _ => value,
                    };
                    model.insert(key, new);
                }
            }
            Op::SetNumber { key, number } => {
                let text = number.to_string();
                if let StoreResult::Stored { .. } = set(&mut store, &key_bytes(key), text.as_bytes(), now) {
                    model.insert(key, text.into_bytes());
                }
            }
            Op::Delete { key, .. } => {
                let k = key_bytes(key);
                let request =
                    DeleteRequest { key: &k, compare_cas: None, invalidate: false, new_expiry: None, new_cas: None };
                store.delete(&request, now);
                model.remove(&key);
            }
            Op::Arith { key, incr, delta } => {
                let k = key_bytes(key);
                let request = ArithRequest {
                    key: &k,
                    incr,
                    delta,
                    vivify: None,
                    compare_cas: None,
                    new_expiry: None,
                    new_cas: None,
                };
                if let ArithResult::Value { value, .. } = store.arith(&request, now) {
                    let text = arith_text(&model.remove(&key).unwrap_or_default(), value);
                    model.insert(key, text);
                }
            }
            Op::Get { key } => {
                if let Some(value) = get_value(&mut store, &key_bytes(key), now) {
                    prop_assert_eq!(Some(&value), model.get(&key), "a hit returns the last value stored");
                }
            }
            Op::Touch { key, ttl } => {
                let options = GetOptions { touch: Some(ttl.expiry(now)), ..GetOptions::default() };
                store.get(&key_bytes(key), options, now);
            }
            Op::Advance { secs } => {
                now += secs;
                store.tick(now);
            }
            Op::Flush => {
                store.flush(now);
                model.clear();
            }
        }
        // Items may vanish (evicted, expired); those present hold exactly the last value stored.
        for &key in &keys {
            match store.peek(&key_bytes(key), now) {
                Some(item) => prop_assert_eq!(Some(&value_of(&item)), model.get(&key), "key {} after {:?}", key, op),
                None => {
                    model.remove(&key);
                }
            }
        }
        let stats = store.stats();
        prop_assert!(stats.bytes.get() as usize <= memory);
        prop_assert!(stats.segments_used.get() <= stats.segments_total.get());
    }
    store.check_invariants();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in proptest::collection::vec(op_strategy(6), 1..80)) {
        run_against_model(&ops)?;
    }

    #[test]
    fn tiny_memory_never_returns_wrong_values(
        ops in proptest::collection::vec(op_strategy(40), 1..250),
        evict in prop_oneof![3 => Just(true), 1 => Just(false)],
    ) {
        run_tiny(&ops, evict)?;
    }
}

// ---- memory behaviour ----

/// The product's headline: memory follows the workload when value sizes shift (no slab calcification).
/// 32 MiB (one shard's half of `-m 64`): 2x memory of 100-byte values, then 60% of memory of 2000-byte
/// values under new keys; nearly all of the large values must then be readable.
#[test]
fn size_shift_keeps_new_large_values() {
    let memory = 32 * MIB;
    let mut store = store_with(memory, true);
    let small = vec![b's'; 100];
    let mut written = 0;
    let mut i = 0u64;
    while written < 2 * memory {
        set(&mut store, format!("small:{i}").as_bytes(), &small, 10);
        written += small.len();
        i += 1;
    }
    let large = vec![b'L'; 2000];
    let large_keys = memory * 6 / 10 / large.len();
    for i in 0..large_keys {
        assert!(matches!(set(&mut store, format!("large:{i}").as_bytes(), &large, 10), StoreResult::Stored { .. }));
    }
    let hits = (0..large_keys).filter(|i| get_value(&mut store, format!("large:{i}").as_bytes(), 11).is_some()).count();
    let rate = hits as f64 / large_keys as f64;
    println!("size shift: {hits}/{large_keys} large values hit ({:.1}%)", rate * 100.0);
    assert!(rate >= 0.95, "hit rate {rate}");
    store.check_invariants();
}

/// Second chance approximates LRU: a hot tenth of the keys, read continually while new keys stream in,
/// stays cached; the cold keys written with it are gone.
#[test]
fn hot_keys_survive_a_stream_of_new_keys() {
    let memory = 16 * MIB;
    let mut store = store_with(memory, true);
    let value = vec![b'v'; 200];
    let keys = memory * 9 / 10 / 230; // items are 226 bytes: the cache is about full
    for i in 0..keys {
        set(&mut store, format!("old:{i}").as_bytes(), &value, 10);
    }
    assert_eq!(store.stats().evictions.get(), 0);
    let hot = keys / 10;
    let mut hot_misses = 0;
    for i in 0..2 * keys {
        set(&mut store, format!("new:{i}").as_bytes(), &value, 10);
        let key = format!("old:{}", i % hot);
        if get_value(&mut store, key.as_bytes(), 10).is_none() {
            // The first reclaims meet segments made only of hot keys, and re-append at most half a
            // segment of them; count misses once the stream has gone once around the memory.
            hot_misses += (i >= keys) as usize;
            set(&mut store, key.as_bytes(), &value, 10); // a client refills a miss
        }
    }
    let present = |store: &Store, range: std::ops::Range<usize>| {
        range.clone().filter(|i| store.peek(format!("old:{i}").as_bytes(), 10).is_some()).count() as f64
            / range.len() as f64
    };
    let (hot_present, cold_present) = (present(&store, 0..hot), present(&store, hot..keys));
    println!(
        "second chance: hot keys present {:.1}%, cold {:.1}%, hot misses {hot_misses} of {keys} reads in steady state, reinserted {}",
        hot_present * 100.0,
        cold_present * 100.0,
        store.stats().reinserted.get()
    );
    assert!(hot_present >= 0.95, "hot {hot_present}");
    assert!(cold_present <= 0.05, "cold {cold_present}");
    assert!((hot_misses as f64) < 0.01 * keys as f64, "{hot_misses} misses");
    assert!(store.stats().reinserted.get() > 0 && store.stats().evictions.get() > 0);
    store.check_invariants();
}

/// `-M`: once memory is full, stores fail with OutOfMemory and nothing stored is lost; memory held by
/// expired items comes back.
#[test]
fn no_evict_refuses_stores_and_keeps_items() {
    let memory = 8 * MIB;
    let mut store = store_with(memory, false);
    let value = vec![b'm'; 1000];
    let mut stored = 0;
    loop {
        let key = format!("k:{stored}");
        // The first 2000 items expire at t=100.
        let expiry = if stored < 2000 { Expiry::At(100) } else { Expiry::Never };
        match store.store(&StoreRequest { expiry, ..request(StoreMode::Set, key.as_bytes(), &value) }, 10) {
            StoreResult::Stored { .. } => stored += 1,
            StoreResult::OutOfMemory => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(stored * 1000 > memory / 2, "stored {stored}");
    for i in 0..100 {
        let key = format!("more:{i}");
        assert_eq!(set(&mut store, key.as_bytes(), &value, 10), StoreResult::OutOfMemory);
    }
    assert_eq!(store.stats().outofmemory.get(), 101);
    assert_eq!(store.stats().evictions.get(), 0);
    for i in 0..stored {
        assert_eq!(get_value(&mut store, format!("k:{i}").as_bytes(), 10).as_deref(), Some(&value[..]), "k:{i}");
    }
    // After the first 2000 expire, their segments are reclaimed and stores succeed again.
    for i in 0..1000 {
        let key = format!("later:{i}");
        assert!(matches!(set(&mut store, key.as_bytes(), &value, 100), StoreResult::Stored { .. }), "later:{i}");
    }
    assert!(store.stats().reclaimed.get() > 0);
    assert!(get_value(&mut store, format!("k:{}", stored - 1).as_bytes(), 100).is_some());
    store.check_invariants();
}

/// Header plus index bytes per item, with 10-byte keys and 100-byte values, measured on a full store.
#[test]
fn per_item_overhead_is_at_most_32_bytes() {
    let mut store = store_with(32 * MIB, true);
    let value = vec![b'x'; 100];
    let mut i = 0u64;
    while store.stats().evictions.get() == 0 {
        let key = format!("k{i:09}");
        set(&mut store, key.as_bytes(), &value, 1);
        i += 1;
    }
    let stats = store.stats();
    let items = stats.curr_items.get() as f64;
    let header = (stats.bytes.get() as f64 - items * 110.0) / items;
    let index = stats.index_bytes.get() as f64 / items;
    println!(
        "per-item overhead: {:.1} bytes ({header:.1} header + {index:.1} index) over {items} items of 10+100 bytes in 32 MiB",
        header + index
    );
    assert!(header + index <= 32.0, "{header} + {index}");
}
