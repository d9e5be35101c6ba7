//! The active's replication core: drains every shard's log, keeps the backlog, and ships to each
//! standby at its own pace.
//!
//! Each standby has an authenticated TCP control connection ([`TcpLink`]: handshake, acks,
//! heartbeats, handover) and a data stream ([`StreamSink`], see [`crate::transport`]): with the TCP
//! transport the stream rides the control socket; with the RDMA transport it goes into the standby's
//! receive ring ([`crate::ring_link`]), set up over the control connection after the handshake.
//!
//! One thread runs [`Shipper::run`]: a poll loop over the listener, the standbys' connections and a
//! [`Bell`] the shards ring when they hand over records. Each round it
//! 1. drains every shard's ring into that shard's [`Backlog`] (a full ring's loss becomes a gap there);
//! 2. takes the snapshot chunks shards produced for standbys in full sync;
//! 3. for each standby and shard, writes what is due: snapshot chunks whose point the standby's cursor
//!    has reached, then records after its cursor (one batch frame per read), while its socket takes them;
//! 4. reads acks and heartbeats, publishes each shard's acknowledged watermark for sync mode, and drops
//!    a standby silent for longer than the peer timeout.
//!
//! Full sync of a shard (a standby with no usable history, or one that fell behind the backlog): the
//! shipper asks the shard for a snapshot ([`ShardPort::snapshot_wanted`]); the shard streams its live
//! items in chunks, each stamped with the log position it reflects, while it keeps serving. The standby
//! gets `SnapshotBegin{at}` (wipe the shard), then records after `at` interleaved with the chunks, each
//! chunk after exactly the records it reflects, then `SnapshotEnd`. Records are absolute (SET of the
//! result, DELETE, TOUCH, FLUSH), so applying them in that order leaves the standby equal to the shard.
//! Standbys that need a shard while its snapshot is under way wait for the next one.
//!
//! Planned handover (switchover): while the server's [`HandoverSlot`] is busy, each round checks
//! whether a standby has applied every shard through the requested point, sends it `Handover`, and
//! records its answer (see [`crate::handover`]).
//!
//! Sync mode and the ack policy: a shard's watermark is the lowest (`all`) or highest (`one`) sequence
//! acknowledged by the standbys streaming that shard. With no standby streaming it is [`ACKED_ALL`]:
//! a cache that stopped answering writes because its standby is gone would be worse than one that is
//! briefly unreplicated, so sync mode then degrades to async (counted in `sync_degraded` and logged).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use crate::backlog::Backlog;
use crate::frame;
use crate::handover::{self, Candidate, HandoverSlot, HandoverState};
use crate::handshake::{ActiveConfig, ActiveHandshake, Message as Handshake, Nonce, Outcome, PreviousHistory, ShardStart};
use crate::ids::{Epoch, LogSeq, ReplicationId, ShardId};
use crate::log::{Drained, LogConsumer};
use crate::port::{Bell, ShardPort, SnapshotChunk, SnapshotPart, Wake, ACKED_ALL};
use crate::stall::StallClock;
use crate::transport::{Device, LinkError, LinkStats, StreamSink, StreamSource, TcpLink, Transport};
use crate::wire::{self, Kind, Message, MessageReader};

const LISTENER: Token = Token(usize::MAX - 1);
const BELL: Token = Token(usize::MAX - 2);
/// Most record bytes in one batch frame.
const BATCH_BYTES: usize = 256 << 10;
/// Stop writing to a standby once this much waits in its socket buffer of ours.
const OUT_HIGH_WATER: usize = 8 << 20;
/// Largest message a standby may send (acks and heartbeats are tiny; the handshake is small).
const MAX_INBOUND_MESSAGE: usize = 64 << 10;
/// Snapshot chunks queued for one standby before the shard is asked for more.
const SNAPSHOT_PENDING: usize = 4;
/// How often the report behind `stats replication` is refreshed.
const REPORT_EVERY: Duration = Duration::from_millis(5);

/// Batches remembered per standby and shard for lag in bytes and time.
const INFLIGHT_MARKS: usize = 4096;

/// Whether a client's write waits for the standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Async,
    Sync,
}

/// Whose acknowledgement releases a write in sync mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckPolicy {
    One,
    All,
}

/// How the shipper runs.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub listen: SocketAddr,
    pub secret: Vec<u8>,
    pub history: ReplicationId,
    pub epoch: Epoch,
    /// The history this active took over from (after a promotion), so its standbys can resume.
    pub previous: Option<PreviousHistory>,
    /// Per shard, the last sequence number before this active's log (zeros for a new history; after
    /// a promotion, what the new active had applied). Empty means zeros.
    pub start: Vec<LogSeq>,
    pub mode: Mode,
    pub ack: AckPolicy,
    pub backlog_bytes: usize,
    pub heartbeat_interval: Duration,
    /// A standby silent for this long is dropped.
    pub peer_timeout: Duration,
    /// Async mode: after shipping, wait this long before shipping again, so that the writes of that
    /// time go out together (one wake-up and one send for many writes, not one each). Zero ships at
    /// once. Sync mode never waits: a client's reply hangs on the ack.
    pub async_batch: Duration,
    /// What carries the data stream to the standbys (they must use the same).
    pub transport: Transport,
}

/// What `stats replication` shows of one standby.
#[derive(Clone, Debug, Default)]
pub struct PeerReport {
    pub addr: String,
    /// `handshake`, `full_sync` (some shard is being snapshotted) or `streaming`.
    pub state: &'static str,
    /// What carries the data stream: `tcp` or `rdma`.
    pub transport: &'static str,
    /// The transport's counters (zeros for TCP).
    pub link: LinkStats,
    pub acked: Vec<u64>,
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub lag_millis: u64,
}

/// The shipper's counters and its view of each standby, for `stats replication`.
#[derive(Debug, Default)]
pub struct ShipperReport {
    pub listen: String,
    pub peers: Vec<PeerReport>,
    pub newest: Vec<u64>,
    pub backlog_bytes: u64,
    pub full_syncs: u64,
    pub partial_syncs: u64,
    pub refused: u64,
    pub sync_degraded: u64,
    pub bytes_shipped: u64,
    /// Rounds that sent records or snapshot chunks to some standby: with `async_batch`, many writes
    /// share one.
    pub shipments: u64,
    pub snapshot_bytes: u64,
    /// Shard logs that found their ring full (back-pressure), records lost to it, resyncs it forced.
    pub ring_full_events: u64,
    pub ring_records_lost: u64,
    pub ring_resyncs: u64,
    /// Standby links dropped because their transport failed (an RDMA completion error ...), and why
    /// the last one did.
    pub link_failures: u64,
    pub last_link_error: String,
}

/// Handles the server keeps to a running shipper.
pub struct ShipperHandle {
    pub bell: Arc<Bell>,
    pub report: Arc<Mutex<ShipperReport>>,
    pub stop: Arc<AtomicBool>,
    pub listen: SocketAddr,
    /// A planned handover to a standby (switchover).
    pub handover: Arc<HandoverSlot>,
}

/// Where a standby is with one shard.
enum ShardSync {
    /// Records after `cursor` are due.
    Streaming,
    /// Needs a full sync; waiting for a snapshot to begin.
    Waiting,
    /// In a full sync: these chunks are due once the cursor reaches each one's point. Records go no
    /// further than `horizon`, the point of the newest chunk received: a chunk still to come may reflect
    /// a point before records already in the backlog, and must reach the standby before them.
    Snapshot { id: u64, pending: VecDeque<Arc<SnapshotChunk>>, horizon: LogSeq },
}

struct PeerShard {
    /// The last record sent (or covered by the snapshot).
    cursor: LogSeq,
    acked: LogSeq,
    sync: ShardSync,
    /// (last seq of a batch, bytes shipped through it, when) for batches not yet acked.
    inflight: VecDeque<(LogSeq, u64, Instant)>,
    shipped_bytes: u64,
    /// Bytes shipped through the last acknowledged batch.
    acked_bytes: u64,
}

enum PeerState {
    Handshake(Box<ActiveHandshake>),
    Streaming,
}

#[cfg(feature = "rdma")]
type RdmaSink = crate::ring_link::RingSink<crate::rdma::link::ActivePort>;

/// Where a standby's data stream goes.
enum DataPath {
    /// Over the control connection (the TCP transport).
    Control,
    /// The RDMA transport, until the standby offers its ring.
    AwaitingOffer,
    /// The RDMA transport: connected to the standby's ring, until it says it is ready.
    #[cfg(feature = "rdma")]
    AwaitingReady(Box<RdmaSink>),
    /// Into the standby's ring.
    #[cfg(feature = "rdma")]
    Ring(Box<RdmaSink>),
}

struct Peer {
    /// The control connection (and, with [`DataPath::Control`], the data stream).
    link: TcpLink,
    addr: SocketAddr,
    state: PeerState,
    reader: MessageReader,
    data: DataPath,
    shards: Vec<PeerShard>,
    last_heard: Instant,
    closed: bool,
}

/// A snapshot of one shard under way.
struct RunningSnapshot {
    id: u64,
    begun: bool,
    peers: Vec<usize>,
}

/// The active's replication core.
pub struct Shipper {
    config: ShipperConfig,
    poll: Poll,
    listener: TcpListener,
    bell: Arc<Bell>,
    stop: Arc<AtomicBool>,
    ports: Vec<Arc<ShardPort>>,
    logs: Vec<LogConsumer>,
    backlogs: Vec<Backlog>,
    wake: Arc<dyn Wake>,
    peers: Vec<Option<Peer>>,
    snapshots: Vec<Option<RunningSnapshot>>,
    next_snapshot: u64,
    report: Arc<Mutex<ShipperReport>>,
    counters: ShipperReport,
    scratch: Vec<u8>,
    last_heartbeat: Instant,
    degraded: Vec<bool>,
    handover: Arc<HandoverSlot>,
    /// The RDMA device every standby's queue pair is made on (transport = "rdma").
    device: Option<Device>,
    /// Time this thread was kept from running is not the standbys' silence (see [`crate::stall`]).
    stall: StallClock,
}

impl Shipper {
    /// Binds the listener and builds the shipper; run it with [`Shipper::run`] on its own thread.
    pub fn new(
        config: ShipperConfig,
        logs: Vec<LogConsumer>,
        ports: Vec<Arc<ShardPort>>,
        wake: Arc<dyn Wake>,
    ) -> io::Result<(Shipper, ShipperHandle)> {
        let device = crate::transport::open_device(&config.transport)?;
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(config.listen)?;
        let listen = listener.local_addr()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let bell = Bell::new(mio::Waker::new(poll.registry(), BELL)?);
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(ShipperReport { listen: listen.to_string(), ..Default::default() }));
        let backlogs = logs
            .iter()
            .map(|log| {
                let start = config.start.get(log.shard().index()).copied().unwrap_or(LogSeq::ZERO);
                Backlog::new(log.shard(), start, config.backlog_bytes)
            })
            .collect();
        let shards = logs.len();
        let handover = Arc::new(HandoverSlot::default());
        let handle = ShipperHandle { bell: bell.clone(), report: report.clone(), stop: stop.clone(), listen, handover: handover.clone() };
        let counters = ShipperReport { listen: listen.to_string(), ..Default::default() };
        let shipper = Shipper {
            config,
            poll,
            listener,
            bell,
            stop,
            ports,
            logs,
            backlogs,
            wake,
            peers: Vec::new(),
            snapshots: (0..shards).map(|_| None).collect(),
            next_snapshot: 0,
            report,
            counters,
            scratch: Vec::new(),
            last_heartbeat: Instant::now(),
            degraded: vec![false; shards],
            handover,
            device,
            stall: StallClock::new(),
        };
        Ok((shipper, handle))
    }

    fn shard_count(&self) -> usize {
        self.logs.len()
    }

    /// Fault injection for the system tests (see [`crate::rdma::link::take_fault`]).
    #[cfg(feature = "rdma")]
    fn inject_faults(&mut self) {
        use crate::rdma::link::Fault;
        if self.device.is_none() {
            return;
        }
        let Some(fault) = crate::rdma::link::take_fault() else { return };
        for peer in self.peers.iter_mut().flatten() {
            if let DataPath::Ring(sink) = &mut peer.data {
                tracing::warn!(addr = %peer.addr, ?fault, "injecting an RDMA fault");
                match fault {
                    Fault::WrongRkey => sink.port().corrupt_rkey(),
                    Fault::QpError => {
                        if let Err(e) = sink.port().force_error() {
                            tracing::warn!(error = %e, "cannot force the queue pair into the error state");
                        }
                    }
                }
            }
        }
    }

    /// Runs until the handle's `stop` is set (and the bell rung).
    pub fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut last_report = Instant::now();
        let mut last_shipped: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            if let Some(wait) = last_shipped.and_then(|at| self.batch_wait(at)) {
                self.stall.allow(wait);
                std::thread::sleep(wait);
            }
            let busy = self.drain_logs() | self.take_snapshots();
            let wrote = self.ship_all();
            if wrote {
                last_shipped = Some(Instant::now());
                self.counters.shipments += 1;
            }
            let timeout = if busy || wrote {
                Duration::ZERO
            } else if self.peers.iter().flatten().any(Peer::wants_poll) {
                // Bytes wait for RDMA credits, which no file descriptor announces.
                Duration::from_millis(1)
            } else {
                self.bell.prepare_sleep();
                // Re-check after announcing sleep: a ring in between must not be missed.
                if self.drain_logs() | self.take_snapshots() {
                    Duration::ZERO
                } else {
                    self.config.heartbeat_interval.min(Duration::from_millis(10))
                }
            };
            self.stall.allow(timeout);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "replication poll failed");
                    return;
                }
            }
            self.bell.awake();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    BELL => {}
                    Token(index) => self.read_peer(index),
                }
            }
            let since_heartbeat = self.last_heartbeat.elapsed();
            if since_heartbeat >= self.config.heartbeat_interval {
                self.last_heartbeat = Instant::now();
                self.heartbeat_and_expire(since_heartbeat);
            }
            if self.handover.busy() {
                self.drive_handover();
            }
            self.reap();
            // Often enough that `stats replication`'s loss window (newest logged minus acked) is at most
            // a few milliseconds of writes above the truth.
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                self.publish_report();
            }
        }
    }

    /// How much longer to gather writes before the next shipment, given the last one's time: only in
    /// async mode, and never while a snapshot streams (its chunks go out as fast as the sockets take them).
    fn batch_wait(&self, last_shipped: Instant) -> Option<Duration> {
        if self.config.mode != Mode::Async || self.snapshots.iter().any(Option::is_some) {
            return None;
        }
        self.config.async_batch.checked_sub(last_shipped.elapsed()).filter(|wait| !wait.is_zero())
    }

    /// Moves everything the shards handed over into the backlogs. Returns whether anything moved.
    fn drain_logs(&mut self) -> bool {
        let mut moved = false;
        for shard in 0..self.logs.len() {
            loop {
                let mut buf = self.backlogs[shard].buffer();
                match self.logs[shard].drain_batch(BATCH_BYTES, &mut buf) {
                    Drained::Empty => break,
                    Drained::Batch { first_seq, count, .. } => {
                        self.backlogs[shard].push(first_seq, count, buf);
                        moved = true;
                    }
                    Drained::ResyncRequired { through } => {
                        self.backlogs[shard].mark_gap(through);
                        moved = true;
                    }
                }
            }
        }
        moved
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "replication accept failed");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let index = self.peers.iter().position(Option::is_none).unwrap_or_else(|| {
                self.peers.push(None);
                self.peers.len() - 1
            });
            if let Err(e) = self.poll.registry().register(&mut stream, Token(index), Interest::READABLE | Interest::WRITABLE) {
                tracing::warn!(error = %e, "cannot register a standby connection");
                continue;
            }
            tracing::info!(%addr, "standby connected; handshaking");
            let newest = self.backlogs.iter().map(Backlog::newest).collect();
            let handshake = ActiveHandshake::new(
                ActiveConfig {
                    secret: self.config.secret.clone(),
                    shard_count: self.shard_count() as u16,
                    history: self.config.history,
                    epoch: self.config.epoch,
                    previous: self.config.previous.clone(),
                    newest,
                },
                Nonce::random(),
            );
            let shards = (0..self.shard_count())
                .map(|_| PeerShard {
                    cursor: LogSeq::ZERO,
                    acked: LogSeq::ZERO,
                    sync: ShardSync::Waiting,
                    inflight: VecDeque::new(),
                    shipped_bytes: 0,
                    acked_bytes: 0,
                })
                .collect();
            self.peers[index] = Some(Peer {
                link: TcpLink::new(stream, OUT_HIGH_WATER),
                addr,
                state: PeerState::Handshake(Box::new(handshake)),
                reader: MessageReader::new(MAX_INBOUND_MESSAGE),
                data: DataPath::Control,
                shards,
                last_heard: Instant::now(),
                closed: false,
            });
        }
    }

    /// Reads and handles everything a standby sent.
    fn read_peer(&mut self, index: usize) {
        let device = self.device.clone();
        let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut) else { return };
        match peer.link.receive(&mut peer.reader, usize::MAX) {
            Ok(0) => {}
            Ok(_) => peer.last_heard = Instant::now(),
            Err(LinkError::Closed) => {
                tracing::info!(addr = %peer.addr, "standby disconnected");
                peer.closed = true;
            }
            Err(e) => {
                tracing::info!(addr = %peer.addr, error = %e, "standby connection failed");
                peer.closed = true;
            }
        }
        if peer.link.at_eof() && !peer.closed {
            tracing::info!(addr = %peer.addr, "standby disconnected");
            peer.closed = true;
        }
        let mut acked_shards = Vec::new();
        let mut accepted = None;
        loop {
            let message = match peer.reader.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(addr = %peer.addr, error = %e, "standby sent bad bytes; dropping it");
                    peer.closed = true;
                    break;
                }
            };
            match (&mut peer.state, message) {
                (PeerState::Handshake(handshake), Message::Handshake(body)) => {
                    let message = match Handshake::decode(body) {
                        Ok(message) => message,
                        Err(e) => {
                            tracing::warn!(addr = %peer.addr, error = %e, "bad handshake message; dropping the standby");
                            peer.closed = true;
                            break;
                        }
                    };
                    let backlogs = &self.backlogs;
                    let step = handshake.on_message(message, |shard, after| backlogs[shard.index()].can_resume(after));
                    for reply in &step.send {
                        let out = peer.link.out();
                        let start = wire::begin(Kind::Handshake, out);
                        reply.encode(out);
                        wire::finish(out, start);
                    }
                    match step.outcome {
                        None => {}
                        Some(Outcome::Accepted { plan, .. }) => accepted = Some(plan),
                        Some(_) => {
                            self.counters.refused += 1;
                            // Send the refusal, then close.
                            let _ = peer.link.flush();
                            peer.closed = true;
                        }
                    }
                    if accepted.is_some() || peer.closed {
                        break;
                    }
                }
                (PeerState::Streaming, Message::Ack { shard, seq }) => {
                    let Some(state) = peer.shards.get_mut(shard.index()) else {
                        tracing::warn!(addr = %peer.addr, shard = shard.0, "ack for a shard that does not exist; dropping the standby");
                        peer.closed = true;
                        break;
                    };
                    if seq > state.cursor {
                        tracing::warn!(addr = %peer.addr, shard = shard.0, seq = seq.0, "ack beyond what was sent; dropping the standby");
                        peer.closed = true;
                        break;
                    }
                    if seq > state.acked {
                        state.acked = seq;
                        while let Some(&(last, through, _)) = state.inflight.front() {
                            if last > seq {
                                break;
                            }
                            state.acked_bytes = through;
                            state.inflight.pop_front();
                        }
                        acked_shards.push(shard.index());
                    }
                }
                (PeerState::Streaming, message) if matches!(peer.data, DataPath::AwaitingOffer) && !matches!(message, Message::RdmaOffer(_)) => {
                    tracing::warn!(addr = %peer.addr, "the standby did not offer an RDMA ring (this active's transport is rdma; is the standby's tcp?); dropping it");
                    peer.closed = true;
                    break;
                }
                (PeerState::Streaming, Message::RdmaOffer(offer)) => {
                    let offer = offer.to_vec();
                    if let Err(reason) = accept_offer(peer, &offer, device.as_ref()) {
                        tracing::warn!(addr = %peer.addr, %reason, "cannot set up the RDMA link; dropping the standby");
                        peer.closed = true;
                        break;
                    }
                }
                (PeerState::Streaming, Message::RdmaReady) => {
                    if let Err(reason) = peer.ring_ready() {
                        tracing::warn!(addr = %peer.addr, %reason, "dropping the standby");
                        peer.closed = true;
                        break;
                    }
                    tracing::info!(addr = %peer.addr, "RDMA link up: streaming into the standby's ring");
                }
                (PeerState::Streaming, Message::Heartbeat { .. }) => {}
                (PeerState::Streaming, Message::HandoverReply { accepted, reason }) => {
                    let (addr, reason) = (peer.addr, String::from_utf8_lossy(reason).into_owned());
                    tracing::info!(%addr, accepted, %reason, "standby answered the handover");
                    self.handover.update(|state| match state {
                        HandoverState::Sent { addr: sent_to, .. } if *sent_to == addr => Some(if accepted {
                            HandoverState::Accepted { addr }
                        } else {
                            HandoverState::Refused { addr, reason }
                        }),
                        _ => None,
                    });
                }
                (_, other) => {
                    tracing::warn!(addr = %peer.addr, message = ?std::mem::discriminant(&other), "standby sent a message out of turn; dropping it");
                    peer.closed = true;
                    break;
                }
            }
        }
        if let Some(plan) = accepted {
            self.start_streaming(index, plan);
        }
        acked_shards.sort_unstable();
        acked_shards.dedup();
        for shard in acked_shards {
            self.publish_acked(shard);
        }
    }

    /// A standby passed the handshake: set each shard's cursor, or queue it for a snapshot.
    fn start_streaming(&mut self, index: usize, plan: Vec<ShardStart>) {
        let mut full = Vec::new();
        {
            let peer = self.peers[index].as_mut().expect("the peer being accepted");
            peer.state = PeerState::Streaming;
            if matches!(self.config.transport, Transport::Rdma(_)) {
                peer.data = DataPath::AwaitingOffer;
            }
            for (shard, start) in plan.iter().enumerate() {
                let state = &mut peer.shards[shard];
                match *start {
                    ShardStart::Resume { after } => {
                        state.cursor = after;
                        state.acked = after;
                        state.sync = ShardSync::Streaming;
                    }
                    ShardStart::FullSync => full.push(shard),
                }
            }
            tracing::info!(addr = %peer.addr, full_sync_shards = full.len(), "standby streaming");
        }
        if full.is_empty() {
            self.counters.partial_syncs += 1;
        } else {
            self.counters.full_syncs += 1;
        }
        for shard in full {
            self.request_snapshot(index, shard);
        }
        for shard in 0..self.shard_count() {
            self.publish_acked(shard);
        }
    }

    /// Puts `peer` in line for a snapshot of `shard`.
    fn request_snapshot(&mut self, peer: usize, shard: usize) {
        if let Some(p) = self.peers[peer].as_mut() {
            p.shards[shard].sync = ShardSync::Waiting;
            p.shards[shard].inflight.clear();
            p.shards[shard].acked_bytes = p.shards[shard].shipped_bytes;
        }
        match &mut self.snapshots[shard] {
            Some(running) if !running.begun => running.peers.push(peer),
            // A snapshot under way has started without this peer: it waits for the next one.
            Some(_) => {}
            None => self.start_snapshot(shard, vec![peer]),
        }
    }

    fn start_snapshot(&mut self, shard: usize, peers: Vec<usize>) {
        self.next_snapshot += 1;
        let id = self.next_snapshot;
        tracing::info!(shard, id, standbys = peers.len(), "asking the shard for a snapshot");
        self.snapshots[shard] = Some(RunningSnapshot { id, begun: false, peers });
        self.ports[shard].snapshot_wanted.store(id, Ordering::Release);
        self.wake.wake(shard);
    }

    /// Takes the chunks shards produced, as fast as the slowest standby of each snapshot takes them.
    fn take_snapshots(&mut self) -> bool {
        let mut moved = false;
        for shard in 0..self.shard_count() {
            let Some(running) = &self.snapshots[shard] else { continue };
            let id = running.id;
            let room = running.peers.iter().all(|&p| {
                self.peers.get(p).and_then(Option::as_ref).is_none_or(|peer| match &peer.shards[shard].sync {
                    ShardSync::Snapshot { pending, .. } => pending.len() < SNAPSHOT_PENDING,
                    _ => true,
                })
            });
            if !room {
                continue;
            }
            let Some(chunk) = self.ports[shard].snapshot.pop() else { continue };
            moved = true;
            self.wake.wake(shard);
            if chunk.id != id {
                continue; // left over from an abandoned snapshot
            }
            if let SnapshotPart::Items(bytes) = &chunk.part {
                self.counters.snapshot_bytes += bytes.len() as u64;
            }
            let end = matches!(chunk.part, SnapshotPart::End);
            let begin = matches!(chunk.part, SnapshotPart::Begin);
            let chunk = Arc::new(chunk);
            let running = self.snapshots[shard].as_mut().expect("checked above");
            running.begun = true;
            for &p in &running.peers {
                let Some(peer) = self.peers.get_mut(p).and_then(Option::as_mut) else { continue };
                let state = &mut peer.shards[shard];
                match &mut state.sync {
                    ShardSync::Waiting if begin => {
                        let horizon = chunk.at;
                        state.sync = ShardSync::Snapshot { id, pending: VecDeque::from([chunk.clone()]), horizon };
                    }
                    ShardSync::Snapshot { id: theirs, pending, horizon } if *theirs == id => {
                        *horizon = chunk.at;
                        pending.push_back(chunk.clone());
                    }
                    _ => {}
                }
            }
            if end {
                let finished = self.snapshots[shard].take().expect("checked above");
                // Peers that asked while this one ran get the next.
                let waiting: Vec<usize> = self
                    .peers
                    .iter()
                    .enumerate()
                    .filter(|(p, peer)| {
                        !finished.peers.contains(p)
                            && peer.as_ref().is_some_and(|peer| {
                                matches!(peer.state, PeerState::Streaming) && matches!(peer.shards[shard].sync, ShardSync::Waiting)
                            })
                    })
                    .map(|(p, _)| p)
                    .collect();
                if !waiting.is_empty() {
                    self.start_snapshot(shard, waiting);
                }
            }
        }
        moved
    }

    /// Writes what is due to every streaming standby. Returns whether anything was written.
    fn ship_all(&mut self) -> bool {
        let mut wrote = false;
        let mut resync = Vec::new();
        let mut synced = Vec::new();
        for (index, slot) in self.peers.iter_mut().enumerate() {
            let Some(peer) = slot.as_mut() else { continue };
            if peer.closed {
                continue;
            }
            let sink: Option<&mut dyn StreamSink> = match &mut peer.data {
                DataPath::Control => Some(&mut peer.link),
                DataPath::AwaitingOffer => None,
                #[cfg(feature = "rdma")]
                DataPath::AwaitingReady(_) => None,
                #[cfg(feature = "rdma")]
                DataPath::Ring(sink) => Some(sink.as_mut()),
            };
            if let (PeerState::Streaming, Some(sink)) = (&peer.state, sink) {
                for shard in 0..self.backlogs.len() {
                    let room = sink.room();
                    if room == 0 {
                        break;
                    }
                    let state = &mut peer.shards[shard];
                    match ship_shard(state, sink.queue(), room, shard, &self.backlogs[shard], &mut self.scratch, &mut self.counters) {
                        Ok((n, snapshot_done)) => {
                            wrote |= n > 0;
                            if snapshot_done {
                                synced.push(shard);
                            }
                        }
                        Err(()) => resync.push((index, shard)),
                    }
                }
            }
            if let Err(e) = peer.pump() {
                tracing::warn!(addr = %peer.addr, error = %e, "replication link failed; dropping the standby");
                self.counters.link_failures += 1;
                self.counters.last_link_error = e.to_string();
                peer.closed = true;
            }
        }
        for (index, shard) in resync {
            tracing::warn!(shard, addr = ?self.peers[index].as_ref().map(|p| p.addr), "standby fell behind the backlog: full sync");
            self.counters.full_syncs += 1;
            self.request_snapshot(index, shard);
        }
        // A standby whose snapshot of a shard is complete now counts for that shard's watermark.
        for shard in synced {
            self.publish_acked(shard);
        }
        wrote
    }

    /// Moves a planned handover on: sends it to the first standby that has applied every shard through
    /// the requested point, gives up at the deadline, and notices a standby that went away unanswering.
    fn drive_handover(&mut self) {
        let now = Instant::now();
        let mut send_to = None;
        let newest: Vec<LogSeq> = self.backlogs.iter().map(Backlog::newest).collect();
        let candidates: Vec<Candidate> = self
            .peers
            .iter()
            .flatten()
            .map(|peer| Candidate {
                addr: peer.addr,
                streaming: !peer.closed
                    && matches!(peer.state, PeerState::Streaming)
                    && peer.shards.iter().all(|s| matches!(s.sync, ShardSync::Streaming)),
                acked: peer.shards.iter().map(|s| s.acked).collect(),
            })
            .collect();
        let live = |addr: SocketAddr| candidates.iter().any(|c| c.addr == addr && c.streaming);
        self.handover.update(|state| match state {
            HandoverState::Wanted { through, deadline } => {
                if let Some((shard, seq)) = newest.iter().zip(through).enumerate().find_map(|(s, (n, t))| (n > t).then_some((s, n))) {
                    return Some(HandoverState::Failed {
                        reason: format!("shard {shard} logged {} after the pause point {}", seq.0, through[shard].0),
                    });
                }
                if let Some(index) = handover::pick_standby(&candidates, through) {
                    send_to = Some((candidates[index].addr, through.clone()));
                    return Some(HandoverState::Sent { addr: candidates[index].addr, deadline: now + handover::ANSWER_TIMEOUT });
                }
                (now >= *deadline).then(|| HandoverState::Failed {
                    reason: format!("no standby caught up in time: {}", handover::progress(&candidates, through)),
                })
            }
            HandoverState::Sent { addr, deadline } => {
                if !live(*addr) {
                    Some(HandoverState::Unknown { addr: *addr, reason: "the standby went away without answering".into() })
                } else if now >= *deadline {
                    Some(HandoverState::Unknown { addr: *addr, reason: "the standby did not answer in time".into() })
                } else {
                    None
                }
            }
            _ => None,
        });
        if let Some((addr, through)) = send_to {
            if let Some(peer) = self.peers.iter_mut().flatten().find(|p| p.addr == addr) {
                tracing::info!(%addr, ?through, "handing over to the standby");
                wire::encode_handover(self.config.epoch, &through, peer.link.out());
                if peer.link.flush().is_err() {
                    peer.closed = true;
                }
            }
        }
    }

    /// Sends the heartbeats due and drops standbys silent past `peer_timeout`; `gap`: the time since
    /// the last heartbeats were due and sent.
    fn heartbeat_and_expire(&mut self, gap: Duration) {
        #[cfg(feature = "rdma")]
        self.inject_faults();
        let millis = unix_millis();
        // A standby is judged on this thread's running time, as the standby judges the active: a pause
        // of the machine silenced both.
        let held = self.stall.held_off();
        let now = Instant::now();
        // A standby that finds this active silent logs it; this says whether this thread was the cause.
        if gap > (self.config.heartbeat_interval * 4).max(Duration::from_millis(100)) {
            tracing::warn!(gap_ms = gap.as_millis() as u64, held_off_ms = held.as_millis() as u64, "the shipper's heartbeats were late");
        }
        for peer in self.peers.iter_mut().flatten() {
            peer.last_heard = (peer.last_heard + held).min(now);
            if peer.last_heard.elapsed() > self.config.peer_timeout {
                tracing::warn!(addr = %peer.addr, "standby silent for too long; dropping it");
                peer.closed = true;
                continue;
            }
            if matches!(peer.state, PeerState::Streaming) {
                wire::encode_heartbeat(self.config.epoch, millis, peer.link.out());
            }
        }
    }

    /// Drops closed connections and whatever they were waiting for.
    fn reap(&mut self) {
        let mut changed = false;
        for index in 0..self.peers.len() {
            if !self.peers[index].as_ref().is_some_and(|p| p.closed) {
                continue;
            }
            let mut peer = self.peers[index].take().expect("checked");
            let _ = self.poll.registry().deregister(peer.link.stream());
            tracing::info!(addr = %peer.addr, "standby connection closed");
            for running in self.snapshots.iter_mut().flatten() {
                running.peers.retain(|&p| p != index);
            }
            changed = true;
        }
        if changed {
            // A snapshot nobody waits for any more is abandoned: the shard stops when it sees a new id.
            for shard in 0..self.shard_count() {
                if self.snapshots[shard].as_ref().is_some_and(|r| r.peers.is_empty()) {
                    self.snapshots[shard] = None;
                    self.ports[shard].snapshot_wanted.store(0, Ordering::Release);
                    self.wake.wake(shard);
                }
                self.publish_acked(shard);
            }
        }
    }

    /// Publishes `shard`'s acknowledged watermark under the ack policy and wakes the shard if it moved.
    fn publish_acked(&mut self, shard: usize) {
        let acks = self.peers.iter().flatten().filter_map(|peer| {
            let state = &peer.shards[shard];
            (matches!(peer.state, PeerState::Streaming) && !peer.closed && matches!(state.sync, ShardSync::Streaming))
                .then_some(state.acked.0)
        });
        let watermark = match self.config.ack {
            AckPolicy::All => acks.min(),
            AckPolicy::One => acks.max(),
        };
        let watermark = match watermark {
            Some(seq) => {
                self.degraded[shard] = false;
                seq
            }
            None => {
                if self.config.mode == Mode::Sync && !self.degraded[shard] {
                    self.degraded[shard] = true;
                    self.counters.sync_degraded += 1;
                    tracing::warn!(shard, "no standby streaming this shard: sync replication degrades to async");
                }
                ACKED_ALL
            }
        };
        let port = &self.ports[shard];
        if port.acked.swap(watermark, Ordering::AcqRel) != watermark && self.config.mode == Mode::Sync {
            self.wake.wake(shard);
        }
    }

    fn publish_report(&mut self) {
        let mut report = ShipperReport {
            listen: self.counters.listen.clone(),
            newest: self.backlogs.iter().map(|b| b.newest().0).collect(),
            backlog_bytes: self.backlogs.iter().map(|b| b.bytes() as u64).sum(),
            full_syncs: self.counters.full_syncs,
            partial_syncs: self.counters.partial_syncs,
            refused: self.counters.refused,
            sync_degraded: self.counters.sync_degraded,
            bytes_shipped: self.counters.bytes_shipped,
            shipments: self.counters.shipments,
            snapshot_bytes: self.counters.snapshot_bytes,
            ring_full_events: self.logs.iter().map(|l| l.stats().full_events).sum(),
            ring_records_lost: self.logs.iter().map(|l| l.stats().records_lost).sum(),
            ring_resyncs: self.logs.iter().map(|l| l.stats().resyncs_marked).sum(),
            link_failures: self.counters.link_failures,
            last_link_error: self.counters.last_link_error.clone(),
            peers: Vec::new(),
        };
        let now = Instant::now();
        for peer in self.peers.iter().flatten() {
            let state = match peer.state {
                PeerState::Handshake(_) => "handshake",
                PeerState::Streaming if peer.shards.iter().any(|s| !matches!(s.sync, ShardSync::Streaming)) => "full_sync",
                PeerState::Streaming => "streaming",
            };
            let mut lag_records = 0;
            let mut lag_bytes = 0;
            let mut lag_millis = 0;
            for (shard, s) in peer.shards.iter().enumerate() {
                lag_records += self.backlogs[shard].newest().0.saturating_sub(s.acked.0);
                if let Some(&(_, _, sent)) = s.inflight.front() {
                    lag_millis = lag_millis.max(now.duration_since(sent).as_millis() as u64);
                }
                lag_bytes += s.shipped_bytes.saturating_sub(s.acked_bytes);
            }
            report.peers.push(PeerReport {
                addr: peer.addr.to_string(),
                state,
                transport: match peer.data {
                    DataPath::Control => "tcp",
                    _ => "rdma",
                },
                link: peer.link_stats(),
                acked: peer.shards.iter().map(|s| s.acked.0).collect(),
                lag_records,
                lag_bytes,
                lag_millis,
            });
        }
        *self.report.lock().unwrap() = report;
    }
}

/// Writes one shard's due snapshot chunks and records to `peer`'s output. Returns the bytes added and
/// whether the shard's snapshot ended, or `Err` when the standby's cursor fell out of the backlog.
fn ship_shard(
    state: &mut PeerShard,
    out: &mut Vec<u8>,
    room: usize,
    shard: usize,
    backlog: &Backlog,
    scratch: &mut Vec<u8>,
    counters: &mut ShipperReport,
) -> Result<(usize, bool), ()> {
    let before = out.len();
    let mut snapshot_done = false;
    let shard_id = ShardId(shard as u16);
    loop {
        if out.len() - before >= room {
            break;
        }
        let mut until = LogSeq(u64::MAX);
        match &mut state.sync {
            ShardSync::Waiting => break,
            ShardSync::Streaming => {}
            ShardSync::Snapshot { pending, horizon, .. } => {
                until = *horizon;
                if let Some(chunk) = pending.front() {
                    let due = matches!(chunk.part, SnapshotPart::Begin) || chunk.at <= state.cursor;
                    if due {
                        let chunk = pending.pop_front().expect("front exists");
                        match &chunk.part {
                            SnapshotPart::Begin => {
                                wire::encode_snapshot_begin(shard_id, chunk.at, out);
                                state.cursor = chunk.at;
                                state.acked = LogSeq::ZERO;
                                state.inflight.clear();
                                state.acked_bytes = state.shipped_bytes;
                            }
                            SnapshotPart::Items(records) => {
                                let start = wire::begin(Kind::SnapshotItems, out);
                                out.extend_from_slice(&shard_id.0.to_le_bytes());
                                out.extend_from_slice(records);
                                wire::finish(out, start);
                            }
                            SnapshotPart::End => {
                                wire::encode_snapshot_end(shard_id, out);
                                state.sync = ShardSync::Streaming;
                                snapshot_done = true;
                            }
                        }
                        continue;
                    }
                    until = chunk.at;
                }
            }
        }
        scratch.clear();
        match backlog.read(state.cursor, until, BATCH_BYTES, scratch) {
            Ok(Some(span)) => {
                let start = wire::begin(Kind::Batch, out);
                frame::encode_frame(shard_id, span.first, span.count, scratch, out)
                    .expect("a batch of at most BATCH_BYTES fits a frame");
                wire::finish(out, start);
                state.cursor = LogSeq(span.first.0 + u64::from(span.count) - 1);
                state.shipped_bytes += scratch.len() as u64;
                if state.inflight.len() == INFLIGHT_MARKS {
                    state.inflight.pop_front();
                }
                state.inflight.push_back((state.cursor, state.shipped_bytes, Instant::now()));
            }
            Ok(None) => break,
            Err(_) => return Err(()),
        }
    }
    let added = out.len() - before;
    counters.bytes_shipped += added as u64;
    Ok((added, snapshot_done))
}

impl Peer {
    /// Moves the data stream on and writes the control connection's output.
    fn pump(&mut self) -> Result<(), LinkError> {
        match &mut self.data {
            DataPath::Control | DataPath::AwaitingOffer => {}
            #[cfg(feature = "rdma")]
            DataPath::AwaitingReady(sink) => {
                // Nothing is written yet; completions of nothing, but a failed QP shows here.
                crate::ring_link::RingPort::poll(sink.port())?;
            }
            #[cfg(feature = "rdma")]
            DataPath::Ring(sink) => {
                sink.pump()?;
            }
        }
        self.link.flush()?;
        Ok(())
    }

    fn wants_poll(&self) -> bool {
        match &self.data {
            #[cfg(feature = "rdma")]
            DataPath::Ring(sink) => sink.wants_poll(),
            _ => false,
        }
    }

    fn link_stats(&self) -> LinkStats {
        match &self.data {
            #[cfg(feature = "rdma")]
            DataPath::Ring(sink) | DataPath::AwaitingReady(sink) => sink.stats(),
            _ => LinkStats::default(),
        }
    }

    /// The standby connected its queue pair: the data stream may go into its ring.
    fn ring_ready(&mut self) -> Result<(), String> {
        match std::mem::replace(&mut self.data, DataPath::Control) {
            #[cfg(feature = "rdma")]
            DataPath::AwaitingReady(sink) => {
                self.data = DataPath::Ring(sink);
                Ok(())
            }
            other => {
                self.data = other;
                Err("the standby said its RDMA ring is ready out of turn".into())
            }
        }
    }
}

/// Takes a standby's RDMA ring offer: connects a queue pair to it and answers with the active's end.
#[cfg(feature = "rdma")]
fn accept_offer(peer: &mut Peer, offer: &[u8], device: Option<&Device>) -> Result<(), String> {
    let Some(device) = device.filter(|_| matches!(peer.data, DataPath::AwaitingOffer)) else {
        return Err("the standby offered an RDMA ring, but this active's transport is tcp (or it offered twice)".into());
    };
    let (port, layout, ring_id, answer) = crate::rdma::link::ActivePort::accept(device, offer).map_err(|e| e.to_string())?;
    wire::encode(Kind::RdmaAccept, &answer, peer.link.out());
    peer.data = DataPath::AwaitingReady(Box::new(crate::ring_link::RingSink::new(layout, ring_id, port)));
    Ok(())
}

#[cfg(not(feature = "rdma"))]
fn accept_offer(_: &mut Peer, _: &[u8], _: Option<&Device>) -> Result<(), String> {
    Err("the standby offered an RDMA ring, but this active's transport is tcp".into())
}

/// Milliseconds since the unix epoch.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    //! The order a standby in full sync receives a shard in: snapshot chunks exactly after the records
    //! they reflect, never after a later record.
    use super::*;
    use crate::record::Record;

    fn records(first: u64, count: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in first..first + count {
            Record::Delete { key: b"k" }.encode(ShardId(0), LogSeq(seq), &mut out).unwrap();
        }
        out
    }

    fn chunk(at: u64, part: SnapshotPart) -> Arc<SnapshotChunk> {
        Arc::new(SnapshotChunk { id: 1, at: LogSeq(at), part })
    }

    /// What the standby would see, as short names: "begin@N", "items", "end", "batch A-B".
    fn messages(bytes: &[u8]) -> Vec<String> {
        let mut reader = MessageReader::new(1 << 20);
        reader.feed(bytes);
        let mut seen = Vec::new();
        while let Some(message) = reader.next_message().unwrap() {
            seen.push(match message {
                Message::SnapshotBegin { at, .. } => format!("begin@{}", at.0),
                Message::SnapshotItems { .. } => "items".into(),
                Message::SnapshotEnd { .. } => "end".into(),
                Message::Batch(frame) => format!("batch {}-{}", frame.header.first_seq.0, frame.header.last_seq().0),
                other => format!("{other:?}"),
            });
        }
        seen
    }

    #[test]
    fn records_newer_than_the_last_chunk_wait_for_the_next_chunk() {
        let mut backlog = Backlog::new(ShardId(0), LogSeq::ZERO, 1 << 20);
        backlog.push(LogSeq(1), 10, records(1, 10));
        let mut state = PeerShard {
            cursor: LogSeq::ZERO,
            acked: LogSeq::ZERO,
            sync: ShardSync::Waiting,
            inflight: VecDeque::new(),
            shipped_bytes: 0,
            acked_bytes: 0,
        };
        let mut counters = ShipperReport::default();
        let mut out = Vec::new();
        let mut ship = |state: &mut PeerShard, out: &mut Vec<u8>| {
            ship_shard(state, out, usize::MAX, 0, &backlog, &mut Vec::new(), &mut counters).unwrap()
        };
        // Waiting for the snapshot to begin: nothing goes out.
        assert_eq!(ship(&mut state, &mut out), (0, false));
        // The snapshot began at 4; records 5..=10 are in the backlog, but the next chunk may reflect 6.
        state.sync = ShardSync::Snapshot { id: 1, pending: VecDeque::from([chunk(4, SnapshotPart::Begin)]), horizon: LogSeq(4) };
        ship(&mut state, &mut out);
        assert_eq!(messages(&out), ["begin@4"]);
        if let ShardSync::Snapshot { pending, horizon, .. } = &mut state.sync {
            pending.push_back(chunk(6, SnapshotPart::Items(Vec::new())));
            *horizon = LogSeq(6);
        }
        out.clear();
        ship(&mut state, &mut out);
        assert_eq!(messages(&out), ["batch 5-6", "items"], "the chunk at 6 goes after 6 and before 7");
        if let ShardSync::Snapshot { pending, horizon, .. } = &mut state.sync {
            pending.push_back(chunk(9, SnapshotPart::End));
            *horizon = LogSeq(9);
        }
        out.clear();
        let (_, done) = ship(&mut state, &mut out);
        assert!(done);
        assert_eq!(messages(&out), ["batch 7-9", "end", "batch 10-10"]);
    }
}
