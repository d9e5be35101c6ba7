//! Kernel TCP sockets: per-worker listeners sharing a port through SO_REUSEPORT.
//!
//! Every worker binds its own listener to the same address; the kernel spreads new connections over
//! them by a hash of the 4-tuple, so accepting needs no shared state and a connection lives its whole
//! life on the core that accepted it.

use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use super::{Ready, Transport};

/// The poller token of the worker's cross-core waker.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Listener tokens count down from here.
const LISTENER_BASE: usize = usize::MAX - 2;

/// One worker's kernel sockets: its SO_REUSEPORT listeners and connections, polled with epoll.
pub struct KernelTransport {
    poll: Poll,
    events: Events,
    listeners: Vec<TcpListener>,
}

impl KernelTransport {
    /// Binds one listener per address on `poll`, whose waker (token [`WAKER`]) is the worker's doorbell.
    pub fn new(poll: Poll, addrs: &[SocketAddr]) -> io::Result<KernelTransport> {
        let mut listeners = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut l = reuseport_listener(*addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            poll.registry().register(&mut l, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push(l);
        }
        Ok(KernelTransport { poll, events: Events::with_capacity(1024), listeners })
    }
}

impl Transport for KernelTransport {
    type Stream = TcpStream;

    fn poll(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            other => other?,
        }
        let listeners = self.listeners.len();
        for event in self.events.iter() {
            match event.token() {
                WAKER => {}
                Token(t) if t > LISTENER_BASE - listeners && t <= LISTENER_BASE => ready.push(Ready::Listener(LISTENER_BASE - t)),
                Token(index) => ready.push(Ready::Conn(index)),
            }
        }
        Ok(())
    }

    fn accept(&mut self, listener: usize) -> io::Result<Option<(TcpStream, Option<SocketAddr>)>> {
        match self.listeners[listener].accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                Ok(Some((stream, Some(peer))))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn register(&mut self, stream: &mut TcpStream, index: usize) -> io::Result<()> {
        self.poll.registry().register(stream, Token(index), Interest::READABLE | Interest::WRITABLE)
    }

    fn close(&mut self, mut stream: TcpStream) {
        let _ = self.poll.registry().deregister(&mut stream);
    }

    fn read(&mut self, stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
        replica::transport::read_into_spare(stream, buf)
    }

    fn write(&mut self, stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
        stream.write(bytes)
    }

    fn stream_id(&self, stream: &TcpStream) -> i32 {
        stream.as_raw_fd()
    }

    fn listeners(&self) -> Vec<(i32, SocketAddr)> {
        self.listeners.iter().filter_map(|l| Some((l.as_raw_fd(), l.local_addr().ok()?))).collect()
    }
}

/// memcached's default listen backlog.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Resolves `host` (an address or name, as `-l` takes it) with `port`.
pub fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address")));
    }
    Ok(addrs)
}

/// Binds `addr` without listening, with SO_REUSEADDR but not SO_REUSEPORT: it fails while anything
/// listens there (another server), and it takes no connections meanwhile. A probe that listened
/// would complete the handshake of a client that connects early and then reset it when dropped.
pub fn claim_port(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A non-blocking listener on `addr` with SO_REUSEADDR and SO_REUSEPORT set.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    Ok(TcpListener::from_std(reuseport_socket(addr, true)?))
}

/// A listening socket on `addr` with SO_REUSEADDR and SO_REUSEPORT set, non-blocking or not (io_uring
/// waits on a blocking one itself).
pub fn reuseport_socket(addr: SocketAddr, nonblocking: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(nonblocking)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_listeners_share_one_port() {
        let first = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = reuseport_listener(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
    }

    #[test]
    fn a_claimed_port_refuses_connections_and_a_listened_port_cannot_be_claimed() {
        let claim = claim_port("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = claim.local_addr().unwrap().as_socket().unwrap();
        let refused = std::net::TcpStream::connect(addr).expect_err("a claim must not accept connections");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        drop(claim);
        let listener = reuseport_listener(addr).unwrap();
        let err = claim_port(addr).expect_err("a port with a listener is taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
    }
}
