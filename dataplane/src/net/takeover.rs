//! Taking over the service address in kernel mode: the steps a promoted node runs so that clients
//! follow it, and the step a demoted or restarted node runs so that they stop reaching it.
//!
//! - [`claim`]: adds the service address to an interface through rtnetlink (`RTM_NEWADDR`). An address
//!   already there is not an error: the answer says [`Claimed::AlreadyHeld`].
//! - [`release`]: removes it (`RTM_DELADDR`); an address that is not there is not an error either
//!   ([`Released::WasAbsent`]).
//! - [`announce`]: sends gratuitous ARPs for the address from a raw packet socket bound to the
//!   interface, so that neighbours replace the dead node's MAC in their caches. Without them clients
//!   keep sending to the old MAC for tens of seconds (FIELD-NOTES.md).
//! - [`gratuitous_arp_frame`]: the announcement's bytes, built without I/O (and tested so).
//! - [`interface_mac`]: an interface's Ethernet address.
//!
//! Everything here is synchronous and bounded: a netlink request waits at most
//! [`NETLINK_ANSWER_TIMEOUT`] for the kernel's answer, and [`announce`] blocks for
//! `(count - 1) * interval` plus the sends. The caller (the failover logic) decides when, and how
//! often, to announce. Each call opens and closes its own sockets: takeover is rare, and a call then
//! depends on no state left by an earlier one. Calls act in the network namespace of the calling
//! thread.
//!
//! Privileges: netlink address changes need CAP_NET_ADMIN, packet sockets CAP_NET_RAW; without them
//! the error says so ([`TakeoverError::NotPermitted`]).

use std::ffi::CString;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket as NetlinkSocket, SocketAddr as NetlinkAddr};
use socket2::{Domain, SockRef, Socket, Type};

/// How long a netlink request waits for the kernel's acknowledgement. The kernel answers address
/// requests while handling the send, so this only bounds the impossible case.
pub const NETLINK_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv4 (the ARP protocol type for IPv4 addresses).
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// ARP hardware type of Ethernet.
pub const ARP_HTYPE_ETHERNET: u16 = 1;
/// ARP operation: request. Announcements are requests (see [`gratuitous_arp_frame`]).
pub const ARP_OP_REQUEST: u16 = 1;
/// Length of an announcement on the wire: the 14-byte Ethernet header and the 28-byte ARP body,
/// zero-padded to Ethernet's minimum frame of 60 bytes (without FCS). Drivers pad short frames
/// anyway; padding here makes the frame the same on every driver.
pub const ARP_FRAME_LEN: usize = 60;

/// What [`claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The address was added by this call.
    Added,
    /// The interface already had the address with this prefix length (left by an earlier claim,
    /// by a crashed tandemd, or by an operator). Nothing changed.
    AlreadyHeld,
}

/// What [`release`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The address was removed by this call.
    Removed,
    /// The interface did not have the address with this prefix length. Nothing changed.
    WasAbsent,
}

/// An Ethernet (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddress = MacAddress([0xff; 6]);
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a takeover step failed, and on which interface.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("interface name {interface:?} is not valid: {reason}")]
    InvalidInterfaceName { interface: String, reason: &'static str },
    #[error("prefix length /{prefix_len} is not valid for IPv4 (0 to 32)")]
    InvalidPrefixLength { prefix_len: u8 },
    #[error("interface {interface} does not exist (in this network namespace)")]
    NoSuchInterface { interface: String },
    #[error("{action} on {interface}: not permitted (needs {capability})")]
    NotPermitted { action: String, interface: String, capability: &'static str },
    #[error("{action} on {interface}: {cause}")]
    Os { action: String, interface: String, cause: io::Error },
    #[error("{action} on {interface}: the kernel's netlink answer was not understood: {detail}")]
    NetlinkAnswer { action: String, interface: String, detail: String },
    #[error("interface {interface} is not Ethernet (ARP hardware type {hardware_type}): gratuitous ARP needs an Ethernet interface")]
    NotEthernet { interface: String, hardware_type: u16 },
}

impl TakeoverError {
    /// An OS error from `action`; EPERM and EACCES become [`TakeoverError::NotPermitted`] naming the
    /// capability that is missing.
    pub(crate) fn os(action: impl Into<String>, interface: &str, capability: &'static str, cause: io::Error) -> TakeoverError {
        let (action, interface) = (action.into(), interface.to_string());
        match cause.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TakeoverError::NotPermitted { action, interface, capability },
            _ => TakeoverError::Os { action, interface, cause },
        }
    }
}

/// Adds `address/prefix_len` to `interface`. Already present (same address and prefix length) is
/// not an error: [`Claimed::AlreadyHeld`].
///
/// The kernel tells addresses apart by address *and* prefix length: the same address with another
/// prefix length is a different entry, and this call adds it alongside.
pub fn claim(interface: &str, address: Ipv4Addr, prefix_len: u8) -> Result<Claimed, TakeoverError> {
    let index = interface_index(interface)?;
    check_prefix_len(prefix_len)?;
    let action = format!("adding {address}/{prefix_len}");
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let request = address_request(RouteNetlinkMessage::NewAddress, flags, index, address, prefix_len);
    match netlink_request(&request, &action, interface)? {
        None => Ok(Claimed::Added),
        Some(errno) if errno == libc::EEXIST => Ok(Claimed::AlreadyHeld),
        Some(errno) => Err(TakeoverError::os(action, interface, "CAP_NET_ADMIN", io::Error::from_raw_os_error(errno))),
    }
}

/// Removes `address/prefix_len` from `interface`. Absent is not an error: [`Released::WasAbsent`].
///
/// Like [`claim`], this matches the prefix length too: an entry of the same address with another
/// prefix length (say, from an earlier configuration) is left in place, and if it is the only one
/// the answer is [`Released::WasAbsent`].
pub fn release(interface: &str, address: Ipv4Addr, prefix_len: u8) -> Result<Released, TakeoverError> {
    let index = interface_index(interface)?;
    check_prefix_len(prefix_len)?;
    let action = format!("removing {address}/{prefix_len}");
    let request =
        address_request(RouteNetlinkMessage::DelAddress, NLM_F_REQUEST | NLM_F_ACK, index, address, prefix_len);
    match netlink_request(&request, &action, interface)? {
        None => Ok(Released::Removed),
        // The kernel's answer for "no such address on this interface".
        Some(errno) if errno == libc::EADDRNOTAVAIL => Ok(Released::WasAbsent),
        Some(errno) => Err(TakeoverError::os(action, interface, "CAP_NET_ADMIN", io::Error::from_raw_os_error(errno))),
    }
}

/// Sends `count` gratuitous ARPs for `address` out of `interface`, `interval` apart (nothing is
/// waited after the last), and returns how many were sent (`count`, or an error). Blocks for
/// `(count - 1) * interval` plus the sends. The frames are those of [`gratuitous_arp_frame`], from
/// the interface's own MAC.
pub fn announce(interface: &str, address: Ipv4Addr, count: usize, interval: Duration) -> Result<usize, TakeoverError> {
    let index = interface_index(interface)?;
    let mac = interface_mac(interface)?;
    if count == 0 {
        return Ok(0);
    }
    let frame = gratuitous_arp_frame(mac, address);
    let socket = packet_socket(interface, index, 0)?;
    for sent in 0..count {
        if sent > 0 {
            std::thread::sleep(interval);
        }
        let whole = socket.send(&frame).and_then(|n| {
            if n == frame.len() {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::WriteZero, format!("{n} of {} bytes sent", frame.len())))
            }
        });
        if let Err(cause) = whole {
            let action = format!("sending a gratuitous ARP for {address}");
            return Err(TakeoverError::os(action, interface, "CAP_NET_RAW", cause));
        }
    }
    Ok(count)
}

/// The gratuitous ARP that announces `address` at `mac`: an Ethernet broadcast from `mac` carrying an
/// ARP *request* whose sender and target IP are both `address`, sender MAC `mac`, target MAC zero.
///
/// Why a request and not a reply: it is the ARP Announcement of RFC 5227 (section 2.3) and what
/// Linux itself sends for a gratuitous ARP (`arp_notify`, `arping -U`). Linux receivers treat a
/// request with sender IP = target IP as gratuitous whatever its target MAC (a reply only when its
/// target MAC also equals the sender's), and a gratuitous ARP overrides an existing entry at once,
/// without waiting out the neighbour table's locktime. Sender IP and target IP must both be the
/// service address: an ARP that names the node's own address as sender updates no one's cache for
/// the service address (FIELD-NOTES.md). Like any ARP, it updates entries neighbours already have
/// (the clients that talked to the service); it does not make new ones unless they set `arp_accept`.
pub fn gratuitous_arp_frame(mac: MacAddress, address: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    arp_request_frame(mac, address, address)
}

/// A broadcast ARP request from `mac`, asking for `target` in the name of `sender` (target MAC zero,
/// padded to the minimum Ethernet frame): the announcement above, and the probe of
/// [`super::arp_probe`] (sender 0.0.0.0).
pub(crate) fn arp_request_frame(mac: MacAddress, sender: Ipv4Addr, target: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut frame = [0u8; ARP_FRAME_LEN];
    // Ethernet header.
    frame[0..6].copy_from_slice(&MacAddress::BROADCAST.0);
    frame[6..12].copy_from_slice(&mac.0);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    // ARP body (RFC 826).
    frame[14..16].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    frame[16..18].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame[18] = 6; // hardware address length
    frame[19] = 4; // protocol address length
    frame[20..22].copy_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    frame[22..28].copy_from_slice(&mac.0); // sender MAC
    frame[28..32].copy_from_slice(&sender.octets()); // sender IP
    // frame[32..38]: target MAC, zero (RFC 5227: ignored, should be zero).
    frame[38..42].copy_from_slice(&target.octets()); // target IP
    // frame[42..60]: padding to the minimum Ethernet frame.
    frame
}

/// `interface`'s Ethernet address (SIOCGIFHWADDR on the calling thread's network namespace).
/// Non-Ethernet interfaces (loopback, tun, ...) are [`TakeoverError::NotEthernet`].
pub fn interface_mac(interface: &str) -> Result<MacAddress, TakeoverError> {
    let name = interface_name(interface)?;
    // Any socket will do for this ioctl; a datagram socket needs no privilege.
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)
        .map_err(|e| TakeoverError::os("opening a socket to read the MAC address", interface, "CAP_NET_RAW", e))?;
    // SAFETY: ifreq is plain old data (arrays, integers and a union of them); all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name (NUL-terminated above, shorter than IFNAMSIZ) and writes
    // only into `request`, which lives across the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut request as *mut libc::ifreq) };
    if rc != 0 {
        let cause = io::Error::last_os_error();
        if cause.raw_os_error() == Some(libc::ENODEV) {
            return Err(TakeoverError::NoSuchInterface { interface: interface.to_string() });
        }
        return Err(TakeoverError::os("reading the MAC address", interface, "CAP_NET_ADMIN", cause));
    }
    // SAFETY: SIOCGIFHWADDR succeeded, so it filled the ifru_hwaddr member of the union.
    let hwaddr = unsafe { request.ifr_ifru.ifru_hwaddr };
    if hwaddr.sa_family != libc::ARPHRD_ETHER {
        return Err(TakeoverError::NotEthernet { interface: interface.to_string(), hardware_type: hwaddr.sa_family });
    }
    let mut mac = [0u8; 6];
    for (byte, data) in mac.iter_mut().zip(hwaddr.sa_data) {
        *byte = data as u8;
    }
    Ok(MacAddress(mac))
}

/// `interface` as a C string, checked the way the kernel checks it.
fn interface_name(interface: &str) -> Result<CString, TakeoverError> {
    let invalid = |reason| TakeoverError::InvalidInterfaceName { interface: interface.to_string(), reason };
    if interface.is_empty() {
        return Err(invalid("empty"));
    }
    if interface.len() >= libc::IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if interface.contains('/') || interface.chars().any(char::is_whitespace) {
        return Err(invalid("contains '/' or whitespace"));
    }
    CString::new(interface).map_err(|_| invalid("contains a NUL byte"))
}

/// The kernel's index of `interface`, in the calling thread's network namespace.
pub(crate) fn interface_index(interface: &str) -> Result<u32, TakeoverError> {
    let name = interface_name(interface)?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        let cause = io::Error::last_os_error();
        return match cause.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => {
                Err(TakeoverError::NoSuchInterface { interface: interface.to_string() })
            }
            _ => Err(TakeoverError::os("looking up the interface index", interface, "CAP_NET_ADMIN", cause)),
        };
    }
    Ok(index)
}

fn check_prefix_len(prefix_len: u8) -> Result<(), TakeoverError> {
    if prefix_len > 32 {
        return Err(TakeoverError::InvalidPrefixLength { prefix_len });
    }
    Ok(())
}

/// An RTM_NEWADDR or RTM_DELADDR request for `address/prefix_len` on interface `index`, with
/// IFA_LOCAL and IFA_ADDRESS both set to the address (what `ip address add` sends for a
/// non-point-to-point interface).
fn address_request(
    kind: fn(AddressMessage) -> RouteNetlinkMessage,
    flags: u16,
    index: u32,
    address: Ipv4Addr,
    prefix_len: u8,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = prefix_len;
    message.header.scope = AddressScope::Universe;
    message.header.index = index;
    message.attributes.push(AddressAttribute::Local(address.into()));
    message.attributes.push(AddressAttribute::Address(address.into()));
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(kind(message)));
    request.finalize();
    request
}

/// Sends `request` on a fresh NETLINK_ROUTE socket and waits for its acknowledgement: `None` when
/// the kernel accepted it, `Some(errno)` when it refused it.
fn netlink_request(
    request: &NetlinkMessage<RouteNetlinkMessage>,
    action: &str,
    interface: &str,
) -> Result<Option<i32>, TakeoverError> {
    let os_error = |step: &str, cause: io::Error| {
        TakeoverError::os(format!("{action}: {step}"), interface, "CAP_NET_ADMIN", cause)
    };
    let mut socket = NetlinkSocket::new(NETLINK_ROUTE).map_err(|e| os_error("opening a netlink socket", e))?;
    socket.bind_auto().map_err(|e| os_error("binding the netlink socket", e))?;
    socket.connect(&NetlinkAddr::new(0, 0)).map_err(|e| os_error("connecting the netlink socket", e))?;
    SockRef::from(&socket)
        .set_read_timeout(Some(NETLINK_ANSWER_TIMEOUT))
        .map_err(|e| os_error("setting the netlink socket's timeout", e))?;

    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0).map_err(|e| os_error("sending the netlink request", e))?;

    let not_understood = |detail: String| TakeoverError::NetlinkAnswer {
        action: action.to_string(),
        interface: interface.to_string(),
        detail,
    };
    let mut answer = Vec::with_capacity(8192);
    loop {
        answer.clear();
        socket.recv(&mut answer, 0).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                not_understood(format!("no acknowledgement within {NETLINK_ANSWER_TIMEOUT:?}"))
            }
            _ => os_error("reading the netlink answer", e),
        })?;
        // A datagram may carry several messages; the acknowledgement is the NLMSG_ERROR that
        // answers our sequence number (error code 0 for success).
        let mut offset = 0;
        while offset < answer.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[offset..])
                .map_err(|e| not_understood(e.to_string()))?;
            let length = message.header.length as usize;
            if length == 0 {
                return Err(not_understood("a message of length 0".into()));
            }
            if message.header.sequence_number == request.header.sequence_number {
                if let NetlinkPayload::Error(error) = message.payload {
                    return Ok(error.code.map(|code| code.get().abs()));
                }
            }
            offset += (length + 3) & !3;
        }
    }
}

/// A raw packet socket bound to interface `index`, for sending whole Ethernet frames. Bound with
/// `ethertype` 0, the kernel queues no received frames on it; with another, it receives the frames of
/// that EtherType (in network order on the wire; given here in host order).
pub(crate) fn packet_socket(interface: &str, index: u32, ethertype: u16) -> Result<Socket, TakeoverError> {
    // Opened with protocol 0 and given the EtherType at bind: a socket opened with one would be
    // unhooked and hooked again by the bind, and unhooking waits for an RCU grace period (milliseconds).
    let socket = Socket::new(Domain::PACKET, Type::RAW, Some(0.into()))
        .map_err(|e| TakeoverError::os("opening a packet socket", interface, "CAP_NET_RAW", e))?;
    // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
    let mut link: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    link.sll_family = libc::AF_PACKET as u16;
    link.sll_protocol = ethertype.to_be();
    link.sll_ifindex = index as i32;
    // SAFETY: `link` is a valid sockaddr_ll that outlives the call, and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            &link as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(TakeoverError::os(
            "binding the packet socket",
            interface,
            "CAP_NET_RAW",
            io::Error::last_os_error(),
        ));
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_arp_request_naming_the_service_address_twice() {
        let mac = MacAddress([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        let frame = gratuitous_arp_frame(mac, Ipv4Addr::new(10, 1, 2, 3));
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,     // Ethernet destination: broadcast
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55,     // Ethernet source: the interface's MAC
            0x08, 0x06,                             // EtherType: ARP
            0x00, 0x01,                             // htype: Ethernet
            0x08, 0x00,                             // ptype: IPv4
            6,                                      // hlen
            4,                                      // plen
            0x00, 0x01,                             // op: request
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55,     // sender MAC
            10, 1, 2, 3,                            // sender IP: the service address
            0, 0, 0, 0, 0, 0,                       // target MAC: zero
            10, 1, 2, 3,                            // target IP: the service address again
        ];
        assert_eq!(frame.len(), 60, "padded to Ethernet's minimum frame");
        assert_eq!(frame[..42], expected);
        assert!(frame[42..].iter().all(|&b| b == 0), "padding is zero");
    }

    #[test]
    fn a_mac_address_prints_as_ip_does() {
        assert_eq!(MacAddress([0x02, 0, 0xab, 0x0c, 0xff, 1]).to_string(), "02:00:ab:0c:ff:01");
    }

    #[test]
    fn errors_name_the_interface_and_what_was_wrong() {
        let address = Ipv4Addr::new(10, 1, 2, 3);
        let missing = claim("tandem-nosuch0", address, 24).unwrap_err();
        assert!(matches!(missing, TakeoverError::NoSuchInterface { .. }), "{missing:?}");
        assert_eq!(missing.to_string(), "interface tandem-nosuch0 does not exist (in this network namespace)");
        let missing = announce("tandem-nosuch0", address, 1, Duration::ZERO).unwrap_err();
        assert!(matches!(missing, TakeoverError::NoSuchInterface { .. }), "{missing:?}");
        let long = release("a-name-longer-than-15", address, 24).unwrap_err();
        assert!(long.to_string().contains("longer than 15 bytes"), "{long}");
        let prefix = claim("lo", address, 33).unwrap_err();
        assert_eq!(prefix.to_string(), "prefix length /33 is not valid for IPv4 (0 to 32)");
        // Loopback has no Ethernet address; found before any privilege is needed.
        let loopback = announce("lo", address, 1, Duration::ZERO).unwrap_err();
        assert!(matches!(loopback, TakeoverError::NotEthernet { hardware_type: 772, .. }), "{loopback:?}");
        assert!(loopback.to_string().starts_with("interface lo is not Ethernet"), "{loopback}");
    }

    #[test]
    fn a_missing_privilege_is_named() {
        let eperm =
            TakeoverError::os("adding 10.1.2.3/24", "eth0", "CAP_NET_ADMIN", io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(eperm.to_string(), "adding 10.1.2.3/24 on eth0: not permitted (needs CAP_NET_ADMIN)");
        let other = TakeoverError::os(
            "sending a gratuitous ARP",
            "eth0",
            "CAP_NET_RAW",
            io::Error::from_raw_os_error(libc::ENETDOWN),
        );
        assert!(other.to_string().starts_with("sending a gratuitous ARP on eth0: Network is down"), "{other}");
    }
}
