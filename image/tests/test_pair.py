"""Two appliances booted together as a pair, of one build with no identity baked in: A boots the kernel,
initrd and root filesystem directly with its identity on the kernel command line, B the GPT disk through
UEFI with its identity on a config drive. Each must take its own name, address and role, serve memcached at
its address, and reach its peer; A, the active, holds the service address and replicates to B, the
standby, which serves reads and refuses writes. Last, A's VM is killed (kill -9 of its qemu): B must take
over the service address and answer there with the data written before; and A, booted again with the
same identity, must find B active and rejoin as its standby without taking the address back.
"""

import subprocess
import time

import pytest

from appliance import Identity, Network, Pair, kill_and_wait_for_service, memcached_call
from memccapable import assert_memccapable_passes

SECRET = "pair-secret-for-the-ci-run-0123456789"
SERVICE_IP = "10.77.0.100"
# Failover timing for TCG guests, whose clocks stall for hundreds of ms at a time: tandemd's defaults
# (25 ms heartbeats, dead after 150 ms) would let a busy standby promote itself beside a live active.
PAIR = {"secret": SECRET, "service_ip": f"{SERVICE_IP}/24", "heartbeat_ms": "100", "dead_after_ms": "2000"}
A = Identity(hostname="tandem-a", address="10.77.0.11/24", role="active", peer="10.77.0.12", extra=PAIR)
B = Identity(hostname="tandem-b", address="10.77.0.12/24", role="standby", peer="10.77.0.11", extra=PAIR)
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


@pytest.fixture(scope="module")
def pair(image_dir):
    net = Network("pair")
    try:
        pair = Pair(net, A, B)
        try:
            started = time.monotonic()
            states = pair.wait_up()
            print(f"\npair booted (A direct, B UEFI; TCG) to {states} in {time.monotonic() - started:.0f} s")
            yield pair
        finally:
            pair.close()
    finally:
        net.close()


@pytest.mark.parametrize("member, identity, source", [(0, A, "kernel command line"), (1, B, "config drive")])
def test_each_member_takes_its_identity(pair, member, identity, source):
    box = pair.members[member]
    assert box.sh("hostname").out.strip() == identity.hostname
    assert f"inet {identity.address} " in box.sh("ip -4 -o addr show").out
    kept = box.sh("cat /run/tandem/identity").check().out
    for key, value in identity.items():
        if key != "secret":
            assert f"{key}={value}\n" in kept, kept
    assert "secret" not in kept
    # The secret: for tandemd's group only.
    assert box.sh("stat -c '%a %U %G' /run/tandem/secret").out.split() == ["640", "root", "tandem"]
    assert box.sh("cat /run/tandem/secret").out.strip() == SECRET
    assert source in box.sh("journalctl -b -u tandem-identity -o cat --no-pager").out
    # Kept for the next boot, should the identity not be given again.
    assert box.sh("grep -v '^#' /etc/tandem/identity").out == box.sh("grep -v '^#' /run/tandem/identity").out


def test_each_member_serves_at_its_address(pair):
    a, b = pair.members
    for box in (a, b):
        assert box.sh("systemctl is-active tandemd").out.strip() == "active"
        assert memcached_call(pair.net, box.identity.ip, b"version\r\n").startswith(b"VERSION ")
    # The active takes every command; the standby only reads (its writes come from the active).
    assert_memccapable_passes(pair.net, a.identity.ip)


def stats_replication(pair, box) -> dict:
    reply = memcached_call(pair.net, box.identity.ip, b"stats replication\r\n").decode()
    return dict(line.split(" ", 2)[1:] for line in reply.splitlines() if line.startswith("STAT "))


def test_the_active_replicates_to_the_standby(pair):
    a, b = pair.members
    assert stats_replication(pair, a)["role"] == "active"
    standby = stats_replication(pair, b)
    assert standby["role"] == "standby" and standby["active"] == "10.77.0.11:11311", standby
    writes = b"".join(b"set pair-%d 0 0 6\r\nvalue%d\r\n" % (i, i % 10) for i in range(100))
    assert memcached_call(pair.net, a.identity.ip, writes) == b"STORED\r\n" * 100
    want = b"".join(b"VALUE pair-%d 0 6\r\nvalue%d\r\n" % (i, i % 10) for i in range(100)) + b"END\r\n"
    get_all = b"get " + b" ".join(b"pair-%d" % i for i in range(100)) + b"\r\n"
    deadline = time.monotonic() + 60
    while (got := memcached_call(pair.net, b.identity.ip, get_all)) != want and time.monotonic() < deadline:
        time.sleep(1)
    assert got == want, (got[:200], stats_replication(pair, b))
    # The standby serves reads and refuses writes.
    assert memcached_call(pair.net, b.identity.ip, b"set pair-0 0 0 1\r\nx\r\n") == b"SERVER_ERROR read-only standby\r\n"
    print(f"replicated: {stats_replication(pair, a)}")


def test_members_reach_each_other_over_the_pair_network(pair):
    a, b = pair.members
    assert memcached_call(pair.net, a.identity.ip, b"set who 0 0 1\r\na\r\n") == b"STORED\r\n"
    # From each member, a TCP connection to its peer's tandemd reads what A holds.
    for box in (a, b):
        reply = box.exec(["/bin/bash", "-c", f"exec 3<>/dev/tcp/{box.identity.peer}/11211; printf 'get who\\r\\nquit\\r\\n' >&3; cat <&3"],
                         timeout=30).check().out
        assert reply.startswith("VALUE who 0 1\r\na\r\n"), reply


def test_only_failover_gets_capabilities_and_only_the_two_it_needs(pair):
    for box in pair.members:
        pid = box.sh("systemctl show -p MainPID --value tandemd").check().out.strip()
        status = box.sh(f"grep -E '^Cap(Eff|Bnd|Amb)' /proc/{pid}/status").check().out
        caps = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()}
        want = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
        assert caps == {"CapEff": want, "CapBnd": want, "CapAmb": want}, (box.name, status)


def test_killing_the_active_vm_moves_the_service_ip_and_its_data_to_the_standby(pair):
    a, b = pair.members
    assert f"inet {SERVICE_IP}/24 " in a.sh("ip -4 -o addr show").out, "the active holds the service address"
    assert f"inet {SERVICE_IP}/24 " not in b.sh("ip -4 -o addr show").out
    keys = range(50)
    writes = b"".join(b"set fo-%d 0 0 4\r\nv%03d\r\n" % (i, i) for i in keys)
    assert memcached_call(pair.net, SERVICE_IP, writes) == b"STORED\r\n" * len(keys)
    want = b"".join(b"VALUE fo-%d 0 4\r\nv%03d\r\n" % (i, i) for i in keys) + b"END\r\n"
    get_all = b"get " + b" ".join(b"fo-%d" % i for i in keys) + b"\r\n"
    deadline = time.monotonic() + 60
    while memcached_call(pair.net, b.identity.ip, get_all) != want:
        assert time.monotonic() < deadline, "the standby never caught up"
        time.sleep(0.5)

    took = kill_and_wait_for_service(pair.net, a, b, SERVICE_IP, get_all, want)
    print(f"\nservice address answered from the standby with every key {took:.1f} s after the kill")
    replication = stats_replication(pair, b)
    assert replication["role"] == "active", replication
    assert memcached_call(pair.net, SERVICE_IP, b"set after 0 0 2\r\nok\r\n") == b"STORED\r\n"
    assert f"inet {SERVICE_IP}/24 " in b.sh("ip -4 -o addr show").out


def test_the_old_active_boots_again_and_rejoins_as_standby(pair):
    a, b = pair.members[0], pair.members[1]
    assert a.qemu is None or a.qemu.poll() is not None, "runs after the failover test"
    a.close()
    # Clients that talked to the old machine still know its MAC (the state the CI once met: a connect
    # timed out while the bridge side probed the dead MAC).
    pair.net.ip("neigh", "replace", a.identity.ip, "lladdr", a.macs[0], "dev", "br0", "nud", "stale")
    again = pair.boot_again(0, "a-again")
    again.wait_system_up()
    # The new machine has the old one's address and a new MAC; the bridge side's entry still names the
    # old MAC until the kernel's neighbour probing gives up on it (about 10-15 s), so the loop below
    # retries. (arp_notify announces the address only when it is on the interface as the link comes up,
    # which networkd does not guarantee.)
    neighbour = subprocess.run(pair.net.cmd("ip", "neigh", "show", again.identity.ip), capture_output=True, text=True).stdout
    print(f"\nneighbour entry of {again.identity.ip} once the new machine is up: {neighbour.strip() or '(none)'} "
          f"(old MAC {a.macs[0]}, new {again.macs[0]})")
    deadline = time.monotonic() + 120
    state: dict = {}
    while state.get("role") != "standby" or state.get("state") != "streaming":
        assert time.monotonic() < deadline, state
        try:
            state = stats_replication(pair, again)
        except OSError as unreachable:  # tandemd still starting, or the address not yet reachable
            state = {"error": str(unreachable)}
        time.sleep(1)
    assert stats_replication(pair, b)["role"] == "active"
    assert f"inet {SERVICE_IP}/24 " not in again.sh("ip -4 -o addr show").out
    # It holds what the new active holds, including the write made after the failover.
    deadline = time.monotonic() + 60
    while memcached_call(pair.net, again.identity.ip, b"get after fo-7\r\n") != b"VALUE after 0 2\r\nok\r\nVALUE fo-7 0 4\r\nv007\r\nEND\r\n":
        assert time.monotonic() < deadline, memcached_call(pair.net, again.identity.ip, b"get after fo-7\r\n")
        time.sleep(1)
    assert memcached_call(pair.net, SERVICE_IP, b"get after\r\n") == b"VALUE after 0 2\r\nok\r\nEND\r\n"
