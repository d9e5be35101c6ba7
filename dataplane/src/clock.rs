//! The server's clock: memcached's relative time, and conversion of client expiration times.
//!
//! Items carry times as [`RelTime`], seconds since shortly before the process started (memcached's
//! `rel_time_t`), so 32 bits last 136 years and `0` can mean "never". A process restarted on a memory
//! file continues its predecessor's clock instead ([`Clock::continue_from`]), so restored items keep
//! their expiry times. Each worker reads the clock once
//! per poll round and passes `now` down; the store never reads a clock itself, which keeps it
//! deterministic under test.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Seconds since [`Clock::started_unix`]. Never 0 for a real "now".
pub type RelTime = u32;

/// Relative offsets up to this many seconds are relative; larger values are absolute unix times.
pub const MAX_RELATIVE_EXPTIME: i64 = 60 * 60 * 24 * 30;

/// When an item expires, after the client's exptime has been interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Exptime 0: the item never expires (it may still be evicted).
    Never,
    /// Expires when `now >= at`.
    At(RelTime),
    /// A negative exptime or an absolute time in the past: the item is born expired.
    Immediately,
}

impl Expiry {
    /// The stored representation: 0 for never, else the RelTime of expiry (1 when already expired).
    pub fn as_rel(self) -> RelTime {
        match self {
            Expiry::Never => 0,
            Expiry::At(t) => t.max(1),
            Expiry::Immediately => 1,
        }
    }
}

/// The process-wide clock origin. Workers call [`Clock::now`] once per poll round.
pub struct Clock {
    started: Instant,
    started_unix: u64,
    /// RelTime at `started`.
    offset: u64,
}

/// Offset so that `now()` is never 0 and an exptime of "1 second ago" is representable.
const ORIGIN_SLACK_SECS: u64 = 2;

static GLOBAL: OnceLock<Clock> = OnceLock::new();

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Clock {
    /// The global clock, created on first use.
    pub fn global() -> &'static Clock {
        GLOBAL.get_or_init(|| Clock { started: Instant::now(), started_unix: unix_now().saturating_sub(ORIGIN_SLACK_SECS), offset: ORIGIN_SLACK_SECS })
    }

    /// Makes the global clock continue one that started at unix time `origin` (a previous run's, whose
    /// memory file holds items timed by it), so that stored expiry times keep their meaning. Only before
    /// the clock's first use, and only for an origin in the past; returns whether it took effect.
    pub fn continue_from(origin: u64) -> bool {
        let now = unix_now();
        if origin.saturating_add(ORIGIN_SLACK_SECS) > now || now - origin >= u64::from(u32::MAX / 2) {
            return false;
        }
        GLOBAL.set(Clock { started: Instant::now(), started_unix: origin, offset: now - origin }).is_ok()
    }

    /// Unix time of RelTime 0.
    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    /// The current relative time in seconds.
    pub fn now(&self) -> RelTime {
        (self.started.elapsed().as_secs() + self.offset) as RelTime
    }

    /// Unix time for a relative time.
    pub fn to_unix(&self, t: RelTime) -> u64 {
        self.started_unix + t as u64
    }

    /// Interprets a client's exptime the way memcached does: 0 never; negative already expired;
    /// up to 30 days relative to `now`; beyond that an absolute unix time.
    pub fn expiry(&self, exptime: i64, now: RelTime) -> Expiry {
        expiry_from(exptime, now, self.started_unix)
    }
}

/// [`Clock::expiry`] with the origin given, for tests.
pub fn expiry_from(exptime: i64, now: RelTime, started_unix: u64) -> Expiry {
    if exptime == 0 {
        Expiry::Never
    } else if exptime < 0 {
        Expiry::Immediately
    } else if exptime > MAX_RELATIVE_EXPTIME {
        let abs = exptime as u64;
        if abs <= started_unix {
            Expiry::Immediately
        } else {
            let rel = abs - started_unix;
            if rel <= now as u64 {
                Expiry::Immediately
            } else {
                Expiry::At(rel.min(u32::MAX as u64) as RelTime)
            }
        }
    } else {
        Expiry::At(now.saturating_add(exptime as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exptime_rules_follow_memcached() {
        let start = 1_700_000_000;
        assert_eq!(expiry_from(0, 10, start), Expiry::Never);
        assert_eq!(expiry_from(-1, 10, start), Expiry::Immediately);
        assert_eq!(expiry_from(100, 10, start), Expiry::At(110));
        assert_eq!(expiry_from(MAX_RELATIVE_EXPTIME, 10, start), Expiry::At(10 + MAX_RELATIVE_EXPTIME as u32));
        assert_eq!(expiry_from(start as i64 + 500, 10, start), Expiry::At(500));
        assert_eq!(expiry_from(start as i64 + 5, 10, start), Expiry::Immediately);
        assert_eq!(expiry_from(MAX_RELATIVE_EXPTIME + 1, 10, start), Expiry::Immediately);
    }
}
