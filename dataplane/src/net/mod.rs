//! Network backends: where bytes come from and go to.
//!
//! A worker's poll loop is written once against [`Transport`]; the backend is a choice of transport,
//! nothing more. Codecs, shards and the cross-core rings are the same for every one.
//!
//! - [`kernel`]: kernel TCP sockets, one SO_REUSEPORT listener per worker, polled with epoll (mio).
//!   The default; runs anywhere without privileges.
//! - [`uring`]: the same kernel sockets driven through one io_uring per worker (multishot accept and
//!   receive, provided buffers, one send per connection per round); `[net] backend = "uring"`.
//! - [`stack`]: a userspace TCP/IP stack (smoltcp) per worker over a [`stack::Phy`]: a DPDK queue, or
//!   a tap device ([`phy`]).
//! - [`takeover`]: claiming and releasing the service address (netlink) and announcing it with
//!   gratuitous ARPs (packet socket), in kernel mode.
//! - [`witness`]: whether the failover witness answers (ICMP echo).
//! - [`arp_probe`]: which host holds an address on a link (an RFC 5227 ARP probe).
//! - [`phy`] (feature `dpdk`): network devices for the userspace dataplane (DPDK queue pairs as smoltcp
//!   devices).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub mod arp_probe;
pub mod kernel;
pub mod phy;
pub mod stack;
pub mod takeover;
pub mod uring;
pub mod witness;

/// A MAC address as `ip link` writes it: `02:00:00:00:00:01`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Something a transport found ready during [`Transport::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Listener `n` may have connections to accept.
    Listener(usize),
    /// The connection registered under this index may be read or written.
    Conn(usize),
}

/// One worker's network: its listeners, its connections' byte streams, and how it waits.
///
/// Readiness is edge-triggered: a connection is reported when something changed, and the worker reads
/// until [`io::ErrorKind::WouldBlock`] (or its budget) and writes until the transport takes no more.
pub trait Transport {
    /// A connection's handle, owned by the worker's connection table.
    type Stream;

    /// Waits up to `timeout` for activity (or a ring of the worker's doorbell), then appends what is
    /// ready to `ready`.
    fn poll(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()>;

    /// Takes one connection from `listener`; `Ok(None)` when none waits.
    fn accept(&mut self, listener: usize) -> io::Result<Option<(Self::Stream, Option<SocketAddr>)>>;

    /// Starts reporting readiness of `stream` as [`Ready::Conn`]`(index)`.
    fn register(&mut self, stream: &mut Self::Stream, index: usize) -> io::Result<()>;

    /// Closes `stream`: what was written is still delivered, then the connection ends.
    fn close(&mut self, stream: Self::Stream);

    /// Reads into `buf`'s spare capacity and extends it; `Ok(0)` at end of stream.
    fn read(&mut self, stream: &mut Self::Stream, buf: &mut Vec<u8>) -> io::Result<usize>;

    /// Writes what the connection takes now; `WouldBlock` when it takes nothing.
    fn write(&mut self, stream: &mut Self::Stream, bytes: &[u8]) -> io::Result<usize>;

    /// Sends what this round's writes queued (a userspace stack transmits here).
    fn end_round(&mut self) {}

    /// A number naming the connection in `stats conns` (the fd for kernel sockets).
    fn stream_id(&self, stream: &Self::Stream) -> i32;

    /// Listeners for `stats conns`: (id, address).
    fn listeners(&self) -> Vec<(i32, SocketAddr)>;

    /// Counters for `stats net`, as (name, value); summed over workers by name.
    fn counters(&self, _out: &mut Vec<(&'static str, u64)>) {}
}
