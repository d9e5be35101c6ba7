//! A blast's result as people and programs read it: [`BlastReport`] is the `--json` shape, and
//! `Display` is the human one.

use std::fmt;

use super::blast::{BlastConfig, BlastResult, Limit};
use super::protocol::{OpKind, Protocol};
use super::stats::ServerUsage;

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// Replies and hits of one command.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CommandCount {
    pub command: &'static str,
    pub replies: u64,
    pub hits: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BlastReport {
    pub server: String,
    pub protocol: Protocol,
    pub ratio: String,
    pub keys: u64,
    pub key_length: usize,
    pub value_size: String,
    pub connections: usize,
    pub threads: usize,
    pub pipeline: usize,
    pub limit: String,
    pub elapsed_s: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub latency: Latency,
    pub commands: Vec<CommandCount>,
    /// CPU the client itself used per reply (it shares the machine with the server).
    pub client_cpu_us_per_request: f64,
    /// From the server's `stats` before and after, when it answered them.
    pub server_usage: Option<ServerUsage>,
}

impl BlastReport {
    pub fn new(config: &BlastConfig, result: &BlastResult, server_usage: Option<ServerUsage>) -> BlastReport {
        let histogram = &result.latency_ns;
        let us = |nanos: u64| nanos as f64 / 1000.0;
        BlastReport {
            server: config.addr.to_string(),
            protocol: config.protocol,
            ratio: config.ratio.to_string(),
            keys: config.keys.count,
            key_length: config.keys.length,
            value_size: config.value_size.to_string(),
            connections: config.connections,
            threads: config.threads,
            pipeline: config.pipeline,
            limit: match config.limit {
                Limit::Requests(count) => format!("{count} requests"),
                Limit::Duration(duration) => format!("{} s", duration.as_secs_f64()),
            },
            elapsed_s: result.elapsed.as_secs_f64(),
            ops: result.total_replies(),
            ops_per_sec: result.ops_per_sec(),
            errors: result.errors,
            error_samples: result.error_samples.clone(),
            latency: Latency {
                p50_us: us(histogram.value_at_quantile(0.50)),
                p99_us: us(histogram.value_at_quantile(0.99)),
                p999_us: us(histogram.value_at_quantile(0.999)),
                max_us: us(histogram.max()),
                mean_us: histogram.mean() / 1000.0,
            },
            commands: OpKind::ALL
                .iter()
                .enumerate()
                .filter(|(i, _)| result.replies[*i] > 0)
                .map(|(i, kind)| CommandCount { command: kind.name(), replies: result.replies[i], hits: result.hits[i] })
                .collect(),
            client_cpu_us_per_request: result.client_cpu_us / result.total_replies().max(1) as f64,
            server_usage,
        }
    }
}

impl fmt::Display for BlastReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} over {:?}: {} connections on {} threads, pipeline {}, {} keys of {} B, values {} B, ratio {}, {}",
            self.server,
            self.protocol,
            self.connections,
            self.threads,
            self.pipeline,
            self.keys,
            self.key_length,
            self.value_size,
            self.ratio,
            self.limit
        )?;
        writeln!(f, "  {:>12.0} ops/s  ({} replies in {:.2} s), {} errors", self.ops_per_sec, self.ops, self.elapsed_s, self.errors)?;
        let l = &self.latency;
        writeln!(
            f,
            "  latency us: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
        )?;
        for command in &self.commands {
            writeln!(f, "  {:<6} {:>10} replies, {:>10} hits", command.command, command.replies, command.hits)?;
        }
        if let Some(usage) = &self.server_usage {
            writeln!(f, "  server: {:.2} us CPU per request ({} requests by its stats)", usage.cpu_us_per_request, usage.requests)?;
        }
        writeln!(f, "  client: {:.2} us CPU per request", self.client_cpu_us_per_request)?;
        for sample in &self.error_samples {
            writeln!(f, "  error: {sample}")?;
        }
        Ok(())
    }
}
