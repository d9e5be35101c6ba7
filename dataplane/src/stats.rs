//! Counters: each is written by exactly one thread (its shard's or its worker's) and read by any.
//!
//! A [`Counter`] is an `AtomicU64` that its owner bumps with a plain load and store (no locked
//! instruction on the hot path); readers on other threads see a value at most a moment old. Aggregation
//! for `stats` sums the counters of every shard.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A single-writer, many-reader counter.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one. Only the owning thread may call this.
    #[inline]
    pub fn incr(&self) {
        self.add(1)
    }

    /// Adds `n`. Only the owning thread may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed)
    }

    /// Subtracts `n`, saturating at zero. Only the owning thread may call this.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).saturating_sub(n), Relaxed)
    }

    /// Sets the value. Only the owning thread may call this.
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed)
    }

    /// Reads the value from any thread.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

macro_rules! counter_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Default, Debug)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: Counter,)*
        }

        impl $name {
            /// Every counter as (memcached stat name, value).
            pub fn for_each(&self, mut f: impl FnMut(&'static str, u64)) {
                $(f(stringify!($field), self.$field.get());)*
            }

            /// Every counter, for the owner (to reset them).
            pub fn for_each_mut(&self, mut f: impl FnMut(&Counter)) {
                $(f(&self.$field);)*
            }
        }
    };
}

counter_set! {
    /// Command counters of one shard, named as memcached names them in `stats`. Executors in
    /// [`crate::shard`] and the protocol modules update them on the shard's own thread.
    CommandCounters {
        cmd_get, cmd_set, cmd_flush, cmd_touch,
        get_hits, get_misses, get_expired, get_flushed,
        delete_hits, delete_misses,
        incr_hits, incr_misses, decr_hits, decr_misses,
        cas_hits, cas_misses, cas_badval,
        touch_hits, touch_misses,
    }
}

counter_set! {
    /// Counters of one worker thread's connections.
    ConnCounters {
        curr_connections, total_connections, rejected_connections,
        bytes_read, bytes_written, conn_yields,
        /// Requests this worker sent to another shard's core.
        cross_shard_requests,
        /// Writes a read-only standby refused.
        read_only_refusals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_and_list_by_memcached_name() {
        let c = CommandCounters::default();
        c.get_hits.incr();
        c.get_hits.add(2);
        let mut seen = Vec::new();
        c.for_each(|name, v| seen.push((name, v)));
        assert!(seen.contains(&("get_hits", 3)));
        assert!(seen.contains(&("cmd_get", 0)));
    }
}
