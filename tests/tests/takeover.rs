//! Service-address takeover in kernel mode (`dataplane::net::takeover`), on real interfaces: two
//! network namespaces joined by a veth pair. The node under test runs in namespace A (a thread that
//! entered it with setns); namespace B plays a client whose neighbour cache must follow the address.
//!
//! The fixture is built with the `ip` command (iproute2); the product code itself only uses netlink
//! and a packet socket. Making namespaces needs root (CI runs as root); elsewhere each test prints
//! why it is skipped, on the terminal, and returns (under `CI=true` it fails: `dataplane::test_support`).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dataplane::net::takeover::{self, Claimed, Released};
use dataplane::test_support::{is_root, runs_here};

/// A MAC no interface here has: what B wrongly believes owns the service address.
const WRONG_MAC: &str = "02:00:00:00:00:01";

/// The service address the tests move around, in the pair's subnet.
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);

/// A fresh [`Pair`] for `test`, or `None` (after saying why the test is skipped, past the test
/// harness's output capture so that the skip is never silent) when this process cannot make one; under
/// `CI=true` that is a failure instead.
fn pair_for(test: &str) -> Option<Pair> {
    if !runs_here(is_root(), test, "needs root to create network namespaces (CI runs as root)") {
        return None;
    }
    Some(Pair::new())
}

/// Runs `ip` with the words of `command_line` and returns its stdout; panics with its stderr on
/// failure. (No word here contains a space: names are made by this file.)
fn ip(command_line: &str) -> String {
    let output = Command::new("ip").args(command_line.split_whitespace()).output().expect("run ip (iproute2)");
    assert!(output.status.success(), "ip {command_line} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Two namespaces, `a` and `b`, joined by a veth pair (`veth_a` in a, `veth_b` in b), addressed in
/// `10.77.0.0/24` (a is .1, b is .2) and up. Both namespaces, and with them the veth pair, are
/// deleted on drop, also when a test fails.
struct Pair {
    a: String,
    b: String,
    veth_a: String,
    veth_b: String,
}

impl Pair {
    fn new() -> Pair {
        static FIXTURES: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("{}x{}", std::process::id(), FIXTURES.fetch_add(1, Ordering::Relaxed));
        let pair = Pair {
            a: format!("tandem-tk-{tag}-a"),
            b: format!("tandem-tk-{tag}-b"),
            // Interface names are at most 15 bytes: "tka" + pid (up to 7 digits) + "x" + counter.
            veth_a: format!("tka{tag}"),
            veth_b: format!("tkb{tag}"),
        };
        // The guard exists before anything is created, so a half-built fixture is torn down too.
        let (a, b, veth_a, veth_b) = (&pair.a, &pair.b, &pair.veth_a, &pair.veth_b);
        ip(&format!("netns add {a}"));
        ip(&format!("netns add {b}"));
        ip(&format!("link add {veth_a} netns {a} type veth peer name {veth_b} netns {b}"));
        for (ns, veth, address) in [(a, veth_a, "10.77.0.1/24"), (b, veth_b, "10.77.0.2/24")] {
            ip(&format!("-n {ns} address add {address} dev {veth}"));
            ip(&format!("-n {ns} link set {veth} up"));
            ip(&format!("-n {ns} link set lo up"));
        }
        pair
    }

    /// Runs `f` on a thread inside namespace A: every socket it opens, and every interface name it
    /// resolves, is A's.
    fn in_a<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let handle = File::open(format!("/run/netns/{}", self.a)).expect("open namespace A");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid namespace fd changes only this thread's network
                    // namespace; the thread ends with the scope and runs nothing else.
                    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns into {}: {}", self.a, std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the thread in namespace A panicked")
        })
    }

    /// The IPv4 addresses on A's veth, as `ip -o` prints them (`10.77.0.1/24`, ...).
    fn addresses_of_a(&self) -> Vec<String> {
        ip(&format!("-n {} -o -4 address show dev {}", self.a, self.veth_a))
            .lines()
            .filter_map(|line| line.split_whitespace().skip_while(|word| *word != "inet").nth(1).map(str::to_string))
            .collect()
    }

    /// A's veth MAC, as `ip` prints it.
    fn mac_of_a(&self) -> String {
        let link = ip(&format!("-n {} -o link show dev {}", self.a, self.veth_a));
        let mut words = link.split_whitespace().skip_while(|word| *word != "link/ether");
        words.nth(1).unwrap_or_else(|| panic!("no link/ether in {link:?}")).to_string()
    }

    /// B's neighbour entry for `address` on its veth ("" when it has none).
    fn neighbour_in_b(&self, address: Ipv4Addr) -> String {
        ip(&format!("-n {} neigh show {address} dev {}", self.b, self.veth_b)).trim().to_string()
    }
}

/// Removes CAP_NET_ADMIN and CAP_NET_RAW from the calling thread's effective capabilities (Linux
/// capabilities are per thread), as a tandemd started without them would run.
fn drop_network_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version 3 header writes two Data structs, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !((1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW));
    // SAFETY: capset with a version 3 header reads two Data structs from `data`; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

#[test]
fn claim_adds_the_address_once_and_release_removes_it() {
    let Some(pair) = pair_for("claim_adds_the_address_once_and_release_removes_it") else { return };
    let veth = pair.veth_a.as_str();

    assert_eq!(pair.in_a(|| takeover::claim(veth, SERVICE, 24)).unwrap(), Claimed::Added);
    assert!(pair.addresses_of_a().contains(&"10.77.0.100/24".to_string()), "{:?}", pair.addresses_of_a());

    assert_eq!(pair.in_a(|| takeover::claim(veth, SERVICE, 24)).unwrap(), Claimed::AlreadyHeld);
    let held = pair.addresses_of_a().iter().filter(|a| a.starts_with("10.77.0.100/")).count();
    assert_eq!(held, 1, "a second claim adds nothing: {:?}", pair.addresses_of_a());

    assert_eq!(pair.in_a(|| takeover::release(veth, SERVICE, 24)).unwrap(), Released::Removed);
    assert_eq!(pair.addresses_of_a(), ["10.77.0.1/24"], "only the node's own address is left");
    assert_eq!(pair.in_a(|| takeover::release(veth, SERVICE, 24)).unwrap(), Released::WasAbsent);

    // The names are A's: B's interface does not exist in A, and the error says which one.
    let veth_b = pair.veth_b.as_str();
    let missing = pair.in_a(|| takeover::claim(veth_b, SERVICE, 24)).unwrap_err();
    assert!(missing.to_string().contains(veth_b), "{missing}");
}

#[test]
fn announce_moves_a_neighbours_cache_entry_to_the_new_owner() {
    let Some(pair) = pair_for("announce_moves_a_neighbours_cache_entry_to_the_new_owner") else { return };
    let veth = pair.veth_a.as_str();
    let mac_a = pair.mac_of_a();
    assert_eq!(pair.in_a(|| takeover::interface_mac(veth)).unwrap().to_string(), mac_a);

    assert_eq!(pair.in_a(|| takeover::claim(veth, SERVICE, 24)).unwrap(), Claimed::Added);
    // B still believes the service address lives at the old (dead) owner's MAC.
    ip(&format!("-n {} neigh replace {SERVICE} lladdr {WRONG_MAC} dev {} nud stale", pair.b, pair.veth_b));
    let before = pair.neighbour_in_b(SERVICE);
    assert!(before.contains(WRONG_MAC), "fixture: B's entry should name the old MAC: {before:?}");

    let started = Instant::now();
    let sent = pair.in_a(|| takeover::announce(veth, SERVICE, 3, Duration::from_millis(20))).unwrap();
    assert_eq!(sent, 3);
    let call = started.elapsed();
    assert!(call < Duration::from_secs(1), "3 frames 20 ms apart took {call:?}");

    let deadline = started + Duration::from_secs(2);
    loop {
        let entry = pair.neighbour_in_b(SERVICE);
        if entry.contains(&mac_a) {
            println!("B's entry moved to A's MAC {:?} after the announcement started: {entry}", started.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "after 2 s B's entry for {SERVICE} still is {entry:?}, not A's MAC {mac_a}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn without_the_capabilities_the_errors_name_them() {
    let Some(pair) = pair_for("without_the_capabilities_the_errors_name_them") else { return };
    let veth = pair.veth_a.as_str();
    let (claimed, announced) = pair.in_a(|| {
        drop_network_capabilities();
        (takeover::claim(veth, SERVICE, 24), takeover::announce(veth, SERVICE, 1, Duration::ZERO))
    });
    let claimed = claimed.unwrap_err().to_string();
    assert_eq!(claimed, format!("adding 10.77.0.100/24 on {veth}: not permitted (needs CAP_NET_ADMIN)"));
    let announced = announced.unwrap_err().to_string();
    assert_eq!(announced, format!("opening a packet socket on {veth}: not permitted (needs CAP_NET_RAW)"));
    assert_eq!(pair.addresses_of_a(), ["10.77.0.1/24"]);
}
