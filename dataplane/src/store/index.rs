//! The key index: an open-addressing hash table of 8-byte entries, linear probing, no tombstones.
//!
//! An entry packs the high [`TAG_BITS`] bits of the key's hash (the *tag*) above a 36-bit location:
//! the item's byte address in the arena plus one, so no entry is ever 0 and 0 marks an empty slot.
//! The router uses the low 32 bits of the same hash to pick the shard, so the tag is independent of it.
//!
//! The home slot is the tag scaled onto the capacity (`tag * capacity >> TAG_BITS`, "fastrange"), so the
//! capacity need not be a power of two and the table grows by 1.5x, rehashing from the stored tags
//! without touching the items. Lookups compare tags first and only then the key bytes, through a
//! caller-supplied check (the index does not know where keys live). Deletion shifts the following
//! entries back (no tombstones, so probe lengths never degrade).

/// Bits of the hash kept in an entry.
pub const TAG_BITS: u32 = 28;
/// Bits of the location in an entry.
pub const LOCATION_BITS: u32 = 64 - TAG_BITS;
/// Largest arena address an entry can hold.
pub const MAX_ADDRESS: usize = (1usize << LOCATION_BITS) - 2;
const LOCATION_MASK: u64 = (1 << LOCATION_BITS) - 1;
/// Entries per 10 slots before the table grows.
const MAX_LOAD_TENTHS: usize = 9;
const MIN_CAPACITY: usize = 16;

/// The tag of a key hash: its high bits.
#[inline]
pub fn tag_of(hash: u64) -> u32 {
    (hash >> LOCATION_BITS) as u32
}

#[inline]
fn entry(tag: u32, addr: usize) -> u64 {
    debug_assert!(addr <= MAX_ADDRESS);
    ((tag as u64) << LOCATION_BITS) | (addr as u64 + 1)
}

#[inline]
fn entry_tag(entry: u64) -> u32 {
    (entry >> LOCATION_BITS) as u32
}

#[inline]
fn entry_addr(entry: u64) -> usize {
    ((entry & LOCATION_MASK) - 1) as usize
}

/// The table.
pub struct Index {
    slots: Vec<u64>,
    len: usize,
    grow_at: usize,
}

impl Index {
    /// A table sized for `items` entries without growing.
    pub fn with_items(items: usize) -> Index {
        let capacity = (items * 10).div_ceil(MAX_LOAD_TENTHS).max(MIN_CAPACITY);
        Index { slots: vec![0; capacity], len: 0, grow_at: grow_at(capacity) }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of the table.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<u64>()
    }

    /// Empties the table, keeping its size.
    pub fn clear(&mut self) {
        self.slots.fill(0);
        self.len = 0;
    }

    #[inline]
    fn home(&self, tag: u32) -> usize {
        ((tag as u64 * self.slots.len() as u64) >> TAG_BITS) as usize
    }

    #[inline]
    fn next_slot(&self, slot: usize) -> usize {
        if slot + 1 == self.slots.len() {
            0
        } else {
            slot + 1
        }
    }

    /// Finds the entry with `tag` whose item satisfies `is_key(address)`: its slot and address.
    /// Starts loading `tag`'s home slot (see [`super::Store::prefetch_index`]).
    #[inline]
    pub fn prefetch_home(&self, tag: u32) {
        super::arena::prefetch(&self.slots[self.home(tag)]);
    }

    /// The address in `tag`'s home slot if the entry there has that tag: where the item most likely is,
    /// for prefetching. Lookups still go through [`Index::find`].
    #[inline]
    pub fn home_address(&self, tag: u32) -> Option<usize> {
        let e = self.slots[self.home(tag)];
        (e != 0 && entry_tag(e) == tag).then(|| entry_addr(e))
    }

    #[inline]
    pub fn find(&self, tag: u32, mut is_key: impl FnMut(usize) -> bool) -> Option<(usize, usize)> {
        let mut slot = self.home(tag);
        loop {
            let e = self.slots[slot];
            if e == 0 {
                return None;
            }
            if entry_tag(e) == tag && is_key(entry_addr(e)) {
                return Some((slot, entry_addr(e)));
            }
            slot = self.next_slot(slot);
        }
    }

    /// The slot of the exact entry (`tag`, `addr`): whether the item at `addr` is the live one.
    #[inline]
    pub fn find_entry(&self, tag: u32, addr: usize) -> Option<usize> {
        let wanted = entry(tag, addr);
        let mut slot = self.home(tag);
        loop {
            let e = self.slots[slot];
            if e == 0 {
                return None;
            }
            if e == wanted {
                return Some(slot);
            }
            slot = self.next_slot(slot);
        }
    }

    /// The address held in `slot`, if occupied.
    #[inline]
    pub fn address_at(&self, slot: usize) -> Option<usize> {
        let e = self.slots[slot];
        (e != 0).then(|| entry_addr(e))
    }

    /// Points an occupied slot (of the same tag) at a new address.
    #[inline]
    pub fn relocate(&mut self, slot: usize, tag: u32, addr: usize) {
        debug_assert_eq!(entry_tag(self.slots[slot]), tag);
        self.slots[slot] = entry(tag, addr);
    }

    /// Adds an entry whose key is not in the table. May grow the table, which moves entries: slot
    /// numbers from before the call are stale after it.
    pub fn insert(&mut self, tag: u32, addr: usize) {
        if self.len + 1 > self.grow_at {
            self.grow();
        }
        self.place(entry(tag, addr));
        self.len += 1;
    }

    fn place(&mut self, e: u64) {
        let mut slot = self.home(entry_tag(e));
        while self.slots[slot] != 0 {
            slot = self.next_slot(slot);
        }
        self.slots[slot] = e;
    }

    /// Grows by half and rehashes from the stored tags. Stop-the-world for this shard; amortized over
    /// the inserts that filled the table.
    fn grow(&mut self) {
        let capacity = self.slots.len() + self.slots.len() / 2;
        let old = std::mem::replace(&mut self.slots, vec![0; capacity]);
        self.grow_at = grow_at(capacity);
        for e in old.into_iter().filter(|&e| e != 0) {
            self.place(e);
        }
    }

    /// Removes the entry in `slot`, shifting later entries of the probe run back into the hole.
    pub fn remove(&mut self, slot: usize) {
        debug_assert!(self.slots[slot] != 0);
        let mut hole = slot;
        let mut next = self.next_slot(slot);
        loop {
            let e = self.slots[next];
            if e == 0 {
                break;
            }
            let home = self.home(entry_tag(e));
            // The entry may move back into the hole unless its home lies cyclically in (hole, next].
            let home_after_hole = if hole <= next { hole < home && home <= next } else { hole < home || home <= next };
            if !home_after_hole {
                self.slots[hole] = e;
                hole = next;
            }
            next = self.next_slot(next);
        }
        self.slots[hole] = 0;
        self.len -= 1;
    }
}

fn grow_at(capacity: usize) -> usize {
    (capacity * MAX_LOAD_TENTHS / 10).min(capacity - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Keys are plain numbers here; the "arena" maps an address to its key.
    fn lookup(index: &Index, keys: &HashMap<usize, u64>, tag: u32, key: u64) -> Option<usize> {
        index.find(tag, |addr| keys[&addr] == key).map(|(_, addr)| addr)
    }

    #[test]
    fn entries_are_never_zero() {
        assert_ne!(entry(0, 0), 0);
        assert_eq!(entry_addr(entry(0, 0)), 0);
        assert_eq!(entry_addr(entry((1 << TAG_BITS) - 1, MAX_ADDRESS)), MAX_ADDRESS);
        assert_eq!(entry_tag(entry((1 << TAG_BITS) - 1, MAX_ADDRESS)), (1 << TAG_BITS) - 1);
    }

    #[test]
    fn insert_find_remove_with_colliding_tags() {
        let mut index = Index::with_items(8);
        let capacity = index.capacity();
        let mut keys = HashMap::new();
        // Every key has the same tag, so all share a probe run and only the key check tells them apart.
        for key in 0..10u64 {
            let addr = 1000 + key as usize;
            keys.insert(addr, key);
            index.insert(7, addr);
        }
        assert_eq!(index.capacity(), capacity, "10 entries fit without growing");
        for key in 0..10u64 {
            assert_eq!(lookup(&index, &keys, 7, key), Some(1000 + key as usize));
        }
        assert_eq!(lookup(&index, &keys, 8, 3), None);
        let (slot, _) = index.find(7, |addr| keys[&addr] == 4).unwrap();
        index.remove(slot);
        assert_eq!(lookup(&index, &keys, 7, 4), None);
        for key in (0..10u64).filter(|&k| k != 4) {
            assert_eq!(lookup(&index, &keys, 7, key), Some(1000 + key as usize), "key {key} after a removal");
        }
        assert_eq!(index.len(), 9);
    }

    #[test]
    fn wrapping_probe_runs_survive_removal() {
        let mut index = Index::with_items(8);
        let last_home_tag = (1u32 << TAG_BITS) - 1; // home = the last slot
        let mut keys = HashMap::new();
        for key in 0..4u64 {
            keys.insert(key as usize, key);
            index.insert(last_home_tag, key as usize);
        }
        keys.insert(100, 100);
        index.insert(0, 100); // home slot 0, displaced by the wrapped run
        let (slot, _) = index.find(last_home_tag, |addr| addr == 0).unwrap();
        assert_eq!(slot, index.capacity() - 1);
        index.remove(slot);
        for key in 1..4u64 {
            assert_eq!(lookup(&index, &keys, last_home_tag, key), Some(key as usize));
        }
        assert_eq!(lookup(&index, &keys, 0, 100), Some(100));
    }

    #[test]
    fn grows_by_half_and_keeps_every_entry() {
        let mut index = Index::with_items(100);
        let start = index.capacity();
        let mut keys = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut tags = Vec::new();
        for key in 0..10_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let tag = tag_of(rng) % 4096; // few distinct tags: plenty of collisions
            keys.insert(key as usize, key);
            index.insert(tag, key as usize);
            tags.push(tag);
        }
        assert!(index.capacity() > start);
        assert!(index.len() * 10 <= index.capacity() * 9);
        for (key, &tag) in tags.iter().enumerate() {
            assert_eq!(lookup(&index, &keys, tag, key as u64), Some(key));
            assert_eq!(index.find_entry(tag, key).map(|slot| index.address_at(slot)), Some(Some(key)));
        }
        // Remove every other key, then check the rest.
        for (key, &tag) in tags.iter().enumerate().step_by(2) {
            let slot = index.find_entry(tag, key).unwrap();
            index.remove(slot);
        }
        for (key, &tag) in tags.iter().enumerate() {
            let found = lookup(&index, &keys, tag, key as u64);
            assert_eq!(found, (key % 2 == 1).then_some(key));
        }
        assert_eq!(index.len(), 5_000);
    }
}
