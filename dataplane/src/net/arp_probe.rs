//! Who holds an IPv4 address on a link, asked the way RFC 5227's address conflict detection asks: an
//! ARP request for the address with sender IP 0.0.0.0, broadcast from a packet socket; every host whose
//! kernel holds the address answers it (Linux answers such probes, and they touch no neighbour cache,
//! so asking moves no client).
//!
//! - [`holder`]: the MAC that answers for the address within a bounded wait, or none.
//! - [`probe_frame`] and [`parse_reply`]: the frame sent and the check of what comes back, without I/O
//!   (and tested so).
//!
//! A standby uses this before it promotes: whether a node still holds the service address on the
//! clients' link (see [`crate::failover_guard`]). Needs CAP_NET_RAW, as the gratuitous ARPs of
//! [`super::takeover`] do. Acts in the calling thread's network namespace.

use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::takeover::{
    arp_request_frame, interface_index, interface_mac, packet_socket, MacAddress, TakeoverError, ARP_FRAME_LEN,
    ARP_HTYPE_ETHERNET, ETHERTYPE_ARP, ETHERTYPE_IPV4,
};

/// ARP operation: reply.
const ARP_OP_REPLY: u16 = 2;

/// The probe that asks who holds `address`, from `mac`: an Ethernet broadcast carrying an ARP request
/// with sender IP 0.0.0.0 (RFC 5227's ARP Probe: the asker claims no address, so no receiver learns a
/// mapping from it), target MAC zero, target IP `address`.
pub fn probe_frame(mac: MacAddress, address: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    arp_request_frame(mac, Ipv4Addr::UNSPECIFIED, address)
}

/// The MAC of a frame that is an ARP reply naming `address` as its sender IP, sent by a host other than
/// `ours`; None for any other frame.
pub fn parse_reply(frame: &[u8], address: Ipv4Addr, ours: MacAddress) -> Option<MacAddress> {
    let arp = frame.get(14..42)?;
    let is_arp = frame[12..14] == ETHERTYPE_ARP.to_be_bytes();
    let ethernet_ipv4 = arp[0..2] == ARP_HTYPE_ETHERNET.to_be_bytes() && arp[2..4] == ETHERTYPE_IPV4.to_be_bytes() && arp[4] == 6 && arp[5] == 4;
    if !is_arp || !ethernet_ipv4 || arp[6..8] != ARP_OP_REPLY.to_be_bytes() || arp[14..18] != address.octets() {
        return None;
    }
    let sender = MacAddress(arp[8..14].try_into().ok()?);
    (sender != ours).then_some(sender)
}

/// Which host answers ARP for `address` on `interface`: up to `tries` probes, each waited on for
/// `wait`. Returns the first answering MAC other than this interface's own, or None when no one
/// answered (nobody on the link holds the address, or whoever holds it is cut off). Blocks at most
/// `tries * wait` plus the sends.
pub fn holder(interface: &str, address: Ipv4Addr, tries: usize, wait: Duration) -> Result<Option<MacAddress>, TakeoverError> {
    let index = interface_index(interface)?;
    let ours = interface_mac(interface)?;
    // Bound to ARP before the first probe leaves, so no answer is missed.
    let socket = packet_socket(interface, index, ETHERTYPE_ARP)?;
    let frame = probe_frame(ours, address);
    let mut buf = [MaybeUninit::<u8>::uninit(); 128];
    let os = |action: &str, cause| TakeoverError::os(format!("{action} (who holds {address}?)"), interface, "CAP_NET_RAW", cause);
    // Waits run on poll(2), whose timeout is kept to the millisecond; a socket's receive timeout is
    // rounded to the kernel's tick and overshot a 15 ms wait by 10 ms and more here.
    socket.set_nonblocking(true).map_err(|e| os("making the probe socket non-blocking", e))?;
    for _ in 0..tries {
        socket.send(&frame).map_err(|e| os("sending an ARP probe", e))?;
        let deadline = Instant::now() + wait;
        loop {
            match socket.recv(&mut buf) {
                Ok(len) => {
                    // SAFETY: recv initialised the first `len` bytes of `buf` (at most its length).
                    let received: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), len.min(buf.len())) };
                    if let Some(mac) = parse_reply(received, address, ours) {
                        close_later(socket);
                        return Ok(Some(mac));
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(os("reading ARP replies", e)),
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
            let mut ready = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let millis = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: `ready` is one valid pollfd that lives across the call, and 1 is its count.
            if unsafe { libc::poll(&mut ready, 1, millis) } < 0 {
                let cause = std::io::Error::last_os_error();
                if cause.kind() != std::io::ErrorKind::Interrupted {
                    return Err(os("waiting for ARP replies", cause));
                }
            }
        }
    }
    close_later(socket);
    Ok(None)
}

/// Closes a packet socket on a thread of its own: closing one that receives frames waits for an RCU
/// grace period (milliseconds), which a standby deciding whether to promote should not.
fn close_later(socket: socket2::Socket) {
    let _ = std::thread::Builder::new().name("tandem-arp-close".into()).spawn(move || drop(socket));
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 1]);
    const THEIRS: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 2]);

    fn reply(from: MacAddress, address: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
        let mut frame = [0u8; ARP_FRAME_LEN];
        frame[0..6].copy_from_slice(&OURS.0);
        frame[6..12].copy_from_slice(&from.0);
        frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        frame[22..28].copy_from_slice(&from.0);
        frame[28..32].copy_from_slice(&address.octets());
        frame[32..38].copy_from_slice(&OURS.0);
        frame
    }

    #[test]
    fn the_probe_claims_no_address_and_asks_for_the_service_address() {
        let address = Ipv4Addr::new(10, 1, 2, 3);
        let frame = probe_frame(OURS, address);
        assert_eq!(frame[0..6], [0xff; 6], "broadcast");
        assert_eq!(frame[20..22], [0, 1], "a request");
        assert_eq!(frame[22..28], OURS.0, "sender MAC");
        assert_eq!(frame[28..32], [0; 4], "sender IP 0.0.0.0: no neighbour learns from it");
        assert_eq!(frame[38..42], address.octets(), "target IP");
    }

    #[test]
    fn only_a_reply_for_the_address_from_another_host_names_a_holder() {
        let address = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(parse_reply(&reply(THEIRS, address), address, OURS), Some(THEIRS));
        assert_eq!(parse_reply(&reply(OURS, address), address, OURS), None, "our own frame");
        assert_eq!(parse_reply(&reply(THEIRS, Ipv4Addr::new(10, 1, 2, 4)), address, OURS), None, "another address");
        assert_eq!(parse_reply(&probe_frame(THEIRS, address), address, OURS), None, "a request, not a reply");
        assert_eq!(parse_reply(&reply(THEIRS, address)[..30], address, OURS), None, "truncated");
    }
}
