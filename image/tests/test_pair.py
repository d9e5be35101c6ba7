"""Two appliances booted together as a pair, of one build with no identity baked in: A boots the kernel,
initrd and root filesystem directly with its identity on the kernel command line, B the GPT disk through
UEFI with its identity on a config drive. Each must take its own name, address and role, serve memcached at
its address, and reach its peer; A, the active, replicates to B, the standby, which serves reads and
refuses writes.

This is where the pair grows: once failover exists, the identities name the service IP and a test here
kills A's VM (kill -9 of its qemu) and checks that B answers on the service IP with the data written
before.
"""

import time

import pytest

from appliance import Identity, Network, Pair, memcached_call
from memccapable import assert_memccapable_passes

SECRET = "pair-secret-for-the-ci-run-0123456789"
A = Identity(hostname="tandem-a", address="10.77.0.11/24", role="active", peer="10.77.0.12", extra={"secret": SECRET})
B = Identity(hostname="tandem-b", address="10.77.0.12/24", role="standby", peer="10.77.0.11", extra={"secret": SECRET})


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
