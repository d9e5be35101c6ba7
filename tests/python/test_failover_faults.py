"""Failover under partial faults, between real tandemd processes in network namespaces (needs root; CI is root).

The topology is test_failover.py's (a client, nodes a and b, one bridge, the bridge's address as witness);
where a test cuts only the replication link, the nodes also get a second veth each into a bridge of its
own that carries nothing but replication, so cutting it leaves the clients and the witness reachable.

- Only the replication link cut: exactly one node owns the service address at every moment, seen from the
  client (who answers ARP for it, which MAC the client's neighbour table holds, which node takes its
  writes) and on the nodes (which interface carries it).
- A crashed tandemd on a live node: the standby takes over; the unit's stop hook (tandemd
  --release-service-address, as systemd's ExecStopPost runs it) removes the address the crash left on
  that node; a tandemd restarted on a node whose crash left the address removes it too.
- Async mode, the active killed under load: the acknowledged writes missing on the new active are no
  more than the loss window `stats replication` reported just before the kill.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import harness
from harness import requires_tandem
from test_failover import Topology, node_config, request_in, sh, stats_in, wait_until

# Tags of their own (test_failover and test_switchover use 0-9 above the same pid-derived base, below 10000).
TAG_BASE = 10000 + os.getpid() % 1000 * 10

pytestmark = [
    requires_tandem("failover is Tandem's own"),
    pytest.mark.usefixtures("root"),  # no root: a skip, or under CI=true a failure (conftest.py)
]


class SplitTopology(Topology):
    """Topology plus a replication-only bridge: each node's eth1 on it, and replication over it."""

    def __init__(self, tag):
        super().__init__(tag)
        self.replication_bridge = f"tbrr{tag}"
        self.replication_if = {name: f"tfr{name}{tag}" for name in ("a", "b")}
        subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.replication_addr = {"a": f"{subnet}.1", "b": f"{subnet}.2"}
        try:
            sh("ip", "link", "add", self.replication_bridge, "type", "bridge")
            sh("ip", "link", "set", self.replication_bridge, "up")
            for name, host_if in self.replication_if.items():
                ns = self.ns[name]
                sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth1", "netns", ns)
                sh("ip", "link", "set", host_if, "master", self.replication_bridge, "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.replication_addr[name]}/24", "dev", "eth1")
                sh("ip", "-n", ns, "link", "set", "eth1", "up")
        except Exception:
            self.close()
            raise

    def close(self):
        super().close()
        for host_if in self.replication_if.values():
            sh("ip", "link", "del", host_if, check=False)
        sh("ip", "link", "del", self.replication_bridge, check=False)


def mac_of(topo, name):
    return json.loads(sh("ip", "-n", topo.ns[name], "-j", "link", "show", "eth0").stdout)[0]["address"]


# Runs in the client's namespace: who answers ARP for the service address (an RFC 5227 probe, sender IP
# 0.0.0.0, so it moves no cache), which MAC the client's neighbour table holds for it, and which writes
# through it are acknowledged; sampled until the duration ends. Prints one JSON object.
OBSERVER = textwrap.dedent(
    """
    import json, socket, struct, sys, threading, time
    iface, service, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    end = time.monotonic() + seconds
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    raw.bind((iface, 0x0806))
    mac = raw.getsockname()[4]
    target = socket.inet_aton(service)
    probe = (b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
             + mac + b"\\0" * 4 + b"\\0" * 6 + target)
    probe += b"\\0" * (60 - len(probe))
    writes = []

    def writer():
        i = 0
        while time.monotonic() < end:
            started = time.monotonic()
            ok = False
            try:
                s = socket.create_connection((service, port), timeout=3)
                s.settimeout(3)
                s.sendall(b"set cut:%d 0 0 1\\r\\nx\\r\\n" % i)
                got = b""
                while not got.endswith(b"\\r\\n"):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    got += chunk
                s.close()
                ok = got == b"STORED\\r\\n"
            except OSError:
                pass
            writes.append([started, time.monotonic(), i, ok])
            i += 1
            time.sleep(0.02)

    def neighbour():
        for line in open("/proc/net/arp").read().splitlines()[1:]:
            fields = line.split()
            if fields[0] == service:
                return fields[3] if fields[2] != "0x0" else "incomplete"
        return None

    thread = threading.Thread(target=writer)
    thread.start()
    samples = []
    while time.monotonic() < end:
        at = time.monotonic()
        raw.send(probe)
        answered = set()
        deadline = at + 0.04
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            raw.settimeout(left)
            try:
                frame = raw.recv(128)
            except socket.timeout:
                break
            if frame[12:14] == b"\\x08\\x06" and frame[20:22] == b"\\x00\\x02" and frame[28:32] == target:
                answered.add(":".join("%02x" % b for b in frame[22:28]))
        samples.append([at, sorted(answered), neighbour()])
        time.sleep(0.01)
    thread.join()
    print(json.dumps({"samples": samples, "writes": writes}), flush=True)
    """
)


def test_cutting_only_the_replication_link_leaves_exactly_one_owner(tmp_path):
    with SplitTopology(TAG_BASE) as topo:
        topo.start_pair(tmp_path, witness=True)
        macs = {mac_of(topo, "a"): "a", mac_of(topo, "b"): "b"}
        assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
        script = tmp_path / "observer.py"
        script.write_text(OBSERVER)
        seconds, cut_at, cut_for = 7.0, 1.5, 3.5
        started = time.monotonic()
        observer = subprocess.Popen(
            ["ip", "netns", "exec", topo.ns["c"], sys.executable, str(script), "eth0", topo.service, "11211", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        holders = []  # (time, nodes whose interface carries the service address)
        cut = restored = None
        while observer.poll() is None and time.monotonic() < started + seconds + 10:
            now = time.monotonic()
            if cut is None and now >= started + cut_at:
                sh("ip", "link", "set", topo.replication_if["a"], "down")
                cut = time.monotonic()
            if cut is not None and restored is None and now >= cut + cut_for:
                sh("ip", "link", "set", topo.replication_if["a"], "up")
                restored = time.monotonic()
            holders.append((now, [name for name in ("a", "b") if topo.service_address_on(name)]))
            time.sleep(0.05)
        result = json.loads(observer.stdout.read())
        observer.wait(timeout=10)
        assert cut is not None and restored is not None, "the run ended before the link was cut and restored"

        # On the nodes: always exactly one interface carries the address, and it is a's.
        assert all(names == ["a"] for _, names in holders), [h for h in holders if h[1] != ["a"]][:10]
        # From the client: every ARP probe answered by exactly one MAC, a's; the client's neighbour entry
        # never names b.
        samples = result["samples"]
        during = [s for s in samples if cut < s[0] < restored]
        wrong = [s for s in samples if [macs.get(m, m) for m in s[1]] != ["a"]]
        assert not wrong, f"{len(wrong)} of {len(samples)} ARP samples not answered by a alone: {wrong[:5]}"
        assert all(s[2] in (None, "incomplete", mac) for s in samples for mac in [next(m for m, n in macs.items() if n == "a")]), samples
        # Writes through the service address keep being acknowledged, by a, during the cut too (sync mode
        # waits for the dead link's timeout once, then degrades to async).
        writes = result["writes"]
        acked_during = [w for w in writes if cut < w[0] and w[1] < restored and w[3]]
        assert acked_during, f"no write acknowledged during the cut: {writes}"
        longest_write = max(w[1] - w[0] for w in writes)

        a_stats, b_stats = stats_in(topo, "a"), stats_in(topo, "b")
        assert a_stats["role"] == "active" and a_stats["step_downs"] == "0", a_stats
        assert b_stats["role"] == "standby" and b_stats["promotions"] == "0", b_stats
        assert "not_promoting" in b_stats.get("last_promotion_declined", "") and "still_served" in b_stats["last_promotion_declined"], b_stats
        # The link is back: b follows a again and gets what a took meanwhile.
        wait_until(lambda: stats_in(topo, "b").get("state") == "streaming", "the standby to stream again", 15)
        last = max(w[2] for w in writes if w[3])
        wait_until(
            lambda: request_in(topo, "c", topo.addr["b"], b"get before cut:%d\r\n" % last, b"END\r\n").count(b"VALUE") == 2,
            "the standby to converge",
            20,
        )
        b_stats = stats_in(topo, "b")
        print(
            f"\nreplication link cut for {restored - cut:.1f} s: {len(samples)} ARP samples ({len(during)} during the cut), "
            f"all answered by a alone; {len(holders)} node samples, a alone held the address; "
            f"{sum(w[3] for w in writes)} of {len(writes)} writes acknowledged ({len(acked_during)} during the cut), "
            f"longest write {longest_write * 1000:.0f} ms; b: promotions {b_stats['promotions']}, "
            f"partial_syncs {b_stats['partial_syncs']}, full_syncs {b_stats['full_syncs']}"
        )


def arp_holders(topo, tmp_path, macs):
    """Which nodes answer ARP for the service address, asked from the client (one OBSERVER sample)."""
    script = tmp_path / "observer.py"
    script.write_text(OBSERVER)
    out = sh("ip", "netns", "exec", topo.ns["c"], sys.executable, str(script), "eth0", topo.service, "11211", "0.2").stdout
    samples = json.loads(out)["samples"]
    return sorted({macs.get(m, m) for s in samples for m in s[1]})


def release_hook(topo, tmp_path, name):
    """What tandemd.service's ExecStopPost runs, on node ``name``."""
    return sh(
        "ip", "netns", "exec", topo.ns[name], harness.server_binary(), "--config", str(tmp_path / f"{name}.toml"), "--release-service-address"
    ).stdout


def test_a_crashed_tandemd_on_a_live_node_does_not_keep_the_service_address(tmp_path):
    with Topology(TAG_BASE + 1) as topo:
        a, b = topo.start_pair(tmp_path, witness=True)
        macs = {mac_of(topo, "a"): "a", mac_of(topo, "b"): "b"}
        assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
        # The hook on the node whose tandemd serves as the active leaves the address alone.
        out = release_hook(topo, tmp_path, "a")
        assert "kept" in out and topo.service_address_on("a"), (out, a.poll(), (tmp_path / "a.log").read_text()[-3000:])

        # a's tandemd crashes; its machine and link stay up.
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        wait_until(lambda: stats_in(topo, "b").get("role") == "active", "the standby to take over", 10)
        b_stats = stats_in(topo, "b")
        assert b_stats["epoch"] == "2", b_stats
        # What the crash leaves: a's kernel still holds the address (and answers ARP for it).
        left_behind = topo.service_address_on("a")
        holders_before_hook = arp_holders(topo, tmp_path, macs)
        assert left_behind, "expected the killed tandemd's address to stay on a's interface"

        # systemd runs the stop hook: the address goes from a; b alone holds it and answers on it.
        out = release_hook(topo, tmp_path, "a")
        assert "removed the service address" in out, out
        assert not topo.service_address_on("a") and topo.service_address_on("b")
        assert arp_holders(topo, tmp_path, macs) == ["b"]
        assert request_in(topo, "c", topo.service, b"get before\r\n", b"END\r\n") == b"VALUE before 0 1\r\nx\r\nEND\r\n"
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\ny\r\n") == b"STORED\r\n"

        # a restarts (its config still says active): it finds b active and follows it.
        topo.start(tmp_path, "a", tmp_path / "a.toml")
        wait_until(lambda: stats_in(topo, "a").get("state") == "streaming", "a to follow b", 20)
        assert stats_in(topo, "a")["role"] == "standby"

        # Now b's tandemd crashes with no hook run; a takes over; the restarted tandemd on b removes
        # the address its crash left (it starts as a standby: the node that does not own it).
        b.send_signal(signal.SIGKILL)
        b.wait(timeout=10)
        wait_until(lambda: stats_in(topo, "a").get("role") == "active", "a to take over again", 10)
        assert topo.service_address_on("b"), "expected b's killed tandemd to leave the address"
        topo.start(tmp_path, "b", tmp_path / "b.toml")
        wait_until(lambda: stats_in(topo, "b").get("state") == "streaming", "b to follow a", 20)
        b_stats = stats_in(topo, "b")
        assert b_stats["role"] == "standby" and "removed_the_service_address" in b_stats.get("last_role_change", ""), b_stats
        assert not topo.service_address_on("b") and topo.service_address_on("a")
        assert arp_holders(topo, tmp_path, macs) == ["a"]
        got = request_in(topo, "c", topo.service, b"get before after\r\n", b"END\r\n")
        assert got.count(b"VALUE") == 2, got
        print(
            f"\ncrash with the link up: the address stayed on the crashed node ({left_behind}; ARP answered by "
            f"{holders_before_hook}) until the stop hook removed it: '{out.strip()}'; a restarted tandemd removed it "
            f"as well: {b_stats['last_role_change']}"
        )


# Runs in the client's namespace: pipelined writes of unique keys on several connections as fast as the
# service answers, each acknowledged write recorded with the time its STORED arrived; on `stop` (a file)
# the writers end, the client waits for the service address to answer again, and reads every acknowledged
# key back. Prints the acknowledged keys' count and the missing ones, with their times.
LOADER = textwrap.dedent(
    """
    import json, os, socket, sys, threading, time
    service, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    WRITERS, BATCH = 4, 32
    acked = [[] for _ in range(WRITERS)]

    def writer(w):
        try:
            s = socket.create_connection((service, port), timeout=2)
            s.settimeout(2)
            i = 0
            while not os.path.exists(stop):
                keys = [b"w%d:%d" % (w, i + j) for j in range(BATCH)]
                s.sendall(b"".join(b"set " + k + b" 0 0 4\\r\\nvvvv\\r\\n" for k in keys))
                got, n = b"", 0
                while n < BATCH:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    got += chunk
                    while b"\\r\\n" in got and n < BATCH:
                        line, got = got.split(b"\\r\\n", 1)
                        if line == b"STORED":
                            acked[w].append((keys[n].decode(), time.monotonic()))
                        n += 1
                i += BATCH
        except OSError:
            return

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    print(json.dumps({"started": True}), flush=True)
    for t in threads:
        t.join()
    # The service address answers again (the standby promoted).
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            s = socket.create_connection((service, port), timeout=0.2)
            s.settimeout(0.5)
            s.sendall(b"set probe 0 0 1\\r\\nx\\r\\n")
            if s.recv(100) == b"STORED\\r\\n":
                break
        except OSError:
            time.sleep(0.01)
    s = socket.create_connection((service, port), timeout=5)
    s.settimeout(10)
    everything = [k for w in acked for k in w]
    missing = []
    for start in range(0, len(everything), 100):
        chunk = everything[start:start + 100]
        s.sendall(b"get " + b" ".join(k.encode() for k, _ in chunk) + b"\\r\\n")
        got = b""
        while not got.endswith(b"END\\r\\n"):
            got += s.recv(1 << 20)
        found = {line.split()[1].decode() for line in got.split(b"\\r\\n") if line.startswith(b"VALUE ")}
        missing += [(k, t) for k, t in chunk if k not in found]
    print(json.dumps({"acked": len(everything), "missing": missing}), flush=True)
    """
)


def stats_over(sock, group=b"replication"):
    sock.sendall(b"stats " + group + b"\r\n")
    got = b""
    while not got.endswith(b"END\r\n"):
        got += sock.recv(65536)
    return dict(line.split(" ", 2)[1:] for line in got.decode().splitlines() if line.startswith("STAT "))


def one_async_kill(tmp_path, tag, load_seconds):
    with Topology(tag) as topo:
        a = topo.start(tmp_path, "a", node_config(tmp_path, topo, "a", "active", "b", mode="async", witness=True))
        topo.start(tmp_path, "b", node_config(tmp_path, topo, "b", "standby", "a", mode="async", witness=True))
        wait_until(lambda: stats_in(topo, "b").get("state") == "streaming", "the standby to stream")
        script = tmp_path / "loader.py"
        script.write_text(LOADER)
        stop = tmp_path / "stop"
        loader = subprocess.Popen(
            ["ip", "netns", "exec", topo.ns["c"], sys.executable, str(script), topo.service, "11211", str(stop)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(loader.stdout.readline())["started"]
        # The test reaches a's own address over the bridge (the witness address is the host's).
        stats = socket.create_connection((topo.addr["a"], 11211), timeout=2)
        time.sleep(load_seconds)
        # Sampled, then the machine dies at once: a's tandemd killed and its link cut.
        sampled_at = time.monotonic()
        sample = stats_over(stats)
        a.send_signal(signal.SIGKILL)
        sh("ip", "link", "set", topo.host_if["a"], "down")
        stop.write_text("stop")
        result = json.loads(loader.stdout.readline())
        loader.wait(timeout=30)
        b_stats = stats_in(topo, "b")
        assert b_stats["role"] == "active", b_stats
        return sample, sampled_at, result


def test_async_kill_under_load_loses_no_more_than_the_reported_loss_window(tmp_path):
    runs = []
    for run in range(3):
        run_dir = tmp_path / f"run{run}"
        run_dir.mkdir()
        sample, sampled_at, result = one_async_kill(run_dir, TAG_BASE + 2 + run, 2.0)
        window = int(sample["loss_window_records"])
        assert int(sample["standby_0_unacked_records"]) == window, sample
        # Writes acknowledged before the sample are what the sample can speak for; those acknowledged
        # in the millisecond between the sample and the kill are counted apart.
        before = [k for k, t in result["missing"] if t < sampled_at]
        assert result["acked"] > 1000, result["acked"]
        assert len(before) <= window, f"{len(before)} acknowledged writes lost, but the loss window said {window}: {sample}"
        runs.append((result["acked"], window, len(before), len(result["missing"]), sample["standby_0_lag_records"], sample["standby_0_lag_ms"]))
    print("\nasync kill under load (acked writes, loss_window_records sampled just before the kill, lost of those "
          "acked before the sample, lost in all, lag_records, lag_ms):")
    for run in runs:
        print("  acked %d  window %d  lost %d  lost_all %d  lag_records %s  lag_ms %s" % run)
