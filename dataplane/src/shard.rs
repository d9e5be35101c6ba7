//! A shard: one core's store, counters and settings; requests for its keys execute here.
//!
//! Exactly one thread owns a [`Shard`]. Requests reach it either as local calls from connections on the
//! same core or as frames from other cores (see [`crate::runtime`]); either way the protocol's
//! [`crate::protocol::Codec::execute`] runs against it and appends the response bytes.

use std::sync::Arc;

use crate::clock::{Clock, Expiry, RelTime};
use crate::config::Settings;
use crate::route::ShardId;
use crate::stats::CommandCounters;
use crate::store::Store;

/// One core's share of the cache.
pub struct Shard {
    pub id: ShardId,
    pub store: Store,
    /// Command counters (cmd_get, get_hits, ...), read by `stats` from any thread.
    pub counters: Arc<CommandCounters>,
    pub settings: Arc<Settings>,
    /// The current time, refreshed once per poll round by [`Shard::set_now`].
    now: RelTime,
    /// A delayed `flush_all`: the RelTime at which every item stored before it goes.
    pending_flush: Option<RelTime>,
}

impl Shard {
    pub fn new(id: ShardId, store: Store, settings: Arc<Settings>) -> Shard {
        Shard {
            id,
            store,
            counters: Arc::new(CommandCounters::default()),
            settings,
            now: Clock::global().now(),
            pending_flush: None,
        }
    }

    /// The time requests on this shard see.
    #[inline]
    pub fn now(&self) -> RelTime {
        self.now
    }

    /// Interprets a client exptime against this shard's `now`.
    #[inline]
    pub fn expiry(&self, exptime: i64) -> Expiry {
        Clock::global().expiry(exptime, self.now)
    }

    /// Whether responses carry real CAS values (`-C` turns them to 0).
    #[inline]
    pub fn cas_enabled(&self) -> bool {
        self.settings.cas_enabled
    }

    /// Advances time; runs a due delayed flush and a bounded slice of background expiry reclaim.
    pub fn set_now(&mut self, now: RelTime) {
        self.now = now;
        if let Some(at) = self.pending_flush {
            if now >= at {
                self.pending_flush = None;
                self.store.flush(self.now);
            }
        }
    }

    /// Background work between poll rounds; returns how many expired items were reclaimed.
    pub fn tick(&mut self) -> usize {
        self.store.tick(self.now)
    }

    /// `flush_all [delay]`: invalidate every item now, or at `now + delay` (memcached's rule: items
    /// present at that moment are gone; a later flush replaces an earlier pending one).
    pub fn flush(&mut self, delay: i64) {
        if delay <= 0 {
            self.pending_flush = None;
            self.store.flush(self.now);
        } else {
            let at = match self.expiry(delay) {
                Expiry::At(t) => t,
                Expiry::Never | Expiry::Immediately => self.now,
            };
            if at <= self.now {
                self.pending_flush = None;
                self.store.flush(self.now);
            } else {
                self.pending_flush = Some(at);
            }
        }
    }
}
