"""A pair replicating over RDMA: two appliances (TCG) on a bridge, Soft-RoCE on their NICs (rxe_netdev=auto
in the identity, tandem-rdma.service), tandemd's [replication] transport = "rdma" and mode = "sync"
(transport=rdma, mode=sync in the identity). The active writes the data stream one-sided into the
standby's ring; handshake, acks and heartbeats stay on the TCP control connection.

One booted pair serves every test, in order: the stream runs over RDMA and a workload of every mutation
kind leaves the standby equal to the active, key by key; in sync mode every acknowledged write is on the
standby when the client hears of it; faults (a wrong rkey, the queue pair forced into the error state, the
standby's tandemd killed mid-stream) are reported in `stats replication`, nothing corrupt is applied, the
standby reconnects and converges (a partial resync after a link fault, a full one after the kill); in
async mode (the pair's tandemd restarted with mode=async, then back to sync: no boot) the active answers
writes while the standby is frozen and the standby converges once thawed; with two shards (threads = 2
from then on) each shard is acked and every acknowledged write is on the standby; a second standby
(another tandemd on B's guest) gets its own queue pair and ring and both equal the active; last, the active's VM
is killed and the standby takes the service address with the data. Under TCG this asserts correctness
only, never speed (bench_rdma_standby_cpu.py measures CPU per record, when asked).

The image's tandemd must be built with the `rdma` feature (tests/run-all.sh builds it so when libibverbs
is installed); an image without it is a failure in CI and a skip, with the reason, elsewhere.
"""

import subprocess
import time

import pytest

from appliance import MEMCACHED_PORT, Identity, Network, Pair, kill_and_wait_for_service, memcached_call
from harness import skip_unless

SECRET = "rdma-pair-secret-for-the-ci-run-0123"
SERVICE_IP = "10.77.0.130"
PAIR = {
    "secret": SECRET,
    "service_ip": f"{SERVICE_IP}/24",
    # TCG guests stall for hundreds of ms at a time: see test_pair.py.
    "heartbeat_ms": "100",
    "dead_after_ms": "2000",
    "mode": "sync",
    "transport": "rdma",
    "rxe_netdev": "auto",
}
A = Identity(hostname="rdma-a", address="10.77.0.31/24", role="active", peer="10.77.0.32", extra=PAIR)
B = Identity(hostname="rdma-b", address="10.77.0.32/24", role="standby", peer="10.77.0.31", extra=PAIR)


def stats(pair, box, port=MEMCACHED_PORT) -> dict:
    reply = memcached_call(pair.net, box.identity.ip, b"stats replication\r\n", port=port).decode()
    return dict(line.split(" ", 2)[1:] for line in reply.splitlines() if line.startswith("STAT "))


def journal(box, unit="tandemd", lines=40) -> str:
    return box.sh(f"journalctl -b -u {unit} -n {lines} --no-pager -o cat").out


def wait_streaming_over_rdma(pair, timeout=120, transport="rdma") -> tuple[dict, dict]:
    """Waits until the standby streams from the active over `transport`; returns both's stats."""
    a, b = pair.members[:2]
    deadline = time.monotonic() + timeout
    while True:
        try:
            active, standby = stats(pair, a), stats(pair, b)
        except OSError:
            # A tandemd restarting (killed by a test) refuses connections for a moment.
            assert time.monotonic() < deadline, (journal(a), journal(b))
            time.sleep(1)
            continue
        if (standby.get("state") == "streaming" and standby.get("transport") == transport
                and active.get("standby_0_transport") == transport and active.get("standby_0_state") == "streaming"):
            return active, standby
        assert time.monotonic() < deadline, (active, standby, journal(a), journal(b))
        time.sleep(1)


@pytest.fixture(scope="module")
def pair(image_dir):
    net = Network("rdmapair")
    try:
        pair = Pair(net, A, B)
        try:
            started = time.monotonic()
            states = pair.wait_up()
            print(f"\nRDMA pair booted to {states} in {time.monotonic() - started:.0f} s (TCG)")
            for box in pair.members:
                skip_unless("built without" not in journal(box, lines=200),
                            "the image's tandemd was built without the rdma feature (tests/run-all.sh builds it with it)")
                rdma = box.sh("systemctl is-active tandem-rdma; journalctl -b -u tandem-rdma -o cat --no-pager").out
                assert rdma.startswith("active"), (box.name, rdma)
            yield pair
        finally:
            pair.close()
    finally:
        net.close()


def workload(prefix: str) -> bytes:
    """Every mutation kind the text protocol has, with a large value split across ring slots."""
    big = b"B" * 300_000
    parts = [b"set %s-big 5 0 %d\r\n%s\r\n" % (prefix.encode(), len(big), big)]
    for i in range(60):
        k = b"%s-%d" % (prefix.encode(), i)
        parts.append(b"set %s %d 0 4\r\nv%03d\r\n" % (k, i, i))
    for i in range(0, 60, 5):
        k = b"%s-%d" % (prefix.encode(), i)
        parts += [b"append %s 0 0 2\r\n+a\r\n" % k, b"prepend %s 0 0 2\r\np+\r\n" % k]
    for i in range(1, 60, 7):
        parts.append(b"delete %s-%d\r\n" % (prefix.encode(), i))
    parts += [
        b"set %s-n 0 0 2\r\n10\r\n" % prefix.encode(),
        b"incr %s-n 32\r\n" % prefix.encode(),
        b"decr %s-n 2\r\n" % prefix.encode(),
        b"add %s-add 0 0 1\r\na\r\n" % prefix.encode(),
        b"replace %s-2 7 0 1\r\nr\r\n" % prefix.encode(),
        b"touch %s-3 3600\r\n" % prefix.encode(),
        b"set %s-ttl 0 3600 1\r\nt\r\n" % prefix.encode(),
    ]
    return b"".join(parts)


def contents(pair, box, port=MEMCACHED_PORT) -> dict:
    """key -> (flags, value, exp) of every live item: keys from `lru_crawler metadump all`, then gets."""
    dump = memcached_call(pair.net, box.identity.ip, b"lru_crawler metadump all\r\n", timeout=30, port=port).decode()
    items = {}
    for line in dump.splitlines():
        if not line.startswith("key="):
            continue
        fields = dict(part.split("=", 1) for part in line.split())
        items[fields["key"]] = fields["exp"]
    got = {}
    keys = sorted(items)
    for start in range(0, len(keys), 50):
        chunk = keys[start:start + 50]
        reply = memcached_call(pair.net, box.identity.ip, b"get " + " ".join(chunk).encode() + b"\r\n", timeout=30, port=port)
        rest = reply
        while rest.startswith(b"VALUE "):
            header, rest = rest.split(b"\r\n", 1)
            _, key, flags, length = header.split(b" ")
            value, rest = rest[:int(length)], rest[int(length) + 2:]
            got[key.decode()] = (int(flags), value, items[key.decode()])
    return got


def converge(pair, timeout=180, port=MEMCACHED_PORT) -> dict:
    """Waits until the standby (the tandemd on B listening on `port`) holds what the active holds."""
    a, b = pair.members[:2]
    deadline = time.monotonic() + timeout
    while True:
        want, have = contents(pair, a), contents(pair, b, port)
        if want == have:
            return want
        missing = sorted(set(want) - set(have))[:5]
        differ = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:5]
        assert time.monotonic() < deadline, (missing, differ, stats(pair, b, port), journal(b))
        time.sleep(2)


def test_the_stream_runs_over_rdma_and_the_standby_equals_the_active(pair):
    a, b = pair.members
    active, standby = wait_streaming_over_rdma(pair)
    assert active["transport"] == "rdma" and active["mode"] == "sync", active
    assert memcached_call(pair.net, a.identity.ip, workload("w1"), timeout=60).count(b"SERVER_ERROR") == 0
    held = converge(pair)
    assert len(held) > 50 and held["w1-big"][1] == b"B" * 300_000 and held["w1-n"][1] == b"40", sorted(held)[:10]
    active, standby = stats(pair, a), stats(pair, b)
    print(f"\nactive: {active}\nstandby: {standby}")
    assert int(active["standby_0_rdma_writes_posted"]) > 0 and int(active["standby_0_rdma_errors"]) == 0, active
    assert int(standby["rdma_slots"]) > 0 and int(standby["rdma_doorbells"]) > 0, standby
    assert int(standby["rdma_errors"]) == 0, standby


def test_sync_mode_every_acknowledged_write_is_on_the_standby(pair):
    a, b = pair.members
    wait_streaming_over_rdma(pair)
    for i in range(20):
        assert memcached_call(pair.net, a.identity.ip, b"set sync-%d 0 0 3\r\ns%02d\r\n" % (i, i)) == b"STORED\r\n"
        # The client heard STORED: the standby applied it already.
        got = memcached_call(pair.net, b.identity.ip, b"get sync-%d\r\n" % i)
        assert got == b"VALUE sync-%d 0 3\r\ns%02d\r\nEND\r\n" % (i, i), (i, got, stats(pair, a), stats(pair, b), journal(a), journal(b))


def inject(pair, fault: str) -> None:
    a = pair.members[0]
    # Written aside and renamed into place: tandemd never sees the file half-written.
    a.sh(f"echo {fault} > /var/lib/tandem/rdma-fault.new && mv /var/lib/tandem/rdma-fault.new /var/lib/tandem/rdma-fault").check()


def writes_during(pair, prefix: str, count: int = 40) -> None:
    a = pair.members[0]
    for i in range(count):
        memcached_call(pair.net, a.identity.ip, b"set %s-%d 0 0 5\r\nf%04d\r\n" % (prefix.encode(), i, i), timeout=30)


# A QP forced into the error state fails its next work request: flushed, or refused at posting (rxe's
# choice depends on the kernel), so only the wrong rkey's completion status is asserted by name.
@pytest.mark.parametrize("fault, named", [("wrong_rkey", "remote access error"), ("qp_error", None)])
def test_a_fault_on_the_link_is_reported_and_the_standby_resyncs(pair, fault, named):
    a, b = pair.members
    wait_streaming_over_rdma(pair)
    before_active, before_standby = stats(pair, a), stats(pair, b)
    inject(pair, fault)
    deadline = time.monotonic() + 60
    while int(stats(pair, a)["link_failures"]) == int(before_active["link_failures"]):
        assert time.monotonic() < deadline, (stats(pair, a), journal(a))
        writes_during(pair, f"{fault}-pre", 5)
    writes_during(pair, fault)
    after_active = stats(pair, a)
    print(f"\nafter {fault}: {after_active['last_link_error']}")
    assert after_active["last_link_error"] != "none", after_active
    if named:
        assert named.replace(" ", "_") in after_active["last_link_error"], after_active
    assert "injecting an RDMA fault" in journal(a, lines=400)
    active, standby = wait_streaming_over_rdma(pair)
    assert int(standby["connects"]) > int(before_standby["connects"]), standby
    # The standby kept what it applied: it resumes every shard where it stopped (a partial resync).
    assert int(standby["partial_syncs"]) > int(before_standby["partial_syncs"]), (before_standby, standby)
    assert standby["full_syncs"] == before_standby["full_syncs"], (before_standby, standby)
    held = converge(pair)
    assert held[f"{fault}-39"][1] == b"f0039"
    # A link fault is not a dead active: the standby never promoted beside it.
    assert (stats(pair, a)["role"], stats(pair, b)["role"]) == ("active", "standby")
    assert stats(pair, b)["promotions"] == before_standby["promotions"] == "0", stats(pair, b)


def test_the_standby_killed_mid_stream_restarts_resyncs_and_converges(pair):
    a, b = pair.members
    wait_streaming_over_rdma(pair)
    big = b"K" * 200_000
    stream = b"".join(b"set kill-%d 0 0 %d\r\n%s\r\n" % (i, len(big), big) for i in range(20))
    writer = subprocess.Popen(pair.net.cmd("python3", "-c", (
        "import socket,sys\n"
        f"s=socket.create_connection(({a.identity.ip!r},11211),timeout=120)\n"
        "s.sendall(sys.stdin.buffer.read()+b'quit\\r\\n')\n"
        "while s.recv(65536): pass\n")), stdin=subprocess.PIPE)
    writer.stdin.write(stream)
    writer.stdin.close()
    time.sleep(1)
    b.sh("systemctl kill -s KILL tandemd").check()
    writer.wait(timeout=180)
    active, standby = wait_streaming_over_rdma(pair, timeout=180)
    held = converge(pair)
    assert held["kill-19"][1] == big
    # A new process with empty memory: nothing to resume, a full resync.
    assert int(standby["full_syncs"]) >= 1, standby


def reconfigure(pair, threads: int | None = None, **identity) -> None:
    """Restarts the pair's tandemd processes with identity keys changed (mode=, transport=; tandemd.service
    composes its configuration from /run/tandem/identity at every start) and, given `threads`, that many
    shards ([server] threads in /etc/tandem/tandem.toml). The standby's is stopped first, so it cannot
    take over while the active's restarts; the standby then starts cold and full-syncs. The guests, their
    Soft-RoCE links and their addresses stay as they are: no boot."""
    a, b = pair.members[:2]
    b.sh("systemctl stop tandemd", timeout=120).check()
    for box in (a, b):
        for key, value in identity.items():
            box.sh(f"grep -q '^{key}=' /run/tandem/identity && sed -i 's/^{key}=.*/{key}={value}/' /run/tandem/identity").check()
        if threads:
            box.sh(f"sed -i '/^threads = /d; /^\\[server\\]$/a threads = {threads}' /etc/tandem/tandem.toml && "
                   f"grep -qx 'threads = {threads}' /etc/tandem/tandem.toml").check()
    a.sh("systemctl restart tandemd", timeout=180).check()
    b.sh("systemctl start tandemd", timeout=180).check()


def applied(standby: dict) -> int:
    """Records a standby has applied, over every shard."""
    return sum(int(n) for n in standby["applied"].split(","))


def test_async_mode_over_rdma_the_active_answers_ahead_of_the_standby_which_converges(pair):
    a, b = pair.members
    reconfigure(pair, mode="async")
    try:
        active, standby = wait_streaming_over_rdma(pair)
        assert (active["mode"], active["transport"], standby["transport"]) == ("async", "rdma", "rdma"), (active, standby)
        assert memcached_call(pair.net, a.identity.ip, workload("as1"), timeout=60).count(b"SERVER_ERROR") == 0
        held = converge(pair)
        assert held["as1-big"][1] == b"B" * 300_000 and held["as1-n"][1] == b"40", sorted(held)[:10]
        before_active, before_standby = stats(pair, a), stats(pair, b)
        # Async: the active answers writes its standby has not applied. The standby's tandemd is frozen
        # (SIGSTOP, well under dead_after_ms): no acks come back, yet every write is answered, and the
        # active counts them in its loss window; thawed, the standby applies them from its ring.
        frozen = b"".join(b"set frozen-%d 0 0 4\r\nz%03d\r\n" % (i, i) for i in range(50))
        b.sh("systemctl kill -s STOP tandemd").check()
        try:
            reply = memcached_call(pair.net, a.identity.ip, frozen, timeout=20)
            during = stats(pair, a)
        finally:
            b.sh("systemctl kill -s CONT tandemd").check()
        assert reply == b"STORED\r\n" * 50, reply[:200]
        # Answered while the standby still counted as streaming and had acked none of them: sync mode
        # could only have answered once it gave the standby up (its peer timeout, at least dead_after_ms)
        # and degraded to async.
        assert during["standby_0_state"] == "streaming" and int(during["loss_window_records"]) >= 50, during
        held = converge(pair)
        assert all(held[f"frozen-{i}"][1] == b"z%03d" % i for i in range(50))
        active, standby = stats(pair, a), stats(pair, b)
        print(f"\nasync: active {active}\nstandby {standby}")
        assert active["standby_0_transport"] == "rdma" and standby["transport"] == "rdma", (active, standby)
        assert int(active["standby_0_rdma_writes_posted"]) > int(before_active["standby_0_rdma_writes_posted"]), active
        assert int(active["standby_0_rdma_errors"]) == 0 and int(standby["rdma_errors"]) == 0, (active, standby)
        assert int(standby["rdma_slots"]) > int(before_standby["rdma_slots"]), standby
        assert applied(standby) >= applied(before_standby) + 50, standby
        # Acked again: nothing of the answered writes is at risk any more.
        deadline = time.monotonic() + 30
        while int(stats(pair, a)["loss_window_records"]) != 0:
            assert time.monotonic() < deadline, stats(pair, a)
            time.sleep(1)
    finally:
        reconfigure(pair, mode="sync")
        active, _ = wait_streaming_over_rdma(pair)
        assert active["mode"] == "sync", active


def test_two_shards_over_rdma_each_shard_acks_and_every_acknowledged_write_is_on_the_standby(pair):
    """From here on the pair runs two shards (threads = 2 on each guest's one vCPU): one log, one ring
    stream position and one ack per shard."""
    a, b = pair.members
    reconfigure(pair, threads=2)
    active, standby = wait_streaming_over_rdma(pair)
    assert active["mode"] == "sync" and len(active["newest"].split(",")) == len(standby["applied"].split(",")) == 2, (active, standby)
    before = [int(n) for n in standby["applied"].split(",")]
    for i in range(40):
        assert memcached_call(pair.net, a.identity.ip, b"set shard-%d 0 0 3\r\nh%02d\r\n" % (i, i)) == b"STORED\r\n"
        got = memcached_call(pair.net, b.identity.ip, b"get shard-%d\r\n" % i)
        assert got == b"VALUE shard-%d 0 3\r\nh%02d\r\nEND\r\n" % (i, i), (i, got, stats(pair, a), stats(pair, b))
    assert memcached_call(pair.net, a.identity.ip, workload("sh"), timeout=60).count(b"SERVER_ERROR") == 0
    held = converge(pair)
    assert held["sh-big"][1] == b"B" * 300_000 and held["sh-n"][1] == b"40"
    # Both shards logged and shipped: each advanced on the standby, and the active holds an ack for each
    # at its newest record.
    deadline = time.monotonic() + 30
    while True:
        active, standby = stats(pair, a), stats(pair, b)
        after = [int(n) for n in standby["applied"].split(",")]
        if active["standby_0_acked"] == active["newest"] == standby["applied"]:
            break
        assert time.monotonic() < deadline, (active, standby)
        time.sleep(1)
    assert all(now > then for now, then in zip(after, before)), (before, after)
    assert int(active["standby_0_rdma_errors"]) == 0 and int(standby["rdma_errors"]) == 0, (active, standby)


SECOND_PORT = 11212
SECOND_STANDBY = """[server]
listen = "{B.ip}"
port = {SECOND_PORT}
memory_mb = 64
threads = {threads}
[replication]
role = "standby"
listen = "{B.ip}:11312"
peers = ["{A.ip}:11311"]
secret_file = "/run/tandem/secret"
transport = "rdma"
"""


def test_two_standbys_over_rdma_each_get_their_own_ring_and_both_equal_the_active(pair):
    """A second standby: another tandemd on B's guest (its own port, no failover), as a third guest would
    be but without a boot; the active ships to both, each over its own queue pair and ring."""
    a, b = pair.members
    active, _ = wait_streaming_over_rdma(pair)
    # As many shards as the active (the handshake refuses another count).
    second = SECOND_STANDBY.format(B=B, A=A, SECOND_PORT=SECOND_PORT, threads=len(active["newest"].split(",")))
    b.sh(f"cat > /run/tandem/second.toml <<'EOF'\n{second}EOF\n"
         "systemd-run --unit tandem-second /usr/bin/tandemd --config /run/tandem/second.toml").check()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                active, second = stats(pair, a), stats(pair, b, SECOND_PORT)
            except OSError:
                active, second = {}, {}
            if (active.get("standbys") == "2" and active.get("standby_1_state") == "streaming"
                    and second.get("state") == "streaming"):
                break
            assert time.monotonic() < deadline, (active, second, journal(b, "tandem-second"))
            time.sleep(1)
        assert (active["standby_0_transport"], active["standby_1_transport"], second["transport"]) == ("rdma",) * 3, active
        before = stats(pair, a)
        assert memcached_call(pair.net, a.identity.ip, workload("two"), timeout=60).count(b"SERVER_ERROR") == 0
        held = converge(pair)
        assert converge(pair, port=SECOND_PORT) == held and held["two-big"][1] == b"B" * 300_000
        active, first, second = stats(pair, a), stats(pair, b), stats(pair, b, SECOND_PORT)
        print(f"\ntwo standbys: active {active}\nsecond {second}")
        for i in range(2):
            assert int(active[f"standby_{i}_rdma_writes_posted"]) > int(before[f"standby_{i}_rdma_writes_posted"]), active
            assert int(active[f"standby_{i}_rdma_errors"]) == 0, active
        assert int(second["rdma_slots"]) > 0 and int(second["rdma_errors"]) == 0 and int(second["full_syncs"]) >= 1, second
        # Both applied every record the active logged (their reports lag by up to 50 ms).
        deadline = time.monotonic() + 30
        while not (first["applied"] == second["applied"] == active["newest"]):
            assert time.monotonic() < deadline, (active["newest"], first["applied"], second["applied"])
            time.sleep(1)
            active, first, second = stats(pair, a), stats(pair, b), stats(pair, b, SECOND_PORT)
    finally:
        b.sh("systemctl stop tandem-second; systemctl reset-failed tandem-second", timeout=60)
    # The first standby streams on, alone.
    wait_streaming_over_rdma(pair)


def test_killing_the_active_vm_moves_the_service_ip_and_its_data_to_the_standby(pair):
    a, b = pair.members
    wait_streaming_over_rdma(pair)
    keys = range(30)
    writes = b"".join(b"set fo-%d 0 0 4\r\nv%03d\r\n" % (i, i) for i in keys)
    assert memcached_call(pair.net, SERVICE_IP, writes) == b"STORED\r\n" * len(keys)
    want = b"".join(b"VALUE fo-%d 0 4\r\nv%03d\r\n" % (i, i) for i in keys) + b"END\r\n"
    get_all = b"get " + b" ".join(b"fo-%d" % i for i in keys) + b"\r\n"
    # Sync mode: acknowledged, so already on the standby.
    assert memcached_call(pair.net, b.identity.ip, get_all) == want
    took = kill_and_wait_for_service(pair.net, a, b, SERVICE_IP, get_all, want)
    print(f"\nservice address answered from the standby with every key {took:.1f} s after the kill")
    assert stats(pair, b)["role"] == "active"
    assert memcached_call(pair.net, SERVICE_IP, b"set after 0 0 2\r\nok\r\n") == b"STORED\r\n"
