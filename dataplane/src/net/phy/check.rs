//! Frame checks in front of the userspace stack: frames that are truncated, carry a wrong IPv4 or TCP
//! checksum, or an ethertype the stack does not speak are dropped here and counted by reason (smoltcp
//! would drop most of them too, but silently). TCP checksums are verified here, so a corrupted segment
//! never becomes a stored value; smoltcp is then told not to verify them again.
//!
//! A veth or tap peer with checksum offload on leaves TCP checksums partial: such frames show up as
//! `rx_bad_checksum` (turn offload off on the peer: `ethtool -K <dev> tx off`).

use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::net::stack::Phy;

/// Why frames were dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounters {
    pub truncated: u64,
    pub bad_checksum: u64,
    pub unknown_ethertype: u64,
}

/// `P` with every received frame checked.
pub struct Checked<P> {
    inner: P,
    pub counters: FrameCounters,
    warned: bool,
}

impl<P> Checked<P> {
    pub fn new(inner: P) -> Checked<P> {
        Checked { inner, counters: FrameCounters::default(), warned: false }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }
}

/// What is wrong with a frame, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Good,
    Truncated,
    BadChecksum,
    UnknownEthertype,
}

/// Checks an Ethernet frame: ARP passes (smoltcp checks its fields); IPv4 needs a consistent header,
/// a right header checksum and, for TCP, a right TCP checksum.
pub fn check(frame: &[u8]) -> Verdict {
    if frame.len() < 14 {
        return Verdict::Truncated;
    }
    match [frame[12], frame[13]] {
        [0x08, 0x06] => return if frame.len() >= 14 + 28 { Verdict::Good } else { Verdict::Truncated },
        [0x08, 0x00] => {}
        _ => return Verdict::UnknownEthertype,
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Verdict::Truncated;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if header_len < 20 || total_len < header_len || total_len > ip.len() {
        return Verdict::Truncated;
    }
    if fold(sum(&ip[..header_len], 0)) != 0xffff {
        return Verdict::BadChecksum;
    }
    // Fragments carry part of a segment: their TCP checksum cannot be checked alone (smoltcp, built
    // without reassembly, drops them).
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if ip[9] == 6 && !fragment {
        let segment = &ip[header_len..total_len];
        if segment.len() < 20 {
            return Verdict::Truncated;
        }
        // The pseudo-header: source, destination, protocol, TCP length.
        let mut acc = sum(&ip[12..20], 0);
        acc += 6 + segment.len() as u64;
        if fold(sum(segment, acc)) != 0xffff {
            return Verdict::BadChecksum;
        }
    }
    Verdict::Good
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte is padded with zero), added to `acc`.
fn sum(bytes: &[u8], mut acc: u64) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]))
            + u64::from(u16::from_be_bytes([c[2], c[3]]))
            + u64::from(u16::from_be_bytes([c[4], c[5]]))
            + u64::from(u16::from_be_bytes([c[6], c[7]]));
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// A received frame, checked as it is consumed: a bad one reaches smoltcp as an empty frame, which it
/// discards.
pub struct CheckedRx<'a, T> {
    token: T,
    counters: &'a mut FrameCounters,
    warned: &'a mut bool,
}

impl<T: phy::RxToken> phy::RxToken for CheckedRx<'_, T> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let CheckedRx { token, counters, warned } = self;
        token.consume(|frame| match check(frame) {
            Verdict::Good => f(frame),
            verdict => {
                match verdict {
                    Verdict::Truncated => counters.truncated += 1,
                    Verdict::BadChecksum => {
                        counters.bad_checksum += 1;
                        if !*warned {
                            *warned = true;
                            tracing::warn!("dropping frames with bad checksums (counted in stats net); if the peer is a veth or tap with checksum offload, turn it off there: ethtool -K <dev> tx off");
                        }
                    }
                    Verdict::UnknownEthertype => counters.unknown_ethertype += 1,
                    Verdict::Good => unreachable!(),
                }
                f(&[])
            }
        })
    }
}

impl<P: Device> Device for Checked<P> {
    type RxToken<'a> = CheckedRx<'a, P::RxToken<'a>> where P: 'a;
    type TxToken<'a> = P::TxToken<'a> where P: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (token, tx) = self.inner.receive(timestamp)?;
        Some((CheckedRx { token, counters: &mut self.counters, warned: &mut self.warned }, tx))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = self.inner.capabilities();
        // Verified here already: smoltcp only computes them on transmit.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

impl<P: Phy> Phy for Checked<P> {
    fn flush(&mut self) {
        self.inner.flush();
    }

    fn counters(&self, out: &mut Vec<(&'static str, u64)>) {
        let c = &self.counters;
        out.extend([("rx_truncated", c.truncated), ("rx_bad_checksum", c.bad_checksum), ("rx_unknown_ethertype", c.unknown_ethertype)]);
        self.inner.counters(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, TcpRepr, TcpSeqNumber};

    /// A well-formed Ethernet + IPv4 + TCP frame carrying `payload`, checksums filled by smoltcp.
    fn tcp_frame(payload: &[u8]) -> Vec<u8> {
        let src = IpAddress::v4(10, 0, 0, 1);
        let dst = IpAddress::v4(10, 0, 0, 2);
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 11211,
            control: smoltcp::wire::TcpControl::Psh,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: smoltcp::wire::Ipv4Address::new(10, 0, 0, 1),
            dst_addr: smoltcp::wire::Ipv4Address::new(10, 0, 0, 2),
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr { src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]), dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]), ethertype: EthernetProtocol::Ipv4 };
        let mut buf = vec![0; 14 + ip.buffer_len() + tcp.buffer_len()];
        let mut frame = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut frame);
        let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
        ip.emit(&mut packet, &smoltcp::phy::ChecksumCapabilities::default());
        tcp.emit(&mut TcpPacket::new_unchecked(packet.payload_mut()), &src, &dst, &smoltcp::phy::ChecksumCapabilities::default());
        buf
    }

    #[test]
    fn good_frames_pass_and_each_kind_of_bad_one_is_named() {
        for payload in [&b""[..], b"get k\r\n", b"odd", &[0xab; 1400]] {
            assert_eq!(check(&tcp_frame(payload)), Verdict::Good, "{} bytes", payload.len());
        }
        let good = tcp_frame(b"set k 0 0 1\r\nx\r\n");
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(check(&padded), Verdict::Good, "Ethernet padding after the IP packet is fine");

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        assert_eq!(check(&flipped), Verdict::BadChecksum, "a flipped payload bit");
        let mut header = good.clone();
        header[14 + 8] = 1; // TTL changed, header checksum not
        assert_eq!(check(&header), Verdict::BadChecksum);
        assert_eq!(check(&good[..good.len() - 3]), Verdict::Truncated, "shorter than its IP total length");
        assert_eq!(check(&good[..20]), Verdict::Truncated);
        assert_eq!(check(&good[..10]), Verdict::Truncated);
        let mut ipv6 = good.clone();
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(check(&ipv6), Verdict::UnknownEthertype);
        let mut arp = vec![0xff; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        assert_eq!(check(&arp), Verdict::Truncated);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(check(&arp), Verdict::Good);
    }

    #[test]
    fn bad_frames_are_counted_and_never_reach_the_stack() {
        use crate::net::stack::memory::wire;
        let (a, mut b) = wire();
        let mut checked = Checked::new(a);
        let mut bad = tcp_frame(b"hello");
        *bad.last_mut().unwrap() ^= 0xff;
        for frame in [tcp_frame(b"hello"), bad, vec![1, 2, 3]] {
            phy::TxToken::consume(b.transmit(Instant::from_millis(0)).unwrap(), frame.len(), |buf| buf.copy_from_slice(&frame));
        }
        let mut seen = Vec::new();
        while let Some((rx, _)) = checked.receive(Instant::from_millis(0)) {
            seen.push(phy::RxToken::consume(rx, |f| f.len()));
        }
        assert_eq!(seen, vec![tcp_frame(b"hello").len(), 0, 0]);
        assert_eq!(checked.counters, FrameCounters { truncated: 1, bad_checksum: 1, unknown_ethertype: 0 });
    }
}
