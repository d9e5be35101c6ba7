//! Segments: the arena cut into fixed-size pieces, kept as a FIFO log plus a free list.
//!
//! A segment is written front to back like a log and never rewritten in place except for the few
//! header fields an item updates (see `item`). Its metadata lives here, outside the arena, in one small
//! `Vec`: the write offset, the live bytes and items (for accounting and for finding dead segments),
//! the next segment in log order, and the offset of the first item header (a segment may start with the
//! tail of an item that spans from the segment before it).
//!
//! The in-use segments form a singly linked log from the oldest (reclaimed first) to the newest. The
//! newest may be *open*: new items are appended to it. [`Segments`] only keeps this bookkeeping; what
//! happens to the items of a reclaimed segment is the engine's business.
//!
//! With a memory file, the log's shape (the oldest segment, and per segment the write offset, the first
//! item and the link to the next) is mirrored into the file's segment table as it changes, each change
//! after the item bytes it publishes: a segment is reset before it is linked, a write offset grows only
//! after the bytes below it are written. [`Segments::restore`] reads the log back from the table.

/// Bytes per segment.
pub const SEGMENT_SIZE: usize = 1 << SEGMENT_SHIFT;
/// `log2(SEGMENT_SIZE)`: an arena address is `segment << SEGMENT_SHIFT | offset`.
pub const SEGMENT_SHIFT: u32 = 20;
/// Items up to this size never span segments (and may be re-appended for a second chance).
pub const SMALL_ITEM_MAX: usize = SEGMENT_SIZE / 8;
/// Free segments kept back for reclaim's re-appends, so that reclaiming always has room.
pub const RESERVED_SEGMENTS: usize = 1;

/// A segment number.
pub type SegmentId = u32;
/// "No segment" in links.
pub const NO_SEGMENT: SegmentId = u32::MAX;

use super::arena::Region;

/// The metadata of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentMeta {
    /// Bytes written so far; items are appended here.
    pub write_offset: u32,
    /// Offset of the first item header; bytes before it are the tail of an item from the previous
    /// segment. Equal to `write_offset` or more when no header starts here.
    pub first_item: u32,
    /// Bytes of live items (pieces of spanning items count in the segment that holds them).
    pub live_bytes: u32,
    /// Live items whose header is in this segment.
    pub live_items: u32,
    /// The next segment in log order, or [`NO_SEGMENT`].
    pub next: SegmentId,
}

impl SegmentMeta {
    const EMPTY: SegmentMeta =
        SegmentMeta { write_offset: 0, first_item: 0, live_bytes: 0, live_items: 0, next: NO_SEGMENT };
}

/// Where to write next: a segment and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WritePosition {
    pub segment: SegmentId,
    pub offset: usize,
}

impl WritePosition {
    /// The arena address of this position.
    #[inline]
    pub fn address(self) -> usize {
        address(self.segment, self.offset)
    }
}

/// The arena address of `offset` in `segment`.
#[inline]
pub fn address(segment: SegmentId, offset: usize) -> usize {
    ((segment as usize) << SEGMENT_SHIFT) | offset
}

/// The segment holding arena address `addr`.
#[inline]
pub fn segment_of(addr: usize) -> SegmentId {
    (addr >> SEGMENT_SHIFT) as SegmentId
}

/// The offset of arena address `addr` within its segment.
#[inline]
pub fn offset_of(addr: usize) -> usize {
    addr & (SEGMENT_SIZE - 1)
}

/// Bytes of the file's segment table: the oldest segment, then one entry per segment.
pub fn table_len(count: usize) -> usize {
    TABLE_ENTRY * (count + 1)
}

const TABLE_ENTRY: usize = 16;

/// The segment table of a memory file (see the module docs).
pub struct SegmentTable {
    region: Region,
}

impl SegmentTable {
    pub fn new(region: Region) -> SegmentTable {
        SegmentTable { region }
    }

    fn entry(segment: SegmentId) -> usize {
        TABLE_ENTRY * (segment as usize + 1)
    }

    fn set_oldest(&mut self, segment: SegmentId) {
        self.region.write_u32(0, segment);
    }

    fn set_write_offset(&mut self, segment: SegmentId, offset: u32) {
        self.region.write_u32(Self::entry(segment), offset);
    }

    fn set_first_item(&mut self, segment: SegmentId, offset: u32) {
        self.region.write_u32(Self::entry(segment) + 4, offset);
    }

    fn set_next(&mut self, segment: SegmentId, next: SegmentId) {
        self.region.write_u32(Self::entry(segment) + 8, next);
    }

    /// Resets a segment's entry (before it is linked into the log).
    fn clear(&mut self, segment: SegmentId) {
        let mut bytes = [0u8; TABLE_ENTRY];
        bytes[8..12].copy_from_slice(&NO_SEGMENT.to_le_bytes());
        self.region.write(Self::entry(segment), &bytes);
    }

    /// The entry of `segment`: write offset, first item, next.
    fn read(&self, segment: SegmentId) -> (u32, u32, SegmentId) {
        let at = Self::entry(segment);
        (self.region.read_u32(at), self.region.read_u32(at + 4), self.region.read_u32(at + 8))
    }
}

/// The log of in-use segments and the free list.
pub struct Segments {
    metas: Vec<SegmentMeta>,
    /// Free segments; popped from the end, so recently used (already faulted-in) pages are reused first.
    free: Vec<SegmentId>,
    oldest: SegmentId,
    newest: SegmentId,
    /// Whether `newest` takes appends.
    head_open: bool,
    in_log: usize,
    /// The memory file's copy of the log's shape, if the store has one.
    table: Option<SegmentTable>,
}

impl Segments {
    /// `count` free segments, mirrored into `table` if given.
    pub fn new(count: usize, table: Option<SegmentTable>) -> Segments {
        let mut segments = Segments {
            metas: vec![SegmentMeta::EMPTY; count],
            free: Vec::with_capacity(count),
            oldest: NO_SEGMENT,
            newest: NO_SEGMENT,
            head_open: false,
            in_log: 0,
            table,
        };
        segments.reset();
        segments
    }

    /// The log a memory file's table describes (every segment sealed; live counts zero, for the
    /// engine's rebuild to fill in), or why the table cannot be believed.
    pub fn restore(count: usize, table: SegmentTable) -> Result<Segments, (SegmentTable, String)> {
        let mut metas = vec![SegmentMeta::EMPTY; count];
        let mut in_log = vec![false; count];
        let oldest = table.region.read_u32(0);
        let (mut current, mut newest, mut length) = (oldest, NO_SEGMENT, 0);
        while current != NO_SEGMENT {
            let segment = current as usize;
            if segment >= count || in_log[segment] {
                return Err((table, format!("segment link {current} is out of range or loops")));
            }
            in_log[segment] = true;
            let (write_offset, first_item, next) = table.read(current);
            if write_offset as usize > SEGMENT_SIZE || first_item as usize > SEGMENT_SIZE {
                return Err((table, format!("segment {current}: offsets {write_offset}/{first_item} beyond a segment")));
            }
            metas[segment] = SegmentMeta { write_offset, first_item, live_bytes: 0, live_items: 0, next };
            newest = current;
            current = next;
            length += 1;
        }
        let free = (0..count as SegmentId).rev().filter(|&s| !in_log[s as usize]).collect();
        Ok(Segments { metas, free, oldest, newest, head_open: false, in_log: length, table: Some(table) })
    }

    /// Every segment back on the free list, the log empty.
    pub fn reset(&mut self) {
        if let Some(table) = self.table.as_mut() {
            table.set_oldest(NO_SEGMENT);
        }
        self.metas.fill(SegmentMeta::EMPTY);
        self.free.clear();
        self.free.extend((0..self.metas.len() as SegmentId).rev());
        self.oldest = NO_SEGMENT;
        self.newest = NO_SEGMENT;
        self.head_open = false;
        self.in_log = 0;
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.metas.len()
    }

    /// Segments in the log.
    pub fn in_use(&self) -> usize {
        self.in_log
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn metas(&self) -> &[SegmentMeta] {
        &self.metas
    }

    #[inline]
    pub fn meta(&self, segment: SegmentId) -> &SegmentMeta {
        &self.metas[segment as usize]
    }

    #[inline]
    pub fn meta_mut(&mut self, segment: SegmentId) -> &mut SegmentMeta {
        &mut self.metas[segment as usize]
    }

    /// The oldest segment of the log, reclaimed first.
    pub fn oldest(&self) -> Option<SegmentId> {
        (self.oldest != NO_SEGMENT).then_some(self.oldest)
    }

    /// The open segment taking appends, if any.
    pub fn open_head(&self) -> Option<SegmentId> {
        self.head_open.then_some(self.newest)
    }

    /// Bytes left in the open segment (0 when none is open).
    #[inline]
    pub fn head_room(&self) -> usize {
        match self.open_head() {
            Some(head) => SEGMENT_SIZE - self.meta(head).write_offset as usize,
            None => 0,
        }
    }

    /// Where the next append goes, if a segment is open.
    #[inline]
    pub fn head_position(&self) -> Option<WritePosition> {
        self.open_head().map(|segment| WritePosition { segment, offset: self.meta(segment).write_offset as usize })
    }

    /// Stops appending to the open segment; its unused end stays unused until it is reclaimed.
    pub fn seal_head(&mut self) {
        self.head_open = false;
    }

    /// Takes a free segment, links it at the end of the log and opens it (sealing the previous one).
    /// `None` when the free list is empty.
    pub fn open_new_head(&mut self) -> Option<SegmentId> {
        let segment = self.free.pop()?;
        *self.meta_mut(segment) = SegmentMeta::EMPTY;
        if let Some(table) = self.table.as_mut() {
            table.clear(segment);
        }
        if self.newest == NO_SEGMENT {
            self.oldest = segment;
            if let Some(table) = self.table.as_mut() {
                table.set_oldest(segment);
            }
        } else {
            let newest = self.newest;
            self.meta_mut(newest).next = segment;
            if let Some(table) = self.table.as_mut() {
                table.set_next(newest, segment);
            }
        }
        self.newest = segment;
        self.head_open = true;
        self.in_log += 1;
        Some(segment)
    }

    /// Records `bytes` appended to the open segment.
    #[inline]
    pub fn advance_head(&mut self, bytes: usize) {
        let head = self.open_head().expect("an open segment");
        let meta = self.meta_mut(head);
        meta.write_offset += bytes as u32;
        debug_assert!(meta.write_offset as usize <= SEGMENT_SIZE);
        let offset = meta.write_offset;
        if let Some(table) = self.table.as_mut() {
            table.set_write_offset(head, offset);
        }
    }

    /// Sets where the first item header of `segment` is (after the tail of a spanning item). Called
    /// before anything is written to the segment, so its table entry never shows the tail as items.
    pub fn set_first_item(&mut self, segment: SegmentId, offset: u32) {
        self.meta_mut(segment).first_item = offset;
        if let Some(table) = self.table.as_mut() {
            table.set_first_item(segment, offset);
        }
    }

    /// Removes `segment` from the log (its predecessor is `prev`, or [`NO_SEGMENT`] when it is the
    /// oldest) and puts it on the free list. The caller has dealt with its items.
    pub fn release(&mut self, segment: SegmentId, prev: SegmentId) {
        let next = self.meta(segment).next;
        if prev == NO_SEGMENT {
            debug_assert_eq!(self.oldest, segment);
            self.oldest = next;
            if let Some(table) = self.table.as_mut() {
                table.set_oldest(next);
            }
        } else {
            debug_assert_eq!(self.meta(prev).next, segment);
            self.meta_mut(prev).next = next;
            if let Some(table) = self.table.as_mut() {
                table.set_next(prev, next);
            }
        }
        if self.newest == segment {
            self.newest = prev;
            self.head_open = false;
        }
        *self.meta_mut(segment) = SegmentMeta::EMPTY;
        self.free.push(segment);
        self.in_log -= 1;
    }

    /// The log from oldest to newest, with each segment's predecessor.
    pub fn log(&self) -> impl Iterator<Item = (SegmentId, SegmentId)> + '_ {
        let mut prev = NO_SEGMENT;
        let mut current = self.oldest;
        std::iter::from_fn(move || {
            if current == NO_SEGMENT {
                return None;
            }
            let item = (current, prev);
            prev = current;
            current = self.meta(current).next;
            Some(item)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_fifo_and_free_list_refills() {
        let mut segments = Segments::new(3, None);
        assert_eq!(segments.head_room(), 0);
        let a = segments.open_new_head().unwrap();
        segments.advance_head(100);
        assert_eq!(segments.head_room(), SEGMENT_SIZE - 100);
        let b = segments.open_new_head().unwrap();
        let c = segments.open_new_head().unwrap();
        assert_eq!(segments.open_new_head(), None);
        assert_eq!(segments.in_use(), 3);
        assert_eq!(segments.log().map(|(s, _)| s).collect::<Vec<_>>(), vec![a, b, c]);
        assert_eq!(segments.oldest(), Some(a));
        segments.release(a, NO_SEGMENT);
        assert_eq!(segments.oldest(), Some(b));
        // Removing from the middle keeps the chain.
        segments.release(c, b);
        assert_eq!(segments.log().map(|(s, _)| s).collect::<Vec<_>>(), vec![b]);
        assert_eq!(segments.open_head(), None, "releasing the newest closes it");
        assert_eq!(segments.free_count(), 2);
        let d = segments.open_new_head().unwrap();
        assert_eq!(segments.meta(b).next, d);
        assert_eq!(segments.meta(d).write_offset, 0);
    }

    #[test]
    fn addresses_split_into_segment_and_offset() {
        let addr = address(5, 1234);
        assert_eq!(segment_of(addr), 5);
        assert_eq!(offset_of(addr), 1234);
        assert_eq!(WritePosition { segment: 2, offset: 7 }.address(), 2 * SEGMENT_SIZE + 7);
    }
}
