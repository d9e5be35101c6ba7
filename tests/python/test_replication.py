"""Replication between real tandemd processes on loopback: an active, its standbys, real clients.

What is checked, each against the standby's actual contents (`lru_crawler metadump all` for keys,
expiry and CAS; `get` for values and flags):
- every kind of mutation, in text, meta and binary, arrives: the standby equals the active key by key;
- sync mode: a write the client saw acknowledged is on the standby at that moment;
- a standby serves reads and refuses writes (text, meta, binary);
- a standby cut off under load resumes from the backlog (partial resync), one killed and restarted
  gets a full sync, one started late under load gets a full sync; all converge;
- a standby killed with SIGKILL under load and restarted on its memory file (`-e`) resumes from the
  backlog (a partial resync, on both ends' stats) and converges;
- three standbys, one killed and restarted mid-run: the others are unaffected (and with memory files,
  the restarted one resumes partially);
- a wrong secret, another shard count, or garbage on the replication port is refused, nothing is applied,
  and the active keeps serving.
Every wait is bounded.
"""

import os
import signal
import socket
import struct
import threading
import time
import urllib.parse

import pytest

import harness
from harness import RawConn, requires_tandem, stats

pytestmark = requires_tandem("replication is Tandem's own")

SECRET = b"tandem-test-secret-0123456789"
CONVERGE_TIMEOUT_S = 20.0


def write_config(tmp_path, name, **fields):
    lines = ["[replication]"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    secret = tmp_path / f"{name}.secret"
    if not secret.exists():
        secret.write_bytes(SECRET)
    if "secret_file" not in fields:
        lines.append(f'secret_file = "{secret}"')
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Pair:
    """An active and the means to start standbys that follow it."""

    def __init__(self, start, tmp_path, mode="async", ack="one", threads=2, flags=(), **active_fields):
        self.start = start
        self.tmp_path = tmp_path
        self.repl_port = harness.free_port()
        self.threads = threads
        self.flags = list(flags)
        config = write_config(tmp_path, "active", role="active", listen=f"127.0.0.1:{self.repl_port}", mode=mode, ack=ack, **active_fields)
        self.active = start("--config", str(config), "-t", str(threads), *self.flags)
        self.standbys = 0

    def standby(self, threads=None, secret=None, name=None, flags=()):
        self.standbys += 1
        name = name or f"standby{self.standbys}"
        fields = dict(role="standby", peers=[f"127.0.0.1:{self.repl_port}"], peer_timeout_ms=1000)
        if secret is not None:
            path = self.tmp_path / f"{name}.secret"
            path.write_bytes(secret)
            fields["secret_file"] = str(path)
        config = write_config(self.tmp_path, name, **fields)
        return self.start("--config", str(config), "-t", str(threads or self.threads), *self.flags, *flags)


def metadump(server):
    """key -> (exp, cas) of every live item, from `lru_crawler metadump all`."""
    conn = RawConn(server.host, server.port, timeout=10)
    try:
        conn.send(b"lru_crawler metadump all\r\n")
        raw = conn.recv_until(b"END\r\n", timeout=10)
    finally:
        conn.close()
    assert raw.endswith(b"END\r\n"), raw[-200:]
    items = {}
    for line in raw[: -len(b"END\r\n")].split(b"\n"):
        if not line:
            continue
        fields = dict(part.split(b"=", 1) for part in line.split(b" "))
        key = urllib.parse.unquote_to_bytes(fields[b"key"])
        assert key not in items, f"{key!r} listed twice"
        items[key] = (int(fields[b"exp"]), int(fields[b"cas"]))
    return items


def values(server, keys):
    """key -> (flags, value) by `get`, in batches."""
    conn = RawConn(server.host, server.port, timeout=10)
    found = {}
    try:
        keys = sorted(keys)
        for start in range(0, len(keys), 50):
            batch = keys[start : start + 50]
            conn.send(b"get " + b" ".join(batch) + b"\r\n")
            while True:
                line = conn.recv_until(b"\r\n", timeout=10)
                if line == b"END\r\n":
                    break
                assert line.startswith(b"VALUE "), line
                _, key, flags, length = line.split()
                data = conn.recv_exact(int(length) + 2, timeout=10)
                found[key] = (int(flags), data[:-2])
    finally:
        conn.close()
    return found


def contents(server):
    """Everything a client can see: key -> (flags, value, exp, cas)."""
    meta = metadump(server)
    vals = values(server, list(meta))
    return {key: vals[key] + meta[key] for key in meta if key in vals}


def wait_converged(active, standby, timeout=CONVERGE_TIMEOUT_S):
    """Waits until the standby holds exactly what the active holds; fails with the difference."""
    deadline = time.monotonic() + timeout
    while True:
        want, got = contents(active), contents(standby)
        if want == got:
            return want
        if time.monotonic() > deadline:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            differ = [(k, want[k], got[k]) for k in sorted(set(want) & set(got)) if want[k] != got[k]][:5]
            pytest.fail(f"standby did not converge: missing {missing}, extra {extra}, differing {differ}")
        time.sleep(0.2)


def repl_stats(server):
    return stats(server, "replication")


def wait_for(predicate, what, timeout=CONVERGE_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def binary_request(opcode, key=b"", value=b"", extras=b"", opaque=0, cas=0):
    header = struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0, len(extras) + len(key) + len(value), opaque, cas)
    return header + extras + key + value


def binary_status(reply):
    return struct.unpack(">H", reply[6:8])[0]


class Writer:
    """A client writing through the active in a thread, bounded in time; counts what it wrote."""

    def __init__(self, server, prefix, seconds=30.0, delay=0.0):
        self.server = server
        self.prefix = prefix
        self.seconds = seconds
        self.delay = delay
        self.stop = threading.Event()
        self.count = 0
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        deadline = time.monotonic() + self.seconds
        try:
            conn = RawConn(self.server.host, self.server.port, timeout=5)
            while not self.stop.is_set() and time.monotonic() < deadline:
                batch = b"".join(
                    b"set %s:%d 0 0 10\r\nvalue%05d\r\n" % (self.prefix, self.count + i, (self.count + i) % 100000) for i in range(20)
                )
                batch += b"delete %s:%d\r\n" % (self.prefix, self.count)
                conn.send(batch)
                reply = conn.recv_until_count(b"\r\n", 21, timeout=5)
                assert reply.count(b"STORED\r\n") == 20, reply
                self.count += 20
                if self.delay:
                    time.sleep(self.delay)
            conn.close()
        except Exception as error:  # reported by join()
            self.error = error

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()
        if self.error and not exc[0]:
            raise self.error


def test_every_mutation_kind_reaches_the_standby(start, tmp_path):
    pair = Pair(start, tmp_path, flags=["-I", "4m", "-m", "128"])
    standby = pair.standby()
    wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standby to stream")
    c = RawConn(pair.active.host, pair.active.port)
    # A delayed flush first: it fires while the rest of the workload is written.
    c.expect(b"set before-flush 0 0 1\r\nx\r\n", b"STORED\r\n")
    c.expect(b"flush_all 1\r\n", b"OK\r\n")
    time.sleep(2.2)
    c.expect(b"set s 5 0 5\r\nhello\r\n", b"STORED\r\n")
    c.expect(b"add s 0 0 1\r\nx\r\n", b"NOT_STORED\r\n")
    c.expect(b"add a 3 0 3\r\nnew\r\n", b"STORED\r\n")
    c.expect(b"replace a 4 0 4\r\nrepl\r\n", b"STORED\r\n")
    c.expect(b"append s 0 0 6\r\n world\r\n", b"STORED\r\n")
    c.expect(b"prepend s 0 0 3\r\n>> \r\n", b"STORED\r\n")
    c.send(b"gets s\r\n")
    cas = int(c.recv_until(b"\r\n").split()[4])
    c.recv_until(b"END\r\n")
    c.expect(b"cas s 9 0 3 %d\r\ncas\r\n" % cas, b"STORED\r\n")
    c.expect(b"cas s 9 0 3 %d\r\nold\r\n" % cas, b"EXISTS\r\n")
    c.expect(b"set n 0 0 3\r\n100\r\n", b"STORED\r\n")
    c.expect(b"incr n 905\r\n", b"1005\r\n")
    c.expect(b"decr n 1000\r\n", b"5\r\n")  # padded in place: "5   "
    c.expect(b"set t 0 0 1\r\nt\r\n", b"STORED\r\n")
    c.expect(b"touch t 1000\r\n", b"TOUCHED\r\n")
    c.expect(b"set g 0 0 1\r\ng\r\n", b"STORED\r\n")
    c.expect(b"gat 2000 g\r\n", b"VALUE g 0 1\r\ng\r\nEND\r\n")
    c.expect(b"set gone 0 0 1\r\nx\r\n", b"STORED\r\n")
    c.expect(b"delete gone\r\n", b"DELETED\r\n")
    c.expect(b"set expiring 0 1 1\r\nx\r\n", b"STORED\r\n")
    c.expect(b"set later 0 3000 5\r\nlater\r\n", b"STORED\r\n")
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: spans segments
    c.send(b"set big 7 0 %d\r\n" % len(big) + big + b"\r\n")
    assert c.recv_until(b"\r\n", timeout=10) == b"STORED\r\n"
    c.expect(b"ms meta 2 T500 F11\r\nmm\r\n", b"HD\r\n")
    c.expect(b"ma n D10\r\n", b"HD\r\n")
    c.expect(b"mg g T0 v\r\n", b"VA 1\r\ng\r\n")
    c.expect(b"set md 0 0 1\r\nx\r\n", b"STORED\r\n")
    c.expect(b"md md\r\n", b"HD\r\n")
    c.send(b"mg vivified N100 s\r\n")
    assert c.recv_until(b"\r\n").startswith(b"HD s0 W"), "a vivified miss wins the recache"
    # Binary: SET, APPEND, INCREMENT, DELETE.
    b = RawConn(pair.active.host, pair.active.port)
    b.send(binary_request(0x01, b"bin", b"binary", struct.pack(">II", 13, 0)))
    assert binary_status(b.recv_exact(24)) == 0
    b.send(binary_request(0x0E, b"bin", b"+more"))
    assert binary_status(b.recv_exact(24)) == 0
    b.send(binary_request(0x05, b"bcount", extras=struct.pack(">QQI", 5, 40, 0)))
    assert binary_status(b.recv_exact(24 + 8)) == 0
    b.send(binary_request(0x01, b"bdel", b"x", struct.pack(">II", 0, 0)))
    assert binary_status(b.recv_exact(24)) == 0
    b.send(binary_request(0x04, b"bdel"))
    assert binary_status(b.recv_exact(24)) == 0
    # Many keys, so every shard logs something.
    for i in range(200):
        c.send(b"set many:%d %d 0 %d\r\n%s\r\n" % (i, i, len(str(i)), str(i).encode()))
    assert c.recv_until_count(b"\r\n", 200).count(b"STORED") == 200
    time.sleep(1.2)  # `expiring` is gone on both sides by now
    final = wait_converged(pair.active, standby)
    assert b"before-flush" not in final and b"gone" not in final and b"expiring" not in final and b"md" not in final
    assert final[b"s"][:2] == (9, b"cas")
    assert final[b"n"][1] == b"15  ", "incr/decr results ship as the stored bytes"
    assert final[b"big"][1] == big
    assert final[b"bin"][:2] == (13, b"binary+more")
    assert final[b"bcount"][1] == b"40"
    assert final[b"t"][2] > 0 and final[b"later"][2] > 0 and final[b"meta"][2] > 0
    assert final[b"g"][2] == -1, "mg T0 made it permanent"
    assert final[b"vivified"][1] == b"" and final[b"vivified"][2] > 0
    # A flush without delay empties the standby too.
    c.expect(b"flush_all\r\n", b"OK\r\n")
    c.expect(b"set after-flush 0 0 1\r\nx\r\n", b"STORED\r\n")
    assert set(wait_converged(pair.active, standby)) == {b"after-flush"}


def test_sync_mode_acknowledged_writes_are_on_the_standby(start, tmp_path):
    pair = Pair(start, tmp_path, mode="sync")
    standby = pair.standby()
    wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standby to stream")
    wait_for(lambda: repl_stats(pair.active).get("standby_0_state") == "streaming", "the active to see it streaming")
    writer = RawConn(pair.active.host, pair.active.port)
    reader = RawConn(standby.host, standby.port)
    for i in range(300):
        value = b"v%d" % i
        writer.expect(b"set sync:%d 0 0 %d\r\n%s\r\n" % (i, len(value), value), b"STORED\r\n")
        # Acknowledged to the client: it must be readable on the standby right now.
        reader.expect(b"get sync:%d\r\n" % i, b"VALUE sync:%d 0 %d\r\n%s\r\nEND\r\n" % (i, len(value), value))
    # The hold is real, not a race won: with the standby frozen, an acknowledgement does not come (it
    # would at once in async mode); it comes once the standby applies the write.
    os.kill(standby.pid, signal.SIGSTOP)
    try:
        writer.send(b"set frozen 0 0 1\r\nf\r\n")
        assert writer.recv_available(0.3) == b"", "a sync write was acknowledged before the standby had it"
    finally:
        os.kill(standby.pid, signal.SIGCONT)
    assert writer.recv_until(b"\r\n") == b"STORED\r\n"
    reader.expect(b"get frozen\r\n", b"VALUE frozen 0 1\r\nf\r\nEND\r\n")
    # Pipelined writes across both shards are held together and released on the ack.
    writer.send(b"".join(b"set pipe:%d 0 0 1\r\nx\r\n" % i for i in range(100)))
    assert writer.recv_until_count(b"\r\n", 100).count(b"STORED") == 100
    got = values(standby, [b"pipe:%d" % i for i in range(100)])
    assert len(got) == 100
    assert repl_stats(pair.active)["mode"] == "sync"


def test_async_mode_gathers_a_burst_of_writes_into_few_shipments(start, tmp_path):
    """`async_batch_us`: after a shipment the replication core waits that long, so the writes of a burst
    leave together (one wake-up and one send), and still all arrive."""
    pair = Pair(start, tmp_path, mode="async", async_batch_us=100_000)
    standby = pair.standby()
    wait_for(lambda: repl_stats(pair.active).get("standby_0_state") == "streaming", "the active to see the standby streaming")
    before = int(repl_stats(pair.active)["shipments"])
    writer = RawConn(pair.active.host, pair.active.port)
    keys = [b"burst:%d" % i for i in range(100)]
    began = time.monotonic()
    for key in keys:
        # One at a time: unbatched, each would leave in a shipment of its own.
        writer.expect(b"set %s 0 0 2\r\nok\r\n" % key, b"STORED\r\n")
    windows = (time.monotonic() - began) / 0.1
    wait_for(lambda: len(values(standby, keys)) == len(keys), "the writes to reach the standby", timeout=5)
    # The active's report trails its shipments (it is refreshed between batch windows).
    wait_for(lambda: repl_stats(pair.active)["standby_0_unacked_records"] == "0", "the active to see them acked", timeout=5)
    shipped = int(repl_stats(pair.active)["shipments"]) - before
    # The first write leaves at once, the rest once per 100 ms window they span (one more for rounding).
    allowed = 2 + int(windows)
    assert 1 <= shipped <= allowed, f"{len(keys)} writes over {windows:.1f} windows left in {shipped} shipments"


def test_standby_serves_reads_and_refuses_writes(start, tmp_path):
    pair = Pair(start, tmp_path)
    pair.active.raw().expect(b"set k 3 0 2\r\nhi\r\n", b"STORED\r\n")
    standby = pair.standby()
    wait_for(lambda: values(standby, [b"k"]) == {b"k": (3, b"hi")}, "the key on the standby")
    c = standby.raw()
    refused = b"SERVER_ERROR read-only standby\r\n"
    for write in [
        b"set k 0 0 1\r\nx\r\n",
        b"set k 0 0 1 noreply\r\nx\r\n",
        b"add new 0 0 1\r\nx\r\n",
        b"append k 0 0 1\r\nx\r\n",
        b"delete k\r\n",
        b"incr k 1\r\n",
        b"touch k 10\r\n",
        b"gat 10 k\r\n",
        b"flush_all\r\n",
        b"ms k 1\r\nx\r\n",
        b"md k\r\n",
        b"ma k\r\n",
        b"mg k T10 v\r\n",
    ]:
        c.expect(write, refused)
    binary = standby.raw()  # a connection speaks one protocol, chosen by its first byte
    binary.send(binary_request(0x01, b"k", b"x", struct.pack(">II", 0, 0), opaque=7))
    reply = binary.recv_exact(24 + len(b"read-only standby"))
    assert binary_status(reply) == 0x83 and reply[12:16] == struct.pack(">I", 7) and reply.endswith(b"read-only standby")
    # Reads work and change nothing.
    before = metadump(standby)[b"k"]
    c.expect(b"get k\r\n", b"VALUE k 3 2\r\nhi\r\nEND\r\n")
    c.expect(b"mg k v f\r\n", b"VA 2 f3\r\nhi\r\n")
    assert metadump(standby)[b"k"] == before
    assert c.recv_available(0.2) == b""
    assert int(stats(standby)["read_only_refusals"]) == 14
    assert values(pair.active, [b"k"]) == {b"k": (3, b"hi")}


def test_a_standby_cut_off_under_load_resumes_from_the_backlog(start, tmp_path):
    pair = Pair(start, tmp_path)
    standby = pair.standby()
    wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standby to stream")
    with Writer(pair.active, b"load", seconds=30, delay=0.005) as writer:
        wait_for(lambda: writer.count > 2000, "some load")
        # Freeze the standby past the active's peer timeout: the active drops it; on waking it redials.
        os.kill(standby.pid, signal.SIGSTOP)
        time.sleep(1.6)
        os.kill(standby.pid, signal.SIGCONT)
        wait_for(lambda: int(repl_stats(standby)["connects"]) >= 2 and repl_stats(standby)["state"] == "streaming", "the standby to reconnect")
        time.sleep(0.5)
    s = repl_stats(standby)
    assert int(s["partial_syncs"]) >= 1, s
    assert int(s["full_syncs"]) == 1, "only the first connection needed a full sync"
    wait_converged(pair.active, standby)


def test_a_restarted_standby_and_a_late_one_get_a_full_sync_under_load(start, tmp_path):
    pair = Pair(start, tmp_path)
    first = pair.standby(name="first")
    with Writer(pair.active, b"load", seconds=30, delay=0.002) as writer:
        wait_for(lambda: writer.count > 3000, "some load")
        late = pair.standby(name="late")
        first.process.kill()
        first.process.wait(timeout=10)
        restarted = pair.standby(name="first")
        wait_for(lambda: writer.count > 8000, "more load")
    for standby in (late, restarted):
        wait_converged(pair.active, standby)
        assert int(repl_stats(standby)["full_syncs"]) >= 1
    assert int(repl_stats(pair.active)["snapshot_bytes"]) > 0


def memory_file(tmp_path, name):
    """A memory file path on tmpfs when there is one (what -e is for), else in the test's directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        path = os.path.join(shm, f"tandem-test-{os.getpid()}-{tmp_path.name}-{name}")
    else:
        path = str(tmp_path / f"{name}.mem")
    return path


def remove_memory_files(path, shards):
    for shard in range(shards):
        try:
            os.unlink(f"{path}.{shard}")
        except FileNotFoundError:
            pass


def test_a_standby_killed_and_restarted_on_its_memory_file_resumes_partially(start, tmp_path):
    pair = Pair(start, tmp_path)
    mem = memory_file(tmp_path, "standby")
    try:
        standby = pair.standby(name="mem", flags=["-e", mem])
        wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standby to stream")
        assert stats(standby)["memory_backing"] in ("memory_file", "hugepages_file")
        with Writer(pair.active, b"load", seconds=30, delay=0.003) as writer:
            wait_for(lambda: writer.count > 3000, "some load")
            standby.process.kill()
            standby.process.wait(timeout=10)
            at_kill = writer.count
            wait_for(lambda: writer.count > at_kill + 1000, "load while the standby is down")
            restarted = pair.standby(name="mem", flags=["-e", mem])
            wait_for(lambda: repl_stats(restarted)["state"] == "streaming", "the restarted standby to stream")
            wait_for(lambda: writer.count > at_kill + 3000, "load after the restart")
        s = repl_stats(restarted)
        assert (s["full_syncs"], s["partial_syncs"]) == ("0", "1"), f"the restarted standby resumed: {s}"
        a = repl_stats(pair.active)
        assert int(a["partial_syncs"]) == 1 and int(a["full_syncs"]) == 1, f"one full sync (the first), one partial: {a}"
        final = wait_converged(pair.active, restarted)
        assert len(final) > 3000
    finally:
        remove_memory_files(mem, pair.threads)


def test_a_restarted_standby_whose_active_restarted_too_is_refilled_by_a_full_sync(start, tmp_path):
    """The active restarted without a memory file (a new history): the standby's restored contents belong
    to a history it does not know; they are replaced by a full sync, not kept and not stuck."""
    pair = Pair(start, tmp_path)
    mem = memory_file(tmp_path, "orphan")
    try:
        standby = pair.standby(name="mem", flags=["-e", mem])
        wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standby to stream")
        pair.active.raw().expect(b"set old 0 0 1\r\nx\r\n", b"STORED\r\n")
        wait_converged(pair.active, standby)
        for node in (standby, pair.active):
            node.process.kill()
            node.process.wait(timeout=10)
        pair.active = pair.start("--config", str(tmp_path / "active.toml"), "-t", str(pair.threads))
        pair.active.raw().expect(b"set new 0 0 1\r\ny\r\n", b"STORED\r\n")
        restarted = pair.standby(name="mem", flags=["-e", mem])
        wait_for(lambda: repl_stats(restarted)["state"] == "streaming", "the restarted standby to stream")
        s = repl_stats(restarted)
        assert int(s["refused"]) >= 1 and s["full_syncs"] == "1", s
        assert set(wait_converged(pair.active, restarted)) == {b"new"}
    finally:
        remove_memory_files(mem, pair.threads)


def test_three_standbys_one_killed_and_restarted(start, tmp_path):
    pair = Pair(start, tmp_path)
    mems = [memory_file(tmp_path, f"s{i}") for i in range(3)]
    try:
        three_standbys_one_killed_and_restarted(pair, mems)
    finally:
        for mem in mems:
            remove_memory_files(mem, pair.threads)


def three_standbys_one_killed_and_restarted(pair, mems):
    standbys = [pair.standby(name=f"s{i}", flags=["-e", mems[i]]) for i in range(3)]
    for standby in standbys:
        wait_for(lambda: repl_stats(standby)["state"] == "streaming", "every standby to stream")
    with Writer(pair.active, b"three", seconds=30, delay=0.003) as writer:
        wait_for(lambda: writer.count > 2000, "some load")
        standbys[1].process.kill()
        standbys[1].process.wait(timeout=10)
        wait_for(lambda: writer.count > 4000, "load without it")
        standbys[1] = pair.standby(name="s1", flags=["-e", mems[1]])
        wait_for(lambda: writer.count > 6000, "load with it back")
    final = None
    for standby in standbys:
        final = wait_converged(pair.active, standby)
    assert len(final) > 1000
    for untouched in (standbys[0], standbys[2]):
        assert repl_stats(untouched)["connects"] == "1", "the other standbys never lost their link"
    assert repl_stats(pair.active)["standbys"] == "3"
    restarted = repl_stats(standbys[1])
    assert (restarted["full_syncs"], restarted["partial_syncs"]) == ("0", "1"), f"it resumed from its memory file: {restarted}"


def test_bad_peers_are_refused_and_nothing_is_applied(start, tmp_path):
    pair = Pair(start, tmp_path)
    pair.active.raw().expect(b"set k 0 0 1\r\nx\r\n", b"STORED\r\n")
    wrong_secret = pair.standby(secret=b"not-the-pair-secret-at-all", name="wrong")
    other_shards = pair.standby(threads=1, name="other")
    wait_for(lambda: int(repl_stats(wrong_secret)["refused"]) >= 1, "the wrong secret to be refused")
    wait_for(lambda: int(repl_stats(other_shards)["refused"]) >= 1, "the other shard count to be refused")
    # Garbage and a silent half-open connection on the replication port.
    garbage = socket.create_connection(("127.0.0.1", pair.repl_port), timeout=3)
    garbage.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n")
    silent = socket.create_connection(("127.0.0.1", pair.repl_port), timeout=3)
    liar = socket.create_connection(("127.0.0.1", pair.repl_port), timeout=3)
    liar.sendall(struct.pack("<IB", 1 << 30, 1))  # claims a 1 GiB message
    time.sleep(0.5)
    harness.assert_served(pair.active)
    for conn in (garbage, liar):
        conn.settimeout(3)
        try:
            assert conn.recv(100) == b"", "the active closes a peer that lies"
        except ConnectionResetError:
            pass
    a = repl_stats(pair.active)
    assert int(a["refused"]) >= 2, a
    for refused in (wrong_secret, other_shards):
        assert metadump(refused) == {}, "nothing was applied from a refused link"
        assert repl_stats(refused)["state"] in ("connecting", "handshake")
    silent.close()
    harness.assert_served(pair.active)


def test_a_standby_cut_off_during_its_full_sync_converges(start, tmp_path):
    pair = Pair(start, tmp_path, flags=["-m", "1024"])
    c = pair.active.raw()
    value = b"v" * 2000
    for start_index in range(0, 100_000, 1000):
        c.send(b"".join(b"set big:%d 0 0 %d noreply\r\n%s\r\n" % (i, len(value), value) for i in range(start_index, start_index + 1000)))
    c.expect(b"mn\r\n", b"MN\r\n")
    standby = pair.standby()
    wait_for(lambda: int(repl_stats(pair.active)["snapshot_bytes"]) > 0, "the snapshot to start", timeout=10)
    os.kill(standby.pid, signal.SIGSTOP)
    time.sleep(1.6)
    os.kill(standby.pid, signal.SIGCONT)
    with Writer(pair.active, b"during", seconds=20, delay=0.01) as writer:
        wait_for(lambda: int(repl_stats(standby)["connects"]) >= 2, "the standby to reconnect")
        wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standby to stream again")
        wait_for(lambda: writer.count > 500, "writes after the reconnect")
    final = wait_converged(pair.active, standby, timeout=60)
    assert len(final) > 100_000


def failover_standby_and_another(start, tmp_path):
    """An active in sync mode; standby b with failover (it promotes when the active dies and then ships
    from `promoted_port`), and standby c without, which knows both. Returns once both stream."""
    pair = Pair(start, tmp_path, mode="sync")
    promoted_port = harness.free_port()
    state = tmp_path / "state-b"
    config = write_config(
        tmp_path, "b", role="standby", listen=f"127.0.0.1:{promoted_port}", peers=[f"127.0.0.1:{pair.repl_port}"], mode="sync"
    )
    config.write_text(
        config.read_text()
        + f'[failover]\nservice_ip = "10.254.254.1/32"\ninterface = "tnd-absent0"\nstate_dir = "{state}"\n'
    )
    b = start("--config", str(config), "-t", "2")
    c_config = write_config(tmp_path, "c", role="standby", peers=[f"127.0.0.1:{pair.repl_port}", f"127.0.0.1:{promoted_port}"])
    c = start("--config", str(c_config), "-t", "2")
    for standby in (b, c):
        wait_for(lambda: repl_stats(standby)["state"] == "streaming", "the standbys to stream")
    return pair, b, c, promoted_port, state


def test_a_failover_standby_promotes_when_its_active_dies_and_the_others_follow_it(start, tmp_path):
    """Promotion on loopback (the service address part is tested in test_failover.py, in namespaces)."""
    pair, b, c, promoted_port, state = failover_standby_and_another(start, tmp_path)
    writer = RawConn(pair.active.host, pair.active.port)
    for i in range(200):
        writer.expect(b"set before:%d 0 0 1\r\nx\r\n" % i, b"STORED\r\n")
    pair.active.process.kill()
    killed = time.monotonic()
    w = RawConn(b.host, b.port)
    deadline = time.monotonic() + 10
    while True:
        w.send(b"set after 0 0 1\r\ny\r\n")
        if w.recv_until(b"\r\n") == b"STORED\r\n":
            break
        assert time.monotonic() < deadline, "the standby never took writes"
        time.sleep(0.01)
    took_ms = (time.monotonic() - killed) * 1000
    s = repl_stats(b)
    assert s["role"] == "active" and s["epoch"] == "2", s
    assert "promoted" in s["last_role_change"] and "NOT_claimed" in s["last_role_change"], s
    assert (state / "epoch").read_text().split() == ["2", "active"], "the new epoch and role are on disk"
    assert len(values(b, [b"before:%d" % i for i in range(200)])) == 200, "every write acknowledged in sync mode survived"
    # The other standby finds the new active, resumes from its history without a second full sync.
    wait_for(lambda: repl_stats(c)["active"] == f"127.0.0.1:{promoted_port}" and repl_stats(c)["state"] == "streaming", "c to follow b")
    try:
        final = wait_converged(b, c)
    except BaseException:
        # Once in a CI run c streamed from b but never got `after` (a write mailed to a worker still in the
        # round it began as a standby; see the test below): if it happens again, say what each saw.
        for name, server in (("b", b), ("c", c)):
            print(f"--- {name}: {repl_stats(server)}\n{server.log_path.read_text(errors='replace')[-4000:]}")
        raise
    assert b"after" in final
    cs = repl_stats(c)
    assert cs["full_syncs"] == "1" and int(cs["partial_syncs"]) >= 1 and cs["epoch"] == "2", cs
    print(f"\npromotion on loopback: kill -> first write on the standby {took_ms:.0f} ms")


def test_every_write_a_promoted_standby_acknowledges_at_the_promotion_reaches_the_other_standby(start, tmp_path):
    """Eight clients write to standby b as fast as it answers while its active dies: refused while b is a
    standby, taken once it promoted. Each acknowledged write must reach standby c, which then follows b.
    Before the fix, the first write of a client sometimes ran on a shard whose worker had not yet taken
    its new log (the request was mailed from the worker that took the client's connection, and the
    owner was still in the round it began as a standby): stored on b, never shipped (3 runs of 6)."""
    pair, b, c, promoted_port, state = failover_standby_and_another(start, tmp_path)
    stored = [[] for _ in range(8)]
    stop = threading.Event()

    def hammer(me):
        w = RawConn(b.host, b.port)
        i = 0
        while not stop.is_set():
            key = b"race:%d:%d" % (me, i)
            w.send(b"set %s 0 0 1\r\nv\r\n" % key)
            if w.recv_until(b"\r\n") == b"STORED\r\n":
                stored[me].append(key)
                i += 1

    clients = [threading.Thread(target=hammer, args=(me,)) for me in range(8)]
    for t in clients:
        t.start()
    pair.active.process.kill()
    time.sleep(1.0)
    stop.set()
    for t in clients:
        t.join()
    keys = [k for s in stored for k in s]
    assert keys, "b never took a write"
    wait_for(lambda: repl_stats(c)["active"] == f"127.0.0.1:{promoted_port}" and repl_stats(c)["state"] == "streaming", "c to follow b")
    deadline = time.monotonic() + 10
    while True:
        have = values(c, keys)
        missing = [k for k in keys if k not in have]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, f"{len(missing)} of {len(keys)} acknowledged writes never reached c: {missing[:5]}"


def test_a_standby_refuses_an_active_with_a_lower_epoch(start, tmp_path):
    """A standby that knows epoch 5 (from its failover state) will not follow an active still at epoch 0:
    that active is stale (another node took over after it). Nothing is applied from it."""
    pair = Pair(start, tmp_path)
    pair.active.raw().expect(b"set k 0 0 1\r\nx\r\n", b"STORED\r\n")
    state = tmp_path / "state-newer"
    state.mkdir()
    (state / "epoch").write_text("5\n")
    config = write_config(tmp_path, "newer", role="standby", peers=[f"127.0.0.1:{pair.repl_port}"], peer_timeout_ms=1000)
    # The failover table gives the standby its persisted epoch; the address is never claimed (the
    # standby never synced, so it never promotes) and is not on loopback, so nothing is removed.
    with open(config, "a") as f:
        f.write(f'[failover]\nservice_ip = "127.0.99.1/32"\ninterface = "lo"\nstate_dir = "{state}"\n')
    newer = start("--config", str(config), "-t", "2")
    wait_for(lambda: int(repl_stats(newer)["refused"]) >= 1, "the stale active to be refused")
    time.sleep(1)
    stats = repl_stats(newer)
    assert "LowerEpoch" in stats["last_error"], stats
    assert int(stats["refused"]) <= 10, f"a refused standby asks again after a pause, not in a tight loop: {stats}"
    assert metadump(newer) == {}, "nothing was applied from the stale active"
    assert (state / "epoch").read_text().strip() == "5", "the standby's epoch did not go backwards"
    harness.assert_served(pair.active)
