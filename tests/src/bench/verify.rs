//! Correctness runs over one blocking connection: `setget` (set a key space, read every byte back)
//! and `sizes` (set and get values of growing size up to the server's item limit).
//!
//! Requests go out in batches through the same codec as the blast, and each batch's replies are read
//! before the next batch is sent, so neither side ever holds more than one batch.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

use super::protocol::{encode, parse_reply, OpKind, Outcome, Parsed, Protocol};
use super::stats;
use super::workload::{value_bytes, KeySpace, Rng, ValueSize};

/// A blocking connection that sends batches of requests and hands back each reply's outcome and bytes.
pub struct BatchClient {
    addr: SocketAddr,
    protocol: Protocol,
    stream: TcpStream,
    input: Vec<u8>,
    out: Vec<u8>,
}

/// What one request of a batch got: the parsed outcome and, for a hit, the value's bytes.
pub enum Answer {
    Ok(Outcome, Vec<u8>),
    Bad(String),
}

impl BatchClient {
    pub fn connect(addr: SocketAddr, protocol: Protocol) -> Result<BatchClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(BatchClient { addr, protocol, stream, input: Vec::new(), out: Vec::new() })
    }

    /// Sends `(kind, key, value)` requests as one write and returns one answer per request. After a
    /// bad reply the stream cannot be trusted: the rest of the batch is not read and the caller should
    /// reconnect (`Err` only for I/O failures).
    pub fn batch(&mut self, requests: &[(OpKind, Vec<u8>, Vec<u8>)]) -> Result<Vec<Answer>> {
        self.out.clear();
        for (opaque, (kind, key, value)) in requests.iter().enumerate() {
            encode(self.protocol, *kind, key, value, opaque as u32, &mut self.out);
        }
        self.stream.write_all(&self.out).with_context(|| format!("write to {}", self.addr))?;
        let mut answers = Vec::with_capacity(requests.len());
        for (opaque, (kind, key, _)) in requests.iter().enumerate() {
            loop {
                match parse_reply(self.protocol, *kind, key, opaque as u32, &self.input) {
                    Ok(Parsed::Reply { len, outcome }) => {
                        let value = match &outcome {
                            Outcome::Hit(range) => self.input[range.clone()].to_vec(),
                            _ => Vec::new(),
                        };
                        self.input.drain(..len);
                        answers.push(Answer::Ok(outcome, value));
                        break;
                    }
                    Ok(Parsed::Incomplete) => {
                        let mut chunk = [0u8; 64 * 1024];
                        let n = self.stream.read(&mut chunk).with_context(|| format!("read from {}", self.addr))?;
                        if n == 0 {
                            answers.push(Answer::Bad("connection closed by the server".into()));
                            return Ok(answers);
                        }
                        self.input.extend_from_slice(&chunk[..n]);
                    }
                    Err(bad) => {
                        answers.push(Answer::Bad(bad.0));
                        return Ok(answers);
                    }
                }
            }
        }
        Ok(answers)
    }

    pub fn reconnect(&mut self) -> Result<()> {
        *self = BatchClient::connect(self.addr, self.protocol)?;
        Ok(())
    }
}

/// Sets every key of `keys` to its value (sizes from `value_size`, seeded by `seed`); returns the
/// sizes used and the keys whose set failed, with the reason.
pub fn set_all(
    client: &mut BatchClient,
    keys: KeySpace,
    value_size: ValueSize,
    seed: u64,
    batch: usize,
) -> Result<(Vec<usize>, Vec<String>)> {
    let mut rng = Rng::new(seed);
    let sizes: Vec<usize> = (0..keys.count).map(|_| value_size.sample(&mut rng)).collect();
    let mut failures = Vec::new();
    let indexes: Vec<u64> = (0..keys.count).collect();
    for chunk in indexes.chunks(batch.max(1)) {
        let requests: Vec<_> = chunk
            .iter()
            .map(|&index| {
                let mut value = Vec::new();
                value_bytes(index, sizes[index as usize], &mut value);
                (OpKind::Set, keys.name(index).into_bytes(), value)
            })
            .collect();
        let answers = client.batch(&requests)?;
        let broken = answers.len() < requests.len() || answers.iter().any(|a| matches!(a, Answer::Bad(_)));
        for (i, &index) in chunk.iter().enumerate() {
            match answers.get(i) {
                Some(Answer::Ok(Outcome::Stored, _)) => {}
                Some(Answer::Ok(other, _)) => failures.push(format!("set {}: {other:?}", keys.name(index))),
                Some(Answer::Bad(what)) => failures.push(format!("set {}: {what}", keys.name(index))),
                None => failures.push(format!("set {}: no reply (connection reset after an earlier bad reply)", keys.name(index))),
            }
        }
        if broken {
            client.reconnect()?;
        }
    }
    Ok((sizes, failures))
}

/// Gets every key and compares it byte for byte with what `set_all` stored; returns the mismatches.
pub fn check_all(client: &mut BatchClient, keys: KeySpace, sizes: &[usize], batch: usize) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let indexes: Vec<u64> = (0..keys.count).collect();
    let mut expected = Vec::new();
    for chunk in indexes.chunks(batch.max(1)) {
        let requests: Vec<_> = chunk.iter().map(|&index| (OpKind::Get, keys.name(index).into_bytes(), Vec::new())).collect();
        let answers = client.batch(&requests)?;
        let broken = answers.len() < requests.len();
        for (i, &index) in chunk.iter().enumerate() {
            let key = keys.name(index);
            value_bytes(index, sizes[index as usize], &mut expected);
            match answers.get(i) {
                Some(Answer::Ok(Outcome::Hit(_), value)) if *value == expected => {}
                Some(Answer::Ok(Outcome::Hit(_), value)) => failures.push(format!("get {key}: {}", describe_mismatch(&expected, value))),
                Some(Answer::Ok(other, _)) => failures.push(format!("get {key}: {other:?}, expected a hit of {} bytes", expected.len())),
                Some(Answer::Bad(what)) => failures.push(format!("get {key}: {what}")),
                None => failures.push(format!("get {key}: no reply (connection reset after an earlier bad reply)")),
            }
        }
        if broken {
            client.reconnect()?;
        }
    }
    Ok(failures)
}

fn describe_mismatch(expected: &[u8], got: &[u8]) -> String {
    if expected.len() != got.len() {
        return format!("{} bytes, expected {}", got.len(), expected.len());
    }
    let at = expected.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
    format!("byte {at} is {:#04x}, expected {:#04x}", got[at], expected[at])
}

/// The result of a `sizes` run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SizesReport {
    pub server: String,
    pub protocol: Protocol,
    pub item_size_max: usize,
    pub sizes_tried: usize,
    /// The largest size that was stored and read back intact.
    pub largest_ok: usize,
    /// The smallest size that failed, and how.
    pub first_failing: Option<usize>,
    pub failure: Option<String>,
    /// Whether the failure was a wrong value or a broken reply (as opposed to a clean refusal).
    pub corrupt: bool,
}

/// Sets and reads back values of 1 byte up to `limit` (default: the server's `item_size_max`), growing
/// by about 1/8 per step; on the first failure, bisects down to the exact first failing size.
pub fn sizes(addr: SocketAddr, protocol: Protocol, limit: Option<usize>) -> Result<SizesReport> {
    let settings = stats::fetch(addr, "settings")?;
    let item_size_max = stats::number(&settings, "item_size_max")? as usize;
    let limit = limit.unwrap_or(item_size_max).min(item_size_max);
    let mut client = BatchClient::connect(addr, protocol)?;
    let mut schedule = Vec::new();
    let mut size = 1;
    while size < limit {
        schedule.push(size);
        size = (size + size / 8).max(size + 1);
    }
    schedule.push(limit);
    let mut report = SizesReport {
        server: addr.to_string(),
        protocol,
        item_size_max,
        sizes_tried: 0,
        largest_ok: 0,
        first_failing: None,
        failure: None,
        corrupt: false,
    };
    for size in schedule {
        report.sizes_tried += 1;
        match try_size(&mut client, size)? {
            None => report.largest_ok = size,
            Some((what, corrupt)) => {
                // Bisect between the last good size and this one for the exact boundary.
                let (mut good, mut bad, mut failure) = (report.largest_ok, size, (what, corrupt));
                while bad - good > 1 {
                    let middle = good + (bad - good) / 2;
                    report.sizes_tried += 1;
                    match try_size(&mut client, middle)? {
                        None => good = middle,
                        Some(other) => {
                            bad = middle;
                            failure = other;
                        }
                    }
                }
                report.largest_ok = good;
                report.first_failing = Some(bad);
                report.failure = Some(failure.0);
                report.corrupt = failure.1;
                break;
            }
        }
    }
    Ok(report)
}

/// Sets one key to a value of `size` bytes and reads it back. `Some((what, corrupt))` on failure.
fn try_size(client: &mut BatchClient, size: usize) -> Result<Option<(String, bool)>> {
    let index = size as u64;
    let key = format!("size:{size}").into_bytes();
    let mut value = Vec::new();
    value_bytes(index, size, &mut value);
    let answers = client.batch(&[(OpKind::Set, key.clone(), value.clone()), (OpKind::Get, key, Vec::new())])?;
    let failure = match answers.as_slice() {
        [Answer::Ok(Outcome::Stored, _), Answer::Ok(Outcome::Hit(_), got)] if *got == value => return Ok(None),
        [Answer::Ok(Outcome::Stored, _), Answer::Ok(Outcome::Hit(_), got)] => {
            (format!("get after set of {size} bytes: {}", describe_mismatch(&value, got)), true)
        }
        [Answer::Ok(Outcome::Stored, _), Answer::Ok(other, _)] => (format!("set of {size} bytes was STORED, then get: {other:?}"), true),
        [Answer::Bad(what), ..] => (format!("set of {size} bytes: {what}"), !what.contains("SERVER_ERROR") && !what.contains("status")),
        [_, Answer::Bad(what)] => (format!("get of {size} bytes: {what}"), true),
        _ => (format!("set of {size} bytes: no complete reply"), true),
    };
    client.reconnect()?;
    Ok(Some(failure))
}
