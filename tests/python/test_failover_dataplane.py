"""Failover with both nodes in dataplane mode: clients reach each node's userspace stack (smoltcp on DPDK's
net_af_packet), and the service address moves between the stacks, announced with gratuitous ARPs sent
through DPDK. The replication link and the witness check stay on the nodes' kernel addresses.

The topology is test_failover's (client, active and standby namespaces on one bridge; the bridge address
is the witness). In each node's namespace the kernel keeps its address on eth0 for replication, and
tandemd's stack drives the same eth0 through net_af_packet with an address of its own (.11 or .12) plus,
on the active, the service address. Root and the DPDK-enabled tandemd are needed (see test_userspace.py).
"""

import os
import subprocess
import sys
import time

import pytest

from harness import requires_tandem
from test_failover import SECRET, Topology, kill_under_the_client, sh, wait_until
from test_failover_faults import SplitTopology
from test_userspace import dpdk_server, hugepages_ready

pytestmark = [
    requires_tandem("failover is Tandem's own"),
    pytest.mark.usefixtures("root"),  # no root: a skip, or under CI=true a failure (conftest.py)
]


def stack_addr(topo, name):
    return f"{topo.subnet}.{11 if name == 'a' else 12}"


def node_config(tmp_path, topo, name, role, peer, threads=1):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    if hugepages_ready():
        eal = ["--no-pci", "--in-memory", "--no-telemetry", f"--file-prefix=tfd{name}{topo.tag}"]
    else:
        eal = ["--no-pci", "--no-huge", "-m", "256", "--no-shconf", "--no-telemetry"]
    # With two workers, af_packet spreads flows over two queue pairs by a header hash (test_userspace.py).
    eal.append("--vdev=net_af_packet0,iface=eth0" + (f",qpairs={threads}" if threads > 1 else ""))
    lines = [
        "[replication]",
        f'role = "{role}"',
        f'listen = "{topo.replication_addr[name]}:11311"',
        f'peers = ["{topo.replication_addr[peer]}:11311"]',
        'mode = "sync"',
        f'secret_file = "{secret}"',
        "[failover]",
        f'service_ip = "{topo.service}/24"',
        f'state_dir = "{tmp_path}/state-{name}"',
        f'witness = "{topo.witness}"',
        "[net]",
        'backend = "dpdk"',
        "[net.dpdk]",
        "eal_args = [" + ", ".join(f'"{a}"' for a in eal) + "]",
        f'address = "{stack_addr(topo, name)}/24"',
    ]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def request(topo, host, data, expect=b"\r\n", timeout=2):
    """Sends ``data`` from the client namespace to host:11211 and returns the reply bytes."""
    code = (
        "import socket,sys;s=socket.create_connection((%r,11211),timeout=%r);s.sendall(%r);d=b''\n"
        "while not d.endswith(%r):\n c=s.recv(65536)\n if not c: break\n d+=c\nsys.stdout.write(repr(d))"
        % (host, timeout, data, expect)
    )
    return eval(sh("ip", "netns", "exec", topo.ns["c"], sys.executable, "-c", code).stdout)


def stats(topo, name, group="replication"):
    reply = request(topo, stack_addr(topo, name), f"stats {group}\r\n".encode(), b"END\r\n").decode()
    return dict(line.split(" ", 2)[1:] for line in reply.splitlines() if line.startswith("STAT "))


def start(tmp_path, topo, name, config, threads=1):
    log = open(tmp_path / f"{name}.log", "wb")
    process = subprocess.Popen(
        ["ip", "netns", "exec", topo.ns[name], dpdk_server(), "-p", "11211", "-t", str(threads), "-m", "128", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    topo.processes.append(process)
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        try:
            if request(topo, stack_addr(topo, name), b"version\r\n", timeout=0.5).startswith(b"VERSION "):
                return process
        except (subprocess.CalledProcessError, SyntaxError):
            pass
        assert time.monotonic() < deadline, f"{name} does not answer on its stack address\n" + (tmp_path / f"{name}.log").read_text()
        time.sleep(0.2)


# Opens COUNT connections from the client namespace to HOST:11211 at once, a set on each; prints how many
# were stored.
MANY_SETS = """
import socket, sys
host, count = sys.argv[1], int(sys.argv[2])
conns = [socket.create_connection((host, 11211), timeout=5) for _ in range(count)]
for i, c in enumerate(conns):
    c.sendall(b"set many:%d 0 0 1\\r\\nx\\r\\n" % i)
stored = sum(c.recv(64) == b"STORED\\r\\n" for c in conns)
print(stored)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_kill_the_active_in_dataplane_mode_the_standby_stack_serves_every_acknowledged_write(tmp_path, threads):
    """With two workers the service address must be added to both stacks: flows hashed to either queue
    reach the new active."""
    dpdk_server()  # fails under CI=true without the DPDK build, skips elsewhere
    with Topology(os.getpid() % 1000 * 10 + 7) as topo:
        # Full checksums and no 64 KiB super-frames from the kernels, so the stacks accept their frames.
        for name in ("c", "a", "b"):
            sh("ip", "netns", "exec", topo.ns[name], "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off")
        a = start(tmp_path, topo, "a", node_config(tmp_path, topo, "a", "active", "b", threads), threads)
        start(tmp_path, topo, "b", node_config(tmp_path, topo, "b", "standby", "a", threads), threads)
        wait_until(lambda: stats(topo, "b").get("state") == "streaming", "the standby to stream", 30)
        assert request(topo, topo.service, b"version\r\n").startswith(b"VERSION "), "the active's stack answers on the service address"

        result = kill_under_the_client(tmp_path, topo, a)
        print(f"\ndataplane failover (kill + link down -> first acknowledged write on the service address): "
              f"{result['failover_ms']:.0f} ms, {result['acked']} acknowledged, {result['missing_count']} missing")
        assert result["failover_ms"] is not None, result
        assert result["missing_count"] == 0, f"acknowledged writes lost in sync mode: {result}"
        b_stats = stats(topo, "b")
        assert b_stats["role"] == "active" and b_stats["epoch"] == "2", b_stats
        # Workers publish their network counters once a second, from their next round (up to ~2 s late).
        deadline = time.monotonic() + 6
        while int((net := stats(topo, "b", "net")).get("garps_sent", 0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert int(net["garps_sent"]) >= 3, f"the new active announced the address through DPDK: {net}"
        if threads > 1:
            accepted = [int(net.get(f"worker_{w}_tcp_accepted", 0)) for w in (0, 1)]
            many = sh("ip", "netns", "exec", topo.ns["c"], sys.executable, "-c", MANY_SETS, topo.service, "40").stdout
            assert many.strip() == "40", f"40 connections to the service address, {many.strip()} stored"
            deadline = time.monotonic() + 6
            while True:
                net = stats(topo, "b", "net")
                grown = [int(net.get(f"worker_{w}_tcp_accepted", 0)) - accepted[w] for w in (0, 1)]
                if sum(grown) >= 40 and min(grown) > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert min(grown) > 0, f"the service address is served by both workers' stacks: {grown} new connections per worker"


def test_cutting_only_the_replication_link_in_dataplane_mode_leaves_the_active_alone(tmp_path):
    """The standby hears nothing on the replication link, its witness answers, so it asks the clients'
    link through its own stack (DPDK owns that link) who holds the service address: the active's stack
    answers, so it stays standby; writes through the service address go on being acknowledged."""
    dpdk_server()
    with SplitTopology(os.getpid() % 1000 * 10 + 8) as topo:
        for name in ("c", "a", "b"):
            sh("ip", "netns", "exec", topo.ns[name], "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off")
        start(tmp_path, topo, "a", node_config(tmp_path, topo, "a", "active", "b"))
        start(tmp_path, topo, "b", node_config(tmp_path, topo, "b", "standby", "a"))
        wait_until(lambda: stats(topo, "b").get("state") == "streaming", "the standby to stream", 30)
        assert request(topo, topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"

        sh("ip", "link", "set", topo.replication_if["a"], "down")
        cut = time.monotonic()
        acked = 0
        while time.monotonic() < cut + 4:  # several dead_after periods: each one asks again
            assert stats(topo, "b")["role"] == "standby", "the standby promoted with the active still serving"
            if request(topo, topo.service, b"set during:%d 0 0 1\r\nx\r\n" % acked, timeout=3) == b"STORED\r\n":
                acked += 1
            time.sleep(0.2)
        b_stats, a_stats = stats(topo, "b"), stats(topo, "a")
        assert a_stats["role"] == "active" and a_stats["step_downs"] == "0", a_stats
        assert b_stats["role"] == "standby" and b_stats["promotions"] == "0", b_stats
        assert "not_promoting" in b_stats["last_promotion_declined"] and "still_served" in b_stats["last_promotion_declined"], b_stats
        assert acked > 0, "no write acknowledged through the service address during the cut"
        # Workers publish their network counters once a second.
        deadline = time.monotonic() + 6
        while int((net := stats(topo, "b", "net")).get("service_probes_sent", 0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert int(net["service_probes_sent"]) >= 2, f"the standby asked through its stack: {net}"

        sh("ip", "link", "set", topo.replication_if["a"], "up")
        wait_until(lambda: stats(topo, "b").get("state") == "streaming", "the standby to stream again", 15)
        wait_until(
            lambda: request(topo, stack_addr(topo, "b"), b"get during:%d\r\n" % (acked - 1), b"END\r\n").count(b"VALUE") == 1,
            "the standby to converge",
            20,
        )
        print(f"\nreplication link cut for 4 s in dataplane mode: {acked} writes acknowledged by a, b stayed standby "
              f"(asked {net['service_probes_sent']} times through its stack)")
