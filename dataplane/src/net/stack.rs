//! A userspace TCP/IP stack per worker: smoltcp over one [`Phy`] (a DPDK queue pair), as a [`Transport`].
//!
//! Each worker owns one smoltcp `Interface` (the node's address and MAC, one neighbour cache) and splits
//! its sockets over many small socket sets, *cells*, of at most [`CELL_SOCKETS`] each. smoltcp's
//! `Interface` looks at every socket of the set it is given, on egress and for each incoming segment;
//! with one set that cost follows the connections held, busy or idle. Here a flow table of our own sends
//! each received frame to the one cell holding its connection, and egress runs only for cells that have
//! work (a frame came in, the worker wrote or read, or a timer of theirs is due). The cost of a round
//! follows the active connections.
//!
//! - Cell 0 is the *listen cell*: the listening sockets on the service port, and everything that is not
//!   an established flow (a SYN, ARP, ICMP, a stray segment, which then gets its RST). smoltcp has no
//!   `accept`: a listening socket *becomes* the connection. Once one leaves `Listen` it moves to a cell
//!   with room, its flow is entered in the table, and a fresh listening socket takes its place (the pool
//!   is topped up after every SYN, within `max_half_open`).
//! - Readiness: every connection's socket carries a waker (smoltcp's `async` wakers) that records its
//!   index when data arrives, buffer space frees up or its state changes. A waker is one-shot; it is armed
//!   again when the worker reads or writes until the socket has nothing more to give or take, which makes
//!   readiness edge-triggered like epoll's.
//!
//! A round: [`Transport::poll`] receives frames and runs the stack, then reports ready connections; the
//! worker serves them; [`Transport::end_round`] runs egress for the cells with work and flushes the
//! device's burst. With nothing to do the worker spins for a while, then sleeps in short steps (a
//! doorbell from another core ends the sleep at once): see [`IdlePolicy`].

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration as NetDuration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

use super::takeover::MacAddress;
use super::{Ready, Transport};

/// A network device one worker drives: smoltcp's `Device`, plus the end of a round.
pub trait Phy: Device {
    /// Sends the frames queued this round (a NIC queue transmits in bursts).
    fn flush(&mut self) {}

    /// The device's counters for `stats net`.
    fn counters(&self, _out: &mut Vec<(&'static str, u64)>) {}
}

/// When to spin and when to sleep with nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    /// Keep polling the device this long after the last frame or request before sleeping.
    pub spin: Duration,
    /// Sleep in steps of at most this long (the device is polled after each; a doorbell cuts it short).
    pub sleep: Duration,
}

impl Default for IdlePolicy {
    fn default() -> IdlePolicy {
        IdlePolicy { spin: Duration::from_micros(200), sleep: Duration::from_micros(500) }
    }
}

/// A worker's stack: its address, port and sizes.
#[derive(Clone, Debug)]
pub struct StackConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mac: [u8; 6],
    pub port: u16,
    /// Sockets kept in `Listen`, topped up after every SYN, so a burst of connections is not refused.
    pub backlog: usize,
    /// Half-open connections (SYN received, handshake unfinished) allowed at once: beyond it SYNs are
    /// refused (a SYN flood cannot eat the memory of established clients).
    pub max_half_open: usize,
    /// Per-connection receive and send buffers, in bytes: fixed in smoltcp, so they bound both the window
    /// and the memory of thousands of connections (10,000 connections at 16 KiB each way: 320 MiB).
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    pub idle: IdlePolicy,
    /// Seeds the stack's initial sequence numbers and ephemeral choices; differ per worker and boot.
    pub seed: u64,
    /// Failover in dataplane mode: the service address this stack adds and drops as the node's role
    /// changes, and whether this stack announces it (one per node does).
    pub service: Option<Arc<crate::failover::ServiceSlot>>,
    pub announce: bool,
}

impl StackConfig {
    /// Defaults for `address/prefix_len` on `mac`, serving `port`.
    pub fn new(address: Ipv4Addr, prefix_len: u8, mac: [u8; 6], port: u16) -> StackConfig {
        StackConfig {
            address,
            prefix_len,
            gateway: None,
            mac,
            port,
            backlog: 16,
            max_half_open: 1024,
            rx_buffer: 16 * 1024,
            tx_buffer: 16 * 1024,
            idle: IdlePolicy::default(),
            seed: 0,
            service: None,
            announce: false,
        }
    }
}

/// Wakes a worker thread that sleeps in [`StackTransport::poll`]: the doorbell of a stack worker.
#[derive(Default)]
pub struct ThreadBell {
    thread: OnceLock<Thread>,
    /// Set by every ring, cleared by the worker when it looks: whether mail may be waiting. (How long a
    /// nap lasted says nothing: a ring that lands in the nap's last microseconds, or a thread slow to be
    /// scheduled again, looks like a timeout, and the mail then waited for the worker's next 1 s poll.)
    rung: AtomicBool,
}

/// The worker's doorbell and its transport share the bell.
impl crate::runtime::mailbox::Wake for Arc<ThreadBell> {
    fn wake(&self) {
        ThreadBell::wake(self);
    }
}

impl ThreadBell {
    /// Called on the worker thread before it sleeps (binds it the first time; after that, a load).
    pub fn bind_current(&self) {
        self.thread.get_or_init(std::thread::current);
    }

    fn wake(&self) {
        self.rung.store(true, Ordering::Release);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Whether the bell rang since the last call.
    fn take_rung(&self) -> bool {
        self.rung.load(Ordering::Relaxed) && self.rung.swap(false, Ordering::AcqRel)
    }
}

/// What smoltcp's wakers recorded during a poll: indices of connections whose sockets woke, and
/// whether a socket still in its handshake changed state (a SYN arrived, a handshake finished).
#[derive(Default)]
struct WokenList {
    conns: Mutex<Vec<usize>>,
    handshakes: AtomicBool,
}

/// The index a listening or half-open socket's waker records.
const HANDSHAKE: usize = usize::MAX;

struct SocketWaker {
    index: usize,
    woken: Arc<WokenList>,
}

impl Wake for SocketWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.index == HANDSHAKE {
            self.woken.handshakes.store(true, Ordering::Relaxed);
        } else {
            self.woken.conns.lock().unwrap().push(self.index);
        }
    }
}

/// A connection as the flow table knows it: the remote address and port (the local ones are fixed).
type Flow = (Ipv4Addr, u16);

/// Where a socket lives: its cell and its handle there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    cell: usize,
    handle: SocketHandle,
}

/// A connection's handle: its socket and the waker that reports it.
pub struct StackStream {
    place: Place,
    /// Its entry in the flow table (kept here: smoltcp forgets the remote end once a socket closes).
    flow: Option<Flow>,
    id: i32,
    waker: Option<Waker>,
}

/// Sockets per cell: small enough that a cell's poll is cheap, large enough that 10,000 connections
/// make a few hundred cells.
pub const CELL_SOCKETS: usize = 64;
/// The cell of the listening sockets (and of frames that belong to no connection).
const LISTEN_CELL: usize = 0;
/// Closed sockets are kept until their FIN exchange ends, at most this long.
const LINGER: Duration = Duration::from_secs(30);
/// A connection that stops acknowledging data is reset after this long.
const RETRANSMIT_TIMEOUT: NetDuration = NetDuration::from_secs(60);
/// A handshake must finish this long after its SYN, or the half-open socket is dropped.
const HANDSHAKE_TIMEOUT: NetDuration = NetDuration::from_secs(5);

/// What the stack counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCounters {
    pub accepted: u64,
    /// Times the half-open limit was reached (further SYNs were refused until handshakes finished).
    pub half_open_full: u64,
    /// Half-open sockets dropped: reset by the peer, or their handshake timed out.
    pub half_open_dropped: u64,
    /// Connections reset because they lingered past [`LINGER`] after close.
    pub linger_aborts: u64,
    /// Gratuitous ARPs sent for the service address.
    pub garps_sent: u64,
    /// ARP probes sent for the service address (a standby's check before it promotes).
    pub service_probes_sent: u64,
    /// Cells given an egress pass.
    pub cell_polls: u64,
}

/// Socket buffers of one worker, reused from connection to connection (smoltcp's buffers are fixed, so
/// every connection takes a pair; allocating and zeroing them per connection is what this saves).
struct BufferPool {
    rx: usize,
    tx: usize,
    /// Every pair ever allocated (leaked boxes, freed when the pool drops), and the free ones.
    slots: Vec<(*mut u8, *mut u8)>,
    free: Vec<usize>,
}

impl BufferPool {
    fn new(rx: usize, tx: usize) -> BufferPool {
        BufferPool { rx, tx, slots: Vec::new(), free: Vec::new() }
    }

    /// A buffer pair for a new socket, and its slot (to give back once that socket is dropped).
    fn take(&mut self) -> (usize, tcp::SocketBuffer<'static>, tcp::SocketBuffer<'static>) {
        let slot = self.free.pop().unwrap_or_else(|| {
            let rx = Box::into_raw(vec![0u8; self.rx].into_boxed_slice()) as *mut u8;
            let tx = Box::into_raw(vec![0u8; self.tx].into_boxed_slice()) as *mut u8;
            self.slots.push((rx, tx));
            self.slots.len() - 1
        });
        let (rx, tx) = self.slots[slot];
        // SAFETY: the slot is not free, so no other socket holds these buffers: the socket that held
        // them before was dropped before `give_back`. They stay allocated until the pool drops, after
        // every socket (the cells are declared, and dropped, before the pool).
        let (rx, tx) = unsafe { (std::slice::from_raw_parts_mut(rx, self.rx), std::slice::from_raw_parts_mut(tx, self.tx)) };
        (slot, tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx))
    }

    /// Returns a slot whose socket has been dropped.
    fn give_back(&mut self, slot: usize) {
        self.free.push(slot);
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        for &(rx, tx) in &self.slots {
            // SAFETY: allocated in `take` as boxed slices of these lengths; no socket is left.
            unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(rx, self.rx)));
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(tx, self.tx)));
            }
        }
    }
}

/// A few sockets and what they need.
struct Cell {
    sockets: SocketSet<'static>,
    /// Each socket's buffer slot in the pool.
    slots: HashMap<SocketHandle, usize>,
    /// Sockets here, counted against [`CELL_SOCKETS`].
    members: usize,
    /// Egress is due: a frame came in, the worker wrote or read, or a socket moved in.
    dirty: bool,
    /// When a timer of this cell's sockets is next due (None: only on ingress).
    due: Option<Instant>,
}

impl Cell {
    fn new() -> Cell {
        Cell { sockets: SocketSet::new(Vec::new()), slots: HashMap::new(), members: 0, dirty: false, due: None }
    }
}

/// One worker's userspace stack over `P`.
pub struct StackTransport<P: Phy> {
    phy: P,
    iface: Interface,
    cells: Vec<Cell>,
    /// After `cells`: dropped after every socket.
    pool: BufferPool,
    /// Cells (other than the listen cell) with room for another socket.
    roomy: Vec<usize>,
    /// Cells whose egress is due this round.
    dirty: Vec<usize>,
    /// The established (or establishing) flows: remote address and port -> their cell.
    flows: HashMap<Flow, usize>,
    config: StackConfig,
    /// Sockets in `Listen`, all in the listen cell.
    listening: Vec<SocketHandle>,
    /// Sockets whose handshake began (moved out of the listen cell), waiting for it to finish, with
    /// their flows.
    half_open: Vec<(Place, Option<Flow>)>,
    /// Sockets whose handshake finished, waiting for the worker to accept them.
    accepted: Vec<(Place, Option<Flow>)>,
    /// Sockets the worker closed, draining their FIN exchange: (where, remote, when closed).
    closing: Vec<(Place, Option<Flow>, StdInstant)>,
    woken: Arc<WokenList>,
    handshake_waker: Waker,
    next_id: i32,
    bell: Arc<ThreadBell>,
    /// The frame being dispatched (copied out of the device so the flow table can be consulted).
    frame: Vec<u8>,
    /// When a frame, a request or a doorbell last showed up (for [`IdlePolicy::spin`]).
    last_activity: StdInstant,
    /// The service slot's version this stack last acted on, and the gratuitous ARPs still to send.
    service_seen: u64,
    garps_due: Vec<StdInstant>,
    /// Probes of the service address sent (see [`crate::failover::ServiceSlot::probe`]).
    probes_sent: u64,
    pub counters: StackCounters,
}

fn now() -> Instant {
    Instant::now()
}

/// The remote address and port of a TCP segment to `port` in an Ethernet frame, if it is one.
fn tcp_flow(frame: &[u8], port: u16) -> Option<Flow> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 6 || ip.len() < header_len + 4 {
        return None;
    }
    let tcp = &ip[header_len..];
    if u16::from_be_bytes([tcp[2], tcp[3]]) != port {
        return None;
    }
    Some((Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), u16::from_be_bytes([tcp[0], tcp[1]])))
}

fn remote_of(socket: &tcp::Socket) -> Option<Flow> {
    let endpoint = socket.remote_endpoint()?;
    match endpoint.addr {
        IpAddress::Ipv4(a) => Some((Ipv4Addr::from(a.octets()), endpoint.port)),
    }
}

/// A device that yields one frame already taken from the real device; replies go to the real device.
struct OneFrame<'a, P> {
    frame: Option<&'a [u8]>,
    phy: &'a mut P,
}

struct FrameToken<'a>(&'a [u8]);

impl phy::RxToken for FrameToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl<'a, P: Device> Device for OneFrame<'a, P> {
    type RxToken<'b> = FrameToken<'a> where Self: 'b;
    type TxToken<'b> = P::TxToken<'b> where Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.frame.take()?;
        Some((FrameToken(frame), self.phy.transmit(timestamp)?))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.phy.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.phy.capabilities()
    }
}

impl<P: Phy> StackTransport<P> {
    /// A stack on `phy`; `bell` is the worker's doorbell (its thread is bound on the first poll).
    pub fn new(mut phy: P, config: StackConfig, bell: Arc<ThreadBell>) -> StackTransport<P> {
        let mac = EthernetAddress(config.mac);
        let mut iface_config = Config::new(HardwareAddress::Ethernet(mac));
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, &mut phy, now());
        let a = config.address.octets();
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::v4(a[0], a[1], a[2], a[3]), config.prefix_len));
        });
        if let Some(gw) = config.gateway {
            let g = gw.octets();
            let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(g[0], g[1], g[2], g[3]));
        }
        let woken = Arc::new(WokenList::default());
        let handshake_waker = Waker::from(Arc::new(SocketWaker { index: HANDSHAKE, woken: woken.clone() }));
        let mut stack = StackTransport {
            phy,
            iface,
            cells: vec![Cell::new()],
            pool: BufferPool::new(config.rx_buffer, config.tx_buffer),
            roomy: Vec::new(),
            dirty: Vec::new(),
            flows: HashMap::new(),
            listening: Vec::new(),
            half_open: Vec::new(),
            accepted: Vec::new(),
            closing: Vec::new(),
            woken,
            handshake_waker,
            next_id: 1,
            bell,
            frame: vec![0; 2048],
            last_activity: StdInstant::now(),
            service_seen: 0,
            garps_due: Vec::new(),
            probes_sent: 0,
            counters: StackCounters::default(),
            config,
        };
        stack.tend_handshakes();
        stack
    }

    /// The device, for its counters.
    pub fn phy(&self) -> &P {
        &self.phy
    }

    fn socket(&mut self, place: Place) -> &mut tcp::Socket<'static> {
        self.cells[place.cell].sockets.get_mut::<tcp::Socket>(place.handle)
    }

    fn mark_dirty(&mut self, cell: usize) {
        let c = &mut self.cells[cell];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(cell);
        }
    }

    /// Opens one more listening socket on the port, in the listen cell.
    fn listen_socket(&mut self) -> SocketHandle {
        let (slot, rx, tx) = self.pool.take();
        let mut socket = tcp::Socket::new(rx, tx);
        // Request/response: no Nagle, no delayed ACK (FIELD-NOTES: 40 ms stalls otherwise).
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        socket.set_timeout(Some(HANDSHAKE_TIMEOUT));
        socket.listen(self.config.port).expect("a listening socket on a nonzero port");
        socket.register_recv_waker(&self.handshake_waker);
        let cell = &mut self.cells[LISTEN_CELL];
        cell.members += 1;
        let handle = cell.sockets.add(socket);
        cell.slots.insert(handle, slot);
        handle
    }

    /// A cell with room for one more socket (a new one when all are full).
    fn cell_with_room(&mut self) -> usize {
        while let Some(&cell) = self.roomy.last() {
            if self.cells[cell].members < CELL_SOCKETS {
                return cell;
            }
            self.roomy.pop();
        }
        self.cells.push(Cell::new());
        let cell = self.cells.len() - 1;
        self.roomy.push(cell);
        cell
    }

    /// Takes a socket out of its cell, with its buffer slot (its flow, if any, stays for the caller).
    fn remove(&mut self, place: Place) -> (tcp::Socket<'static>, usize) {
        let cell = &mut self.cells[place.cell];
        cell.members -= 1;
        if place.cell != LISTEN_CELL && cell.members == CELL_SOCKETS - 1 {
            self.roomy.push(place.cell);
        }
        let slot = cell.slots.remove(&place.handle).expect("every socket has a buffer slot");
        match cell.sockets.remove(place.handle) {
            smoltcp::socket::Socket::Tcp(socket) => (socket, slot),
        }
    }

    /// Drops a socket for good; its buffers go back to the pool.
    fn discard(&mut self, place: Place) {
        let (socket, slot) = self.remove(place);
        drop(socket);
        self.pool.give_back(slot);
    }

    /// Moves sockets that left `Listen` out of the listen cell (entering their flows), hands finished
    /// handshakes to `accepted`, drops failed ones, and keeps `backlog` sockets listening (within the
    /// half-open limit).
    fn tend_handshakes(&mut self) {
        let mut i = 0;
        while i < self.listening.len() {
            let handle = self.listening[i];
            let socket = self.cells[LISTEN_CELL].sockets.get_mut::<tcp::Socket>(handle);
            if socket.state() == State::Listen {
                socket.register_recv_waker(&self.handshake_waker);
                i += 1;
                continue;
            }
            self.listening.swap_remove(i);
            let remote = remote_of(socket);
            let (socket, slot) = self.remove(Place { cell: LISTEN_CELL, handle });
            let cell = self.cell_with_room();
            let c = &mut self.cells[cell];
            c.members += 1;
            let place = Place { cell, handle: c.sockets.add(socket) };
            c.slots.insert(place.handle, slot);
            if let Some(remote) = remote {
                self.flows.insert(remote, cell);
            }
            // Its SYN-ACK goes out on this cell's egress.
            self.mark_dirty(cell);
            self.half_open.push((place, remote));
        }
        let mut i = 0;
        while i < self.half_open.len() {
            let (place, flow) = self.half_open[i];
            match self.socket(place).state() {
                State::SynReceived => {
                    let waker = self.handshake_waker.clone();
                    self.socket(place).register_recv_waker(&waker);
                    i += 1;
                }
                // Reset by the peer (a listening socket goes back to Listen) or timed out.
                State::Listen | State::Closed => {
                    self.half_open.swap_remove(i);
                    if let Some(flow) = flow {
                        self.flows.remove(&flow);
                    }
                    self.discard(place);
                    self.counters.half_open_dropped += 1;
                }
                _ => {
                    self.half_open.swap_remove(i);
                    self.socket(place).set_timeout(Some(RETRANSMIT_TIMEOUT));
                    self.accepted.push((place, flow));
                }
            }
        }
        let want = self.config.backlog.max(1).saturating_sub(self.listening.len());
        let room = self.config.max_half_open.saturating_sub(self.half_open.len());
        if want > room {
            self.counters.half_open_full += 1;
        }
        for _ in 0..want.min(room) {
            let handle = self.listen_socket();
            self.listening.push(handle);
        }
    }

    /// Receives every waiting frame and hands each to the cell of its flow. Returns whether any came.
    fn ingress(&mut self) -> bool {
        let now = now();
        let mut any = false;
        let watched = self.config.service.as_ref().filter(|slot| slot.watching()).map(|slot| slot.address);
        loop {
            let Some((rx, _)) = self.phy.receive(now) else { break };
            let frame = &mut self.frame;
            let len = phy::RxToken::consume(rx, |bytes| {
                if bytes.len() > frame.len() {
                    frame.resize(bytes.len(), 0);
                }
                frame[..bytes.len()].copy_from_slice(bytes);
                bytes.len()
            });
            any = true;
            if let (Some(address), Some(slot)) = (watched, &self.config.service) {
                if let Some(holder) = crate::net::arp_probe::parse_reply(&self.frame[..len], address, MacAddress(self.config.mac)) {
                    slot.heard(holder.0);
                }
            }
            let cell = tcp_flow(&self.frame[..len], self.config.port)
                .and_then(|flow| self.flows.get(&flow).copied())
                .unwrap_or(LISTEN_CELL);
            let mut one = OneFrame { frame: Some(&self.frame[..len]), phy: &mut self.phy };
            let result = self.iface.poll_ingress_single(now, &mut one, &mut self.cells[cell].sockets);
            if result != PollIngressSingleResult::None {
                self.mark_dirty(cell);
            }
            if self.woken.handshakes.swap(false, Ordering::Relaxed) {
                self.tend_handshakes();
            }
        }
        any
    }

    /// One cell's egress: what its sockets have to send goes out; notes when it is next due.
    fn egress_cell(&mut self, index: usize, now: Instant) {
        let cell = &mut self.cells[index];
        cell.dirty = false;
        self.counters.cell_polls += 1;
        while self.iface.poll_egress(now, &mut self.phy, &mut cell.sockets) == smoltcp::iface::PollResult::SocketStateChanged {}
        cell.due = self.iface.poll_at(now, &cell.sockets);
    }

    /// Runs egress for the cells whose timers are due (retransmissions, a close); with `all` (the end of
    /// a round) also for every cell with work. Holding the rest until the worker has answered lets an
    /// ACK leave with its reply instead of in a frame of its own.
    fn egress(&mut self, all: bool) {
        let now = now();
        for index in 0..self.cells.len() {
            if self.cells[index].due.is_some_and(|due| due <= now) {
                self.egress_cell(index, now);
            }
        }
        if !all {
            return;
        }
        loop {
            if self.woken.handshakes.swap(false, Ordering::Relaxed) {
                // Sockets that move to a cell need their first egress (a SYN-ACK): they mark it dirty.
                self.tend_handshakes();
            }
            let Some(index) = self.dirty.pop() else { break };
            if self.cells[index].dirty {
                self.egress_cell(index, now);
            }
        }
    }

    /// The soonest timer of any cell, from now.
    fn next_due(&self) -> Option<Duration> {
        let now = now();
        self.cells
            .iter()
            .filter_map(|c| c.due)
            .min()
            .map(|due| if due > now { Duration::from_micros((due - now).total_micros()) } else { Duration::ZERO })
    }

    /// Forgets closed sockets whose exchange ended, or that lingered too long.
    fn reap_closing(&mut self) {
        let now = StdInstant::now();
        let mut i = 0;
        while i < self.closing.len() {
            let (place, remote, since) = self.closing[i];
            let state = self.socket(place).state();
            if matches!(state, State::Closed | State::TimeWait) {
                self.closing.swap_remove(i);
                if let Some(remote) = remote {
                    if self.flows.get(&remote) == Some(&place.cell) {
                        self.flows.remove(&remote);
                    }
                }
                self.discard(place);
                continue;
            }
            if now.duration_since(since) > LINGER {
                self.socket(place).abort();
                self.counters.linger_aborts += 1;
                self.mark_dirty(place.cell);
                // Stays one more round so the RST goes out; then it is Closed.
            }
            i += 1;
        }
    }

    /// Moves what the wakers recorded into `ready`; true if anything was.
    fn take_woken(&mut self, ready: &mut Vec<Ready>) -> bool {
        let mut found = false;
        if !self.accepted.is_empty() {
            ready.push(Ready::Listener(0));
            found = true;
        }
        let mut woken = self.woken.conns.lock().unwrap();
        if woken.is_empty() {
            return found;
        }
        woken.sort_unstable();
        woken.dedup();
        ready.extend(woken.iter().map(|&index| Ready::Conn(index)));
        woken.clear();
        true
    }

    /// Adds or drops the service address when the node's role moved it; sends announcements due.
    fn follow_service(&mut self) {
        let Some(slot) = &self.config.service else { return };
        let (version, claimed) = slot.state();
        if version != self.service_seen {
            self.service_seen = version;
            let cidr = IpCidr::new(IpAddress::Ipv4(Ipv4Address::from(slot.address.octets())), slot.prefix_len);
            self.iface.update_ip_addrs(|addrs| {
                addrs.retain(|a| *a != cidr);
                if claimed {
                    let _ = addrs.push(cidr);
                }
            });
            tracing::info!(address = %slot.address, claimed, "the service address follows the node's role");
            self.garps_due.clear();
            if claimed && self.config.announce {
                let now = StdInstant::now();
                let spacing = crate::failover::ANNOUNCE_SPACING;
                self.garps_due.extend((0..crate::failover::ANNOUNCE_BURST as u32).map(|i| now + spacing * i));
                self.garps_due.extend(crate::failover::ANNOUNCE_REPEATS.iter().map(|&after| now + after));
            }
        }
        let (address, probes_wanted) = (slot.address, slot.probes_wanted());
        if self.garps_due.first().is_some_and(|&due| due <= StdInstant::now()) {
            self.garps_due.remove(0);
            self.send_garp(address);
        }
        if self.config.announce && self.probes_sent != probes_wanted {
            self.probes_sent = probes_wanted;
            self.send_probe(address);
        }
    }

    /// Asks who holds `address`: a broadcast ARP request in the name of this stack's own address (a
    /// request from 0.0.0.0, RFC 5227's probe, goes unanswered by some stacks; smoltcp's among them).
    fn send_probe(&mut self, address: Ipv4Addr) {
        let frame = crate::net::takeover::arp_request_frame(MacAddress(self.config.mac), self.config.address, address);
        let Some(token) = self.phy.transmit(now()) else { return };
        phy::TxToken::consume(token, frame.len(), |buf| buf.copy_from_slice(&frame));
        self.phy.flush();
        self.counters.service_probes_sent += 1;
    }

    /// Sends one gratuitous ARP for `address`: a broadcast request whose sender and target are both
    /// the address (an ARP naming another sender updates no neighbour's cache).
    fn send_garp(&mut self, address: Ipv4Addr) {
        use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr};
        let mac = EthernetAddress(self.config.mac);
        let ip = Ipv4Address::from(address.octets());
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: mac,
            source_protocol_addr: ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: ip,
        };
        let eth = EthernetRepr { src_addr: mac, dst_addr: EthernetAddress::BROADCAST, ethertype: EthernetProtocol::Arp };
        let Some(token) = self.phy.transmit(now()) else { return };
        phy::TxToken::consume(token, eth.buffer_len() + arp.buffer_len(), |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
        self.phy.flush();
        self.counters.garps_sent += 1;
    }

    /// Frames in, then egress for cells with work; whether anything came in or changed.
    fn run_stack(&mut self) -> bool {
        self.follow_service();
        let received = self.ingress();
        self.egress(false);
        received
    }

    fn arm_recv(&mut self, stream: &StackStream) {
        if let Some(waker) = &stream.waker {
            let waker = waker.clone();
            self.socket(stream.place).register_recv_waker(&waker);
        }
    }

    fn arm_send(&mut self, stream: &StackStream) {
        if let Some(waker) = &stream.waker {
            let waker = waker.clone();
            self.socket(stream.place).register_send_waker(&waker);
        }
    }

    /// Sockets held, in all cells.
    fn socket_count(&self) -> usize {
        self.cells.iter().map(|c| c.members).sum()
    }
}

impl<P: Phy> Transport for StackTransport<P> {
    type Stream = StackStream;

    fn poll(&mut self, timeout: Duration, ready: &mut Vec<Ready>) -> io::Result<()> {
        let start = StdInstant::now();
        self.bell.bind_current();
        // What was written since the last round's egress (a sync-mode reply released once its ack came,
        // before the worker polls) goes out now: the wait below may last until the next frame arrives.
        if !self.dirty.is_empty() {
            self.egress(true);
            self.phy.flush();
        }
        loop {
            let received = self.run_stack();
            if !self.closing.is_empty() {
                self.reap_closing();
            }
            let found = self.take_woken(ready);
            // Mail from another core: the worker looks at its rings when this returns.
            let rung = self.bell.take_rung();
            let now = StdInstant::now();
            if found || received || rung {
                self.last_activity = now;
                return Ok(());
            }
            let waited = now.duration_since(start);
            if waited >= timeout {
                return Ok(());
            }
            let idle = now.duration_since(self.last_activity);
            if idle < self.config.idle.spin {
                std::hint::spin_loop();
                continue;
            }
            // Sleep, but not past the stack's next timer (a retransmission, say) or the caller's limit.
            let mut nap = self.config.idle.sleep.min(timeout - waited);
            if let Some(due) = self.next_due() {
                nap = nap.min(due);
            }
            if let Some(&garp) = self.garps_due.first() {
                nap = nap.min(garp.saturating_duration_since(StdInstant::now()));
            }
            if !nap.is_zero() {
                // A ring unparks it; the next turn of the loop sees `rung`.
                std::thread::park_timeout(nap);
            }
        }
    }

    fn accept(&mut self, _listener: usize) -> io::Result<Option<(StackStream, Option<SocketAddr>)>> {
        let Some((place, flow)) = self.accepted.pop() else { return Ok(None) };
        let peer = self.socket(place).remote_endpoint().map(endpoint_addr);
        self.counters.accepted += 1;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        Ok(Some((StackStream { place, flow, id, waker: None }, peer)))
    }

    fn register(&mut self, stream: &mut StackStream, index: usize) -> io::Result<()> {
        stream.waker = Some(Waker::from(Arc::new(SocketWaker { index, woken: self.woken.clone() })));
        // Reads arm the receive waker again when they run dry, writes the send waker when the socket
        // takes less than offered; a state change wakes both.
        self.arm_recv(stream);
        // Data (or a FIN) may have arrived with the handshake, before any waker was set.
        self.woken.conns.lock().unwrap().push(index);
        Ok(())
    }

    fn close(&mut self, stream: StackStream) {
        let (place, flow) = (stream.place, stream.flow);
        let socket = self.socket(place);
        match socket.state() {
            State::Closed | State::TimeWait => {
                if let Some(flow) = flow {
                    self.flows.remove(&flow);
                }
                self.discard(place);
            }
            _ => {
                socket.close();
                self.closing.push((place, flow, StdInstant::now()));
                self.mark_dirty(place.cell);
            }
        }
    }

    fn read(&mut self, stream: &mut StackStream, buf: &mut Vec<u8>) -> io::Result<usize> {
        let place = stream.place;
        let socket = self.socket(place);
        let mut total = 0;
        // The receive ring may wrap: take both pieces.
        for _ in 0..2 {
            let room = buf.capacity() - buf.len();
            if room == 0 {
                break;
            }
            match socket.recv(|data| {
                let n = data.len().min(room);
                buf.extend_from_slice(&data[..n]);
                (n, n)
            }) {
                Ok(0) => break,
                Ok(n) => total += n,
                // Finished: the peer sent FIN and everything before it was read.
                Err(tcp::RecvError::Finished) => return Ok(total),
                Err(tcp::RecvError::InvalidState) => {
                    return if total > 0 { Ok(total) } else { Err(io::ErrorKind::ConnectionReset.into()) };
                }
            }
        }
        if total > 0 {
            // The window opened: the peer may need to hear it.
            self.mark_dirty(place.cell);
            return Ok(total);
        }
        self.arm_recv(stream);
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write(&mut self, stream: &mut StackStream, bytes: &[u8]) -> io::Result<usize> {
        let place = stream.place;
        let socket = self.socket(place);
        if !socket.may_send() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let sent = socket.send_slice(bytes).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        if sent > 0 {
            self.mark_dirty(place.cell);
        }
        if sent < bytes.len() {
            self.arm_send(stream);
        }
        if sent == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(sent)
    }

    fn end_round(&mut self) {
        // Replies, with the ACKs of what they answer, go out now.
        self.egress(true);
        self.phy.flush();
    }

    fn stream_id(&self, stream: &StackStream) -> i32 {
        stream.id
    }

    fn listeners(&self) -> Vec<(i32, SocketAddr)> {
        vec![(0, SocketAddr::V4(SocketAddrV4::new(self.config.address, self.config.port)))]
    }

    fn counters(&self, out: &mut Vec<(&'static str, u64)>) {
        let c = &self.counters;
        out.extend([
            ("tcp_accepted", c.accepted),
            ("tcp_half_open", self.half_open.len() as u64),
            ("tcp_half_open_limit_hits", c.half_open_full),
            ("tcp_half_open_dropped", c.half_open_dropped),
            ("tcp_linger_aborts", c.linger_aborts),
            ("garps_sent", c.garps_sent),
            ("service_probes_sent", c.service_probes_sent),
            ("tcp_sockets", self.socket_count() as u64),
            ("tcp_cells", self.cells.len() as u64),
            ("tcp_cell_polls", c.cell_polls),
        ]);
        self.phy.counters(out);
    }
}

fn endpoint_addr(endpoint: IpEndpoint) -> SocketAddr {
    match endpoint.addr {
        IpAddress::Ipv4(a) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(a.octets()), endpoint.port)),
    }
}

pub mod memory {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
    use smoltcp::time::Instant;

    type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

    /// One end of the wire.
    pub struct MemoryPhy {
        rx: Queue,
        tx: Queue,
        /// Frames handed to the other end.
        pub sent: u64,
    }

    /// Both ends of a new wire.
    pub fn wire() -> (MemoryPhy, MemoryPhy) {
        let a: Queue = Default::default();
        let b: Queue = Default::default();
        (MemoryPhy { rx: a.clone(), tx: b.clone(), sent: 0 }, MemoryPhy { rx: b, tx: a, sent: 0 })
    }

    impl super::Phy for MemoryPhy {}

    pub struct Rx(Vec<u8>);
    pub struct Tx<'a>(&'a mut MemoryPhy);

    impl phy::RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    impl phy::TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut frame = vec![0; len];
            let r = f(&mut frame);
            self.0.tx.borrow_mut().push_back(frame);
            self.0.sent += 1;
            r
        }
    }

    impl phy::Device for MemoryPhy {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;

        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            let frame = self.rx.borrow_mut().pop_front()?;
            Some((Rx(frame), Tx(self)))
        }

        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx(self))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            // Nothing on this wire corrupts frames: skip computing and checking checksums.
            caps.checksum.ipv4 = Checksum::None;
            caps.checksum.tcp = Checksum::None;
            caps.checksum.icmpv4 = Checksum::None;
            caps
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::{wire, MemoryPhy};
    use super::*;

    /// A smoltcp client on the other end of the wire.
    struct Client {
        iface: Interface,
        phy: MemoryPhy,
        sockets: SocketSet<'static>,
    }

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

    impl Client {
        fn new(phy: MemoryPhy) -> Client {
            let mut phy = phy;
            let mut iface = Interface::new(Config::new(EthernetAddress([2, 0, 0, 0, 0, 2]).into()), &mut phy, now());
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::v4(10, 9, 0, 2), 24));
            });
            Client { iface, phy, sockets: SocketSet::new(Vec::new()) }
        }

        fn connect(&mut self, local_port: u16) -> SocketHandle {
            let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 65536]), tcp::SocketBuffer::new(vec![0; 65536]));
            socket.set_nagle_enabled(false);
            socket.set_ack_delay(None);
            let cx = self.iface.context();
            socket.connect(cx, (IpAddress::v4(10, 9, 0, 1), 11211), local_port).unwrap();
            self.sockets.add(socket)
        }

        fn poll(&mut self) {
            self.iface.poll(now(), &mut self.phy, &mut self.sockets);
        }

        /// Takes what socket `h` has received so far.
        fn received(&mut self, h: SocketHandle) -> Result<Vec<u8>, tcp::RecvError> {
            let mut got = Vec::new();
            self.sockets.get_mut::<tcp::Socket>(h).recv(|d| {
                got.extend_from_slice(d);
                (d.len(), ())
            })?;
            Ok(got)
        }
    }

    fn server(phy: MemoryPhy) -> StackTransport<MemoryPhy> {
        let mut config = StackConfig::new(SERVER, 24, [2, 0, 0, 0, 0, 1], 11211);
        config.backlog = 4;
        config.idle = IdlePolicy { spin: Duration::ZERO, sleep: Duration::from_micros(10) };
        StackTransport::new(phy, config, Arc::new(ThreadBell::default()))
    }

    /// Runs both ends until the server reports something ready or `rounds` pass.
    fn exchange(server: &mut StackTransport<MemoryPhy>, client: &mut Client, rounds: usize) -> Vec<Ready> {
        let mut ready = Vec::new();
        for _ in 0..rounds {
            client.poll();
            server.poll(Duration::ZERO, &mut ready).unwrap();
            server.end_round();
            client.poll();
            if !ready.is_empty() {
                break;
            }
        }
        ready
    }

    #[test]
    fn a_ring_from_another_core_ends_the_wait_whenever_it_lands() {
        // The bell may ring at any moment of a nap, its last microseconds included, or while the worker
        // spins or runs its stack: each time the poll must return at once, never wait out its timeout
        // (a worker waits 1 s when idle; mail that waited that long was a request's reply).
        let (a, _b) = wire();
        let mut server = server(a);
        server.config.idle = IdlePolicy { spin: Duration::from_micros(50), sleep: Duration::from_micros(200) };
        let bell = server.bell.clone();
        let mut ready = Vec::new();
        for round in 0..300u64 {
            let ringing = bell.clone();
            // Spread over the spin, several naps and the gaps between them.
            let delay = Duration::from_micros(round * 37 % 900);
            let ringer = std::thread::spawn(move || {
                std::thread::sleep(delay);
                ThreadBell::wake(&ringing);
            });
            let started = StdInstant::now();
            server.poll(Duration::from_secs(2), &mut ready).unwrap();
            let waited = started.elapsed();
            ringer.join().unwrap();
            // A ring that landed before the poll began still ends it (the flag waits), so the next
            // round starts clean either way.
            if bell.rung.load(Ordering::Relaxed) {
                server.poll(Duration::from_secs(2), &mut ready).unwrap();
            }
            assert!(waited < Duration::from_millis(500), "round {round}: a ring after {delay:?} was noticed only after {waited:?}");
        }
        assert!(ready.is_empty(), "nothing but the bell happened");
    }

    #[test]
    fn a_reply_written_between_rounds_leaves_before_the_worker_waits() {
        // A sync-mode reply is released at the start of a round, when its ack has come: written before
        // the worker polls, not after. The poll must send it rather than wait with it (the wait lasts
        // until the next frame, up to a second when idle, and the client sends nothing until it has its
        // reply).
        let (a, b) = wire();
        let mut server = server(a);
        let mut client = Client::new(b);
        let h = client.connect(40001);
        assert_eq!(exchange(&mut server, &mut client, 20), vec![Ready::Listener(0)]);
        let (mut stream, _) = server.accept(0).unwrap().expect("a connection");
        server.register(&mut stream, 3).unwrap();
        exchange(&mut server, &mut client, 3);

        assert_eq!(server.write(&mut stream, b"STORED\r\n").unwrap(), 8);
        let mut ready = Vec::new();
        server.poll(Duration::from_millis(20), &mut ready).unwrap();
        // No end_round: only the poll ran.
        client.poll();
        assert_eq!(client.received(h).unwrap(), b"STORED\r\n", "the reply left with the poll");
    }

    #[test]
    fn accepts_echoes_and_closes_in_order() {
        let (a, b) = wire();
        let mut server = server(a);
        let mut client = Client::new(b);
        let h = client.connect(40000);
        let ready = exchange(&mut server, &mut client, 20);
        assert_eq!(ready, vec![Ready::Listener(0)], "the handshake completes and is reported once");
        let (mut stream, peer) = server.accept(0).unwrap().expect("a connection");
        assert_eq!(peer, Some("10.9.0.2:40000".parse().unwrap()));
        assert!(server.accept(0).unwrap().is_none());
        server.register(&mut stream, 7).unwrap();
        let mut buf = Vec::with_capacity(4096);
        assert_eq!(server.read(&mut stream, &mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        client.sockets.get_mut::<tcp::Socket>(h).send_slice(b"get k\r\n").unwrap();
        let ready = exchange(&mut server, &mut client, 20);
        assert!(ready.contains(&Ready::Conn(7)), "data wakes the connection: {ready:?}");
        assert_eq!(server.read(&mut stream, &mut buf).unwrap(), 7);
        assert_eq!(buf, b"get k\r\n");
        assert_eq!(server.write(&mut stream, b"END\r\n").unwrap(), 5);

        // Nothing else to read: the waker is armed again, and a quiet round reports nothing.
        assert_eq!(server.read(&mut stream, &mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let ready = exchange(&mut server, &mut client, 3);
        assert!(ready.is_empty(), "{ready:?}");
        assert_eq!(client.received(h).unwrap(), b"END\r\n");

        // The client closes: the server reads end of stream, closes, and the socket is reaped.
        client.sockets.get_mut::<tcp::Socket>(h).close();
        let ready = exchange(&mut server, &mut client, 20);
        assert!(ready.contains(&Ready::Conn(7)));
        buf.clear();
        assert_eq!(server.read(&mut stream, &mut buf).unwrap(), 0);
        server.close(stream);
        exchange(&mut server, &mut client, 10);
        assert!(server.closing.is_empty(), "the closed socket is reaped");
        assert_eq!(server.socket_count(), server.listening.len(), "only the listening sockets are left");
        assert!(server.flows.is_empty(), "and the flow is forgotten");
        assert_eq!(server.listening.len(), 4, "the backlog is refilled");
        assert_eq!(server.counters.accepted, 1);
        // The closed connection's buffers wait in the pool; the next connection takes them.
        assert_eq!((server.pool.slots.len(), server.pool.free.len()), (5, 1));
        client.connect(40001);
        exchange(&mut server, &mut client, 20);
        assert!(server.accept(0).unwrap().is_some());
        assert_eq!((server.pool.slots.len(), server.pool.free.len()), (5, 0), "no new buffers were allocated");
    }

    #[test]
    fn more_connections_than_the_backlog_are_all_accepted() {
        let (a, b) = wire();
        let mut server = server(a);
        let mut client = Client::new(b);
        let handles: Vec<_> = (0..20).map(|i| client.connect(41000 + i)).collect();
        let mut accepted = Vec::new();
        for _ in 0..200 {
            let mut ready = Vec::new();
            client.poll();
            server.poll(Duration::ZERO, &mut ready).unwrap();
            while let Some((mut s, _)) = server.accept(0).unwrap() {
                let index = accepted.len();
                server.register(&mut s, index).unwrap();
                accepted.push(s);
            }
            server.end_round();
            client.poll();
            if accepted.len() == handles.len() {
                break;
            }
        }
        assert_eq!(accepted.len(), 20, "a backlog of 4 still accepts 20 clients, a few at a time (SYNs are retried)");
    }

    #[test]
    fn a_large_reply_flows_as_the_client_reads() {
        let (a, b) = wire();
        let mut server = server(a);
        let mut client = Client::new(b);
        let h = client.connect(42000);
        exchange(&mut server, &mut client, 20);
        let (mut stream, _) = server.accept(0).unwrap().unwrap();
        server.register(&mut stream, 1).unwrap();
        let reply: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut written = 0;
        let mut got = Vec::new();
        for _ in 0..100_000 {
            let mut ready = Vec::new();
            server.poll(Duration::ZERO, &mut ready).unwrap();
            while written < reply.len() {
                match server.write(&mut stream, &reply[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            server.end_round();
            client.poll();
            if let Ok(more) = client.received(h) {
                got.extend_from_slice(&more);
            }
            if got.len() == reply.len() {
                break;
            }
        }
        assert_eq!(got.len(), reply.len());
        assert!(got == reply, "the bytes arrive intact and in order");
    }

    /// The probe a standby sends before it promotes, through its stack: runs `probe` on a thread of its
    /// own (it blocks, as the replication core does) while the test thread drives both ends.
    fn probe_through_the_stack(holds_service: bool) -> (Option<[u8; 6]>, u64) {
        const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 100);
        let (a, b) = wire();
        let mut config = StackConfig::new(SERVER, 24, [2, 0, 0, 0, 0, 1], 11211);
        config.idle = IdlePolicy { spin: Duration::ZERO, sleep: Duration::from_micros(10) };
        let slot = Arc::new(crate::failover::ServiceSlot::new(SERVICE, 24));
        config.service = Some(slot.clone());
        config.announce = true;
        let mut server = StackTransport::new(a, config, Arc::new(ThreadBell::default()));
        let mut client = Client::new(b);
        if holds_service {
            client.iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::v4(10, 9, 0, 100), 24));
            });
        }
        let asking = std::thread::spawn(move || slot.probe(2, Duration::from_millis(20)));
        let mut ready = Vec::new();
        while !asking.is_finished() {
            server.poll(Duration::ZERO, &mut ready).unwrap();
            server.end_round();
            client.poll();
        }
        (asking.join().unwrap(), server.counters.service_probes_sent)
    }

    #[test]
    fn a_probe_through_the_stack_finds_the_node_holding_the_service_address() {
        let (holder, sent) = probe_through_the_stack(true);
        assert_eq!(holder, Some([2, 0, 0, 0, 0, 2]), "the client's interface answers ARP for the address");
        assert!(sent >= 1, "the announcing stack sent the probe");
    }

    #[test]
    fn a_probe_through_the_stack_that_nobody_answers_finds_no_holder() {
        let (holder, sent) = probe_through_the_stack(false);
        assert_eq!(holder, None);
        assert_eq!(sent, 2, "both probes went out");
    }
}
