//! The store engine: memcached's item operations over the arena, the segment log and the index.
//!
//! Writing appends an item at the open segment and points the index at it; an older item of the same
//! key is only forgotten (index and live accounting), its bytes are recovered when its segment is
//! reclaimed. When a write needs a segment and none is free, the oldest segment of the log is
//! reclaimed: each item in it that the index still points at is dropped if expired, given a second
//! chance (re-appended at the head, `ACCESSED` cleared) if it was read since it was last written and is
//! small, and evicted otherwise. Re-appends are capped at half a segment per reclaimed segment on
//! average (unused allowance carries over, up to three quarters of a segment for one reclaim), and one
//! free segment is kept in reserve for them, so every reclaim frees memory and always has room.
//! Without eviction (`-M`), only segments holding no live unexpired item are reclaimed.
//!
//! Expired items are removed lazily when a lookup finds them and in bounded batches by [`Store::tick`].
//!
//! `flush_all` is lazy too, as in memcached: [`Store::flush`] records the next CAS to be issued as a
//! watermark, and every item below it is dead. CAS values only grow within a store (the meta `E` flag,
//! which could choose lower ones, is not offered; an explicit lower CAS would count as flushed, as in
//! memcached's `oldest_cas` rule). A lookup that meets a flushed item removes it and counts
//! `get_flushed`; [`Store::tick`] reclaims the rest like expired items once reads had a grace period to
//! find them, and reclaiming a segment drops them without counting evictions. `curr_items` and `bytes`
//! fall as flushed items are actually removed, as memcached's do. When nothing was written since the
//! flush, the first tick after the grace resets the whole store instead of scanning it, and a flush of
//! a store that holds no live item resets it at once.
//!
//! With a memory file (see `persist`), an item that stops being its key's item (replaced, deleted,
//! evicted, reclaimed, moved by a second chance) is also marked DEAD in its header, after the write
//! that replaced it is published, and [`Store::new`] rebuilds the index from the segments.
//!
//! Hot paths allocate nothing: reads return [`ItemRef`]s borrowed from the arena, writes copy into it.
//! The exceptions are amortized: the index grows by half when full, and append/prepend assemble the new
//! value in a scratch buffer the store keeps (a reclaim during the write may move the old value).

use super::arena::Arena;
use super::decimal;
use super::index::{self, tag_of, Index};
use super::item::{self, Header, ValueChunks, ACCESSED, FETCHED, KEY_BINARY, STALE, WIN_SENT};
use super::persist::{FileHeader, MarkKind, ReplicationMark, Shape, HEADER_LEN};
use super::segment::{
    address, offset_of, SegmentId, SegmentMeta, SegmentTable, Segments, NO_SEGMENT, RESERVED_SEGMENTS, SEGMENT_SIZE, SMALL_ITEM_MAX,
};
use super::*;
use crate::route::key_hash;
use std::ops::ControlFlow;
use std::sync::Arc;

/// The index is presized for items of about this many bytes.
const PRESIZE_BYTES_PER_ITEM: usize = 256;
/// Fewest segments a store runs with: the reserve, one to reclaim, one to write.
const MIN_SEGMENTS: usize = RESERVED_SEGMENTS + 2;
/// Re-append credit earned per reclaimed segment: on average a reclaim frees at least half a segment.
const REINSERT_CREDIT: usize = SEGMENT_SIZE / 2;
/// Most credit one reclaim may spend (unspent credit carries over up to this), so a segment dense with
/// recently read items keeps more of them; below a segment, so every reclaim still frees memory.
const REINSERT_CREDIT_MAX: usize = SEGMENT_SIZE * 3 / 4;
/// Index slots [`Store::tick`] examines per call.
const TICK_SLOTS: usize = 4096;
/// The append/prepend scratch buffer is released after use when it grew beyond this.
const SCRATCH_KEEP: usize = 2 * SEGMENT_SIZE;
/// Seconds after a flush during which [`Store::tick`] leaves flushed items for reads to find and count
/// as `get_flushed` (reads and segment reclaim remove them at any time). Two, so that at least one full
/// second passes whatever the phase of the once-per-second tick.
const FLUSH_GRACE_SECS: RelTime = 2;

/// One shard's item store.
pub struct Store {
    arena: Arena,
    segments: Segments,
    index: Index,
    stats: Arc<StoreStats>,
    item_size_max: usize,
    /// Largest item (header, key and value) the memory limit can hold at all.
    max_item_len: usize,
    /// Segments the log may hold: all of the arena's, or fewer after [`Store::set_memory_limit`].
    segment_limit: usize,
    evict: bool,
    cas_sequence: u64,
    shard_index: u64,
    shard_count: u64,
    /// Where [`Store::tick`] resumes its scan of the index.
    tick_cursor: usize,
    /// Bytes the next reclaim may re-append.
    reinsert_credit: usize,
    /// Reused by append/prepend.
    scratch: Vec<u8>,
    /// The last `flush_all`.
    flush_mark: FlushMark,
    /// Where client changes are reported (the replication log), if anywhere.
    changes: Option<Box<dyn ChangeSink>>,
    /// A standby's store: reads change nothing (no bump, no fetched mark, no touch, no vivify, no win).
    read_only: bool,
    /// The highest CAS applied from a replication log.
    applied_cas_max: u64,
    /// The memory file's header, with a memory file.
    file: Option<FileHeader>,
    /// CAS sequence numbers below this are reserved in the memory file (it is written ahead in steps of
    /// [`CAS_RESERVE`], so a restarted store never issues a CAS again).
    cas_reserved: u64,
    /// The replication mark the memory file held when this store was restored from it.
    restored: Option<ReplicationMark>,
}

/// CAS sequence numbers reserved in the memory file at a time.
const CAS_RESERVE: u64 = 4096;

/// What the store remembers of the last `flush_all` (see the module docs).
#[derive(Clone, Copy, Default)]
struct FlushMark {
    /// Items whose CAS is below this were flushed; 0 when no flush happened.
    below_cas: u64,
    /// When the flush happened.
    at: RelTime,
    /// Every item in the store is flushed (nothing was written since), so tick may reset the store.
    only_flushed_items: bool,
}

/// A borrowed view of one stored item.
pub struct ItemRef<'s> {
    arena: &'s [u8],
    segments: &'s [SegmentMeta],
    addr: usize,
    header: Header,
    header_len: usize,
    /// The time of the operation that produced this view (to widen the 16-bit last access).
    now: RelTime,
}

impl<'s> ItemRef<'s> {
    fn new(store: &'s Store, addr: usize, now: RelTime) -> ItemRef<'s> {
        ItemRef::from_parts(store.arena.bytes(), store.segments.metas(), addr, now)
    }

    fn from_parts(arena: &'s [u8], segments: &'s [SegmentMeta], addr: usize, now: RelTime) -> ItemRef<'s> {
        let header = Header::decode(&arena[addr..]);
        ItemRef { arena, segments, addr, header, header_len: header.encoded_len(), now }
    }

    fn value_addr(&self) -> usize {
        self.addr + self.header_len + self.header.key_len as usize
    }
}

impl ItemView for ItemRef<'_> {
    fn key(&self) -> &[u8] {
        let at = self.addr + self.header_len;
        &self.arena[at..at + self.header.key_len as usize]
    }
    fn client_flags(&self) -> u32 {
        self.header.client_flags
    }
    fn cas(&self) -> u64 {
        self.header.cas
    }
    fn exptime(&self) -> RelTime {
        self.header.exptime
    }
    fn value_len(&self) -> usize {
        self.header.value_len as usize
    }
    fn key_binary(&self) -> bool {
        self.header.bits & KEY_BINARY != 0
    }
    fn value_chunks(&self) -> ValueChunks<'_> {
        ValueChunks::in_arena(self.arena, self.segments, self.value_addr(), self.value_len())
    }
}

impl ItemDebug for ItemRef<'_> {
    /// Reconstructed from 16 bits, so exact for the last 18 hours (see `item`).
    fn last_access(&self) -> RelTime {
        self.now.wrapping_sub(self.header.idle_secs(self.now))
    }
    fn fetched(&self) -> bool {
        self.header.bits & FETCHED != 0
    }
    fn total_size(&self) -> usize {
        self.header.total_len()
    }
}

/// Not enough memory for a write (only without eviction, or for impossible sizes).
struct NoSpace;

/// A live item found by key.
#[derive(Clone, Copy)]
struct Found {
    slot: usize,
    addr: usize,
    header: Header,
}

/// An item to write.
struct NewItem<'a> {
    key: &'a [u8],
    value: &'a [u8],
    client_flags: u32,
    exptime: RelTime,
    cas: u64,
    bits: u8,
}

impl NewItem<'_> {
    fn header(&self, now: RelTime) -> Header {
        Header {
            key_len: self.key.len() as u8,
            bits: self.bits,
            last_access: now as u16,
            exptime: self.exptime,
            cas: self.cas,
            client_flags: self.client_flags,
            value_len: self.value.len() as u32,
        }
    }
}

/// An item met while walking a segment.
struct SegmentItem {
    addr: usize,
    header: Header,
    tag: u32,
    /// The index slot pointing at it; `None` when the item is dead (deleted or replaced).
    slot: Option<usize>,
}

/// The CAS test of a store request against the existing item (memcached's `cas_res`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CasCheck {
    /// No CAS given (or 0).
    Absent,
    Match,
    /// Lower than the item's, with invalidation allowed.
    Stale,
    Mismatch,
}

impl Store {
    /// Maps the arena and builds an empty store, or with a memory file, the store the file holds (see
    /// [`Store::restored_mark`]); a file that does not hold a store of this shape is reinitialized.
    pub fn new(config: StoreConfig) -> Result<Store, StoreError> {
        let addressable = (index::MAX_ADDRESS + 1) & !(SEGMENT_SIZE - 1);
        if config.memory_bytes > addressable {
            tracing::warn!(requested = config.memory_bytes, used = addressable, "shard memory capped by the index");
        }
        let segment_count = config.memory_bytes.min(addressable) / SEGMENT_SIZE;
        if segment_count < MIN_SEGMENTS {
            return Err(StoreError::TooSmall { memory: config.memory_bytes, item_size_max: config.item_size_max });
        }
        let (arena, segments, file, reused) = match &config.memory_file {
            None => (Arena::map(segment_count * SEGMENT_SIZE, config.try_hugepages)?, Segments::new(segment_count, None), None, false),
            Some(path) => {
                let table_len = super::segment::table_len(segment_count);
                let mapped = Arena::map_file(path, HEADER_LEN, table_len, segment_count * SEGMENT_SIZE)?;
                let table = SegmentTable::new(mapped.table);
                let mut header = FileHeader::new(mapped.header);
                let shape = file_shape(&config, segment_count);
                let checked = if mapped.reused { header.check(&shape) } else { Err("a new file".into()) };
                let restored = match checked {
                    Ok(()) => Segments::restore(segment_count, table),
                    Err(why) => Err((table, why)),
                };
                let (segments, reused) = match restored {
                    Ok(segments) => (segments, true),
                    Err((table, why)) => {
                        if mapped.reused {
                            tracing::warn!(path = %path.display(), %why, "memory file not reused: starting empty");
                        }
                        header.invalidate();
                        let segments = Segments::new(segment_count, Some(table));
                        header.init(&shape);
                        (segments, false)
                    }
                };
                (mapped.arena, segments, Some(header), reused)
            }
        };
        let index = Index::with_items(arena.len() / PRESIZE_BYTES_PER_ITEM);
        let stats = Arc::new(StoreStats::default());
        stats.segments_total.set(segment_count as u64);
        stats.index_bytes.set(index.bytes() as u64);
        let shard_count = config.shard_count.max(1) as u64;
        let mut store = Store {
            arena,
            segments,
            index,
            stats,
            item_size_max: config.item_size_max,
            max_item_len: (segment_count - RESERVED_SEGMENTS) * SEGMENT_SIZE,
            segment_limit: segment_count,
            evict: config.evict,
            cas_sequence: 0,
            shard_index: (config.shard_index as u64) % shard_count,
            shard_count,
            tick_cursor: 0,
            reinsert_credit: 0,
            scratch: Vec::new(),
            flush_mark: FlushMark::default(),
            changes: None,
            read_only: false,
            applied_cas_max: 0,
            file,
            cas_reserved: 0,
            restored: None,
        };
        if reused {
            match store.rebuild() {
                Ok(()) => {
                    let mark = store.file.as_ref().map_or(ReplicationMark::NONE, FileHeader::mark);
                    tracing::info!(
                        items = store.stats.curr_items.get(),
                        bytes = store.stats.bytes.get(),
                        segments = store.segments.in_use(),
                        ?mark,
                        "store restored from its memory file"
                    );
                    store.restored = Some(mark);
                }
                Err(why) => {
                    tracing::warn!(%why, "memory file not reused: its contents are damaged; starting empty");
                    store.start_empty_file(&file_shape(&config, segment_count));
                }
            }
        }
        Ok(store)
    }

    /// The replication mark of the memory file this store was restored from (`None`: not restored).
    pub fn restored_mark(&self) -> Option<ReplicationMark> {
        self.restored
    }

    /// Records where the contents stand in a replication history (a memory file keeps it; without one
    /// this does nothing). See `persist` for the rule it must follow.
    pub fn set_replication_mark(&mut self, mark: &ReplicationMark) {
        if let Some(file) = self.file.as_mut() {
            file.set_mark(mark);
        }
    }

    /// Empties the store and its memory file (a restored store whose position cannot be used).
    pub fn discard_restored(&mut self) {
        self.restored = None;
        self.reset();
        self.set_replication_mark(&ReplicationMark::NONE);
    }

    /// Reinitializes the memory file for an empty store.
    fn start_empty_file(&mut self, shape: &Shape) {
        self.restored = None;
        if let Some(file) = self.file.as_mut() {
            file.invalidate();
        }
        self.reset();
        self.flush_mark = FlushMark::default();
        self.cas_sequence = 0;
        self.cas_reserved = 0;
        self.applied_cas_max = 0;
        if let Some(file) = self.file.as_mut() {
            file.init(shape);
        }
    }

    /// Rebuilds the index and the accounting from the items the segments hold: the log is walked from
    /// the oldest segment, each segment up to its write offset; items marked dead or flushed are
    /// skipped, and a later copy of a key replaces an earlier one. An item cut by a kill (a large one
    /// whose later segments were not all written) is skipped; anything else that does not decode is
    /// damage (`Err`). Expired items are linked and expire lazily as always.
    fn rebuild(&mut self) -> Result<(), String> {
        let file = self.file.as_ref().expect("a memory file");
        let (flush_below, flush_at) = file.flush();
        self.flush_mark = FlushMark { below_cas: flush_below, at: flush_at, only_flushed_items: false };
        let mut cas_max = 0u64;
        let log: Vec<SegmentId> = self.segments.log().map(|(segment, _)| segment).collect();
        for &segment in &log {
            let meta = *self.segments.meta(segment);
            let mut offset = meta.first_item as usize;
            let end = meta.write_offset as usize;
            while offset < end {
                let addr = address(segment, offset);
                let bytes = &self.arena.bytes()[addr..address(segment, 0) + end];
                let header_len = item::checked_header_len(bytes).ok_or_else(|| format!("segment {segment} offset {offset}: no item header"))?;
                let header = Header::decode(bytes);
                let head_len = header_len + header.key_len as usize;
                let total = head_len + header.value_len as usize;
                if header.key_len as usize > MAX_KEY_LEN || head_len > bytes.len() || total > self.max_item_len {
                    return Err(format!("segment {segment} offset {offset}: an impossible item"));
                }
                let complete = if offset + total <= end {
                    true
                } else if offset + total > SEGMENT_SIZE && end == SEGMENT_SIZE {
                    self.spanning_item_complete(segment, offset + total - SEGMENT_SIZE)
                } else {
                    return Err(format!("segment {segment} offset {offset}: an item past the write offset"));
                };
                if !complete {
                    // Cut by a kill: only the newest item can be, and a resync re-applies it.
                    break;
                }
                offset += total;
                if item::is_marked_dead(bytes) || self.is_flushed(&header) {
                    continue;
                }
                cas_max = cas_max.max(header.cas);
                let mut key = [0u8; MAX_KEY_LEN];
                let key = {
                    let stored = item::key_of(bytes);
                    key[..stored.len()].copy_from_slice(stored);
                    &key[..stored.len()]
                };
                self.link(key, tag_of(key_hash(key)), addr, total);
            }
        }
        let persisted = self.file.as_ref().map_or(0, FileHeader::cas_sequence);
        let from_items = if cas_max == 0 { 0 } else { cas_max.saturating_sub(self.shard_index + 1) / self.shard_count + 1 };
        self.cas_sequence = persisted.max(from_items);
        self.cas_reserved = self.cas_sequence;
        self.applied_cas_max = cas_max;
        // A kill while a reclaim was using the reserved segment leaves none free: reclaim again.
        while self.evict && self.segments.free_count() < RESERVED_SEGMENTS && self.evict_oldest(0) {}
        self.stats.segments_used.set(self.segments.in_use() as u64);
        Ok(())
    }

    /// Whether the later segments of an item spanning from a segment hold its last `rest` bytes.
    fn spanning_item_complete(&self, from: SegmentId, mut rest: usize) -> bool {
        let mut segment = self.segments.meta(from).next;
        while rest > 0 {
            if segment == NO_SEGMENT {
                return false;
            }
            let meta = self.segments.meta(segment);
            let piece = rest.min(SEGMENT_SIZE);
            if meta.first_item as usize != piece || (meta.write_offset as usize) < piece {
                return false;
            }
            rest -= piece;
            segment = meta.next;
        }
        true
    }

    /// Where the arena's memory came from.
    pub fn backing(&self) -> Backing {
        self.arena.backing()
    }

    /// The store's counters, shareable with the thread that answers `stats`.
    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    /// Largest value accepted.
    pub fn item_size_max(&self) -> usize {
        self.item_size_max
    }

    /// Changes this store's memory limit (its share of `cache_memlimit`) to `bytes`, in whole segments,
    /// up to the arena mapped at start-up. Lowering it evicts nothing at once: from the next write on, the
    /// oldest segments are reclaimed until the log fits (memcached too stops taking pages and evicts as
    /// it needs room). Without eviction (`-M`) writes fail until enough items expire or are deleted.
    pub fn set_memory_limit(&mut self, bytes: usize) -> Result<(), StoreError> {
        let segments = bytes / SEGMENT_SIZE;
        let most = self.arena.len() / SEGMENT_SIZE;
        if !(MIN_SEGMENTS..=most).contains(&segments) {
            return Err(StoreError::LimitOutOfRange { bytes, least: MIN_SEGMENTS * SEGMENT_SIZE, most: self.arena.len() });
        }
        self.segment_limit = segments;
        self.max_item_len = (segments - RESERVED_SEGMENTS) * SEGMENT_SIZE;
        self.stats.segments_total.set(segments as u64);
        Ok(())
    }

    /// The first half of a prefetch for a request about to run on the key with this hash
    /// ([`crate::route::key_hash`]): starts loading its index slot. Run it for a batch of requests, then
    /// [`Store::prefetch_item`] for the same batch, then the requests: their cache misses overlap
    /// instead of each one waiting for its own two (the index slot, then the item).
    #[inline]
    pub fn prefetch_index(&self, hash: u64) {
        self.index.prefetch_home(tag_of(hash));
    }

    /// The second half (see [`Store::prefetch_index`]): starts loading the item the key's home slot
    /// points at, its header and key (and, for small items, its value).
    #[inline]
    pub fn prefetch_item(&self, hash: u64) {
        if let Some(addr) = self.index.home_address(tag_of(hash)) {
            let bytes = self.arena.bytes();
            super::arena::prefetch(&bytes[addr]);
            if let Some(next_line) = bytes.get((addr | 63) + 1) {
                super::arena::prefetch(next_line);
            }
        }
    }

    /// A read; may touch, vivify, mark fetched, bump.
    pub fn get(&mut self, key: &[u8], options: GetOptions, now: RelTime) -> GetResult<'_> {
        let options = if self.read_only { GetOptions { no_bump: true, ..GetOptions::default() } } else { options };
        if options.touch.is_some() || options.vivify.is_some() {
            self.begin_change();
        }
        let tag = tag_of(key_hash(key));
        let Some(Found { addr, header, .. }) = self.lookup_live(key, tag, now) else {
            return match options.vivify {
                Some(expiry) => self.vivify(key, tag, expiry, options.no_bump, now),
                None => GetResult::Miss,
            };
        };
        let already_won = header.bits & WIN_SENT != 0;
        let stale = header.bits & STALE != 0;
        // A live item with an expiry has `exptime > now`.
        let recache = options.recache_below.is_some_and(|below| header.exptime != 0 && header.exptime - now < below);
        let won = !already_won && (stale || recache);
        let mut bits = header.bits;
        if won {
            bits |= WIN_SENT;
        }
        let bytes = &mut self.arena.bytes_mut()[addr..];
        if !options.no_bump {
            bits |= FETCHED | ACCESSED;
            item::set_last_access(bytes, now);
        }
        if bits != header.bits {
            item::set_bits(bytes, bits);
        }
        if let Some(expiry) = options.touch {
            item::set_exptime(bytes, expiry.as_rel());
            if let Some(changes) = self.changes.as_mut() {
                changes.touch(key, expiry.as_rel());
            }
        }
        GetResult::Hit(Hit {
            item: ItemRef::new(self, addr, now),
            fetched_before: header.bits & FETCHED != 0,
            idle_secs: header.idle_secs(now),
            won,
            stale,
            already_won,
        })
    }

    /// A read with no side effects at all (meta `me`, and tests). Expired and flushed items are not
    /// returned (nor removed, nor counted).
    pub fn peek(&self, key: &[u8], now: RelTime) -> Option<ItemRef<'_>> {
        let (_, addr) = self.find(key, tag_of(key_hash(key)))?;
        let item = ItemRef::new(self, addr, now);
        (!self.is_dead(&item.header, now)).then_some(item)
    }

    /// A storage command. A SET (without CAS) that fails for size or memory also removes the old item,
    /// as memcached's text protocol does, so stale data does not outlive a failed overwrite.
    pub fn store(&mut self, request: &StoreRequest<'_>, now: RelTime) -> StoreResult {
        self.begin_change();
        let key = request.key;
        let tag = tag_of(key_hash(key));
        let unconditional_set = request.mode == StoreMode::Set && request.compare_cas.is_none();
        if key.len() > MAX_KEY_LEN
            || request.value.len() > self.item_size_max
            || self.item_len(key.len(), request.value.len(), request.client_flags) > self.max_item_len
        {
            if unconditional_set {
                self.remove(key, tag);
            }
            return StoreResult::TooLarge;
        }
        // CAS given with set/replace makes the command memcached's NREAD_CAS.
        let cas_command = request.compare_cas.is_some() && matches!(request.mode, StoreMode::Set | StoreMode::Replace);
        // Items written from the request's own value remember a base64 key; combined ones do not.
        let key_bit = if request.key_binary { KEY_BINARY } else { 0 };
        let Some(old) = self.lookup_live(key, tag, now) else {
            if cas_command {
                return StoreResult::NotFound;
            }
            let exptime = match (request.mode, request.vivify_on_miss) {
                (StoreMode::Set | StoreMode::Add, _) => request.expiry.as_rel(),
                (StoreMode::Append | StoreMode::Prepend, Some(expiry)) => expiry.as_rel(),
                (StoreMode::Replace | StoreMode::Append | StoreMode::Prepend, _) => return StoreResult::NotStored,
            };
            return self.store_value(request, tag, request.value, request.client_flags, exptime, key_bit, now);
        };
        let check = match request.compare_cas {
            None | Some(0) => CasCheck::Absent,
            Some(cas) if cas == old.header.cas => CasCheck::Match,
            Some(cas) if request.invalidate && cas < old.header.cas => CasCheck::Stale,
            Some(_) => CasCheck::Mismatch,
        };
        match request.mode {
            StoreMode::Add => {
                self.bump(old.addr, old.header, now);
                StoreResult::NotStored
            }
            StoreMode::Set | StoreMode::Replace if cas_command => match check {
                CasCheck::Match => self.store_value(
                    request,
                    tag,
                    request.value,
                    request.client_flags,
                    request.expiry.as_rel(),
                    key_bit,
                    now,
                ),
                // memcached keeps the old TTL and win token and marks the new value stale.
                CasCheck::Stale => {
                    let bits = STALE | (old.header.bits & WIN_SENT) | key_bit;
                    self.store_value(request, tag, request.value, request.client_flags, old.header.exptime, bits, now)
                }
                CasCheck::Absent | CasCheck::Mismatch => StoreResult::Exists,
            },
            StoreMode::Set | StoreMode::Replace => self.store_value(
                request,
                tag,
                request.value,
                request.client_flags,
                request.expiry.as_rel(),
                key_bit,
                now,
            ),
            StoreMode::Append | StoreMode::Prepend => {
                if matches!(check, CasCheck::Stale | CasCheck::Mismatch) {
                    return StoreResult::Exists;
                }
                let len = old.header.value_len as usize + request.value.len();
                // memcached cannot allocate the combined item and answers NOT_STORED.
                if len > self.item_size_max
                    || self.item_len(key.len(), len, old.header.client_flags) > self.max_item_len
                {
                    return StoreResult::NotStored;
                }
                let mut combined = std::mem::take(&mut self.scratch);
                combined.clear();
                if request.mode == StoreMode::Prepend {
                    combined.extend_from_slice(request.value);
                }
                for chunk in ItemRef::new(self, old.addr, now).value_chunks() {
                    combined.extend_from_slice(chunk);
                }
                if request.mode == StoreMode::Append {
                    combined.extend_from_slice(request.value);
                }
                let result =
                    self.store_value(request, tag, &combined, old.header.client_flags, old.header.exptime, 0, now);
                if combined.capacity() <= SCRATCH_KEEP {
                    self.scratch = combined;
                }
                result
            }
        }
    }

    /// Writes the value of a store request that passed its checks.
    #[allow(clippy::too_many_arguments)]
    fn store_value(
        &mut self,
        request: &StoreRequest<'_>,
        tag: u32,
        value: &[u8],
        client_flags: u32,
        exptime: RelTime,
        bits: u8,
        now: RelTime,
    ) -> StoreResult {
        let cas = request.new_cas.unwrap_or_else(|| self.next_cas());
        let new = NewItem { key: request.key, value, client_flags, exptime, cas, bits };
        match self.write_and_link(&new, tag, now) {
            Ok(addr) => {
                self.report_set(addr, now);
                StoreResult::Stored { cas }
            }
            Err(NoSpace) => {
                self.stats.outofmemory.incr();
                if request.mode == StoreMode::Set && request.compare_cas.is_none() {
                    self.remove(request.key, tag);
                }
                StoreResult::OutOfMemory
            }
        }
    }

    pub fn delete(&mut self, request: &DeleteRequest<'_>, now: RelTime) -> DeleteResult {
        self.begin_change();
        let tag = tag_of(key_hash(request.key));
        let Some(Found { slot, addr, header }) = self.lookup_live(request.key, tag, now) else {
            return DeleteResult::NotFound;
        };
        if request.compare_cas.is_some_and(|cas| cas != header.cas) {
            return DeleteResult::Exists;
        }
        if request.invalidate {
            // memcached md I: keep the item, mark it stale, new CAS, and let the next reader win again.
            let cas = request.new_cas.unwrap_or_else(|| self.next_cas());
            let bytes = &mut self.arena.bytes_mut()[addr..];
            item::set_bits(bytes, (header.bits | STALE) & !WIN_SENT);
            item::set_cas(bytes, cas);
            if let Some(expiry) = request.new_expiry {
                item::set_exptime(bytes, expiry.as_rel());
            }
            self.report_set(addr, now);
        } else {
            self.unlink(slot, addr, &header);
            if let Some(changes) = self.changes.as_mut() {
                changes.delete(request.key);
            }
        }
        DeleteResult::Deleted
    }

    /// incr/decr, stored as memcached 1.6 does: a result no longer than the stored value is written in
    /// place and padded with spaces to the old length (`100` decremented reads `99 `); a longer one
    /// becomes a new item of its own length, which like memcached's fresh allocation keeps the flags
    /// and expiry but none of the state bits (fetched, stale, win, base64 key).
    pub fn arith(&mut self, request: &ArithRequest<'_>, now: RelTime) -> ArithResult {
        self.begin_change();
        let key = request.key;
        let tag = tag_of(key_hash(key));
        let mut digits = [0u8; decimal::MAX_DIGITS];
        let Some(old) = self.lookup_live(key, tag, now) else {
            let Some((expiry, initial)) = request.vivify else {
                return ArithResult::NotFound;
            };
            let cas = request.new_cas.unwrap_or_else(|| self.next_cas());
            let exptime = expiry.as_rel();
            let value = decimal::format_u64(initial, &mut digits);
            let new = NewItem { key, value, client_flags: 0, exptime, cas, bits: 0 };
            return match self.write_and_link(&new, tag, now) {
                Ok(addr) => {
                    self.report_set(addr, now);
                    ArithResult::Value { value: initial, cas, exptime }
                }
                Err(NoSpace) => {
                    self.stats.outofmemory.incr();
                    ArithResult::OutOfMemory
                }
            };
        };
        // As in memcached, a CAS of 0 means "no CAS".
        if request.compare_cas.is_some_and(|cas| cas != 0 && cas != old.header.cas) {
            return ArithResult::Exists;
        }
        let Some(current) = self.contiguous_value(old.addr, &old.header).and_then(decimal::parse_u64) else {
            return ArithResult::NonNumeric;
        };
        let value =
            if request.incr { current.wrapping_add(request.delta) } else { current.saturating_sub(request.delta) };
        let text = decimal::format_u64(value, &mut digits);
        let cas = request.new_cas.unwrap_or_else(|| self.next_cas());
        let exptime = request.new_expiry.map_or(old.header.exptime, Expiry::as_rel);
        let old_len = old.header.value_len as usize;
        if text.len() <= old_len {
            // The value is contiguous (it was parsed above): rewrite it in place, space-padded.
            let value_at = old.addr + old.header.encoded_len() + old.header.key_len as usize;
            let bytes = self.arena.bytes_mut();
            bytes[value_at..value_at + text.len()].copy_from_slice(text);
            bytes[value_at + text.len()..value_at + old_len].fill(b' ');
            item::set_cas(&mut bytes[old.addr..], cas);
            item::set_exptime(&mut bytes[old.addr..], exptime);
            self.report_set(old.addr, now);
        } else {
            let new = NewItem { key, value: text, client_flags: old.header.client_flags, exptime, cas, bits: 0 };
            match self.write_and_link(&new, tag, now) {
                Ok(addr) => self.report_set(addr, now),
                Err(NoSpace) => {
                    self.stats.outofmemory.incr();
                    return ArithResult::OutOfMemory;
                }
            }
        }
        ArithResult::Value { value, cas, exptime }
    }

    /// Invalidates every item present (flush_all once its time has come): records the watermark, so
    /// that later lookups treat these items as gone (see the module docs). Items written afterwards
    /// are unaffected. A store without live items is reset at once.
    pub fn flush(&mut self, now: RelTime) {
        self.begin_change();
        if let Some(changes) = self.changes.as_mut() {
            changes.flush();
        }
        self.flush_below(self.peek_next_cas(), now);
    }

    /// Invalidates every item whose CAS is below `below_cas`, without reporting it.
    fn flush_below(&mut self, below_cas: u64, now: RelTime) {
        let only_flushed_items = self.stats.curr_items.get() > 0;
        self.flush_mark = FlushMark { below_cas, at: now, only_flushed_items };
        if let Some(file) = self.file.as_mut() {
            file.set_flush(below_cas, now);
        }
        if !only_flushed_items {
            self.reset();
        }
    }

    /// Drops every item and returns all memory to the free list.
    fn reset(&mut self) {
        self.index.clear();
        self.segments.reset();
        self.tick_cursor = 0;
        self.flush_mark.only_flushed_items = false;
        self.stats.curr_items.set(0);
        self.stats.bytes.set(0);
        self.stats.segments_used.set(0);
    }

    /// Background reclaim: examines a window of index slots and removes the expired items there, and
    /// flushed ones once the flush is [`FLUSH_GRACE_SECS`] old (resetting the store instead when it
    /// holds nothing else); returns how many were removed (also counted in `reclaimed`).
    pub fn tick(&mut self, now: RelTime) -> usize {
        let reclaim_flushed = now >= self.flush_mark.at.saturating_add(FLUSH_GRACE_SECS);
        if reclaim_flushed && self.flush_mark.only_flushed_items {
            // Which of them were fetched is not known without the scan this avoids: no expired_unfetched.
            let removed = self.stats.curr_items.get();
            self.stats.reclaimed.add(removed);
            self.reset();
            return removed as usize;
        }
        let capacity = self.index.capacity();
        let mut slot = if self.tick_cursor < capacity { self.tick_cursor } else { 0 };
        let mut removed = 0;
        for _ in 0..TICK_SLOTS.min(capacity) {
            // A removal shifts the next entry of the run into this slot: look at it again.
            while let Some(addr) = self.index.address_at(slot) {
                let header = self.header_at(addr);
                if !(header.is_expired(now) || (reclaim_flushed && self.is_flushed(&header))) {
                    break;
                }
                self.unlink(slot, addr, &header);
                self.count_dead_reclaim(&header);
                removed += 1;
            }
            slot = if slot + 1 == capacity { 0 } else { slot + 1 };
        }
        self.tick_cursor = slot;
        removed
    }

    // ---- lookups ----

    /// The slot and address of `key`'s entry, expired or not.
    #[inline]
    fn find(&self, key: &[u8], tag: u32) -> Option<(usize, usize)> {
        let arena = self.arena.bytes();
        self.index.find(tag, |addr| item::key_of(&arena[addr..]) == key)
    }

    /// `key`'s item if it is live; a flushed or expired one is removed on the way and counted in
    /// `get_flushed` or `get_expired` (memcached's `do_item_get`: flushed is checked first, and every
    /// command's lookup counts, not only reads').
    fn lookup_live(&mut self, key: &[u8], tag: u32, now: RelTime) -> Option<Found> {
        let (slot, addr) = self.find(key, tag)?;
        let header = self.header_at(addr);
        if self.is_flushed(&header) {
            self.unlink(slot, addr, &header);
            self.stats.get_flushed.incr();
            return None;
        }
        if header.is_expired(now) {
            self.unlink(slot, addr, &header);
            self.stats.get_expired.incr();
            return None;
        }
        Some(Found { slot, addr, header })
    }

    /// Whether `flush_all` invalidated the item.
    #[inline]
    fn is_flushed(&self, header: &Header) -> bool {
        header.cas < self.flush_mark.below_cas
    }

    /// Whether the item is gone for every purpose but its bytes: expired or flushed.
    #[inline]
    fn is_dead(&self, header: &Header, now: RelTime) -> bool {
        header.is_expired(now) || self.is_flushed(header)
    }

    #[inline]
    fn header_at(&self, addr: usize) -> Header {
        Header::decode(&self.arena.bytes()[addr..])
    }

    /// The value as one slice, unless it spans segments.
    fn contiguous_value(&self, addr: usize, header: &Header) -> Option<&[u8]> {
        let total = header.total_len();
        if offset_of(addr) + total > SEGMENT_SIZE {
            return None;
        }
        let value_len = header.value_len as usize;
        Some(&self.arena.bytes()[addr + total - value_len..addr + total])
    }

    fn item_len(&self, key_len: usize, value_len: usize, client_flags: u32) -> usize {
        Header { key_len: 0, bits: 0, last_access: 0, exptime: 0, cas: 0, client_flags, value_len: value_len as u32 }
            .encoded_len()
            + key_len
            + value_len
    }

    /// The CAS the next write gets: unique across shards, growing within this one.
    fn peek_next_cas(&self) -> u64 {
        self.cas_sequence.wrapping_mul(self.shard_count).wrapping_add(self.shard_index + 1)
    }

    fn next_cas(&mut self) -> u64 {
        let cas = self.peek_next_cas();
        self.cas_sequence += 1;
        self.reserve_cas();
        cas
    }

    /// Keeps the memory file's CAS counter ahead of every CAS issued (see [`CAS_RESERVE`]).
    #[inline]
    fn reserve_cas(&mut self) {
        if self.cas_sequence >= self.cas_reserved {
            if let Some(file) = self.file.as_mut() {
                self.cas_reserved = self.cas_sequence + CAS_RESERVE;
                file.set_cas_sequence(self.cas_reserved);
            }
        }
    }

    /// An active's client change is about to happen: until the round logs it, the memory file's
    /// replication mark is not a usable position (see `persist`).
    #[inline]
    fn begin_change(&mut self) {
        if self.changes.is_some() {
            if let Some(file) = self.file.as_mut() {
                if file.mark().kind == MarkKind::Logged {
                    file.set_mark(&ReplicationMark { kind: MarkKind::ActiveChanging, ..file.mark() });
                }
            }
        }
    }

    // ---- changing items ----

    /// Marks an item recently used (Add on an existing item).
    fn bump(&mut self, addr: usize, header: Header, now: RelTime) {
        let bytes = &mut self.arena.bytes_mut()[addr..];
        item::set_bits(bytes, header.bits | ACCESSED);
        item::set_last_access(bytes, now);
    }

    /// mg N on a miss: an empty item, and the win for this caller.
    fn vivify(&mut self, key: &[u8], tag: u32, expiry: Expiry, no_bump: bool, now: RelTime) -> GetResult<'_> {
        if key.len() > MAX_KEY_LEN {
            return GetResult::Miss;
        }
        let cas = self.next_cas();
        let bits = if no_bump { WIN_SENT } else { WIN_SENT | FETCHED | ACCESSED };
        let new = NewItem { key, value: &[], client_flags: 0, exptime: expiry.as_rel(), cas, bits };
        match self.write_and_link(&new, tag, now) {
            Ok(addr) => GetResult::Hit(Hit {
                item: {
                    self.report_set(addr, now);
                    ItemRef::new(self, addr, now)
                },
                fetched_before: false,
                idle_secs: 0,
                won: true,
                stale: false,
                already_won: false,
            }),
            Err(NoSpace) => {
                self.stats.outofmemory.incr();
                GetResult::Miss
            }
        }
    }

    /// Removes `key`'s item, if any.
    /// Removes `key`'s item, live or not (a failed overwrite must not leave stale data behind).
    fn remove(&mut self, key: &[u8], tag: u32) {
        if let Some((slot, addr)) = self.find(key, tag) {
            let header = self.header_at(addr);
            self.unlink(slot, addr, &header);
            if let Some(changes) = self.changes.as_mut() {
                changes.delete(key);
            }
        }
    }

    /// Tells the change sink about the item now at `addr`.
    fn report_set(&mut self, addr: usize, now: RelTime) {
        if let Some(changes) = self.changes.as_mut() {
            changes.set(&ItemRef::from_parts(self.arena.bytes(), self.segments.metas(), addr, now));
        }
    }

    /// Removes an index entry and forgets its item.
    fn unlink(&mut self, slot: usize, addr: usize, header: &Header) {
        self.index.remove(slot);
        self.forget(addr, header);
    }

    /// Accounts an item as dead (its index entry is gone or repointed).
    fn forget(&mut self, addr: usize, header: &Header) {
        // After the write that replaced it is published (see `persist`): a rebuild never revives it.
        #[cfg(test)]
        super::persist::checkpoints::hit();
        item::mark_dead(&mut self.arena.bytes_mut()[addr..]);
        let total = header.total_len();
        self.account(addr, total, false);
        self.stats.curr_items.sub(1);
        self.stats.bytes.sub(total as u64);
    }

    /// Adds (`live`) or removes an item's bytes from the live accounting of the segments it occupies.
    fn account(&mut self, addr: usize, total: usize, live: bool) {
        let mut segment = super::segment::segment_of(addr);
        let mut offset = offset_of(addr);
        let mut remaining = total;
        let mut first = true;
        loop {
            let piece = remaining.min(SEGMENT_SIZE - offset);
            let meta = self.segments.meta_mut(segment);
            if live {
                meta.live_bytes += piece as u32;
                meta.live_items += first as u32;
            } else {
                meta.live_bytes -= piece as u32;
                meta.live_items -= first as u32;
            }
            remaining -= piece;
            if remaining == 0 {
                break;
            }
            segment = meta.next;
            offset = 0;
            first = false;
        }
    }

    /// Writes an item and makes it `key`'s item, replacing any older one.
    fn write_and_link(&mut self, new: &NewItem<'_>, tag: u32, now: RelTime) -> Result<usize, NoSpace> {
        let addr = self.write_item(new, now)?;
        let total = new.header(now).total_len();
        // Making room may have reclaimed segments, moving or dropping the old item: look it up again.
        self.link(new.key, tag, addr, total);
        Ok(addr)
    }

    /// Makes the item of `total` bytes at `addr` `key`'s item, replacing (and marking dead) any older one.
    fn link(&mut self, key: &[u8], tag: u32, addr: usize, total: usize) {
        match self.find(key, tag) {
            Some((slot, old_addr)) => {
                let old = self.header_at(old_addr);
                self.forget(old_addr, &old);
                self.index.relocate(slot, tag, addr);
            }
            None => {
                self.index.insert(tag, addr);
                self.stats.index_bytes.set(self.index.bytes() as u64);
            }
        }
        self.account(addr, total, true);
        self.flush_mark.only_flushed_items = false;
        self.stats.curr_items.add(1);
        self.stats.total_items.incr();
        self.stats.bytes.add(total as u64);
    }

    /// Appends an item to the log (not yet indexed); returns its address.
    fn write_item(&mut self, new: &NewItem<'_>, now: RelTime) -> Result<usize, NoSpace> {
        let header = new.header(now);
        let header_len = header.encoded_len();
        let head_len = header_len + new.key.len();
        let total = head_len + new.value.len();
        self.make_room(total, head_len, now)?;
        if self.usable_head_room(total, head_len) == 0 {
            self.segments.seal_head();
            self.segments.open_new_head().expect("make_room keeps a free segment");
        }
        let start = self.segments.head_position().expect("an open segment");
        let addr = start.address();
        let first_piece = new.value.len().min(SEGMENT_SIZE - start.offset - head_len);
        let bytes = self.arena.bytes_mut();
        header.encode(&mut bytes[addr..]);
        bytes[addr + header_len..addr + head_len].copy_from_slice(new.key);
        bytes[addr + head_len..addr + head_len + first_piece].copy_from_slice(&new.value[..first_piece]);
        self.segments.advance_head(head_len + first_piece);
        // A large item continues at the start of the next segment(s) in log order.
        let mut rest = &new.value[first_piece..];
        while !rest.is_empty() {
            let segment = self.segments.open_new_head().expect("make_room reserved the segments");
            let piece = rest.len().min(SEGMENT_SIZE);
            let at = address(segment, 0);
            self.segments.set_first_item(segment, piece as u32);
            self.arena.bytes_mut()[at..at + piece].copy_from_slice(&rest[..piece]);
            self.segments.advance_head(piece);
            rest = &rest[piece..];
        }
        self.stats.segments_used.set(self.segments.in_use() as u64);
        Ok(addr)
    }

    /// Bytes of an item of `total` bytes (header and key `head_len`) that the open segment takes:
    /// all of it, or for a large item whatever is left after the header, key and at least one value
    /// byte; 0 when the item must start in a new segment.
    fn usable_head_room(&self, total: usize, head_len: usize) -> usize {
        let room = self.segments.head_room();
        if room >= total {
            total
        } else if total > SMALL_ITEM_MAX && room > head_len {
            room
        } else {
            0
        }
    }

    /// Segments the log may still take: free ones, within the memory limit.
    fn free_segments(&self) -> usize {
        self.segments.free_count().min(self.segment_limit.saturating_sub(self.segments.in_use()))
    }

    /// Reclaims segments until the item fits with the reserve left free.
    fn make_room(&mut self, total: usize, head_len: usize, now: RelTime) -> Result<(), NoSpace> {
        loop {
            let needed = (total - self.usable_head_room(total, head_len)).div_ceil(SEGMENT_SIZE);
            if self.free_segments() >= needed + RESERVED_SEGMENTS {
                return Ok(());
            }
            let reclaimed = if self.evict { self.evict_oldest(now) } else { self.reclaim_unused(now) };
            if !reclaimed {
                return Err(NoSpace);
            }
        }
    }

    // ---- reclaiming segments ----

    /// The item whose header is at `offset` of `segment`, if one starts there.
    fn item_at(&self, segment: SegmentId, offset: usize) -> Option<SegmentItem> {
        if offset >= self.segments.meta(segment).write_offset as usize {
            return None;
        }
        let addr = address(segment, offset);
        let item = &self.arena.bytes()[addr..];
        let header = Header::decode(item);
        let tag = tag_of(key_hash(item::key_of(item)));
        Some(SegmentItem { addr, header, tag, slot: self.index.find_entry(tag, addr) })
    }

    /// Reclaims the oldest segment, evicting what it holds except expired and flushed items (dropped,
    /// counted as reclaimed) and recently read small ones (re-appended). `false` when the log is empty.
    fn evict_oldest(&mut self, now: RelTime) -> bool {
        let Some(segment) = self.segments.oldest() else {
            return false;
        };
        if self.segments.open_head() == Some(segment) {
            self.segments.seal_head();
        }
        let mut budget = (self.reinsert_credit + REINSERT_CREDIT).min(REINSERT_CREDIT_MAX);
        let mut offset = self.segments.meta(segment).first_item as usize;
        while self.segments.meta(segment).live_items > 0 {
            let Some(found) = self.item_at(segment, offset) else { break };
            let total = found.header.total_len();
            offset += total;
            let Some(slot) = found.slot else { continue };
            if self.is_dead(&found.header, now) {
                self.unlink(slot, found.addr, &found.header);
                self.count_dead_reclaim(&found.header);
            } else if found.header.bits & ACCESSED != 0
                && total <= SMALL_ITEM_MAX
                && total <= budget
                && self.reinsert(slot, &found)
            {
                budget -= total;
                self.stats.reinserted.incr();
            } else {
                self.unlink(slot, found.addr, &found.header);
                self.stats.evictions.incr();
                if found.header.bits & FETCHED == 0 {
                    self.stats.evicted_unfetched.incr();
                }
            }
        }
        self.reinsert_credit = budget;
        self.release(segment, NO_SEGMENT);
        true
    }

    /// Second chance: copies a small item to the head with `ACCESSED` cleared and repoints its entry.
    /// May use the reserved segment; `false` if there is no room at all.
    fn reinsert(&mut self, slot: usize, found: &SegmentItem) -> bool {
        let total = found.header.total_len();
        if self.segments.head_room() < total {
            self.segments.seal_head();
            if self.free_segments() == 0 || self.segments.open_new_head().is_none() {
                return false;
            }
        }
        let to = self.segments.head_position().expect("an open segment").address();
        let bytes = self.arena.bytes_mut();
        bytes.copy_within(found.addr..found.addr + total, to);
        item::set_bits(&mut bytes[to..], found.header.bits & !ACCESSED);
        self.segments.advance_head(total);
        item::mark_dead(&mut self.arena.bytes_mut()[found.addr..]);
        self.account(found.addr, total, false);
        self.account(to, total, true);
        self.index.relocate(slot, found.tag, to);
        true
    }

    /// Without eviction: reclaims the oldest segment if every live item in it has expired or was
    /// flushed, else any segment with no live bytes. `false` if there is none.
    fn reclaim_unused(&mut self, now: RelTime) -> bool {
        let Some(oldest) = self.segments.oldest() else {
            return false;
        };
        if !self.holds_live_items(oldest, now) {
            let mut offset = self.segments.meta(oldest).first_item as usize;
            while self.segments.meta(oldest).live_items > 0 {
                let Some(found) = self.item_at(oldest, offset) else { break };
                offset += found.header.total_len();
                if let Some(slot) = found.slot {
                    self.unlink(slot, found.addr, &found.header);
                    self.count_dead_reclaim(&found.header);
                }
            }
            self.release(oldest, NO_SEGMENT);
            return true;
        }
        let unused = self.segments.log().find(|&(segment, _)| self.segments.meta(segment).live_bytes == 0);
        match unused {
            Some((segment, prev)) => {
                self.release(segment, prev);
                true
            }
            None => false,
        }
    }

    /// Whether `segment` starts a live item that has neither expired nor been flushed.
    fn holds_live_items(&self, segment: SegmentId, now: RelTime) -> bool {
        let mut offset = self.segments.meta(segment).first_item as usize;
        while let Some(found) = self.item_at(segment, offset) {
            if found.slot.is_some() && !self.is_dead(&found.header, now) {
                return true;
            }
            offset += found.header.total_len();
        }
        false
    }

    fn release(&mut self, segment: SegmentId, prev: SegmentId) {
        debug_assert_eq!(self.segments.meta(segment).live_items, 0);
        self.segments.release(segment, prev);
        self.stats.segments_used.set(self.segments.in_use() as u64);
    }

    /// Counts a dead (expired or flushed) item whose memory was recovered; memcached 1.6.18 counts
    /// `reclaimed` and `expired_unfetched` for both.
    fn count_dead_reclaim(&self, header: &Header) {
        self.stats.reclaimed.incr();
        if header.bits & FETCHED == 0 {
            self.stats.expired_unfetched.incr();
        }
    }

    /// Checks the bookkeeping against the data (tests only).
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        let metas = self.segments.metas();
        let live: u64 = metas.iter().map(|m| m.live_bytes as u64).sum();
        let items: u64 = metas.iter().map(|m| m.live_items as u64).sum();
        assert_eq!(live, self.stats.bytes.get(), "live bytes per segment add up to `bytes`");
        assert_eq!(items, self.stats.curr_items.get(), "live items per segment add up to `curr_items`");
        assert_eq!(self.index.len() as u64, self.stats.curr_items.get());
        assert_eq!(self.segments.in_use() + self.segments.free_count(), self.segments.count());
        assert_eq!(self.segments.log().count(), self.segments.in_use());
        assert!(self.stats.bytes.get() as usize <= self.arena.len());
        assert!(self.free_segments() >= RESERVED_SEGMENTS || !self.evict, "after a write, the reserve is free");
        for slot in 0..self.index.capacity() {
            if let Some(addr) = self.index.address_at(slot) {
                let key = item::key_of(&self.arena.bytes()[addr..]);
                assert_eq!(self.find(key, tag_of(key_hash(key))), Some((slot, addr)));
            }
        }
    }

    /// Bytes of index table per item and header bytes per item (tests only).
    #[cfg(test)]
    pub(super) fn index_bytes(&self) -> usize {
        self.index.bytes()
    }
}

/// Receives every change a client makes to a store, as it happens, in order: the replication log.
/// Expiry, eviction and the removal of flushed items are not reported (a standby does them itself);
/// changes applied from a replication log ([`Store::apply_set`] and friends) are not reported either.
pub trait ChangeSink: Send {
    /// The item now stored under its key (a write, or the result of incr/decr/append/prepend/cas).
    fn set(&mut self, item: &ItemRef<'_>);
    fn delete(&mut self, key: &[u8]);
    /// The item's stored expiry changed (0: never).
    fn touch(&mut self, key: &[u8], exptime: RelTime);
    /// `flush_all` took effect.
    fn flush(&mut self);
    /// Where the last reported change sits in the sink's order (a log sequence number).
    fn position(&self) -> u64;
    /// Called once per poll round: passes on what was reported. Returns whether anything was pending.
    fn end_round(&mut self) -> bool;
}

/// Where a [`Store::scan`] resumes. The index is walked from its last slot down: removals shift
/// entries towards lower slots and insertions never move entries, so an item present throughout is
/// met at least once; a growth of the index restarts the walk.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanCursor {
    capacity: usize,
    /// Slots below this are still to visit.
    next: usize,
    started: bool,
    done: bool,
}

impl ScanCursor {
    pub fn done(&self) -> bool {
        self.done
    }
}

impl Store {
    /// Makes reads leave the store exactly as it is (a standby's store: only replication changes it).
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// Reports every later client change to `sink`.
    pub fn set_change_sink(&mut self, sink: Box<dyn ChangeSink>) {
        self.changes = Some(sink);
    }

    /// Stops reporting changes (a node that stepped down to standby).
    pub fn clear_change_sink(&mut self) {
        self.changes = None;
    }

    /// The change sink, for its owner's per-round work.
    pub fn change_sink(&mut self) -> Option<&mut (dyn ChangeSink + 'static)> {
        self.changes.as_deref_mut()
    }

    /// Applies a replicated SET: the item as the active stored it, CAS included. An expiry already past
    /// removes the key instead.
    pub fn apply_set(&mut self, key: &[u8], client_flags: u32, expiry: Expiry, cas: u64, value: &[u8], now: RelTime) {
        let tag = tag_of(key_hash(key));
        // CAS values this store issues later (after a promotion) stay above every applied one.
        let sequence = cas.saturating_sub(self.shard_index + 1) / self.shard_count + 1;
        self.cas_sequence = self.cas_sequence.max(sequence);
        self.reserve_cas();
        self.applied_cas_max = self.applied_cas_max.max(cas);
        let exptime = match expiry {
            Expiry::Immediately => return self.remove_quietly(key, tag),
            other => other.as_rel(),
        };
        if key.len() > MAX_KEY_LEN || self.item_len(key.len(), value.len(), client_flags) > self.max_item_len {
            tracing::warn!(key_len = key.len(), value_len = value.len(), "a replicated item cannot be stored here");
            return self.remove_quietly(key, tag);
        }
        let new = NewItem { key, value, client_flags, exptime, cas, bits: 0 };
        if self.write_and_link(&new, tag, now).is_err() {
            self.stats.outofmemory.incr();
            self.remove_quietly(key, tag);
        }
    }

    /// Applies a replicated DELETE.
    pub fn apply_delete(&mut self, key: &[u8]) {
        self.remove_quietly(key, tag_of(key_hash(key)));
    }

    /// Applies a replicated TOUCH.
    pub fn apply_touch(&mut self, key: &[u8], expiry: Expiry, now: RelTime) {
        let tag = tag_of(key_hash(key));
        let Some(found) = self.lookup_live(key, tag, now) else { return };
        match expiry {
            Expiry::Immediately => self.unlink(found.slot, found.addr, &found.header),
            other => item::set_exptime(&mut self.arena.bytes_mut()[found.addr..], other.as_rel()),
        }
    }

    /// Applies a replicated FLUSH: every item applied so far is gone; the active's later items carry
    /// higher CAS values than any of them, so they stay.
    pub fn apply_flush(&mut self, now: RelTime) {
        self.flush_below(self.applied_cas_max + 1, now);
    }

    /// Drops every item (the start of a full sync).
    pub fn clear(&mut self) {
        self.reset();
    }

    fn remove_quietly(&mut self, key: &[u8], tag: u32) {
        if let Some((slot, addr)) = self.find(key, tag) {
            let header = self.header_at(addr);
            self.unlink(slot, addr, &header);
        }
    }

    /// Visits every live item once (a dump taken in one go; see [`Store::scan`] for one taken in slices).
    pub fn for_each_live(&self, now: RelTime, mut visit: impl FnMut(&ItemRef<'_>)) {
        for slot in 0..self.index.capacity() {
            if let Some(addr) = self.index.address_at(slot) {
                let item = ItemRef::new(self, addr, now);
                if !self.is_dead(&item.header, now) {
                    visit(&item);
                }
            }
        }
    }

    /// Visits live items in log order, oldest (the next to be reclaimed) first, until `visit` breaks.
    pub fn for_each_live_oldest_first(&self, now: RelTime, mut visit: impl FnMut(&ItemRef<'_>) -> ControlFlow<()>) {
        for (segment, _) in self.segments.log() {
            let mut offset = self.segments.meta(segment).first_item as usize;
            while let Some(found) = self.item_at(segment, offset) {
                offset += found.header.total_len();
                if found.slot.is_some() && !self.is_dead(&found.header, now) && visit(&ItemRef::new(self, found.addr, now)).is_break() {
                    return;
                }
            }
        }
    }

    /// Visits live items from `cursor` on, up to `budget` index slots, calling `visit` with each; returns
    /// whether the walk is complete. Meant for snapshots taken a slice per poll round while the store
    /// keeps changing (see [`ScanCursor`]).
    pub fn scan(&self, cursor: &mut ScanCursor, budget: usize, now: RelTime, mut visit: impl FnMut(&ItemRef<'_>)) -> bool {
        let capacity = self.index.capacity();
        if !cursor.started || cursor.capacity != capacity {
            *cursor = ScanCursor { capacity, next: capacity, started: true, done: false };
        }
        if cursor.done {
            return true;
        }
        let mut visit_slot = |slot: usize| {
            if let Some(addr) = self.index.address_at(slot) {
                let item = ItemRef::new(self, addr, now);
                if !self.is_dead(&item.header, now) {
                    visit(&item);
                }
                true
            } else {
                false
            }
        };
        let stop = cursor.next.saturating_sub(budget);
        while cursor.next > stop {
            cursor.next -= 1;
            visit_slot(cursor.next);
        }
        if cursor.next == 0 {
            // Entries of a probe run that wraps past the last slot may have shifted from the bottom to
            // the top since the top was visited: visit the top run again (repeats are harmless).
            let mut slot = capacity;
            while slot > 0 && visit_slot(slot - 1) {
                slot -= 1;
            }
            cursor.done = true;
        }
        cursor.done
    }
}

/// The shape a store's memory file must have to be reused.
fn file_shape(config: &StoreConfig, segment_count: usize) -> Shape {
    Shape {
        shard_index: config.shard_index as u64,
        shard_count: config.shard_count.max(1) as u64,
        segment_count: segment_count as u64,
        memory_bytes: config.memory_bytes as u64,
        clock_origin: config.clock_origin,
    }
}
