//! Operator settings: memcached's flags, a TOML file, and the [`Settings`] every shard reads.
//!
//! Flags follow memcached where they overlap (`-p -l -m -t -c -I -U -v -A -F -C -M -R`), with its
//! defaults; everything is also settable in a TOML file (`--config FILE`, section `[server]`). Flags
//! override the file. Unknown keys, bad values and conflicting settings are start-up errors that name
//! the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use std::sync::atomic::AtomicU32;

use clap::Parser;
use serde::Deserialize;

/// Settings fixed at start-up, shared read-only by every thread (verbosity can change at run time).
#[derive(Debug)]
pub struct Settings {
    /// `-p`
    pub port: u16,
    /// `-l`
    pub listen: String,
    /// `-m`, in bytes.
    pub memory_limit: usize,
    /// `-t`
    pub threads: usize,
    /// `-c`
    pub max_connections: usize,
    /// `-I`, in bytes.
    pub item_size_max: usize,
    /// `-C` turns CAS off (responses carry 0).
    pub cas_enabled: bool,
    /// `-F` turns flush_all off.
    pub flush_enabled: bool,
    /// `-A` turns `shutdown` on.
    pub shutdown_enabled: bool,
    /// `-e`: keep each shard's items in `<path>.<shard>` (see [`shard_memory_file`]) so that a restarted
    /// tandemd finds them again.
    pub memory_file: Option<PathBuf>,
    /// `-M` turns eviction off.
    pub evictions: bool,
    /// `-R`: requests handled per connection per event before yielding to others.
    pub reqs_per_event: usize,
    /// `-v` count; `verbosity N` changes it.
    pub verbosity: AtomicU32,
    /// `[replication]`, if this node replicates.
    pub replication: Option<ReplicationSettings>,
    /// `[failover]`, if this node takes over the service address when its active dies.
    pub failover: Option<FailoverSettings>,
    /// `[net]`: kernel sockets, or a userspace stack per worker.
    pub net: NetBackend,
    /// `[net] backend`: with kernel sockets, how workers wait for them (epoll or io_uring).
    pub kernel_io: KernelIo,
    /// `[admin] socket`: where `tandemctl` reaches this node (by default `<failover.state_dir>/admin.sock`
    /// with failover; none without replication).
    pub admin_socket: Option<PathBuf>,
}

impl Settings {
    /// A standby serves reads only.
    pub fn read_only(&self) -> bool {
        self.replication.as_ref().is_some_and(|r| r.role == Role::Standby)
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            port: 11211,
            listen: "127.0.0.1".into(),
            memory_limit: 64 << 20,
            threads: 4,
            max_connections: 1024,
            item_size_max: 1 << 20,
            cas_enabled: true,
            flush_enabled: true,
            shutdown_enabled: false,
            memory_file: None,
            evictions: true,
            reqs_per_event: 20,
            verbosity: AtomicU32::new(0),
            replication: None,
            failover: None,
            net: NetBackend::Kernel,
            kernel_io: KernelIo::default(),
            admin_socket: None,
        }
    }
}

/// memcached's floor and ceiling for `-I`.
pub const ITEM_SIZE_MIN: usize = 1024;
pub const ITEM_SIZE_LIMIT: usize = 1 << 30;

/// Command-line flags, memcached's where they overlap.
#[derive(Parser, Debug, Default)]
#[command(name = "tandemd", version = crate::VERSION, about = "Tandem: a memcached-compatible cache server, one shard per core")]
pub struct Flags {
    /// TCP port to listen on (default 11211; 0 picks a free port).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// UDP port: only 0 (off) is accepted; Tandem has no UDP.
    #[arg(short = 'U', long = "udp-port")]
    pub udp_port: Option<u16>,
    /// Interface(s) to listen on, comma separated (default 127.0.0.1).
    #[arg(short = 'l', long = "listen")]
    pub listen: Option<String>,
    /// Item memory in megabytes (default 64).
    #[arg(short = 'm', long = "memory-limit")]
    pub memory_mb: Option<usize>,
    /// Worker threads, one shard each (default: the CPUs this process may use).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Maximum simultaneous connections (default 1024).
    #[arg(short = 'c', long = "conn-limit")]
    pub max_connections: Option<usize>,
    /// Maximum item size, with k/m/g suffix (default 1m, at most 1g).
    #[arg(short = 'I', long = "max-item-size")]
    pub max_item_size: Option<String>,
    /// Verbose logging; -vv more so.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Enable the `shutdown` command.
    #[arg(short = 'A', long = "enable-shutdown")]
    pub enable_shutdown: bool,
    /// Disable flush_all.
    #[arg(short = 'F', long = "disable-flush-all")]
    pub disable_flush: bool,
    /// Disable CAS (responses carry 0).
    #[arg(short = 'C', long = "disable-cas")]
    pub disable_cas: bool,
    /// Keep the cache in memory files (one per shard: PATH.0, PATH.1 ...), ideally on tmpfs or hugetlbfs,
    /// so a restarted tandemd finds its items again (and a standby resumes replication).
    #[arg(short = 'e', long = "memory-file", value_name = "PATH")]
    pub memory_file: Option<PathBuf>,
    /// Return an error when memory is full instead of evicting.
    #[arg(short = 'M', long = "disable-evictions")]
    pub disable_evictions: bool,
    /// Requests per connection per event before yielding to others (default 20).
    #[arg(short = 'R', long = "max-reqs-per-event")]
    pub reqs_per_event: Option<usize>,
    /// TOML configuration file; flags override it.
    #[arg(long = "config")]
    pub config: Option<PathBuf>,
    /// Do not serve: remove the configured service address from its interface unless a tandemd here
    /// serves as the active, then exit (systemd's ExecStopPost: a crashed tandemd leaves it behind).
    #[arg(long = "release-service-address")]
    pub release_service_address: bool,
}

/// The TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    pub replication: Option<ReplicationSection>,
    pub failover: Option<FailoverSection>,
    pub net: Option<NetSection>,
    pub admin: Option<AdminSection>,
}

/// `[net]` in the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// "kernel" (the default: kernel sockets through epoll), "uring" (kernel sockets through io_uring,
    /// epoll where the kernel does not allow it), "epoll" (the same as "kernel"), "dpdk" or "tap".
    pub backend: Option<String>,
    pub dpdk: Option<StackSection>,
    pub tap: Option<StackSection>,
}

/// `[net.dpdk]` or `[net.tap]`: the userspace stack's address and sizes, and how to reach the device.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct StackSection {
    /// DPDK only: EAL arguments, e.g. ["--in-memory", "--vdev=net_af_packet0,iface=eth1"].
    pub eal_args: Option<Vec<String>>,
    /// DPDK only: the port to use (default: the first one available).
    pub port_id: Option<u16>,
    /// DPDK only: one single-queue port per worker instead of one port with a queue per worker: worker
    /// w drives port `port_id + w` (e.g. net_af_xdp on a veth, which has no multi-queue port: one
    /// `--vdev=net_af_xdpN,iface=<veth>,start_queue=N,queue_count=1` per worker). The ports must share a MAC.
    pub port_per_worker: Option<bool>,
    /// tap only: the tap device's name (created if missing; needs CAP_NET_ADMIN).
    pub name: Option<String>,
    /// "A.B.C.D/len": the node's address on this network.
    pub address: Option<String>,
    pub gateway: Option<String>,
    /// "02:00:00:00:00:01" (default: the port's own MAC; for tap, a fixed local address).
    pub mac: Option<String>,
    pub backlog: Option<usize>,
    pub max_half_open: Option<usize>,
    pub rx_buffer_kb: Option<usize>,
    pub tx_buffer_kb: Option<usize>,
    /// Spin this long after the last activity before sleeping (0: sleep at once).
    pub idle_spin_us: Option<u64>,
    /// Longest sleep between device polls while idle.
    pub idle_sleep_us: Option<u64>,
    /// Fault injection for tests: lose this share of frames each way (default 0).
    pub drop_percent: Option<u8>,
}

/// Where a worker's bytes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum NetBackend {
    /// Kernel TCP sockets (the default).
    Kernel,
    /// smoltcp per worker, each on its own queue of one DPDK port.
    Dpdk(StackSettings),
    /// smoltcp on a Linux tap device: one worker, for trying the userspace stack without DPDK.
    Tap(StackSettings),
}

/// How a worker drives its kernel sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelIo {
    /// One io_uring per worker ([`crate::net::uring`]); falls back to epoll, with a log line, where
    /// io_uring cannot be set up (an old kernel, or a container that forbids it). Opt-in: see README.
    Uring,
    /// epoll through mio ([`crate::net::kernel`]), the default.
    #[default]
    Epoll,
}

impl KernelIo {
    /// The name `stats net` reports as the backend.
    pub fn name(self) -> &'static str {
        match self {
            KernelIo::Uring => "uring",
            KernelIo::Epoll => "epoll",
        }
    }
}

/// The userspace stack's settings, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct StackSettings {
    pub eal_args: Vec<String>,
    pub port_id: Option<u16>,
    pub port_per_worker: bool,
    pub tap_name: String,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    pub backlog: usize,
    pub max_half_open: usize,
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    pub idle_spin: Duration,
    pub idle_sleep: Duration,
    pub drop_percent: u8,
}

/// Parses "A.B.C.D/len".
fn parse_cidr(key: &'static str, text: &str) -> Result<(std::net::Ipv4Addr, u8), ConfigError> {
    let (addr, len) = text.split_once('/').ok_or_else(|| invalid(key, format!("{text:?}: expected A.B.C.D/len")))?;
    let addr = addr.parse().map_err(|_| invalid(key, format!("{addr:?} is not an IPv4 address")))?;
    let len = len.parse().ok().filter(|&n: &u8| (1..=32).contains(&n)).ok_or_else(|| invalid(key, format!("{len:?} is not a prefix length")))?;
    Ok((addr, len))
}

/// Parses "aa:bb:cc:dd:ee:ff" into a unicast MAC.
fn parse_mac(key: &'static str, text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || invalid(key, format!("{text:?} is not a MAC address like 02:00:00:00:00:01"));
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    // The interface's own address must be one a neighbour can point at: unicast and not all zeros.
    if mac == [0xff; 6] {
        return Err(invalid(key, format!("{text:?} is the broadcast address, not a unicast one")));
    }
    if mac[0] & 1 != 0 {
        return Err(invalid(key, format!("{text:?} is a multicast address (the low bit of its first byte is set), not a unicast one")));
    }
    if mac == [0; 6] {
        return Err(invalid(key, format!("{text:?} is all zeros, not a unicast address")));
    }
    Ok(mac)
}

impl NetBackend {
    fn from_section(section: NetSection) -> Result<NetBackend, ConfigError> {
        let backend = section.backend.as_deref().unwrap_or("kernel");
        let (stack, prefix) = match backend {
            "kernel" | "uring" | "epoll" => {
                if section.dpdk.is_some() || section.tap.is_some() {
                    return Err(invalid("net.backend", format!("is {backend:?}, but a [net.dpdk] or [net.tap] table is set; say which backend to use")));
                }
                return Ok(NetBackend::Kernel);
            }
            "dpdk" => (section.dpdk.ok_or_else(|| invalid("net.dpdk", "missing: the dpdk backend needs eal_args and address"))?, "dpdk"),
            "tap" => (section.tap.ok_or_else(|| invalid("net.tap", "missing: the tap backend needs name and address"))?, "tap"),
            other => return Err(invalid("net.backend", format!("{other:?} is not \"kernel\", \"uring\", \"epoll\", \"dpdk\" or \"tap\""))),
        };
        let key = |dpdk: &'static str, tap: &'static str| if prefix == "dpdk" { dpdk } else { tap };
        let text = stack.address.ok_or_else(|| invalid(key("net.dpdk.address", "net.tap.address"), "missing: A.B.C.D/len"))?;
        let (address, prefix_len) = parse_cidr(key("net.dpdk.address", "net.tap.address"), &text)?;
        let gateway = stack
            .gateway
            .map(|g| g.parse().map_err(|_| invalid(key("net.dpdk.gateway", "net.tap.gateway"), format!("{g:?} is not an IPv4 address"))))
            .transpose()?;
        let mac = stack.mac.map(|m| parse_mac(key("net.dpdk.mac", "net.tap.mac"), &m)).transpose()?;
        let kb = |v: Option<usize>, name: &'static str| -> Result<usize, ConfigError> {
            match v.unwrap_or(16) {
                n @ 1..=16384 => Ok(n << 10),
                n => Err(invalid(name, format!("{n} is not between 1 and 16384"))),
            }
        };
        let settings = StackSettings {
            eal_args: stack.eal_args.clone().unwrap_or_default(),
            port_id: stack.port_id,
            port_per_worker: stack.port_per_worker.unwrap_or(false),
            tap_name: stack.name.clone().unwrap_or_else(|| "tandem0".into()),
            address,
            prefix_len,
            gateway,
            mac,
            backlog: stack.backlog.unwrap_or(16).max(1),
            max_half_open: stack.max_half_open.unwrap_or(1024).max(1),
            rx_buffer: kb(stack.rx_buffer_kb, key("net.dpdk.rx_buffer_kb", "net.tap.rx_buffer_kb"))?,
            tx_buffer: kb(stack.tx_buffer_kb, key("net.dpdk.tx_buffer_kb", "net.tap.tx_buffer_kb"))?,
            idle_spin: Duration::from_micros(stack.idle_spin_us.unwrap_or(200)),
            idle_sleep: Duration::from_micros(stack.idle_sleep_us.unwrap_or(500).clamp(1, 1_000_000)),
            drop_percent: stack.drop_percent.unwrap_or(0),
        };
        if settings.drop_percent > 50 {
            return Err(invalid(key("net.dpdk.drop_percent", "net.tap.drop_percent"), "must be between 0 and 50"));
        }
        if prefix == "dpdk" {
            if stack.name.is_some() {
                return Err(invalid("net.dpdk.name", "is for [net.tap]; a DPDK port is named by eal_args and port_id"));
            }
            if settings.eal_args.is_empty() {
                return Err(invalid("net.dpdk.eal_args", "missing: e.g. [\"--in-memory\", \"--vdev=net_af_packet0,iface=eth1\"]"));
            }
            Ok(NetBackend::Dpdk(settings))
        } else {
            if stack.eal_args.is_some() || stack.port_id.is_some() || stack.port_per_worker.is_some() {
                return Err(invalid("net.tap.eal_args", "eal_args, port_id and port_per_worker are for [net.dpdk]"));
            }
            Ok(NetBackend::Tap(settings))
        }
    }
}

/// `[admin]` in the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// The Unix socket `tandemctl` talks to.
    pub socket: Option<PathBuf>,
}

/// `[failover]` in the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    pub service_ip: Option<String>,
    pub interface: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub dead_after_ms: Option<u64>,
    pub witness: Option<String>,
    pub state_dir: Option<PathBuf>,
}

/// Failover settings, checked.
#[derive(Clone, Debug)]
pub struct FailoverSettings {
    /// The address clients use, and its prefix length.
    pub service_ip: std::net::Ipv4Addr,
    pub prefix_len: u8,
    /// Where the service address lives (kernel mode; empty with a userspace stack).
    pub interface: String,
    /// With a userspace stack (dataplane mode): the slot through which the workers' stacks take and
    /// drop the service address (set at start-up).
    pub stack: Option<std::sync::Arc<crate::failover::ServiceSlot>>,
    /// Where the epoch is kept across restarts.
    pub state_dir: PathBuf,
    /// A standby promotes only while this address answers (ICMP echo), if set.
    pub witness: Option<std::net::Ipv4Addr>,
    /// The client port (`-p`): a standby asks whether a memcached server still answers on the service
    /// address there before it promotes (see `crate::failover_guard`). The pair serves one port.
    pub service_port: u16,
}

/// Heartbeats and the silence that declares the active dead, by default: a median failover under
/// 250 ms needs detection well under it; 6 missed heartbeats leave room for a busy machine.
const FAILOVER_HEARTBEAT_MS: u64 = 25;
const FAILOVER_DEAD_AFTER_MS: u64 = 150;

impl FailoverSettings {
    fn from_section(section: FailoverSection, replication: &mut ReplicationSettings, net: &NetBackend) -> Result<FailoverSettings, ConfigError> {
        let text = section.service_ip.ok_or_else(|| invalid("failover.service_ip", "missing: the address clients use, as A.B.C.D/len"))?;
        let (addr, len) = text.split_once('/').ok_or_else(|| invalid("failover.service_ip", format!("{text:?}: expected A.B.C.D/len")))?;
        let service_ip = addr.parse().map_err(|_| invalid("failover.service_ip", format!("{addr:?} is not an IPv4 address")))?;
        let prefix_len: u8 = len.parse().ok().filter(|&n| n <= 32).ok_or_else(|| invalid("failover.service_ip", format!("{len:?} is not a prefix length")))?;
        let interface = match (section.interface, net) {
            (Some(interface), NetBackend::Kernel) => interface,
            (None, NetBackend::Kernel) => return Err(invalid("failover.interface", "missing: the interface that carries the service address")),
            (Some(_), _) => return Err(invalid("failover.interface", "is for kernel sockets; with a userspace stack the service address lives on the stack")),
            (None, _) => String::new(),
        };
        let witness = section
            .witness
            .map(|text| text.parse().map_err(|_| invalid("failover.witness", format!("{text:?} is not an IPv4 address"))))
            .transpose()?;
        let state_dir = section.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/tandem"));
        let heartbeat = Duration::from_millis(section.heartbeat_ms.unwrap_or(FAILOVER_HEARTBEAT_MS).max(1));
        let dead_after = Duration::from_millis(section.dead_after_ms.unwrap_or(FAILOVER_DEAD_AFTER_MS));
        if dead_after <= heartbeat * 2 {
            return Err(invalid("failover.dead_after_ms", "must be more than two heartbeats"));
        }
        replication.heartbeat = heartbeat;
        replication.dead_after = Some(dead_after);
        replication.peer_timeout = replication.peer_timeout.max(dead_after);
        Ok(FailoverSettings { service_ip, prefix_len, interface, state_dir, witness, stack: None, service_port: 11211 })
    }
}

/// `[replication]` in the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    pub role: Option<String>,
    pub listen: Option<String>,
    #[serde(default)]
    pub peers: Vec<String>,
    pub mode: Option<String>,
    pub ack: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub backlog_mb: Option<usize>,
    pub transport: Option<String>,
    /// transport = "rdma": the device (default: the first with an active port).
    pub rdma_device: Option<String>,
    /// transport = "rdma": the local GID index (default: the RoCE v2 entry with an IPv4 address).
    pub gid_index: Option<u8>,
    pub heartbeat_ms: Option<u64>,
    pub peer_timeout_ms: Option<u64>,
    pub async_batch_us: Option<u64>,
}

/// This node's part in a replicated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// Replication settings, checked.
#[derive(Clone, Debug)]
pub struct ReplicationSettings {
    pub role: Role,
    /// Active: where standbys connect.
    pub listen: Option<SocketAddr>,
    /// Standby: where the active may be, tried in turn.
    pub peers: Vec<SocketAddr>,
    pub mode: replica::shipper::Mode,
    pub ack: replica::shipper::AckPolicy,
    pub secret: Vec<u8>,
    pub backlog_bytes: usize,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
    /// Async mode: how long the replication core gathers writes before shipping them.
    pub async_batch: Duration,
    /// Failover: a synced standby promotes itself after the active is silent this long.
    pub dead_after: Option<Duration>,
    /// What carries the data stream (both ends must agree).
    pub transport: replica::transport::Transport,
}

/// Shortest shared secret accepted, in bytes.
const SECRET_MIN: usize = 16;
/// Async mode's default gathering window: at a few tens of thousands of writes a second, shipping each
/// as it comes costs both ends a wake-up and a send per write. Two milliseconds took the standby's CPU
/// per request from 0.8 us (500 us windows) to 0.35 us (BENCHMARKS.md, "Replication"), for a loss
/// window of about 2 ms of writes under sustained load: small beside a failover's ~250 ms. A write
/// after a quiet spell still leaves at once (the wait counts from the previous shipment).
pub const ASYNC_BATCH_US: u64 = 2000;
/// Longest gathering window accepted.
const ASYNC_BATCH_MAX_US: u64 = 100_000;

impl ReplicationSettings {
    fn from_section(section: ReplicationSection) -> Result<ReplicationSettings, ConfigError> {
        let role = match section.role.as_deref() {
            Some("active") => Role::Active,
            Some("standby") => Role::Standby,
            Some(other) => return Err(invalid("replication.role", format!("{other:?} is not \"active\" or \"standby\""))),
            None => return Err(invalid("replication.role", "missing: \"active\" or \"standby\"")),
        };
        let addr = |key: &'static str, text: &str| -> Result<SocketAddr, ConfigError> {
            use std::net::ToSocketAddrs;
            text.to_socket_addrs()
                .map_err(|e| invalid(key, format!("{text:?}: {e}")))?
                .next()
                .ok_or_else(|| invalid(key, format!("{text:?} names no address")))
        };
        // A standby may listen too: it ships from there once promoted.
        let listen = section.listen.as_deref().map(|text| addr("replication.listen", text)).transpose()?;
        let peers = section.peers.iter().map(|text| addr("replication.peers", text)).collect::<Result<Vec<_>, _>>()?;
        match role {
            Role::Active if listen.is_none() => return Err(invalid("replication.listen", "an active needs an address to listen on")),
            Role::Standby if peers.is_empty() => return Err(invalid("replication.peers", "a standby needs the active's address")),
            _ => {}
        }
        let mode = match section.mode.as_deref().unwrap_or("async") {
            "async" => replica::shipper::Mode::Async,
            "sync" => replica::shipper::Mode::Sync,
            other => return Err(invalid("replication.mode", format!("{other:?} is not \"async\" or \"sync\""))),
        };
        let ack = match section.ack.as_deref().unwrap_or("one") {
            "one" => replica::shipper::AckPolicy::One,
            "all" => replica::shipper::AckPolicy::All,
            other => return Err(invalid("replication.ack", format!("{other:?} is not \"one\" or \"all\""))),
        };
        let transport = match section.transport.as_deref().unwrap_or("tcp") {
            "tcp" => {
                if section.rdma_device.is_some() || section.gid_index.is_some() {
                    let key = if section.rdma_device.is_some() { "replication.rdma_device" } else { "replication.gid_index" };
                    return Err(invalid(key, "is for transport = \"rdma\""));
                }
                replica::transport::Transport::Tcp
            }
            "rdma" if !replica::transport::RDMA_BUILT => {
                return Err(invalid("replication.transport", replica::transport::rdma_unsupported().to_string()));
            }
            "rdma" => replica::transport::Transport::Rdma(replica::transport::RdmaSettings {
                device: section.rdma_device,
                gid_index: section.gid_index,
            }),
            other => return Err(invalid("replication.transport", format!("{other:?} is not \"tcp\" or \"rdma\""))),
        };
        let path = section.secret_file.ok_or_else(|| invalid("replication.secret_file", "missing: both ends need the shared secret"))?;
        let mut secret = std::fs::read(&path).map_err(|e| invalid("replication.secret_file", format!("{}: {e}", path.display())))?;
        while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
            secret.pop();
        }
        if secret.len() < SECRET_MIN {
            return Err(invalid("replication.secret_file", format!("the secret must be at least {SECRET_MIN} bytes")));
        }
        let backlog_mb = section.backlog_mb.unwrap_or(64);
        if backlog_mb == 0 {
            return Err(invalid("replication.backlog_mb", "must be at least 1"));
        }
        let heartbeat = Duration::from_millis(section.heartbeat_ms.unwrap_or(100).max(1));
        let peer_timeout = Duration::from_millis(section.peer_timeout_ms.unwrap_or(1000));
        if peer_timeout <= heartbeat {
            return Err(invalid("replication.peer_timeout_ms", "must be longer than heartbeat_ms"));
        }
        let async_batch_us = section.async_batch_us.unwrap_or(ASYNC_BATCH_US);
        if async_batch_us > ASYNC_BATCH_MAX_US {
            return Err(invalid("replication.async_batch_us", format!("at most {ASYNC_BATCH_MAX_US} (it widens the loss window)")));
        }
        Ok(ReplicationSettings {
            role,
            listen,
            peers,
            mode,
            ack,
            secret,
            backlog_bytes: backlog_mb << 20,
            heartbeat,
            peer_timeout,
            async_batch: Duration::from_micros(async_batch_us),
            dead_after: None,
            transport,
        })
    }
}

/// `[server]` in the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<String>,
    pub port: Option<u16>,
    pub memory_mb: Option<usize>,
    pub threads: Option<usize>,
    pub max_connections: Option<usize>,
    /// Bytes as an integer, or a string with a k/m/g suffix.
    pub max_item_size: Option<Size>,
    pub reqs_per_event: Option<usize>,
    pub cas: Option<bool>,
    pub flush_all: Option<bool>,
    pub shutdown_command: Option<bool>,
    pub evictions: Option<bool>,
    pub verbosity: Option<u32>,
    /// `-e`: the memory file path (one file per shard, `<path>.<shard>`).
    pub memory_file: Option<PathBuf>,
}

/// A size written as bytes or with a suffix.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// A bad setting, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// Parses "1m", "512k", "2g", "1048576".
pub fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 'b'),
    };
    let n: usize = digits.parse().ok()?;
    let mult = match unit {
        'b' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Shard `shard`'s memory file for the `-e` path `path`: `<path>.<shard>`.
pub fn shard_memory_file(path: &std::path::Path, shard: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{shard}"));
    PathBuf::from(name)
}

/// CPUs available to this process (the default thread count).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Settings {
    /// Builds settings from the file (if any) and the flags, flags winning.
    pub fn from_flags(flags: &Flags) -> Result<Settings, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?
            }
            None => FileConfig::default(),
        };
        let server = file.server;
        let kernel_io = match file.net.as_ref().and_then(|n| n.backend.as_deref()) {
            Some("epoll") => KernelIo::Epoll,
            Some("uring") => KernelIo::Uring,
            _ => KernelIo::default(),
        };
        let net = file.net.map(NetBackend::from_section).transpose()?.unwrap_or(NetBackend::Kernel);
        let mut replication = file.replication.map(ReplicationSettings::from_section).transpose()?;
        let failover = match (file.failover, replication.as_mut()) {
            (Some(section), Some(replication)) => Some(FailoverSettings::from_section(section, replication, &net)?),
            (Some(_), None) => return Err(invalid("failover", "needs a [replication] table: failover promotes a standby")),
            (None, _) => None,
        };
        let mut s = Settings { threads: available_cpus(), net, kernel_io, ..Settings::default() };

        if let Some(port) = flags.udp_port {
            if port != 0 {
                return Err(invalid("-U", format!("UDP port {port} requested, but Tandem serves TCP only; use -U 0")));
            }
        }
        s.port = flags.port.or(server.port).unwrap_or(s.port);
        s.listen = flags.listen.clone().or(server.listen).unwrap_or(s.listen);
        if s.listen.trim().is_empty() {
            return Err(invalid("listen", "empty address"));
        }
        let memory_mb = flags.memory_mb.or(server.memory_mb).unwrap_or(64);
        if memory_mb == 0 {
            return Err(invalid("memory_mb", "must be at least 1"));
        }
        s.memory_limit = memory_mb.checked_mul(1 << 20).ok_or_else(|| invalid("memory_mb", "too large"))?;
        s.threads = flags.threads.or(server.threads).unwrap_or(s.threads);
        if let NetBackend::Tap(_) = s.net {
            // A tap device has one queue, so one worker serves it.
            match flags.threads.or(server.threads) {
                None => s.threads = 1,
                Some(1) => {}
                Some(n) => return Err(invalid("threads", format!("{n}: the tap backend serves one worker; use threads = 1"))),
            }
        }
        if s.threads == 0 || s.threads > 256 {
            return Err(invalid("threads", format!("{} is not between 1 and 256", s.threads)));
        }
        s.max_connections = flags.max_connections.or(server.max_connections).unwrap_or(s.max_connections);
        if s.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        let item_size = match (&flags.max_item_size, &server.max_item_size) {
            (Some(text), _) => Some(parse_size(text).ok_or_else(|| invalid("-I", format!("cannot parse size {text:?}")))?),
            (None, Some(Size::Bytes(n))) => Some(*n as usize),
            (None, Some(Size::Text(text))) => {
                Some(parse_size(text).ok_or_else(|| invalid("max_item_size", format!("cannot parse size {text:?}")))?)
            }
            (None, None) => None,
        };
        if let Some(size) = item_size {
            if size < ITEM_SIZE_MIN {
                return Err(invalid("max_item_size", format!("{size} is below the minimum of {ITEM_SIZE_MIN} bytes")));
            }
            if size > ITEM_SIZE_LIMIT {
                return Err(invalid("max_item_size", format!("{size} is above the maximum of 1g")));
            }
            s.item_size_max = size;
        }
        if s.item_size_max > s.memory_limit / 2 {
            return Err(invalid("max_item_size", "cannot be larger than half of the memory limit (-m)"));
        }
        s.reqs_per_event = flags.reqs_per_event.or(server.reqs_per_event).unwrap_or(s.reqs_per_event);
        if s.reqs_per_event == 0 {
            return Err(invalid("reqs_per_event", "must be at least 1"));
        }
        s.cas_enabled = !flags.disable_cas && server.cas.unwrap_or(true);
        s.flush_enabled = !flags.disable_flush && server.flush_all.unwrap_or(true);
        s.shutdown_enabled = flags.enable_shutdown || server.shutdown_command.unwrap_or(false);
        s.evictions = !flags.disable_evictions && server.evictions.unwrap_or(true);
        s.memory_file = flags.memory_file.clone().or(server.memory_file);
        if s.memory_file.as_ref().is_some_and(|path| path.as_os_str().is_empty() || path.file_name().is_none()) {
            return Err(invalid("memory_file", "needs a file path (PATH.<shard> is created for each shard)"));
        }
        let verbosity = if flags.verbose > 0 { flags.verbose as u32 } else { server.verbosity.unwrap_or(0) };
        s.verbosity = AtomicU32::new(verbosity);
        s.admin_socket = match (file.admin.and_then(|a| a.socket), &replication, &failover) {
            (Some(_), None, _) => return Err(invalid("admin.socket", "needs a [replication] table: tandemctl changes replication roles")),
            (Some(path), Some(_), _) => Some(path),
            (None, Some(_), Some(failover)) => Some(failover.state_dir.join("admin.sock")),
            (None, _, _) => None,
        };
        s.replication = replication;
        s.failover = failover.map(|failover| FailoverSettings { service_port: s.port, ..failover });
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["tandemd"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap()
    }

    #[test]
    fn defaults_are_memcacheds() {
        let s = Settings::from_flags(&flags(&[])).unwrap();
        assert_eq!((s.port, s.listen.as_str(), s.memory_limit, s.max_connections, s.item_size_max), (11211, "127.0.0.1", 64 << 20, 1024, 1 << 20));
        assert!(s.cas_enabled && s.flush_enabled && !s.shutdown_enabled && s.evictions);
    }

    #[test]
    fn memcached_flags_are_understood() {
        let s = Settings::from_flags(&flags(&["-p", "1234", "-m", "128", "-t", "3", "-c", "10", "-I", "2m", "-vv", "-A", "-F", "-C", "-M", "-R", "5", "-U", "0"])).unwrap();
        assert_eq!((s.port, s.memory_limit, s.threads, s.max_connections, s.item_size_max, s.reqs_per_event), (1234, 128 << 20, 3, 10, 2 << 20, 5));
        assert!(s.shutdown_enabled && !s.flush_enabled && !s.cas_enabled && !s.evictions);
        assert_eq!(s.verbosity.into_inner(), 2);
    }

    #[test]
    fn the_memory_file_comes_from_e_or_the_file_one_per_shard() {
        assert_eq!(Settings::from_flags(&flags(&[])).unwrap().memory_file, None);
        let s = Settings::from_flags(&flags(&["-e", "/dev/shm/tandem"])).unwrap();
        assert_eq!(s.memory_file, Some(PathBuf::from("/dev/shm/tandem")));
        assert_eq!(shard_memory_file(s.memory_file.as_ref().unwrap(), 3), PathBuf::from("/dev/shm/tandem.3"));
        let dir = std::env::temp_dir().join(format!("tandem-config-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem.toml");
        std::fs::write(&path, "[server]\nmemory_file = \"/dev/hugepages/tandem\"\n").unwrap();
        let s = Settings::from_flags(&flags(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(s.memory_file, Some(PathBuf::from("/dev/hugepages/tandem")));
        let s = Settings::from_flags(&flags(&["--config", path.to_str().unwrap(), "--memory-file", "/dev/shm/x"])).unwrap();
        assert_eq!(s.memory_file, Some(PathBuf::from("/dev/shm/x")), "the flag wins");
        assert!(Settings::from_flags(&flags(&["-e", "/"])).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn udp_is_refused_clearly() {
        let err = Settings::from_flags(&flags(&["-U", "11211"])).unwrap_err().to_string();
        assert!(err.contains("-U") && err.contains("TCP only"), "{err}");
    }

    #[test]
    fn item_size_limits_follow_memcached() {
        assert!(Settings::from_flags(&flags(&["-I", "2g"])).is_err());
        assert!(Settings::from_flags(&flags(&["-I", "100"])).is_err());
        assert!(Settings::from_flags(&flags(&["-I", "64m", "-m", "64"])).is_err());
        assert!(Settings::from_flags(&flags(&["-I", "lots"])).is_err());
        assert_eq!(parse_size("512k"), Some(512 << 10));
    }

    #[test]
    fn file_settings_apply_and_flags_override_them() {
        let dir = std::env::temp_dir().join(format!("tandem-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ok.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.2\"\nmemory_mb = 32\nthreads = 2\nmax_connections = 50\nmax_item_size = \"512k\"\n").unwrap();
        let s = Settings::from_flags(&flags(&["--config", path.to_str().unwrap(), "-c", "60"])).unwrap();
        assert_eq!((s.listen.as_str(), s.memory_limit, s.threads, s.max_connections, s.item_size_max), ("127.0.0.2", 32 << 20, 2, 60, 512 << 10));
    }

    #[test]
    fn net_settings_are_checked_and_name_the_key() {
        let dir = std::env::temp_dir().join(format!("tandem-config-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Settings::from_flags(&flags(&["--config", path.to_str().unwrap()]))
        };
        let s = load("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"--in-memory\"]\naddress = \"10.1.0.2/24\"\ngateway = \"10.1.0.1\"\nmac = \"02:00:00:00:00:05\"\nrx_buffer_kb = 8\n").unwrap();
        let NetBackend::Dpdk(dpdk) = &s.net else { panic!("{:?}", s.net) };
        assert_eq!((dpdk.address, dpdk.prefix_len), ("10.1.0.2".parse().unwrap(), 24));
        assert_eq!(dpdk.gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(dpdk.mac, Some([2, 0, 0, 0, 0, 5]));
        assert_eq!((dpdk.rx_buffer, dpdk.tx_buffer), (8 << 10, 16 << 10));
        assert_eq!(dpdk.eal_args, vec!["--in-memory".to_string()]);
        assert!(!dpdk.port_per_worker, "one port with a queue per worker unless asked");
        let s = load("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"--in-memory\"]\naddress = \"10.1.0.2/24\"\nport_per_worker = true\n").unwrap();
        assert!(matches!(&s.net, NetBackend::Dpdk(d) if d.port_per_worker));

        let s = load("[net]\nbackend = \"tap\"\n[net.tap]\nname = \"t0\"\naddress = \"10.1.0.2/24\"\n").unwrap();
        assert!(matches!(&s.net, NetBackend::Tap(t) if t.tap_name == "t0"));
        assert_eq!(s.threads, 1, "a tap backend defaults to one worker");
        assert!(load("[server]\nthreads = 2\n[net]\nbackend = \"tap\"\n[net.tap]\naddress = \"10.1.0.2/24\"\n").unwrap_err().to_string().contains("threads"));

        for (text, key) in [
            ("[net]\nbackend = \"dpdk\"\n", "net.dpdk"),
            ("[net]\nbackend = \"dpdk\"\n[net.dpdk]\naddress = \"10.1.0.2/24\"\n", "net.dpdk.eal_args"),
            ("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"x\"]\n", "net.dpdk.address"),
            ("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"x\"]\naddress = \"10.1.0.2\"\n", "net.dpdk.address"),
            ("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"x\"]\naddress = \"10.1.0.2/24\"\nmac = \"01:00:00:00:00:01\"\n", "net.dpdk.mac"),
            ("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"x\"]\naddress = \"10.1.0.2/24\"\ngateway = \"x\"\n", "net.dpdk.gateway"),
            ("[net]\nbackend = \"rdma\"\n", "net.backend"),
            ("[net]\n[net.dpdk]\n", "net.backend"),
            ("[net]\nbackend = \"tap\"\n[net.tap]\naddress = \"10.1.0.2/24\"\neal_args = []\n", "net.tap.eal_args"),
            ("[net]\nbackend = \"tap\"\n[net.tap]\naddress = \"10.1.0.2/24\"\nport_per_worker = true\n", "port_per_worker"),
            ("[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"x\"]\naddress = \"10.1.0.2/24\"\nspeed = 1\n", "speed"),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let dir = std::env::temp_dir().join(format!("tandem-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[server]\nmemroy_mb = 32\n").unwrap();
        let err = Settings::from_flags(&flags(&["--config", path.to_str().unwrap()])).unwrap_err().to_string();
        assert!(err.contains("memroy_mb"), "{err}");
        std::fs::write(&path, "[server]\nthreads = \"many\"\n").unwrap();
        let err = Settings::from_flags(&flags(&["--config", path.to_str().unwrap()])).unwrap_err().to_string();
        assert!(err.contains("threads"), "{err}");
    }

    #[test]
    fn replication_settings_are_checked_and_name_the_key() {
        let dir = std::env::temp_dir().join(format!("tandem-config-repl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "a-secret-of-enough-length\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "tiny").unwrap();
        let path = dir.join("repl.toml");
        let load = |body: String| {
            std::fs::write(&path, body).unwrap();
            Settings::from_flags(&flags(&["--config", path.to_str().unwrap()]))
        };
        let secret_line = format!("secret_file = \"{}\"\n", secret.display());
        let active = load(format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nmode = \"sync\"\nack = \"all\"\n{secret_line}")).unwrap();
        let r = active.replication.as_ref().unwrap();
        assert_eq!((r.role, r.mode, r.ack), (Role::Active, replica::shipper::Mode::Sync, replica::shipper::AckPolicy::All));
        assert_eq!(r.secret, b"a-secret-of-enough-length", "trailing whitespace is not part of the secret");
        assert!(!active.read_only());
        assert_eq!(r.async_batch, Duration::from_micros(ASYNC_BATCH_US), "the default gathering window");
        let unbatched = load(format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nasync_batch_us = 0\n{secret_line}")).unwrap();
        assert_eq!(unbatched.replication.unwrap().async_batch, Duration::ZERO);
        let standby = load(format!("[replication]\nrole = \"standby\"\npeers = [\"127.0.0.1:1\"]\n{secret_line}")).unwrap();
        assert!(standby.read_only());
        for (body, key) in [
            (format!("[replication]\nrole = \"leader\"\n{secret_line}"), "replication.role"),
            (format!("[replication]\nrole = \"active\"\n{secret_line}"), "replication.listen"),
            (format!("[replication]\nrole = \"standby\"\n{secret_line}"), "replication.peers"),
            ("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\n".to_string(), "replication.secret_file"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nsecret_file = \"{}\"\n", short.display()), "replication.secret_file"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nmode = \"eventually\"\n{secret_line}"), "replication.mode"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\ntransport = \"udp\"\n{secret_line}"), "replication.transport"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\ngid_index = 1\n{secret_line}"), "replication.gid_index"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nheartbeat_ms = 500\npeer_timeout_ms = 100\n{secret_line}"), "replication.peer_timeout_ms"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nsecrets = 1\n{secret_line}"), "secrets"),
            (format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nasync_batch_us = 1000000\n{secret_line}"), "replication.async_batch_us"),
        ] {
            let err = load(body).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let rdma = load(format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\ntransport = \"rdma\"\nrdma_device = \"rxe0\"\n{secret_line}"));
        if replica::transport::RDMA_BUILT {
            let settings = rdma.unwrap().replication.unwrap();
            let expected = replica::transport::RdmaSettings { device: Some("rxe0".into()), gid_index: None };
            assert_eq!(settings.transport, replica::transport::Transport::Rdma(expected));
        } else {
            // A build without the feature says so at start-up, not at the first connection.
            let err = rdma.unwrap_err().to_string();
            assert!(err.contains("replication.transport") && err.contains("built without"), "{err}");
        }
    }

    #[test]
    fn the_admin_socket_defaults_to_the_state_directory_and_needs_replication() {
        let dir = std::env::temp_dir().join(format!("tandem-config-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "a-secret-of-enough-length\n").unwrap();
        let path = dir.join("admin.toml");
        let load = |body: String| {
            std::fs::write(&path, body).unwrap();
            Settings::from_flags(&flags(&["--config", path.to_str().unwrap()]))
        };
        let replication = format!("[replication]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\nsecret_file = \"{}\"\n", secret.display());
        let failover = "[failover]\nservice_ip = \"10.0.0.9/24\"\ninterface = \"eth0\"\nstate_dir = \"/tmp/st\"\n";
        assert_eq!(load(format!("{replication}{failover}")).unwrap().admin_socket, Some(PathBuf::from("/tmp/st/admin.sock")));
        let chosen = load(format!("{replication}{failover}[admin]\nsocket = \"/run/t.sock\"\n")).unwrap();
        assert_eq!(chosen.admin_socket, Some(PathBuf::from("/run/t.sock")));
        assert_eq!(load(replication.clone()).unwrap().admin_socket, None, "replication without failover: only if asked for");
        let err = load("[admin]\nsocket = \"/run/t.sock\"\n".to_string()).unwrap_err().to_string();
        assert!(err.contains("admin.socket"), "{err}");
        let err = load(format!("{replication}[admin]\npath = \"/x\"\n")).unwrap_err().to_string();
        assert!(err.contains("path"), "{err}");

        // Dataplane mode: the service address lives on the stacks, so no interface is named.
        let dpdk = "[net]\nbackend = \"dpdk\"\n[net.dpdk]\neal_args = [\"--in-memory\"]\naddress = \"10.0.0.2/24\"\n";
        let stackless = "[failover]\nservice_ip = \"10.0.0.9/24\"\nstate_dir = \"/tmp/st\"\n";
        let s = load(format!("{replication}{stackless}{dpdk}")).unwrap();
        assert_eq!(s.failover.unwrap().interface, "");
        let err = load(format!("{replication}{failover}{dpdk}")).unwrap_err().to_string();
        assert!(err.contains("failover.interface") && err.contains("userspace stack"), "{err}");
        let err = load(format!("{replication}{stackless}")).unwrap_err().to_string();
        assert!(err.contains("failover.interface") && err.contains("missing"), "{err}");
    }
}
