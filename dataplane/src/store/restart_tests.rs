//! A store on a memory file, restarted: everything live comes back, nothing dead does, a file cut at any
//! step of a write restores to the state before or after it, and a file of another shape or a damaged
//! one is not believed.

use super::*;
use crate::clock::Expiry;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

const MIB: usize = 1 << 20;
const ORIGIN: u64 = 1_700_000_000;

/// A fresh path for a memory file, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let path = dir.join(format!("tandem-restart-{}-{name}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_file(&path);
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config(path: &Path, memory_bytes: usize) -> StoreConfig {
    StoreConfig {
        memory_bytes,
        item_size_max: 3 * MIB,
        evict: true,
        shard_index: 1,
        shard_count: 2,
        try_hugepages: false,
        memory_file: Some(path.to_path_buf()),
        clock_origin: ORIGIN,
    }
}

fn open(path: &Path, memory_bytes: usize) -> Store {
    Store::new(config(path, memory_bytes)).expect("a store on a memory file")
}

fn set(store: &mut Store, key: &[u8], value: &[u8], flags: u32, expiry: Expiry, now: RelTime) -> StoreResult {
    store.store(&StoreRequest { client_flags: flags, expiry, ..request_for(key, value) }, now)
}

fn delete(store: &mut Store, key: &[u8], now: RelTime) -> DeleteResult {
    store.delete(&DeleteRequest { key, compare_cas: None, invalidate: false, new_expiry: None, new_cas: None }, now)
}

fn big(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// A store with small, replaced, deleted, expiring, incremented, appended and spanning items.
fn populate(store: &mut Store, now: RelTime) {
    for i in 0..300u32 {
        let key = format!("key:{i}");
        let ttl = if i % 7 == 0 { Expiry::At(now + 1000) } else { Expiry::Never };
        set(store, key.as_bytes(), format!("value {i}").as_bytes(), i % 5, ttl, now);
    }
    for i in (0..300u32).step_by(3) {
        set(store, format!("key:{i}").as_bytes(), format!("replaced {i}").as_bytes(), 9, Expiry::Never, now);
    }
    for i in (0..300u32).step_by(10) {
        delete(store, format!("key:{i}").as_bytes(), now);
    }
    set(store, b"gone", b"soon", 0, Expiry::At(now + 1), now);
    set(store, b"counter", b"41", 0, Expiry::Never, now);
    store.arith(&ArithRequest { key: b"counter", incr: true, delta: 1, vivify: None, compare_cas: None, new_expiry: None, new_cas: None }, now);
    let mut append = StoreRequest { mode: StoreMode::Append, ..request_for(b"key:1", b"+tail") };
    append.client_flags = 0;
    store.store(&append, now);
    set(store, b"big", &big(2 * MIB + 12345, 1), 3, Expiry::Never, now);
    set(store, b"big", &big(MIB + 777, 2), 4, Expiry::Never, now);
}

fn request_for<'a>(key: &'a [u8], value: &'a [u8]) -> StoreRequest<'a> {
    StoreRequest {
        key,
        value,
        client_flags: 0,
        expiry: Expiry::Never,
        mode: StoreMode::Set,
        compare_cas: None,
        invalidate: false,
        new_cas: None,
        vivify_on_miss: None,
        key_binary: false,
    }
}

#[test]
fn a_restarted_store_holds_exactly_what_was_live() {
    let file = TempFile::new("live");
    let now = 100;
    let (before, last_cas) = {
        let mut store = open(&file.0, 16 * MIB);
        assert_eq!(store.backing().name(), "memory_file");
        assert_eq!(store.restored_mark(), None, "a new file restores nothing");
        populate(&mut store, now);
        let Some(cas) = store.peek(b"counter", now).map(|item| item.cas()) else { panic!("counter") };
        (contents(&store, now), cas)
    };
    let mut store = open(&file.0, 16 * MIB);
    assert!(Store::new(config(&file.0, 16 * MIB)).is_err(), "a file in use by another store is refused");
    store.check_invariants();
    assert_eq!(store.restored_mark().map(|m| m.kind), Some(MarkKind::None));
    assert_eq!(contents(&store, now), before, "every live item, value, flags, expiry and CAS");
    assert!(store.peek(b"key:10", now).is_none(), "a deleted item stays deleted");
    assert_eq!(store.peek(b"key:3", now).map(|item| item.client_flags()), Some(9), "the newer version wins");
    assert!(contents(&store, now + 5).iter().all(|(key, ..)| key != b"gone"), "expiry keeps its meaning");
    // New writes get CAS values never issued before, and the store keeps working.
    let StoreResult::Stored { cas } = set(&mut store, b"new", b"v", 0, Expiry::Never, now) else { panic!() };
    assert!(cas > last_cas);
    populate(&mut store, now);
    store.check_invariants();
}

#[test]
fn eviction_and_second_chances_never_resurrect_an_item() {
    let file = TempFile::new("evict");
    let now = 100;
    let before = {
        let mut store = open(&file.0, 4 * MIB);
        let value = vec![b'x'; 3000];
        for round in 0..2u32 {
            for i in 0..3000u32 {
                let key = format!("k{i}");
                set(&mut store, key.as_bytes(), &value[..1000 + (i as usize * 7 + round as usize) % 2000], round, Expiry::Never, now);
                if i % 3 == 0 {
                    store.get(format!("k{}", i / 2).as_bytes(), GetOptions::default(), now);
                }
            }
        }
        let stats = store.stats();
        assert!(stats.evictions.get() > 0 && stats.reinserted.get() > 0, "{} evictions, {} reinserted", stats.evictions.get(), stats.reinserted.get());
        contents(&store, now)
    };
    let store = open(&file.0, 4 * MIB);
    store.check_invariants();
    assert_eq!(contents(&store, now), before);
}

#[test]
fn flush_all_survives_a_restart() {
    let file = TempFile::new("flush");
    let now = 100;
    {
        let mut store = open(&file.0, 8 * MIB);
        set(&mut store, b"old", b"1", 0, Expiry::Never, now);
        set(&mut store, b"older", b"2", 0, Expiry::Never, now);
        store.flush(now);
        set(&mut store, b"new", b"3", 0, Expiry::Never, now);
    }
    let store = open(&file.0, 8 * MIB);
    store.check_invariants();
    let keys: Vec<_> = contents(&store, now).into_iter().map(|item| item.0).collect();
    assert_eq!(keys, vec![b"new".to_vec()]);
}

/// Runs `op` on a store restored from `file` while copying the file at every step a kill could cut;
/// then restarts from each copy. Every restored item is as it was before or after the operation, and
/// with `exact`, the whole store is.
fn cut_at_every_step(name: &str, memory: usize, prepare: impl Fn(&mut Store), op: impl Fn(&mut Store), exact: bool) {
    let file = TempFile::new(name);
    let now = 100;
    let before = {
        let mut store = open(&file.0, memory);
        prepare(&mut store);
        contents(&store, now)
    };
    let copies = Rc::new(RefCell::new(Vec::new()));
    let after = {
        let mut store = open(&file.0, memory);
        assert_eq!(contents(&store, now), before);
        let (path, sink) = (file.0.clone(), copies.clone());
        persist::checkpoints::set(Some(Box::new(move || sink.borrow_mut().push(std::fs::read(&path).unwrap()))));
        op(&mut store);
        persist::checkpoints::set(None);
        copies.borrow_mut().push(std::fs::read(&file.0).unwrap());
        contents(&store, now)
    };
    assert_ne!(before, after);
    let copies = copies.take();
    assert!(copies.len() >= 2, "the operation has steps to cut: {}", copies.len() - 1);
    let restart = TempFile::new(&format!("{name}-cut"));
    let mut seen_before = false;
    let mut seen_after = false;
    for (step, bytes) in copies.iter().enumerate() {
        std::fs::write(&restart.0, bytes).unwrap();
        let mut store = open(&restart.0, memory);
        store.check_invariants();
        let got = contents(&store, now);
        seen_before |= got == before;
        seen_after |= got == after;
        if exact {
            assert!(got == before || got == after, "cut at step {step}: neither the state before nor after");
        } else {
            for item in &got {
                assert!(before.contains(item) || after.contains(item), "cut at step {step}: {:?} was never stored", item.0);
            }
        }
        // The restored store takes writes as usual.
        set(&mut store, b"after-restart", b"ok", 0, Expiry::Never, now);
        store.check_invariants();
    }
    assert!(seen_before, "a cut before the write restores the state before");
    assert!(seen_after, "the finished write restores the state after");
}

#[test]
fn a_replacement_cut_at_any_step_restores_before_or_after() {
    let prepare = |store: &mut Store| {
        for i in 0..50 {
            set(store, format!("k{i}").as_bytes(), b"first", 1, Expiry::Never, 100);
        }
    };
    cut_at_every_step("replace", 8 * MIB, prepare, |store| {
        set(store, b"k7", b"second", 2, Expiry::Never, 100);
    }, true);
    cut_at_every_step("delete", 8 * MIB, prepare, |store| {
        delete(store, b"k9", 100);
    }, true);
    cut_at_every_step("spanning", 8 * MIB, prepare, |store| {
        set(store, b"k3", &big(2 * MIB + 99, 5), 3, Expiry::Never, 100);
    }, true);
}

#[test]
fn a_write_that_evicts_cut_at_any_step_resurrects_nothing() {
    let prepare = |store: &mut Store| {
        for i in 0..400 {
            set(store, format!("k{i}").as_bytes(), &[b'v'; 10_000], i, Expiry::Never, 100);
        }
        for i in (0..400).step_by(2) {
            store.get(format!("k{i}").as_bytes(), GetOptions::default(), 100);
        }
    };
    cut_at_every_step("evicting", 4 * MIB, prepare, |store| {
        let (evicted, reinserted) = (store.stats().evictions.get(), store.stats().reinserted.get());
        for i in 0..12 {
            set(store, format!("big{i}").as_bytes(), &[b'w'; 100_000], 7, Expiry::Never, 100);
        }
        assert!(store.stats().evictions.get() > evicted && store.stats().reinserted.get() > reinserted, "the write evicts and re-appends");
    }, false);
}

#[test]
fn a_file_of_another_shape_or_damaged_is_not_reused() {
    let file = TempFile::new("shape");
    let now = 100;
    let fill = |store: &mut Store| {
        for i in 0..100 {
            set(store, format!("k{i}").as_bytes(), b"value", 0, Expiry::Never, now);
        }
    };
    let reopen_empty = |config: StoreConfig| {
        let store = Store::new(config).expect("a mismatched file is replaced, not an error");
        store.check_invariants();
        assert_eq!(store.restored_mark(), None);
        assert!(contents(&store, now).is_empty());
    };
    let mut store = open(&file.0, 8 * MIB);
    fill(&mut store);
    drop(store);
    reopen_empty(StoreConfig { shard_count: 3, ..config(&file.0, 8 * MIB) });
    for change in [
        StoreConfig { shard_index: 0, ..config(&file.0, 8 * MIB) },
        StoreConfig { clock_origin: ORIGIN + 1, ..config(&file.0, 8 * MIB) },
        config(&file.0, 12 * MIB),
    ] {
        let mut store = open(&file.0, 8 * MIB);
        fill(&mut store);
        drop(store);
        reopen_empty(change);
    }
    // Damage: the magic, a segment link that loops, an item header.
    let damage = |offset: usize, bytes: &[u8]| {
        let mut store = open(&file.0, 8 * MIB);
        fill(&mut store);
        assert!(!contents(&store, now).is_empty());
        drop(store);
        let mut data = std::fs::read(&file.0).unwrap();
        data[offset..offset + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&file.0, &data).unwrap();
        reopen_empty(config(&file.0, 8 * MIB));
    };
    damage(0, b"NOTTANDM");
    let table = persist::HEADER_LEN;
    let mut store = open(&file.0, 8 * MIB);
    fill(&mut store);
    drop(store);
    let oldest = u32::from_le_bytes(std::fs::read(&file.0).unwrap()[table..table + 4].try_into().unwrap()) as usize;
    assert!(oldest < 8);
    // The oldest segment's next link points at itself.
    damage(table + 16 * (oldest + 1) + 8, &(oldest as u32).to_le_bytes());
    let items_at = super::arena::HUGE_PAGE_SIZE + oldest * SEGMENT_SIZE;
    damage(items_at + 1, &[0x20]);
    damage(items_at, &[0xff, 0x00]);
}

/// A change sink that only counts positions, standing in for the replication log.
struct CountingSink(u64);

impl ChangeSink for CountingSink {
    fn set(&mut self, _: &ItemRef<'_>) {
        self.0 += 1;
    }
    fn delete(&mut self, _: &[u8]) {
        self.0 += 1;
    }
    fn touch(&mut self, _: &[u8], _: RelTime) {
        self.0 += 1;
    }
    fn flush(&mut self) {
        self.0 += 1;
    }
    fn position(&self) -> u64 {
        self.0
    }
    fn end_round(&mut self) -> bool {
        false
    }
}

#[test]
fn the_replication_mark_survives_and_an_active_change_makes_it_unusable_until_logged() {
    let file = TempFile::new("mark");
    let now = 100;
    let history = [7u8; persist::HISTORY_LEN];
    let logged = |seq| ReplicationMark { kind: MarkKind::Logged, history, epoch: 3, seq };
    {
        let mut store = open(&file.0, 8 * MIB);
        store.set_change_sink(Box::new(CountingSink(0)));
        store.set_replication_mark(&logged(0));
        set(&mut store, b"a", b"1", 0, Expiry::Never, now);
        // Killed here: the change is not logged as far as the mark knows.
    }
    let mut store = open(&file.0, 8 * MIB);
    assert_eq!(store.restored_mark().map(|m| m.kind), Some(MarkKind::ActiveChanging));
    assert!(!store.restored_mark().unwrap().usable());
    store.set_change_sink(Box::new(CountingSink(1)));
    store.set_replication_mark(&logged(1));
    drop(store);
    let mut store = open(&file.0, 8 * MIB);
    assert_eq!(store.restored_mark(), Some(logged(1)));
    assert!(store.restored_mark().unwrap().usable());
    // A standby's mark: reads change nothing, and applying does not touch the mark by itself.
    let applied = ReplicationMark { kind: MarkKind::Applied, history, epoch: 4, seq: 17 };
    store.set_read_only(true);
    store.set_replication_mark(&applied);
    store.apply_set(b"b", 0, Expiry::Never, 99, b"2", now);
    drop(store);
    let mut store = open(&file.0, 8 * MIB);
    assert_eq!(store.restored_mark(), Some(applied));
    store.discard_restored();
    assert!(contents(&store, now).is_empty());
    drop(store);
    assert_eq!(open(&file.0, 8 * MIB).restored_mark().map(|m| m.kind), Some(MarkKind::None));
}
