"""Failover between real tandemd processes in network namespaces on a bridge (needs root; CI is root).

Topology, all created per test and torn down even on failure: namespaces for a client, an active and a
standby, each with a veth into one bridge; the service address belongs to whichever node is active.
"The active dies" is what a machine failure looks like: its tandemd gets SIGKILL and its link goes down
at the same moment. The client, inside its namespace, writes through the service address in sync mode,
records every acknowledged write, and measures the time from the kill to the first acknowledged write
after it; then every acknowledged write must be readable through the service address.
"""

import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import harness
from harness import requires_tandem

pytestmark = [
    requires_tandem("failover is Tandem's own"),
    pytest.mark.usefixtures("root"),  # no root: a skip, or under CI=true a failure (conftest.py)
]

SECRET = b"tandem-failover-test-secret-0123"
RUNS = 5

CLIENT = textwrap.dedent(
    """
    import json, socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    go = sys.argv[4]

    def request(data, expect, timeout=0.05):
        s = socket.create_connection((host, port), timeout=timeout)
        try:
            s.settimeout(0.5)
            s.sendall(data)
            got = b""
            while not got.endswith(expect) and len(got) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got
        finally:
            s.close()

    acked = []
    for i in range(count):
        if request(b"set pre:%d 0 0 4\\r\\nv%03d\\r\\n" % (i, i % 1000), b"\\r\\n", timeout=1) == b"STORED\\r\\n":
            acked.append("pre:%d" % i)
    print(json.dumps({"ready": len(acked)}), flush=True)
    # Wait for the test to kill the active, then write until the service address answers again.
    while not __import__("os").path.exists(go):
        time.sleep(0.001)
    killed_at = float(open(go).read())
    first_ok = None
    attempts = 0
    deadline = time.time() + 20
    while time.time() < deadline:
        attempts += 1
        try:
            if request(b"set post 0 0 2\\r\\nok\\r\\n", b"\\r\\n") == b"STORED\\r\\n":
                first_ok = time.time()
                break
        except OSError:
            pass
        time.sleep(0.005)
    missing = []
    for key in acked:
        got = request(b"get %s\\r\\n" % key.encode(), b"END\\r\\n", timeout=1)
        if not got.startswith(b"VALUE"):
            missing.append(key)
    print(json.dumps({"failover_ms": None if first_ok is None else (first_ok - killed_at) * 1000,
                      "attempts": attempts, "acked": len(acked), "missing": missing[:20], "missing_count": len(missing)}), flush=True)
    """
)


def sh(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30, **kwargs)


class Topology:
    """Three namespaces (client, a, b) on a bridge, named uniquely; ``d`` adds a fourth (a second
    standby). Used as a context manager: the nodes it started are killed and everything is removed on
    exit, failures included."""

    def __init__(self, tag, nodes=("c", "a", "b")):
        self.tag = tag
        self.processes = []
        self.subnet = f"10.{77 + tag % 100}.{tag % 250}"
        self.bridge = f"tbr{tag}"
        self.ns = {name: f"tfo-{name}-{tag}" for name in nodes}
        self.host_if = {name: f"tfo{name}{tag}" for name in nodes}
        self.addr = {name: f"{self.subnet}.{host}" for name, host in (("a", 1), ("b", 2), ("c", 3), ("d", 4)) if name in nodes}
        self.service = f"{self.subnet}.100"
        # Memory files (-e) the nodes were given, removed on close.
        self.memory_files = []
        # Where the nodes replicate: the client network here (a topology may give it a link of its own).
        self.replication_addr = self.addr
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        # The bridge's own address is the witness (it stands for the network the clients are on).
        self.witness = f"{self.subnet}.254"
        sh("ip", "addr", "add", f"{self.witness}/24", "dev", self.bridge)
        for name, ns in self.ns.items():
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.host_if[name], "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", self.host_if[name], "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, tmp_path, name, config):
        """Starts tandemd in namespace ``name`` (see start_node); stopped by close()."""
        process = start_node(tmp_path, self, name, config)
        self.processes.append(process)
        return process

    def memory_file(self, name):
        """Node ``name``'s memory file (`[server] memory_file`), on tmpfs."""
        path = f"/dev/shm/tandem-fo-{os.getpid()}-{self.tag}-{name}"
        self.memory_files.append(path)
        return path

    def start_pair(self, tmp_path, witness=False, memory=False):
        """Node a active, node b its standby; returns once b streams. With ``memory``, both keep their
        cache in memory files, so a restarted node finds it again."""
        mem = {name: self.memory_file(name) if memory else None for name in ("a", "b")}
        a = self.start(tmp_path, "a", node_config(tmp_path, self, "a", "active", "b", witness=witness, memory_file=mem["a"]))
        b = self.start(tmp_path, "b", node_config(tmp_path, self, "b", "standby", "a", witness=witness, memory_file=mem["b"]))
        wait_until(lambda: stats_in(self, "b").get("state") == "streaming", "the standby to stream")
        return a, b

    def service_address_on(self, name):
        """Whether node ``name``'s interface holds the service address."""
        return self.service in sh("ip", "-n", self.ns[name], "-o", "-4", "addr", "show", "dev", "eth0").stdout

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        for name, ns in self.ns.items():
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "link", "del", self.host_if[name], check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        for path in self.memory_files:
            for shard in range(2):
                try:
                    os.unlink(f"{path}.{shard}")
                except FileNotFoundError:
                    pass


def node_config(tmp_path, topo, name, role, peer, mode="sync", witness=False, memory_file=None):
    """Node ``name``'s configuration; ``peer`` names its peer, or a list of them."""
    peers = ", ".join(f'"{topo.replication_addr[p]}:11311"' for p in ([peer] if isinstance(peer, str) else peer))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    server = ["[server]", f'memory_file = "{memory_file}"'] if memory_file else []
    lines = server + [
        "[replication]",
        f'role = "{role}"',
        f'listen = "{topo.replication_addr[name]}:11311"',
        f'peers = [{peers}]',
        f'mode = "{mode}"',
        f'secret_file = "{secret}"',
        "[failover]",
        f'service_ip = "{topo.service}/24"',
        'interface = "eth0"',
        f'state_dir = "{tmp_path}/state-{name}"',
    ] + ([f'witness = "{topo.witness}"'] if witness else [])
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_node(tmp_path, topo, name, config):
    log = open(tmp_path / f"{name}.log", "wb")
    process = subprocess.Popen(
        ["ip", "netns", "exec", topo.ns[name], harness.server_binary(), "-p", "11211", "-l", "0.0.0.0", "-t", "2", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = sh("ip", "netns", "exec", topo.ns[name], "ss", "-ltn", "sport = :11211", check=False).stdout
        if ":11211" in probe:
            return process
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        time.sleep(0.02)
    pytest.fail(f"{name} did not start")


def wait_until(predicate, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stats_in(topo, name, group="replication"):
    out = sh(
        "ip", "netns", "exec", topo.ns[name], sys.executable, "-c",
        "import socket;s=socket.create_connection(('127.0.0.1',11211),timeout=2);"
        f"s.sendall(b'{('stats ' + group).strip()}\\r\\n');import time;d=b''\n"
        "while not d.endswith(b'END\\r\\n'): d+=s.recv(65536)\nprint(d.decode())",
    ).stdout
    return dict(line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith("STAT "))


def in_ns(topo, name, code):
    """Runs a Python snippet inside a namespace and returns its stdout."""
    return sh("ip", "netns", "exec", topo.ns[name], sys.executable, "-c", code).stdout


def request_in(topo, name, host, data, expect=b"\r\n"):
    code = (
        "import socket,sys;s=socket.create_connection((%r,11211),timeout=2);s.sendall(%r);d=b''\n"
        "while not d.endswith(%r): d+=s.recv(65536)\nsys.stdout.write(repr(d))" % (host, data, expect)
    )
    return eval(in_ns(topo, name, code))


def rejoin_old_active(tmp_path, topo):
    """The old active's machine comes back (link up, tandemd started with its unchanged config). It never
    holds the service address meanwhile."""
    sh("ip", "link", "set", topo.host_if["a"], "up")
    topo.start(tmp_path, "a", tmp_path / "a.toml")

    def streaming_without_the_address():
        assert not topo.service_address_on("a"), "the restarted old active holds the service address"
        return stats_in(topo, "a").get("state") == "streaming"

    wait_until(streaming_without_the_address, "the old active to follow the new one", 20)
    a_stats = stats_in(topo, "a")
    assert a_stats["role"] == "standby", a_stats
    assert "started_as_standby" in a_stats["last_role_change"] or "removed_the_service_address" in a_stats["last_role_change"], a_stats
    assert not topo.service_address_on("a"), "the old active still holds the service address"
    # Clients still reach the new active through the service address, and the old one caught up.
    assert request_in(topo, "c", topo.service, b"set back 0 0 1\r\nz\r\n") == b"STORED\r\n"
    wait_until(
        lambda: request_in(topo, "c", topo.addr["a"], b"get back\r\n", b"END\r\n") == b"VALUE back 0 1\r\nz\r\nEND\r\n",
        "the old active to converge",
        20,
    )
    return a_stats


def kill_under_the_client(tmp_path, topo, a):
    """Runs CLIENT in the client namespace (300 writes through the service address), then kills node a's
    machine as a machine dies: the process killed and its link cut together. Returns the client's result."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    go = tmp_path / f"go-{topo.tag}"
    client = subprocess.Popen(
        ["ip", "netns", "exec", topo.ns["c"], sys.executable, str(script), topo.service, "11211", "300", str(go)],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = json.loads(client.stdout.readline())
    assert ready["ready"] == 300, ready
    killed_at = time.time()
    a.send_signal(signal.SIGKILL)
    sh("ip", "link", "set", topo.host_if["a"], "down")
    # Written aside and renamed into place: the client waits for the name and must never read it empty.
    staged = go.with_suffix(".staged")
    staged.write_text(repr(killed_at))
    staged.rename(go)
    result = json.loads(client.stdout.readline())
    client.wait(timeout=30)
    return result


def one_failover(tmp_path, tag, rejoin=False):
    with Topology(tag) as topo:
        # The node that comes back keeps its cache in a memory file.
        a, _ = topo.start_pair(tmp_path, witness=True, memory=rejoin)
        result = kill_under_the_client(tmp_path, topo, a)
        b_stats = stats_in(topo, "b")
        if rejoin:
            a.wait(timeout=10)
            a_stats = rejoin_old_active(tmp_path, topo)
            # Every write it took was acknowledged in sync mode, so the new active had them all when it took
            # over: the old active resumes from its restored cache.
            assert (a_stats["full_syncs"], a_stats["partial_syncs"]) == ("0", "1"), f"a partial resync: {a_stats}"
            assert stats(topo, "a")["memory_backing"] == "memory_file"
            assert request_in(topo, "c", topo.addr["a"], b"get pre:299\r\n", b"END\r\n") == b"VALUE pre:299 0 4\r\nv299\r\nEND\r\n"
        return result, b_stats


def stats(topo, name):
    return stats_in(topo, name, group="")


def test_an_old_active_with_writes_beyond_the_takeover_point_rejoins_with_a_full_sync(tmp_path):
    """The standby is frozen past the peer timeout, so the active takes writes alone (sync mode degrades);
    then the active dies and the standby takes over without them. Restarted on its memory file, the old
    active must not keep them: the new active sees it is beyond the takeover point and sends a full sync."""
    with Topology(os.getpid() % 1000 * 10 + 7) as topo:
        a, b = topo.start_pair(tmp_path, witness=True, memory=True)
        assert request_in(topo, "c", topo.service, b"set shared 0 0 1\r\ns\r\n") == b"STORED\r\n"
        os.kill(b.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)
            assert request_in(topo, "c", topo.service, b"set alone 0 0 1\r\na\r\n") == b"STORED\r\n"
            a.send_signal(signal.SIGKILL)
            sh("ip", "link", "set", topo.host_if["a"], "down")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        a.wait(timeout=10)
        wait_until(lambda: stats_in(topo, "b").get("role") == "active", "the standby to take over", 15)
        a_stats = rejoin_old_active(tmp_path, topo)
        assert (a_stats["full_syncs"], a_stats["partial_syncs"]) == ("1", "0"), f"a full sync: {a_stats}"
        assert "beyond the takeover point" in (tmp_path / "b.log").read_text()
        got = request_in(topo, "c", topo.addr["a"], b"get shared alone back\r\n", b"END\r\n")
        assert b"VALUE shared" in got and b"VALUE back" in got and b"alone" not in got, got


def test_kill_the_active_the_standby_serves_every_acknowledged_write(tmp_path):
    times = []
    for run in range(RUNS):
        run_dir = tmp_path / f"run{run}"
        run_dir.mkdir()
        # The first run also brings the old active back.
        result, b_stats = one_failover(run_dir, os.getpid() % 1000 * 10 + run, rejoin=run == 0)
        assert result["failover_ms"] is not None, f"the service address never answered again: {result}"
        assert result["missing_count"] == 0, f"acknowledged writes lost in sync mode: {result}"
        assert b_stats["role"] == "active" and b_stats["epoch"] == "2", b_stats
        assert "claimed_and_announced" in b_stats["last_role_change"], b_stats
        times.append(result["failover_ms"])
    median = statistics.median(times)
    print(f"\nfailover (kill + link down -> first acknowledged write on the service address), {RUNS} runs: "
          f"median {median:.0f} ms, all {[round(t) for t in times]}")


def test_an_active_cut_off_steps_down_when_it_meets_the_new_active(tmp_path):
    with Topology(os.getpid() % 1000 * 10 + 9) as topo:
        topo.start_pair(tmp_path)
        assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
        # Cut the active off (it keeps running): the standby takes over.
        sh("ip", "link", "set", topo.host_if["a"], "down")
        wait_until(lambda: stats_in(topo, "b").get("role") == "active", "the standby to take over")
        assert stats_in(topo, "a")["role"] == "active", "the cut-off active does not know yet"
        deadline = time.monotonic() + 10
        while True:
            try:
                if request_in(topo, "c", topo.service, b"set during 0 0 1\r\ny\r\n") == b"STORED\r\n":
                    break
            except subprocess.CalledProcessError:
                pass
            assert time.monotonic() < deadline, "clients never reached the new active"
            time.sleep(0.05)
        # The link comes back: the old active sees the higher epoch and steps down.
        sh("ip", "link", "set", topo.host_if["a"], "up")
        wait_until(lambda: stats_in(topo, "a").get("role") == "standby", "the old active to step down", 15)
        a_stats = stats_in(topo, "a")
        assert "stepped_down" in a_stats["last_role_change"] and "released" in a_stats["last_role_change"], a_stats
        assert not topo.service_address_on("a"), "the old active kept the service address"
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\nz\r\n") == b"STORED\r\n"
        wait_until(
            lambda: request_in(topo, "c", topo.addr["a"], b"get before during after\r\n", b"END\r\n").count(b"VALUE") == 3,
            "the old active to converge to the new one",
            20,
        )
        b_stats = stats_in(topo, "b")
        assert b_stats["role"] == "active" and b_stats["epoch"] == "2", b_stats
        # Cut off, it took no write after the point where b took over: it resumes (partial resync).
        a_stats = stats_in(topo, "a")
        assert (a_stats["full_syncs"], a_stats["partial_syncs"]) == ("0", "1"), f"a partial resync: {a_stats}"


def test_a_standby_cut_off_from_everything_does_not_promote(tmp_path):
    with Topology(os.getpid() % 1000 * 10 + 8) as topo:
        topo.start_pair(tmp_path, witness=True)
        # The standby loses its link: it hears neither the active nor the witness.
        sh("ip", "link", "set", topo.host_if["b"], "down")
        time.sleep(1.5)
        b_stats = stats_in(topo, "b")
        assert b_stats["role"] == "standby", b_stats
        assert int(b_stats["promotions_declined"]) >= 1 and "not_promoting" in b_stats.get("last_promotion_declined", ""), b_stats
        assert b_stats["promotions"] == "0", b_stats
        assert not topo.service_address_on("b"), "an isolated standby took the service address"
        # Its link returns: it follows the active again, which never stepped down.
        sh("ip", "link", "set", topo.host_if["b"], "up")
        wait_until(lambda: stats_in(topo, "b").get("state") == "streaming", "the standby to reconnect")
        time.sleep(1.0)  # longer than the active's half-second check for a newer active
        a_stats, b_stats = stats_in(topo, "a"), stats_in(topo, "b")
        assert a_stats["role"] == "active" and b_stats["role"] == "standby", (a_stats, b_stats)
        assert request_in(topo, "c", topo.service, b"set still 0 0 1\r\nx\r\n") == b"STORED\r\n"


def test_a_pause_of_the_whole_machine_is_no_failure_of_the_active(tmp_path):
    """A host that stops its guest for a moment (a hypervisor's steal, a stalled VM) stops the active
    and the standby alike. The standby that runs again first finds the active silent for longer than
    dead_after, but it heard nothing because it was not running: silence is counted on the standby's
    own running time, so it neither suspects nor drops the active; and the active, on its own, does
    not drop its standby."""
    with Topology(os.getpid() % 1000 * 10 + 9) as topo:
        a, b = topo.start_pair(tmp_path, witness=True)
        assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
        before = {name: stats_in(topo, name) for name in ("a", "b")}
        # Four times the default dead_after with the standby resumed first (the worst order for it), then
        # longer than the active's peer_timeout (1 s) with the active resumed first (the worst for it).
        for pause, first, second in ((0.6, b, a), (0.6, b, a), (1.3, a, b)):
            os.kill(a.pid, signal.SIGSTOP)
            os.kill(b.pid, signal.SIGSTOP)
            time.sleep(pause)
            os.kill(first.pid, signal.SIGCONT)
            time.sleep(0.02)
            os.kill(second.pid, signal.SIGCONT)
            time.sleep(1.0)
        after = {name: stats_in(topo, name) for name in ("a", "b")}
        for name in ("a", "b"):
            for figure in ("role", "epoch", "promotions", "step_downs", "role_changes"):
                assert after[name][figure] == before[name][figure], (name, figure, after[name].get("last_role_change"), after[name])
        assert (after["b"]["state"], after["b"]["connects"]) == ("streaming", before["b"]["connects"]), after["b"]
        assert after["a"]["sync_degraded"] == before["a"]["sync_degraded"], after["a"]
        assert int(after["b"]["stalls_forgiven"]) >= 3, after["b"]  # each pause was seen, and forgiven
        assert topo.service_address_on("a") and not topo.service_address_on("b")
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\ny\r\nget before\r\n", b"END\r\n") == (
            b"STORED\r\nVALUE before 0 1\r\nx\r\nEND\r\n")


def test_an_active_slow_past_dead_after_keeps_its_standby_streaming(tmp_path):
    """An active whose stream stalls past dead_after while its machine runs on (its process not
    scheduled, a long fault in its replication thread) is slow, not dead. The standby declares the
    silence and looks at the service address: still served (the stalled process answers `version` once
    it runs again, within the look's wait), so it declines to promote. It keeps its replication
    connection through that look, so the active goes on streaming where it was: no reconnect, no resync,
    no degraded sync, no role change; the decline is counted."""
    with Topology(os.getpid() % 1000 * 10 + 9) as topo:
        a, _ = topo.start_pair(tmp_path, witness=True)
        assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
        before = {name: stats_in(topo, name) for name in ("a", "b")}
        # 250 ms: past dead_after (150 ms), and short enough that the stalled active answers the standby's
        # `version` within the look's 300 ms.
        for _ in range(2):
            os.kill(a.pid, signal.SIGSTOP)
            time.sleep(0.25)
            os.kill(a.pid, signal.SIGCONT)
            time.sleep(1.0)
        after = {name: stats_in(topo, name) for name in ("a", "b")}
        declined = int(after["b"]["promotions_declined"]) - int(before["b"]["promotions_declined"])
        assert declined >= 1, ("the standby never suspected the stalled active", after["b"])
        assert "still_served" in after["b"]["last_promotion_declined"], after["b"]
        for name in ("a", "b"):
            for figure in ("role", "epoch", "promotions", "step_downs", "role_changes"):
                assert after[name][figure] == before[name][figure], (name, figure, after[name].get("last_role_change"), after[name])
        assert (after["b"]["state"], after["b"]["connects"]) == ("streaming", before["b"]["connects"]), after["b"]
        assert (after["b"]["full_syncs"], after["b"]["partial_syncs"]) == (before["b"]["full_syncs"], before["b"]["partial_syncs"])
        assert after["a"]["sync_degraded"] == before["a"]["sync_degraded"], after["a"]
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\ny\r\n") == b"STORED\r\n"
        assert topo.service_address_on("a") and not topo.service_address_on("b")


def start_with_two_standbys(tmp_path, topo):
    """Node a active, b and d its standbys (every node names the other two as peers); returns once both
    stream and a write through the service address is on both."""
    a = topo.start(tmp_path, "a", node_config(tmp_path, topo, "a", "active", ["b", "d"], witness=True))
    for name, peers in (("b", ["a", "d"]), ("d", ["a", "b"])):
        topo.start(tmp_path, name, node_config(tmp_path, topo, name, "standby", peers, witness=True))
    for name in ("b", "d"):
        wait_until(lambda: stats_in(topo, name).get("state") == "streaming", f"standby {name} to stream")
    assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
    for name in ("b", "d"):
        wait_until(lambda: request_in(topo, "c", topo.addr[name], b"get before\r\n", b"END\r\n") != b"END\r\n", f"{name} to have the write")
    return a


def one_active_and_its_standby(topo):
    """Waits until one of b and d is the active at epoch 2 with the service address and the other
    streams from it; returns (active, standby) by name."""

    def settled():
        roles = {name: stats_in(topo, name) for name in ("b", "d")}
        actives = [name for name, r in roles.items() if r["role"] == "active"]
        if len(actives) != 1:
            return None
        other = "d" if actives[0] == "b" else "b"
        if roles[other].get("state") != "streaming" or roles[other]["active"] != f"{topo.addr[actives[0]]}:11311":
            return None
        if not topo.service_address_on(actives[0]) or topo.service_address_on(other):
            return None
        return actives[0], other

    wait_until(lambda: settled() is not None, "one active and one standby following it", 20)
    # It stays so (the actives look for each other every half second).
    time.sleep(1.5)
    found = settled()
    assert found is not None, {name: stats_in(topo, name) for name in ("b", "d")}
    active, standby = found
    roles = {name: stats_in(topo, name) for name in ("b", "d")}
    assert roles[active]["epoch"] == roles[standby]["epoch"] == "2", roles
    # Clients reach the new active with the old data; its writes reach the other standby.
    assert request_in(topo, "c", topo.service, b"get before\r\n", b"END\r\n") == b"VALUE before 0 1\r\nx\r\nEND\r\n"
    assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\ny\r\n") == b"STORED\r\n"
    wait_until(
        lambda: request_in(topo, "c", topo.addr[standby], b"get after\r\n", b"END\r\n") == b"VALUE after 0 1\r\ny\r\nEND\r\n",
        "the remaining standby to have the new active's write",
    )
    return active, standby, roles


def test_two_standbys_one_takes_over_and_the_other_follows_it(tmp_path):
    """The active of two standbys dies. Both hear the silence; the one with the lower replication address
    takes over at once, the other waits its turn, finds it the active and follows it (a partial resync:
    the new history continues the old)."""
    with Topology(os.getpid() % 1000 * 10 + 3, nodes=("c", "a", "b", "d")) as topo:
        a = start_with_two_standbys(tmp_path, topo)
        a.send_signal(signal.SIGKILL)
        sh("ip", "link", "set", topo.host_if["a"], "down")
        active, standby, roles = one_active_and_its_standby(topo)
        assert (active, standby) == ("b", "d"), roles
        assert roles["d"]["promotions"] == "0" and roles["d"]["step_downs"] == "0", roles["d"]
        assert roles["d"]["partial_syncs"] == "1", roles["d"]


def test_two_standbys_promoted_together_settle_on_one_active(tmp_path):
    """Both standbys of a dead active are promoted at once (here by the operator, forced): two actives of
    the same epoch. They find each other and the one with the lower history steps down and follows the
    other: one service address, one active."""
    from test_switchover import tandemctl

    with Topology(os.getpid() % 1000 * 10 + 4, nodes=("c", "a", "b", "d")) as topo:
        a = start_with_two_standbys(tmp_path, topo)
        a.send_signal(signal.SIGKILL)
        sh("ip", "link", "set", topo.host_if["a"], "down")
        promotes = [
            threading.Thread(target=tandemctl, args=(tmp_path, name, "promote", "--force")) for name in ("b", "d")
        ]
        for t in promotes:
            t.start()
        for t in promotes:
            t.join()
        active, standby, roles = one_active_and_its_standby(topo)
        assert roles[standby]["step_downs"] == "1" and "two_standbys_promoted_together" in roles[standby]["last_role_change"], roles[standby]


def test_a_promoted_standby_restarted_while_the_old_active_is_down_is_the_active_again(tmp_path):
    """The role is kept in the state directory with the epoch: a standby that took over and then restarts
    (its configuration still says standby) comes back as the active, address and warm cache included,
    rather than as a never-synced standby that leaves the service address unserved."""
    with Topology(os.getpid() % 1000 * 10 + 6) as topo:
        a, b = topo.start_pair(tmp_path, witness=True, memory=True)
        assert request_in(topo, "c", topo.service, b"set kept 0 0 4\r\nwarm\r\n") == b"STORED\r\n"
        # The active's machine dies; the standby takes over.
        a.send_signal(signal.SIGKILL)
        sh("ip", "link", "set", topo.host_if["a"], "down")
        wait_until(lambda: stats_in(topo, "b").get("role") == "active", "the standby to take over")
        assert (tmp_path / "state-b" / "epoch").read_text().split() == ["2", "active"]
        # Its tandemd crashes and is restarted with its unchanged configuration, the old active still down.
        b.send_signal(signal.SIGKILL)
        b.wait(timeout=10)
        topo.start(tmp_path, "b", tmp_path / "b.toml")
        wait_until(lambda: stats_in(topo, "b").get("role") == "active", "the restarted node to be the active again", 15)
        b_stats = stats_in(topo, "b")
        assert b_stats["epoch"] == "2", b_stats
        log = (tmp_path / "b.log").read_text(errors="replace")
        assert "starting as active, not standby: this node was the active at epoch 2" in log, log[-2000:]
        # It was the active of this reign, so it first holds writes and leaves the address alone while it
        # looks for a standby that may hold newer data (none: the old active is down), then takes both.
        wait_until(lambda: topo.service_address_on("b"), "the restarted active to take the service address", 5)
        assert "opened_for_writes_at_epoch_2:_no_standby_holds_newer_data" in stats_in(topo, "b")["last_role_change"]
        deadline = time.monotonic() + 10
        while True:
            try:
                if request_in(topo, "c", topo.service, b"get kept\r\n", b"END\r\n") == b"VALUE kept 0 4\r\nwarm\r\nEND\r\n":
                    break
            except subprocess.CalledProcessError:
                pass
            assert time.monotonic() < deadline, "the service address never served the warm cache again"
            time.sleep(0.05)
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\nz\r\n") == b"STORED\r\n"


def test_an_active_restarted_before_its_standby_noticed_hands_the_reign_to_the_warm_standby(tmp_path):
    """systemd restarts a crashed tandemd within a second; with a dead_after longer than that (the
    appliance pair under TCG uses 2 s) the standby never sees its active silent. The restarted active is
    cold and starts a new history at the same epoch, which the standby cannot resume. The standby, which
    holds the reign's data, takes over at once; the restarted node meets the newer active and follows it
    with a full sync. Meanwhile the restarted node, which knows from its state directory that it was the
    active, holds writes and never takes the service address: a write sent to it is never acknowledged
    (its connection is closed when it steps down). Before, the cold node kept the address and the warm
    standby stayed refused for good; later it held the address, and took writes that were then lost, for
    the half second until it stepped down."""
    with Topology(os.getpid() % 1000 * 10 + 7) as topo:
        configs = {}
        for name, role, peer in (("a", "active", "b"), ("b", "standby", "a")):
            path = node_config(tmp_path, topo, name, role, peer, witness=True)
            path.write_text(path.read_text().replace("[failover]\n", "[failover]\nheartbeat_ms = 100\ndead_after_ms = 3000\n"))
            configs[name] = path
        a = topo.start(tmp_path, "a", configs["a"])
        topo.start(tmp_path, "b", configs["b"])
        wait_until(lambda: stats_in(topo, "b").get("state") == "streaming", "the standby to stream")
        keys = range(50)
        sets = b"".join(b"set warm%d 0 0 3\r\nv%02d\r\n" % (i, i) for i in keys)
        assert request_in(topo, "c", topo.service, sets, b"STORED\r\n" * len(keys)) == b"STORED\r\n" * len(keys)
        wait_until(lambda: stats_in(topo, "b", "").get("curr_items") == str(len(keys)), "the standby to hold every key")

        # The crash and the restart (what Restart=on-failure does), well inside b's dead_after.
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        # No stop hook here: the crash left the service address on a's interface, and the restarted
        # node, which does not take it, removes it.
        killed = time.monotonic()
        topo.start(tmp_path, "a", configs["a"])
        # A write straight to the restarted node, at once: held, then its connection closed.
        cold_write = in_ns(topo, "c", (
            "import socket;s=socket.create_connection((%r,11211),timeout=5);s.sendall(b'set cold 0 0 1\\r\\nx\\r\\n');d=b''\n"
            "while True:\n"
            "    c=s.recv(100)\n"
            "    d+=c\n"
            "    if not c or d.endswith(b'\\r\\n'): break\n"
            "print(repr(d))") % topo.addr["a"])
        assert eval(cold_write) in (b"",), f"the restarted node answered a write: {cold_write}"
        def taken_over():
            assert not topo.service_address_on("a"), "the restarted node took the service address"
            return stats_in(topo, "b").get("role") == "active"
        wait_until(taken_over, "the warm standby to take over", 10)
        took_over = time.monotonic() - killed
        assert took_over < 3.0, f"took {took_over:.1f} s: that is the silence path, not the restarted active's refusal"
        b_stats = stats_in(topo, "b")
        assert b_stats["epoch"] == "2" and "restarted_within_its_reign" in b_stats.get("last_role_change", ""), b_stats
        wait_until(lambda: stats_in(topo, "a").get("state") == "streaming", "the restarted node to follow", 10)
        a_stats = stats_in(topo, "a")
        assert a_stats["role"] == "standby" and a_stats["full_syncs"] == "1", a_stats
        assert topo.service_address_on("b") and not topo.service_address_on("a")
        # Its two role events: the cold restart's hold, and the step-down.
        assert a_stats["role_changes"] == "2" and a_stats["promotions"] == "0" and a_stats["step_downs"] == "1", a_stats
        want = b"".join(b"VALUE warm%d 0 3\r\nv%02d\r\n" % (i, i) for i in keys) + b"END\r\n"
        get_all = b"get " + b" ".join(b"warm%d" % i for i in keys) + b"\r\n"
        deadline = time.monotonic() + 10
        while True:
            try:
                got = request_in(topo, "c", topo.service, get_all, b"END\r\n")
                if got == want:
                    break
            except subprocess.CalledProcessError as e:
                got = e.stderr
            assert time.monotonic() < deadline, f"the service address never served the warm keys: {got!r}"
            time.sleep(0.1)
        wait_until(lambda: stats_in(topo, "a", "").get("curr_items") == str(len(keys)), "the restarted node to hold the data again")
        assert (tmp_path / "state-a" / "epoch").read_text().split() == ["2", "standby"]
        print(f"\nrestarted active: the warm standby took over {took_over * 1000:.0f} ms after the kill; "
              f"{b_stats['last_role_change']}")
