//! What replication costs, side by side in one run: tandemd alone, an active shipping to a standby in
//! async mode, and one in sync mode, all with the same threads and memory, prefilled alike and blasted
//! in turn (plain, async, sync, plain, ...). Reports the medians, the ratios to plain, the replication
//! lag seen while blasting (sampled from the active's `stats replication` every 10 ms), and the speed
//! of a full sync: a standby joining an active that holds `full_sync_mb` of data.
//!
//! Every process is a child of this one and dies with it ([`ServerChild`]); traffic stays on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::blast::{self, BlastConfig};
use super::compare::ServerChild;
use super::protocol::Protocol;
use super::report::BlastReport;
use super::stats;
use super::verify::{set_all, BatchClient};
use super::workload::{KeySpace, ValueSize};

#[derive(Clone, Debug)]
pub struct ReplicationBenchConfig {
    pub tandemd: PathBuf,
    pub server_threads: usize,
    pub memory_mb: usize,
    pub rounds: usize,
    pub blast: BlastConfig,
    /// Data held by the active when a standby joins (0 skips the full-sync measurement).
    pub full_sync_mb: usize,
    /// The async active's `async_batch_us`; None leaves tandemd's default.
    pub async_batch_us: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModeRound {
    pub round: usize,
    pub mode: &'static str,
    pub ops_per_sec: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// Replication lag samples during the blast (ms behind the active), p99 and max; 0 for plain.
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub lag_max_records: u64,
    /// The server's CPU (user + system) per request it answered during the blast, from `stats`.
    pub server_cpu_us_per_request: f64,
    /// The standby's CPU over the same blast, per request the active answered; 0 for plain. On a
    /// machine where the standby shares the cores, this is what replication takes from the active.
    pub standby_cpu_us_per_request: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplicationBenchReport {
    pub rounds: Vec<ModeRound>,
    /// Median ops/s per mode: plain, async, sync.
    pub median_ops: [f64; 3],
    pub median_p99_us: [f64; 3],
    pub median_lag_p99_ms: [f64; 2],
    /// Median server CPU per request per mode (plain, async, sync), and the standby's (async, sync).
    pub median_server_cpu_us: [f64; 3],
    pub median_standby_cpu_us: [f64; 2],
    /// async/plain and sync/plain ops/s.
    pub ratio_async: f64,
    pub ratio_sync: f64,
    pub full_sync_bytes: u64,
    pub full_sync_seconds: f64,
    pub full_sync_gb_per_s: f64,
    pub errors: u64,
}

const MODES: [&str; 3] = ["plain", "async", "sync"];

fn write_config(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, body)?;
    Ok(path)
}

fn server_args(config: &ReplicationBenchConfig, port: u16, memory_mb: usize, file: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = ["-p", &port.to_string(), "-l", "127.0.0.1", "-c", "4096"].map(String::from).to_vec();
    args.extend(["-t".into(), config.server_threads.to_string(), "-m".into(), memory_mb.to_string()]);
    if let Some(file) = file {
        args.extend(["--config".into(), file.display().to_string()]);
    }
    args
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A node pair's configs: the active's and the standby's.
fn pair_configs(dir: &Path, name: &str, mode: &str, repl_port: u16, secret: &Path, extra: &str) -> Result<(PathBuf, PathBuf)> {
    let secret = secret.display();
    let active = write_config(
        dir,
        &format!("{name}-active"),
        &format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:{repl_port}\"\nmode = \"{mode}\"\nsecret_file = \"{secret}\"\n{extra}"),
    )?;
    let standby = write_config(
        dir,
        &format!("{name}-standby"),
        &format!("[replication]\nrole = \"standby\"\npeers = [\"127.0.0.1:{repl_port}\"]\nsecret_file = \"{secret}\"\n"),
    )?;
    Ok((active, standby))
}

fn number(stats: &stats::Stats, name: &str) -> u64 {
    stats.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Waits until the standby streams every shard and has applied what the active logged.
fn wait_caught_up(active: SocketAddr, standby: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let a = stats::fetch(active, "replication")?;
        let s = stats::fetch(standby, "replication")?;
        if s.get("state").map(String::as_str) == Some("streaming") && a.get("newest") == s.get("applied") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("standby {standby} did not catch up within {timeout:?}: active {a:?}, standby {s:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn median(values: Vec<f64>) -> f64 {
    percentile(values, 0.5)
}

pub fn run(config: &ReplicationBenchConfig, mut on_round: impl FnMut(&ModeRound)) -> Result<ReplicationBenchReport> {
    if config.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("tandem-bench-replication-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret = dir.join("secret");
    std::fs::write(&secret, b"tandem-bench-replication-secret")?;
    let ports: Vec<u16> = (0..8).map(|_| crate::free_port()).collect();
    let batch = config.async_batch_us.map(|us| format!("async_batch_us = {us}\n")).unwrap_or_default();
    let (async_active, async_standby) = pair_configs(&dir, "async", "async", ports[5], &secret, &batch)?;
    let (sync_active, sync_standby) = pair_configs(&dir, "sync", "sync", ports[6], &secret, "")?;
    let start = |name, port, file: Option<&Path>| {
        ServerChild::start(name, &config.tandemd, &server_args(config, port, config.memory_mb, file), loopback(port))
    };
    let plain = start("plain", ports[0], None)?;
    let active_async = start("async", ports[1], Some(&async_active))?;
    let standby_async = start("async-standby", ports[2], Some(&async_standby))?;
    let active_sync = start("sync", ports[3], Some(&sync_active))?;
    let standby_sync = start("sync-standby", ports[4], Some(&sync_standby))?;
    let targets = [(&plain, None), (&active_async, Some(&standby_async)), (&active_sync, Some(&standby_sync))];
    for (server, standby) in &targets {
        let mut client = BatchClient::connect(server.addr, Protocol::Text)?;
        let (_, failures) = set_all(&mut client, config.blast.keys, config.blast.value_size, config.blast.seed, 100)?;
        if !failures.is_empty() {
            bail!("prefill of {} failed for {} keys, first: {}", server.name, failures.len(), failures[0]);
        }
        if let Some(standby) = standby {
            wait_caught_up(server.addr, standby.addr, Duration::from_secs(60))?;
        }
    }
    let mut rounds = Vec::new();
    for round in 1..=config.rounds {
        for (index, (server, standby)) in targets.iter().enumerate() {
            let blast_config = BlastConfig { addr: server.addr, ..config.blast.clone() };
            let done = Arc::new(AtomicBool::new(false));
            let sampler = standby.map(|_| {
                let done = done.clone();
                let addr = server.addr;
                std::thread::spawn(move || {
                    let mut lags = Vec::new();
                    let mut records = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        if let Ok(s) = stats::fetch(addr, "replication") {
                            lags.push(number(&s, "standby_0_lag_ms") as f64);
                            records = records.max(number(&s, "standby_0_lag_records"));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    (lags, records)
                })
            });
            let before = stats::fetch(server.addr, "")?;
            let standby_before = standby.map(|s| stats::fetch(s.addr, "")).transpose()?;
            let result = blast::run(&blast_config)?;
            done.store(true, Ordering::Relaxed);
            let usage = stats::ServerUsage::between(&before, &stats::fetch(server.addr, "")?)?;
            let standby_cpu_us = match (standby, standby_before) {
                (Some(s), Some(before)) => stats::ServerUsage::between(&before, &stats::fetch(s.addr, "")?)?.cpu_us,
                _ => 0.0,
            };
            let (lags, lag_records) = match sampler {
                Some(thread) => thread.join().map_err(|_| anyhow::anyhow!("lag sampler panicked"))?,
                None => (Vec::new(), 0),
            };
            let report = BlastReport::new(&blast_config, &result, None);
            let entry = ModeRound {
                round,
                mode: MODES[index],
                ops_per_sec: report.ops_per_sec,
                p99_us: report.latency.p99_us,
                errors: report.errors,
                lag_p99_ms: percentile(lags.clone(), 0.99),
                lag_max_ms: percentile(lags, 1.0),
                lag_max_records: lag_records,
                server_cpu_us_per_request: usage.cpu_us_per_request,
                standby_cpu_us_per_request: standby_cpu_us / usage.requests.max(1) as f64,
            };
            on_round(&entry);
            rounds.push(entry);
        }
    }
    drop((plain, active_async, standby_async, active_sync, standby_sync));
    let of = |mode: &str, pick: fn(&ModeRound) -> f64| median(rounds.iter().filter(|r| r.mode == mode).map(pick).collect());
    let median_ops = MODES.map(|m| of(m, |r| r.ops_per_sec));
    let median_p99_us = MODES.map(|m| of(m, |r| r.p99_us));
    let median_lag_p99_ms = [of("async", |r| r.lag_p99_ms), of("sync", |r| r.lag_p99_ms)];
    let median_server_cpu_us = MODES.map(|m| of(m, |r| r.server_cpu_us_per_request));
    let median_standby_cpu_us = [of("async", |r| r.standby_cpu_us_per_request), of("sync", |r| r.standby_cpu_us_per_request)];
    let (full_sync_bytes, full_sync_seconds) = if config.full_sync_mb > 0 { full_sync(config, &dir, &secret)? } else { (0, 0.0) };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ReplicationBenchReport {
        errors: rounds.iter().map(|r| r.errors).sum(),
        ratio_async: median_ops[1] / median_ops[0],
        ratio_sync: median_ops[2] / median_ops[0],
        rounds,
        median_ops,
        median_p99_us,
        median_lag_p99_ms,
        median_server_cpu_us,
        median_standby_cpu_us,
        full_sync_bytes,
        full_sync_seconds,
        full_sync_gb_per_s: if full_sync_seconds > 0.0 { full_sync_bytes as f64 / full_sync_seconds / 1e9 } else { 0.0 },
    })
}

/// Fills an active with `full_sync_mb` of 4 KiB values, starts a standby, and times it until it
/// streams with everything applied. Returns the snapshot bytes shipped and the seconds taken.
fn full_sync(config: &ReplicationBenchConfig, dir: &Path, secret: &Path) -> Result<(u64, f64)> {
    let ports: Vec<u16> = (0..3).map(|_| crate::free_port()).collect();
    let (active_file, standby_file) = pair_configs(dir, "full", "async", ports[2], secret, "")?;
    let memory = config.full_sync_mb * 2 + 256;
    let active = ServerChild::start("full-active", &config.tandemd, &server_args(config, ports[0], memory, Some(&active_file)), loopback(ports[0]))?;
    let value = 4096;
    let count = (config.full_sync_mb as u64) << 20 >> 12;
    let keys = KeySpace::new(count, 16).map_err(anyhow::Error::msg)?;
    let mut client = BatchClient::connect(active.addr, Protocol::Text)?;
    let (_, failures) = set_all(&mut client, keys, ValueSize::Fixed(value), 7, 100).context("fill the active")?;
    if !failures.is_empty() {
        bail!("filling the active failed for {} keys, first: {}", failures.len(), failures[0]);
    }
    let before = number(&stats::fetch(active.addr, "replication")?, "snapshot_bytes");
    let started = Instant::now();
    let standby = ServerChild::start("full-standby", &config.tandemd, &server_args(config, ports[1], memory, Some(&standby_file)), loopback(ports[1]))?;
    wait_caught_up(active.addr, standby.addr, Duration::from_secs(300))?;
    let seconds = started.elapsed().as_secs_f64();
    let shipped = number(&stats::fetch(active.addr, "replication")?, "snapshot_bytes") - before;
    let items = number(&stats::fetch(standby.addr, "")?, "curr_items");
    if items != count {
        bail!("the standby holds {items} items after the full sync, the active {count}");
    }
    Ok((shipped, seconds))
}
