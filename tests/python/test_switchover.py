"""tandemctl against a pair of real tandemd processes in network namespaces on a bridge (needs root; CI is root).

The topology is test_failover's (client, active a, standby b, the service address on the active); each node's
admin socket is ``<state_dir>/admin.sock`` (the default), reached from the host: a Unix socket is not tied to a
network namespace.

- status, promote, demote: what each says and refuses, and that demote and promote really move the role and
  the service address.
- switchover under load: clients write through the service address in sync mode, each write verified, while
  ``tandemctl switchover`` runs against the active. Afterwards every acknowledged write is readable from the
  new active, the roles are swapped (tandemctl status on both), exactly one node holds the service address, the
  old active follows the new one with a partial resync, and the clients saw no error other than connection
  resets or timeouts (retried) during the pause.
- a switchover whose standby cannot catch up aborts: writes resume on the active.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import harness
from harness import requires_tandem
from test_failover import Topology, request_in, sh, stats_in, wait_until

pytestmark = [
    requires_tandem("tandemctl is Tandem's own"),
    pytest.mark.usefixtures("root"),  # no root: a skip, or under CI=true a failure (conftest.py)
]

# test_failover's topologies use tags ending 0-4, 8 and 9 of the same pid-derived base.
TAG_BASE = os.getpid() % 1000 * 10

LOAD = textwrap.dedent(
    """
    import json, os, socket, sys, threading, time
    host, port, threads, stop_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    WARMUP, AFTER_STOP, HARD_DEADLINE = 200, 200, time.time() + 60

    lock = threading.Lock()
    acked, retried, bad, gaps, warm, events = [], [], [], [], [], []

    def read_reply(s):
        got = b""
        while not got.endswith(b"\\r\\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed by the server")
            got += chunk
        return got

    def writer(t):
        s, i, last_ok, stop_at = None, 0, time.time(), None
        while time.time() < HARD_DEADLINE:
            if stop_at is None and os.path.exists(stop_file):
                stop_at = i + AFTER_STOP
            if stop_at is not None and i >= stop_at:
                break
            if i == WARMUP:
                with lock:
                    warm.append(t)
            key, value = b"sw:%d:%d" % (t, i), b"value-%d-%d" % (t, i)
            try:
                if s is None:
                    s = socket.create_connection((host, port), timeout=1)
                    s.settimeout(1)
                s.sendall(b"set %s 0 0 %d\\r\\n%s\\r\\n" % (key, len(value), value))
                got = read_reply(s)
            except OSError as e:
                # A connection reset or timeout: the write may or may not have run; retrying it is safe.
                with lock:
                    retried.append("%s: %s" % (type(e).__name__, e))
                    events.append((time.time(), t, "retry %s" % e))
                if s is not None:
                    s.close()
                s = None
                time.sleep(0.005)
                continue
            if got == b"STORED\\r\\n":
                now = time.time()
                with lock:
                    acked.append((key.decode(), value.decode()))
                    gaps.append(now - last_ok)
                    if now - last_ok > 0.05:
                        events.append((now, t, "ok after gap %.0f ms" % ((now - last_ok) * 1000)))
                last_ok = now
            else:
                with lock:
                    bad.append(got.decode(errors="replace"))
            i += 1

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    while len(warm) < threads and time.time() < HARD_DEADLINE:
        time.sleep(0.01)
    print(json.dumps({"ready": len(warm)}), flush=True)
    for w in workers:
        w.join()

    missing = []
    for start in range(0, len(acked), 100):
        part = acked[start:start + 100]
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"get " + b" ".join(k.encode() for k, _ in part) + b"\\r\\n")
        got = b""
        while not got.endswith(b"END\\r\\n"):
            got += s.recv(1 << 20)
        s.close()
        for key, value in part:
            if (b"VALUE %s 0 %d\\r\\n%s\\r\\n" % (key.encode(), len(value), value.encode())) not in got:
                missing.append(key)
    print(json.dumps({"acked": len(acked), "retried": len(retried), "retry_kinds": sorted(set(retried))[:10],
                      "bad": bad[:20], "bad_count": len(bad), "missing": missing[:20], "missing_count": len(missing),
                      "max_gap_ms": round(max(gaps) * 1000) if gaps else None, "events": ["%.3f %d %s" % e for e in events[:10]]}), flush=True)
    """
)


def tandemctl(tmp_path, name, *args, check=False):
    """Runs tandemctl against node ``name``'s admin socket; returns (exit status, stdout, stderr)."""
    binary = pathlib.Path(harness.server_binary()).with_name("tandemctl")
    if not binary.exists():
        pytest.fail(f"tandemctl not found next to the server: {binary}")
    done = subprocess.run([str(binary), "--socket", str(tmp_path / f"state-{name}" / "admin.sock"), *args],
                          capture_output=True, text=True, timeout=40)
    if check:
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.returncode, done.stdout, done.stderr


def status(tmp_path, name):
    code, out, err = tandemctl(tmp_path, name, "status", "--json")
    assert code == 0, (out, err)
    return json.loads(out)


def holders(topo):
    return [name for name in ("a", "b") if topo.service_address_on(name)]


def test_status_promote_and_demote(tmp_path):
    with Topology(TAG_BASE + 5) as topo:
        topo.start_pair(tmp_path)
        assert request_in(topo, "c", topo.service, b"set one 0 0 1\r\n1\r\n") == b"STORED\r\n"
        a, b = status(tmp_path, "a"), status(tmp_path, "b")
        assert a["role"] == "active" and a["epoch"] == "1" and a["writable"] == "yes", a
        assert a["service_ip"].endswith("held by this node") and a["standbys"] == "1", a
        assert "streaming" in a["standby_0"], a
        assert b["role"] == "standby" and b["link"] == "streaming" and b["replication_id"] == a["replication_id"], b
        assert b["service_ip"].endswith("not on this node"), b
        _, human, _ = tandemctl(tmp_path, "a", "status", check=True)
        assert "role:" in human and "active" in human

        # What each node refuses, and why.
        code, _, err = tandemctl(tmp_path, "a", "promote")
        assert code == 1 and "already the active" in err, err
        code, _, err = tandemctl(tmp_path, "b", "promote")
        assert code == 1 and "is connected to this standby" in err and "--force" in err, err
        code, _, err = tandemctl(tmp_path, "b", "demote")
        assert code == 1 and "already a standby" in err, err
        code, _, err = tandemctl(tmp_path, "b", "switchover")
        assert code == 1 and "run switchover on the active" in err, err
        assert status(tmp_path, "b")["role"] == "standby"

        # demote: a steps down and gives up the address; b, a standby with failover, takes over; a follows
        # b from where its own log ended (a partial resync: in sync mode b had everything).
        code, out, err = tandemctl(tmp_path, "a", "demote")
        assert code == 0 and "demoted to standby" in out, (out, err)
        assert status(tmp_path, "a")["role"] == "standby"
        wait_until(lambda: status(tmp_path, "b")["role"] == "active", "b to take over after the demotion")
        wait_until(lambda: stats_in(topo, "a").get("state") == "streaming", "a to follow b")
        a_stats = stats_in(topo, "a")
        assert a_stats["partial_syncs"] == "1" and a_stats["full_syncs"] == "0", a_stats
        assert "demoted_by_tandemctl" in a_stats["last_role_change"] or int(a_stats["step_downs"]) == 1, a_stats
        assert a_stats["step_downs"] == "1", a_stats
        wait_until(lambda: holders(topo) == ["b"], "only b to hold the service address")
        assert request_in(topo, "c", topo.service, b"set two 0 0 1\r\n2\r\n") == b"STORED\r\n"
        wait_until(lambda: request_in(topo, "c", topo.addr["a"], b"get one two\r\n", b"END\r\n").count(b"VALUE") == 2,
                   "a to converge to b")

        # promote --force on a while b is its live active: a takes over at a higher epoch; b meets it and
        # steps down.
        # (b's epoch is read first: once a is active, b may step down and take a's epoch at any moment.)
        b_epoch = int(status(tmp_path, "b")["epoch"])
        code, out, err = tandemctl(tmp_path, "a", "promote", "--force")
        assert code == 0 and "promoted to active" in out and "forced" in out, (out, err)
        a = status(tmp_path, "a")
        assert a["role"] == "active" and int(a["epoch"]) == b_epoch + 1, (a, b_epoch)
        assert "asked by tandemctl promote" in a["last_role_change"] and a["promotions"] == "1", a
        wait_until(lambda: status(tmp_path, "b")["role"] == "standby", "b to step down for the newer active", 15)
        wait_until(lambda: holders(topo) == ["a"], "only a to hold the service address")
        assert request_in(topo, "c", topo.service, b"get one two\r\n", b"END\r\n").count(b"VALUE") == 2


def run_load(tmp_path, topo, threads=2):
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    stop = tmp_path / "stop-load"
    client = subprocess.Popen(
        ["ip", "netns", "exec", topo.ns["c"], sys.executable, str(script), topo.service, "11211", str(threads), str(stop)],
        stdout=subprocess.PIPE, text=True,
    )
    ready = json.loads(client.stdout.readline())
    assert ready["ready"] == threads, ready
    return client, stop


def test_switchover_under_load_loses_no_acknowledged_write(tmp_path):
    with Topology(TAG_BASE + 6) as topo:
        topo.start_pair(tmp_path)
        before = status(tmp_path, "a")
        client, stop = run_load(tmp_path, topo)
        started = time.monotonic()
        print("\nswitchover starts at %.3f" % time.time())
        code, out, err = tandemctl(tmp_path, "a", "switchover", "--timeout-ms", "5000")
        took = time.monotonic() - started
        time.sleep(0.5)
        stop.write_text("stop")
        result = json.loads(client.stdout.readline())
        client.wait(timeout=60)
        print(f"\nswitchover under load: tandemctl took {took * 1000:.0f} ms ({out.strip() or err.strip()}); client: {result}")
        assert code == 0 and "switchover complete" in out, (out, err)

        assert result["missing_count"] == 0, f"acknowledged writes lost: {result}"
        assert result["bad_count"] == 0, f"clients saw errors beyond connection resets and retries: {result}"
        assert result["acked"] > 2 * 400, result
        a, b = status(tmp_path, "a"), status(tmp_path, "b")
        assert a["role"] == "standby" and b["role"] == "active", (a, b)
        assert int(b["epoch"]) == int(before["epoch"]) + 1, (before, b)
        assert a["switchovers"] == "1" and "switchover: stepped down to standby" in a["last_role_change"], a
        assert "switchover: the active" in b["last_role_change"] and b["promotions"] == "1", b
        assert holders(topo) == ["b"], "exactly one node, the new active, holds the service address"
        assert b["service_ip"].endswith("held by this node") and a["service_ip"].endswith("not on this node")
        # The old active follows the new one from where it handed over: no full sync.
        wait_until(lambda: stats_in(topo, "a").get("state") == "streaming", "the old active to follow the new one")
        a_stats = stats_in(topo, "a")
        assert a_stats["partial_syncs"] == "1" and a_stats["full_syncs"] == "0", a_stats
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\nz\r\n") == b"STORED\r\n"
        wait_until(lambda: request_in(topo, "c", topo.addr["a"], b"get after sw:0:0\r\n", b"END\r\n").count(b"VALUE") == 2,
                   "the old active to converge")
        # And back: the old active takes its role again the same way.
        code, out, err = tandemctl(tmp_path, "b", "switchover")
        assert code == 0 and "switchover complete" in out, (out, err)
        assert status(tmp_path, "a")["role"] == "active" and status(tmp_path, "b")["role"] == "standby"
        assert holders(topo) == ["a"]
        assert request_in(topo, "c", topo.service, b"get after\r\n", b"END\r\n") == b"VALUE after 0 1\r\nz\r\nEND\r\n"


def test_a_switchover_whose_standby_cannot_catch_up_aborts_and_writes_resume(tmp_path):
    with Topology(TAG_BASE + 7) as topo:
        _, b = topo.start_pair(tmp_path)
        assert request_in(topo, "c", topo.service, b"set before 0 0 1\r\nx\r\n") == b"STORED\r\n"
        # The standby freezes: a write made now is logged but never acknowledged by it. The client is
        # started and connected first and told to write only after the freeze, so that the switchover
        # begins well within the standby's peer timeout even when starting a process is slow.
        pending = subprocess.Popen(
            ["ip", "netns", "exec", topo.ns["c"], sys.executable, "-c",
             "import socket,sys;s=socket.create_connection(('%s',11211),timeout=5);print('connected', flush=True);"
             "sys.stdin.readline();s.sendall(b'set held 0 0 1\\r\\ny\\r\\n');print('sent', flush=True);print(s.recv(100))"
             % topo.service],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert pending.stdout.readline().strip() == "connected"
        b.send_signal(signal.SIGSTOP)
        try:
            pending.stdin.write("go\n")
            pending.stdin.flush()
            assert pending.stdout.readline().strip() == "sent"
            time.sleep(0.05)
            code, out, err = tandemctl(tmp_path, "a", "switchover", "--timeout-ms", "300")
            assert code == 1 and "switchover aborted" in err and "no standby caught up" in err, (out, err)
            assert "writes resumed on this active" in err
            a = status(tmp_path, "a")
            assert a["role"] == "active" and a["writable"] == "yes" and a["writes_paused"] == "no", a
            assert a["switchovers_aborted"] == "1" and a["switchovers"] == "0", a
            assert holders(topo) == ["a"]
            pending.wait(timeout=10)
        finally:
            b.send_signal(signal.SIGCONT)
        # Writes go on on the active (sync mode degraded while the standby was away), and it catches up.
        assert request_in(topo, "c", topo.service, b"set after 0 0 1\r\nz\r\n") == b"STORED\r\n"
        wait_until(lambda: stats_in(topo, "b").get("state") == "streaming", "the standby to come back")
        wait_until(lambda: request_in(topo, "c", topo.addr["b"], b"get before held after\r\n", b"END\r\n").count(b"VALUE") == 3,
                   "the standby to converge")
