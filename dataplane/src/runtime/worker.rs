//! One core's poll loop: accept, read, parse, route, execute, reply; and mail to and from other cores.
//!
//! A round: wait for socket events (or mail, or the 1 s tick), serve every ready connection (read to
//! EAGAIN, parse up to `-R` requests, run each where its key lives, write once), run the requests other
//! cores mailed here and send their replies back, deliver replies that came back, then post this
//! round's outgoing mail as one batch per peer. Connections that still hold input (they hit `-R` or
//! their client is not reading) are revisited next round without waiting.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::conn::{Conn, OUTPUT_HIGH_WATER};
use super::mailbox::{ConnRef, Mailboxes, Msg, Postbox, Proto};
use super::report;
use super::{Shared, WorkerInfo};
use crate::clock::Clock;
use crate::net::{Ready, Transport};
use crate::protocol::binary::BinaryCodec;
use crate::protocol::text::TextCodec;
use crate::protocol::{Admin, AdminReply, After, Codec, Limits, Parse, Route};
use crate::replication::{ShardReplication, WorkerSide};
use crate::route::{shard_for, ShardId};
use crate::shard::Shard;
use crate::stats::ConnCounters;
use crate::store::{Store, StoreConfig};

/// Bytes read from one connection per round before others get their turn.
const READ_BUDGET: usize = 1 << 20;
/// Read granularity.
const READ_CHUNK: usize = 64 * 1024;
/// Sent before closing a connection whose unfinished request outgrew [`input_limit`].
const REQUEST_TOO_LARGE: &[u8] = b"SERVER_ERROR request too large\r\n";

/// Most bytes a connection may buffer for one unfinished request: the largest value plus room for its
/// command line, or a multi-get line of up to 1 MiB of keys.
fn input_limit(limits: &Limits) -> usize {
    limits.item_size_max + (1 << 20)
}

/// memcached's reply to a connection over `-c`.
const TOO_MANY_CONNECTIONS: &[u8] = b"ERROR Too many open connections\r\n";

pub struct Worker<T: Transport> {
    id: ShardId,
    net: T,
    shard: Shard,
    postbox: Postbox,
    shared: Arc<Shared>,
    counters: Arc<ConnCounters>,
    conns: Vec<Option<Conn<T::Stream>>>,
    free: Vec<usize>,
    next_generation: u32,
    /// Connections to revisit without waiting for an event.
    pending: VecDeque<usize>,
    /// Connections that received remote replies this round and need a write.
    touched: Vec<usize>,
    /// Read buffer for connections that hold no partial input.
    scratch: Vec<u8>,
    limits: Limits,
    /// This shard's replication duties, if the node replicates.
    replication: Option<ShardReplication>,
    /// Connections whose output waits for the standby's ack (sync replication).
    held: Vec<usize>,
    /// The node's role version this worker last acted on, and whether clients may write (a standby's
    /// do not, until it is promoted). Changed only between rounds, with the store's log.
    role_version: u64,
    /// The clock second of the last round (the shard ticks once per second).
    last_now: crate::clock::RelTime,
    /// A full ring kept this round's outgoing mail here: the next round must not sleep.
    mail_held: bool,
    writable: bool,
    /// A switchover's pause: writes wait in their connections (revisited each round) until it ends.
    hold_writes: bool,
    /// Just after a switchover: a write closes its connection instead of being refused.
    close_writes: bool,
}

/// What a connection needs after a service pass.
enum Next {
    Idle,
    Revisit,
    Close,
}

impl<T: Transport> Worker<T> {
    /// Builds this worker's store on the calling thread, then serves through `net`.
    pub fn new(
        id: ShardId,
        net: impl FnOnce() -> anyhow::Result<T>,
        shared: Arc<Shared>,
        mailboxes: Arc<Mailboxes>,
        replication: Option<WorkerSide>,
    ) -> anyhow::Result<Worker<T>> {
        let settings = shared.settings.clone();
        let threads = settings.threads;
        let share = settings.memory_limit / threads;
        let store = Store::new(StoreConfig {
            memory_bytes: share,
            item_size_max: settings.item_size_max,
            evict: settings.evictions,
            shard_index: id,
            shard_count: threads,
            try_hugepages: true,
            memory_file: settings.memory_file.as_ref().map(|path| crate::config::shard_memory_file(path, id)),
            clock_origin: Clock::global().started_unix(),
        })
        .with_context(|| format!("worker {id}: cannot build its store of {share} bytes"))?;
        let backing = store.backing();
        if let Some(state) = &shared.replication {
            state.report_restored(id, store.restored_mark());
        }
        let mut shard = Shard::new(id, store, settings.clone());
        shard.store.set_read_only(settings.read_only());
        let replication = replication.map(|side| {
            if let Some(sink) = side.sink {
                shard.store.set_change_sink(Box::new(sink));
            }
            side.replication
        });
        let net = net()?;
        let counters = Arc::new(ConnCounters::default());
        let info = WorkerInfo {
            commands: shard.counters.clone(),
            store: shard.store.stats().clone(),
            conns: counters.clone(),
            backing,
            conn_list: Default::default(),
            listeners: net.listeners(),
            net: Default::default(),
            rounds: Default::default(),
        };
        let _ = shared.workers[id].set(info);
        Ok(Worker {
            id,
            net,
            shard,
            postbox: Postbox::new(id, mailboxes),
            limits: Limits { item_size_max: settings.item_size_max },
            shared,
            counters,
            conns: Vec::new(),
            free: Vec::new(),
            next_generation: 0,
            pending: VecDeque::new(),
            touched: Vec::new(),
            scratch: Vec::with_capacity(READ_CHUNK),
            replication,
            held: Vec::new(),
            role_version: 0,
            last_now: 0,
            mail_held: false,
            writable: !settings.read_only(),
            hold_writes: false,
            close_writes: false,
        })
    }

    /// Runs until the server shuts down.
    pub fn run(&mut self) {
        let mut ready = Vec::with_capacity(1024);
        while !self.shared.shutdown.load(Ordering::Relaxed) {
            if let Err(e) = self.round(&mut ready, Duration::MAX) {
                tracing::error!(worker = self.id, error = %e, "poll failed");
                break;
            }
        }
        tracing::debug!(worker = self.id, "worker stopped");
    }

    /// One poll round, waiting at most `max_wait` for something to do (the benchmarks drive rounds
    /// themselves with zero).
    pub fn round(&mut self, ready: &mut Vec<Ready>, max_wait: Duration) -> io::Result<()> {
        let now = Clock::global().now();
        self.shard.set_now(now);
        if now != self.last_now {
            self.last_now = now;
            self.shard.tick();
            self.publish_net_counters();
        }
        self.follow_role();
        let replicating = match self.replication.as_mut() {
            Some(replication) => replication.round(&mut self.shard),
            None => false,
        };
        self.release_held();
        // Connections served above (released holds) may have mailed requests: they leave at the end of
        // this round, so it must not sleep first.
        let busy = self.mail_held || replicating || !self.pending.is_empty() || self.postbox.has_inbound() || self.postbox.has_outbound();
        let timeout = if busy || !self.postbox.prepare_sleep() {
            Duration::ZERO
        } else if self.replication.as_ref().is_some_and(ShardReplication::has_inbound) {
            self.postbox.awake();
            Duration::ZERO
        } else if !self.held.is_empty() {
            // Acks wake this core; the short timeout only bounds a wake-up lost to a race.
            Duration::from_millis(1)
        } else {
            Duration::from_secs(1)
        };
        ready.clear();
        let polled = self.net.poll(timeout.min(max_wait), ready);
        self.postbox.awake();
        polled?;
        for &event in ready.iter() {
            match event {
                Ready::Listener(which) => self.accept(which),
                Ready::Conn(index) => self.serve(index),
            }
        }
        for _ in 0..self.pending.len() {
            if let Some(index) = self.pending.pop_front() {
                self.serve(index);
            }
        }
        self.handle_mail();
        // A full ring keeps this round's batch here: retry next round without sleeping.
        self.mail_held = self.postbox.flush();
        self.net.end_round();
        if let Some(info) = self.shared.workers[self.id].get() {
            info.rounds.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies the transport's counters where `stats net` reads them.
    fn publish_net_counters(&mut self) {
        if let Some(info) = self.shared.workers[self.id].get() {
            let mut counters = info.net.lock().unwrap();
            counters.clear();
            self.net.counters(&mut counters);
        }
    }

    fn accept(&mut self, which: usize) {
        loop {
            let (mut stream, peer) = match self.net.accept(which) {
                Ok(Some(pair)) => pair,
                Ok(None) => return,
                Err(e) => {
                    // EMFILE and friends: log and try again next round.
                    tracing::warn!(worker = self.id, error = %e, "accept failed");
                    return;
                }
            };
            let open = self.shared.open_connections.fetch_add(1, Ordering::Relaxed);
            if open >= self.shared.settings.max_connections {
                self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                self.counters.rejected_connections.incr();
                let _ = self.net.write(&mut stream, TOO_MANY_CONNECTIONS);
                self.net.close(stream);
                continue;
            }
            let index = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if let Err(e) = self.net.register(&mut stream, index) {
                tracing::warn!(error = %e, "cannot register connection");
                self.net.close(stream);
                self.free.push(index);
                self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            self.next_generation = self.next_generation.wrapping_add(1);
            if let Some(info) = self.shared.workers[self.id].get() {
                info.conn_list.lock().unwrap().push((self.net.stream_id(&stream), peer));
            }
            tracing::debug!(worker = self.id, ?peer, "new connection");
            self.conns[index] = Some(Conn::new(stream, peer, self.next_generation));
            self.counters.curr_connections.incr();
            self.counters.total_connections.incr();
        }
    }

    fn close(&mut self, index: usize) {
        if let Some(conn) = self.conns[index].take() {
            let fd = self.net.stream_id(&conn.stream);
            tracing::debug!(worker = self.id, peer = ?conn.peer, "connection closed");
            self.net.close(conn.stream);
            if let Some(info) = self.shared.workers[self.id].get() {
                info.conn_list.lock().unwrap().retain(|(f, _)| *f != fd);
            }
            self.free.push(index);
            self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            self.counters.curr_connections.sub(1);
        }
    }

    /// Acts on a role change of the node (a promotion): installs the new log and opens for writes.
    fn follow_role(&mut self) {
        let Some(node) = self.shared.replication.as_ref() else { return };
        let Some(version) = node.changed_since(self.role_version) else { return };
        self.role_version = version;
        if let (Some(handover), Some(replication)) = (node.take_handover(self.id), self.replication.as_mut()) {
            handover.install(&mut self.shard, replication);
        }
        self.writable = node.writable();
        self.hold_writes = node.writes_held();
        self.close_writes = node.writes_closed();
        self.shard.store.set_read_only(!self.writable);
        tracing::info!(worker = self.id, writable = self.writable, "worker follows the node's new role");
    }

    /// Serves the connections whose held output the standby has now acknowledged.
    fn release_held(&mut self) {
        let Some(replication) = self.replication.as_ref() else { return };
        let mut ready = Vec::new();
        self.held.retain(|&index| match self.conns.get_mut(index).and_then(Option::as_mut) {
            Some(conn) => {
                if conn.release_holds(|shard, seq| replication.acked(shard, seq)) {
                    ready.push(index);
                    false
                } else {
                    true
                }
            }
            None => false,
        });
        for index in ready {
            self.serve(index);
        }
    }

    fn serve(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) else { return };
        let conn_ref = ConnRef { index: index as u32, generation: conn.generation };
        let next = {
            let mut ctx = Ctx {
                shard: &mut self.shard,
                postbox: &mut self.postbox,
                shared: &self.shared,
                counters: &self.counters,
                limits: self.limits,
                replication: self.replication.as_ref(),
                read_only: !self.writable,
                hold_writes: self.hold_writes,
                close_writes: self.close_writes,
            };
            service(&mut ctx, &mut self.net, conn, conn_ref, &mut self.scratch)
        };
        let waits = !conn.holds.is_empty() || (self.hold_writes && !conn.input.is_empty());
        if waits && !self.held.contains(&index) {
            self.held.push(index);
        }
        match next {
            Next::Idle => {}
            Next::Revisit => self.pending.push_back(index),
            Next::Close => self.close(index),
        }
    }

    fn handle_mail(&mut self) {
        // A request mailed by a worker that already follows a role change (a promotion: it took a write)
        // runs under the same role here. This round may have begun before the change, and a write run
        // on a shard without its new log would be stored and never replicated.
        self.follow_role();
        let Worker { shard, postbox, conns, touched, limits, counters, replication, .. } = self;
        let sync = replication.as_ref().is_some_and(ShardReplication::sync);
        // The other direction: a write mailed while the node was the active, run here after it stepped
        // down, would change a standby's copy with no log behind it. It is refused as a standby's write
        // is (never acknowledged, nothing lost); the client retries at the new active.
        let standby = replication.as_ref().is_some_and(ShardReplication::is_standby);
        postbox.drain(|postbox, from, msg| match msg {
            Msg::Request { conn, slot, proto, key_only, frame } => {
                let mut out = postbox.buffer();
                let before = if sync { log_position(shard) } else { 0 };
                match proto {
                    Proto::Text => run_frame::<TextCodec>(shard, &frame, key_only, standby, limits, &mut out),
                    Proto::Binary => run_frame::<BinaryCodec>(shard, &frame, key_only, standby, limits, &mut out),
                }
                let after = if sync { log_position(shard) } else { 0 };
                postbox.recycle(frame);
                let log_seq = if after > before { after } else { 0 };
                postbox.send(from, Msg::Reply { conn, slot, bytes: out, log_seq });
            }
            Msg::Reply { conn: conn_ref, slot, bytes, log_seq } => {
                let index = conn_ref.index as usize;
                match conns.get_mut(index).and_then(Option::as_mut) {
                    Some(conn) if conn.generation == conn_ref.generation => {
                        if log_seq > 0 {
                            conn.hold(from, log_seq);
                        }
                        conn.fill_slot(slot, bytes, |b| postbox.recycle(b));
                        touched.push(index);
                    }
                    _ => postbox.recycle(bytes),
                }
            }
            Msg::Flush { delay } => shard.flush(delay),
            Msg::ResetStats => report::reset_local(shard, counters),
            Msg::MemoryLimit { bytes } => {
                // The sender set its own store first, and every store was mapped alike.
                if let Err(error) = shard.store.set_memory_limit(bytes) {
                    tracing::error!(%error, shard = shard.id, "cache_memlimit failed on this shard");
                }
            }
        });
        let mut list = std::mem::take(&mut self.touched);
        list.sort_unstable();
        list.dedup();
        for index in list.drain(..) {
            self.serve(index);
        }
        self.touched = list;
    }
}

/// The shard's replication log position (0 without a log).
fn log_position(shard: &mut Shard) -> u64 {
    shard.store.change_sink().map_or(0, |sink| sink.position())
}

/// Runs a frame mailed from another core on this shard.
fn run_frame<C: Codec>(shard: &mut Shard, frame: &[u8], key_only: bool, refuse_writes: bool, limits: &Limits, out: &mut Vec<u8>) {
    match C::parse(frame, limits) {
        Parse::Request { request, .. } if refuse_writes && C::mutates(&request) => C::refuse_read_only(&request, out),
        Parse::Request { request, .. } if key_only => C::execute_key(shard, &request, 0, out),
        Parse::Request { request, .. } => C::execute(shard, &request, out),
        // The sender parsed these exact bytes as a request; anything else is a bug, reported to the client.
        other => {
            tracing::error!(?other, "a mailed frame did not parse");
            out.extend_from_slice(b"SERVER_ERROR internal error\r\n");
        }
    }
}

/// What service needs besides the connection.
struct Ctx<'w> {
    shard: &'w mut Shard,
    postbox: &'w mut Postbox,
    shared: &'w Shared,
    counters: &'w ConnCounters,
    limits: Limits,
    replication: Option<&'w ShardReplication>,
    /// Refuse writes (a standby).
    read_only: bool,
    /// Instead of refusing them, leave writes unread in the connection's input (a switchover's pause),
    /// or close their connection unanswered (just after the switchover).
    hold_writes: bool,
    close_writes: bool,
}

impl Ctx<'_> {
    /// Runs `run` on this core's shard and emits its reply; in sync replication, holds the connection's
    /// output until the standby acknowledges what `run` logged.
    fn run_local<S>(&mut self, conn: &mut Conn<S>, run: impl FnOnce(&mut Shard, &mut Vec<u8>)) {
        let sync = self.replication.is_some_and(ShardReplication::sync);
        let before = if sync { log_position(self.shard) } else { 0 };
        let shard = &mut *self.shard;
        emit(conn, self.postbox, |out| run(shard, out));
        if sync {
            let after = log_position(self.shard);
            if after > before {
                conn.hold(self.shard.id, after);
            }
        }
    }

    /// Mails a request to `owner`'s core: reserves the connection's reply slot and sends the frame
    /// `write` produces (the request's own bytes, or a one-key frame when `key_only`).
    fn mail<S>(&mut self, conn: &mut Conn<S>, conn_ref: ConnRef, owner: ShardId, proto: Proto, key_only: bool, write: impl FnOnce(&mut Vec<u8>)) {
        let slot = conn.reserve_slot();
        let mut frame = self.postbox.buffer();
        write(&mut frame);
        self.postbox.send(owner, Msg::Request { conn: conn_ref, slot, proto, key_only, frame });
    }

    /// Whether the connection's output may be written now (sync replication holds it until acked).
    fn may_write<S>(&self, conn: &mut Conn<S>) -> bool {
        match self.replication {
            Some(replication) if !conn.holds.is_empty() => conn.release_holds(|shard, seq| replication.acked(shard, seq)),
            _ => true,
        }
    }
}

/// One pass over a connection: write what is queued, run held-back input, read and run, write.
fn service<T: Transport>(ctx: &mut Ctx<'_>, net: &mut T, conn: &mut Conn<T::Stream>, conn_ref: ConnRef, scratch: &mut Vec<u8>) -> Next {
    if ctx.may_write(conn) && write_out(ctx, net, conn).is_err() {
        return Next::Close;
    }
    let mut yielded = false;
    // Input held back by -R or by a full output runs before anything new is read.
    if !conn.input.is_empty() && !conn.closing && conn.backlog() <= OUTPUT_HIGH_WATER {
        let mut input = std::mem::take(&mut conn.input);
        let (consumed, stopped) = process(ctx, conn, conn_ref, &input);
        input.drain(..consumed);
        conn.input = input;
        yielded = stopped;
    }
    let mut read_total = 0;
    while !yielded && !conn.closing && conn.backlog() <= OUTPUT_HIGH_WATER {
        if read_total >= READ_BUDGET {
            // The socket may hold more; edge-triggered polling will not say so again.
            yielded = true;
            break;
        }
        let use_scratch = conn.input.is_empty();
        let buf: &mut Vec<u8> = if use_scratch { &mut *scratch } else { &mut conn.input };
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let got = net.read(&mut conn.stream, buf);
        match got {
            Ok(0) => conn.closing = true,
            Ok(n) => {
                read_total += n;
                ctx.counters.bytes_read.add(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Next::Close,
        }
        let stopped = if use_scratch {
            let (consumed, stopped) = process(ctx, conn, conn_ref, scratch);
            conn.input.extend_from_slice(&scratch[consumed..]);
            scratch.clear();
            stopped
        } else {
            let mut input = std::mem::take(&mut conn.input);
            let (consumed, stopped) = process(ctx, conn, conn_ref, &input);
            input.drain(..consumed);
            conn.input = input;
            stopped
        };
        yielded = stopped;
    }
    // A request that never completes (a multi-get line without end, say) may not hold memory forever.
    if conn.input.len() > input_limit(&ctx.limits) {
        tracing::info!(peer = ?conn.peer, bytes = conn.input.len(), "closing a connection whose request never ends");
        conn.input = Vec::new();
        emit(conn, ctx.postbox, |out| out.extend_from_slice(REQUEST_TOO_LARGE));
        conn.closing = true;
    }
    if ctx.may_write(conn) && write_out(ctx, net, conn).is_err() {
        return Next::Close;
    }
    if conn.closing {
        return if conn.backlog() == 0 && !conn.awaiting_replies() { Next::Close } else { Next::Idle };
    }
    if conn.backlog() > OUTPUT_HIGH_WATER {
        // The client is not reading: its writable event brings the connection back.
        return Next::Idle;
    }
    if yielded {
        ctx.counters.conn_yields.incr();
        Next::Revisit
    } else {
        Next::Idle
    }
}

/// Writes queued output; Err when the connection is broken.
fn write_out<T: Transport>(ctx: &mut Ctx<'_>, net: &mut T, conn: &mut Conn<T::Stream>) -> io::Result<()> {
    while conn.written < conn.output.len() {
        match net.write(&mut conn.stream, &conn.output[conn.written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.written += n;
                ctx.counters.bytes_written.add(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conn.output.clear();
    conn.written = 0;
    if conn.output.capacity() > 4 * READ_CHUNK {
        conn.output = Vec::new();
    }
    Ok(())
}

/// Runs the requests at the front of `input`, up to `-R` of them. Returns the bytes used and whether
/// it stopped early (with complete requests possibly left).
fn process<S>(ctx: &mut Ctx<'_>, conn: &mut Conn<S>, conn_ref: ConnRef, input: &[u8]) -> (usize, bool) {
    let mut pos = 0;
    if conn.swallow > 0 {
        let drop = conn.swallow.min(input.len());
        conn.swallow -= drop;
        pos += drop;
    }
    if pos == input.len() {
        return (pos, false);
    }
    let proto = *conn.proto.get_or_insert(if input[pos] == crate::protocol::binary::wire::REQUEST_MAGIC { Proto::Binary } else { Proto::Text });
    match proto {
        Proto::Text => process_with::<TextCodec, S>(ctx, conn, conn_ref, input, pos, Proto::Text),
        Proto::Binary => process_with::<BinaryCodec, S>(ctx, conn, conn_ref, input, pos, Proto::Binary),
    }
}

/// Writes a reply produced here: straight to the output when nothing waits before it, else in a slot.
fn emit<S>(conn: &mut Conn<S>, postbox: &mut Postbox, write: impl FnOnce(&mut Vec<u8>)) {
    if conn.in_order() {
        write(&mut conn.output);
    } else {
        let mut buf = postbox.buffer();
        write(&mut buf);
        conn.push_ready(buf);
    }
}

fn process_with<C: Codec, S>(
    ctx: &mut Ctx<'_>,
    conn: &mut Conn<S>,
    conn_ref: ConnRef,
    input: &[u8],
    mut pos: usize,
    proto: Proto,
) -> (usize, bool) {
    let shards = ctx.shared.settings.threads;
    let me = ctx.shard.id;
    let read_only = ctx.read_only;
    let mut budget = ctx.shared.settings.reqs_per_event.max(1);
    let mut prefetched_to = pos;
    while pos < input.len() && !conn.closing {
        if budget == 0 || conn.backlog() > OUTPUT_HIGH_WATER {
            return (pos, true);
        }
        if pos >= prefetched_to {
            prefetched_to = prefetch_batch::<C>(ctx.shard, input, pos, shards, budget);
        }
        budget -= 1;
        let (request, consumed) = match C::parse(&input[pos..], &ctx.limits) {
            Parse::Incomplete => break,
            Parse::Invalid(bad) => {
                emit(conn, ctx.postbox, |out| out.extend_from_slice(&bad.reply));
                pos += bad.consumed;
                let drop = bad.swallow.min(input.len() - pos);
                pos += drop;
                conn.swallow = bad.swallow - drop;
                if bad.close {
                    conn.closing = true;
                }
                continue;
            }
            Parse::Request { request, consumed } => (request, consumed),
        };
        let frame = &input[pos..pos + consumed];
        pos += consumed;
        if read_only && C::mutates(&request) {
            if ctx.hold_writes || ctx.close_writes {
                conn.closing |= ctx.close_writes;
                return (pos - consumed, false);
            }
            ctx.counters.read_only_refusals.incr();
            emit(conn, ctx.postbox, |out| C::refuse_read_only(&request, out));
            continue;
        }
        match C::route(&request) {
            Route::Key(key) => {
                let owner = shard_for(key, shards);
                if owner == me {
                    ctx.run_local(conn, |shard, out| C::execute(shard, &request, out));
                } else {
                    ctx.mail(conn, conn_ref, owner, proto, false, |bytes| bytes.extend_from_slice(frame));
                    ctx.counters.cross_shard_requests.incr();
                }
            }
            Route::Keys(count) => {
                for index in 0..count {
                    let owner = shard_for(C::key_at(&request, index), shards);
                    if owner == me {
                        ctx.run_local(conn, |shard, out| C::execute_key(shard, &request, index, out));
                    } else {
                        ctx.mail(conn, conn_ref, owner, proto, true, |bytes| C::key_frame(&request, index, bytes));
                        ctx.counters.cross_shard_requests.incr();
                    }
                }
                emit(conn, ctx.postbox, |out| C::finish_keys(&request, out));
            }
            Route::AllShards => {
                for owner in 0..shards {
                    if owner == me {
                        ctx.run_local(conn, |shard, out| C::execute(shard, &request, out));
                    } else {
                        ctx.mail(conn, conn_ref, owner, proto, false, |bytes| bytes.extend_from_slice(frame));
                    }
                }
                emit(conn, ctx.postbox, |out| C::finish_keys(&request, out));
            }
            Route::SlabClass(class) => {
                let owner = (class as usize).checked_sub(1).filter(|&shard| shard < shards).unwrap_or(me);
                if owner == me {
                    ctx.run_local(conn, |shard, out| C::execute(shard, &request, out));
                } else {
                    ctx.mail(conn, conn_ref, owner, proto, false, |bytes| bytes.extend_from_slice(frame));
                    ctx.counters.cross_shard_requests.incr();
                }
                emit(conn, ctx.postbox, |out| C::finish_keys(&request, out));
            }
            Route::Connection => {
                let mut after = After::Continue;
                emit(conn, ctx.postbox, |out| after = C::answer(&request, out));
                if after == After::Close {
                    conn.closing = true;
                }
            }
            Route::Admin(admin) => admin_request::<C, S>(ctx, conn, &request, admin),
        }
    }
    (pos, false)
}

/// Requests looked ahead of execution by [`prefetch_batch`].
const PREFETCH_BATCH: usize = 16;

/// Prefetches the store lookups of the next [`PREFETCH_BATCH`] (at most `budget`) requests from `pos`,
/// those whose keys this shard owns: first every index slot, then every item those slots point at. With a
/// pipelined batch the cache misses of its requests then overlap, where run one by one each request
/// waits for two of its own (measured: without this, 40% of a worker's time under binary gets pipelined
/// 16 deep over 100,000 keys was spent in those two loads). Returns where the requests looked at end
/// (`pos` when the codec cannot tell, so the caller looks again at the next request).
fn prefetch_batch<C: Codec>(shard: &Shard, input: &[u8], pos: usize, shards: usize, budget: usize) -> usize {
    let mut hashes = [0u64; PREFETCH_BATCH];
    let mut count = 0;
    let mut at = pos;
    for _ in 0..PREFETCH_BATCH.min(budget) {
        let Some((key, len)) = input.get(at..).and_then(C::peek_key) else { break };
        let hash = crate::route::key_hash(key);
        at += len;
        if crate::route::shard_for_hash(hash, shards) == shard.id {
            shard.store.prefetch_index(hash);
            hashes[count] = hash;
            count += 1;
        }
    }
    for &hash in &hashes[..count] {
        shard.store.prefetch_item(hash);
    }
    at.max(pos + 1)
}

/// Answers requests about the whole server.
fn admin_request<C: Codec, S>(ctx: &mut Ctx<'_>, conn: &mut Conn<S>, request: &C::Request<'_>, admin: Admin<'_>) {
    let settings = &ctx.shared.settings;
    match admin {
        Admin::Flush { delay } => {
            if !settings.flush_enabled {
                emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::FlushDisabled, out));
                return;
            }
            ctx.shard.counters.cmd_flush.incr();
            let delay_now = delay;
            ctx.run_local(conn, |shard, _| shard.flush(delay_now));
            ctx.postbox.broadcast(|| Msg::Flush { delay });
            emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::Flushed, out));
        }
        Admin::Verbosity(level) => {
            settings.verbosity.store(level, Ordering::Relaxed);
            emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::VerbosityOk, out));
        }
        Admin::MemoryLimit(bytes) => {
            // Split across shards as -m is. Every store was mapped alike, so what this one takes, all take.
            // The arenas were mapped from -m: no more than that.
            let share = bytes / settings.threads;
            let set = if bytes > settings.memory_limit {
                Err(anyhow::anyhow!("{bytes} bytes is more than the {} of -m, which the arenas were mapped for", settings.memory_limit))
            } else {
                ctx.shard.store.set_memory_limit(share).map_err(anyhow::Error::from)
            };
            let reply = match set {
                Ok(()) => {
                    ctx.shared.memory_limit.store(bytes, Ordering::Relaxed);
                    ctx.postbox.broadcast(|| Msg::MemoryLimit { bytes: share });
                    tracing::info!(bytes, per_shard = share, "memory limit changed (cache_memlimit)");
                    AdminReply::MemoryLimitSet
                }
                Err(error) => {
                    tracing::warn!("cache_memlimit refused: {error:#}");
                    AdminReply::MemoryLimitRefused
                }
            };
            emit(conn, ctx.postbox, |out| C::answer_admin(request, reply, out));
        }
        Admin::Shutdown => {
            if settings.shutdown_enabled {
                emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::ShutdownAccepted, out));
                conn.closing = true;
                report::request_shutdown();
            } else {
                emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::ShutdownDisabled, out));
            }
        }
        Admin::Stats(Some("reset")) => {
            report::reset_local(ctx.shard, ctx.counters);
            ctx.postbox.broadcast(|| Msg::ResetStats);
            emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::Reset, out));
        }
        Admin::Stats(group) => match report::stats(ctx.shared, group) {
            Some(pairs) => emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::Stats(&pairs), out)),
            None => emit(conn, ctx.postbox, |out| C::answer_admin(request, AdminReply::BadArgument, out)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn shard() -> Shard {
        let config = StoreConfig { memory_bytes: 16 << 20, item_size_max: 1 << 20, evict: true, shard_index: 0, shard_count: 1, try_hugepages: false, memory_file: None, clock_origin: 0 };
        Shard::new(0, Store::new(config).expect("store"), Arc::new(Settings::default()))
    }

    #[test]
    fn a_mailed_write_on_a_shard_that_stepped_down_is_refused_and_changes_nothing() {
        let limits = Limits { item_size_max: 1 << 20 };
        let mut shard = shard();
        let mut out = Vec::new();
        run_frame::<TextCodec>(&mut shard, b"set k 0 0 1\r\nx\r\n", false, false, &limits, &mut out);
        assert_eq!(out, b"STORED\r\n");
        out.clear();
        run_frame::<TextCodec>(&mut shard, b"set k 0 0 1\r\ny\r\n", false, true, &limits, &mut out);
        assert_eq!(out, crate::protocol::READ_ONLY_STANDBY);
        out.clear();
        // Reads still run where writes are refused (a mailed get asks for one key of the client's list).
        run_frame::<TextCodec>(&mut shard, b"get k\r\n", true, true, &limits, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "VALUE k 0 1\r\nx\r\n");
    }
}
