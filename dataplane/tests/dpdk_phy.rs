//! The DPDK device under a real smoltcp interface, end to end: a veth pair whose peer sits in a fresh
//! network namespace, DPDK's net_af_packet on our end, and from the namespace the kernel's own `ping`
//! (ARP and ICMP echo answered by smoltcp) and a TCP echo client (python3) talking to a smoltcp socket
//! driven by a thread of its own, as a worker core would.
//!
//! Needs root (namespaces, veth, AF_PACKET, hugepages) and the feature `dpdk`; without root it prints
//! why it skipped, and under `CI=true` it fails instead (`dataplane::test_support`). EAL starts once per process, so everything is one test function. Hugepages are
//! reserved for the test and given back; TANDEM_DPDK_NO_HUGE=1 (or no hugepages to be had) runs EAL
//! with `--no-huge -m 128 --no-shconf` instead.

#![cfg(feature = "dpdk")]

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dataplane::net::phy::dpdk::{DpdkQueue, Eal, Port};
use dataplane::test_support::{is_root, runs_here};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

/// The namespace's address (the kernel's) and ours (smoltcp's); the subnet exists only in the fresh
/// namespace, so fixed addresses cannot clash with another run.
const PEER_IP: &str = "10.77.0.1";
const STACK_IP: [u8; 4] = [10, 77, 0, 2];
const ECHO_PORT: u16 = 7777;
/// Hugepages (2 MiB) the test makes sure are free; measured: EAL (--in-memory, no hugetlbfs mount
/// needed) and one queue's pool of 4095 mbufs take 6.
const HUGEPAGES_NEEDED: u64 = 24;

#[test]
fn smoltcp_over_dpdk_answers_ping_and_echoes_tcp() {
    if !runs_here(is_root(), "dpdk_phy", "needs root (network namespace, veth, AF_PACKET, hugepages); CI runs as root") {
        return;
    }
    for (command, why) in [
        ("ip", "iproute2's `ip` makes the namespace and the veth pair"),
        ("ethtool", "ethtool turns off the peer veth's TSO/GSO, whose 64 KiB frames AF_PACKET hands over whole"),
        ("python3", "python3 is the TCP client"),
    ] {
        if !runs_here(command_exists(command), "dpdk_phy", &format!("{command} is not installed ({why})")) {
            return;
        }
    }
    let net = TestNet::create().expect("creating the veth pair and the namespace");
    let hugepages = Hugepages::reserve(HUGEPAGES_NEEDED);

    let mut eal_args = vec![
        "--no-pci".to_string(),
        "--no-telemetry".to_string(),
        format!("--vdev=net_af_packet0,iface={}", net.our_end),
    ];
    match &hugepages {
        Some(_) => eal_args.push("--in-memory".to_string()),
        None => eal_args.extend(["--no-huge", "-m", "128", "--no-shconf"].map(String::from)),
    }
    println!("EAL arguments: {}", eal_args.join(" "));
    let eal = Eal::init(&eal_args).expect("EAL starts");
    let again = Eal::init(&eal_args)
        .err()
        .expect("a second EAL start is refused");
    assert!(again.to_string().contains("already"), "{again}");
    assert_eq!(eal.port_count(), 1);
    let missing = Port::open(&eal, Some(7), 1, None)
        .err()
        .expect("port 7 does not exist");
    assert!(
        missing.to_string().contains("port 7 does not exist"),
        "{missing}"
    );
    let two = Port::open(&eal, None, 2, None)
        .err()
        .expect("net_af_packet0 has one qpair");
    println!("two queues on one qpair: {two}");

    let mut port = Port::open(&eal, None, 1, None).expect("the af_packet port opens");
    assert_eq!(port.queues(), 1);
    assert_eq!(port.mac(), net.our_mac, "the port's MAC is the veth's");
    let queue = port.take_queue(0).expect("queue 0");
    assert!(port.take_queue(0).is_none(), "a queue is taken once");

    let stop = Arc::new(AtomicBool::new(false));
    let stack = {
        let stop = stop.clone();
        let mac = port.mac();
        std::thread::Builder::new()
            .name("dpdk-q0".into())
            .spawn(move || run_echo_stack(queue, mac, &stop))
            .expect("spawning the stack thread")
    };

    let outcome = std::panic::catch_unwind(|| {
        if runs_here(command_exists("ping"), "the ping check", "iputils-ping is not installed (ARP is still exercised by TCP)") {
            let ping = net.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &ip(STACK_IP)]);
            let text = String::from_utf8_lossy(&ping.stdout);
            println!(
                "{}",
                text.lines()
                    .filter(|line| line.contains("received"))
                    .collect::<String>()
            );
            assert!(
                ping.status.success() && text.contains("3 received"),
                "ping through smoltcp:\n{text}"
            );
        }
        // A real client: connect, send 1 MiB in uneven chunks, read it all back, compare.
        let client = format!(
            r#"
import socket, sys
data = bytes((i * 7 + i // 251) & 0xff for i in range(1 << 20))
s = socket.create_connection(("{}", {ECHO_PORT}), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
got = bytearray()
sent = 0
while len(got) < len(data):
    if sent < len(data):
        sent += s.send(data[sent:sent + 1000 + sent % 3001])
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
s.close()
print("echoed", len(got), "bytes", "equal" if bytes(got) == data else "DIFFERENT")
sys.exit(0 if bytes(got) == data else 1)
"#,
            ip(STACK_IP)
        );
        // Round 0: the peer veth leaves its TCP checksums partial (tx checksum offload on, the
        // default), which the device must accept. Round 1: the peer computes them (ethtool -K tx off).
        // TSO and GSO are off in both: on a veth they hand AF_PACKET whole 64 KiB segments.
        for round in 0..2 {
            let checksums = if round == 0 {
                "partial checksums from the peer"
            } else {
                net.exec(&["ethtool", "-K", &net.peer_end, "tx", "off"]);
                "full checksums from the peer"
            };
            let echo = net.exec(&["python3", "-c", &client]);
            println!(
                "tcp echo round {round}, {checksums}: {}",
                String::from_utf8_lossy(&echo.stdout).trim()
            );
            assert!(
                echo.status.success(),
                "TCP echo through smoltcp failed: {}{}",
                String::from_utf8_lossy(&echo.stdout),
                String::from_utf8_lossy(&echo.stderr)
            );
        }
    });

    stop.store(true, Ordering::Relaxed);
    let queue = stack.join().expect("the stack thread ran to its end");
    let counters = queue.counters();
    let stats = port.stats();
    println!("queue counters: {counters:?}");
    println!("port stats: {stats:?}");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(
        counters.rx_frames >= 2 * 700,
        "1 MiB each way in two rounds is hundreds of frames each"
    );
    assert!(counters.tx_frames >= 2 * 700);
    assert_eq!((counters.tx_dropped, counters.tx_nombuf), (0, 0));
    assert!(stats.ipackets >= counters.rx_frames && stats.opackets >= counters.tx_frames);
    assert_eq!(queue.mbufs_in_use(), 0, "every token gave its mbuf back");
    drop(queue);
    drop(port);
    drop(eal);
    drop(hugepages);
    drop(net);
}

/// A worker core's loop in miniature: one interface, one echo socket that listens again after each
/// client, poll then flush, until `stop`.
fn run_echo_stack(mut queue: DpdkQueue, mac: [u8; 6], stop: &AtomicBool) -> DpdkQueue {
    queue
        .register_thread()
        .expect("registering the stack thread with EAL");
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    let mut iface = Interface::new(config, &mut queue, Instant::now());
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(
                IpAddress::v4(STACK_IP[0], STACK_IP[1], STACK_IP[2], STACK_IP[3]),
                24,
            ))
            .expect("one address fits");
    });
    let mut sockets = SocketSet::new(Vec::new());
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        tcp::SocketBuffer::new(vec![0; 64 * 1024]),
    );
    let echo = sockets.add(socket);
    let mut pending = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        iface.poll(Instant::now(), &mut queue, &mut sockets);
        let socket = sockets.get_mut::<tcp::Socket>(echo);
        if !socket.is_open() {
            socket.listen(ECHO_PORT).expect("listen");
            socket.set_nagle_enabled(false);
            socket.set_ack_delay(None);
        }
        if pending.is_empty() && socket.can_recv() {
            socket
                .recv(|data| {
                    pending.extend_from_slice(data);
                    (data.len(), ())
                })
                .expect("recv");
        }
        if !pending.is_empty() && socket.can_send() {
            let sent = socket.send_slice(&pending).expect("send");
            pending.drain(..sent);
        }
        if pending.is_empty() && !socket.may_recv() && socket.may_send() {
            socket.close();
        }
        iface.poll(Instant::now(), &mut queue, &mut sockets);
        queue.flush();
        std::thread::sleep(Duration::from_micros(50));
    }
    queue.flush();
    queue
}

fn ip(octets: [u8; 4]) -> String {
    octets.map(|octet| octet.to_string()).join(".")
}

fn command_exists(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn run(args: &[&str]) -> Output {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|err| panic!("{args:?}: {err}"));
    if !output.status.success() {
        println!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    output
}

fn run_ok(args: &[&str]) -> Result<(), String> {
    let output = run(args);
    output
        .status
        .success()
        .then_some(())
        .ok_or_else(|| format!("{args:?}: {}", String::from_utf8_lossy(&output.stderr)))
}

/// A veth pair named for this process: `our_end` in this namespace for DPDK (no IP, the kernel kept
/// off it), `peer_end` in a fresh namespace with PEER_IP. Deleted, namespace and all, on drop.
struct TestNet {
    namespace: String,
    our_end: String,
    our_mac: [u8; 6],
    peer_end: String,
}

impl TestNet {
    fn create() -> Result<TestNet, String> {
        let pid = std::process::id();
        let net = TestNet {
            namespace: format!("tandem-dpdk-{pid}"),
            our_end: format!("tdpk{pid}a"),
            our_mac: [0; 6],
            peer_end: format!("tdpk{pid}b"),
        };
        let peer_end = net.peer_end.clone();
        run_ok(&["ip", "netns", "add", &net.namespace])?;
        run_ok(&[
            "ip",
            "link",
            "add",
            &net.our_end,
            "type",
            "veth",
            "peer",
            "name",
            &peer_end,
        ])?;
        run_ok(&["ip", "link", "set", &peer_end, "netns", &net.namespace])?;
        // The kernel must not answer or forward what arrives for smoltcp: our end has no address (so
        // no ARP replies), no IPv6, and IPv4 forwarding off (frames for other hosts are dropped quietly).
        let _ = run(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{}.disable_ipv6=1", net.our_end),
        ]);
        run_ok(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.conf.{}.forwarding=0", net.our_end),
        ])?;
        run_ok(&["ip", "link", "set", &net.our_end, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &net.namespace];
            full.extend_from_slice(args);
            run_ok(&full)
        };
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{PEER_IP}/24"),
            "dev",
            &peer_end,
        ])?;
        in_ns(&["ip", "link", "set", &peer_end, "up"])?;
        // A veth with TSO/GSO passes whole 64 KiB TCP segments to its partner, and AF_PACKET hands
        // them over unsegmented: too big for a 1514-byte device (a real wire never carries them).
        in_ns(&["ethtool", "-K", &peer_end, "tso", "off", "gso", "off"])?;
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", net.our_end))
            .map_err(|e| e.to_string())?;
        let mut net = net;
        for (byte, hex) in net.our_mac.iter_mut().zip(mac.trim().split(':')) {
            *byte = u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
        }
        Ok(net)
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.namespace, "timeout", "30"];
        full.extend_from_slice(args);
        run(&full)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the peer end and with it the pair; the link delete is for a
        // pair whose peer never moved.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.our_end])
            .stderr(std::process::Stdio::null())
            .output();
    }
}

/// Hugepages made free for the test by raising nr_hugepages, lowered again on drop. None when they
/// could not be had (or TANDEM_DPDK_NO_HUGE is set): the test then runs EAL without hugepages.
struct Hugepages {
    raised_from: Option<u64>,
}

impl Hugepages {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    fn reserve(needed: u64) -> Option<Hugepages> {
        if std::env::var_os("TANDEM_DPDK_NO_HUGE").is_some() {
            println!("TANDEM_DPDK_NO_HUGE set: EAL runs without hugepages");
            return None;
        }
        let free = Self::free()?;
        let mut raised_from = None;
        if free < needed {
            let total: u64 = std::fs::read_to_string(Self::NR)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            if std::fs::write(Self::NR, (total + needed - free).to_string()).is_err() {
                println!("cannot raise {}: EAL runs without hugepages", Self::NR);
                return None;
            }
            raised_from = Some(total);
        }
        let hugepages = Hugepages { raised_from };
        let free = Self::free()?;
        if free < needed {
            println!(
                "only {free} free 2 MiB hugepages after raising {}: EAL runs without them",
                Self::NR
            );
            return None;
        }
        println!("{free} free 2 MiB hugepages");
        Some(hugepages)
    }

    fn free() -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo
            .lines()
            .find(|line| line.starts_with("HugePages_Free:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if let Some(total) = self.raised_from {
            let _ = std::fs::write(Self::NR, total.to_string());
        }
    }
}
