//! The userspace stack's per-core path with the NIC taken out: a smoltcp client and one tandemd worker
//! (its smoltcp stack, the text codec, one shard's store) on one thread, joined by an in-memory Ethernet
//! wire. Busy client connections each keep 16 pipelined gets in flight; idle ones are established and
//! quiet. Reports requests per second of the worker's own time (the server core), and of the whole loop.
//!
//! `cargo bench -p dataplane --bench stack_path [-- SECONDS]` (default 2 s per row). Checksums are off on
//! the memory wire (a NIC computes them), so this is the stack, codec and store, nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use dataplane::config::Settings;
use dataplane::net::stack::memory::{wire, MemoryPhy};
use dataplane::net::stack::{IdlePolicy, StackConfig, StackTransport, ThreadBell};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

const PIPELINE: usize = 16;
const KEYS: usize = 1000;
const BUSY: usize = 10;
const VALUE: &[u8] = b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

fn key(i: usize) -> String {
    format!("key:{:06}", i % KEYS)
}

/// Bytes of one get's reply: `VALUE key:000000 0 32\r\n` + value + `\r\nEND\r\n`.
const REPLY: usize = 23 + 32 + 2 + 5;

struct Client {
    iface: Interface,
    phy: MemoryPhy,
    sockets: SocketSet<'static>,
    handles: Vec<SocketHandle>,
}

impl Client {
    fn poll(&mut self) {
        self.iface.poll(Instant::now(), &mut self.phy, &mut self.sockets);
    }

    fn socket(&mut self, i: usize) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handles[i])
    }
}

fn main() {
    let seconds: f64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2.0);
    println!("{:>12} {:>6} {:>18} {:>18} {:>10}", "connections", "busy", "req/s server core", "req/s whole loop", "rounds");
    for conns in [10, 100, 1000, 10_000] {
        let (server_phy, client_phy) = wire();
        let mut config = StackConfig::new([10, 9, 0, 1].into(), 24, [2, 0, 0, 0, 0, 1], 11211);
        config.idle = IdlePolicy { spin: Duration::ZERO, sleep: Duration::from_micros(1) };
        config.backlog = 64;
        let net = StackTransport::new(server_phy, config, Arc::new(ThreadBell::default()));
        let settings = Settings { memory_limit: 64 << 20, max_connections: 20_000, reqs_per_event: 64, ..Settings::default() };
        let mut worker = dataplane::runtime::standalone_worker(settings, net).expect("worker");
        let mut ready = Vec::new();

        let mut phy = client_phy;
        let mut iface = Interface::new(Config::new(EthernetAddress([2, 0, 0, 0, 0, 2]).into()), &mut phy, Instant::now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(10, 9, 0, 2), 24));
        });
        let mut client = Client { iface, phy, sockets: SocketSet::new(Vec::new()), handles: Vec::new() };
        // In waves: the server refuses SYNs beyond its half-open limit (1024), as a flood would be.
        for i in 0..conns {
            if i % 500 == 0 {
                for _ in 0..1000 {
                    client.poll();
                    worker.round(&mut ready, Duration::ZERO).expect("round");
                    if client.handles.iter().all(|&h| client.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established) {
                        break;
                    }
                }
            }
            let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 16384]), tcp::SocketBuffer::new(vec![0; 16384]));
            socket.set_nagle_enabled(false);
            socket.set_ack_delay(None);
            let cx = client.iface.context();
            socket.connect(cx, (IpAddress::v4(10, 9, 0, 1), 11211), 10_000 + i as u16).expect("connect");
            let handle = client.sockets.add(socket);
            client.handles.push(handle);
        }
        // Establish every connection, then store the keys through the first one.
        for _ in 0..100_000 {
            client.poll();
            worker.round(&mut ready, Duration::ZERO).expect("round");
            if client.handles.iter().all(|&h| client.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established) {
                break;
            }
        }
        let established = client.handles.iter().filter(|&&h| client.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established).count();
        assert_eq!(established, conns, "every connection is established");
        let mut pending = Vec::new();
        for i in 0..KEYS {
            pending.extend_from_slice(format!("set {} 0 0 {}\r\n", key(i), VALUE.len()).as_bytes());
            pending.extend_from_slice(VALUE);
            pending.extend_from_slice(b"\r\n");
        }
        let mut stored = 0;
        let mut sent = 0;
        let mut scratch = vec![0u8; 65536];
        while stored < KEYS * 8 {
            if sent < pending.len() {
                sent += client.socket(0).send_slice(&pending[sent..]).unwrap_or(0);
            }
            client.poll();
            worker.round(&mut ready, Duration::ZERO).expect("round");
            client.poll();
            stored += client.socket(0).recv_slice(&mut scratch).unwrap_or(0);
        }
        assert_eq!(stored, KEYS * 8, "STORED\r\n for every key");

        // Busy connections: 16 gets in flight each, topped up as replies complete.
        let mut outstanding = [0usize; BUSY];
        let mut received = [0usize; BUSY];
        let mut next_key = 0;
        let mut done = 0u64;
        let mut server_time = Duration::ZERO;
        let mut rounds = 0u64;
        let started = StdInstant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        while StdInstant::now() < deadline {
            #[allow(clippy::needless_range_loop)] // b names the client socket too
            for b in 0..BUSY.min(conns) {
                if outstanding[b] == 0 {
                    let mut batch = String::new();
                    for _ in 0..PIPELINE {
                        batch.push_str(&format!("get {}\r\n", key(next_key)));
                        next_key += 1;
                    }
                    let n = client.socket(b).send_slice(batch.as_bytes()).unwrap_or(0);
                    assert_eq!(n, batch.len(), "the client's send buffer takes a batch");
                    outstanding[b] = PIPELINE;
                }
            }
            client.poll();
            let t = StdInstant::now();
            worker.round(&mut ready, Duration::ZERO).expect("round");
            server_time += t.elapsed();
            rounds += 1;
            client.poll();
            #[allow(clippy::needless_range_loop)] // b names the client socket too
            for b in 0..BUSY.min(conns) {
                let n = client.socket(b).recv_slice(&mut scratch).unwrap_or(0);
                received[b] += n;
                let replies = received[b] / REPLY;
                received[b] %= REPLY;
                outstanding[b] -= replies;
                done += replies as u64;
            }
        }
        let wall = started.elapsed().as_secs_f64();
        println!(
            "{:>12} {:>6} {:>18.0} {:>18.0} {:>10}",
            conns,
            BUSY.min(conns),
            done as f64 / server_time.as_secs_f64(),
            done as f64 / wall,
            rounds
        );
    }
}
