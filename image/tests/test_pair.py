"""Two appliances booted together as a pair, from the one disk image: A gets its identity on the kernel
command line, B from a config drive. Each must take its own name, address and role, serve memcached at
its address, and reach its peer.

This is where the pair grows: once replication is wired into tandemd (its [replication] table), the
`pair` fixture gives both members their replication settings and a test here writes through A and reads
through B; once failover exists, a test kills A's VM (kill -9 of its qemu) and checks that B answers on
the service IP with the data written before.
"""

import time

import pytest

from appliance import Identity, Network, Pair, memcached_call
from memccapable import assert_memccapable_passes

A = Identity(hostname="tandem-a", address="10.77.0.11/24", role="active", peer="10.77.0.12")
B = Identity(hostname="tandem-b", address="10.77.0.12/24", role="standby", peer="10.77.0.11")


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
        assert f"{key}={value}\n" in kept, kept
    assert source in box.sh("journalctl -b -u tandem-identity -o cat --no-pager").out
    # Kept for the next boot, should the identity not be given again.
    assert box.sh("grep -v '^#' /etc/tandem/identity").out == box.sh("grep -v '^#' /run/tandem/identity").out


@pytest.mark.parametrize("member", [0, 1])
def test_each_member_serves_at_its_address(pair, member):
    box = pair.members[member]
    assert box.sh("systemctl is-active tandemd").out.strip() == "active"
    assert_memccapable_passes(pair.net, box.identity.ip)


def test_members_hold_their_own_data_and_reach_each_other(pair):
    a, b = pair.members
    assert memcached_call(pair.net, a.identity.ip, b"set who 0 0 1\r\na\r\n") == b"STORED\r\n"
    assert memcached_call(pair.net, b.identity.ip, b"set who 0 0 1\r\nb\r\n") == b"STORED\r\n"
    assert memcached_call(pair.net, a.identity.ip, b"get who\r\n") == b"VALUE who 0 1\r\na\r\nEND\r\n"
    assert memcached_call(pair.net, b.identity.ip, b"get who\r\n") == b"VALUE who 0 1\r\nb\r\nEND\r\n"
    # The replication link's path: each member opens a TCP connection to its peer's tandemd.
    for box in (a, b):
        reply = box.exec(["/bin/bash", "-c", f"exec 3<>/dev/tcp/{box.identity.peer}/11211; printf 'get who\\r\\nquit\\r\\n' >&3; cat <&3"],
                         timeout=30).check().out
        other = "b" if box is a else "a"
        assert reply == f"VALUE who 0 1\r\n{other}\r\nEND\r\n", reply
