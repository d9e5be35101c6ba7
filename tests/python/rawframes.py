"""Hand-built Ethernet frames for the fault tests: IPv4 and TCP with right (or deliberately wrong)
checksums, cut-short frames and foreign ethertypes, sent and watched through an AF_PACKET socket.

Used by the scripts test_userspace_faults.py runs inside the client's network namespace (they put this
directory on sys.path). Needs CAP_NET_RAW there.
"""

import socket
import struct

ETH_P_ALL = 0x0003
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def mac_bytes(text):
    return bytes.fromhex(text.replace(":", ""))


def ip_bytes(text):
    return socket.inet_aton(text)


def checksum(data):
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst_mac, src_mac, ethertype, payload):
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, payload, protocol=6, ident=0x1234, corrupt_checksum=False):
    """An IPv4 header (20 bytes, DF, TTL 64) in front of ``payload``."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, protocol, 0, ip_bytes(src), ip_bytes(dst))
    sum_ = checksum(header)
    if corrupt_checksum:
        sum_ ^= 0x5A5A
    return header[:10] + struct.pack("!H", sum_) + header[12:] + payload


def tcp(src, dst, sport, dport, seq, ack, flags, payload=b"", window=65535, corrupt_checksum=False, mss=None):
    """A TCP segment (checksum over the IPv4 pseudo-header) from ``src:sport`` to ``dst:dport``."""
    options = struct.pack("!BBH", 2, 4, mss) if mss else b""
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, offset << 4, flags, window, 0, 0) + options
    pseudo = ip_bytes(src) + ip_bytes(dst) + struct.pack("!BBH", 0, 6, len(header) + len(payload))
    sum_ = checksum(pseudo + header + payload)
    if corrupt_checksum:
        sum_ ^= 0x5A5A
    return header[:16] + struct.pack("!H", sum_) + header[18:] + payload


def tcp_frame(dst_mac, src_mac, src, dst, sport, dport, seq, ack, flags, payload=b"", bad_ip_checksum=False, bad_tcp_checksum=False, mss=None):
    segment = tcp(src, dst, sport, dport, seq, ack, flags, payload, corrupt_checksum=bad_tcp_checksum, mss=mss)
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4(src, dst, segment, corrupt_checksum=bad_ip_checksum))


def parse_tcp(frame):
    """(src, dst, sport, dport, seq, ack, flags, payload length) of an IPv4 TCP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack("!H", frame[16:18])[0]
    tcp_at = 14 + ihl
    if len(frame) < tcp_at + 20:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack("!HHIIH", frame[tcp_at : tcp_at + 14])
    data_offset = (off_flags >> 12) * 4
    length = total - ihl - data_offset
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    return src, dst, sport, dport, seq, ack, off_flags & 0x3F, length


def raw_socket(dev):
    """An AF_PACKET socket on ``dev`` that sends frames as given and sees every frame, both ways."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((dev, 0))
    s.setblocking(False)
    return s


def mac_of(dev):
    with open(f"/sys/class/net/{dev}/address") as f:
        return f.read().strip()


class FlowWatch:
    """Follows TCP connections' sequence numbers by watching their frames on an AF_PACKET socket, so a
    segment can be forged that the server would take as a connection's next data. Frames the watching
    socket sends itself are not seen by it (the kernel does not loop them back to their sender)."""

    def __init__(self, sniffer):
        self.sniffer = sniffer
        self.next_seq = {}  # (src, sport, dst, dport) -> the next sequence number that side will send

    def drain(self):
        while True:
            try:
                frame = self.sniffer.recv(65536)
            except BlockingIOError:
                return
            seen = parse_tcp(frame)
            if seen is None:
                continue
            src, dst, sport, dport, seq, _ack, flags, length = seen
            self.next_seq[(src, sport, dst, dport)] = (seq + length + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF

    def forge(self, dst_mac, src_mac, client, server, payload, **bad):
        """A frame carrying ``payload`` as the client's next data on the connection client -> server,
        acknowledging everything the server sent; ``bad`` as for :func:`tcp_frame`."""
        self.drain()
        seq = self.next_seq[client + server]
        ack = self.next_seq[server + client]
        return tcp_frame(dst_mac, src_mac, client[0], server[0], client[1], server[1], seq, ack, PSH | ACK, payload, **bad)
