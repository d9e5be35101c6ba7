//! The per-shard item store: memcached's semantics over memory that never calcifies.
//!
//! One [`Store`] per shard, touched only by its shard's thread. It offers the item operations every
//! protocol needs (get with touch/vivify/recache, the store modes with CAS, delete with invalidation,
//! incr/decr, flush) and hides how items are laid out:
//! - `arena`: one mapping per shard, from 2 MiB hugepages when the machine has them, else transparent
//!   huge pages, else 4 KiB pages; the choice is reported by [`Store::backing`]. With a memory file
//!   (`-e`), a shared mapping of that file instead, so the items outlive the process.
//! - `persist`: what a memory file holds besides the items (a header, the segment table, the flush
//!   watermark, the CAS counter, the replication position), and the rebuild of a store from it after a
//!   restart, kill -9 included.
//! - `segment`: the arena is cut into fixed-size segments filled like a log; a segment holds items of any
//!   size, so memory follows the workload when value sizes shift (no slab classes to calcify).
//!   Items larger than what is left in a segment continue in the next one.
//! - `index`: an open-addressing table of 8-byte entries (hash tag + location), no locks.
//! - `item`: the packed item header (lengths, client flags, expiry, CAS, access bits).
//! - eviction: the oldest segment is reclaimed first; items read since they were written get a second
//!   chance (re-appended), which approximates LRU; expired items are reclaimed lazily and by [`Store::tick`].
//! - flush: [`Store::flush`] only records a CAS watermark; items below it are dead to every lookup and
//!   are reclaimed like expired ones (see `engine`).
//!
//! Time is always passed in (`now`), never read here.

use crate::clock::{Expiry, RelTime};
use crate::stats::Counter;

/// Longest key memcached accepts.
pub const MAX_KEY_LEN: usize = 250;

/// Where the arena's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// MAP_HUGETLB, 2 MiB pages reserved through /proc/sys/vm/nr_hugepages.
    HugePages,
    /// Ordinary mapping with madvise(MADV_HUGEPAGE).
    TransparentHugePages,
    /// Ordinary 4 KiB pages.
    SmallPages,
    /// A memory file (`-e`) on hugetlbfs.
    HugePageFile,
    /// A memory file (`-e`) on tmpfs or another file system.
    MemoryFile,
}

impl Backing {
    /// The name shown in `stats` (`memory_backing`) and in the log.
    pub fn name(self) -> &'static str {
        match self {
            Backing::HugePages => "hugepages",
            Backing::TransparentHugePages => "transparent_hugepages",
            Backing::SmallPages => "4k_pages",
            Backing::HugePageFile => "hugepages_file",
            Backing::MemoryFile => "memory_file",
        }
    }
}

/// How a store is built.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Bytes of item memory for this shard (its share of `-m`). A hard limit.
    pub memory_bytes: usize,
    /// Largest item value accepted, in bytes (`-I`).
    pub item_size_max: usize,
    /// `false` with `-M`: refuse stores with OutOfMemory instead of evicting live items.
    pub evict: bool,
    /// This shard's index and the shard count, so CAS values are unique across shards.
    pub shard_index: usize,
    pub shard_count: usize,
    /// Try MAP_HUGETLB first (else start at transparent huge pages).
    pub try_hugepages: bool,
    /// Keep the items in this file (this shard's, e.g. `<memory_file>.<shard>`) and restore them from it
    /// at start when it holds a store of the same shape; see `persist`.
    pub memory_file: Option<std::path::PathBuf>,
    /// Unix time of RelTime 0 in this process: a memory file written under another origin is not reused
    /// (its expiry times would mean other moments).
    pub clock_origin: u64,
}

/// Errors building a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot map {bytes} bytes of item memory: {source}")]
    Map { bytes: usize, source: std::io::Error },
    #[error("memory file {path}: {source}")]
    File { path: std::path::PathBuf, source: std::io::Error },
    #[error("memory limit of {memory} bytes is too small for items of up to {item_size_max} bytes")]
    TooSmall { memory: usize, item_size_max: usize },
    #[error("a memory limit of {bytes} bytes is out of range: at least {least}, at most the {most} mapped at start-up")]
    LimitOutOfRange { bytes: usize, least: usize, most: usize },
}

/// How a store request treats an existing item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMode {
    /// Store unconditionally.
    Set,
    /// Store only if no live item exists (an existing one is bumped in the LRU, as memcached does).
    Add,
    /// Store only if a live item exists.
    Replace,
    /// Append to an existing item's value; keeps its flags and expiry.
    Append,
    /// Prepend to an existing item's value; keeps its flags and expiry.
    Prepend,
}

/// One storage operation (text set/add/replace/append/prepend/cas, meta ms, binary set family).
#[derive(Clone, Debug)]
pub struct StoreRequest<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub client_flags: u32,
    pub expiry: Expiry,
    pub mode: StoreMode,
    /// Only store if the item exists and its CAS equals this (text `cas`, meta `C`, binary cas field).
    /// A missing item gives [`StoreResult::NotFound`], another CAS gives [`StoreResult::Exists`].
    pub compare_cas: Option<u64>,
    /// Meta `I` with `C`: a compare CAS *lower* than the item's is accepted, and the new item is stale.
    pub invalidate: bool,
    /// Meta `E`: use this CAS for the new item instead of generating one.
    pub new_cas: Option<u64>,
    /// Meta `N` with append/prepend modes: on a miss, create the item with this expiry.
    pub vivify_on_miss: Option<Expiry>,
    /// Meta `b`: the key arrived base64-encoded. The stored item remembers it ([`ItemView::key_binary`])
    /// when this request writes a new item from its own value (set/add/replace/cas, and append/prepend
    /// vivifying); an append/prepend that combines with an existing item does not carry it, as in
    /// memcached, whose combined item is a fresh allocation.
    pub key_binary: bool,
}

/// The result of a storage operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreResult {
    Stored { cas: u64 },
    NotStored,
    Exists,
    NotFound,
    /// Value larger than `item_size_max` (or than the shard's memory can ever hold).
    TooLarge,
    /// No memory and eviction disabled (`-M`), or nothing evictable.
    OutOfMemory,
}

/// Options of a read (text get/gets/gat/gats/touch, meta mg, binary get/gat/touch family).
#[derive(Clone, Copy, Debug, Default)]
pub struct GetOptions {
    /// On a hit, set this new expiry (touch, gat, mg `T`).
    pub touch: Option<Expiry>,
    /// `false` for mg `u`: do not mark the item fetched, do not update its last access, no LRU bump.
    pub no_bump: bool,
    /// mg `N`: on a miss, create an empty item with this expiry and give the caller the win.
    pub vivify: Option<Expiry>,
    /// mg `R`: on a hit whose remaining TTL is below this many seconds, give the caller the win
    /// (once: later callers see `already_won`).
    pub recache_below: Option<u32>,
}

/// Read-only view of a stored item, borrowed from the store.
pub trait ItemView {
    fn key(&self) -> &[u8];
    fn client_flags(&self) -> u32;
    fn cas(&self) -> u64;
    /// Stored expiry: 0 never, else the RelTime at which it expires.
    fn exptime(&self) -> RelTime;
    fn value_len(&self) -> usize;
    /// Was the key stored base64-encoded (meta `b`)? memcached echoes it encoded to `mg k` and `me`.
    fn key_binary(&self) -> bool;
    /// The value, in one or more contiguous pieces (several only for items spanning segments).
    fn value_chunks(&self) -> ValueChunks<'_>;
    /// Appends the whole value to `out`.
    fn copy_value_into(&self, out: &mut Vec<u8>) {
        for chunk in self.value_chunks() {
            out.extend_from_slice(chunk);
        }
    }
}

/// Iterator over the contiguous pieces of a value (no allocation; [`ValueChunks::single`] wraps a slice).
pub use item::ValueChunks;

/// A hit: the item, and what the read found out about it before it changed anything.
pub struct Hit<'s> {
    pub item: ItemRef<'s>,
    /// Had the item been fetched before this read (mg `h`)?
    pub fetched_before: bool,
    /// Seconds since the item was last accessed, before this read (mg `l`).
    pub idle_secs: u32,
    /// The caller won the right to recache (mg `W`).
    pub won: bool,
    /// The item is stale, invalidated by md/ms `I` (mg `X`).
    pub stale: bool,
    /// Another caller already got the win (mg `Z`).
    pub already_won: bool,
}

/// The result of a read.
pub enum GetResult<'s> {
    Hit(Hit<'s>),
    /// Not present (or expired, or flushed: counted in the store's `get_expired` / `get_flushed`).
    Miss,
}

/// One delete (text delete, meta md, binary delete).
#[derive(Clone, Copy, Debug)]
pub struct DeleteRequest<'a> {
    pub key: &'a [u8],
    /// Only delete if the CAS matches (meta `C`, binary cas field); else [`DeleteResult::Exists`].
    pub compare_cas: Option<u64>,
    /// Meta `I`: do not remove; mark stale and give the item a new CAS.
    pub invalidate: bool,
    /// Meta `T` with `I`: the stale item's new expiry.
    pub new_expiry: Option<Expiry>,
    /// Meta `E`: the CAS to use when invalidating.
    pub new_cas: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteResult {
    Deleted,
    NotFound,
    Exists,
}

/// One incr/decr (text incr/decr, meta ma, binary increment/decrement).
#[derive(Clone, Copy, Debug)]
pub struct ArithRequest<'a> {
    pub key: &'a [u8],
    pub incr: bool,
    pub delta: u64,
    /// On a miss, create the item holding this initial value with this expiry (meta `N`+`J`,
    /// binary initial value when its expiration is not 0xffffffff). The result then shows the initial value.
    pub vivify: Option<(Expiry, u64)>,
    pub compare_cas: Option<u64>,
    /// Meta `T`: new expiry on success.
    pub new_expiry: Option<Expiry>,
    /// Meta `E`: the CAS to give the updated item.
    pub new_cas: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithResult {
    /// The new value (incr wraps at 2^64, decr stops at 0), its CAS and stored expiry.
    Value { value: u64, cas: u64, exptime: RelTime },
    NotFound,
    /// The stored value is not a decimal unsigned 64-bit number.
    NonNumeric,
    Exists,
    /// Vivify failed for lack of memory, or the update could not be stored.
    OutOfMemory,
}

/// Counters owned by the store (read from any thread for `stats`).
#[derive(Default, Debug)]
pub struct StoreStats {
    pub curr_items: Counter,
    pub total_items: Counter,
    /// Bytes of item memory in use by live items (header + key + value).
    pub bytes: Counter,
    pub evictions: Counter,
    pub reclaimed: Counter,
    pub expired_unfetched: Counter,
    pub evicted_unfetched: Counter,
    /// Live items re-appended because they were read since written (second chance).
    pub reinserted: Counter,
    /// Stores refused because memory was full and eviction was off or impossible.
    pub outofmemory: Counter,
    /// Segments in use and in total.
    pub segments_used: Counter,
    pub segments_total: Counter,
    /// Bytes of the index table.
    pub index_bytes: Counter,
    /// Reads that found an expired item.
    pub get_expired: Counter,
    /// Reads that found an item invalidated by `flush_all` (each such item is counted once: the read
    /// removes it).
    pub get_flushed: Counter,
}

/// Metadata a debug dump (`me`) shows beyond [`ItemView`].
pub trait ItemDebug: ItemView {
    /// RelTime of the last access.
    fn last_access(&self) -> RelTime;
    /// Has the item been fetched since it was stored?
    fn fetched(&self) -> bool;
    /// Bytes the item occupies in the arena (header + key + value).
    fn total_size(&self) -> usize;
}

mod arena;
mod decimal;
mod engine;
mod index;
mod item;
mod persist;
mod segment;
#[cfg(test)]
mod restart_tests;
#[cfg(test)]
mod tests;

pub use engine::{ChangeSink, ItemRef, ScanCursor, Store};

/// Key, flags, value, CAS and expiry of every live item (tests compare stores with it).
#[cfg(test)]
pub(crate) type Contents = Vec<(Vec<u8>, u32, Vec<u8>, u64, u32)>;

/// Everything live in `store`, sorted (tests only).
#[cfg(test)]
pub(crate) fn contents(store: &Store, now: RelTime) -> Contents {
    let mut items = Vec::new();
    store.for_each_live(now, |item| {
        let mut value = Vec::new();
        item.copy_value_into(&mut value);
        items.push((item.key().to_vec(), item.client_flags(), value, item.cas(), item.exptime()));
    });
    items.sort();
    items
}
pub use persist::{file_clock_origin, MarkKind, ReplicationMark};
pub use segment::SEGMENT_SIZE;
