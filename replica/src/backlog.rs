//! The shipper's copy of one shard's recent log: every record drained from the shard's ring lands here
//! once, and each standby reads from it at its own pace with its own cursor.
//!
//! A [`Backlog`] holds whole records with consecutive sequence numbers, in blocks as they were drained,
//! up to a byte limit (the oldest blocks go first). A standby whose next record is still here reads
//! on from its cursor ([`Backlog::read`]); one that fell behind the oldest record, or behind a gap left
//! by a full ring ([`Backlog::mark_gap`]), needs a full sync ([`FullSyncNeeded`]).
//!
//! Reading copies whole records into the caller's buffer, so a slow standby never holds up a fast one
//! and the shard's ring is drained whatever the standbys do.

use std::collections::VecDeque;

use crate::ids::{LogSeq, ShardId};
use crate::log::FullSyncNeeded;
use crate::record;

/// One drained batch: records `first..=last`, encoded back to back.
struct Block {
    first: LogSeq,
    last: LogSeq,
    bytes: Vec<u8>,
}

/// One shard's recent records, shared by every standby's cursor.
pub struct Backlog {
    shard: ShardId,
    blocks: VecDeque<Block>,
    bytes: usize,
    limit: usize,
    /// Records at or before this cannot be read: trimmed, lost to a full ring, or before the log began.
    floor: LogSeq,
    /// The newest record known (read or lost).
    newest: LogSeq,
    /// Emptied blocks kept for reuse.
    spare: Vec<Vec<u8>>,
}

/// What a [`Backlog::read`] copied out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub first: LogSeq,
    pub count: u32,
}

impl Backlog {
    /// An empty backlog of `shard` whose log continues after `last_seq`, keeping at least `limit` bytes.
    pub fn new(shard: ShardId, last_seq: LogSeq, limit: usize) -> Backlog {
        Backlog { shard, blocks: VecDeque::new(), bytes: 0, limit, floor: last_seq, newest: last_seq, spare: Vec::new() }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The newest sequence number this shard's log has reached.
    pub fn newest(&self) -> LogSeq {
        self.newest
    }

    /// Bytes of records held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A buffer to drain the next batch into (reused from trimmed blocks).
    pub fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Takes a drained batch: `count` records from `first`, which must follow the newest record.
    pub fn push(&mut self, first: LogSeq, count: u32, bytes: Vec<u8>) {
        debug_assert!(count > 0 && first == self.newest.next(), "backlog of {} got {first} after {}", self.shard, self.newest);
        let last = LogSeq(first.0 + u64::from(count) - 1);
        self.bytes += bytes.len();
        self.newest = last;
        self.blocks.push_back(Block { first, last, bytes });
        while self.blocks.len() > 1 && self.bytes - self.blocks[0].bytes.len() >= self.limit {
            self.pop_front();
        }
    }

    /// Records up to `through` were lost: nobody can read across the gap; everything held is dropped.
    pub fn mark_gap(&mut self, through: LogSeq) {
        while !self.blocks.is_empty() {
            self.pop_front();
        }
        self.floor = self.floor.max(through);
        self.newest = self.newest.max(through);
    }

    /// Whether a standby that applied everything up to `after` can be served from here.
    pub fn can_resume(&self, after: LogSeq) -> bool {
        after >= self.floor && after <= self.newest
    }

    /// Copies whole records after `after` (and at most through `until`) into `out`, at least one however
    /// large and then up to `max_bytes`. `Ok(None)` when there is nothing newer.
    pub fn read(&self, after: LogSeq, until: LogSeq, max_bytes: usize, out: &mut Vec<u8>) -> Result<Option<Span>, FullSyncNeeded> {
        if !self.can_resume(after) {
            let oldest_after = self.blocks.front().map_or(self.newest, |b| LogSeq(b.first.0 - 1)).max(self.floor);
            return Err(FullSyncNeeded { after, oldest_after, newest: self.newest });
        }
        let until = until.min(self.newest);
        if after >= until {
            return Ok(None);
        }
        // Blocks are in sequence order: find the one holding `after + 1`.
        let want = after.next();
        let start = self.blocks.partition_point(|b| b.last < want);
        let mut count = 0u32;
        let mut copied = 0usize;
        let mut seq = want;
        'blocks: for block in self.blocks.range(start..) {
            let mut offset = 0;
            let mut at = block.first;
            while offset < block.bytes.len() {
                let header = record::peek_header(&block.bytes[offset..]).expect("the log wrote this record");
                if at >= seq {
                    if seq > until || (count > 0 && copied + header.len > max_bytes) {
                        break 'blocks;
                    }
                    out.extend_from_slice(&block.bytes[offset..offset + header.len]);
                    count += 1;
                    copied += header.len;
                    seq = seq.next();
                }
                offset += header.len;
                at = at.next();
            }
        }
        Ok((count > 0).then_some(Span { first: want, count }))
    }

    fn pop_front(&mut self) {
        let mut block = self.blocks.pop_front().expect("a block");
        self.bytes -= block.bytes.len();
        self.floor = self.floor.max(block.last);
        block.bytes.clear();
        if self.spare.len() < 4 {
            self.spare.push(block.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{decode, Record};

    fn block(first: u64, count: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in first..first + count {
            let value = seq.to_string();
            Record::Set { key: b"k", flags: 0, expiry: 0, cas: seq, value: value.as_bytes() }
                .encode(ShardId(0), LogSeq(seq), &mut out)
                .unwrap();
        }
        out
    }

    fn seqs(bytes: &[u8]) -> Vec<u64> {
        let mut rest = bytes;
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let (logged, len) = decode(rest).unwrap();
            seen.push(logged.seq.0);
            rest = &rest[len..];
        }
        seen
    }

    #[test]
    fn each_cursor_reads_on_from_its_own_place() {
        let mut backlog = Backlog::new(ShardId(0), LogSeq::ZERO, 1 << 20);
        backlog.push(LogSeq(1), 3, block(1, 3));
        backlog.push(LogSeq(4), 2, block(4, 2));
        let mut out = Vec::new();
        let span = backlog.read(LogSeq(2), LogSeq(u64::MAX), 1 << 20, &mut out).unwrap().unwrap();
        assert_eq!((span.first, span.count), (LogSeq(3), 3));
        assert_eq!(seqs(&out), [3, 4, 5]);
        out.clear();
        assert_eq!(backlog.read(LogSeq(0), LogSeq(4), 1 << 20, &mut out).unwrap().unwrap().count, 4);
        assert_eq!(seqs(&out), [1, 2, 3, 4]);
        assert_eq!(backlog.read(LogSeq(5), LogSeq(u64::MAX), 1 << 20, &mut Vec::new()).unwrap(), None);
    }

    #[test]
    fn a_byte_budget_still_carries_one_record() {
        let mut backlog = Backlog::new(ShardId(0), LogSeq::ZERO, 1 << 20);
        backlog.push(LogSeq(1), 4, block(1, 4));
        let mut out = Vec::new();
        assert_eq!(backlog.read(LogSeq(0), LogSeq(u64::MAX), 1, &mut out).unwrap().unwrap().count, 1);
        assert_eq!(seqs(&out), [1]);
    }

    #[test]
    fn trimming_and_gaps_send_a_late_cursor_to_full_sync() {
        let one = block(1, 10).len();
        let mut backlog = Backlog::new(ShardId(0), LogSeq::ZERO, one);
        backlog.push(LogSeq(1), 10, block(1, 10));
        backlog.push(LogSeq(11), 10, block(11, 10));
        assert!(!backlog.can_resume(LogSeq(5)), "the first block was trimmed");
        assert!(backlog.read(LogSeq(5), LogSeq(u64::MAX), 1 << 20, &mut Vec::new()).is_err());
        assert!(backlog.can_resume(LogSeq(10)));
        backlog.mark_gap(LogSeq(25));
        assert!(!backlog.can_resume(LogSeq(20)));
        assert!(backlog.can_resume(LogSeq(25)));
        backlog.push(LogSeq(26), 1, block(26, 1));
        let mut out = Vec::new();
        assert_eq!(backlog.read(LogSeq(25), LogSeq(u64::MAX), 1 << 20, &mut out).unwrap().unwrap().first, LogSeq(26));
    }
}
