//! A DPDK port as smoltcp devices: one [`DpdkQueue`] per rx/tx queue pair, each driven by one thread.
//!
//! - [`Eal`]: the process's one DPDK Environment Abstraction Layer (EAL cannot start twice in a
//!   process, even after it was cleaned up).
//! - [`Port`]: an ethdev port configured with N queue pairs, a packet-buffer pool per queue, started,
//!   promiscuous mode off; [`PortStats`] are the port's counters.
//! - [`DpdkQueue`]: one queue pair as a [`smoltcp::phy::Device`]. Receiving takes up to [`BURST`] frames
//!   in one `rx_burst` and hands them out one token at a time; each frame's mbuf goes back to its pool
//!   when its token is consumed or dropped. Transmitting writes each frame straight into an mbuf of the
//!   queue's pool and queues it; [`DpdkQueue::flush`] sends the round's frames in one `tx_burst`
//!   (call it once per poll round, after `Interface::poll`). [`QueueCounters`] count what happened.
//!
//! Checksums: IPv4 header and ICMP checksums are computed and verified in software. TCP and UDP
//! checksums are computed on transmit but not verified on receive, because a veth peer (the test and
//! trial setup) leaves them partial in frames read through AF_PACKET; on a real NIC the Ethernet FCS
//! covers the wire.
//!
//! Hot path: no allocation per frame; the rx and tx arrays are fixed per queue.

use std::ffi::{c_char, c_int, CStr, CString};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use dpdk_sys as sys;
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::hugepages;

/// Frames taken per `rx_burst` and sent per `tx_burst`.
pub const BURST: usize = 32;
/// The largest Ethernet frame smoltcp may send or accept: IP MTU 1500 plus the 14-byte header.
pub const MAX_FRAME: usize = 1514;
/// Descriptors per rx and per tx ring (the driver may adjust them to its limits).
const RING_DESCRIPTORS: u16 = 1024;
/// Mbufs per queue's pool: both rings, the per-lcore caches and the bursts in flight, rounded to the
/// 2^n - 1 that the mempool's ring holds best.
const POOL_MBUFS: u32 = 4095;
/// Per-lcore cache of each pool (the mempool keeps it only for threads with an lcore id; see
/// [`DpdkQueue::register_thread`]).
const POOL_CACHE: u32 = 256;

static EAL_STARTED: AtomicBool = AtomicBool::new(false);

/// The process's DPDK EAL. Cleaned up (`rte_eal_cleanup`) when the last of this handle, the ports
/// opened with it and the threads registered with it is gone.
pub struct Eal {
    inner: Arc<EalInner>,
    /// The `--vdev` arguments EAL was given, to name them when they yield no port.
    vdevs: Vec<String>,
}

struct EalInner;

impl Drop for EalInner {
    fn drop(&mut self) {
        // SAFETY: the last user of the EAL is gone: every Port and registered thread holds this Arc.
        unsafe { sys::rte_eal_cleanup() };
    }
}

impl Eal {
    /// Starts EAL with `args` (EAL options only, no program name), e.g. `["--no-pci", "--in-memory",
    /// "--vdev=net_af_packet0,iface=veth0"]`.
    ///
    /// Unless `args` choose lcores (`-l`, `-c`, `--lcores`), EAL is given `-l <first CPU this thread may
    /// use>` so it starts no worker lcore threads of its own: Tandem's workers are its own threads,
    /// each registered with [`DpdkQueue::register_thread`]. EAL pins the calling thread to its main
    /// lcore's CPU; this restores the thread's CPU affinity afterwards, so threads it spawns later are
    /// not all pinned to one CPU.
    ///
    /// Before EAL starts, a machine without the hugepages these `args` need is refused with a message
    /// that names the fix ([`hugepages::eal_hugepage_problem`]).
    pub fn init(args: &[String]) -> anyhow::Result<Eal> {
        if let Some(problem) = hugepages::eal_hugepage_problem(args) {
            bail!("{problem}");
        }
        if EAL_STARTED.swap(true, Ordering::SeqCst) {
            bail!("DPDK EAL was already started in this process (it starts once per process)");
        }
        let affinity = ThreadAffinity::current();
        let mut argv_strings = vec!["tandemd".to_string()];
        let picks_lcores = args.iter().any(|arg| {
            arg == "-l"
                || arg == "-c"
                || arg.starts_with("--lcores")
                || arg.starts_with("-l") && arg.len() > 2
        });
        if !picks_lcores {
            argv_strings.push(format!(
                "-l{}",
                affinity
                    .as_ref()
                    .and_then(ThreadAffinity::first_cpu)
                    .unwrap_or(0)
            ));
        }
        argv_strings.extend(args.iter().cloned());
        // EAL may keep pointers into argv for the life of the process, so the strings are leaked (once).
        let mut argv: Vec<*mut c_char> = Vec::with_capacity(argv_strings.len() + 1);
        for arg in &argv_strings {
            let arg = CString::new(arg.as_str())
                .with_context(|| format!("EAL argument {arg:?} contains a NUL byte"))?;
            argv.push(arg.into_raw());
        }
        let argc = argv.len() as c_int;
        argv.push(std::ptr::null_mut());
        let argv = Box::leak(argv.into_boxed_slice());
        // SAFETY: argv is a NULL-terminated array of argc NUL-terminated strings that live forever, and
        // EAL has not started in this process (checked above).
        let parsed = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if let Some(affinity) = affinity {
            affinity.restore();
        }
        if parsed < 0 {
            let errno = rte_errno();
            let args = argv_strings[1..].join(" ");
            let hint = match errno {
                libc::EINVAL => format!("bad EAL arguments ({args}); the lines EAL printed above say which"),
                libc::ENOMEM => "no memory for DPDK: reserve hugepages (echo 256 > /proc/sys/vm/nr_hugepages, \
                                 and mount -t hugetlbfs nodev /dev/hugepages if it is not mounted) or run \
                                 without them (--no-huge -m 128 --no-shconf)"
                    .to_string(),
                // EAL 22.11 also says EACCES when it finds no hugepages ("Cannot get hugepage
                // information"), which Eal::init checks for first but cannot always see.
                libc::EACCES => "either permission denied: DPDK needs root (or CAP_SYS_ADMIN, CAP_IPC_LOCK, \
                                 and CAP_NET_RAW + CAP_NET_ADMIN for net_af_packet); or no hugepages, if EAL \
                                 printed \"Cannot get hugepage information\" above: reserve some (echo 256 > \
                                 /proc/sys/vm/nr_hugepages, and mount -t hugetlbfs nodev /dev/hugepages unless \
                                 --in-memory) or run without them (--no-huge -m 128 --no-shconf)"
                    .to_string(),
                libc::EALREADY => "EAL was already started in this process".to_string(),
                libc::ENOTSUP | libc::ENODEV | libc::ENOEXEC => format!(
                    "EAL could not probe its devices ({args}): check each --vdev (interface exists and is \
                     up) or the PCI device's binding (vfio-pci)"
                ),
                _ => format!("EAL arguments were: {args}"),
            };
            bail!("DPDK EAL failed to start: {} ({hint})", rte_strerror(errno));
        }
        Ok(Eal {
            inner: Arc::new(EalInner),
            vdevs: args.iter().filter(|a| a.starts_with("--vdev")).cloned().collect(),
        })
    }

    /// Ports EAL found (probed PCI devices and `--vdev`s).
    pub fn port_count(&self) -> u16 {
        // SAFETY: EAL is started.
        unsafe { sys::rte_eth_dev_count_avail() }
    }
}

/// An ethdev port, started, with its queue pairs and their packet-buffer pools. Stopped and closed, and
/// its pools freed, when this and every [`DpdkQueue`] taken from it are dropped.
pub struct Port {
    shared: Arc<PortShared>,
    queues: Vec<Option<DpdkQueue>>,
    mac: [u8; 6],
}

/// What a port and its queues share; the last one to go stops the device.
struct PortShared {
    port_id: u16,
    pools: Vec<*mut sys::rte_mempool>,
    started: bool,
    _eal: Arc<EalInner>,
}

// SAFETY: the pool pointers are only used to free the pools when the last owner drops; ethdev control
// calls on a port may come from any thread as long as they do not overlap, and Drop runs once.
unsafe impl Send for PortShared {}
// SAFETY: nothing is mutated through a shared reference.
unsafe impl Sync for PortShared {}

impl Drop for PortShared {
    fn drop(&mut self) {
        // SAFETY: no queue of this port is polled any more (each DpdkQueue holds this Arc), so the port
        // can stop and close, and no mbuf of its pools is still held (tokens free theirs, queues free
        // their rx and tx arrays when they drop, the driver's rings are released by close).
        unsafe {
            if self.started {
                sys::rte_eth_dev_stop(self.port_id);
            }
            sys::rte_eth_dev_close(self.port_id);
            for &pool in &self.pools {
                sys::rte_mempool_free(pool);
            }
        }
    }
}

/// A port's counters (`rte_eth_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received.
    pub ipackets: u64,
    /// Frames sent.
    pub opackets: u64,
    /// Bytes received.
    pub ibytes: u64,
    /// Bytes sent.
    pub obytes: u64,
    /// Frames the hardware dropped because no rx descriptor was free (rx rings full: not polled fast
    /// enough).
    pub imissed: u64,
    /// Erroneous frames received.
    pub ierrors: u64,
    /// Frames that failed to send.
    pub oerrors: u64,
    /// Receive failures because the pool had no mbuf.
    pub rx_nombuf: u64,
}

impl Port {
    /// Opens the first available port (or `port_id`) with `queues` rx/tx queue pairs, a mempool per
    /// queue, started, promiscuous mode off, and with `mac` as its MAC address if given (set before
    /// start; a driver that cannot change it fails the open, saying so).
    ///
    /// Of DPDK 22.11's virtual devices, measured here: net_af_packet changes the MAC of its kernel
    /// interface (SIOCSIFHWADDR, on an interface that is up: the interface keeps the new MAC after
    /// tandemd exits), net_tap that of its tap device, net_null accepts any; net_af_xdp cannot (ENOTSUP):
    /// give its interface the MAC beforehand (`ip link set dev <interface> address <mac>`).
    ///
    /// With more than one queue, receive-side scaling hashes IP addresses and TCP/UDP ports where the
    /// device supports it. net_af_packet spreads flows over all of its `qpairs` by itself, so it must be
    /// opened with exactly `qpairs` queues (else flows land on rings nobody polls).
    ///
    /// One smoltcp interface per queue means one ARP cache per queue, and smoltcp 0.14 learns
    /// neighbours only from ARP: measured with net_af_packet qpairs=2 and 20 clients, the ARP reply to
    /// one queue's request was hashed to the other queue, so the first queue never sent its SYN-ACKs
    /// and its 10 connections timed out (the other queue's 10 were served). A multi-queue runtime must
    /// give every queue's interface the ARP frames any queue receives.
    pub fn open(eal: &Eal, port_id: Option<u16>, queues: u16, mac: Option<[u8; 6]>) -> anyhow::Result<Port> {
        if queues == 0 {
            bail!("a DPDK port needs at least one queue pair");
        }
        let port_id = match port_id {
            Some(port_id) => {
                // SAFETY: EAL is started; any u16 is a valid argument.
                if unsafe { sys::rte_eth_dev_is_valid_port(port_id) } == 0 {
                    bail!(
                        "DPDK port {port_id} does not exist (EAL found {} port(s))",
                        eal.port_count()
                    );
                }
                port_id
            }
            None => {
                // SAFETY: EAL is started.
                let first = unsafe { sys::rte_eth_find_next(0) };
                if u32::from(first) >= sys::RTE_MAX_ETHPORTS && !eal.vdevs.is_empty() {
                    bail!(
                        "DPDK found no port: {} made none (EAL's lines above say why; for net_af_packet and \
                         net_af_xdp, the interface must exist in this network namespace and be up)",
                        eal.vdevs.join(" ")
                    );
                }
                if u32::from(first) >= sys::RTE_MAX_ETHPORTS {
                    bail!(
                        "DPDK found no port: give EAL a virtual device (--vdev=net_af_packet0,iface=<interface>) \
                         or bind a NIC to vfio-pci (dpdk-devbind.py --bind=vfio-pci <pci address>)"
                    );
                }
                first
            }
        };
        let name = port_name(port_id);

        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: the port is valid and info is a properly sized rte_eth_dev_info.
        check(
            unsafe { sys::rte_eth_dev_info_get(port_id, &mut info) },
            || format!("device info of {name}"),
        )?;
        // SAFETY: driver_name is a static NUL-terminated string owned by the driver.
        let driver = unsafe { CStr::from_ptr(info.driver_name) }
            .to_string_lossy()
            .into_owned();
        if queues > info.max_rx_queues || queues > info.max_tx_queues {
            bail!(
                "DPDK {name} ({driver}) has {} rx and {} tx queues, {queues} asked for{}",
                info.max_rx_queues,
                info.max_tx_queues,
                if driver == "net_af_packet" {
                    " (net_af_packet: add qpairs=N to its --vdev)"
                } else {
                    ""
                }
            );
        }
        if driver == "net_af_packet" && queues != info.max_rx_queues {
            bail!(
                "DPDK {name} (net_af_packet) spreads flows over all of its {} qpairs; open it with that \
                 many queues or set qpairs={queues} in its --vdev",
                info.max_rx_queues
            );
        }

        let mut conf = sys::rte_eth_conf::default();
        // SAFETY: reading a function-like macro's value through the shim.
        let rss_wanted =
            unsafe { sys::tandem_rte_eth_rss_ip_tcp_udp() } & info.flow_type_rss_offloads;
        if queues > 1 && rss_wanted != 0 {
            conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = rss_wanted;
        }
        // SAFETY: the port is valid, stopped (never started) and conf outlives the call.
        check(
            unsafe { sys::rte_eth_dev_configure(port_id, queues, queues, &conf) },
            || format!("configuring {name} with {queues} queue pair(s)"),
        )?;

        let mut shared = PortShared {
            port_id,
            pools: Vec::new(),
            started: false,
            _eal: eal.inner.clone(),
        };
        let (mut rx_descriptors, mut tx_descriptors) = (RING_DESCRIPTORS, RING_DESCRIPTORS);
        // SAFETY: the port is configured; the pointers are to live u16s.
        check(
            unsafe {
                sys::rte_eth_dev_adjust_nb_rx_tx_desc(
                    port_id,
                    &mut rx_descriptors,
                    &mut tx_descriptors,
                )
            },
            || format!("ring sizes of {name}"),
        )?;
        // SAFETY: the port is valid. SOCKET_ID_ANY (-1) when the device has no NUMA node.
        let socket = unsafe { sys::rte_eth_dev_socket_id(port_id) };
        let socket_for_pool = if socket < 0 { -1 } else { socket };
        // SAFETY: a compile-time constant.
        let mbuf_size = unsafe { sys::tandem_rte_mbuf_default_buf_size() };
        for queue in 0..queues {
            let pool_name = CString::new(format!("tandem_p{port_id}_q{queue}")).expect("no NUL");
            // SAFETY: EAL is started; the name is NUL-terminated and unique in the process.
            let pool = unsafe {
                sys::rte_pktmbuf_pool_create(
                    pool_name.as_ptr(),
                    POOL_MBUFS,
                    POOL_CACHE,
                    0,
                    mbuf_size,
                    socket_for_pool,
                )
            };
            if pool.is_null() {
                let errno = rte_errno();
                bail!(
                    "no memory for the packet buffers of {name} queue {queue} ({POOL_MBUFS} mbufs of {mbuf_size} \
                     bytes): {}; reserve more hugepages or raise -m",
                    rte_strerror(errno)
                );
            }
            shared.pools.push(pool);
            // SAFETY: the port is configured with `queues` rx queues; default rxconf (NULL); the pool lives
            // as long as the port (freed by PortShared's drop after close).
            check(
                unsafe {
                    sys::rte_eth_rx_queue_setup(
                        port_id,
                        queue,
                        rx_descriptors,
                        socket_for_pool as u32,
                        std::ptr::null(),
                        pool,
                    )
                },
                || format!("rx queue {queue} of {name}"),
            )?;
            // SAFETY: as above for tx, default txconf.
            check(
                unsafe {
                    sys::rte_eth_tx_queue_setup(
                        port_id,
                        queue,
                        tx_descriptors,
                        socket_for_pool as u32,
                        std::ptr::null(),
                    )
                },
                || format!("tx queue {queue} of {name}"),
            )?;
        }
        if let Some(wanted) = mac {
            set_mac(port_id, &name, &driver, wanted)?;
        }
        // SAFETY: the port is configured and all its queues are set up.
        check(unsafe { sys::rte_eth_dev_start(port_id) }, || {
            format!("starting {name}")
        })?;
        shared.started = true;
        // SAFETY: the port is started. Some drivers cannot turn promiscuous mode off (-ENOTSUP); a
        // smoltcp interface drops frames for other MACs anyway, so that is not an error.
        unsafe { sys::rte_eth_promiscuous_disable(port_id) };

        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: the port is valid and mac is a live rte_ether_addr.
        check(
            unsafe { sys::rte_eth_macaddr_get(port_id, &mut mac) },
            || format!("MAC address of {name}"),
        )?;

        let shared = Arc::new(shared);
        let queues = (0..queues)
            .map(|queue| {
                Some(DpdkQueue {
                    port_id,
                    queue_id: queue,
                    rx: RxBurst {
                        mbufs: [std::ptr::null_mut(); BURST],
                        next: 0,
                        len: 0,
                    },
                    tx: TxBatch {
                        pool: shared.pools[usize::from(queue)],
                        mbufs: [std::ptr::null_mut(); BURST],
                        len: 0,
                        counters: QueueCounters::default(),
                        scratch: Box::new([0; MAX_FRAME]),
                    },
                    rx_counters: QueueCounters::default(),
                    _port: shared.clone(),
                })
            })
            .collect();
        Ok(Port {
            shared,
            queues,
            mac: mac.addr_bytes,
        })
    }

    /// The port's MAC address (smoltcp's `HardwareAddress::Ethernet`).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The number of queue pairs the port was opened with.
    pub fn queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Takes queue pair `q` (each taken once) to be driven by one thread.
    pub fn take_queue(&mut self, q: u16) -> Option<DpdkQueue> {
        self.queues.get_mut(usize::from(q))?.take()
    }

    /// The port's counters since it started.
    pub fn stats(&self) -> PortStats {
        let mut stats = sys::rte_eth_stats::default();
        // SAFETY: the port is valid while self.shared lives; stats is a live rte_eth_stats.
        if unsafe { sys::rte_eth_stats_get(self.shared.port_id, &mut stats) } != 0 {
            return PortStats::default();
        }
        PortStats {
            ipackets: stats.ipackets,
            opackets: stats.opackets,
            ibytes: stats.ibytes,
            obytes: stats.obytes,
            imissed: stats.imissed,
            ierrors: stats.ierrors,
            oerrors: stats.oerrors,
            rx_nombuf: stats.rx_nombuf,
        }
    }
}

/// What one queue pair did, counted by its own thread (no atomics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Frames handed to smoltcp.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Received frames dropped before smoltcp: chained (multi-segment) mbufs or frames beyond
    /// [`MAX_FRAME`] (a veth peer with TSO/GSO on hands AF_PACKET whole 64 KiB TCP segments).
    pub rx_dropped: u64,
    /// Frames the NIC took in `tx_burst`.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames the NIC would not take (tx ring full), freed.
    pub tx_dropped: u64,
    /// Frames smoltcp wrote that could not be sent because the pool had no mbuf (or the frame was
    /// larger than an mbuf).
    pub tx_nombuf: u64,
    /// `tx_burst` calls.
    pub tx_bursts: u64,
}

/// One rx/tx queue pair of a [`Port`] as a smoltcp device. Send (move it to the thread that drives it),
/// not Sync: one thread polls it.
pub struct DpdkQueue {
    port_id: u16,
    queue_id: u16,
    rx: RxBurst,
    tx: TxBatch,
    rx_counters: QueueCounters,
    _port: Arc<PortShared>,
}

// SAFETY: the mbuf pointers in the rx and tx arrays are owned by this queue alone; DPDK allows a queue
// to be polled from any thread as long as one thread at a time does it (&mut self), and the pool is
// multi-producer/multi-consumer (ring_mp_mc, rte_pktmbuf_pool_create's default).
unsafe impl Send for DpdkQueue {}

/// Frames of the last `rx_burst` not yet handed out: `mbufs[next..len]` are owned here.
struct RxBurst {
    mbufs: [*mut sys::rte_mbuf; BURST],
    next: usize,
    len: usize,
}

/// Frames written this round, waiting for [`DpdkQueue::flush`]: `mbufs[..len]` are owned here.
struct TxBatch {
    pool: *mut sys::rte_mempool,
    mbufs: [*mut sys::rte_mbuf; BURST],
    len: usize,
    counters: QueueCounters,
    /// Where smoltcp writes a frame that has no mbuf (pool empty), so it can be counted and dropped.
    scratch: Box<[u8; MAX_FRAME]>,
}

impl DpdkQueue {
    /// The queue pair's number on its port.
    pub fn queue_id(&self) -> u16 {
        self.queue_id
    }

    /// Call once on the thread that will drive this queue: gives the thread an EAL lcore id
    /// (`rte_thread_register`) so the mempool's per-lcore cache serves its allocations and frees
    /// instead of the shared ring. The id is released when the thread exits. A thread that already has
    /// one (EAL's main thread, or one registered before) keeps it.
    pub fn register_thread(&self) -> anyhow::Result<()> {
        REGISTRATION.with(|registration| {
            // SAFETY: reads the thread's lcore id (a thread-local).
            if unsafe { sys::tandem_rte_lcore_id() } != sys::LCORE_ID_ANY {
                return Ok(());
            }
            // SAFETY: EAL is started (self holds the port, which holds the EAL).
            if unsafe { sys::rte_thread_register() } != 0 {
                let errno = rte_errno();
                return Err(anyhow!(
                    "registering thread {:?} with DPDK EAL failed: {}{}",
                    std::thread::current().name().unwrap_or("unnamed"),
                    rte_strerror(errno),
                    match errno {
                        libc::EINVAL => " (EAL must run without multi-process support: --in-memory or --no-shconf)",
                        libc::ENOMEM => " (all RTE_MAX_LCORE lcore ids are taken)",
                        _ => "",
                    }
                ));
            }
            *registration.borrow_mut() = Some(ThreadRegistration { _eal: self._port._eal.clone() });
            Ok(())
        })
    }

    /// Sends the tx frames queued by TxTokens this round in one burst; frees what the NIC would not take
    /// (counted in [`QueueCounters::tx_dropped`]).
    pub fn flush(&mut self) {
        self.tx.flush(self.port_id, self.queue_id);
    }

    /// What this queue pair did since its port was opened.
    pub fn counters(&self) -> QueueCounters {
        QueueCounters {
            rx_frames: self.rx_counters.rx_frames,
            rx_bytes: self.rx_counters.rx_bytes,
            rx_dropped: self.rx_counters.rx_dropped,
            ..self.tx.counters
        }
    }

    /// Mbufs of this queue's pool that are out of it: held by the driver, by rx tokens, or queued for
    /// tx. Zero on a quiet af_packet queue once its tokens are gone (a leak shows here).
    pub fn mbufs_in_use(&self) -> u32 {
        // SAFETY: the pool lives as long as the port, which this queue keeps alive.
        unsafe { sys::rte_mempool_in_use_count(self.tx.pool) }
    }

    /// The next received frame, after an `rx_burst` if the last burst is used up.
    fn next_rx(&mut self) -> Option<*mut sys::rte_mbuf> {
        loop {
            if self.rx.next == self.rx.len {
                // SAFETY: the port is started and this queue is polled by this thread only (&mut self);
                // the array has room for BURST pointers.
                let received = unsafe {
                    sys::tandem_rte_eth_rx_burst(
                        self.port_id,
                        self.queue_id,
                        self.rx.mbufs.as_mut_ptr(),
                        BURST as u16,
                    )
                };
                self.rx.next = 0;
                self.rx.len = usize::from(received);
                if received == 0 {
                    return None;
                }
            }
            let mbuf = self.rx.mbufs[self.rx.next];
            self.rx.next += 1;
            // SAFETY: mbuf came from rx_burst and is owned by this queue until freed or handed out.
            let (segments, len) = unsafe {
                (
                    sys::tandem_rte_pktmbuf_nb_segs(mbuf),
                    sys::tandem_rte_pktmbuf_data_len(mbuf),
                )
            };
            if segments != 1 || usize::from(len) > MAX_FRAME {
                self.rx_counters.rx_dropped += 1;
                // SAFETY: owned here, not referenced again.
                unsafe { sys::tandem_rte_pktmbuf_free(mbuf) };
                continue;
            }
            self.rx_counters.rx_frames += 1;
            self.rx_counters.rx_bytes += u64::from(len);
            return Some(mbuf);
        }
    }
}

impl Drop for DpdkQueue {
    fn drop(&mut self) {
        let pending = &mut self.rx.mbufs[self.rx.next..self.rx.len];
        // SAFETY: the rx mbufs not handed out and the unsent tx mbufs are owned by this queue.
        unsafe {
            sys::tandem_rte_pktmbuf_free_bulk(pending.as_mut_ptr(), pending.len() as u32);
            sys::tandem_rte_pktmbuf_free_bulk(self.tx.mbufs.as_mut_ptr(), self.tx.len as u32);
        }
        self.rx.len = 0;
        self.tx.len = 0;
    }
}

impl TxBatch {
    fn flush(&mut self, port_id: u16, queue_id: u16) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the port is started, this queue is sent on by this thread only, and mbufs[..len] are
        // owned here; the driver takes ownership of the first `sent`.
        let sent = usize::from(unsafe {
            sys::tandem_rte_eth_tx_burst(
                port_id,
                queue_id,
                self.mbufs.as_mut_ptr(),
                self.len as u16,
            )
        });
        self.counters.tx_bursts += 1;
        self.counters.tx_frames += sent as u64;
        let unsent = &mut self.mbufs[sent..self.len];
        if !unsent.is_empty() {
            self.counters.tx_dropped += unsent.len() as u64;
            // SAFETY: the driver did not take these; they are still owned here.
            unsafe { sys::tandem_rte_pktmbuf_free_bulk(unsent.as_mut_ptr(), unsent.len() as u32) };
        }
        self.len = 0;
    }
}

impl phy::Device for DpdkQueue {
    type RxToken<'a> = DpdkRxToken<'a>;
    type TxToken<'a> = DpdkTxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(DpdkRxToken<'_>, DpdkTxToken<'_>)> {
        let mbuf = self.next_rx()?;
        let (port_id, queue_id) = (self.port_id, self.queue_id);
        Some((
            DpdkRxToken {
                mbuf,
                _queue: PhantomData,
            },
            DpdkTxToken {
                batch: &mut self.tx,
                port_id,
                queue_id,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<DpdkTxToken<'_>> {
        Some(DpdkTxToken {
            batch: &mut self.tx,
            port_id: self.port_id,
            queue_id: self.queue_id,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Both;
        checksum.icmpv4 = Checksum::Both;
        // A veth peer leaves TCP/UDP checksums partial (computed by nobody) in frames read through
        // AF_PACKET: compute ours, accept theirs.
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = MAX_FRAME;
        capabilities.max_burst_size = None;
        capabilities.checksum = checksum;
        capabilities
    }
}

/// One received frame; its mbuf goes back to the pool when the token is consumed or dropped.
pub struct DpdkRxToken<'a> {
    mbuf: *mut sys::rte_mbuf,
    _queue: PhantomData<&'a ()>,
}

impl phy::RxToken for DpdkRxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the mbuf is a single-segment frame owned by this token (checked in next_rx); its data
        // stays valid until the token drops, after `f` returns.
        let frame = unsafe {
            let data = sys::tandem_rte_pktmbuf_mtod(self.mbuf) as *const u8;
            std::slice::from_raw_parts(
                data,
                usize::from(sys::tandem_rte_pktmbuf_data_len(self.mbuf)),
            )
        };
        f(frame)
    }
}

impl Drop for DpdkRxToken<'_> {
    fn drop(&mut self) {
        // SAFETY: the token owns its mbuf and nothing refers to it after this.
        unsafe { sys::tandem_rte_pktmbuf_free(self.mbuf) };
    }
}

/// The right to send one frame: consuming it writes the frame into a fresh mbuf and queues it for
/// [`DpdkQueue::flush`] (a full batch is sent at once).
pub struct DpdkTxToken<'a> {
    batch: &'a mut TxBatch,
    port_id: u16,
    queue_id: u16,
}

impl phy::TxToken for DpdkTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.batch.len == BURST {
            self.batch.flush(self.port_id, self.queue_id);
        }
        // SAFETY: the pool lives as long as the port, which this queue keeps alive.
        let mbuf = unsafe { sys::tandem_rte_pktmbuf_alloc(self.batch.pool) };
        let data = match u16::try_from(len) {
            // SAFETY: a fresh mbuf of our pool, owned here; append returns NULL if len exceeds its room.
            Ok(len16) if !mbuf.is_null() => unsafe { sys::tandem_rte_pktmbuf_append(mbuf, len16) },
            _ => std::ptr::null_mut(),
        };
        if data.is_null() {
            // No mbuf (or no room): let smoltcp write into the scratch frame, count it, send nothing.
            self.batch.counters.tx_nombuf += 1;
            if !mbuf.is_null() {
                // SAFETY: owned here, never queued.
                unsafe { sys::tandem_rte_pktmbuf_free(mbuf) };
            }
            let mut oversized;
            let scratch: &mut [u8] = if len <= MAX_FRAME {
                &mut self.batch.scratch[..len]
            } else {
                oversized = vec![0; len];
                &mut oversized
            };
            return f(scratch);
        }
        // SAFETY: append made len bytes at data part of the mbuf, which is owned here until queued.
        let frame = unsafe { std::slice::from_raw_parts_mut(data as *mut u8, len) };
        let result = f(frame);
        self.batch.mbufs[self.batch.len] = mbuf;
        self.batch.len += 1;
        self.batch.counters.tx_bytes += len as u64;
        result
    }
}

thread_local! {
    /// This thread's EAL lcore registration, released (`rte_thread_unregister`) when the thread exits.
    static REGISTRATION: std::cell::RefCell<Option<ThreadRegistration>> = const { std::cell::RefCell::new(None) };
}

struct ThreadRegistration {
    /// EAL stays up until every registered thread has unregistered.
    _eal: Arc<EalInner>,
}

impl Drop for ThreadRegistration {
    fn drop(&mut self) {
        // SAFETY: this thread registered itself and EAL is still up (self holds it).
        unsafe { sys::rte_thread_unregister() };
    }
}

/// The calling thread's CPU affinity, to put back after EAL pinned the thread.
struct ThreadAffinity(libc::cpu_set_t);

impl ThreadAffinity {
    fn current() -> Option<ThreadAffinity> {
        // SAFETY: an all-zero cpu_set_t is valid; the call writes at most size_of::<cpu_set_t>() bytes.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
                .then_some(ThreadAffinity(set))
        }
    }

    fn first_cpu(&self) -> Option<usize> {
        // SAFETY: CPU_ISSET reads the set within its size.
        (0..libc::CPU_SETSIZE as usize).find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &self.0) })
    }

    fn restore(&self) {
        // SAFETY: the set was read by sched_getaffinity for this thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// The calling thread's `rte_errno`.
fn rte_errno() -> c_int {
    // SAFETY: reads a thread-local.
    unsafe { sys::tandem_rte_errno() }
}

fn rte_strerror(errno: c_int) -> String {
    // SAFETY: rte_strerror returns a NUL-terminated string valid until the next call on this thread.
    unsafe { CStr::from_ptr(sys::rte_strerror(errno)) }
        .to_string_lossy()
        .into_owned()
}

/// Turns a DPDK return value (0 or more: fine; negative: -errno) into an error naming what failed.
fn check(ret: c_int, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    if ret < 0 {
        bail!("DPDK: {} failed: {}", what(), rte_strerror(-ret));
    }
    Ok(())
}

/// Makes `wanted` the port's MAC address (its default one, as `rte_eth_macaddr_get` reports it).
fn set_mac(port_id: u16, name: &str, driver: &str, wanted: [u8; 6]) -> anyhow::Result<()> {
    let mut own = sys::rte_ether_addr::default();
    // SAFETY: the port is valid and own is a live rte_ether_addr.
    check(unsafe { sys::rte_eth_macaddr_get(port_id, &mut own) }, || format!("MAC address of {name}"))?;
    if own.addr_bytes == wanted {
        return Ok(());
    }
    let mut addr = sys::rte_ether_addr { addr_bytes: wanted };
    // SAFETY: the port is valid and configured; addr is a live rte_ether_addr the call only reads.
    let ret = unsafe { sys::rte_eth_dev_default_mac_addr_set(port_id, &mut addr) };
    if ret < 0 {
        let why = match (ret == -libc::ENOTSUP, driver) {
            (true, "net_af_xdp") => " (the driver cannot change its MAC address; give its interface that MAC before \
                                    tandemd starts: ip link set dev <interface> address <mac>)",
            (true, _) => " (the driver cannot change its MAC address)",
            (false, _) => "",
        };
        bail!(
            "net.dpdk.mac: DPDK {name} ({driver}) refused the MAC address {}: {}{why}; leave net.dpdk.mac \
             unset to use the port's own, {}",
            crate::net::format_mac(wanted),
            rte_strerror(-ret),
            crate::net::format_mac(own.addr_bytes),
        );
    }
    Ok(())
}

/// "port N (device name)" for messages.
fn port_name(port_id: u16) -> String {
    let mut name = [0 as c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
    // SAFETY: the buffer holds RTE_ETH_NAME_MAX_LEN bytes, the most the call writes.
    if unsafe { sys::rte_eth_dev_get_name_by_port(port_id, name.as_mut_ptr()) } == 0 {
        // SAFETY: the call wrote a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) };
        format!("port {port_id} ({})", name.to_string_lossy())
    } else {
        format!("port {port_id}")
    }
}

impl crate::net::stack::Phy for DpdkQueue {
    fn flush(&mut self) {
        DpdkQueue::flush(self);
    }

    fn counters(&self, out: &mut Vec<(&'static str, u64)>) {
        let c = DpdkQueue::counters(self);
        out.extend([
            ("rx_frames", c.rx_frames),
            ("rx_bytes", c.rx_bytes),
            ("rx_oversize_dropped", c.rx_dropped),
            ("tx_frames", c.tx_frames),
            ("tx_bytes", c.tx_bytes),
            ("tx_ring_full_dropped", c.tx_dropped),
            ("tx_nombuf", c.tx_nombuf),
        ]);
    }
}
