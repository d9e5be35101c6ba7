//! The failover witness: does a third address still answer? A standby that hears nothing from its
//! active promotes itself only while the witness answers, so a standby cut off from everything (which
//! cannot tell a dead active from its own isolation) does not take the service address.
//!
//! [`answers`] sends ICMP echo requests from a raw socket (CAP_NET_RAW, which failover needs anyway
//! for its ARP announcements) and waits for a matching reply, bounded in tries and time.

use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with `id` and `seq` and a short payload.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut packet = [0u8; 16];
    packet[0] = ECHO_REQUEST;
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..16].copy_from_slice(b"tandemwt");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// Whether `witness` answers an ICMP echo within `tries` attempts of `wait` each.
pub fn answers(witness: Ipv4Addr, tries: usize, wait: Duration) -> std::io::Result<bool> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    let id = (std::process::id() & 0xffff) as u16;
    let target = SockAddr::from(SocketAddrV4::new(witness, 0));
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    for seq in 0..tries as u16 {
        socket.send_to(&echo_request(id, seq), &target)?;
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            socket.set_read_timeout(Some(left))?;
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: recv_from initialised the first `len` bytes.
            let packet: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), len) };
            // A raw ICMP socket receives the IP header too.
            let header_len = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
            let Some(icmp) = packet.get(header_len..) else { continue };
            let from_witness = from.as_socket_ipv4().is_some_and(|a| *a.ip() == witness);
            if from_witness && icmp.len() >= 8 && icmp[0] == ECHO_REPLY && icmp[4..6] == id.to_be_bytes() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_carries_a_valid_checksum() {
        let packet = echo_request(0x1234, 7);
        assert_eq!(packet[0], ECHO_REQUEST);
        assert_eq!(&packet[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(checksum(&packet), 0, "a packet with its checksum sums to zero");
    }

    #[test]
    fn loopback_answers() {
        use crate::test_support::{is_root, runs_here};
        if !runs_here(is_root(), "loopback_answers", "raw ICMP sockets need root (CI runs as root)") {
            return;
        }
        // (A silent witness is tested in namespaces, tests/python/test_failover.py: traffic stays here.)
        assert!(answers(Ipv4Addr::LOCALHOST, 3, Duration::from_millis(200)).unwrap());
    }
}
