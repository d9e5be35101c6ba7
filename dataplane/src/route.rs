//! Which shard owns a key: `hash(key)` reduced to `0..shards`.
//!
//! The same hash feeds the store's index, which uses its high bits; routing uses the low 32 bits so the
//! two choices are independent (a shard's keys still spread over its whole index).

use xxhash_rust::xxh3::xxh3_64;

/// Index of a shard (and of the worker thread that owns it).
pub type ShardId = usize;

/// The 64-bit hash of a key, shared by routing and the store's index.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The shard owning a key hash among `shards` shards.
#[inline]
pub fn shard_for_hash(hash: u64, shards: usize) -> ShardId {
    (((hash & 0xffff_ffff) * shards as u64) >> 32) as ShardId
}

/// The shard owning `key` among `shards` shards.
#[inline]
pub fn shard_for(key: &[u8], shards: usize) -> ShardId {
    shard_for_hash(key_hash(key), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_all_shards() {
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[shard_for(format!("key:{i}").as_bytes(), 4)] += 1;
        }
        for count in seen {
            assert!((800..1200).contains(&count), "{seen:?}");
        }
    }
}
