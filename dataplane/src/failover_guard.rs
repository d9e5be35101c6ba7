//! The last check before a standby promotes: is the service address still served by another node?
//!
//! A standby that hears nothing from its active on the replication link (and whose witness answers)
//! cannot tell a dead active from a dead replication link: with the link cut and both nodes otherwise
//! healthy, promoting would give the service address two owners, each taking writes, until the link
//! returns. So before it promotes, it looks at the clients' link the way a client does:
//!
//! 1. an ARP probe for the service address on the failover interface ([`crate::net::arp_probe`]), or
//!    in dataplane mode through the node's own stacks ([`crate::failover::ServiceSlot::probe`]): no
//!    answer means no node on that link holds it (the active's machine or link is dead) — promote; in
//!    dataplane mode an answer means a live holder (the address lives on its stacks) — do not promote;
//! 2. an answer names the holder's MAC; then a memcached `version` request to the service address and
//!    client port: a server that answers is an active alive and serving — do not promote (the
//!    replication link is what failed; the active keeps the clients, with sync mode degraded to async
//!    until the link returns); no server (refused, reset, or silent) is a node whose tandemd crashed
//!    while its kernel keeps the address — promote, and that node's stop hook or restart removes the
//!    stale address (see [`crate::failover::release_after_stop`]).
//!
//! The rule trades availability for a single owner only where the two conflict: a standby cut off
//! from the active's client side (but not from its witness) promotes, as before. See README's failover
//! section.
//!
//! - [`look`]: what the clients' link shows ([`ServiceSeen`]), bounded in time.
//! - [`active_still_serves`]: the verdict the replication thread acts on (each refusal counted as a
//!   declined promotion).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::FailoverSettings;
use crate::net::arp_probe;
use crate::net::takeover::MacAddress;
use crate::replication::NodeState;

/// ARP probes sent, and the wait for an answer after each. A kernel answers ARP in its receive path
/// (well under a millisecond here, even under load), so two probes that get no answer in 16 ms (an
/// answer to the first counts until the end) met no holder. This is what a machine death adds to the
/// failover time: 16 ms, measured 25-35 ms on this loaded 2-core machine (scheduling).
const ARP_TRIES: usize = 2;
const ARP_WAIT: Duration = Duration::from_millis(8);
/// How long the holder's memcached port may take to connect and to answer `version`. Only asked when
/// the address is held, so a generous bound costs a machine death nothing.
const SERVICE_WAIT: Duration = Duration::from_millis(300);
/// The least wait per probe sent through the userspace stacks (dataplane mode).
const STACK_ARP_WAIT: Duration = Duration::from_millis(25);
/// The most either wait grows to with a long `dead_after` (see [`Patience::for_dead_after`]).
const ARP_WAIT_MAX: Duration = Duration::from_millis(100);
const SERVICE_WAIT_MAX: Duration = Duration::from_millis(1000);

/// How long the check waits for the holder's answers.
///
/// The waits above suit the default detection (`dead_after_ms` 150). A pair configured to tolerate
/// longer silences says its machines can stall that long (TCG guests: `dead_after_ms` 2000), and an
/// active that was just silent for `dead_after` is the one most likely to answer late: waits fixed at
/// 8 ms per ARP probe and 300 ms per step of `version` can take a live, stalled active for a dead one
/// there (the RDMA pair's tests under Soft-RoCE saw such silences of a live active, and in earlier runs
/// a standby promoted beside one). So the waits grow with `dead_after`:
/// a twentieth of it per ARP probe and a quarter for the service, never below the defaults' and
/// bounded above, so what the check adds to a machine death stays a small part of the detection time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    /// After each ARP probe.
    pub arp_wait: Duration,
    /// For the connect to the service address, and for the answer to `version`.
    pub service_wait: Duration,
}

impl Patience {
    pub fn for_dead_after(dead_after: Option<Duration>) -> Patience {
        let Some(dead_after) = dead_after else { return Patience { arp_wait: ARP_WAIT, service_wait: SERVICE_WAIT } };
        Patience {
            arp_wait: (dead_after / 20).clamp(ARP_WAIT, ARP_WAIT_MAX),
            service_wait: (dead_after / 4).clamp(SERVICE_WAIT, SERVICE_WAIT_MAX),
        }
    }
}

/// What a standby sees of the service address on the clients' link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceSeen {
    /// Nobody answered ARP for it.
    Unheld,
    /// `holder` answers ARP for it and a memcached server answers on it.
    Served { holder: MacAddress },
    /// `holder` answers ARP for it, but no server answers on it (`why`).
    HeldUnserved { holder: MacAddress, why: String },
    /// The link could not be asked (`why`): no interface, no privilege.
    Unknown { why: String },
}

/// Looks at the service address from this node, as [`ServiceSeen`] says; blocks at most
/// `ARP_TRIES * patience.arp_wait + 2 * patience.service_wait`.
pub fn look(failover: &FailoverSettings, patience: Patience) -> ServiceSeen {
    if let Some(slot) = &failover.stack {
        // Dataplane mode: the clients' link belongs to DPDK, so the stacks ask it. An answer is another
        // node's stack (or kernel) holding the address; a stack's address lives and dies with its
        // tandemd, so the holder serves, and asking its port too would need a kernel route to the
        // clients' link that a DPDK node may not have.
        // Each probe crosses two userspace stacks whose pollers sleep between rounds (this node's
        // announcing worker sends it, the holder's worker answers it): 8 ms lost answers on a busy host.
        return match slot.probe(ARP_TRIES, patience.arp_wait.max(STACK_ARP_WAIT)) {
            Some(mac) => ServiceSeen::Served { holder: MacAddress(mac) },
            None => ServiceSeen::Unheld,
        };
    }
    let holder = match arp_probe::holder(&failover.interface, failover.service_ip, ARP_TRIES, patience.arp_wait) {
        Ok(Some(holder)) => holder,
        Ok(None) => return ServiceSeen::Unheld,
        Err(e) => return ServiceSeen::Unknown { why: e.to_string() },
    };
    match memcached_answers(SocketAddr::from((failover.service_ip, failover.service_port)), patience.service_wait) {
        Ok(()) => ServiceSeen::Served { holder },
        Err(why) => ServiceSeen::HeldUnserved { holder, why },
    }
}

/// Whether a memcached server answers `version` at `addr` within `wait` per step.
fn memcached_answers(addr: SocketAddr, wait: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, wait).map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(wait)).and_then(|()| stream.set_write_timeout(Some(wait))).map_err(|e| e.to_string())?;
    stream.write_all(b"version\r\n").map_err(|e| format!("asking {addr} for its version: {e}"))?;
    let mut answer = [0u8; 64];
    let mut got = 0;
    while got < answer.len() && !answer[..got].ends_with(b"\r\n") {
        match stream.read(&mut answer[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("waiting for {addr}'s version: {e}")),
        }
    }
    if answer[..got].starts_with(b"VERSION ") {
        Ok(())
    } else {
        Err(format!("{addr} answered {:?}, not a memcached version", String::from_utf8_lossy(&answer[..got])))
    }
}

/// Whether the active, silent on the replication link, still serves the service address, in which
/// case this standby must not promote. Every refusal is counted as a declined promotion, the first
/// while following logged (`noted` remembers it); every look is logged. `dead_after`: the pair's detection time, which sets
/// how long the look waits for answers ([`Patience::for_dead_after`]).
pub(crate) fn active_still_serves(failover: &FailoverSettings, dead_after: Option<Duration>, state: &NodeState, noted: &mut bool) -> bool {
    let started = std::time::Instant::now();
    let patience = Patience::for_dead_after(dead_after);
    let seen = look(failover, patience);
    tracing::info!(took_us = started.elapsed().as_micros() as u64, ?patience, ?seen, "looked at the service address");
    let address = format!("{}:{}", failover.service_ip, failover.service_port);
    match seen {
        ServiceSeen::Served { holder } => {
            tracing::info!(%address, %holder, "the active is silent on the replication link but still serves the service address");
            let first = !std::mem::replace(noted, true);
            state.decline(
                format!(
                    "not promoting: the active is silent on the replication link, but the service address {address} is still served \
                     (held by {holder}): the link or the active is slow, or the link failed; staying standby"
                ),
                first,
            );
            true
        }
        ServiceSeen::Unheld => {
            tracing::info!(%address, "no node answers ARP for the service address: promoting");
            false
        }
        ServiceSeen::HeldUnserved { holder, why } => {
            tracing::warn!(%address, %holder, %why, "the service address is held but not served (a crashed tandemd?): promoting");
            false
        }
        ServiceSeen::Unknown { why } => {
            tracing::warn!(%address, %why, "cannot tell whether the service address is still served: promoting as without the check");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_detection_keeps_the_measured_waits() {
        let defaults = Patience { arp_wait: ARP_WAIT, service_wait: SERVICE_WAIT };
        assert_eq!(Patience::for_dead_after(None), defaults);
        // dead_after_ms 150 (the default) and anything quicker: 8 ms per probe, 300 ms for the service.
        for millis in [10, 100, 150, 160] {
            assert_eq!(Patience::for_dead_after(Some(Duration::from_millis(millis))), defaults, "{millis} ms");
        }
    }

    #[test]
    fn a_pair_that_tolerates_long_silences_waits_longer_for_the_holder() {
        // The RDMA and TCP pair tests' TCG guests: dead_after_ms 2000. A stalled active answered ARP
        // later than 16 ms there and was taken for dead.
        let tcg = Patience::for_dead_after(Some(Duration::from_millis(2000)));
        assert_eq!(tcg, Patience { arp_wait: Duration::from_millis(100), service_wait: Duration::from_millis(500) });
        // Bounded: what the check adds to a machine death stays small against the detection time.
        let slow = Patience::for_dead_after(Some(Duration::from_secs(60)));
        assert_eq!(slow, Patience { arp_wait: ARP_WAIT_MAX, service_wait: SERVICE_WAIT_MAX });
        for millis in [150u64, 500, 1000, 2000, 5000, 60_000] {
            let dead_after = Duration::from_millis(millis);
            let patience = Patience::for_dead_after(Some(dead_after));
            assert!(patience.arp_wait >= ARP_WAIT && patience.service_wait >= SERVICE_WAIT, "{patience:?}");
            if millis >= 1000 {
                // Two ARP probes cost a machine death at most a tenth of the detection time.
                assert!(patience.arp_wait * ARP_TRIES as u32 <= dead_after / 10, "{millis} ms: {patience:?}");
            }
        }
    }
}
