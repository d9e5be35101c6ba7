//! A server's own account of a run: `stats` and `stats settings` over a short-lived text connection,
//! and the CPU the server spent per request between two snapshots.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One `stats` (or `stats <group>`) answer as name → value.
pub type Stats = HashMap<String, String>;

pub fn fetch(addr: SocketAddr, group: &str) -> Result<Stats> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let command = if group.is_empty() { "stats\r\n".to_string() } else { format!("stats {group}\r\n") };
    writer.write_all(command.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut stats = Stats::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("{addr} closed the connection in the middle of `{}`", command.trim_end());
        }
        let line = line.trim_end();
        if line == "END" {
            return Ok(stats);
        }
        let mut fields = line.splitn(3, ' ');
        match (fields.next(), fields.next(), fields.next()) {
            (Some("STAT"), Some(name), value) => {
                stats.insert(name.to_string(), value.unwrap_or_default().to_string());
            }
            _ => bail!("{addr} answered `{}` with {line:?}", command.trim_end()),
        }
    }
}

/// A number from `stats`; rusage values are seconds with a fraction (`0.123456`).
pub fn number(stats: &Stats, name: &str) -> Result<f64> {
    let value = stats.get(name).with_context(|| format!("stats has no {name}"))?;
    value.parse().with_context(|| format!("stat {name} = {value:?} is not a number"))
}

/// The counters that count one request each: gets, sets, touches and deletes (hit or miss).
const REQUEST_COUNTERS: [&str; 5] = ["cmd_get", "cmd_set", "cmd_touch", "delete_hits", "delete_misses"];

/// What the server spent between two `stats` snapshots.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ServerUsage {
    pub requests: u64,
    pub cpu_us: f64,
    pub cpu_us_per_request: f64,
}

impl ServerUsage {
    pub fn between(before: &Stats, after: &Stats) -> Result<ServerUsage> {
        let cpu = |stats: &Stats| -> Result<f64> { Ok(number(stats, "rusage_user")? + number(stats, "rusage_system")?) };
        let requests = |stats: &Stats| -> Result<f64> { REQUEST_COUNTERS.iter().map(|name| number(stats, name)).sum() };
        let cpu_us = (cpu(after)? - cpu(before)?) * 1e6;
        let requests = (requests(after)? - requests(before)?).max(0.0) as u64;
        Ok(ServerUsage { requests, cpu_us, cpu_us_per_request: cpu_us / requests.max(1) as f64 })
    }
}
