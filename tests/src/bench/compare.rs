//! Side by side: start memcached and tandemd with the same threads and memory, prefill both with the
//! key space, warm both up (sets until the server's memory was written over once, bounded in time),
//! run the same blast against each in turn (A B A B ...), and summarise by medians and the ratios
//! tandemd/memcached.
//!
//! The warm-up is there because the servers reach their steady state differently: memcached reuses a
//! replaced item's slab chunk, so its memory stays the size of the data; tandemd's store is a log that
//! fills its whole arena before it reclaims, so a fresh tandemd faults in (and the kernel zeroes, and
//! on a virtual machine the host backs) memory while the first rounds run. Measured on the 4 KB 1:1
//! load with `-m 1024`: tandemd took 135k and 197k sets in its first two 3 s passes and 366-419k once
//! its RSS stopped at 1066 MB; memcached 289-384k throughout at 430 MB. Rounds are meant to compare the
//! two in the state a cache spends its life in.
//!
//! The load is tandem-bench's own [`blast`] or, with [`Client::Memaslap`], libmemcached-tools' memaslap
//! (see [`super::memaslap`]), with the server's own count of gets and sets checked against memaslap's.
//!
//! Both servers are children of this process; [`ServerChild`] kills its server on drop (so on every
//! error path too), and each child is also asked to die with its parent (`PR_SET_PDEATHSIG`).

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::blast::{self, BlastConfig};
use super::memaslap::{self, MemaslapConfig};
use super::protocol::Protocol;
use super::report::BlastReport;
use super::stats::{self, ServerUsage};
use super::verify::{set_all, BatchClient};

/// One server under test, killed when dropped.
pub struct ServerChild {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl ServerChild {
    /// Starts `program` with `args` and waits (up to 10 s) until it accepts on `addr`.
    pub fn start(name: impl Into<String>, program: &PathBuf, args: &[String], addr: SocketAddr) -> Result<ServerChild> {
        let name = name.into();
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches only the child's own state between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| format!("start {name} ({})", program.display()))?;
        let mut server = ServerChild { name, addr, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(addr).is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("{} exited at start-up with {status} (arguments {args:?})", server.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not accept on {addr} within 10 s", server.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which program drives the load.
#[derive(Clone, Debug, Default)]
pub enum Client {
    /// tandem-bench's own load loop.
    #[default]
    Blast,
    /// memaslap at this path (Debian's `/usr/bin/memcaslap`), from the same workload settings.
    Memaslap(PathBuf),
}

/// What `compare` runs.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    pub memcached: PathBuf,
    pub tandemd: PathBuf,
    pub server_threads: usize,
    /// The tandemd configurations to run, each against the same memcached in the same rounds.
    pub variants: Vec<Variant>,
    pub memory_mb: usize,
    pub item_size: Option<String>,
    pub rounds: usize,
    /// The most each server's warm-up may take (zero: none).
    pub warm_up: Duration,
    /// The blast to run; its address is replaced by each server's.
    pub blast: BlastConfig,
    pub client: Client,
}

/// One tandemd configuration: its own -t (when it differs from memcached's) and `[net] backend`
/// ("uring", "epoll"; written to a config file), tandemd's defaults where absent.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Variant {
    pub threads: Option<usize>,
    pub backend: Option<String>,
}

impl Variant {
    /// `backend:threads`, `backend` or `:threads` (as `--variant` takes it).
    pub fn parse(text: &str) -> Result<Variant> {
        let (backend, threads) = text.split_once(':').unwrap_or((text, ""));
        let threads = if threads.is_empty() { None } else { Some(threads.parse().with_context(|| format!("bad thread count in variant {text:?}"))?) };
        let backend = (!backend.is_empty()).then(|| backend.to_string());
        Ok(Variant { threads, backend })
    }

    fn name(&self, only: bool) -> String {
        if only {
            return "tandemd".into();
        }
        let mut name = String::from("tandemd");
        if let Some(backend) = &self.backend {
            name += &format!("-{backend}");
        }
        if let Some(threads) = self.threads {
            name += &format!("-t{threads}");
        }
        name
    }
}

/// One variant's medians, and their ratios to memcached's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VariantReport {
    pub name: String,
    pub variant: Variant,
    pub args: Vec<String>,
    pub medians: Medians,
    pub ratio: Medians,
}

/// One blast against one server.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Round {
    pub round: usize,
    pub server: String,
    pub ops_per_sec: f64,
    pub p99_us: f64,
    pub cpu_us_per_request: f64,
    pub client_cpu_us_per_request: f64,
    pub errors: u64,
    pub report: BlastReport,
}

/// Medians of one server's rounds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Medians {
    pub ops_per_sec: f64,
    pub p99_us: f64,
    pub cpu_us_per_request: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CompareReport {
    pub server_threads: usize,
    pub memory_mb: usize,
    /// Each server's warm-up, before the rounds.
    pub warm_ups: Vec<WarmUp>,
    pub memcached_args: Vec<String>,
    pub tandemd_args: Vec<String>,
    pub rounds: Vec<Round>,
    pub memcached: Medians,
    /// The first variant's medians.
    pub tandemd: Medians,
    /// tandemd / memcached, for each median (the first variant).
    pub ratio: Medians,
    /// Every variant (the first one included), in the order they ran in each round.
    pub variants: Vec<VariantReport>,
    pub errors: u64,
}

fn server_args(config: &CompareConfig, port: u16, variant: Option<&Variant>) -> Vec<String> {
    let memcached = variant.is_none();
    let mut args: Vec<String> = ["-p", &port.to_string(), "-l", "127.0.0.1", "-c", "4096"].map(String::from).to_vec();
    let threads = variant.and_then(|v| v.threads).unwrap_or(config.server_threads);
    args.extend(["-t".into(), threads.to_string(), "-m".into(), config.memory_mb.to_string()]);
    if let Some(backend) = variant.and_then(|v| v.backend.as_ref()) {
        let path = std::env::temp_dir().join(format!("tandem-bench-{}-{port}.toml", std::process::id()));
        if std::fs::write(&path, format!("[net]\nbackend = \"{backend}\"\n")).is_ok() {
            args.extend(["--config".into(), path.display().to_string()]);
        }
    }
    if let Some(item_size) = &config.item_size {
        args.extend(["-I".into(), item_size.clone()]);
    }
    if memcached {
        args.extend(["-U".into(), "0".into()]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            args.extend(["-u".into(), "root".into()]);
        }
    }
    args
}

/// One round driven by memaslap: its report, read as a blast's, with the key space it really used, and
/// an error when the server did not count memaslap's operations as gets and sets.
fn memaslap_round(program: &std::path::Path, blast_config: BlastConfig, server: &ServerChild) -> Result<BlastReport> {
    let memaslap_config = MemaslapConfig::from_blast(program, &blast_config)?;
    let keys = memaslap_config.window_thousands * 1000 * memaslap_config.concurrency as u64;
    let blast_config =
        BlastConfig { keys: super::workload::KeySpace::new(keys, blast_config.keys.length).map_err(anyhow::Error::msg)?, ..blast_config };
    let before = stats::fetch(server.addr, "")?;
    let mut result = memaslap::run(&memaslap_config)?;
    let after = stats::fetch(server.addr, "")?;
    let usage = ServerUsage::between(&before, &after)?;
    if let Err(refused) = memaslap::check_counted(result.total_replies(), usage.requests) {
        result.errors += 1;
        result.error_samples.push(format!("{}: {refused}", server.name));
    }
    Ok(BlastReport::new(&blast_config, &result, Some(usage)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Sets over the key space (the workload's values, connections and threads) until the values written
/// add up to the server's memory or `config.warm_up` has passed; see the module's note.
fn warm_up(config: &CompareConfig, server: &ServerChild) -> Result<WarmUp> {
    let started = Instant::now();
    let target = (config.memory_mb as u64) << 20;
    let per_set = (config.blast.value_size.max() + config.blast.keys.length) as u64;
    let pass = BlastConfig {
        addr: server.addr,
        ratio: "set=1".parse().map_err(anyhow::Error::msg)?,
        pipeline: config.blast.pipeline.max(4),
        limit: blast::Limit::Duration(Duration::from_secs(1).min(config.warm_up)),
        ..config.blast.clone()
    };
    let mut sets = 0u64;
    while sets * per_set < target && started.elapsed() < config.warm_up {
        let result = blast::run(&pass)?;
        if result.errors > 0 {
            bail!("warm-up of {} failed: {} errors, first: {:?}", server.name, result.errors, result.error_samples.first());
        }
        sets += result.replies.iter().sum::<u64>();
    }
    Ok(WarmUp { server: server.name.clone(), sets, mb_written: ((sets * per_set) >> 20) as usize, seconds: started.elapsed().as_secs_f64() })
}

/// What one server's warm-up did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WarmUp {
    pub server: String,
    pub sets: u64,
    /// Keys and values written, in MB.
    pub mb_written: usize,
    pub seconds: f64,
}

/// Runs the comparison; `on_round` sees each round as it finishes (for progress output).
pub fn run(config: &CompareConfig, mut on_round: impl FnMut(&Round)) -> Result<CompareReport> {
    if config.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let variants = if config.variants.is_empty() { vec![Variant::default()] } else { config.variants.clone() };
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 1 + variants.len() {
        let port = crate::free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let memcached_args = server_args(config, ports[0], None);
    let variant_args: Vec<Vec<String>> = variants.iter().zip(&ports[1..]).map(|(v, &port)| server_args(config, port, Some(v))).collect();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let only = variants.len() == 1;
    let mut servers = vec![ServerChild::start("memcached", &config.memcached, &memcached_args, loopback(ports[0]))?];
    for ((variant, args), &port) in variants.iter().zip(&variant_args).zip(&ports[1..]) {
        servers.push(ServerChild::start(variant.name(only), &config.tandemd, args, loopback(port))?);
    }
    for server in &servers {
        let mut client = BatchClient::connect(server.addr, Protocol::Text)?;
        let (_, failures) = set_all(&mut client, config.blast.keys, config.blast.value_size, config.blast.seed, 100)?;
        if !failures.is_empty() {
            bail!("prefill of {} failed for {} keys, first: {}", server.name, failures.len(), failures[0]);
        }
    }
    let warm_ups = servers.iter().map(|server| warm_up(config, server)).collect::<Result<Vec<_>>>()?;
    let mut rounds = Vec::new();
    for round in 1..=config.rounds {
        for server in &servers {
            let blast_config = BlastConfig { addr: server.addr, ..config.blast.clone() };
            let report = match &config.client {
                Client::Blast => {
                    let before = stats::fetch(server.addr, "")?;
                    let result = blast::run(&blast_config)?;
                    let after = stats::fetch(server.addr, "")?;
                    let usage = ServerUsage::between(&before, &after)?;
                    BlastReport::new(&blast_config, &result, Some(usage))
                }
                Client::Memaslap(program) => memaslap_round(program, blast_config, server)?,
            };
            let usage = report.server_usage.expect("every round reads the server's stats");
            let entry = Round {
                round,
                server: server.name.clone(),
                ops_per_sec: report.ops_per_sec,
                p99_us: report.latency.p99_us,
                cpu_us_per_request: usage.cpu_us_per_request,
                client_cpu_us_per_request: report.client_cpu_us_per_request,
                errors: report.errors,
                report,
            };
            on_round(&entry);
            rounds.push(entry);
        }
    }
    let medians = |name: &str| {
        let of = |pick: fn(&Round) -> f64| median(rounds.iter().filter(|r| r.server == name).map(pick).collect());
        Medians {
            ops_per_sec: of(|r| r.ops_per_sec),
            p99_us: of(|r| r.p99_us),
            cpu_us_per_request: of(|r| r.cpu_us_per_request),
        }
    };
    let memcached = medians("memcached");
    let ratio_of = |m: Medians| Medians {
        ops_per_sec: m.ops_per_sec / memcached.ops_per_sec,
        p99_us: m.p99_us / memcached.p99_us,
        cpu_us_per_request: m.cpu_us_per_request / memcached.cpu_us_per_request,
    };
    let variant_reports: Vec<VariantReport> = variants
        .iter()
        .zip(variant_args)
        .map(|(variant, args)| {
            let name = variant.name(only);
            let m = medians(&name);
            VariantReport { name, variant: variant.clone(), args, medians: m, ratio: ratio_of(m) }
        })
        .collect();
    let (tandemd, ratio) = (variant_reports[0].medians, variant_reports[0].ratio);
    let tandemd_args = variant_reports[0].args.clone();
    let errors = rounds.iter().map(|r| r.errors).sum();
    drop(servers);
    Ok(CompareReport {
        server_threads: config.server_threads,
        memory_mb: config.memory_mb,
        warm_ups,
        memcached_args,
        tandemd_args,
        rounds,
        memcached,
        tandemd,
        ratio,
        variants: variant_reports,
        errors,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn medians() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn variants() {
        use super::Variant;
        let v = Variant::parse("uring:1").unwrap();
        assert_eq!((v.backend.as_deref(), v.threads), (Some("uring"), Some(1)));
        assert_eq!(v.name(false), "tandemd-uring-t1");
        assert_eq!(v.name(true), "tandemd");
        let v = Variant::parse(":2").unwrap();
        assert_eq!((v.backend.as_deref(), v.threads), (None, Some(2)));
        assert_eq!(Variant::parse("epoll").unwrap().name(false), "tandemd-epoll");
        assert!(Variant::parse("uring:x").is_err());
    }
}
