//! Identifiers of replication: which shard a record belongs to ([`ShardId`]), where it sits in that
//! shard's log ([`LogSeq`]), which reign of which active produced it ([`Epoch`]), and which history it
//! belongs to ([`ReplicationId`]).
//!
//! - [`ShardId`]: a shard's index, `0..shard_count`; fits a `u16` on the wire.
//! - [`LogSeq`]: a per-shard sequence number. The first record a shard ever logs is `LogSeq(1)`;
//!   `LogSeq::ZERO` means "nothing yet" (a standby that has applied nothing acknowledges zero).
//! - [`Epoch`]: monotonic, bumped by each promotion; the higher epoch wins every dispute.
//! - [`ReplicationId`]: 20 random bytes naming one history of the data (as Redis' replid). A new active
//!   draws a new one; printed as 40 lowercase hex digits.

use std::fmt;

/// A shard's index on both appliances of a pair (both must run the same shard count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ShardId(pub u16);

impl ShardId {
    /// The shard index as a `usize`, for indexing per-shard tables.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.0)
    }
}

/// A position in one shard's log: records are numbered 1, 2, 3 ... and `ZERO` means "before the first".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogSeq(pub u64);

impl LogSeq {
    /// Before the first record: what a standby with no applied records acknowledges.
    pub const ZERO: LogSeq = LogSeq(0);

    /// The sequence number that follows this one.
    pub fn next(self) -> LogSeq {
        LogSeq(self.0 + 1)
    }
}

impl fmt::Display for LogSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// The reign of an active: bumped by one on every promotion, persisted, never lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch a promotion moves to.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// Names one history of the data set, as Redis' replication id: 20 random bytes, hex when printed.
/// Ordered (as bytes) only to break a tie the same way on every node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicationId(pub [u8; ReplicationId::LEN]);

impl ReplicationId {
    /// Length in bytes.
    pub const LEN: usize = 20;

    /// A fresh id from the operating system's random source.
    ///
    /// # Panics
    /// If the OS has no random source at all (getrandom fails), which Tandem cannot run without.
    pub fn random() -> ReplicationId {
        let mut bytes = [0u8; Self::LEN];
        getrandom::getrandom(&mut bytes).expect("the OS random source is available");
        ReplicationId(bytes)
    }

    /// Parses 40 hex digits (either case), as [`fmt::Display`] prints them.
    pub fn from_hex(text: &str) -> Option<ReplicationId> {
        let text = text.as_bytes();
        if text.len() != 2 * Self::LEN {
            return None;
        }
        let mut bytes = [0u8; Self::LEN];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            let high = (pair[0] as char).to_digit(16)?;
            let low = (pair[1] as char).to_digit(16)?;
            *byte = (high * 16 + low) as u8;
        }
        Some(ReplicationId(bytes))
    }
}

impl fmt::Display for ReplicationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ReplicationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicationId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_id_prints_as_hex_and_parses_back() {
        let id = ReplicationId([0xab; 20]);
        assert_eq!(id.to_string(), "ab".repeat(20));
        assert_eq!(ReplicationId::from_hex(&id.to_string()), Some(id));
        assert_eq!(ReplicationId::from_hex(&"AB".repeat(20)), Some(id));
    }

    #[test]
    fn replication_id_rejects_bad_hex() {
        assert_eq!(ReplicationId::from_hex("abc"), None);
        assert_eq!(ReplicationId::from_hex(&"zz".repeat(20)), None);
        assert_eq!(ReplicationId::from_hex(&"a".repeat(41)), None);
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(ReplicationId::random(), ReplicationId::random());
    }

    #[test]
    fn sequences_and_epochs_advance_by_one() {
        assert_eq!(LogSeq::ZERO.next(), LogSeq(1));
        assert_eq!(Epoch(7).next(), Epoch(8));
        assert_eq!(ShardId(3).index(), 3);
    }
}
