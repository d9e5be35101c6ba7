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
//! - [`active_still_serves`]: the verdict the replication thread acts on (a refusal noted once).

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
/// `ARP_TRIES * ARP_WAIT + 2 * SERVICE_WAIT`.
pub fn look(failover: &FailoverSettings) -> ServiceSeen {
    if let Some(slot) = &failover.stack {
        // Dataplane mode: the clients' link belongs to DPDK, so the stacks ask it. An answer is another
        // node's stack (or kernel) holding the address; a stack's address lives and dies with its
        // tandemd, so the holder serves, and asking its port too would need a kernel route to the
        // clients' link that a DPDK node may not have.
        return match slot.probe(ARP_TRIES, ARP_WAIT) {
            Some(mac) => ServiceSeen::Served { holder: MacAddress(mac) },
            None => ServiceSeen::Unheld,
        };
    }
    let holder = match arp_probe::holder(&failover.interface, failover.service_ip, ARP_TRIES, ARP_WAIT) {
        Ok(Some(holder)) => holder,
        Ok(None) => return ServiceSeen::Unheld,
        Err(e) => return ServiceSeen::Unknown { why: e.to_string() },
    };
    match memcached_answers(SocketAddr::from((failover.service_ip, failover.service_port))) {
        Ok(()) => ServiceSeen::Served { holder },
        Err(why) => ServiceSeen::HeldUnserved { holder, why },
    }
}

/// Whether a memcached server answers `version` at `addr` within [`SERVICE_WAIT`] per step.
fn memcached_answers(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, SERVICE_WAIT).map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(SERVICE_WAIT)).and_then(|()| stream.set_write_timeout(Some(SERVICE_WAIT))).map_err(|e| e.to_string())?;
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
/// case this standby must not promote. The first refusal while following is noted as a role event
/// (`noted` remembers it); every look is logged.
pub(crate) fn active_still_serves(failover: &FailoverSettings, state: &NodeState, noted: &mut bool) -> bool {
    let started = std::time::Instant::now();
    let seen = look(failover);
    tracing::info!(took_us = started.elapsed().as_micros() as u64, ?seen, "looked at the service address");
    let address = format!("{}:{}", failover.service_ip, failover.service_port);
    match seen {
        ServiceSeen::Served { holder } => {
            tracing::info!(%address, %holder, "the active is silent on the replication link but still serves the service address");
            if !*noted {
                *noted = true;
                state.note(format!(
                    "not promoting: the active is silent on the replication link, but the service address {address} is still served \
                     (held by {holder}): the replication link failed, not the active; staying standby"
                ));
            }
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
