//! The standby's replication core: connects to the active, proves itself, and hands every shard's
//! records to that shard's core, in order; acknowledges what the shards applied.
//!
//! One thread runs [`Receiver::run`]. It dials the configured peers in turn until one accepts it as a
//! standby ([`crate::handshake`]); the handshake tells it, per shard, whether the stream resumes after
//! what it already applied or starts with a snapshot. Then it reads messages ([`crate::wire`]), checks
//! them (frames, records and their sequence numbers: a batch that does not continue exactly where the
//! last one ended ends the connection), and queues them on each shard's [`ShardPort::inbound`]; the
//! shard's core applies them and publishes [`ShardPort::applied`], which goes back as acks. When a
//! shard's queue is full the receiver stops reading: back-pressure reaches the active through TCP.
//!
//! A planned handover (`Handover` from the active, see [`crate::handover`]): the receiver answers
//! whether it holds exactly the active's log, and if it does, leaves the stream and returns
//! [`Exit::HandedOver`] so that the server promotes it. [`ReceiverHandle::promote`] makes it return
//! [`Exit::PromoteRequested`] (an operator's `tandemctl promote`).
//!
//! A lost connection (closed, silent past the peer timeout, or lying) is redialled after a short delay,
//! presenting the history and what each shard applied, so a standby that was away briefly resumes from
//! the active's backlog. A shard whose snapshot was cut off presents nothing applied, so it is
//! resent from its log or snapshotted again, never left half-filled.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::handshake::{Message as Handshake, Nonce, Outcome, RefuseReason, ShardStart, StandbyConfig, StandbyHandshake};
use crate::ids::{Epoch, LogSeq, ReplicationId, ShardId};
use crate::port::{Bell, Inbound, ShardPort, Wake};
use crate::shipper::unix_millis;
use crate::stall::StallClock;
use crate::transport::{Device, LinkError, LinkStats, StreamSource, TcpLink, Transport};
use crate::wire::{self, Kind, Message, MessageReader};

const CONN: Token = Token(0);
const BELL: Token = Token(1);
/// Largest message accepted from the active (a batch or a snapshot chunk, with room to spare).
const MAX_MESSAGE: usize = 80 << 20;
/// Bytes read per call.
const READ_CHUNK: usize = 256 << 10;
/// After data in the ring, how long the loop polls it without sleeping.
const RING_SPIN: Duration = Duration::from_micros(200);
/// Shorter holds are the scheduler's ordinary delays, far below any `dead_after`: not counted.
const STALL_WORTH_FORGIVING: Duration = Duration::from_millis(10);

/// How long a standby waits before dialling again after a handshake was refused.
pub const REFUSED_BACKOFF: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Where the active may be; tried in turn.
    pub peers: Vec<SocketAddr>,
    pub secret: Vec<u8>,
    pub shard_count: u16,
    pub heartbeat_interval: Duration,
    /// An active silent for this long is considered gone (the connection is dropped and redialled).
    pub peer_timeout: Duration,
    pub reconnect_delay: Duration,
    /// Failover: once fully synced, an active not heard from for this long is declared dead and
    /// [`Receiver::run`] returns [`Exit::ActiveDead`] (None: never).
    pub dead_after: Option<Duration>,
    /// Whether this node can take over when its active hands over (it has failover settings).
    pub can_promote: bool,
    /// What carries the data stream (the active must use the same).
    pub transport: Transport,
}

/// Why [`Receiver::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Stopped,
    /// The active was silent for `dead_after` after this standby had been fully synced. The first time
    /// in a silence the connection is kept: a slow active is not a dead one, and the caller that decides
    /// not to act ([`Receiver::grace`]) lets it go on streaming where it was; the caller that acts drops
    /// it ([`Receiver::disconnect`]). A silence that lasts through a grace drops it before returning.
    ActiveDead,
    /// The active handed over (a planned switchover) and this standby accepted: it must take over.
    HandedOver { from: SocketAddr },
    /// [`ReceiverHandle::promote`] was set.
    PromoteRequested,
    /// The active at `from` proved itself at this standby's own epoch but no longer knows the history
    /// this standby holds: it restarted within its reign and lost its log (and its cache, unless memory
    /// files kept it), and a node that restarts as the active never resumes its old history. This standby
    /// holds the reign's data: it must take over (the restarted node then meets a newer active and
    /// follows it). Returned only by a standby that streamed from this reign and can promote.
    ActiveLostItsLog { from: SocketAddr },
}

/// What `stats replication` shows on a standby.
#[derive(Clone, Debug, Default)]
pub struct ReceiverReport {
    /// `connecting`, `handshake`, `full_sync` or `streaming`.
    pub state: &'static str,
    /// What carries the data stream: `tcp` or `rdma`.
    pub transport: &'static str,
    /// The transport's counters for the current connection (zeros for TCP).
    pub link: LinkStats,
    pub active: String,
    pub history: Option<ReplicationId>,
    pub epoch: Epoch,
    pub applied: Vec<u64>,
    pub connects: u64,
    pub full_syncs: u64,
    pub partial_syncs: u64,
    pub refused: u64,
    pub bytes_received: u64,
    /// Milliseconds since the active was last heard from.
    pub last_heard_millis: u64,
    pub last_error: String,
    /// Connections dropped because the RDMA ring or its queue pair failed.
    pub link_failures: u64,
    /// Times this standby's thread was kept from running long enough to matter to failure detection
    /// (its silence clock was moved on by that much; see [`crate::stall`]).
    pub stalls_forgiven: u64,
}

pub struct ReceiverHandle {
    pub bell: Arc<Bell>,
    pub report: Arc<Mutex<ReceiverReport>>,
    pub stop: Arc<AtomicBool>,
    /// Set it (and ring the bell) to make [`Receiver::run`] return [`Exit::PromoteRequested`].
    pub promote: Arc<AtomicBool>,
}

#[cfg(feature = "rdma")]
type RdmaSource = crate::ring_link::RingSource<crate::rdma::link::StandbyRing>;

/// Where the data stream comes from.
enum DataPath {
    /// The control connection carries it (the TCP transport): `Connection::reader` yields both.
    Control,
    /// The RDMA transport: the ring is offered, the active's answer awaited.
    #[cfg(feature = "rdma")]
    Offered(Box<crate::rdma::link::StandbyRing>, crate::ring::RingLayout, u64),
    /// The standby's ring; its messages go to `Connection::ring_reader`.
    #[cfg(feature = "rdma")]
    Ring(Box<RdmaSource>),
}

struct Connection {
    /// The control connection (and, with [`DataPath::Control`], the data stream).
    link: TcpLink,
    addr: SocketAddr,
    /// Messages from the control connection.
    reader: MessageReader,
    data: DataPath,
    /// Messages from the ring (the RDMA transport).
    ring_reader: MessageReader,
    handshake: Option<StandbyHandshake>,
    /// Per shard: the last sequence number received; the next batch must start right after it.
    received: Vec<LogSeq>,
    /// Per shard: a snapshot is being received.
    in_snapshot: Vec<bool>,
    /// Per shard: the handshake asked for a full sync that has not ended yet.
    awaiting_snapshot: Vec<bool>,
    /// Per shard: the last ack sent.
    acked: Vec<LogSeq>,
    last_heard: Instant,
    last_heartbeat: Instant,
}

pub struct Receiver {
    config: ReceiverConfig,
    poll: Poll,
    bell: Arc<Bell>,
    stop: Arc<AtomicBool>,
    ports: Vec<Arc<ShardPort>>,
    wake: Arc<dyn Wake>,
    report: Arc<Mutex<ReceiverReport>>,
    counters: ReceiverReport,
    history: Option<ReplicationId>,
    epoch: Epoch,
    conn: Option<Connection>,
    next_peer: usize,
    /// No dial before this: an active that refused the handshake is not asked again at once.
    dial_after: Instant,
    /// Messages for shards whose queue was full, in arrival order.
    held: VecDeque<(usize, Inbound)>,
    /// Every shard has streamed at least once (a complete copy existed): only then may failover promote.
    synced_once: bool,
    /// When the active was last heard from, across connections.
    last_heard: Instant,
    /// The connection was kept through a declared silence ([`Exit::ActiveDead`]) and nothing was heard
    /// since: the next declared silence drops it.
    kept_through_silence: bool,
    /// The active's clock on the last heartbeat received (ms since the epoch), for the log.
    last_heartbeat_sent: u64,
    promote: Arc<AtomicBool>,
    /// The active that handed over to this standby, once it accepted.
    handed_over: Option<SocketAddr>,
    /// An active of this standby's own epoch that refused its history (see [`Exit::ActiveLostItsLog`]).
    lost_its_log: Option<SocketAddr>,
    /// `history` was kept from before this receiver (see [`Receiver::offer_kept_history`]), until accepted.
    kept_history: bool,
    /// When the ring last had data: the loop polls it without sleeping for a moment after.
    last_ring_data: Instant,
    /// Time this thread was kept from running is not the active's silence (see [`crate::stall`]).
    stall: StallClock,
    /// The active whose handshake last accepted this standby.
    followed: Option<SocketAddr>,
    /// The RDMA device the rings are registered on (transport = "rdma"; always None without the feature).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    device: Option<Device>,
}

impl Receiver {
    pub fn new(config: ReceiverConfig, ports: Vec<Arc<ShardPort>>, wake: Arc<dyn Wake>) -> io::Result<(Receiver, ReceiverHandle)> {
        let device = crate::transport::open_device(&config.transport)?;
        let poll = Poll::new()?;
        let bell = Bell::new(mio::Waker::new(poll.registry(), BELL)?);
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(ReceiverReport { state: "connecting", ..Default::default() }));
        let promote = Arc::new(AtomicBool::new(false));
        let handle = ReceiverHandle { bell: bell.clone(), report: report.clone(), stop: stop.clone(), promote: promote.clone() };
        let receiver = Receiver {
            config,
            poll,
            bell,
            stop,
            ports,
            wake,
            report,
            counters: ReceiverReport { state: "connecting", ..Default::default() },
            history: None,
            epoch: Epoch(0),
            conn: None,
            next_peer: 0,
            dial_after: Instant::now(),
            held: VecDeque::new(),
            synced_once: false,
            last_heard: Instant::now(),
            kept_through_silence: false,
            last_heartbeat_sent: 0,
            promote,
            handed_over: None,
            lost_its_log: None,
            kept_history: false,
            last_ring_data: Instant::now(),
            stall: StallClock::new(),
            followed: None,
            device,
        };
        Ok((receiver, handle))
    }

    /// The history and epoch this standby follows, and what each shard applied.
    pub fn position(&self) -> (Option<ReplicationId>, Epoch, Vec<LogSeq>) {
        (self.history, self.epoch, self.ports.iter().map(|p| p.applied()).collect())
    }

    /// The active whose handshake last accepted this standby (the one that went silent, after
    /// [`Exit::ActiveDead`]).
    pub fn followed(&self) -> Option<SocketAddr> {
        self.followed
    }

    /// Gives the active another `dead_after` to be heard from (its silence was not acted on), on the
    /// connection kept through the silence if there is one.
    pub fn grace(&mut self) {
        let now = Instant::now();
        self.last_heard = now;
        if let Some(conn) = self.conn.as_mut() {
            conn.last_heard = now;
        }
    }

    /// Drops the connection to the active (one declared dead and about to be replaced, or one whose
    /// silence sends this standby looking elsewhere).
    pub fn disconnect(&mut self, reason: &str) {
        self.drop_connection(reason);
        self.publish_report();
    }

    /// Sets the epoch to present (a restarted standby's persisted epoch).
    pub fn set_epoch(&mut self, epoch: Epoch) {
        self.epoch = epoch;
    }

    /// Presents `history` at the next handshake, with what the shards' ports say they applied of it, for
    /// contents this node kept from before: an active that stepped down at a known point, or a restart
    /// that found its memory files. An active whose log continues that history resumes it (a partial
    /// resync); one that refuses it as unknown (it started a history of its own since) gets asked for a
    /// full sync instead, which replaces them. Only a standby that followed a history in this process
    /// keeps it against such an active (a mis-pointed standby does not lose its data silently).
    pub fn offer_kept_history(&mut self, history: ReplicationId) {
        self.history = Some(history);
        self.kept_history = true;
    }

    /// Treats this standby's copy as complete, as if it had streamed every shard once: it may take
    /// over when no active is heard from for `dead_after` (an active that handed over to a standby
    /// that then never took over takes over again).
    pub fn assume_synced(&mut self) {
        self.synced_once = true;
        self.last_heard = Instant::now();
    }

    pub fn run(&mut self) -> Exit {
        let mut events = Events::with_capacity(64);
        let mut last_report = Instant::now();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Exit::Stopped;
            }
            self.forgive_own_stall();
            if let Some(from) = self.handed_over.take() {
                self.drop_connection("the active handed over to this standby");
                self.publish_report();
                return Exit::HandedOver { from };
            }
            if let Some(from) = self.lost_its_log.take() {
                self.drop_connection("the active restarted without this reign's log");
                self.publish_report();
                return Exit::ActiveLostItsLog { from };
            }
            if self.promote.swap(false, Ordering::AcqRel) {
                self.drop_connection("promoted by the operator");
                self.publish_report();
                return Exit::PromoteRequested;
            }
            if let Some(conn) = &self.conn {
                if conn.handshake.is_none() && !conn.awaiting_snapshot.iter().any(|&a| a) {
                    self.synced_once = true;
                }
            }
            if let Some(dead_after) = self.config.dead_after {
                if self.synced_once && self.last_heard.elapsed() > dead_after && self.conn.is_some() && self.held.is_empty() {
                    // Silence is judged on what arrived, not on how long this thread did not look: a
                    // standby whose own machine stalled past dead_after finds the heartbeats waiting.
                    if let Err(reason) = self.read() {
                        self.drop_connection(&reason);
                    }
                }
                if self.synced_once && self.last_heard.elapsed() > dead_after {
                    let since_sent = unix_millis().saturating_sub(self.last_heartbeat_sent);
                    tracing::warn!(
                        silent_ms = self.last_heard.elapsed().as_millis() as u64,
                        last_heartbeat_sent_ms_ago = since_sent,
                        connected = self.conn.is_some(),
                        kept_before = self.kept_through_silence,
                        "the active is silent past dead_after"
                    );
                    if std::mem::replace(&mut self.kept_through_silence, true) {
                        self.drop_connection("the active stayed silent");
                    }
                    self.publish_report();
                    return Exit::ActiveDead;
                }
            }
            let now = Instant::now();
            if self.conn.is_none() && now < self.dial_after {
                self.publish_report();
                self.sleep(self.dial_after - now);
                continue;
            }
            if self.conn.is_none() && !self.connect() {
                self.publish_report();
                self.sleep(self.config.reconnect_delay);
                continue;
            }
            self.deliver_held();
            if !self.held.is_empty() {
                // The shards have not taken what already arrived, so this standby does not read: that
                // is its own back-pressure, not the active's silence (which counts again once it reads).
                self.grace();
            }
            self.send_acks();
            let polling_ring = self.conn.as_ref().is_some_and(|c| c.data_wants_poll());
            let timeout = if self.held.is_empty() && polling_ring && self.last_ring_data.elapsed() < RING_SPIN {
                // Data arrived in the ring a moment ago: more is likely; look again at once.
                Duration::ZERO
            } else if self.held.is_empty() && polling_ring {
                self.bell.prepare_sleep();
                self.send_acks();
                Duration::from_millis(1)
            } else if self.held.is_empty() {
                self.bell.prepare_sleep();
                self.send_acks();
                self.config.heartbeat_interval.min(Duration::from_millis(20))
            } else {
                Duration::from_millis(1)
            };
            self.stall.allow(timeout);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "replication poll failed");
                    return Exit::Stopped;
                }
            }
            self.bell.awake();
            if self.held.is_empty() {
                if let Err(reason) = self.read() {
                    self.drop_connection(&reason);
                    continue;
                }
            }
            if let Err(reason) = self.keep_alive() {
                self.drop_connection(&reason);
                continue;
            }
            if last_report.elapsed() >= Duration::from_millis(50) {
                last_report = Instant::now();
                self.publish_report();
            }
        }
    }

    fn sleep(&mut self, duration: Duration) {
        let mut events = Events::with_capacity(4);
        self.stall.allow(duration);
        let _ = self.poll.poll(&mut events, Some(duration));
    }

    /// Gives the active back the time this thread was kept from running since its last turn: it heard
    /// nothing then because it did not run, and a pause of the whole machine silenced the active too.
    /// Only what the active was granted is moved, never past now (an active silent before the pause is
    /// still judged on the silence it had).
    fn forgive_own_stall(&mut self) {
        let held = self.stall.held_off_past(STALL_WORTH_FORGIVING);
        if held < STALL_WORTH_FORGIVING {
            return;
        }
        self.counters.stalls_forgiven += 1;
        if held >= Duration::from_millis(50) {
            tracing::info!(held_off_ms = held.as_millis() as u64, "this standby was kept from running; the active's silence is counted without that time");
        }
        let now = Instant::now();
        self.last_heard = (self.last_heard + held).min(now);
        if let Some(conn) = self.conn.as_mut() {
            conn.last_heard = (conn.last_heard + held).min(now);
        }
    }

    /// Dials the next peer and sends the Hello. Returns whether a connection is up.
    fn connect(&mut self) -> bool {
        if self.config.peers.is_empty() {
            return false;
        }
        // What each shard applied must be final before it is presented: let the shards finish what the
        // last connection queued.
        if self.ports.iter().any(|port| !port.inbound.is_empty()) {
            return false;
        }
        let addr = self.config.peers[self.next_peer % self.config.peers.len()];
        self.next_peer += 1;
        self.counters.state = "connecting";
        // A dead peer's address may not answer at all: bound the attempt by what failover can wait.
        let patience = self.config.dead_after.map_or(self.config.peer_timeout, |d| d / 3).max(Duration::from_millis(20));
        self.stall.allow(patience);
        let stream = match std::net::TcpStream::connect_timeout(&addr, patience) {
            Ok(stream) => stream,
            Err(e) => {
                self.counters.last_error = format!("connect {addr}: {e}");
                tracing::debug!(%addr, error = %e, "cannot reach the active");
                return false;
            }
        };
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut link = TcpLink::new(TcpStream::from_std(stream), usize::MAX);
        if self.poll.registry().register(link.stream(), CONN, Interest::READABLE | Interest::WRITABLE).is_err() {
            return false;
        }
        self.counters.connects += 1;
        let shard_count = usize::from(self.config.shard_count);
        let applied: Vec<LogSeq> = self.ports.iter().map(|p| p.applied()).collect();
        let (handshake, hello) = StandbyHandshake::start(
            StandbyConfig {
                secret: self.config.secret.clone(),
                shard_count: self.config.shard_count,
                history: self.history,
                epoch: self.epoch,
                applied: applied.clone(),
            },
            Nonce::random(),
        );
        let out = link.out();
        let start = wire::begin(Kind::Handshake, out);
        hello.encode(out);
        wire::finish(out, start);
        tracing::info!(%addr, "connected to the active; handshaking");
        self.counters.state = "handshake";
        self.counters.active = addr.to_string();
        self.conn = Some(Connection {
            link,
            addr,
            reader: MessageReader::new(MAX_MESSAGE),
            data: DataPath::Control,
            ring_reader: MessageReader::new(MAX_MESSAGE),
            handshake: Some(handshake),
            received: applied,
            in_snapshot: vec![false; shard_count],
            awaiting_snapshot: vec![false; shard_count],
            acked: vec![LogSeq::ZERO; shard_count],
            last_heard: Instant::now(),
            last_heartbeat: Instant::now(),
        });
        true
    }

    fn drop_connection(&mut self, reason: &str) {
        if let Some(mut conn) = self.conn.take() {
            tracing::warn!(addr = %conn.addr, reason, "replication connection dropped");
            let _ = self.poll.registry().deregister(conn.link.stream());
            self.counters.last_error = reason.to_string();
        }
        self.counters.state = "connecting";
        // What was held for the shards came from that connection; the next one resends from what they
        // applied.
        self.held.clear();
    }

    /// Reads what arrived and dispatches it.
    fn read(&mut self) -> Result<(), String> {
        let mut budget = 8 * READ_CHUNK;
        loop {
            let Some(conn) = self.conn.as_mut() else { return Ok(()) };
            #[cfg_attr(not(feature = "rdma"), allow(unused_mut))]
            let mut n = match conn.link.receive(&mut conn.reader, READ_CHUNK) {
                Ok(n) => n,
                Err(LinkError::Closed) => return Err("closed by the active".into()),
                Err(e) => return Err(format!("read: {e}")),
            };
            #[cfg(feature = "rdma")]
            if let DataPath::Ring(source) = &mut conn.data {
                let from_ring = match source.receive(&mut conn.ring_reader, READ_CHUNK) {
                    Ok(n) => n,
                    Err(e) => {
                        self.counters.link_failures += 1;
                        return Err(format!("RDMA link: {e}"));
                    }
                };
                if from_ring > 0 {
                    self.last_ring_data = Instant::now();
                }
                n += from_ring;
            }
            if n == 0 {
                break;
            }
            conn.last_heard = Instant::now();
            self.last_heard = conn.last_heard;
            self.kept_through_silence = false;
            self.counters.bytes_received += n as u64;
            self.dispatch()?;
            if !self.held.is_empty() || self.handed_over.is_some() {
                break;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Handles every whole message buffered, until a shard's queue is full.
    fn dispatch(&mut self) -> Result<(), String> {
        // Nothing after an accepted handover is read: this standby is about to take over.
        while self.held.is_empty() && self.handed_over.is_none() {
            let Some(conn) = self.conn.as_mut() else { return Ok(()) };
            let action = match next_action(conn, &self.ports, From::Control)? {
                Some(action) => action,
                None => match next_action(conn, &self.ports, From::Ring)? {
                    Some(action) => action,
                    None => return Ok(()),
                },
            };
            match action {
                Action::RdmaAccept(accept) => self.rdma_accepted(&accept)?,
                Action::Handshake(message) => self.handshake(message)?,
                Action::Deliver(shard, inbound) => {
                    self.held.push_back((shard, inbound));
                    self.deliver_held();
                }
                Action::Heartbeat(epoch, sent) => {
                    self.epoch = self.epoch.max(epoch);
                    self.note_heartbeat(sent);
                }
                Action::Handover(epoch, through) => {
                    self.answer_handover(epoch, &through);
                    if self.handed_over.is_some() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps the active's clock of its last heartbeat, and logs one that took long to arrive: with the
    /// shipper's own log of its gaps, that tells a stalled active from a slow link when the standby
    /// finds the active silent (the two clocks are one on a test machine, NTP-close between appliances).
    fn note_heartbeat(&mut self, sent: u64) {
        self.last_heartbeat_sent = sent;
        let transit = unix_millis().saturating_sub(sent);
        if self.config.dead_after.is_some_and(|dead_after| u128::from(transit) * 2 > dead_after.as_millis()) {
            tracing::warn!(transit_ms = transit, "a heartbeat arrived late: the link (or the kernel under it) held it");
        }
    }

    /// Answers the active's handover at `through`: accepts when every shard received and applied
    /// exactly that much (then nothing more is read from this connection), refuses otherwise.
    fn answer_handover(&mut self, epoch: Epoch, through: &[LogSeq]) {
        // Whatever is still queued for the shards must be applied before the copy can be judged.
        let deadline = Instant::now() + Duration::from_millis(500);
        while (!self.held.is_empty() || self.ports.iter().any(|p| !p.inbound.is_empty())) && Instant::now() < deadline {
            self.deliver_held();
            self.stall.allow(Duration::from_millis(1));
            std::thread::sleep(Duration::from_millis(1));
        }
        let applied: Vec<LogSeq> = self.ports.iter().map(|p| p.applied()).collect();
        let Some(conn) = self.conn.as_mut() else { return };
        let verdict = if conn.in_snapshot.iter().any(|&s| s) || conn.awaiting_snapshot.iter().any(|&s| s) {
            Err("a shard is in a full sync".to_string())
        } else {
            crate::handover::standby_verdict(self.config.can_promote, &conn.received, &applied, through)
        };
        match &verdict {
            Ok(()) => tracing::warn!(addr = %conn.addr, %epoch, "the active hands over: taking over"),
            Err(reason) => tracing::warn!(addr = %conn.addr, %reason, "refusing the active's handover"),
        }
        wire::encode_handover_reply(verdict.is_ok(), verdict.as_ref().err().map_or("", String::as_str), conn.link.out());
        // The answer is a few bytes into an idle socket: it goes out at once.
        let _ = conn.link.flush();
        if verdict.is_ok() {
            self.epoch = self.epoch.max(epoch);
            self.handed_over = Some(conn.addr);
        }
    }

    fn handshake(&mut self, message: Handshake) -> Result<(), String> {
        let conn = self.conn.as_mut().expect("a connection");
        let handshake = conn.handshake.as_mut().expect("handshaking");
        let step = handshake.on_message(message);
        for reply in &step.send {
            let out = conn.link.out();
            let start = wire::begin(Kind::Handshake, out);
            reply.encode(out);
            wire::finish(out, start);
        }
        match step.outcome {
            None => Ok(()),
            Some(Outcome::Accepted { history, epoch, plan }) => {
                conn.handshake = None;
                self.followed = Some(conn.addr);
                if self.history != Some(history) {
                    tracing::info!(%history, %epoch, "following the active's history");
                }
                self.history = Some(history);
                self.epoch = epoch;
                self.kept_history = false;
                for port in &self.ports {
                    *port.following.lock().unwrap() = Some((history, epoch));
                }
                let full = plan.iter().filter(|s| matches!(s, ShardStart::FullSync)).count();
                for (shard, start) in plan.iter().enumerate() {
                    match *start {
                        ShardStart::Resume { after } => {
                            conn.received[shard] = after;
                            self.held.push_back((shard, Inbound::Resume { after }));
                        }
                        ShardStart::FullSync => {
                            // What the shard holds is no position in this stream (a restarted old active's
                            // may even be beyond the active's newest): nothing is acked until the snapshot.
                            conn.received[shard] = LogSeq::ZERO;
                            conn.awaiting_snapshot[shard] = true;
                        }
                    }
                }
                if full > 0 {
                    self.counters.full_syncs += 1;
                } else {
                    self.counters.partial_syncs += 1;
                }
                tracing::info!(addr = %conn.addr, full_sync_shards = full, "replication streaming");
                self.offer_ring()
            }
            Some(outcome) => {
                self.counters.refused += 1;
                let proven_epoch = handshake.proven_active_epoch();
                if self.synced_once
                    && self.config.can_promote
                    && self.config.dead_after.is_some()
                    && !self.kept_history
                    && self.history.is_some()
                    && proven_epoch == Some(self.epoch)
                    && matches!(outcome, Outcome::RefusedByPeer(RefuseReason::UnknownHistory { .. }))
                {
                    // Same reign, another history: the active restarted and lost what this standby
                    // holds. Following it would need a full sync from its empty log; take over instead.
                    tracing::warn!(addr = %conn.addr, epoch = %self.epoch,
                        "the active restarted within its reign with a new history: it lost the log this standby holds");
                    self.lost_its_log = Some(conn.addr);
                }
                if self.kept_history
                    && matches!(outcome, Outcome::RefusedByPeer(RefuseReason::UnknownHistory { .. }))
                {
                    // Contents kept from before (memory files, or this node's own reign as the active), of a
                    // history this active does not continue: not a mis-pointed standby's data to keep, a
                    // cache to refill.
                    tracing::warn!("the active does not know the kept contents' history: asking for a full sync");
                    self.history = None;
                    self.kept_history = false;
                }
                // A refusal (wrong secret, stale epoch, other shard count) does not change by itself
                // within milliseconds: ask again later, not in a tight loop.
                self.dial_after = Instant::now() + REFUSED_BACKOFF;
                let _ = conn.link.flush();
                Err(format!("handshake ended: {outcome:?}"))
            }
        }
    }

    /// With the RDMA transport, registers a ring for this connection and offers it to the active.
    fn offer_ring(&mut self) -> Result<(), String> {
        #[cfg(feature = "rdma")]
        if let (Some(device), Some(conn)) = (self.device.as_ref(), self.conn.as_mut()) {
            let layout = crate::ring::RingLayout::new(crate::rdma::link::SLOT_SIZE, crate::rdma::link::SLOT_COUNT).expect("a valid layout");
            let (ring, ring_id, offer) = crate::rdma::link::StandbyRing::offer(device, layout).map_err(|e| format!("cannot offer an RDMA ring: {e}"))?;
            wire::encode(Kind::RdmaOffer, &offer, conn.link.out());
            conn.data = DataPath::Offered(Box::new(ring), layout, ring_id);
        }
        Ok(())
    }

    /// The active connected to the offered ring: connect this end and tell it to start.
    fn rdma_accepted(&mut self, accept: &[u8]) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        match std::mem::replace(&mut conn.data, DataPath::Control) {
            #[cfg(feature = "rdma")]
            DataPath::Offered(mut ring, layout, ring_id) => {
                ring.connect(accept).map_err(|e| format!("cannot connect the RDMA ring: {e}"))?;
                wire::encode(Kind::RdmaReady, &[], conn.link.out());
                conn.data = DataPath::Ring(Box::new(crate::ring_link::RingSource::new(layout, ring_id, *ring)));
                tracing::info!(addr = %conn.addr, "RDMA link up: the active writes into this standby's ring");
                Ok(())
            }
            _ => {
                let _ = accept;
                Err("the active answered an RDMA offer that was not made".into())
            }
        }
    }

    /// Hands held messages to their shards, in order, until one's queue is full.
    fn deliver_held(&mut self) {
        let mut woken = 0u64;
        while let Some((shard, inbound)) = self.held.pop_front() {
            match self.ports[shard].inbound.push(inbound) {
                Ok(()) => {
                    if woken & (1 << (shard % 64)) == 0 {
                        woken |= 1 << (shard % 64);
                        self.wake.wake(shard);
                    }
                }
                Err(inbound) => {
                    self.held.push_front((shard, inbound));
                    self.wake.wake(shard);
                    return;
                }
            }
        }
    }

    /// Sends an ack for every shard whose applied position moved, and flushes output.
    fn send_acks(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        if conn.handshake.is_none() {
            for (shard, port) in self.ports.iter().enumerate() {
                let applied = port.applied();
                if applied > conn.acked[shard] && !conn.in_snapshot[shard] && applied <= conn.received[shard] {
                    conn.acked[shard] = applied;
                    wire::encode_ack(ShardId(shard as u16), applied, conn.link.out());
                }
            }
        }
        if let Err(e) = conn.link.flush() {
            let reason = format!("write: {e}");
            self.drop_connection(&reason);
        }
    }

    fn keep_alive(&mut self) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        if conn.last_heard.elapsed() > self.config.peer_timeout {
            return Err(format!("the active was silent for {:?}", conn.last_heard.elapsed()));
        }
        if conn.handshake.is_none() && conn.last_heartbeat.elapsed() >= self.config.heartbeat_interval {
            conn.last_heartbeat = Instant::now();
            wire::encode_heartbeat(self.epoch, unix_millis(), conn.link.out());
            conn.link.flush().map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }

    fn publish_report(&mut self) {
        let mut report = self.counters.clone();
        report.history = self.history;
        report.epoch = self.epoch;
        report.applied = self.ports.iter().map(|p| p.applied().0).collect();
        if let Some(conn) = self.conn.as_ref().filter(|c| c.handshake.is_none()) {
            report.state = if conn.in_snapshot.iter().any(|&s| s) { "full_sync" } else { "streaming" };
        }
        report.transport = self.config.transport.name();
        report.link = self.conn.as_ref().map_or_else(LinkStats::default, Connection::link_stats);
        report.last_heard_millis = self.conn.as_ref().map_or(0, |c| c.last_heard.elapsed().as_millis() as u64);
        *self.report.lock().unwrap() = report;
    }
}

impl Connection {
    fn data_wants_poll(&self) -> bool {
        match &self.data {
            #[cfg(feature = "rdma")]
            DataPath::Ring(source) => source.wants_poll(),
            _ => false,
        }
    }

    fn link_stats(&self) -> LinkStats {
        match &self.data {
            #[cfg(feature = "rdma")]
            DataPath::Ring(source) => source.stats(),
            _ => LinkStats::default(),
        }
    }
}

/// What one received message asks for.
enum Action {
    Handshake(Handshake),
    RdmaAccept(Vec<u8>),
    Deliver(usize, Inbound),
    /// The active's epoch and its clock when it sent the heartbeat (ms since the epoch).
    Heartbeat(Epoch, u64),
    Handover(Epoch, Vec<LogSeq>),
}

/// Which reader a message comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Control,
    Ring,
}

/// Decodes and checks the next buffered message of `from` against the connection's state.
fn next_action(conn: &mut Connection, ports: &[Arc<ShardPort>], from: From) -> Result<Option<Action>, String> {
    let control_carries_data = matches!(conn.data, DataPath::Control);
    let Connection { reader, ring_reader, handshake, received, in_snapshot, awaiting_snapshot, .. } = conn;
    let reader = match from {
        From::Control => reader,
        From::Ring => ring_reader,
    };
    let message = match reader.next_message() {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(e) if from == From::Ring => return Err(format!("bad bytes in the RDMA ring: {e}")),
        Err(e) => return Err(format!("bad bytes from the active: {e}")),
    };
    match from {
        From::Ring if !message.is_data() => return Err("a control message in the RDMA ring".into()),
        From::Control if message.is_data() && !control_carries_data => {
            return Err("a data message on the control connection of an RDMA link".into());
        }
        _ => {}
    }
    if handshake.is_some() {
        let Message::Handshake(body) = message else {
            return Err("the active streamed before the handshake ended".into());
        };
        return Ok(Some(Action::Handshake(Handshake::decode(body).map_err(|e| format!("bad handshake message: {e}"))?)));
    }
    let shard_index = |shard: ShardId| {
        if shard.index() < received.len() {
            Ok(shard.index())
        } else {
            Err(format!("message for unknown shard {}", shard.0))
        }
    };
    Ok(Some(match message {
        Message::Batch(frame) => {
            let shard = shard_index(frame.header.shard)?;
            if frame.header.first_seq != received[shard].next() {
                return Err(format!(
                    "shard {shard}: batch starts at {}, expected {}",
                    frame.header.first_seq,
                    received[shard].next()
                ));
            }
            received[shard] = frame.header.last_seq();
            let records = ports[shard].copy_of(frame.payload);
            Action::Deliver(shard, Inbound::Batch { first: frame.header.first_seq, count: frame.header.count, records })
        }
        Message::SnapshotBegin { shard, at } => {
            let shard = shard_index(shard)?;
            received[shard] = at;
            in_snapshot[shard] = true;
            Action::Deliver(shard, Inbound::SnapshotBegin { at })
        }
        Message::SnapshotItems { shard, records } => {
            let shard = shard_index(shard)?;
            if !in_snapshot[shard] {
                return Err(format!("snapshot items for shard {shard} outside a snapshot"));
            }
            Action::Deliver(shard, Inbound::SnapshotItems(ports[shard].copy_of(records)))
        }
        Message::SnapshotEnd { shard } => {
            let shard = shard_index(shard)?;
            if !std::mem::replace(&mut in_snapshot[shard], false) {
                return Err(format!("snapshot end for shard {shard} outside a snapshot"));
            }
            awaiting_snapshot[shard] = false;
            Action::Deliver(shard, Inbound::SnapshotEnd)
        }
        Message::Heartbeat { epoch, millis } => Action::Heartbeat(epoch, millis),
        Message::Handover { epoch, through } => Action::Handover(epoch, through),
        Message::RdmaAccept(accept) => Action::RdmaAccept(accept.to_vec()),
        Message::RdmaOffer(_) | Message::RdmaReady => return Err("the active sent a message out of turn".into()),
        Message::Ack { .. } | Message::Handshake(_) | Message::HandoverReply { .. } => return Err("the active sent a message out of turn".into()),
    }))
}

/// An active found by [`probe_for_active`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveFound {
    pub addr: SocketAddr,
    pub epoch: Epoch,
    /// The history it logs under.
    pub history: ReplicationId,
}

/// Asks each of `peers` in turn, with the full authenticated handshake, whether it is an active that
/// would accept this node as a standby; returns the first that does. A node configured as active calls
/// this at start: if another node already is the active (it took over while this one was away), this
/// one must not take the service address but follow it. Each attempt is bounded by `timeout`.
pub fn probe_for_active(peers: &[SocketAddr], secret: &[u8], shard_count: u16, epoch: Epoch, timeout: Duration) -> Option<ActiveFound> {
    peers.iter().find_map(|&addr| match probe_one(addr, secret, shard_count, epoch, timeout) {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "no active there");
            None
        }
    })
}

fn probe_one(addr: SocketAddr, secret: &[u8], shard_count: u16, epoch: Epoch, timeout: Duration) -> io::Result<Option<ActiveFound>> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let config = StandbyConfig { secret: secret.to_vec(), shard_count, history: None, epoch, applied: vec![LogSeq::ZERO; usize::from(shard_count)] };
    let (mut handshake, hello) = StandbyHandshake::start(config, Nonce::random());
    let mut out = Vec::new();
    let start = wire::begin(Kind::Handshake, &mut out);
    hello.encode(&mut out);
    wire::finish(&mut out, start);
    stream.write_all(&out)?;
    let mut reader = MessageReader::new(MAX_MESSAGE);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        reader.feed(&buf[..n]);
        while let Some(message) = reader.next_message().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            let Message::Handshake(body) = message else { return Ok(None) };
            let message = Handshake::decode(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let step = handshake.on_message(message);
            let mut out = Vec::new();
            for reply in &step.send {
                let start = wire::begin(Kind::Handshake, &mut out);
                reply.encode(&mut out);
                wire::finish(&mut out, start);
            }
            stream.write_all(&out)?;
            match step.outcome {
                None => {}
                Some(Outcome::Accepted { epoch, history, .. }) => return Ok(Some(ActiveFound { addr, epoch, history })),
                Some(_) => return Ok(None),
            }
        }
    }
}
