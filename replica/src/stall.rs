//! How long a thread was kept from running, so that a failure detector judges a peer's silence on its
//! own running time.
//!
//! A standby that did not run heard nothing, whatever the active sent; and when the whole machine
//! pauses (a hypervisor's steal, a guest stopped for a moment, a host under memory pressure) the active
//! pauses with it and sends nothing either. Counted in wall time, such a pause past `dead_after` looks
//! like a dead active to the standby that runs again first. [`StallClock`] measures, between two looks,
//! the wall time less the CPU time the thread used and the waits it asked for: what is left is time it
//! wanted to run and could not. The receiver adds that back to the active's allowance.

use std::time::{Duration, Instant};

/// A thread's account of the time it was held off the CPU (one clock per thread: it reads the calling
/// thread's CPU time).
pub struct StallClock {
    wall: Instant,
    cpu: Duration,
    allowed: Duration,
}

impl Default for StallClock {
    fn default() -> StallClock {
        StallClock::new()
    }
}

impl StallClock {
    pub fn new() -> StallClock {
        StallClock { wall: Instant::now(), cpu: thread_cpu_time(), allowed: Duration::ZERO }
    }

    /// Notes that the thread is about to wait up to `wait` of its own accord (a poll's timeout, a
    /// sleep): time spent there is not held against the machine.
    pub fn allow(&mut self, wait: Duration) {
        self.allowed += wait;
    }

    /// [`StallClock::held_off`] when at least `least` of wall time has passed since the interval began
    /// (it cannot be that long otherwise); zero, with the interval going on, before. A loop that turns
    /// thousands of times a second looks at the clock (a `clock_gettime` that is a real system call for
    /// a thread's CPU time) only when a stall worth counting is possible.
    pub fn held_off_past(&mut self, least: Duration) -> Duration {
        if self.wall.elapsed() < least {
            return Duration::ZERO;
        }
        self.held_off()
    }

    /// The time since the last call (or since [`StallClock::new`]) that the thread neither ran nor
    /// waited as it asked, and starts the next interval.
    pub fn held_off(&mut self) -> Duration {
        let (wall, cpu) = (Instant::now(), thread_cpu_time());
        let held = (wall - self.wall).saturating_sub(cpu.saturating_sub(self.cpu)).saturating_sub(self.allowed);
        *self = StallClock { wall, cpu, allowed: Duration::ZERO };
        held
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        // Without the CPU clock every interval counts as run: nothing is forgiven.
        return Duration::from_secs(u64::MAX / 4);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_it_did_not_announce_is_time_held_off() {
        let mut clock = StallClock::new();
        std::thread::sleep(Duration::from_millis(60));
        let held = clock.held_off();
        assert!(held >= Duration::from_millis(55), "{held:?}");
    }

    #[test]
    fn an_announced_wait_is_not() {
        let mut clock = StallClock::new();
        // Generous: a thread of a busy test machine may really wait some milliseconds to run again.
        clock.allow(Duration::from_millis(250));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(clock.held_off(), Duration::ZERO);
    }

    #[test]
    fn a_short_interval_is_not_looked_at_and_goes_on() {
        let mut clock = StallClock::new();
        std::thread::sleep(Duration::from_millis(40));
        // 40 ms held off, but under the 5 s asked for: not looked at (held_off would say 40 ms here).
        assert_eq!(clock.held_off_past(Duration::from_secs(5)), Duration::ZERO);
        // The interval began at new(): the first look did not restart it.
        assert!(clock.held_off_past(Duration::from_millis(10)) >= Duration::from_millis(35));
    }

    #[test]
    fn each_interval_starts_afresh() {
        let mut clock = StallClock::new();
        std::thread::sleep(Duration::from_millis(40));
        assert!(clock.held_off() >= Duration::from_millis(35));
        clock.allow(Duration::from_millis(250));
        assert_eq!(clock.held_off(), Duration::ZERO, "the last interval's stall is not counted twice");
    }
}
