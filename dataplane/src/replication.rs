//! Replication inside the server: what each shard's core does for it, and the replication core's thread.
//!
//! The machinery lives in the `replica` crate (log ring, backlog, shipper, receiver, handshake, wire);
//! this module connects it to shards:
//! - [`LogSink`]: the store's [`ChangeSink`] on an active: every client change becomes a log record
//!   (absolute expiry, the resulting item for incr/decr/append/prepend/cas).
//! - [`ShardReplication`]: a worker's per-round duties. On an active: hand the round's records to the
//!   shipper, stream a snapshot slice when one is wanted, and tell which log position a client's reply
//!   must wait for in sync mode. On a standby: apply what the receiver queued, in order, and publish the
//!   applied position.
//! - [`Node`]: starts the shipper (active) or receiver (standby) on its own thread, pinned to a spare
//!   CPU when there is one, and reports for `stats replication`.
//! - [`NodeState`]: the node's role as its workers, its replication thread and the admin endpoint see
//!   it; role changes on demand (promote, demote, switchover) are in [`crate::roles`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;
use replica::log::{self, LogConfig, LogProducer};
use replica::port::{Bell, Inbound, ShardPort, SnapshotChunk, SnapshotPart, Wake, SNAPSHOT_CHUNK_BYTES};
use replica::receiver::{Receiver, ReceiverConfig, ReceiverReport};
use replica::shipper::{Mode, Shipper, ShipperConfig, ShipperReport};
use replica::wire;
use replica::{Epoch, LogSeq, Record, ReplicationId, ShardId as LogShard};

use crate::clock::{Clock, RelTime};
use crate::config::{FailoverSettings, ReplicationSettings, Role};
use crate::shard::Shard;
use crate::store::{ChangeSink, ItemRef, ItemView, MarkKind, ReplicationMark, ScanCursor};

/// Index slots a snapshot visits between checks of the chunk size.
const SCAN_SLOTS: usize = 4096;

/// The store's change sink on an active: encodes each change into the shard's log.
pub struct LogSink {
    producer: LogProducer,
    scratch: Vec<u8>,
}

impl LogSink {
    fn append(&mut self, record: &Record<'_>) {
        if let Err(e) = self.producer.append(record) {
            // Only a record the format cannot carry fails (keys are at most 250 bytes, values are
            // bounded by -I): say so loudly rather than silently skip.
            tracing::error!(error = %e, "a change could not be logged for replication");
        }
    }
}

/// A unix expiry for a stored one (0: never).
fn unix_expiry(exptime: RelTime) -> u64 {
    if exptime == 0 {
        0
    } else {
        Clock::global().to_unix(exptime)
    }
}

/// The item's value in one slice: borrowed when it is contiguous, else gathered into `scratch`.
fn whole_value<'a>(item: &'a ItemRef<'_>, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let mut chunks = item.value_chunks();
    let first = chunks.next().unwrap_or(&[]);
    if first.len() == item.value_len() {
        return first;
    }
    scratch.clear();
    scratch.extend_from_slice(first);
    chunks.for_each(|chunk| scratch.extend_from_slice(chunk));
    scratch
}

/// The SET record that recreates `item`.
fn set_record<'a>(item: &'a ItemRef<'_>, scratch: &'a mut Vec<u8>) -> Record<'a> {
    let value = whole_value(item, scratch);
    Record::Set { key: item.key(), flags: item.client_flags(), expiry: unix_expiry(item.exptime()), cas: item.cas(), value }
}

/// Encodes `item` as a SET record of `shard` at `seq` into `out`.
fn encode_item(item: &ItemRef<'_>, shard: LogShard, seq: LogSeq, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    if let Err(e) = set_record(item, scratch).encode(shard, seq, out) {
        tracing::error!(error = %e, "an item could not be encoded for replication");
    }
}

impl ChangeSink for LogSink {
    fn set(&mut self, item: &ItemRef<'_>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.append(&set_record(item, &mut scratch));
        if scratch.capacity() <= 1 << 20 {
            self.scratch = scratch;
        }
    }

    fn delete(&mut self, key: &[u8]) {
        self.append(&Record::Delete { key });
    }

    fn touch(&mut self, key: &[u8], exptime: RelTime) {
        self.append(&Record::Touch { key, expiry: unix_expiry(exptime) });
    }

    fn flush(&mut self) {
        let now = Clock::global().to_unix(Clock::global().now());
        self.append(&Record::Flush { at: now });
    }

    fn position(&self) -> u64 {
        self.producer.next_seq().0 - 1
    }

    fn end_round(&mut self) -> bool {
        let pending = self.producer.has_unflushed();
        self.producer.flush();
        pending
    }
}

/// A snapshot being streamed by an active's shard.
struct SnapshotTask {
    id: u64,
    cursor: ScanCursor,
    begun: bool,
}

/// One worker's share of replication.
pub struct ShardReplication {
    shard: LogShard,
    role: Role,
    mode: Mode,
    port: Arc<ShardPort>,
    /// Every shard's port (sync mode waits on other shards' acks for requests run there).
    ports: Arc<Vec<Arc<ShardPort>>>,
    bell: Arc<Bell>,
    snapshot: Option<SnapshotTask>,
    last_snapshot: u64,
    scratch: Vec<u8>,
    /// Standby: a snapshot of this shard is being applied.
    in_snapshot: bool,
    applied: LogSeq,
    /// Where this worker publishes its rounds and its log position.
    marks: Arc<WorkerMarks>,
    /// The history this shard's contents belong to: an active's own, or the stream a standby follows
    /// (recorded in the store's memory file with the position, see [`ShardReplication::record_position`]).
    history: Option<(ReplicationId, Epoch)>,
    /// Set by the replication core when this shard's restored contents cannot be resumed from.
    discard: Arc<AtomicBool>,
}

/// What each worker publishes once per round for a role change that must know every worker moved on
/// (a switchover's pause): rounds finished, and on an active the shard's newest log position.
pub struct WorkerMarks {
    rounds: Vec<AtomicU64>,
    logged: Vec<AtomicU64>,
}

impl WorkerMarks {
    fn new(shards: usize) -> WorkerMarks {
        WorkerMarks { rounds: (0..shards).map(|_| AtomicU64::new(0)).collect(), logged: (0..shards).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Rounds each worker has run through its replication duties.
    pub fn rounds(&self) -> Vec<u64> {
        self.rounds.iter().map(|r| r.load(Ordering::Acquire)).collect()
    }

    /// Each shard's newest log position, as its worker last published it (an active's).
    pub fn logged(&self) -> Vec<LogSeq> {
        self.logged.iter().map(|l| LogSeq(l.load(Ordering::Acquire))).collect()
    }
}

impl ShardReplication {
    /// Whether this shard follows an active (its changes come from the replication stream only).
    pub fn is_standby(&self) -> bool {
        self.role == Role::Standby
    }

    /// Whether client replies wait for the standby's ack.
    pub fn sync(&self) -> bool {
        self.role == Role::Active && self.mode == Mode::Sync
    }

    /// Whether work arrived that [`ShardReplication::round`] should do before this core sleeps: records
    /// to apply, or a snapshot wanted.
    pub fn has_inbound(&self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.port.inbound.is_empty() {
            return true;
        }
        let wanted = self.port.snapshot_wanted.load(Ordering::Acquire);
        let snapshot_due = self.snapshot.is_some() || (wanted > self.last_snapshot);
        snapshot_due && wanted != 0 && !self.port.snapshot.is_full()
    }

    /// Whether every record of `shard` up to `seq` is acknowledged as sync mode requires.
    pub fn acked(&self, shard: usize, seq: u64) -> bool {
        self.ports[shard].acked.load(std::sync::atomic::Ordering::Acquire) >= seq
    }

    /// Runs this round's replication duties; returns whether more work is waiting (do not sleep).
    pub fn round(&mut self, shard: &mut Shard) -> bool {
        let index = usize::from(self.shard.0);
        let more = match self.role {
            Role::Active => {
                let (handed, position) = match shard.store.change_sink() {
                    Some(sink) => (sink.end_round(), sink.position()),
                    None => (false, 0),
                };
                if handed {
                    self.bell.ring();
                }
                // Two relaxed-cost stores per round (not per request).
                self.marks.logged[index].store(position, Ordering::Release);
                // Every change of the round is logged: the memory file's position is exact again.
                self.record_position(shard, MarkKind::Logged, position);
                self.snapshot_step(shard)
            }
            Role::Standby => self.apply(shard),
        };
        self.marks.rounds[index].fetch_add(1, Ordering::AcqRel);
        more
    }

    /// Streams the next slice of a wanted snapshot. Returns whether there is more to do right away.
    fn snapshot_step(&mut self, shard: &mut Shard) -> bool {
        use std::sync::atomic::Ordering;
        let wanted = self.port.snapshot_wanted.load(Ordering::Acquire);
        if wanted == 0 {
            self.snapshot = None;
            return false;
        }
        if wanted > self.last_snapshot && self.snapshot.as_ref().is_none_or(|task| task.id != wanted) {
            tracing::info!(shard = self.shard.0, id = wanted, "streaming a snapshot for a standby");
            self.snapshot = Some(SnapshotTask { id: wanted, cursor: ScanCursor::default(), begun: false });
        }
        let Some(task) = self.snapshot.as_mut() else { return false };
        if self.port.snapshot.is_full() {
            // The shipper wakes this core when it takes a chunk.
            return false;
        }
        // Every record before this point is handed over before the chunk that reflects it.
        let sink = shard.store.change_sink().expect("an active's store has a log");
        sink.end_round();
        let at = LogSeq(sink.position());
        self.bell.ring();
        let part = if !task.begun {
            task.begun = true;
            SnapshotPart::Begin
        } else if task.cursor.done() {
            SnapshotPart::End
        } else {
            let mut out = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES + (64 << 10));
            let now = shard.now();
            let scratch = &mut self.scratch;
            let id = self.shard;
            while out.len() < SNAPSHOT_CHUNK_BYTES {
                let done = shard.store.scan(&mut task.cursor, SCAN_SLOTS, now, |item| encode_item(item, id, at, scratch, &mut out));
                if done {
                    break;
                }
            }
            SnapshotPart::Items(out)
        };
        let end = matches!(part, SnapshotPart::End);
        let id = task.id;
        if self.port.snapshot.push(SnapshotChunk { id, at, part }).is_err() {
            unreachable!("only this core pushes, and the queue had room");
        }
        if end {
            tracing::info!(shard = self.shard.0, id, "snapshot streamed");
            self.last_snapshot = id;
            self.snapshot = None;
            return false;
        }
        true
    }

    /// Records in the store's memory file (if it has one) where its contents stand: `seq` of this shard's
    /// history. An active calls it once every change is logged; a standby once the records are applied.
    fn record_position(&self, shard: &mut Shard, kind: MarkKind, seq: u64) {
        let mark = match self.history {
            Some((history, epoch)) if kind != MarkKind::None => ReplicationMark { kind, history: history.0, epoch: epoch.0, seq },
            _ => ReplicationMark::NONE,
        };
        shard.store.set_replication_mark(&mark);
    }

    /// Applies what the receiver queued; returns whether more may be waiting.
    fn apply(&mut self, shard: &mut Shard) -> bool {
        use std::sync::atomic::Ordering;
        if self.discard.swap(false, Ordering::AcqRel) {
            tracing::info!(shard = self.shard.0, "restored contents not resumable: shard emptied");
            shard.store.discard_restored();
        }
        let mut applied_any = false;
        let mut budget = 64;
        while budget > 0 {
            let Some(inbound) = self.port.inbound.pop() else { break };
            budget -= 1;
            applied_any = true;
            match inbound {
                Inbound::Batch { first, count, records } => {
                    for record in wire::snapshot_records(&records) {
                        apply_record(shard, &record);
                    }
                    self.port.recycle(records);
                    self.applied = LogSeq(first.0 + u64::from(count) - 1);
                }
                Inbound::Resume { after } => {
                    self.in_snapshot = false;
                    self.applied = after;
                    self.history = self.port.following();
                }
                Inbound::SnapshotBegin { at } => {
                    tracing::info!(shard = self.shard.0, at = at.0, "full sync: shard wiped, snapshot follows");
                    // No position until the snapshot is whole (before anything is wiped).
                    shard.store.set_replication_mark(&ReplicationMark::NONE);
                    self.history = self.port.following();
                    shard.store.clear();
                    self.in_snapshot = true;
                    self.applied = at;
                }
                Inbound::SnapshotItems(records) => {
                    for record in wire::snapshot_records(&records) {
                        apply_record(shard, &record);
                    }
                    self.port.recycle(records);
                }
                Inbound::SnapshotEnd => {
                    tracing::info!(shard = self.shard.0, applied = self.applied.0, "full sync of the shard complete");
                    self.in_snapshot = false;
                }
            }
        }
        if applied_any {
            // A half-applied snapshot is not a position anyone can resume from.
            let published = if self.in_snapshot { 0 } else { self.applied.0 };
            // After the records it covers were applied: a restart re-applies rather than skips.
            let kind = if self.in_snapshot { MarkKind::None } else { MarkKind::Applied };
            self.record_position(shard, kind, published);
            self.port.applied.store(published, Ordering::Release);
            self.bell.ring();
        }
        budget == 0
    }
}

/// Applies one replicated record to a standby's shard.
fn apply_record(shard: &mut Shard, record: &Record<'_>) {
    let now = shard.now();
    let clock = Clock::global();
    let expiry = |unix: u64| if unix == 0 { crate::clock::Expiry::Never } else { clock.expiry(unix.min(i64::MAX as u64) as i64, now) };
    match *record {
        Record::Set { key, flags, expiry: at, cas, value } => shard.store.apply_set(key, flags, expiry(at), cas, value, now),
        Record::Delete { key } => shard.store.apply_delete(key),
        Record::Touch { key, expiry: at } => shard.store.apply_touch(key, expiry(at), now),
        Record::Flush { .. } => shard.store.apply_flush(now),
    }
}

/// The replication core's report, for `stats replication`.
#[derive(Clone)]
pub enum Report {
    Active { history: ReplicationId, epoch: Epoch, report: Arc<Mutex<ShipperReport>> },
    Standby { report: Arc<Mutex<ReceiverReport>> },
}

/// A role change handed to one worker.
pub enum Handover {
    /// Promoted: the log the store now writes to, and the bell of the replication core that drains it;
    /// the new history and epoch.
    Active { sink: LogSink, bell: Arc<Bell>, mode: Mode, history: (ReplicationId, Epoch) },
    /// Stepped down: no more log; what arrives is applied, and the receiver's bell is rung. `applied`:
    /// where the shard's copy stands in the history the node presents (its own log's end after a
    /// planned step-down, so the new active can resume it; zero otherwise).
    Standby { bell: Arc<Bell>, applied: LogSeq },
}

/// What a node's workers and its replication thread share about the node's role.
pub struct NodeState {
    report: Mutex<Report>,
    /// Bumped on every role change; each worker compares it once per round.
    version: AtomicU64,
    writable: AtomicBool,
    handovers: Vec<Mutex<Option<Handover>>>,
    /// Role changes, with their reasons (the newest last).
    changes: Mutex<Vec<String>>,
    /// Why the last promotion was declined ([`NodeState::decline`]).
    last_declined: Mutex<Option<String>>,
    /// How to stop whatever the replication thread runs now.
    stopper: Mutex<(Arc<AtomicBool>, Arc<Bell>)>,
    stopping: AtomicBool,
    /// What the replication thread runs once its current runner returns (a node that stepped down).
    next: Mutex<Option<Runner>>,
    /// A switchover's pause: writes wait in their connections instead of being refused.
    writes_held: AtomicBool,
    /// An active restarted within its reign without its data holds writes (and leaves the service
    /// address alone) until it knows no standby holds that reign's data (see
    /// [`Promotion::hold_cold_restart`]); whoever clears it (opening for writes, or stepping down) acts.
    cold_hold: AtomicBool,
    /// Just after a switchover's step-down: a write closes its connection (it was never run; the client
    /// reconnects, to the new active) instead of being refused.
    writes_closed: AtomicBool,
    pub(crate) marks: Arc<WorkerMarks>,
    /// Role changes by kind, for `stats replication`.
    pub(crate) counts: RoleCounts,
    /// Handles to whatever the replication thread runs now, for role changes on demand.
    pub(crate) control: Mutex<Control>,
    /// What a role change needs (with failover settings only).
    pub(crate) promotion: Option<Promotion>,
    /// One role change on demand at a time.
    pub(crate) changing: Mutex<()>,
    /// Bumped when an active steps down: a step-down acts only on the reign it was decided in.
    pub(crate) reign: AtomicU64,
    /// What each shard's store restored from its memory file.
    restore: RestoreBoard,
}

/// What each worker's store restored from its memory file, reported once at start; a standby's
/// replication core waits for every shard's report before it presents its position to an active.
struct RestoreBoard {
    /// Per shard: `None` until reported, then the mark restored (`Some(None)`: nothing restored).
    reports: Mutex<Vec<Option<Option<ReplicationMark>>>>,
    reported: std::sync::Condvar,
    /// Per shard: set when its restored contents cannot be resumed from (the shard empties them).
    discard: Vec<Arc<AtomicBool>>,
}

impl RestoreBoard {
    fn new(shards: usize) -> RestoreBoard {
        RestoreBoard {
            reports: Mutex::new(vec![None; shards]),
            reported: std::sync::Condvar::new(),
            discard: (0..shards).map(|_| Arc::new(AtomicBool::new(false))).collect(),
        }
    }

    /// Every shard's report, once all are in; `None` if the node stops first.
    fn wait(&self, stopping: &AtomicBool) -> Option<Vec<Option<ReplicationMark>>> {
        let mut reports = self.reports.lock().unwrap();
        loop {
            if reports.iter().all(Option::is_some) {
                return Some(reports.iter().map(|r| r.flatten()).collect());
            }
            if stopping.load(Ordering::SeqCst) {
                return None;
            }
            reports = self.reported.wait_timeout(reports, std::time::Duration::from_millis(100)).unwrap().0;
        }
    }
}

/// Role changes by kind, for `stats replication`.
#[derive(Default)]
pub struct RoleCounts {
    pub promotions: AtomicU64,
    pub step_downs: AtomicU64,
    pub switchovers: AtomicU64,
    pub switchovers_aborted: AtomicU64,
    /// Silences of the active that did not make this standby promote (the witness did not answer, or
    /// the service address was still served): not role changes, but what an operator watches for.
    pub promotions_declined: AtomicU64,
}

/// Handles into the runner of the replication thread.
#[derive(Default)]
pub(crate) struct Control {
    /// An active's shipper: where a handover is requested, and its bell.
    pub handover: Option<(Arc<replica::handover::HandoverSlot>, Arc<Bell>)>,
    /// A standby's receiver: set to promote it now, and its bell.
    pub promote: Option<(Arc<AtomicBool>, Arc<Bell>)>,
}

impl NodeState {
    /// The replication report, for `stats replication`.
    pub fn report(&self) -> Report {
        self.report.lock().unwrap().clone()
    }

    /// Role changes so far, oldest first, each with its reason.
    pub fn changes(&self) -> Vec<String> {
        self.changes.lock().unwrap().clone()
    }

    /// The role version a worker last acted on is `seen`: returns the new version if it changed.
    pub fn changed_since(&self, seen: u64) -> Option<u64> {
        let now = self.version.load(Ordering::Acquire);
        (now != seen).then_some(now)
    }

    /// Whether clients may write now.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Whether writes are paused (a switchover): a worker keeps them in their connections, unanswered,
    /// instead of refusing them, until the pause ends.
    pub fn writes_held(&self) -> bool {
        self.writes_held.load(Ordering::Acquire)
    }

    /// Whether a write closes its connection instead of being refused (see `writes_closed`).
    pub fn writes_closed(&self) -> bool {
        self.writes_closed.load(Ordering::Acquire)
    }

    /// Pauses client writes (`hold`: workers keep them unanswered in their connections) or ends the
    /// pause (writes are taken again), and wakes every worker to see it.
    pub(crate) fn hold_writes(&self, hold: bool, wake: &dyn Wake) {
        self.writes_held.store(hold, Ordering::SeqCst);
        self.writable.store(!hold, Ordering::SeqCst);
        self.version.fetch_add(1, Ordering::SeqCst);
        wake.wake(0);
    }

    /// Takes the role change waiting for `worker`, if any.
    pub fn take_handover(&self, worker: usize) -> Option<Handover> {
        self.handovers[worker].lock().unwrap().take()
    }

    /// A worker's report of what its store restored from a memory file (`None`: nothing), once, at start.
    pub fn report_restored(&self, shard: usize, mark: Option<ReplicationMark>) {
        self.restore.reports.lock().unwrap()[shard] = Some(mark);
        self.restore.reported.notify_all();
    }

    /// Records a standby's decision not to promote on its active's silence, with its reason: counted,
    /// the newest kept for `stats replication`, and logged when `first` in a run of them (a cut
    /// replication link declines every `dead_after` until it returns).
    pub fn decline(&self, reason: String, first: bool) {
        if first {
            tracing::warn!(%reason, "promotion declined");
        }
        self.counts.promotions_declined.fetch_add(1, Ordering::Relaxed);
        *self.last_declined.lock().unwrap() = Some(reason);
    }

    /// The reason of the last declined promotion.
    pub fn last_declined(&self) -> Option<String> {
        self.last_declined.lock().unwrap().clone()
    }

    /// Records a role change or role event with its reason (logged, and listed by `stats replication`).
    pub fn note(&self, reason: String) {
        tracing::warn!(%reason, "role change");
        self.changes.lock().unwrap().push(reason);
    }
}

impl Handover {
    /// Switches `shard` and its `replication` duties to the handover's role.
    pub fn install(self, shard: &mut Shard, replication: &mut ShardReplication) {
        replication.in_snapshot = false;
        replication.snapshot = None;
        match self {
            Handover::Active { sink, bell, mode, history } => {
                replication.history = Some(history);
                replication.role = Role::Active;
                replication.mode = mode;
                replication.bell = bell;
                shard.store.set_change_sink(Box::new(sink));
            }
            Handover::Standby { bell, applied } => {
                replication.role = Role::Standby;
                replication.bell = bell;
                replication.applied = applied;
                replication.port.applied.store(applied.0, Ordering::Release);
                shard.store.clear_change_sink();
            }
        }
    }
}

/// This node's replication: the thread and what the workers need.
pub struct Node {
    pub state: Arc<NodeState>,
    thread: Option<JoinHandle<()>>,
}

/// What [`Node::start`] hands each worker: its replication duties and, on an active, its store's sink.
pub struct WorkerSide {
    pub replication: ShardReplication,
    pub sink: Option<LogSink>,
}

/// Everything the replication thread needs to ship as an active (at start, or after a promotion).
struct ActiveStart {
    settings: ReplicationSettings,
    ports: Arc<Vec<Arc<ShardPort>>>,
    wake: Arc<dyn Wake>,
    history: ReplicationId,
    epoch: Epoch,
    previous: Option<replica::handshake::PreviousHistory>,
    /// Per shard, the last sequence number before the new log.
    start: Vec<LogSeq>,
}

impl ActiveStart {
    /// Binds the shipper and makes the shards' logs. Returns the shipper, its handle, and one sink per
    /// shard.
    fn build(self) -> anyhow::Result<(Shipper, replica::shipper::ShipperHandle, Vec<LogSink>)> {
        let settings = &self.settings;
        let shards = self.ports.len();
        let config = LogConfig { backlog_bytes: 0, ..LogConfig::default() };
        let (producers, consumers): (Vec<_>, Vec<_>) =
            (0..shards).map(|s| log::channel(LogShard(s as u16), self.start[s], config.clone())).unzip();
        let listen = settings.listen.context("no replication.listen to ship from")?;
        let shipper_config = ShipperConfig {
            listen,
            secret: settings.secret.clone(),
            history: self.history,
            epoch: self.epoch,
            previous: self.previous,
            start: self.start,
            mode: settings.mode,
            ack: settings.ack,
            backlog_bytes: settings.backlog_bytes / shards.max(1),
            heartbeat_interval: settings.heartbeat,
            peer_timeout: settings.peer_timeout,
            async_batch: settings.async_batch,
            transport: settings.transport.clone(),
        };
        let (shipper, handle) = Shipper::new(shipper_config, consumers, self.ports.to_vec(), self.wake)
            .with_context(|| format!("cannot ship to standbys (listening on {listen}, transport {})", settings.transport.name()))?;
        tracing::info!(listen = %handle.listen, history = %self.history, epoch = %self.epoch, mode = ?settings.mode, "replication: active, shipping to standbys");
        let sinks = producers.into_iter().map(|producer| LogSink { producer, scratch: Vec::new() }).collect();
        Ok((shipper, handle, sinks))
    }
}

impl Node {
    /// Starts the replication core for `shards` shards. `wake` wakes a shard's worker.
    pub fn start(
        settings: &ReplicationSettings,
        failover: Option<&FailoverSettings>,
        shards: usize,
        wake: Arc<dyn Wake>,
        cpu: Option<usize>,
    ) -> anyhow::Result<(Node, Vec<WorkerSide>)> {
        let ports: Arc<Vec<Arc<ShardPort>>> = Arc::new((0..shards).map(|_| Arc::new(ShardPort::default())).collect());
        // With failover: what a role change needs, the epoch file included.
        let context = failover
            .map(|f| -> anyhow::Result<Promotion> {
                Ok(Promotion {
                    settings: settings.clone(),
                    failover: f.clone(),
                    ports: ports.clone(),
                    wake: wake.clone(),
                    epochs: crate::failover::EpochFile::new(&f.state_dir)?,
                })
            })
            .transpose()?;
        let persisted = context.as_ref().map_or(Ok(Epoch(0)), |c| c.epochs.load())?;
        // This node was the active of a reign when it stopped: a crash restarted by systemd, or an
        // operator's restart. A standby may hold that reign's data, which this process lost.
        let restarted_active = settings.role == Role::Active
            && !settings.peers.is_empty()
            && settings.dead_after.is_some()
            && context.as_ref().and_then(|c| c.epochs.load_state().ok()).is_some_and(|(epoch, role)| {
                epoch.0 >= 1 && role == Some(crate::failover::StoredRole::Active)
            });
        let mut control = Control::default();
        let (report, sinks, bell, stop, runner) = match settings.role {
            Role::Active => {
                // An active starting anew begins a reign no lower than any it knows of.
                let epoch = Epoch(persisted.0.max(1));
                if let Some(context) = &context {
                    context.epochs.store(epoch, crate::failover::StoredRole::Active)?;
                }
                let history = ReplicationId::random();
                let start = ActiveStart {
                    settings: settings.clone(),
                    ports: ports.clone(),
                    wake,
                    history,
                    epoch,
                    previous: None,
                    start: vec![LogSeq::ZERO; shards],
                };
                let (shipper, handle, sinks) = start.build()?;
                control.handover = Some((handle.handover.clone(), handle.bell.clone()));
                let report = Report::Active { history, epoch, report: handle.report.clone() };
                (report, sinks.into_iter().map(Some).collect::<Vec<_>>(), handle.bell.clone(), handle.stop.clone(), Runner::Ship(Box::new(shipper)))
            }
            Role::Standby => {
                let receiver_config = ReceiverConfig {
                    peers: settings.peers.clone(),
                    secret: settings.secret.clone(),
                    shard_count: shards as u16,
                    heartbeat_interval: settings.heartbeat,
                    peer_timeout: settings.peer_timeout,
                    reconnect_delay: std::time::Duration::from_millis(if failover.is_some() { 20 } else { 200 }),
                    dead_after: failover.and(settings.dead_after),
                    can_promote: failover.is_some(),
                    transport: settings.transport.clone(),
                };
                let (receiver, handle) = Receiver::new(receiver_config, ports.to_vec(), wake.clone())?;
                control.promote = Some((handle.promote.clone(), handle.bell.clone()));
                let mut receiver = receiver;
                receiver.set_epoch(persisted);
                tracing::info!(peers = ?settings.peers, "replication: standby, read-only, following the active");
                let report = Report::Standby { report: handle.report.clone() };
                let promotion = context.clone().map(Box::new);
                (report, (0..shards).map(|_| None).collect(), handle.bell.clone(), handle.stop.clone(), Runner::Follow(Box::new(receiver), promotion))
            }
        };
        let state = Arc::new(NodeState {
            report: Mutex::new(report),
            version: AtomicU64::new(0),
            writable: AtomicBool::new(settings.role == Role::Active),
            handovers: (0..shards).map(|_| Mutex::new(None)).collect(),
            changes: Mutex::new(Vec::new()),
            last_declined: Mutex::new(None),
            stopper: Mutex::new((stop, bell.clone())),
            stopping: AtomicBool::new(false),
            next: Mutex::new(None),
            writes_held: AtomicBool::new(false),
            cold_hold: AtomicBool::new(false),
            writes_closed: AtomicBool::new(false),
            marks: Arc::new(WorkerMarks::new(shards)),
            counts: RoleCounts::default(),
            control: Mutex::new(control),
            promotion: context.clone(),
            changing: Mutex::new(()),
            reign: AtomicU64::new(0),
            restore: RestoreBoard::new(shards),
        });
        let own_history = match state.report() {
            Report::Active { history, epoch, .. } => Some((history, epoch)),
            Report::Standby { .. } => None,
        };
        if let (Role::Active, Some(context)) = (settings.role, context) {
            if restarted_active {
                context.hold_cold_restart(&state, Epoch(persisted.0.max(1)));
            }
            context.watch_for_a_newer_active(state.clone(), Epoch(persisted.0.max(1)));
        }
        let thread_state = state.clone();
        let thread_ports = ports.clone();
        let thread = spawn("tandem-repl", cpu, move || {
            let mut runner = runner;
            if let Runner::Follow(receiver, _) = &mut runner {
                offer_restored(receiver, &thread_state, &thread_ports);
            }
            drive(runner, &thread_state)
        })?;
        let sides = sinks
            .into_iter()
            .enumerate()
            .map(|(s, sink)| WorkerSide {
                replication: ShardReplication {
                    shard: LogShard(s as u16),
                    role: settings.role,
                    mode: settings.mode,
                    port: ports[s].clone(),
                    ports: ports.clone(),
                    bell: bell.clone(),
                    snapshot: None,
                    last_snapshot: 0,
                    scratch: Vec::new(),
                    in_snapshot: false,
                    applied: LogSeq::ZERO,
                    marks: state.marks.clone(),
                    history: own_history,
                    discard: state.restore.discard[s].clone(),
                },
                sink,
            })
            .collect();
        Ok((Node { state, thread: Some(thread) }, sides))
    }

    /// Stops the replication thread and waits for it.
    pub fn stop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        let (stop, bell) = self.state.stopper.lock().unwrap().clone();
        stop.store(true, Ordering::SeqCst);
        bell.ring_always();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A standby starting on restored stores presents their position: the history most shards' contents
/// belong to, and per shard the sequence number its contents reached in it. A shard whose contents are
/// not at a usable position in that history (a full sync was under way, it was an active killed between
/// a change and its logging, or another history) is emptied first and presents zero, so whatever the
/// active decides (a full sync, or the whole log from its start) starts from nothing.
fn offer_restored(receiver: &mut Receiver, state: &NodeState, ports: &[Arc<ShardPort>]) {
    let Some(marks) = state.restore.wait(&state.stopping) else { return };
    if marks.iter().all(Option::is_none) {
        return;
    }
    let mut counts: Vec<([u8; 20], usize)> = Vec::new();
    for mark in marks.iter().flatten().filter(|m| m.usable()) {
        match counts.iter_mut().find(|(history, _)| *history == mark.history) {
            Some((_, count)) => *count += 1,
            None => counts.push((mark.history, 1)),
        }
    }
    let chosen = counts.iter().max_by_key(|(_, count)| *count).map(|(history, _)| *history);
    let (_, mut epoch, _) = receiver.position();
    let mut offered = Vec::new();
    for (shard, mark) in marks.iter().enumerate() {
        let Some(mark) = mark else { continue };
        if mark.usable() && Some(mark.history) == chosen {
            ports[shard].applied.store(mark.seq, Ordering::Release);
            epoch = epoch.max(Epoch(mark.epoch));
            offered.push((shard, mark.seq));
            continue;
        }
        let why = match mark.kind {
            MarkKind::None => "no replication position (never replicated, or a full sync was under way)",
            MarkKind::ActiveChanging => "it was an active killed before its last changes were logged: it may hold writes no standby received",
            _ => "its position is in another history than the other shards'",
        };
        tracing::warn!(shard, why, "restored shard cannot resume: emptied, it takes a full sync");
        state.restore.discard[shard].store(true, Ordering::Release);
    }
    if let Some(history) = chosen {
        let history = ReplicationId(history);
        tracing::info!(%history, %epoch, ?offered, "restored from memory files: offering to resume");
        receiver.offer_kept_history(history);
        receiver.set_epoch(epoch);
    }
}

/// Runs the replication thread's runners one after another: a standby that is promoted goes on as the
/// shipper; an active that steps down goes on as a receiver.
fn drive(mut runner: Runner, state: &Arc<NodeState>) {
    loop {
        runner = match runner {
            Runner::Ship(mut shipper) => {
                shipper.run();
                match state.next.lock().unwrap().take() {
                    Some(next) => next,
                    None => return,
                }
            }
            Runner::Follow(mut receiver, promotion) => {
                let mut refused_once = false;
                // After the witness failed to answer, it must answer at two checks a dead_after apart,
                // with the active still silent in between, before this standby promotes: a standby whose
                // own link just came back first gets the time to hear from its active again.
                let mut answered_before = true;
                // A silent active that still serves the service address is noted once while following.
                let mut served_noted = false;
                let why = loop {
                    use replica::receiver::Exit;
                    let why = match receiver.run() {
                        Exit::Stopped => return,
                        Exit::ActiveDead => "the active was silent past dead_after".to_string(),
                        Exit::HandedOver { from } => format!("switchover: the active {from} handed over"),
                        Exit::PromoteRequested => "asked by tandemctl promote".to_string(),
                        // The active answers (it only restarted): neither the witness nor its silence
                        // need checking. It steps down when it meets this node's newer epoch.
                        Exit::ActiveLostItsLog { from } => {
                            format!("the active {from} restarted within its reign without its log; this standby holds it")
                        }
                    };
                    let Some(promotion) = promotion.as_ref() else {
                        // Without failover settings there is nothing to promote with: keep following.
                        tracing::warn!(%why, "cannot promote without a [failover] table; staying standby");
                        continue;
                    };
                    if why.starts_with("the active was silent") {
                        let answers = promotion.witness_answers(state, &mut refused_once);
                        if !(answers && answered_before) {
                            answered_before = answers;
                            receiver.grace();
                            continue;
                        }
                        // Only the replication link may have failed: one owner of the service address.
                        if crate::failover_guard::active_still_serves(&promotion.failover, promotion.settings.dead_after, state, &mut served_noted) {
                            receiver.grace();
                            continue;
                        }
                        // The active is taken for dead from here on: whatever this standby does next, it
                        // does not wait on that connection.
                        receiver.disconnect("the active is dead");
                        // Several standbys heard the same silence: one of them takes over.
                        if let Some(found) = promotion.another_standby_took_over(&receiver) {
                            tracing::info!(active = %found.addr, epoch = %found.epoch, "another standby took over first: following it");
                            receiver.grace();
                            continue;
                        }
                    }
                    break why;
                };
                let Some(promotion) = promotion else { return };
                match promotion.run(&mut receiver, state, &why) {
                    Some(shipper) => Runner::Ship(shipper),
                    None => return,
                }
            }
        }
    }
}

/// How long a node that handed over closes the connections of writes instead of refusing them.
const CLOSE_WRITES_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// How a node steps down ([`Promotion::step_down`]).
pub(crate) struct StepDown {
    /// The epoch the receiver presents (and stores, with `persist`).
    pub epoch: Epoch,
    pub persist: bool,
    /// This node's history and each shard's last position in it, to resume from.
    pub resume: Option<(ReplicationId, Vec<LogSeq>)>,
    /// Its copy is complete: it may take over again if no active shows up (see
    /// [`Receiver::assume_synced`]).
    pub assume_synced: bool,
    /// Writes held by a pause are let go by closing their connections (for [`CLOSE_WRITES_FOR`]),
    /// while this node still holds the service address, so their clients reconnect to the new active.
    pub close_held: bool,
    /// The role change's reason, for the log.
    pub why: String,
}

/// What the replication thread runs.
enum Runner {
    /// An active's shipper.
    Ship(Box<Shipper>),
    /// A standby's receiver, and what it does if its active dies (with failover configured).
    Follow(Box<Receiver>, Option<Box<Promotion>>),
}

/// What a node with failover needs to change role: take over when its active dies, or step down
/// when it meets an active of a higher epoch.
#[derive(Clone)]
pub(crate) struct Promotion {
    pub(crate) settings: ReplicationSettings,
    pub(crate) failover: FailoverSettings,
    ports: Arc<Vec<Arc<ShardPort>>>,
    pub(crate) wake: Arc<dyn Wake>,
    pub(crate) epochs: crate::failover::EpochFile,
}

impl Promotion {
    /// Shards of this node.
    pub(crate) fn shard_count(&self) -> u16 {
        self.ports.len() as u16
    }

    /// With several standbys, all of them hear the active fall silent at once, and if each promoted
    /// there would be two actives of the same epoch. They go in the order of their replication
    /// addresses (`listen`), lowest first: the first promotes at once; each later one waits half a
    /// `dead_after` per place in that order and then asks the other peers (not the silent active)
    /// whether one of them already is the active of a newer epoch, which it then follows. A pair (one
    /// standby) promotes at once. Two that still promote together (a standby that did not hear of the
    /// first's reign in time) meet at the same epoch, and the one with the lower history steps down
    /// ([`Promotion::watch_for_a_newer_active`]).
    fn another_standby_took_over(&self, receiver: &Receiver) -> Option<replica::receiver::ActiveFound> {
        let silent = receiver.followed();
        let others: Vec<std::net::SocketAddr> = self.settings.peers.iter().copied().filter(|&peer| Some(peer) != silent).collect();
        let own = self.settings.listen?;
        let place = others.iter().filter(|&&other| other < own).count() as u32;
        if place == 0 {
            return None;
        }
        let step = self.settings.dead_after.unwrap_or(std::time::Duration::from_millis(150)) / 2;
        std::thread::sleep(step * place);
        let (_, epoch, _) = receiver.position();
        let patience = self.settings.dead_after.unwrap_or(std::time::Duration::from_millis(150));
        replica::receiver::probe_for_active(&others, &self.settings.secret, self.shard_count(), epoch, patience).filter(|found| found.epoch > epoch)
    }

    /// Takes over: a new epoch on disk first, then writes allowed with every change logged, then the
    /// service address claimed and announced; then ships to whatever standbys connect.
    fn run(self, receiver: &mut Receiver, state: &Arc<NodeState>, why: &str) -> Option<Box<Shipper>> {
        let started = std::time::Instant::now();
        // Let the shards apply everything already received: the new log continues from there.
        let deadline = started + std::time::Duration::from_secs(1);
        while self.ports.iter().any(|p| !p.inbound.is_empty()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (history, epoch, applied) = receiver.position();
        let known = self.epochs.load().unwrap_or(Epoch(0));
        let epoch = Epoch(epoch.0.max(known.0) + 1);
        if let Err(e) = self.epochs.store(epoch, crate::failover::StoredRole::Active) {
            // Acting on an epoch that is not on disk could let two nodes claim the same reign.
            tracing::error!(error = %e, "cannot persist the new epoch: not promoting");
            return None;
        }
        // The address first, writes held meanwhile (not refused): by the time a peer can see this node
        // as the active (its shipper listens), clients have been told where the address is. A switchover's
        // old active waits for that before it lets its clients go.
        state.hold_writes(true, &*self.wake);
        let claimed = crate::failover::take_service_address(&self.failover);
        let new_history = ReplicationId::random();
        let previous = history.map(|history| replica::handshake::PreviousHistory { history, until: applied.clone() });
        let start = ActiveStart {
            settings: self.settings.clone(),
            ports: self.ports.clone(),
            wake: self.wake.clone(),
            history: new_history,
            epoch,
            previous,
            start: applied,
        };
        let built = if self.settings.listen.is_some() { Some(start.build()) } else { None };
        let (shipper, sinks, bell, report, stopper) = match built {
            Some(Ok((shipper, handle, sinks))) => {
                let report = Report::Active { history: new_history, epoch, report: handle.report.clone() };
                state.control.lock().unwrap().handover = Some((handle.handover.clone(), handle.bell.clone()));
                (Some(shipper), sinks, handle.bell.clone(), report, Some((handle.stop.clone(), handle.bell)))
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "promoted, but cannot ship to standbys");
                self.promote_without_shipping(state, epoch, started, why, claimed);
                return None;
            }
            None => {
                self.promote_without_shipping(state, epoch, started, why, claimed);
                return None;
            }
        };
        state.control.lock().unwrap().promote = None;
        for (worker, sink) in sinks.into_iter().enumerate() {
            let history = (new_history, epoch);
            *state.handovers[worker].lock().unwrap() = Some(Handover::Active { sink, bell: bell.clone(), mode: self.settings.mode, history });
        }
        *state.report.lock().unwrap() = report;
        if let Some(stopper) = stopper {
            *state.stopper.lock().unwrap() = stopper;
        }
        self.open_for_writes(state, epoch, started, why, claimed);
        self.clone().watch_for_a_newer_active(state.clone(), epoch);
        shipper.filter(|_| !state.stopping.load(Ordering::SeqCst)).map(Box::new)
    }

    /// Promotion for a node with no `replication.listen`: it serves writes and ships to nobody.
    fn promote_without_shipping(&self, state: &NodeState, epoch: Epoch, started: std::time::Instant, why: &str, claimed: Result<(), String>) {
        tracing::warn!("no replication.listen: the promoted node ships to no standby");
        state.control.lock().unwrap().promote = None;
        self.open_for_writes(state, epoch, started, why, claimed);
        while !state.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Whether a standby whose active went silent may promote: always without a witness; with one, only
    /// while it answers (an isolated standby cannot tell a dead active from its own isolation).
    fn witness_answers(&self, state: &NodeState, refused_once: &mut bool) -> bool {
        let Some(witness) = self.failover.witness else { return true };
        match crate::net::witness::answers(witness, 3, std::time::Duration::from_millis(30)) {
            Ok(true) => true,
            outcome => {
                let why = match outcome {
                    Err(e) => format!("cannot ask it: {e}"),
                    _ => "no answer".to_string(),
                };
                let first = !std::mem::replace(refused_once, true);
                state.decline(format!("not promoting: the active is silent but so is the witness {witness} ({why}); staying standby"), first);
                false
            }
        }
    }

    /// An active restarted within its reign (its state directory says it was the active at `epoch`)
    /// comes back without that reign's data, and its standby, which has it, takes over as soon as it
    /// meets this node's new history (`Exit::ActiveLostItsLog` on the standby). Until then this node
    /// must not take writes (they would be lost when it steps down) nor the service address (clients
    /// would be sent to an empty cache). So it holds writes and leaves the address alone until one of:
    /// - it meets an active of a newer epoch ([`Promotion::watch_for_a_newer_active`], which looks every
    ///   25 ms meanwhile): it steps down, the held writes' connections are closed and their clients
    ///   reconnect to the new active;
    /// - a standby accepted its history (that standby held nothing newer; it takes a sync): it claims
    ///   the address and opens;
    /// - twice `dead_after` (at least a second) passes without either (no standby answers): the same.
    fn hold_cold_restart(&self, state: &Arc<NodeState>, epoch: Epoch) {
        let grace = (self.settings.dead_after.unwrap_or_default() * 2).max(std::time::Duration::from_secs(1));
        state.cold_hold.store(true, Ordering::SeqCst);
        state.hold_writes(true, &*self.wake);
        // A crash without the stop hook leaves the address on the interface, answering ARP for it.
        let removed = match crate::failover::release_service_address(&self.failover) {
            Ok(crate::net::takeover::Released::Removed) => "; the service address the crash left here removed",
            Ok(_) => "",
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the service address on a cold restart");
                ""
            }
        };
        state.note(format!(
            "restarted as the active at {epoch} without its data: writes held and the service address left alone until no standby \
             holds newer data (at most {} ms){removed}",
            grace.as_millis()
        ));
        let reign = state.reign.load(Ordering::SeqCst);
        let (state, promotion) = (state.clone(), self.clone());
        let spawned = std::thread::Builder::new().name("tandem-cold".into()).spawn(move || {
            let started = std::time::Instant::now();
            let why = loop {
                std::thread::sleep(std::time::Duration::from_millis(10));
                if state.stopping.load(Ordering::SeqCst) || state.reign.load(Ordering::SeqCst) != reign {
                    return;
                }
                let accepted = match state.report() {
                    Report::Active { report, .. } => report.lock().unwrap().peers.iter().find(|p| p.state != "handshake").map(|p| p.addr.clone()),
                    Report::Standby { .. } => return,
                };
                if let Some(standby) = accepted {
                    break format!("the standby {standby} accepted this node's history");
                }
                if started.elapsed() >= grace {
                    break format!("no standby holds newer data after {} ms", grace.as_millis());
                }
            };
            if !state.cold_hold.swap(false, Ordering::SeqCst) {
                return; // it stepped down meanwhile
            }
            let claimed = crate::failover::take_service_address(&promotion.failover);
            state.hold_writes(false, &*promotion.wake);
            state.note(format!(
                "opened for writes at {epoch}: {why}; service address {}/{} {}",
                promotion.failover.service_ip,
                promotion.failover.prefix_len,
                claimed.map_or_else(|e| format!("NOT claimed: {e}"), |()| "claimed and announced".to_string())
            ));
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the cold restart's hold: writes stay held");
        }
    }

    /// While this node is active, asks its peers every half second whether one of them is an active of a
    /// higher epoch (it took over while this node was cut off); if so, steps down. Ends when this reign
    /// ends; waits while a switchover pauses writes (the switchover steps down itself, resuming).
    fn watch_for_a_newer_active(self, state: Arc<NodeState>, epoch: Epoch) {
        if self.settings.peers.is_empty() {
            return;
        }
        let reign = state.reign.load(Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name("tandem-watch".into()).spawn(move || {
            let shards = self.ports.len() as u16;
            let patience = self.settings.dead_after.unwrap_or(std::time::Duration::from_millis(500));
            while !state.stopping.load(Ordering::SeqCst) && state.reign.load(Ordering::SeqCst) == reign {
                // A cold restart's hold waits on this look: look often then.
                let cold = state.cold_hold.load(Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(if cold { 25 } else { 500 }));
                if (state.writes_held() && !cold) || state.reign.load(Ordering::SeqCst) != reign {
                    continue;
                }
                let found = replica::receiver::probe_for_active(&self.settings.peers, &self.settings.secret, shards, epoch, patience);
                let ours = match state.report() {
                    Report::Active { history, .. } => Some(history),
                    _ => None,
                };
                // Two standbys that promoted together hold the same epoch: the lower history yields, so
                // that each of them, looking at the other, comes to the same answer.
                let newer = |found: &replica::receiver::ActiveFound| {
                    found.epoch > epoch || (found.epoch == epoch && ours.is_some_and(|ours| found.history > ours))
                };
                if let Some(found) = found.filter(newer) {
                    let why = if found.epoch > epoch {
                        format!("stepped down to standby: {} is the active at {} (ours was {epoch})", found.addr, found.epoch)
                    } else {
                        format!(
                            "stepped down to standby: {} is also the active at {epoch} (two standbys promoted together) and its history {} ranks above ours",
                            found.addr, found.history
                        )
                    };
                    // Writes paused and the log still, this node presents its history and positions: if it
                    // took nothing beyond the point where the new active took over, it resumes from there
                    // (a partial resync); the new active's handshake decides, a full sync otherwise.
                    let history = match state.report() {
                        Report::Active { history, .. } => Some(history),
                        _ => None,
                    };
                    if state.cold_hold.swap(false, Ordering::SeqCst) {
                        // It took no write and holds nothing of the reign: a full sync, at once.
                        let plan = StepDown { epoch: found.epoch, persist: true, resume: None, assume_synced: false, close_held: true, why };
                        self.step_down(&state, reign, plan);
                        return;
                    }
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
                    let resume = match (history, crate::roles::pause(&state, &*self.wake, deadline)) {
                        (Some(history), Ok(through)) => Some((history, through)),
                        (_, Err(e)) => {
                            tracing::warn!(error = %e, "cannot pause writes before stepping down: a full sync follows");
                            None
                        }
                        (None, Ok(_)) => None,
                    };
                    let plan = StepDown { epoch: found.epoch, persist: true, resume, assume_synced: false, close_held: true, why };
                    self.step_down(&state, reign, plan);
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot watch for a newer active");
        }
    }

    /// Steps down to a standby: stop taking writes, give up the service address, stop shipping, and
    /// follow whichever peer is the active. With `plan.resume`, this node presents its own history and
    /// log positions, so a new active that continues that history resumes it (a partial resync);
    /// without, it takes a full sync (what this node took meanwhile is not the new active's).
    /// Returns false, doing nothing, when this node's reign `reign` already ended.
    pub(crate) fn step_down(&self, state: &Arc<NodeState>, reign: u64, plan: StepDown) -> bool {
        if state.reign.compare_exchange(reign, reign + 1, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        // The role always (a restart must not take the active's role back), the epoch when it is newer.
        let epoch = if plan.persist { plan.epoch } else { self.epochs.load().unwrap_or(plan.epoch) };
        if let Err(e) = self.epochs.store(epoch, crate::failover::StoredRole::Standby) {
            tracing::error!(error = %e, "cannot persist the standby role and epoch");
        }
        let receiver_config = ReceiverConfig {
            peers: self.settings.peers.clone(),
            secret: self.settings.secret.clone(),
            shard_count: self.ports.len() as u16,
            heartbeat_interval: self.settings.heartbeat,
            peer_timeout: self.settings.peer_timeout,
            reconnect_delay: std::time::Duration::from_millis(20),
            dead_after: self.settings.dead_after,
            can_promote: true,
            transport: self.settings.transport.clone(),
        };
        let (mut receiver, handle) = match Receiver::new(receiver_config, self.ports.to_vec(), self.wake.clone()) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(error = %e, "cannot step down: no receiver");
                return false;
            }
        };
        receiver.set_epoch(plan.epoch);
        let positions = match plan.resume {
            Some((history, positions)) => {
                receiver.offer_kept_history(history);
                positions
            }
            None => vec![LogSeq::ZERO; self.ports.len()],
        };
        if plan.assume_synced {
            receiver.assume_synced();
        }
        state.writable.store(false, Ordering::SeqCst);
        state.writes_closed.store(plan.close_held, Ordering::SeqCst);
        state.writes_held.store(false, Ordering::SeqCst);
        for (worker, port) in self.ports.iter().enumerate() {
            let applied = positions.get(worker).copied().unwrap_or(LogSeq::ZERO);
            // The receiver presents this at its first handshake, before the worker installs the handover.
            port.applied.store(applied.0, Ordering::Release);
            *state.handovers[worker].lock().unwrap() = Some(Handover::Standby { bell: handle.bell.clone(), applied });
            // Replies held for a standby's ack are released: this node's writes are not kept.
            port.acked.store(replica::port::ACKED_ALL, Ordering::Release);
        }
        state.version.fetch_add(1, Ordering::SeqCst);
        self.wake.wake(0);
        if plan.close_held {
            // Let every worker close its held writes' connections while the address is still here.
            let start = state.marks.rounds();
            let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
            while state.marks.rounds().iter().zip(&start).any(|(now, then)| *now < then + 2) && std::time::Instant::now() < until {
                self.wake.wake(0);
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            let (state, wake) = (state.clone(), self.wake.clone());
            let _ = std::thread::Builder::new().name("tandem-unclose".into()).spawn(move || {
                std::thread::sleep(CLOSE_WRITES_FOR);
                state.writes_closed.store(false, Ordering::SeqCst);
                state.version.fetch_add(1, Ordering::SeqCst);
                wake.wake(0);
            });
        }
        let released = crate::failover::release_service_address(&self.failover);
        *state.report.lock().unwrap() = Report::Standby { report: handle.report.clone() };
        {
            let mut control = state.control.lock().unwrap();
            control.handover = None;
            control.promote = Some((handle.promote.clone(), handle.bell.clone()));
        }
        *state.next.lock().unwrap() = Some(Runner::Follow(Box::new(receiver), Some(Box::new(self.clone()))));
        let (old_stop, old_bell) = std::mem::replace(&mut *state.stopper.lock().unwrap(), (handle.stop.clone(), handle.bell.clone()));
        old_stop.store(true, Ordering::SeqCst);
        old_bell.ring_always();
        state.counts.step_downs.fetch_add(1, Ordering::Relaxed);
        state.note(format!(
            "{}; service address {}",
            plan.why,
            match released {
                Ok(_) => "released".to_string(),
                Err(e) => format!("NOT released: {e}"),
            }
        ));
        true
    }

    /// Takes writes (the held ones run now); notes the promotion with how the address was `claimed`.
    fn open_for_writes(&self, state: &NodeState, epoch: Epoch, started: std::time::Instant, why: &str, claimed: Result<(), String>) {
        state.writes_held.store(false, Ordering::SeqCst);
        state.writable.store(true, Ordering::SeqCst);
        state.version.fetch_add(1, Ordering::SeqCst);
        self.wake.wake(0);
        state.counts.promotions.fetch_add(1, Ordering::Relaxed);
        state.note(format!(
            "promoted to active at {epoch}: {why}; service address {}/{} {}; {} ms",
            self.failover.service_ip,
            self.failover.prefix_len,
            match &claimed {
                Ok(()) => "claimed and announced".to_string(),
                Err(e) => format!("NOT claimed: {e}"),
            },
            started.elapsed().as_millis()
        ));
    }
}

fn spawn(name: &str, cpu: Option<usize>, body: impl FnOnce() + Send + 'static) -> anyhow::Result<JoinHandle<()>> {
    Ok(std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Some(cpu) = cpu {
            crate::runtime::pin_to_cpu(cpu);
        }
        body();
    })?)
}

#[cfg(test)]
mod tests {
    //! The log a store writes, applied to another store, gives the same contents: every client change
    //! kind, in random order, through the real log ring and record encoding.
    use super::*;
    use crate::clock::Expiry;
    use crate::config::Settings;
    use crate::store::{ArithRequest, DeleteRequest, GetOptions, Store, StoreConfig, StoreMode, StoreRequest};
    use proptest::prelude::*;
    use replica::log::Drained;

    #[derive(Clone, Debug)]
    enum Op {
        Store(StoreMode, u8, Vec<u8>, u32, i64),
        Cas(u8, Vec<u8>),
        Delete(u8),
        Arith(u8, bool, u64),
        Touch(u8, i64),
        Flush,
        Big(u8, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let mode = prop_oneof![
            Just(StoreMode::Set),
            Just(StoreMode::Add),
            Just(StoreMode::Replace),
            Just(StoreMode::Append),
            Just(StoreMode::Prepend)
        ];
        let value = prop_oneof![proptest::collection::vec(any::<u8>(), 0..40), (0u64..1000).prop_map(|n| n.to_string().into_bytes())];
        let ttl = prop_oneof![Just(0i64), 1i64..5000, Just(-1i64)];
        prop_oneof![
            6 => (mode, 0u8..12, value.clone(), any::<u32>(), ttl.clone()).prop_map(|(m, k, v, f, t)| Op::Store(m, k, v, f, t)),
            1 => (0u8..12, value).prop_map(|(k, v)| Op::Cas(k, v)),
            2 => (0u8..12).prop_map(Op::Delete),
            2 => (0u8..12, any::<bool>(), 0u64..2000).prop_map(|(k, i, d)| Op::Arith(k, i, d)),
            1 => (0u8..12, ttl).prop_map(|(k, t)| Op::Touch(k, t)),
            1 => Just(Op::Flush),
            1 => (0u8..12, (1usize << 20)..(3usize << 20)).prop_map(|(k, n)| Op::Big(k, n)),
        ]
    }

    fn store() -> Store {
        Store::new(StoreConfig { memory_bytes: 64 << 20, item_size_max: 4 << 20, evict: true, shard_index: 0, shard_count: 1, try_hugepages: false, memory_file: None, clock_origin: 0 })
            .unwrap()
    }

    fn key(k: u8) -> Vec<u8> {
        format!("key{k}").into_bytes()
    }

    fn run(shard: &mut Shard, op: &Op) {
        let now = shard.now();
        let store = &mut shard.store;
        match op {
            Op::Store(mode, k, value, flags, ttl) => {
                let key = key(*k);
                let expiry = Clock::global().expiry(*ttl, now);
                let request = StoreRequest {
                    key: &key,
                    value,
                    client_flags: *flags,
                    expiry,
                    mode: *mode,
                    compare_cas: None,
                    invalidate: false,
                    new_cas: None,
                    vivify_on_miss: None,
                    key_binary: false,
                };
                store.store(&request, now);
            }
            Op::Cas(k, value) => {
                let key = key(*k);
                let cas = store.peek(&key, now).map(|item| item.cas());
                let request = StoreRequest {
                    key: &key,
                    value,
                    client_flags: 1,
                    expiry: Expiry::Never,
                    mode: StoreMode::Set,
                    compare_cas: Some(cas.unwrap_or(12345)),
                    invalidate: false,
                    new_cas: None,
                    vivify_on_miss: None,
                    key_binary: false,
                };
                store.store(&request, now);
            }
            Op::Delete(k) => {
                let key = key(*k);
                store.delete(&DeleteRequest { key: &key, compare_cas: None, invalidate: false, new_expiry: None, new_cas: None }, now);
            }
            Op::Arith(k, incr, delta) => {
                let key = key(*k);
                let request = ArithRequest { key: &key, incr: *incr, delta: *delta, vivify: None, compare_cas: None, new_expiry: None, new_cas: None };
                store.arith(&request, now);
            }
            Op::Touch(k, ttl) => {
                let key = key(*k);
                let options = GetOptions { touch: Some(Clock::global().expiry(*ttl, now)), ..GetOptions::default() };
                store.get(&key, options, now);
            }
            Op::Flush => shard.flush(0),
            Op::Big(k, len) => {
                let key = key(*k);
                let value: Vec<u8> = (0..*len).map(|i| (i % 251) as u8).collect();
                let request = StoreRequest {
                    key: &key,
                    value: &value,
                    client_flags: 9,
                    expiry: Expiry::Never,
                    mode: StoreMode::Set,
                    compare_cas: None,
                    invalidate: false,
                    new_cas: None,
                    vivify_on_miss: None,
                    key_binary: false,
                };
                store.store(&request, now);
            }
        }
    }

    use crate::store::contents;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn applying_the_log_reproduces_the_store(ops in proptest::collection::vec(op(), 1..120)) {
            let settings = Arc::new(Settings::default());
            let (producer, mut consumer) = log::channel(LogShard(0), LogSeq::ZERO, LogConfig::default());
            let mut active = Shard::new(0, store(), settings.clone());
            active.store.set_change_sink(Box::new(LogSink { producer, scratch: Vec::new() }));
            let mut standby = Shard::new(0, store(), settings);
            for op in &ops {
                run(&mut active, op);
                active.store.change_sink().unwrap().end_round();
                let mut out = Vec::new();
                loop {
                    out.clear();
                    match consumer.drain_batch(1 << 20, &mut out) {
                        Drained::Batch { .. } => {
                            for record in wire::snapshot_records(&out) {
                                apply_record(&mut standby, &record);
                            }
                        }
                        Drained::Empty => break,
                        Drained::ResyncRequired { .. } => panic!("the ring never fills here"),
                    }
                }
            }
            let now = active.now();
            prop_assert_eq!(contents(&active.store, now), contents(&standby.store, now));
        }
        #[test]
        fn a_snapshot_taken_in_slices_while_writing_plus_the_log_reproduces_the_store(
            before in proptest::collection::vec(op(), 0..150),
            during in proptest::collection::vec((op(), any::<bool>()), 1..150),
        ) {
            let settings = Arc::new(Settings::default());
            let (producer, mut consumer) = log::channel(LogShard(0), LogSeq::ZERO, LogConfig::default());
            let mut active = Shard::new(0, store(), settings.clone());
            active.store.set_change_sink(Box::new(LogSink { producer, scratch: Vec::new() }));
            let mut standby = Shard::new(0, store(), settings);
            let mut drain = |active: &mut Shard, standby: Option<&mut Shard>| {
                active.store.change_sink().unwrap().end_round();
                let mut out = Vec::new();
                let mut standby = standby;
                while let Drained::Batch { .. } = consumer.drain_batch(1 << 20, &mut out) {
                    if let Some(standby) = standby.as_deref_mut() {
                        for record in wire::snapshot_records(&out) {
                            apply_record(standby, &record);
                        }
                    }
                    out.clear();
                }
            };
            for op in &before {
                run(&mut active, op);
            }
            // The snapshot begins: what was logged so far is covered by it, not replayed.
            drain(&mut active, None);
            let mut cursor = ScanCursor::default();
            let mut scratch = Vec::new();
            let mut done = false;
            for (op, slice) in &during {
                run(&mut active, op);
                drain(&mut active, Some(&mut standby));
                if *slice && !done {
                    let mut items = Vec::new();
                    let now = active.now();
                    done = active.store.scan(&mut cursor, 3, now, |item| encode_item(item, LogShard(0), LogSeq(0), &mut scratch, &mut items));
                    for record in wire::snapshot_records(&items) {
                        apply_record(&mut standby, &record);
                    }
                }
            }
            while !done {
                let mut items = Vec::new();
                let now = active.now();
                done = active.store.scan(&mut cursor, 3, now, |item| encode_item(item, LogShard(0), LogSeq(0), &mut scratch, &mut items));
                for record in wire::snapshot_records(&items) {
                    apply_record(&mut standby, &record);
                }
            }
            let now = active.now();
            prop_assert_eq!(contents(&active.store, now), contents(&standby.store, now));
        }
    }
}
