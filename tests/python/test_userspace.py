"""The userspace TCP dataplane end to end: tandemd's own TCP/IP stack (smoltcp, one per worker) serving
real clients that run in another network namespace.

Two devices carry the frames:

- ``tap``: a tap device tandemd creates, moved into the client's namespace. Needs root only.
- ``dpdk-af_packet``: DPDK's af_packet PMD on a veth whose peer is in the client's namespace. Needs root
  and a tandemd built with the ``dpdk`` feature, named by ``TANDEM_DPDK_SERVER`` (tests/run-all.sh builds
  it when libdpdk is installed). CI sets ``CI=true``: there a missing DPDK build, root or memccapable fails
  instead of skipping (``harness.skip_unless``).
- ``dpdk-af_xdp``: DPDK's af_xdp PMD on the same kind of veth. A veth has no multi-queue af_xdp port:
  with N workers the veth gets N queues and tandemd one single-queue port per worker
  (``port_per_worker``), and the client namespace ``net.core.txrehash=0`` (FIELD-NOTES).

Every namespace, link and process a test creates is removed at its end, failures included.
"""

import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

import harness

PORT = 11311
TAG = os.getpid() % 10000


def sh(*args, check=True, timeout=60, **kwargs):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout, **kwargs)


def dpdk_server():
    path = os.environ.get("TANDEM_DPDK_SERVER")
    harness.skip_unless(
        path and os.path.exists(path),
        "tandemd built with the dpdk feature is not available (set TANDEM_DPDK_SERVER; tests/run-all.sh builds it when libdpdk is installed)",
    )
    return path


def needs_root():
    __tracebackhide__ = True
    harness.needs_root("the userspace dataplane: network namespaces, tap and veth devices")


class Dataplane:
    """tandemd on the userspace stack, with a client namespace on the other end of its device.

    ``backend`` is ``tap``, ``dpdk-af_packet`` or ``dpdk-af_xdp``. The client namespace holds
    ``client_ip`` on ``client_dev``; tandemd serves ``server_ip:PORT``. Used as a context manager.
    """

    count = 0

    def __init__(self, tmp_path, backend, threads=1, extra=""):
        Dataplane.count += 1
        tag = f"{TAG}{Dataplane.count}"
        self.tmp_path = tmp_path
        self.backend = backend
        self.ns = f"tdu-{tag}"
        self.link = f"tdu{tag}"  # the device tandemd drives (tap) or the host end of the veth (dpdk)
        self.client_dev = self.link if backend == "tap" else "eth0"
        subnet = f"10.{150 + Dataplane.count % 50}.{TAG % 250}"
        self.server_ip = f"{subnet}.2"
        self.client_ip = f"{subnet}.1"
        self.process = None
        self.log = tmp_path / f"tandemd-{backend}-{tag}.log"
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            self._start(threads, extra)
        except BaseException:
            self.close()
            raise

    def _start(self, threads, extra):
        if self.backend == "tap":
            binary = harness.server_binary()
            section = f'[net]\nbackend = "tap"\n[net.tap]\nname = "{self.link}"\naddress = "{self.server_ip}/24"\n'
        else:
            binary = dpdk_server()
            # The veth's peer sits in the client namespace; its TCP checksums stay partial in frames seen
            # through AF_PACKET unless offload is off (FIELD-NOTES).
            # TSO/GSO too: with them a veth hands AF_PACKET whole 64 KiB segments, which no 1514-byte
            # frame can carry. The kernel keeps off the DPDK side: no IPv6, no forwarding, no address.
            queues = ["numrxqueues", str(threads), "numtxqueues", str(threads)] if threads > 1 else []
            sh("ip", "link", "add", self.link, *queues, "type", "veth", "peer", "name", "eth0", *queues, "netns", self.ns)
            sh("sysctl", "-qw", f"net.ipv6.conf.{self.link}.disable_ipv6=1", check=False)
            sh("sysctl", "-qw", f"net.ipv4.conf.{self.link}.forwarding=0", check=False)
            sh("ip", "link", "set", self.link, "up")
            self._client_side("eth0")
            if not shutil.which("ethtool"):
                pytest.fail("ethtool is needed to turn checksum and segmentation offload off on the veth peer")
            sh("ip", "netns", "exec", self.ns, "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off")
            ports = ""
            if self.backend == "dpdk-af_xdp":
                # One single-queue port per worker, each on its own queue of the veth; the client's kernel
                # must keep a flow on its queue (a retransmitted SYN would otherwise move).
                vdevs = [f"--vdev=net_af_xdp{q},iface={self.link},start_queue={q},queue_count=1" for q in range(threads)]
                if threads > 1:
                    sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.core.txrehash=0")
                    ports = "port_per_worker = true\n"
            else:
                qpairs = f",qpairs={threads}" if threads > 1 else ""
                vdevs = [f"--vdev=net_af_packet0,iface={self.link}{qpairs}"]
            eal = ["--no-pci", "--in-memory", "--no-telemetry", f"--file-prefix=tdu{self.link}", *vdevs]
            if not hugepages_ready():
                eal = ["--no-pci", "--no-huge", "-m", "256", "--no-shconf", "--no-telemetry", *vdevs]
            args = ", ".join(f'"{a}"' for a in eal)
            section = f'[net]\nbackend = "dpdk"\n[net.dpdk]\neal_args = [{args}]\naddress = "{self.server_ip}/24"\n{ports}'
        config = self.tmp_path / f"{self.link}.toml"
        config.write_text(section + extra)
        self.process = subprocess.Popen(
            [binary, "-p", str(PORT), "-t", str(threads), "-m", "256", "-c", "20000", "--config", str(config)],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        if self.backend == "tap":
            deadline = time.monotonic() + 10
            while sh("ip", "link", "show", self.link, check=False).returncode != 0:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "tandemd did not create its tap device"
                time.sleep(0.02)
            sh("ip", "link", "set", self.link, "netns", self.ns)
            self._client_side(self.link)
        self.wait_serving()

    def _client_side(self, dev):
        sh("ip", "-n", self.ns, "addr", "add", f"{self.client_ip}/24", "dev", dev)
        sh("ip", "-n", self.ns, "link", "set", dev, "up")

    def wait_serving(self, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text()
            probe = self.run(sys.executable, "-c", PROBE, self.server_ip, str(PORT), check=False, timeout=10)
            if probe.returncode == 0:
                return
            assert time.monotonic() < deadline, f"tandemd does not answer on {self.server_ip}:{PORT}: {probe.stderr}\n{self.log.read_text()}"
            time.sleep(0.2)

    def run(self, *cmd, check=True, timeout=120):
        """Runs a command in the client namespace."""
        return sh("ip", "netns", "exec", self.ns, *cmd, check=check, timeout=timeout)

    def server_mac(self):
        """tandemd's MAC, as the client's neighbour table learned it (after any connection)."""
        neigh = self.run("ip", "neigh", "show", self.server_ip, "dev", self.client_dev).stdout
        words = neigh.split()
        assert "lladdr" in words, f"the client has no neighbour entry for {self.server_ip}: {neigh!r}"
        return words[words.index("lladdr") + 1]

    def request(self, data):
        """Sends ``data`` from the client namespace and returns the reply up to the first END/STORED line."""
        return self.run(sys.executable, "-c", REQUEST, self.server_ip, str(PORT), data.hex()).stdout

    def stats(self, group):
        reply = self.request(f"stats {group}\r\n".encode())
        return dict(line.split(" ", 2)[1:] for line in reply.splitlines() if line.startswith("STAT "))

    def stats_until(self, group, done, timeout=6):
        """`stats group` once ``done(stats)`` holds, or the last one after ``timeout`` seconds. Workers
        publish their network counters once a second, from their next poll round (up to ~2 s late)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats(group)
            if done(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in sh("ip", "netns", "pids", self.ns, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.link, check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PROBE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
s.sendall(b"version\\r\\n")
assert s.recv(100).startswith(b"VERSION "), "no VERSION reply"
"""

REQUEST = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(bytes.fromhex(sys.argv[3]))
data = b""
while not data.endswith((b"END\\r\\n", b"STORED\\r\\n", b"ERROR\\r\\n")):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"""


_hugepages_before = []


def _restore_hugepages():
    if _hugepages_before:
        try:
            pathlib.Path("/proc/sys/vm/nr_hugepages").write_text(_hugepages_before[0])
        except OSError:
            pass


def hugepages_ready():
    """Reserves 2 MiB hugepages for DPDK if the machine allows it (the old reservation is restored when
    the test run ends); False means run EAL with --no-huge."""
    nr = pathlib.Path("/proc/sys/vm/nr_hugepages")
    try:
        if int(nr.read_text()) < 256:
            if not _hugepages_before:
                _hugepages_before.append(nr.read_text())
                atexit.register(_restore_hugepages)
            nr.write_text("256\n")
        if int(nr.read_text()) < 128:
            return False
        if "hugetlbfs" not in pathlib.Path("/proc/mounts").read_text():
            os.makedirs("/dev/hugepages", exist_ok=True)
            sh("mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages")
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"hugepages unavailable ({e}); DPDK runs with --no-huge")
        return False


BACKENDS = ["tap", "dpdk-af_packet"]


@pytest.fixture(params=BACKENDS)
def dataplane(request, tmp_path):
    needs_root()
    with Dataplane(tmp_path, request.param) as dp:
        yield dp


def tandem_bench():
    path = pathlib.Path(harness.server_binary()).parent / "tandem-bench"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the workspace's binaries first")
    return str(path)


# af_xdp too for these (the others run over tap and af_packet).
ALL_BACKENDS = BACKENDS + ["dpdk-af_xdp"]


@pytest.mark.parametrize("dataplane", ALL_BACKENDS, indirect=True)
def test_memccapable_passes_over_the_userspace_stack(dataplane):
    memccapable = shutil.which("memccapable")
    harness.skip_unless(memccapable, "memccapable (libmemcached-tools) is not installed")
    run = dataplane.run(memccapable, "-h", dataplane.server_ip, "-p", str(PORT), "-t", "5", check=False)
    passed = run.stdout.count("[pass]")
    print(f"memccapable over {dataplane.backend}: {passed} passed")
    assert passed == 54, run.stdout + run.stderr
    assert "All tests passed" in run.stdout and run.returncode == 0


@pytest.mark.parametrize("dataplane", ALL_BACKENDS, indirect=True)
def test_pymemcache_integration_suite_passes_over_the_userspace_stack(dataplane):
    """pymemcache's own integration tests, every one (test_misc too: cache_memlimit, stats cachedump)."""
    run = dataplane.run(*harness.pymemcache_suite(dataplane.server_ip, PORT), check=False, timeout=300)
    harness.assert_pymemcache_suite_passed(run)


@pytest.mark.parametrize("dataplane", ALL_BACKENDS, indirect=True)
def test_the_stack_answers_ping_at_its_address(dataplane):
    """ICMP echo is answered by tandemd's own stack (no kernel owns the address): small and near-MTU
    payloads, every reply back with the same payload (ping checks it and flags duplicates)."""
    for size in ("56", "1400"):
        run = dataplane.run("ping", "-c", "5", "-i", "0.2", "-W", "2", "-s", size, dataplane.server_ip, check=False, timeout=30)
        print(run.stdout.strip().splitlines()[-2])
        assert run.returncode == 0 and " 5 received" in run.stdout, run.stdout + run.stderr
        assert "wrong data" not in run.stdout and "DUP!" not in run.stdout, run.stdout


@pytest.mark.parametrize("dataplane", ALL_BACKENDS, indirect=True)
def test_verified_set_get_over_the_userspace_stack(dataplane):
    for protocol in ("text", "meta", "binary"):
        run = dataplane.run(
            tandem_bench(), "setget", "--server", f"{dataplane.server_ip}:{PORT}", "--protocol", protocol,
            "--keys", "3000", "--value-size", "uniform:1-20000", "--seed", "7", check=False, timeout=180,
        )
        assert run.returncode == 0, run.stdout + run.stderr
    reply = dataplane.request(b"stats conns\r\n")
    assert f"tcp:{dataplane.server_ip}:{PORT}" in reply, reply
    # The readiness probe, three setget runs and the stats requests: each a connection of its own.
    net = dataplane.stats_until("net", lambda n: int(n.get("tcp_accepted", 0)) >= 5)
    assert int(net["tcp_accepted"]) >= 5, net


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lossy_link_still_gets_every_reply_right(tmp_path, backend):
    """1% of frames lost each way, by tandemd's fault injection (this kernel has no sch_netem)."""
    needs_root()
    with Dataplane(tmp_path, backend, extra="drop_percent = 1\n") as dataplane:
        run = dataplane.run(
            tandem_bench(), "setget", "--server", f"{dataplane.server_ip}:{PORT}", "--keys", "1000",
            "--value-size", "uniform:1-8000", "--seed", "11", "--json", check=False, timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        net = dataplane.stats_until("net", lambda n: int(n.get("injected_rx_drops", 0)) > 0 and int(n.get("injected_tx_drops", 0)) > 0)
        print(f"setget through 1% loss: {net}")
        assert net["backend"] == dataplane.backend.split("-")[0]
        assert int(net["injected_rx_drops"]) > 0 and int(net["injected_tx_drops"]) > 0, net


MANY = """
import resource, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 500), max(hard, count + 500)))
started = time.monotonic()
conns = []
deadline = started + 120
while len(conns) < count:
    assert time.monotonic() < deadline, f"only {len(conns)} connections in 120 s"
    conns.append(socket.create_connection((host, port), timeout=10))
opened = time.monotonic() - started
# Every connection is served: one request each, all in flight at once, each reply checked.
for i, s in enumerate(conns):
    s.sendall(b"set k%d 0 0 %d\\r\\n%d\\r\\n" % (i, len(str(i)), i))
for s in conns:
    assert s.recv(100) == b"STORED\\r\\n"
for i, s in enumerate(conns):
    s.sendall(b"get k%d\\r\\n" % i)
for i, s in enumerate(conns):
    want = b"VALUE k%d 0 %d\\r\\n%d\\r\\nEND\\r\\n" % (i, len(str(i)), i)
    got = b""
    while len(got) < len(want):
        chunk = s.recv(100)
        assert chunk, f"connection {i} closed"
        got += chunk
    assert got == want, (i, got)
served = time.monotonic() - started - opened
print(f"{count} connections opened in {opened:.1f} s, every one served (set + get) in {served:.1f} s")
for s in conns:
    s.close()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_thousand_connections_are_accepted_and_served(tmp_path, backend):
    needs_root()
    with Dataplane(tmp_path, backend) as dataplane:
        run = dataplane.run(sys.executable, "-c", MANY, dataplane.server_ip, str(PORT), "10000", check=False, timeout=400)
        print(run.stdout.strip())
        assert run.returncode == 0, run.stdout + run.stderr + dataplane.log.read_text()[-2000:]
        net = dataplane.stats_until("net", lambda n: int(n.get("tcp_accepted", 0)) >= 10000)
        assert int(net["tcp_accepted"]) >= 10000, net


@pytest.mark.parametrize("backend", ["dpdk-af_packet", "dpdk-af_xdp"])
def test_two_workers_each_serve_the_flows_of_their_own_queue(tmp_path, backend):
    """net_af_packet with qpairs=2 spreads flows by a header hash; net_af_xdp, one single-queue port per
    worker on a 2-queue veth, by the veth's queue choice. Each worker's stack serves its queue, and ARP
    (all on one queue) reaches both stacks."""
    needs_root()
    with Dataplane(tmp_path, backend, threads=2) as dataplane:
        run = dataplane.run(sys.executable, "-c", MANY, dataplane.server_ip, str(PORT), "400", check=False, timeout=300)
        print(run.stdout.strip())
        assert run.returncode == 0, run.stdout + run.stderr + dataplane.log.read_text()[-2000:]
        net = dataplane.stats_until("net", lambda n: sum(int(n.get(f"worker_{w}_tcp_accepted", 0)) for w in (0, 1)) >= 400)
        print(f"two workers: {net}")
        per_worker = [int(net[f"worker_{w}_tcp_accepted"]) for w in (0, 1)]
        assert sum(per_worker) >= 400 and min(per_worker) > 50, per_worker
        assert int(net["arp_shared_out"]) > 0 and int(net["arp_shared_in"]) > 0, net
