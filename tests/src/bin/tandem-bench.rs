//! `tandem-bench`: load and correctness runs against any memcached-compatible server.
//!
//! - `blast`: a timed or counted mix of set/get/touch/delete, with latency percentiles.
//! - `setget`: set a key space, read every byte back; exits nonzero on any mismatch.
//! - `sizes`: values from 1 byte up to the server's item limit; reports the first failing size.
//! - `compare`: memcached and tandemd side by side (A B A B ...), medians and ratios.
//!
//! Every subcommand takes `--json` for a machine-readable report on stdout.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use tandem_tests::bench::blast::{self, BlastConfig, Limit};
use tandem_tests::bench::compare::{self, CompareConfig};
use tandem_tests::bench::replication::{self, ReplicationBenchConfig};
use tandem_tests::bench::protocol::Protocol;
use tandem_tests::bench::report::BlastReport;
use tandem_tests::bench::stats::{self, ServerUsage};
use tandem_tests::bench::verify::{self, check_all, set_all, BatchClient};
use tandem_tests::bench::workload::{KeySpace, Ratio, ValueSize};

#[derive(Parser)]
#[command(name = "tandem-bench", about = "Load tester for memcached-compatible servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive a mix of set/get/touch/delete and report throughput and latency.
    Blast {
        #[arg(long, default_value = "127.0.0.1:11211")]
        server: String,
        #[command(flatten)]
        workload: Workload,
        #[arg(long)]
        json: bool,
    },
    /// Set every key, then get every key and compare each byte.
    Setget {
        #[arg(long, default_value = "127.0.0.1:11211")]
        server: String,
        #[arg(long, value_enum, default_value = "text")]
        protocol: Protocol,
        #[arg(long, default_value_t = 1000)]
        keys: u64,
        #[arg(long, default_value_t = 16)]
        key_length: usize,
        /// `N` bytes, or `uniform:MIN-MAX`.
        #[arg(long, default_value = "uniform:1-4096")]
        value_size: ValueSize,
        /// Requests per write.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Set and get growing values up to the server's item_size_max; report the first failing size.
    Sizes {
        #[arg(long, default_value = "127.0.0.1:11211")]
        server: String,
        #[arg(long, value_enum, default_value = "text")]
        protocol: Protocol,
        /// Stop at this size instead of item_size_max.
        #[arg(long)]
        max: Option<usize>,
        /// A failure this many bytes or more below item_size_max is an error (item headers and the key
        /// take some of the limit).
        #[arg(long, default_value_t = 1024)]
        overhead: usize,
        #[arg(long)]
        json: bool,
    },
    /// Start memcached and tandemd, prefill both, blast each in turn for several rounds.
    Compare {
        #[arg(long, default_value = "/usr/bin/memcached")]
        memcached: PathBuf,
        #[arg(long, default_value = "target/release/tandemd")]
        tandemd: PathBuf,
        /// Server worker threads (-t), the same for both.
        #[arg(long, default_value_t = 2)]
        server_threads: usize,
        /// A tandemd configuration, `backend:threads` (e.g. `uring:1`, `epoll:2`, `:1`): its `[net]
        /// backend` and its own -t (else --server-threads). Repeat to run several against the same
        /// memcached in the same rounds (memcached, then each variant, in every round).
        #[arg(long = "variant")]
        variants: Vec<String>,
        /// Server memory in MB (-m), the same for both.
        #[arg(long, default_value_t = 1024)]
        memory: usize,
        /// Item size limit (-I), the same for both; the servers' default if absent.
        #[arg(long)]
        item_size: Option<String>,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Before the rounds, each server takes sets until its memory (--memory) was written over once,
        /// for at most this many seconds (0: no warm-up): tandemd's store fills its whole arena before
        /// it reuses any, and rounds that fault it in measure a server still warming up.
        #[arg(long, default_value_t = 10)]
        warm_up: u64,
        /// Which program drives the load: tandem-bench's own blast, or memaslap (text or binary,
        /// --pipeline 1, set and get only; --keys becomes its key window, in thousands per connection;
        /// its latency percentiles are the upper edges of its power-of-two buckets).
        #[arg(long, value_enum, default_value = "blast")]
        client: ClientKind,
        /// The memaslap binary for `--client memaslap`.
        #[arg(long, default_value = "/usr/bin/memcaslap")]
        memaslap: PathBuf,
        #[command(flatten)]
        workload: Workload,
        #[arg(long)]
        json: bool,
    },
    /// Side by side: tandemd alone, replicating async, replicating sync; plus a full sync's speed.
    Replication {
        #[arg(long, default_value = "target/release/tandemd")]
        tandemd: PathBuf,
        #[arg(long, default_value_t = 2)]
        server_threads: usize,
        #[arg(long, default_value_t = 1024)]
        memory: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// MB of data the active holds when a standby joins for the full-sync measurement (0: skip).
        #[arg(long, default_value_t = 512)]
        full_sync_mb: usize,
        /// The async active's `[replication] async_batch_us` (default: tandemd's own).
        #[arg(long)]
        async_batch_us: Option<u64>,
        #[command(flatten)]
        workload: Workload,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ClientKind {
    Blast,
    Memaslap,
}

/// The load shared by `blast`, `compare` and `replication`.
#[derive(Args, Clone)]
struct Workload {
    #[arg(long, value_enum, default_value = "text")]
    protocol: Protocol,
    /// Command weights, e.g. `set=1,get=10,touch=1,delete=1`.
    #[arg(long, default_value = "set=1,get=10")]
    ratio: Ratio,
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Client threads; connections are dealt out among them.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 16)]
    key_length: usize,
    /// `N` bytes, or `uniform:MIN-MAX`.
    #[arg(long, default_value = "32")]
    value_size: ValueSize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Stop after this many requests in all.
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u64>,
    /// Stop issuing after this long (`10`, `10s`, `500ms`); the default when --requests is absent is 10 s.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Workload {
    fn config(&self, addr: SocketAddr) -> Result<BlastConfig> {
        let keys = KeySpace::new(self.keys, self.key_length).map_err(anyhow::Error::msg)?;
        let limit = match (self.requests, self.duration) {
            (Some(count), _) => Limit::Requests(count),
            (None, Some(duration)) => Limit::Duration(duration),
            (None, None) => Limit::Duration(Duration::from_secs(10)),
        };
        Ok(BlastConfig {
            addr,
            protocol: self.protocol,
            ratio: self.ratio.clone(),
            keys,
            value_size: self.value_size,
            connections: self.connections,
            threads: self.threads,
            pipeline: self.pipeline,
            limit,
            seed: self.seed,
        })
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 1.0)
    };
    let seconds: f64 = number.parse().map_err(|_| format!("{text:?}: expected seconds, `10s` or `500ms`"))?;
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds * scale))
}

fn resolve(server: &str) -> Result<SocketAddr> {
    server.to_socket_addrs()?.next().with_context(|| format!("{server}: no address"))
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Exit status: success only when the run found nothing wrong.
fn status(clean: bool) -> ExitCode {
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Blast { server, workload, json } => {
            let config = workload.config(resolve(&server)?)?;
            let before = stats::fetch(config.addr, "").ok();
            let result = blast::run(&config)?;
            let after = stats::fetch(config.addr, "").ok();
            let usage = match (before, after) {
                (Some(before), Some(after)) => ServerUsage::between(&before, &after).ok(),
                _ => None,
            };
            let report = BlastReport::new(&config, &result, usage);
            if json {
                print_json(&report)?;
            } else {
                print!("{report}");
            }
            Ok(status(report.errors == 0 && report.ops > 0))
        }
        Command::Setget { server, protocol, keys, key_length, value_size, batch, seed, json } => {
            let addr = resolve(&server)?;
            let keys = KeySpace::new(keys, key_length).map_err(anyhow::Error::msg)?;
            let mut client = BatchClient::connect(addr, protocol)?;
            let (sizes, mut failures) = set_all(&mut client, keys, value_size, seed, batch)?;
            failures.extend(check_all(&mut client, keys, &sizes, batch)?);
            let report = serde_json::json!({
                "server": addr.to_string(),
                "protocol": protocol,
                "keys": keys.count,
                "value_size": value_size.to_string(),
                "bytes": sizes.iter().sum::<usize>(),
                "errors": failures.len(),
                "failures": failures.iter().take(20).collect::<Vec<_>>(),
            });
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "setget {addr} over {protocol:?}: {} keys, values {value_size} B, {} bytes: {} errors",
                    keys.count,
                    sizes.iter().sum::<usize>(),
                    failures.len()
                );
                for failure in failures.iter().take(20) {
                    println!("  error: {failure}");
                }
            }
            Ok(status(failures.is_empty()))
        }
        Command::Sizes { server, protocol, max, overhead, json } => {
            let report = verify::sizes(resolve(&server)?, protocol, max)?;
            let limit = max.unwrap_or(report.item_size_max).min(report.item_size_max);
            let early = report.first_failing.is_some_and(|size| size + overhead <= limit);
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "sizes {} over {:?}: item_size_max {}, {} sizes tried, largest stored and read back intact: {}",
                    report.server, report.protocol, report.item_size_max, report.sizes_tried, report.largest_ok
                );
                match (&report.first_failing, &report.failure) {
                    (Some(size), Some(failure)) => println!("  first failing size: {size}: {failure}"),
                    _ => println!("  no size up to {limit} failed"),
                }
            }
            Ok(status(!report.corrupt && !early))
        }
        Command::Replication { tandemd, server_threads, memory, rounds, full_sync_mb, async_batch_us, workload, json } => {
            if !tandemd.exists() {
                bail!("{}: no such file (build it with `cargo build --release -p dataplane`, or pass --tandemd)", tandemd.display());
            }
            let blast = workload.config(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let config = ReplicationBenchConfig { tandemd, server_threads, memory_mb: memory, rounds, blast, full_sync_mb, async_batch_us };
            let report = replication::run(&config, |round| {
                if !json {
                    println!(
                        "round {} {:<6} {:>10.0} ops/s  p99 {:>8.1} us  cpu {:>5.2} us/req (standby {:>5.2})  lag p99 {:>6.1} ms max {:>6.1} ms ({} records)  {} errors",
                        round.round, round.mode, round.ops_per_sec, round.p99_us, round.server_cpu_us_per_request, round.standby_cpu_us_per_request,
                        round.lag_p99_ms, round.lag_max_ms, round.lag_max_records, round.errors
                    );
                }
            })?;
            if json {
                print_json(&report)?;
            } else {
                for (i, mode) in ["plain", "async", "sync"].iter().enumerate() {
                    let standby = if i == 0 { String::new() } else { format!(" (standby {:.2})", report.median_standby_cpu_us[i - 1]) };
                    println!(
                        "median {mode:<6} {:>10.0} ops/s  p99 {:>8.1} us  server cpu {:.2} us/req{standby}",
                        report.median_ops[i], report.median_p99_us[i], report.median_server_cpu_us[i]
                    );
                }
                println!(
                    "async/plain ops/s {:.2}x  sync/plain ops/s {:.2}x  lag p99 async {:.1} ms, sync {:.1} ms",
                    report.ratio_async, report.ratio_sync, report.median_lag_p99_ms[0], report.median_lag_p99_ms[1]
                );
                if report.full_sync_bytes > 0 {
                    println!(
                        "full sync: {:.0} MB in {:.2} s = {:.2} GB/s",
                        report.full_sync_bytes as f64 / 1e6,
                        report.full_sync_seconds,
                        report.full_sync_gb_per_s
                    );
                }
            }
            Ok(status(report.errors == 0))
        }
        Command::Compare { memcached, tandemd, server_threads, variants, memory, item_size, rounds, warm_up, client, memaslap, workload, json } => {
            if !tandemd.exists() {
                bail!("{}: no such file (build it with `cargo build --release -p dataplane`, or pass --tandemd)", tandemd.display());
            }
            let blast = workload.config(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let variants = variants.iter().map(|v| compare::Variant::parse(v)).collect::<anyhow::Result<Vec<_>>>()?;
            let client = match client {
                ClientKind::Blast => compare::Client::Blast,
                ClientKind::Memaslap => compare::Client::Memaslap(memaslap),
            };
            let warm_up = Duration::from_secs(warm_up);
            let config = CompareConfig { memcached, tandemd, server_threads, variants, memory_mb: memory, item_size, rounds, warm_up, blast, client };
            let report = compare::run(&config, |round| {
                if !json {
                    println!(
                        "round {} {:<16} {:>10.0} ops/s  p99 {:>8.1} us  {:>6.2} us CPU/request (client {:.2})  {} errors",
                        round.round,
                        round.server,
                        round.ops_per_sec,
                        round.p99_us,
                        round.cpu_us_per_request,
                        round.client_cpu_us_per_request,
                        round.errors
                    );
                    for sample in &round.report.error_samples {
                        println!("  error: {sample}");
                    }
                }
            })?;
            if json {
                print_json(&report)?;
            } else {
                for w in &report.warm_ups {
                    println!("warm-up {:<15} {:>10} sets ({} MB) in {:.1} s, before the rounds", w.server, w.sets, w.mb_written, w.seconds);
                }
                let m = report.memcached;
                println!("median {:<16} {:>10.0} ops/s  p99 {:>8.1} us  {:>6.2} us CPU/request", "memcached", m.ops_per_sec, m.p99_us, m.cpu_us_per_request);
                for v in &report.variants {
                    let m = v.medians;
                    println!("median {:<16} {:>10.0} ops/s  p99 {:>8.1} us  {:>6.2} us CPU/request", v.name, m.ops_per_sec, m.p99_us, m.cpu_us_per_request);
                }
                for v in &report.variants {
                    let r = v.ratio;
                    println!("{}/memcached: ops/s {:.2}x  p99 {:.2}x  CPU/request {:.2}x", v.name, r.ops_per_sec, r.p99_us, r.cpu_us_per_request);
                }
            }
            Ok(status(report.errors == 0))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
