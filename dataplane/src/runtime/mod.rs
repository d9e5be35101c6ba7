//! Worker threads pinned to CPUs, each owning one shard, its listeners and its connections.
//!
//! - [`worker`]: one core's poll loop: accept, read, parse, route, execute, reply, and mail.
//! - [`conn`]: a connection, with replies kept in request order across cores.
//! - [`mailbox`]: the bounded rings between cores, batched per poll round.
//! - [`report`]: `stats` answers, assembled from every shard's counters.
//!
//! [`Server::start`] builds one store per worker on the worker's own thread (so its memory is touched
//! there first), binds the listeners, and returns once every worker serves.

pub mod conn;
pub mod mailbox;
pub mod report;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use anyhow::{bail, Context};

use crate::config::Settings;
use crate::stats::{CommandCounters, ConnCounters};
use crate::store::{Backing, StoreStats};

/// What every worker publishes about itself for `stats`, once it is up.
pub struct WorkerInfo {
    pub commands: Arc<CommandCounters>,
    pub store: Arc<StoreStats>,
    pub conns: Arc<ConnCounters>,
    pub backing: Backing,
    /// Open connections: fd and peer (for `stats conns`). Touched on accept and close only.
    pub conn_list: Mutex<Vec<(i32, Option<SocketAddr>)>>,
    pub listeners: Vec<(i32, SocketAddr)>,
    /// The network backend's counters (`stats net`), copied from the transport once a second.
    pub net: Mutex<Vec<(&'static str, u64)>>,
    /// Poll rounds finished; only this worker writes it. The systemd watchdog is fed only while every
    /// worker's count moves (an idle worker still finishes a round per second: its poll timeout).
    pub rounds: AtomicU64,
}

/// State shared by all workers. Nothing here is touched per request except through atomics that are
/// read-mostly (`shutdown`) or per connection (`open_connections`).
pub struct Shared {
    pub settings: Arc<Settings>,
    pub shutdown: AtomicBool,
    /// Connections open across all workers, checked against `-c` on accept.
    pub open_connections: AtomicUsize,
    /// The memory limit in bytes: `-m`, until `cache_memlimit` changes it (within the arenas mapped
    /// from `-m` at start-up).
    pub memory_limit: AtomicUsize,
    pub workers: Vec<OnceLock<WorkerInfo>>,
    pub started: std::time::Instant,
    /// This node's replication role and report, if it replicates.
    pub replication: Option<Arc<crate::replication::NodeState>>,
}

impl Shared {
    pub fn worker_infos(&self) -> impl Iterator<Item = &WorkerInfo> {
        self.workers.iter().filter_map(|w| w.get())
    }
}

/// A running server.
pub struct Server {
    pub shared: Arc<Shared>,
    replication: Option<crate::replication::Node>,
    /// `tandemctl`'s endpoint, with replication.
    admin: Option<crate::admin::AdminServer>,
    mailboxes: Arc<mailbox::Mailboxes>,
    threads: Vec<JoinHandle<()>>,
    /// The addresses actually bound (the port is resolved when `-p 0`).
    pub addrs: Vec<SocketAddr>,
}

impl Server {
    /// Starts `settings.threads` workers and waits until each has its store and listeners.
    pub fn start(settings: Settings) -> anyhow::Result<Server> {
        let mut settings = settings;
        if settings.net != crate::config::NetBackend::Kernel {
            // Dataplane mode: the service address lives on the workers' stacks.
            if let Some(failover) = settings.failover.as_mut() {
                failover.stack = Some(Arc::new(crate::failover::ServiceSlot::new(failover.service_ip, failover.prefix_len)));
            }
        }
        if let Some(path) = &settings.memory_file {
            // Restored items are timed by the clock of the run that wrote them: continue it.
            if let Some(origin) = crate::store::file_clock_origin(&crate::config::shard_memory_file(path, 0)) {
                if crate::clock::Clock::continue_from(origin) {
                    tracing::info!(origin, "continuing the clock of the memory file's previous run");
                }
            }
        }
        if settings.net == crate::config::NetBackend::Kernel && settings.kernel_io == crate::config::KernelIo::Uring {
            if let Err(e) = crate::net::uring::probe() {
                tracing::warn!(error = %e, "io_uring cannot be set up here; serving kernel sockets through epoll instead");
                settings.kernel_io = crate::config::KernelIo::Epoll;
            }
        }
        let start_notes = crate::failover::resolve_start_role(&mut settings);
        let settings = Arc::new(settings);
        let threads = settings.threads;
        if threads == 0 {
            bail!("-t must be at least 1");
        }
        let (mut nets, addrs) = WorkerNet::prepare(&settings)?;
        let doorbells = nets.iter().map(WorkerNet::doorbell).collect::<anyhow::Result<Vec<_>>>()?;
        let mailboxes = mailbox::Mailboxes::new(doorbells);
        let cpus = allowed_cpus();
        // The replication core gets a CPU of its own when there is one beyond the workers'.
        let (replication, mut sides) = match &settings.replication {
            Some(config) => {
                let wake = Arc::new(WakeWorkers(mailboxes.clone()));
                let cpu = (cpus.len() > threads).then(|| cpus[threads]);
                let (node, sides) = crate::replication::Node::start(config, settings.failover.as_ref(), threads, wake, cpu)?;
                (Some(node), sides.into_iter().map(Some).collect())
            }
            None => (None, (0..threads).map(|_| None).collect::<Vec<_>>()),
        };
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            shutdown: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            memory_limit: AtomicUsize::new(settings.memory_limit),
            workers: (0..threads).map(|_| OnceLock::new()).collect(),
            started: std::time::Instant::now(),
            replication: replication.as_ref().map(|node| node.state.clone()),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let mut handles = Vec::new();
        for (id, net) in nets.drain(..).enumerate() {
            let start = WorkerStart {
                id,
                shared: shared.clone(),
                mailboxes: mailboxes.clone(),
                side: sides[id].take(),
                cpu: cpus.get(id % cpus.len().max(1)).copied(),
                ready: ready_tx.clone(),
            };
            let handle = std::thread::Builder::new().name(format!("tandem-w{id}")).spawn(move || net.run(start))?;
            handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    shared.shutdown.store(true, Ordering::SeqCst);
                    for i in 0..threads {
                        mailboxes.doorbell(i).ring();
                    }
                    return Err(e);
                }
                Err(_) => bail!("a worker thread died while starting"),
            }
        }
        if let Some(node) = &replication {
            for note in start_notes {
                node.state.note(note);
            }
        }
        // An active with failover serves on the service address from the start.
        if let (Some(failover), Some(node)) = (&settings.failover, &replication) {
            if node.state.writable() {
                let outcome = crate::failover::take_service_address(failover);
                if let Err(e) = &outcome {
                    tracing::error!(error = %e, "cannot take the service address");
                }
                node.state.note(format!(
                    "started as active: service address {}/{} {}",
                    failover.service_ip,
                    failover.prefix_len,
                    outcome.map_or_else(|e| format!("NOT claimed: {e}"), |()| "claimed and announced".to_string())
                ));
            }
        }
        let admin = match (&settings.admin_socket, &replication) {
            (Some(path), Some(node)) => Some(crate::admin::AdminServer::start(path, node.state.clone())?),
            _ => None,
        };
        Ok(Server { shared, replication, admin, mailboxes, threads: handles, addrs })
    }

    /// Asks every worker to stop.
    pub fn stop(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for i in 0..self.mailboxes.workers() {
            self.mailboxes.doorbell(i).ring();
        }
    }

    /// Waits for every worker to finish, then stops replication.
    pub fn join(mut self) {
        if let Some(mut admin) = self.admin.take() {
            admin.stop();
        }
        for t in self.threads {
            let _ = t.join();
        }
        if let Some(mut node) = self.replication.take() {
            node.stop();
        }
    }
}

/// One worker outside a server, on the caller's thread, driven by [`worker::Worker::round`]: the whole
/// per-core path (transport, codec, store) with nothing else, for benchmarks. `settings.threads` is 1.
pub fn standalone_worker<T: crate::net::Transport>(mut settings: Settings, net: T) -> anyhow::Result<worker::Worker<T>> {
    settings.threads = 1;
    let shared = Arc::new(Shared {
        shutdown: AtomicBool::new(false),
        open_connections: AtomicUsize::new(0),
        memory_limit: AtomicUsize::new(settings.memory_limit),
        settings: Arc::new(settings),
        workers: vec![OnceLock::new()],
        started: std::time::Instant::now(),
        replication: None,
    });
    let mailboxes = mailbox::Mailboxes::new(vec![Arc::new(mailbox::Doorbell::new(Box::new(NoWake)))]);
    worker::Worker::new(0, || Ok(net), shared, mailboxes, None)
}

/// The doorbell of a worker nobody else mails.
struct NoWake;

impl mailbox::Wake for NoWake {
    fn wake(&self) {}
}

/// What a worker thread needs besides its network.
struct WorkerStart {
    id: usize,
    shared: Arc<Shared>,
    mailboxes: Arc<mailbox::Mailboxes>,
    side: Option<crate::replication::WorkerSide>,
    cpu: Option<usize>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
}

impl WorkerStart {
    /// Pins the thread, builds the worker on it (its store, then its network), reports, and serves.
    fn run<T: crate::net::Transport>(self, net: impl FnOnce() -> anyhow::Result<T>) {
        if let Some(cpu) = self.cpu {
            pin_to_cpu(cpu);
        }
        match worker::Worker::new(self.id, net, self.shared, self.mailboxes, self.side) {
            Ok(mut w) => {
                let _ = self.ready.send(Ok(()));
                w.run();
            }
            Err(e) => {
                let _ = self.ready.send(Err(e));
            }
        }
    }
}

/// One worker's network, chosen by `[net]`, prepared before its thread starts.
enum WorkerNet {
    Kernel { poll: mio::Poll, addrs: Vec<SocketAddr> },
    Uring { bell: Arc<crate::net::uring::Bell>, addrs: Vec<SocketAddr> },
    Tap { name: String, config: crate::net::stack::StackConfig, drop_percent: u8, bell: Arc<crate::net::stack::ThreadBell> },
    #[cfg(feature = "dpdk")]
    Dpdk {
        /// Boxed: a queue holds its burst arrays (most of a kilobyte) and the variants move around.
        queue: Box<crate::net::phy::dpdk::DpdkQueue>,
        /// The worker's index among the port's (or ports') workers, for the ARP exchange.
        worker: usize,
        config: crate::net::stack::StackConfig,
        drop_percent: u8,
        arp: Arc<crate::net::phy::arp_share::ArpExchange>,
        bell: Arc<crate::net::stack::ThreadBell>,
    },
}

impl WorkerNet {
    /// Checks the addresses (kernel) and prepares one network per worker; returns them with the
    /// addresses served.
    fn prepare(settings: &Settings) -> anyhow::Result<(Vec<WorkerNet>, Vec<SocketAddr>)> {
        use crate::config::NetBackend;
        let threads = settings.threads;
        match &settings.net {
            NetBackend::Kernel => {
                let addrs = kernel_addresses(settings)?;
                let nets = (0..threads)
                    .map(|_| {
                        Ok(match settings.kernel_io {
                            crate::config::KernelIo::Epoll => WorkerNet::Kernel { poll: mio::Poll::new()?, addrs: addrs.clone() },
                            crate::config::KernelIo::Uring => WorkerNet::Uring { bell: crate::net::uring::Bell::new()?, addrs: addrs.clone() },
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok((nets, addrs))
            }
            NetBackend::Tap(stack) => {
                if threads != 1 {
                    bail!("the tap backend serves one worker; use threads = 1");
                }
                if settings.port == 0 {
                    bail!("-p 0 (pick a free port) works with kernel sockets only; give the userspace stack a port");
                }
                let service = settings.failover.as_ref().and_then(|f| f.stack.as_ref());
                let config = stack_config(stack, service, settings.port, stack.mac.unwrap_or_else(|| local_mac(stack.address)), 0);
                let addr = SocketAddr::new(stack.address.into(), settings.port);
                let net = WorkerNet::Tap { name: stack.tap_name.clone(), config, drop_percent: stack.drop_percent, bell: Default::default() };
                Ok((vec![net], vec![addr]))
            }
            #[cfg(feature = "dpdk")]
            NetBackend::Dpdk(stack) => {
                use crate::net::phy::dpdk::{Eal, Port};
                if settings.port == 0 {
                    bail!("-p 0 (pick a free port) works with kernel sockets only; give the userspace stack a port");
                }
                let eal = Eal::init(&stack.eal_args)?;
                let workers = u16::try_from(threads).context("too many workers for DPDK")?;
                // Each worker's queue: queue w of one port, or queue 0 of port `port_id + w`.
                let mut queues = Vec::new();
                let mut mac = None;
                if stack.port_per_worker {
                    let first = stack.port_id.unwrap_or(0);
                    for w in 0..workers {
                        let port_id = first.checked_add(w).context("net.dpdk.port_id + workers is past the last port id")?;
                        let mut port = Port::open(&eal, Some(port_id), 1, stack.mac)
                            .with_context(|| format!("port_per_worker: cannot open DPDK port {port_id} for worker {w} (one --vdev per worker)"))?;
                        if mac.is_some_and(|m| m != port.mac()) {
                            bail!("port_per_worker: DPDK port {port_id} has another MAC than port {first}; the workers' ports must share one (one device's queues)");
                        }
                        mac = Some(port.mac());
                        queues.push(port.take_queue(0).context("a DPDK port opened with one queue has none")?);
                    }
                } else {
                    let mut port = Port::open(&eal, stack.port_id, workers, stack.mac)
                        .with_context(|| format!("cannot open the DPDK port with {workers} queue pair(s), one per worker"))?;
                    mac = Some(port.mac());
                    for q in 0..workers {
                        queues.push(port.take_queue(q).context("the DPDK port has fewer queues than workers")?);
                    }
                }
                let mac = mac.context("no worker")?;
                let arp = crate::net::phy::arp_share::ArpExchange::new(threads);
                let mut nets = Vec::new();
                for (worker, queue) in queues.into_iter().enumerate() {
                    let service = settings.failover.as_ref().and_then(|f| f.stack.as_ref());
                    let config = stack_config(stack, service, settings.port, mac, worker);
                    nets.push(WorkerNet::Dpdk { queue: Box::new(queue), worker, config, drop_percent: stack.drop_percent, arp: arp.clone(), bell: Default::default() });
                }
                tracing::info!(mac = %crate::net::format_mac(mac), workers, port_per_worker = stack.port_per_worker, address = %stack.address, "DPDK open");
                // The queues keep the port and EAL alive; these handles may go.
                let addr = SocketAddr::new(stack.address.into(), settings.port);
                Ok((nets, vec![addr]))
            }
            #[cfg(not(feature = "dpdk"))]
            NetBackend::Dpdk(_) => bail!(
                "[net] backend = \"dpdk\": this tandemd was built without DPDK; build with `cargo build --release -p dataplane --features dpdk`"
            ),
        }
    }

    /// The doorbell other cores ring to wake this worker.
    fn doorbell(&self) -> anyhow::Result<Arc<mailbox::Doorbell>> {
        Ok(match self {
            WorkerNet::Kernel { poll, .. } => {
                let waker = mio::Waker::new(poll.registry(), crate::net::kernel::WAKER)?;
                Arc::new(mailbox::Doorbell::new(Box::new(PollWaker(waker))))
            }
            WorkerNet::Uring { bell, .. } => Arc::new(mailbox::Doorbell::new(Box::new(bell.clone()))),
            WorkerNet::Tap { bell, .. } => Arc::new(mailbox::Doorbell::new(Box::new(bell.clone()))),
            #[cfg(feature = "dpdk")]
            WorkerNet::Dpdk { bell, .. } => Arc::new(mailbox::Doorbell::new(Box::new(bell.clone()))),
        })
    }

    /// Runs on the worker's own thread.
    fn run(self, start: WorkerStart) {
        match self {
            WorkerNet::Kernel { poll, addrs } => start.run(move || Ok(crate::net::kernel::KernelTransport::new(poll, &addrs)?)),
            // The ring is set up here, on the worker's thread: SINGLE_ISSUER binds it to its creator.
            WorkerNet::Uring { bell, addrs } => start.run(move || Ok(crate::net::uring::UringTransport::new(&addrs, bell)?)),
            WorkerNet::Tap { name, config, drop_percent, bell } => start.run(move || {
                let phy = crate::net::phy::tap::TapPhy::open(&name)?;
                let phy = crate::net::phy::lossy::Lossy::new(crate::net::phy::check::Checked::new(phy), drop_percent, config.seed);
                tracing::info!(tap = %name, address = %config.address, port = config.port, "serving through the userspace stack on a tap device");
                Ok(crate::net::stack::StackTransport::new(phy, config, bell))
            }),
            #[cfg(feature = "dpdk")]
            WorkerNet::Dpdk { queue, worker, config, drop_percent, arp, bell } => start.run(move || {
                use crate::net::phy::{arp_share::ArpShare, check::Checked, lossy::Lossy};
                queue.register_thread()?;
                let phy = Lossy::new(Checked::new(ArpShare::new(*queue, worker, arp)), drop_percent, config.seed);
                Ok(crate::net::stack::StackTransport::new(phy, config, bell))
            }),
        }
    }
}

/// The kernel backend's listen addresses, checked free (and the port picked, with `-p 0`).
fn kernel_addresses(settings: &Settings) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for host in settings.listen.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        addrs.extend(crate::net::kernel::resolve(host, settings.port).with_context(|| format!("bad -l address {host:?}"))?);
    }
    // A plain bind (no SO_REUSEPORT) fails if anything, another tandemd included, already listens
    // there; without this probe a second server would silently share the port. With -p 0 the probe
    // also picks the port every listener then uses.
    let probe = crate::net::kernel::claim_port(addrs[0]).with_context(|| format!("cannot listen on {}", addrs[0]))?;
    let port = probe.local_addr()?.as_socket().map_or(settings.port, |a| a.port());
    for addr in &mut addrs {
        addr.set_port(port);
    }
    for addr in &addrs[1..] {
        drop(crate::net::kernel::claim_port(*addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    drop(probe);
    Ok(addrs)
}

/// A worker's stack settings from `[net.*]`.
fn stack_config(
    stack: &crate::config::StackSettings,
    service: Option<&Arc<crate::failover::ServiceSlot>>,
    port: u16,
    mac: [u8; 6],
    worker: usize,
) -> crate::net::stack::StackConfig {
    let mut config = crate::net::stack::StackConfig::new(stack.address, stack.prefix_len, mac, port);
    config.gateway = stack.gateway;
    config.backlog = stack.backlog;
    config.max_half_open = stack.max_half_open;
    config.rx_buffer = stack.rx_buffer;
    config.tx_buffer = stack.tx_buffer;
    config.idle = crate::net::stack::IdlePolicy { spin: stack.idle_spin, sleep: stack.idle_sleep };
    config.service = service.cloned();
    config.announce = worker == 0;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    config.seed = nanos ^ ((worker as u64) << 56) ^ std::process::id() as u64;
    config
}

/// A locally administered MAC made from the address, for devices that bring none of their own.
fn local_mac(address: std::net::Ipv4Addr) -> [u8; 6] {
    let a = address.octets();
    [0x02, 0x7a, a[0], a[1], a[2], a[3]]
}

/// Wakes workers for the replication core: acks, snapshot requests, records to apply. Every worker is
/// nudged (a sync-mode reply held on one core may wait for another shard's ack); a nudge costs a
/// syscall only for a worker that sleeps.
struct WakeWorkers(Arc<mailbox::Mailboxes>);

impl replica::port::Wake for WakeWorkers {
    fn wake(&self, _shard: usize) {
        for worker in 0..self.0.workers() {
            self.0.doorbell(worker).nudge();
        }
    }
}

struct PollWaker(mio::Waker);

impl mailbox::Wake for PollWaker {
    fn wake(&self) {
        let _ = self.0.wake();
    }
}

/// CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Pins the calling thread to one CPU (best effort: logged, not fatal).
pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "could not pin worker to cpu");
    }
}
