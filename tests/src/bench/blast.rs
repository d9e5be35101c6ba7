//! The load loop: N connections spread over M client threads, each thread one `mio` poll over its
//! non-blocking sockets, each connection keeping up to `pipeline` requests in flight.
//!
//! The client shares the machine with the server, so it is kept cheap: one clock read per batch of
//! replies and one per refill, buffers allocated once per connection, replies parsed in place. Every
//! reply is checked against its request; anything unexpected is an error, counted, and its connection
//! is replaced so the run goes on.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::protocol::{encode, parse_reply, OpKind, Parsed, Protocol};
use super::workload::{KeySpace, Ratio, Rng, ValueSize};

/// When a run stops issuing requests.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    Requests(u64),
    Duration(Duration),
}

/// Everything one run needs.
#[derive(Clone, Debug)]
pub struct BlastConfig {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub ratio: Ratio,
    pub keys: KeySpace,
    pub value_size: ValueSize,
    pub connections: usize,
    pub threads: usize,
    pub pipeline: usize,
    pub limit: Limit,
    pub seed: u64,
}

/// How long replies still in flight are awaited once the run has stopped issuing, and how long a
/// run may go without any reply at all before it gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Error descriptions kept for the report; the count covers all of them.
const ERROR_SAMPLES: usize = 5;

/// Counts and latencies of one run (or one thread of it, before merging).
#[derive(Clone, Debug)]
pub struct BlastResult {
    pub elapsed: Duration,
    /// Latency from handing a request to the socket until its whole reply is parsed, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Replies per command, in `OpKind::ALL` order, and how many of them found their key.
    pub replies: [u64; 4],
    pub hits: [u64; 4],
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// CPU this client process spent during the run (user + system), to show what the load cost.
    pub client_cpu_us: f64,
}

impl BlastResult {
    /// Nothing counted yet.
    pub fn empty() -> BlastResult {
        BlastResult {
            elapsed: Duration::ZERO,
            latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds"),
            replies: [0; 4],
            hits: [0; 4],
            errors: 0,
            error_samples: Vec::new(),
            client_cpu_us: 0.0,
        }
    }

    fn merge(&mut self, other: BlastResult) {
        self.latency_ns.add(&other.latency_ns).expect("same histogram bounds");
        for i in 0..4 {
            self.replies[i] += other.replies[i];
            self.hits[i] += other.hits[i];
        }
        self.errors += other.errors;
        for sample in other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES {
                self.error_samples.push(sample);
            }
        }
    }

    fn error(&mut self, count: u64, what: String) {
        self.errors += count;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(what);
        }
    }

    pub fn total_replies(&self) -> u64 {
        self.replies.iter().sum()
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.total_replies() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the load described by `config` and returns its merged result.
pub fn run(config: &BlastConfig) -> Result<BlastResult> {
    if config.connections == 0 || config.threads == 0 || config.pipeline == 0 {
        bail!("connections, threads and pipeline must all be at least 1");
    }
    let threads = config.threads.min(config.connections);
    let budget = AtomicI64::new(match config.limit {
        Limit::Requests(count) => count.min(i64::MAX as u64) as i64,
        Limit::Duration(_) => i64::MAX,
    });
    let cpu_before = process_cpu_us();
    let started = Instant::now();
    let deadline = match config.limit {
        Limit::Duration(duration) => Some(started + duration),
        Limit::Requests(_) => None,
    };
    let results: Vec<Result<BlastResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                // Connections are dealt out round-robin: thread t gets connections t, t+M, t+2M, ...
                let connections = (thread..config.connections).step_by(threads).count();
                let budget = &budget;
                scope.spawn(move || run_thread(config, thread, connections, budget, deadline))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread panicked")).collect()
    });
    let mut total = BlastResult::empty();
    for result in results {
        total.merge(result?);
    }
    total.elapsed = started.elapsed();
    total.client_cpu_us = process_cpu_us() - cpu_before;
    Ok(total)
}

/// User + system CPU of this process so far, in microseconds.
fn process_cpu_us() -> f64 {
    // SAFETY: getrusage writes only into the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// A request sent and not yet answered.
struct InFlight {
    kind: OpKind,
    key_index: u64,
    opaque: u32,
    sent: Instant,
}

/// One client connection: its socket, its unsent bytes, its unparsed bytes and what it waits for.
struct Connection {
    stream: TcpStream,
    out: Vec<u8>,
    out_sent: usize,
    input: Vec<u8>,
    input_start: usize,
    input_end: usize,
    in_flight: VecDeque<InFlight>,
    next_opaque: u32,
}

const READ_CHUNK: usize = 64 * 1024;

impl Connection {
    fn open(addr: SocketAddr, pipeline: usize) -> Result<Connection> {
        let stream = std::net::TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream: TcpStream::from_std(stream),
            out: Vec::with_capacity(4096),
            out_sent: 0,
            input: vec![0; READ_CHUNK],
            input_start: 0,
            input_end: 0,
            in_flight: VecDeque::with_capacity(pipeline),
            next_opaque: 0,
        })
    }

    /// Writes what it can; `Err` means the connection is broken.
    fn flush(&mut self) -> io::Result<()> {
        while self.out_sent < self.out.len() {
            match self.stream.write(&self.out[self.out_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_sent = 0;
        Ok(())
    }

    /// Reads until the socket is drained; `Err` means the connection is broken or closed.
    fn fill(&mut self) -> io::Result<()> {
        loop {
            if self.input_end == self.input.len() {
                // Move the unparsed tail to the front; grow only when one reply outgrows the buffer.
                self.input.copy_within(self.input_start..self.input_end, 0);
                self.input_end -= self.input_start;
                self.input_start = 0;
                if self.input_end == self.input.len() {
                    self.input.resize(self.input.len() * 2, 0);
                }
            }
            let space = self.input.len() - self.input_end;
            match self.stream.read(&mut self.input[self.input_end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                // A short read drained the socket: bytes arriving later raise a new edge, so the
                // read that would only say WouldBlock is skipped (one syscall less per reply).
                Ok(n) if n < space => {
                    self.input_end += n;
                    return Ok(());
                }
                Ok(n) => self.input_end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The per-thread state that request generation needs.
struct Generator<'a> {
    config: &'a BlastConfig,
    rng: Rng,
    key: Vec<u8>,
    value_pool: Vec<u8>,
    budget: &'a AtomicI64,
    deadline: Option<Instant>,
}

impl Generator<'_> {
    fn may_issue(&self, now: Instant) -> bool {
        if self.deadline.is_some_and(|deadline| now >= deadline) {
            return false;
        }
        match self.config.limit {
            Limit::Requests(_) => self.budget.fetch_sub(1, Ordering::Relaxed) > 0,
            Limit::Duration(_) => true,
        }
    }

    /// Tops the connection up to `pipeline` requests in flight.
    fn refill(&mut self, connection: &mut Connection, now: Instant) {
        while connection.in_flight.len() < self.config.pipeline && self.may_issue(now) {
            let kind = self.config.ratio.pick(&mut self.rng);
            let key_index = self.rng.below(self.config.keys.count);
            self.config.keys.write(key_index, &mut self.key);
            let size = if kind == OpKind::Set { self.config.value_size.sample(&mut self.rng) } else { 0 };
            let opaque = connection.next_opaque;
            connection.next_opaque = connection.next_opaque.wrapping_add(1);
            encode(self.config.protocol, kind, &self.key, &self.value_pool[..size], opaque, &mut connection.out);
            connection.in_flight.push_back(InFlight { kind, key_index, opaque, sent: now });
        }
    }
}

fn run_thread(
    config: &BlastConfig,
    thread: usize,
    count: usize,
    budget: &AtomicI64,
    deadline: Option<Instant>,
) -> Result<BlastResult> {
    let mut result = BlastResult::empty();
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut connections = Vec::with_capacity(count);
    for index in 0..count {
        let mut connection = Connection::open(config.addr, config.pipeline)?;
        poll.registry().register(&mut connection.stream, Token(index), Interest::READABLE | Interest::WRITABLE)?;
        connections.push(Some(connection));
    }
    let mut generator = Generator {
        config,
        rng: Rng::new(config.seed ^ (thread as u64 + 1).wrapping_mul(0x5851_F42D_4C95_7F2D)),
        key: Vec::with_capacity(config.keys.length),
        value_pool: vec![b'x'; config.value_size.max()],
        budget,
        deadline,
    };
    let started = Instant::now();
    for connection in connections.iter_mut().flatten() {
        generator.refill(connection, started);
        if let Err(e) = connection.flush() {
            bail!("write to {}: {e}", config.addr);
        }
    }
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        let waiting: usize = connections.iter().flatten().map(|c| c.in_flight.len()).sum();
        if waiting == 0 {
            break;
        }
        let stopped = deadline.is_some_and(|deadline| now >= deadline + DRAIN_TIMEOUT);
        if stopped || now.duration_since(last_progress) >= STALL_TIMEOUT {
            result.error(waiting as u64, format!("{waiting} requests got no reply in time"));
            break;
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        let now = Instant::now();
        for event in events.iter() {
            let index = event.token().0;
            let Some(connection) = connections[index].as_mut() else { continue };
            let outcome = serve_event(config, &mut generator, connection, &mut result, now, event.is_readable());
            match outcome {
                Ok(progress) => {
                    if progress {
                        last_progress = now;
                    }
                }
                Err(what) => {
                    let lost = connection.in_flight.len() as u64;
                    result.error(lost.max(1), what);
                    let mut old = connections[index].take().expect("connection present");
                    let _ = poll.registry().deregister(&mut old.stream);
                    drop(old);
                    // Replace the connection so one bad reply does not end the run.
                    if let Ok(mut fresh) = Connection::open(config.addr, config.pipeline) {
                        poll.registry().register(&mut fresh.stream, Token(index), Interest::READABLE | Interest::WRITABLE)?;
                        generator.refill(&mut fresh, now);
                        if fresh.flush().is_ok() {
                            connections[index] = Some(fresh);
                        }
                    }
                }
            }
        }
    }
    Ok(result)
}

/// Handles one readiness event: read and check replies, top up and write. `Ok(true)` if replies came.
fn serve_event(
    config: &BlastConfig,
    generator: &mut Generator,
    connection: &mut Connection,
    result: &mut BlastResult,
    now: Instant,
    readable: bool,
) -> Result<bool, String> {
    let mut answered = 0;
    if readable {
        let filled = connection.fill();
        answered = parse_replies(config, generator, connection, result, now)?;
        if let Err(e) = filled {
            return Err(format!("connection lost with {} requests in flight: {e}", connection.in_flight.len()));
        }
    }
    generator.refill(connection, now);
    connection.flush().map_err(|e| format!("write failed: {e}"))?;
    Ok(answered > 0)
}

fn parse_replies(
    config: &BlastConfig,
    generator: &mut Generator,
    connection: &mut Connection,
    result: &mut BlastResult,
    now: Instant,
) -> Result<usize, String> {
    let mut answered = 0;
    while let Some(request) = connection.in_flight.front() {
        config.keys.write(request.key_index, &mut generator.key);
        let buf = &connection.input[connection.input_start..connection.input_end];
        match parse_reply(config.protocol, request.kind, &generator.key, request.opaque, buf) {
            Ok(Parsed::Incomplete) => break,
            Ok(Parsed::Reply { len, outcome }) => {
                let slot = OpKind::ALL.iter().position(|k| *k == request.kind).expect("known kind");
                result.replies[slot] += 1;
                result.hits[slot] += outcome.is_hit() as u64;
                let nanos = now.duration_since(request.sent).as_nanos().min(u64::MAX as u128) as u64;
                result.latency_ns.saturating_record(nanos.max(1));
                connection.input_start += len;
                connection.in_flight.pop_front();
                answered += 1;
            }
            Err(bad) => {
                let key = String::from_utf8_lossy(&generator.key).into_owned();
                return Err(format!("bad reply to {} {key}: {bad}", request.kind.name()));
            }
        }
    }
    if connection.input_start == connection.input_end {
        connection.input_start = 0;
        connection.input_end = 0;
    }
    Ok(answered)
}
