//! The memory file's header: what a restarted store needs besides the items and the segment table.
//!
//! A store with a memory file (`-e PATH`, one file per shard) keeps its items in a shared mapping of
//! the file (see `arena`), so they survive the process; this header says whose they are and how far
//! they go:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "TANDEMMF"
//! 8       4     format version
//! 16      4+4   shard index, shard count
//! 24      8     segment size        32  8  segment count        40  8  memory bytes (the shard's -m)
//! 56      8     clock origin: unix time of RelTime 0 (item expiry times are relative to it)
//! 72      8     CAS counter (the next CAS sequence; written before a CAS is used)
//! 80      8     flush watermark: items with a lower CAS are flushed    88  4  when (RelTime)
//! 96      8     replication mark kind ([`MarkKind`])
//! 104     20    replication id       128  8  epoch       136  8  sequence number
//! ```
//!
//! A file whose magic, version, shard, sizes or clock origin do not match is not reused: the store says
//! why in the log and starts empty (the file is reinitialized, magic last).
//!
//! The replication mark ([`ReplicationMark`]) tells a restarted node where its contents stand in the
//! pair's history. Its one rule: it may lag the contents in the direction replication repairs, never
//! lead them in the direction it cannot. A standby writes what it applied *after* applying it (a
//! record re-applied after a restart is harmless: records are absolute). An active's contents may hold
//! changes its standby never received, so its mark is [`MarkKind::ActiveChanging`] from its first change
//! in a poll round until the round has logged every change, and only then the exact last logged
//! sequence number: a node killed in between restarts without a usable position.

use super::arena::Region;
use super::segment::SEGMENT_SIZE;

/// Bytes of the header region (the rest of the first huge page holds the segment table).
pub const HEADER_LEN: usize = 4096;

const MAGIC: &[u8; 8] = b"TANDEMMF";
const VERSION: u32 = 1;

const MAGIC_AT: usize = 0;
const VERSION_AT: usize = 8;
const SHARD_AT: usize = 16;
const SHARDS_AT: usize = 20;
const SEGMENT_SIZE_AT: usize = 24;
const SEGMENT_COUNT_AT: usize = 32;
const MEMORY_AT: usize = 40;
const ORIGIN_AT: usize = 56;
const CAS_AT: usize = 72;
const FLUSH_CAS_AT: usize = 80;
const FLUSH_AT_AT: usize = 88;
const MARK_KIND_AT: usize = 96;
const MARK_HISTORY_AT: usize = 104;
const MARK_EPOCH_AT: usize = 128;
const MARK_SEQ_AT: usize = 136;

/// Bytes of a replication id.
pub const HISTORY_LEN: usize = 20;

/// What a replication mark says about the contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// No usable position: never replicated, or a full sync was under way.
    None,
    /// A standby: every record of the history up to `seq` is applied.
    Applied,
    /// An active: every change is logged, the last one at `seq`, and nothing else changed.
    Logged,
    /// An active between a change and the end of the round that logs it: not a usable position.
    ActiveChanging,
}

impl MarkKind {
    fn code(self) -> u64 {
        match self {
            MarkKind::None => 0,
            MarkKind::Applied => 1,
            MarkKind::Logged => 2,
            MarkKind::ActiveChanging => 3,
        }
    }

    fn from_code(code: u64) -> Option<MarkKind> {
        Some(match code {
            0 => MarkKind::None,
            1 => MarkKind::Applied,
            2 => MarkKind::Logged,
            3 => MarkKind::ActiveChanging,
            _ => return None,
        })
    }
}

/// Where a store's contents stand in a replication history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicationMark {
    pub kind: MarkKind,
    pub history: [u8; HISTORY_LEN],
    pub epoch: u64,
    pub seq: u64,
}

impl ReplicationMark {
    pub const NONE: ReplicationMark = ReplicationMark { kind: MarkKind::None, history: [0; HISTORY_LEN], epoch: 0, seq: 0 };

    /// Whether the contents are exactly those of the history up to `seq` (a position to resume from).
    pub fn usable(&self) -> bool {
        matches!(self.kind, MarkKind::Applied | MarkKind::Logged)
    }
}

/// The shape a file must have to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub shard_index: u64,
    pub shard_count: u64,
    pub segment_count: u64,
    pub memory_bytes: u64,
    pub clock_origin: u64,
}

/// The header of a store's memory file.
pub struct FileHeader {
    region: Region,
    /// The mark as last written (so an unchanged mark is not rewritten).
    mark: ReplicationMark,
}

impl FileHeader {
    /// The header in `region`, not yet believed: see [`FileHeader::check`] and [`FileHeader::init`].
    pub fn new(region: Region) -> FileHeader {
        FileHeader { region, mark: ReplicationMark::NONE }
    }

    /// Whether the header describes a store of `shape` (`Err(why)` if not); reads its mark.
    pub fn check(&mut self, shape: &Shape) -> Result<(), String> {
        let region = &self.region;
        let mut magic = [0u8; 8];
        region.read(MAGIC_AT, &mut magic);
        if &magic != MAGIC {
            return Err("no store header (a new or foreign file)".into());
        }
        let version = region.read_u32(VERSION_AT);
        if version != VERSION {
            return Err(format!("format version {version}, this build reads {VERSION}"));
        }
        let segment_size = region.read_u64(SEGMENT_SIZE_AT);
        if segment_size != SEGMENT_SIZE as u64 {
            return Err(format!("segments of {segment_size} bytes, this build uses {SEGMENT_SIZE}"));
        }
        let found = Shape {
            shard_index: u64::from(region.read_u32(SHARD_AT)),
            shard_count: u64::from(region.read_u32(SHARDS_AT)),
            segment_count: region.read_u64(SEGMENT_COUNT_AT),
            memory_bytes: region.read_u64(MEMORY_AT),
            clock_origin: region.read_u64(ORIGIN_AT),
        };
        if found != *shape {
            return Err(format!("written for {found:?}, this store is {shape:?}"));
        }
        let Some(kind) = MarkKind::from_code(region.read_u64(MARK_KIND_AT)) else {
            return Err("unknown replication mark".into());
        };
        let mut history = [0u8; HISTORY_LEN];
        region.read(MARK_HISTORY_AT, &mut history);
        self.mark = ReplicationMark { kind, history, epoch: region.read_u64(MARK_EPOCH_AT), seq: region.read_u64(MARK_SEQ_AT) };
        Ok(())
    }

    /// Makes the file unusable as a store until [`FileHeader::init`] (call it before the segment table
    /// is rewritten).
    pub fn invalidate(&mut self) {
        self.region.write(MAGIC_AT, &[0; 8]);
    }

    /// Writes a fresh header for an empty store of `shape` (the segment table already says so); the
    /// magic goes last, so a file cut while being initialized is not mistaken for a store.
    pub fn init(&mut self, shape: &Shape) {
        let region = &mut self.region;
        region.write(MAGIC_AT, &[0; 8]);
        region.write(0, &vec![0; region.len()]);
        region.write_u32(VERSION_AT, VERSION);
        region.write_u32(SHARD_AT, shape.shard_index as u32);
        region.write_u32(SHARDS_AT, shape.shard_count as u32);
        region.write_u64(SEGMENT_SIZE_AT, SEGMENT_SIZE as u64);
        region.write_u64(SEGMENT_COUNT_AT, shape.segment_count);
        region.write_u64(MEMORY_AT, shape.memory_bytes);
        region.write_u64(ORIGIN_AT, shape.clock_origin);
        region.write(MAGIC_AT, MAGIC);
        self.mark = ReplicationMark::NONE;
    }

    pub fn cas_sequence(&self) -> u64 {
        self.region.read_u64(CAS_AT)
    }

    pub fn set_cas_sequence(&mut self, sequence: u64) {
        self.region.write_u64(CAS_AT, sequence);
    }

    /// The flush watermark and when it was set.
    pub fn flush(&self) -> (u64, u32) {
        (self.region.read_u64(FLUSH_CAS_AT), self.region.read_u32(FLUSH_AT_AT))
    }

    pub fn set_flush(&mut self, below_cas: u64, at: u32) {
        self.region.write_u32(FLUSH_AT_AT, at);
        self.region.write_u64(FLUSH_CAS_AT, below_cas);
    }

    pub fn mark(&self) -> ReplicationMark {
        self.mark
    }

    /// Records a new mark. Only the sequence number changes: one 8-byte store. Otherwise the kind goes to
    /// [`MarkKind::None`] first and last to its new value, so a kill in between leaves no mixed mark.
    pub fn set_mark(&mut self, mark: &ReplicationMark) {
        let old = self.mark;
        if old.kind == mark.kind && old.history == mark.history && old.epoch == mark.epoch {
            if old.seq != mark.seq {
                self.region.write_u64(MARK_SEQ_AT, mark.seq);
            }
        } else if mark.kind == MarkKind::ActiveChanging && old.kind != MarkKind::None {
            // Unusable either way: one store (on the hot path of an active's first write in a round).
            self.region.write_u64(MARK_KIND_AT, MarkKind::ActiveChanging.code());
            self.mark.kind = MarkKind::ActiveChanging;
            return;
        } else {
            if old.kind != MarkKind::None {
                self.region.write_u64(MARK_KIND_AT, MarkKind::None.code());
            }
            self.region.write(MARK_HISTORY_AT, &mark.history);
            self.region.write_u64(MARK_EPOCH_AT, mark.epoch);
            self.region.write_u64(MARK_SEQ_AT, mark.seq);
            self.region.write_u64(MARK_KIND_AT, mark.kind.code());
        }
        self.mark = *mark;
    }
}

/// The clock origin recorded in a memory file, if it holds a store header: a restarted process continues
/// that clock, so the items' expiry times keep their meaning (see `clock::Clock::continue_from`).
pub fn file_clock_origin(path: &std::path::Path) -> Option<u64> {
    use std::io::Read;
    let mut header = [0u8; 64];
    std::fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    if &header[MAGIC_AT..MAGIC_AT + 8] != MAGIC || header[VERSION_AT..VERSION_AT + 4] != VERSION.to_le_bytes() {
        return None;
    }
    Some(u64::from_le_bytes(header[ORIGIN_AT..ORIGIN_AT + 8].try_into().expect("8 bytes")))
}

/// A test hook called before each step of a write that a kill could cut (each metadata write, each
/// dead mark): a test copies the file there to restart from every intermediate state.
#[cfg(test)]
pub mod checkpoints {
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut()>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = RefCell::new(None);
    }

    /// Installs (or with `None` removes) this thread's hook.
    pub fn set(hook: Option<Hook>) {
        HOOK.with(|h| *h.borrow_mut() = hook);
    }

    pub fn hit() {
        HOOK.with(|h| {
            if let Some(hook) = h.borrow_mut().as_mut() {
                hook();
            }
        });
    }
}
