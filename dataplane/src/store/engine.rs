//! PLACEHOLDER until the store lands: the [`Store`] API every other module codes against.
//! (Replaced by the real engine: arena, segments, index, eviction.)

use super::*;
use std::sync::Arc;

pub struct Store {
    _private: (),
}

pub struct ItemRef<'s> {
    _store: &'s Store,
}

impl ItemView for ItemRef<'_> {
    fn key(&self) -> &[u8] { todo!() }
    fn client_flags(&self) -> u32 { todo!() }
    fn cas(&self) -> u64 { todo!() }
    fn exptime(&self) -> RelTime { todo!() }
    fn value_len(&self) -> usize { todo!() }
    fn value_chunks(&self) -> ValueChunks<'_> { todo!() }
}

impl ItemDebug for ItemRef<'_> {
    fn last_access(&self) -> RelTime { todo!() }
    fn fetched(&self) -> bool { todo!() }
    fn total_size(&self) -> usize { todo!() }
}

impl Store {
    /// Maps the arena and builds an empty store.
    pub fn new(_config: StoreConfig) -> Result<Store, StoreError> { todo!() }
    /// Where the arena's memory came from.
    pub fn backing(&self) -> Backing { todo!() }
    /// The store's counters, shareable with the thread that answers `stats`.
    pub fn stats(&self) -> &Arc<StoreStats> { todo!() }
    /// Largest value accepted.
    pub fn item_size_max(&self) -> usize { todo!() }
    /// A read; may touch, vivify, mark fetched, bump.
    pub fn get(&mut self, _key: &[u8], _options: GetOptions, _now: RelTime) -> GetResult<'_> { todo!() }
    /// A read with no side effects at all (meta `me`, and tests). Expired items are not returned.
    pub fn peek(&self, _key: &[u8], _now: RelTime) -> Option<ItemRef<'_>> { todo!() }
    pub fn store(&mut self, _request: &StoreRequest<'_>, _now: RelTime) -> StoreResult { todo!() }
    pub fn delete(&mut self, _request: &DeleteRequest<'_>, _now: RelTime) -> DeleteResult { todo!() }
    pub fn arith(&mut self, _request: &ArithRequest<'_>, _now: RelTime) -> ArithResult { todo!() }
    /// Removes every item (flush_all once its time has come).
    pub fn flush(&mut self) { todo!() }
    /// Background reclaim: frees a bounded amount of expired items; returns how many were reclaimed.
    pub fn tick(&mut self, _now: RelTime) -> usize { todo!() }
}
