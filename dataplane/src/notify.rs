//! Talking to systemd: readiness, status and the watchdog (`sd_notify(3)`), for `Type=notify` units.
//!
//! - [`Notifier`]: the datagram socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written
//!   `@name`); absent outside systemd, and then every message is a no-op.
//! - [`Watchdog`]: the interval systemd expects pings at (`$WATCHDOG_USEC`, for this process only when
//!   `$WATCHDOG_PID` names it), and the rule that decides a ping: every worker's poll loop has finished
//!   a round since the last ping. A worker with nothing to do still finishes a round each second (its
//!   poll timeout), so an idle server is fed; a stuck or stopped loop is not, and systemd restarts it.
//!
//! std's `UnixDatagram` covers the protocol (one datagram of `KEY=VALUE` lines), so no crate is needed.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// A connection to the service manager, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. A missing variable means "not under systemd"; a bad one is logged once.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        match Self::open(&name.to_string_lossy()) {
            Ok(socket) => Notifier {
                socket: Some(socket),
            },
            Err(e) => {
                tracing::warn!(socket = ?name, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from tandemd");
                Notifier { socket: None }
            }
        }
    }

    fn open(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        } else {
            SocketAddr::from_pathname(name)?
        };
        Ok((UnixDatagram::unbound()?, addr))
    }

    /// True when a service manager is listening.
    pub fn active(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one message (`READY=1`, `STATUS=...`, several lines at once). Failures are logged, never
    /// fatal: the cache serves whether or not systemd hears.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!(error = %e, message, "sd_notify failed");
            }
        }
    }
}

/// The watchdog systemd runs for this process (`WatchdogSec=`), if any.
pub struct Watchdog {
    /// How long systemd waits for a ping before it declares the service hung.
    pub timeout: Duration,
    /// Progress counts of the workers at the last ping, and when it was sent.
    last_rounds: Vec<u64>,
    last_ping: Instant,
}

/// What one look at the workers decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every worker finished a round since the last ping: send `WATCHDOG=1`.
    Ping,
    /// Some worker has not yet, but the last ping is recent: look again later.
    Wait,
    /// This worker has made no round for half the timeout: it is stuck, and the watchdog goes hungry.
    Stalled(usize),
}

impl Watchdog {
    /// Reads `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, which must be this process when set).
    pub fn from_env() -> Option<Watchdog> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        (usec > 0).then(|| Watchdog::new(Duration::from_micros(usec), Instant::now()))
    }

    fn new(timeout: Duration, now: Instant) -> Watchdog {
        Watchdog {
            timeout,
            last_rounds: Vec::new(),
            last_ping: now,
        }
    }

    /// How often to look at the workers: a quarter of the timeout, so a round that finishes late still
    /// leaves time for a ping before systemd gives up. The timeout must exceed the workers' idle poll
    /// timeout (1 s) by a margin; the appliance uses 10 s.
    pub fn check_interval(&self) -> Duration {
        self.timeout / 4
    }

    /// Given each worker's round count now: ping if all of them progressed since the last ping.
    pub fn check(&mut self, rounds: &[u64], now: Instant) -> Verdict {
        let lagging = if self.last_rounds.len() == rounds.len() {
            rounds
                .iter()
                .zip(&self.last_rounds)
                .position(|(now, before)| now == before)
        } else {
            None
        };
        match lagging {
            None => {
                self.last_rounds = rounds.to_vec();
                self.last_ping = now;
                Verdict::Ping
            }
            Some(worker) if now.duration_since(self.last_ping) >= self.timeout / 2 => {
                Verdict::Stalled(worker)
            }
            Some(_) => Verdict::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_only_when_every_worker_moved_since_the_last_ping() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut dog = Watchdog::new(Duration::from_secs(8), start);
        assert_eq!(dog.check_interval(), Duration::from_secs(2));
        assert_eq!(
            dog.check(&[5, 9], at(0)),
            Verdict::Ping,
            "the first look has nothing to compare"
        );
        assert_eq!(
            dog.check(&[6, 9], at(1000)),
            Verdict::Wait,
            "worker 1 made no round yet"
        );
        assert_eq!(
            dog.check(&[7, 10], at(2000)),
            Verdict::Ping,
            "compared with the last ping, not the last look"
        );
        assert_eq!(dog.check(&[8, 10], at(5000)), Verdict::Wait);
        assert_eq!(
            dog.check(&[9, 10], at(6000)),
            Verdict::Stalled(1),
            "half the timeout without a round"
        );
        assert_eq!(
            dog.check(&[9, 11], at(7000)),
            Verdict::Ping,
            "it recovered in time"
        );
    }

    #[test]
    fn messages_reach_the_socket_named_by_the_environment() {
        let dir = std::env::temp_dir().join(format!("tandem-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let (socket, addr) = Notifier::open(path.to_str().unwrap()).unwrap();
        let notifier = Notifier {
            socket: Some((socket, addr)),
        };
        notifier.send("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
