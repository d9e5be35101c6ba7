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
        let start_notes = crate::failover::resolve_start_role(&mut settings);
        let settings = Arc::new(settings);
        let threads = settings.threads;
        if threads == 0 {
            bail!("-t must be at least 1");
        }
        let mut addrs = Vec::new();
        for host in settings.listen.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            addrs.extend(crate::net::kernel::resolve(host, settings.port).with_context(|| format!("bad -l address {host:?}"))?);
        }
        // A plain bind (no SO_REUSEPORT) fails if anything, another tandemd included, already listens
        // there; without this probe a second server would silently share the port. With -p 0 the probe
        // also picks the port every listener then uses.
        let probe = std::net::TcpListener::bind(addrs[0]).with_context(|| format!("cannot listen on {}", addrs[0]))?;
        let port = probe.local_addr()?.port();
        for addr in &mut addrs {
            addr.set_port(port);
        }
        for addr in &addrs[1..] {
            drop(std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?);
        }
        drop(probe);

        let pollers = (0..threads).map(|_| mio::Poll::new()).collect::<Result<Vec<_>, _>>()?;
        let mut doorbells = Vec::new();
        for poll in &pollers {
            let waker = mio::Waker::new(poll.registry(), worker::WAKER)?;
            doorbells.push(Arc::new(mailbox::Doorbell::new(Box::new(PollWaker(waker)))));
        }
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
            workers: (0..threads).map(|_| OnceLock::new()).collect(),
            started: std::time::Instant::now(),
            replication: replication.as_ref().map(|node| node.state.clone()),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let mut handles = Vec::new();
        for (id, poll) in pollers.into_iter().enumerate() {
            let shared = shared.clone();
            let mailboxes = mailboxes.clone();
            let addrs = addrs.clone();
            let cpu = cpus.get(id % cpus.len().max(1)).copied();
            let ready = ready_tx.clone();
            let side = sides[id].take();
            let handle = std::thread::Builder::new().name(format!("tandem-w{id}")).spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                match worker::Worker::new(id, poll, &addrs, shared, mailboxes, side) {
                    Ok(mut w) => {
                        let _ = ready.send(Ok(()));
                        w.run();
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })?;
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
