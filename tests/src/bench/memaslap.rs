//! The same load driven by another client: libmemcached-tools' memaslap (Debian's `/usr/bin/memcaslap`),
//! so that tandemd is measured with a load generator that is not ours.
//!
//! - [`MemaslapConfig::from_blast`]: a [`BlastConfig`] said in memaslap's terms (its config file of key
//!   and value sizes and set/get proportions, threads, concurrency, key window, time).
//! - [`run`]: runs memaslap once, bounded in time, and turns its report into a [`BlastResult`]: its
//!   operation counts, its run time, its latency distribution and the CPU it used.
//!
//! memaslap sends one request at a time per connection (its "concurrency"), text by default or binary
//! with `-B`, with keys of its own making (they start with control bytes: `\x10\x10…`). Its latency
//! report is a histogram of powers of two (bucket `r` holds `(2^(r-1), 2^r]` microseconds), so the
//! percentiles taken from it here are the upper edges of those buckets: a p99 of 1024 us means "between
//! 513 and 1024 us". It counts an error reply as an operation; [`check_counted`] compares its count with
//! the server's own.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::blast::{BlastConfig, BlastResult, Limit};
use super::protocol::{OpKind, Protocol};
use super::workload::ValueSize;

/// memaslap's own unit for its per-connection key window (`-w 2k`).
const WINDOW_UNIT: u64 = 1000;
/// How long past its run time memaslap may take to report before it is killed.
const GRACE: Duration = Duration::from_secs(15);

/// One memaslap run.
#[derive(Clone, Debug)]
pub struct MemaslapConfig {
    pub program: PathBuf,
    pub server: std::net::SocketAddr,
    pub binary: bool,
    pub threads: usize,
    pub concurrency: usize,
    /// Keys per connection, in thousands (memaslap's `-w Nk`): the key space is this times 1000 times
    /// the concurrency.
    pub window_thousands: u64,
    pub seconds: u64,
    pub key_length: usize,
    pub value_size: usize,
    /// Proportions of set and get, summing to 1.
    pub set_share: f64,
    pub get_share: f64,
}

impl MemaslapConfig {
    /// `blast` said in memaslap's terms. Refuses what memaslap cannot do: pipelining, the meta protocol,
    /// touch or delete, value sizes that vary, a request count instead of a time.
    pub fn from_blast(program: &Path, blast: &BlastConfig) -> Result<MemaslapConfig> {
        if blast.pipeline != 1 {
            bail!("memaslap keeps one request in flight per connection: --pipeline must be 1");
        }
        let binary = match blast.protocol {
            Protocol::Text => false,
            Protocol::Binary => true,
            Protocol::Meta => bail!("memaslap speaks text or binary, not meta"),
        };
        let ValueSize::Fixed(value_size) = blast.value_size else {
            bail!("memaslap is given one value size here: --value-size must be a number");
        };
        let Limit::Duration(duration) = blast.limit else {
            bail!("memaslap runs for a time: use --duration, not --requests");
        };
        let (set, get) = (blast.ratio.weight(OpKind::Set), blast.ratio.weight(OpKind::Get));
        if blast.ratio.weight(OpKind::Touch) + blast.ratio.weight(OpKind::Delete) > 0 {
            bail!("memaslap sends only sets and gets: --ratio may name only set and get");
        }
        let total = f64::from(set + get);
        Ok(MemaslapConfig {
            program: program.to_path_buf(),
            server: blast.addr,
            binary,
            threads: blast.threads,
            concurrency: blast.connections,
            window_thousands: (blast.keys.count / blast.connections.max(1) as u64 / WINDOW_UNIT).max(1),
            seconds: duration.as_secs_f64().ceil().max(1.0) as u64,
            key_length: blast.keys.length,
            value_size,
            set_share: f64::from(set) / total,
            get_share: f64::from(get) / total,
        })
    }

    /// memaslap's `-F` file: fixed key and value sizes, then the command proportions (0 set, 1 get).
    pub fn config_file(&self) -> String {
        let (key, value) = (self.key_length, self.value_size);
        format!("key\n{key} {key} 1\nvalue\n{value} {value} 1\ncmd\n0 {:.4}\n1 {:.4}\n", self.set_share, self.get_share)
    }

    pub fn args(&self, config_file: &Path) -> Vec<String> {
        let mut args = vec![
            format!("--servers={}", self.server),
            format!("--threads={}", self.threads),
            format!("--concurrency={}", self.concurrency),
            format!("--win_size={}k", self.window_thousands),
            format!("--time={}s", self.seconds),
            // One statistics report, at the end: it carries the latency distribution.
            format!("--stat_freq={}s", self.seconds),
            format!("--cfg_cmd={}", config_file.display()),
        ];
        if self.binary {
            args.push("--binary".into());
        }
        args
    }
}

/// Runs memaslap once and reads its report.
pub fn run(config: &MemaslapConfig) -> Result<BlastResult> {
    let config_file = std::env::temp_dir().join(format!("tandem-bench-memaslap-{}.cfg", std::process::id()));
    std::fs::write(&config_file, config.config_file()).with_context(|| format!("write {}", config_file.display()))?;
    let children_before = children_cpu_us();
    let mut child = Command::new(&config.program)
        .args(config.args(&config_file))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", config.program.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let deadline = Instant::now() + Duration::from_secs(config.seconds) + GRACE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("memaslap did not finish within {} s of its {} s run", GRACE.as_secs(), config.seconds);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let client_cpu_us = children_cpu_us() - children_before;
    let output = reader.join().expect("memaslap reader thread panicked").context("read memaslap's output")?;
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        bail!("memaslap exited with {status}: {}", stderr.trim());
    }
    let mut result = parse_report(&output)?;
    result.client_cpu_us = client_cpu_us;
    Ok(result)
}

/// CPU (user + system) of this process's children that have been waited for, in microseconds. The
/// servers under test are children too, but they are still running, so only memaslap is counted.
fn children_cpu_us() -> f64 {
    // SAFETY: getrusage writes only into the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// Reads memaslap's final report: `cmd_get:`, `cmd_set:`, `get_misses:`, the `Run time: 3.0s Ops: …`
/// line, and the log2 latency distribution under `Total Statistics (N events)`.
pub fn parse_report(output: &str) -> Result<BlastResult> {
    let counter = |name: &str| -> Result<u64> {
        let line = output.lines().find_map(|line| line.trim().strip_prefix(name)).with_context(|| format!("memaslap printed no {name}"))?;
        line.trim().parse().with_context(|| format!("memaslap's {name} {line:?} is not a number"))
    };
    let (gets, sets, misses) = (counter("cmd_get:")?, counter("cmd_set:")?, counter("get_misses:")?);
    let run_line = output.lines().find(|line| line.starts_with("Run time:")).context("memaslap printed no `Run time:` line")?;
    let seconds: f64 = run_line
        .split_whitespace()
        .nth(2)
        .and_then(|field| field.strip_suffix('s'))
        .and_then(|number| number.parse().ok())
        .with_context(|| format!("cannot read the run time in {run_line:?}"))?;
    let mut result = BlastResult::empty();
    result.elapsed = Duration::from_secs_f64(seconds);
    result.replies[0] = sets;
    result.hits[0] = sets;
    result.replies[1] = gets;
    result.hits[1] = gets.saturating_sub(misses);
    for (bucket, count) in total_distribution(output)? {
        // Bucket r holds latencies in (2^(r-1), 2^r] us: record its upper edge, in nanoseconds.
        let upper_ns = 1000u64.saturating_mul(1u64 << bucket.min(40));
        result.latency_ns.record_n(upper_ns, count).context("latency out of the histogram's range")?;
    }
    Ok(result)
}

/// (bucket, count) of the `Log2 Dist:` that follows `Total Statistics (`.
fn total_distribution(output: &str) -> Result<Vec<(u32, u64)>> {
    let mut lines = output.lines().skip_while(|line| !line.starts_with("Total Statistics (")).skip(1);
    lines.by_ref().find(|line| line.trim() == "Log2 Dist:").context("memaslap printed no total latency distribution (was --stat_freq given?)")?;
    let mut buckets = Vec::new();
    for line in lines {
        let Some((first, counts)) = line.trim().split_once(':') else { break };
        let Ok(first) = first.trim().parse::<u32>() else { break };
        for (offset, count) in counts.split_whitespace().enumerate() {
            let count: u64 = count.parse().with_context(|| format!("bad count in {line:?}"))?;
            if count > 0 {
                buckets.push((first + offset as u32, count));
            }
        }
    }
    if buckets.is_empty() {
        bail!("memaslap's total latency distribution is empty");
    }
    Ok(buckets)
}

/// memaslap counts every reply, error replies included, as an operation: a server that refused its
/// requests would look as fast as one that served them. The server's own count of gets and sets over
/// the run must account for memaslap's operations (within 1%, for the few that memaslap counts at the
/// edges of its run); the error names both counts.
pub fn check_counted(client_ops: u64, server_requests: u64) -> Result<(), String> {
    if (server_requests as f64) < client_ops as f64 * 0.99 {
        return Err(format!(
            "the server counted {server_requests} gets and sets for memaslap's {client_ops} operations: it did not serve them all"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::KeySpace;

    /// The end of a real `memcaslap -T 2 -c 50 -t 3s -S 3s` report against memcached 1.6.18 here.
    const REPORT: &str = "\
Total Statistics (199117 events)
   Min:        11
   Max:     16956
   Avg:       753
   Geo:    446.27
   Std:   1147.32
   Log2 Dist:
       4:        5      415     1242     1295
       8:    23078   125035    19323     7898
      12:    13746     6878      178       24

cmd_get: 181046
cmd_set: 18121
get_misses: 0
written_bytes: 5123453
read_bytes: 12452816
object_bytes: 869808

Run time: 3.0s Ops: 199167 TPS: 66334 Net_rate: 5.6M/s
";

    #[test]
    fn reads_counts_time_and_the_total_distribution() {
        let result = parse_report(REPORT).unwrap();
        assert_eq!((result.replies[0], result.replies[1]), (18121, 181046));
        assert_eq!(result.hits[1], 181046);
        assert_eq!(result.elapsed, Duration::from_secs(3));
        assert_eq!(result.latency_ns.len(), 199117);
        // Within the histogram's 3 significant digits: 99% of 199,117 is reached in bucket 13 (cumulative
        // 198,915), between 4,097 and 8,192 us; the median in bucket 9 (cumulative 151,070).
        let histogram = &result.latency_ns;
        assert!(histogram.equivalent(histogram.value_at_quantile(0.99), 8_192_000), "{}", histogram.value_at_quantile(0.99));
        assert!(histogram.equivalent(histogram.value_at_quantile(0.5), 512_000), "{}", histogram.value_at_quantile(0.5));
    }

    #[test]
    fn a_report_without_a_distribution_is_an_error() {
        let without = REPORT.replace("Log2 Dist:", "Log2:");
        assert!(parse_report(&without).is_err());
        assert!(parse_report("Run time: 3.0s Ops: 1").is_err());
    }

    #[test]
    fn blast_settings_become_memaslap_settings() {
        let blast = BlastConfig {
            addr: "127.0.0.1:11999".parse().unwrap(),
            protocol: Protocol::Binary,
            ratio: "set=1,get=10".parse().unwrap(),
            keys: KeySpace::new(100_000, 16).unwrap(),
            value_size: ValueSize::Fixed(32),
            connections: 50,
            threads: 2,
            pipeline: 1,
            limit: Limit::Duration(Duration::from_millis(4500)),
            seed: 1,
        };
        let config = MemaslapConfig::from_blast(Path::new("/usr/bin/memcaslap"), &blast).unwrap();
        assert_eq!((config.window_thousands, config.seconds, config.binary), (2, 5, true));
        assert_eq!(config.config_file(), "key\n16 16 1\nvalue\n32 32 1\ncmd\n0 0.0909\n1 0.9091\n");
        let args = config.args(Path::new("/tmp/x.cfg"));
        assert!(args.contains(&"--win_size=2k".to_string()) && args.contains(&"--binary".to_string()), "{args:?}");
        let pipelined = BlastConfig { pipeline: 16, ..blast.clone() };
        assert!(MemaslapConfig::from_blast(Path::new("m"), &pipelined).is_err());
        let with_delete = BlastConfig { ratio: "set=1,get=10,delete=1".parse().unwrap(), ..blast };
        assert!(MemaslapConfig::from_blast(Path::new("m"), &with_delete).is_err());
    }

    #[test]
    fn a_server_that_did_not_count_the_operations_is_caught() {
        assert!(check_counted(272_311, 272_287).is_ok());
        let refused = check_counted(199_167, 26).unwrap_err();
        assert!(refused.contains("26") && refused.contains("199167"), "{refused}");
    }
}
