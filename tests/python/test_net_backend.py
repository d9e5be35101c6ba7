"""Which kernel-socket backend serves: epoll (the default) or io_uring (`[net] backend = "uring"`).

run-all.sh runs the protocol tests once per backend (``TANDEM_NET_BACKEND``); this file makes sure the
pass that asks for io_uring really gets it, and says so, with the server's reason, when it cannot.
"""

import time

import pytest

from harness import NET_BACKEND, requires_tandem, stats


def wait_for_log(server, text, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log_path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


@requires_tandem("memcached has no stats net")
def test_the_requested_backend_serves_or_the_fallback_says_why(server):
    net = stats(server, "net")
    assert net["backend"] == "kernel"
    assert net["kernel_io"] in ("uring", "epoll")
    if NET_BACKEND is None or NET_BACKEND == "kernel":
        assert net["kernel_io"] == "epoll"
    if NET_BACKEND == "uring" and net["kernel_io"] == "epoll":
        assert wait_for_log(server, "io_uring cannot be set up here"), "fell back to epoll without saying why"
        reason = [line for line in server.log_path.read_text(errors="replace").splitlines() if "io_uring" in line]
        pytest.skip(f"io_uring is not available here, tandemd serves through epoll: {reason[-1]}")
    if NET_BACKEND in ("uring", "epoll"):
        assert net["kernel_io"] == NET_BACKEND


@requires_tandem("memcached has no [net] backend")
def test_a_multi_shard_multi_get_over_every_backend(start):
    """Replies for keys on both shards come back in order (the cross-core hop wakes the other ring)."""
    server = start("-t", "2")
    client = server.client()
    keys = [f"key-{i}" for i in range(200)]
    for key in keys:
        client.set(key, key.encode() * 3)
    got = client.get_many(keys)
    assert got == {key: key.encode() * 3 for key in keys}


def test_a_second_server_on_a_taken_port_exits_and_the_first_keeps_serving(server, tmp_path):
    """memcached exits with "Address already in use" when its port is taken; so must tandemd, on
    every backend, and without disturbing the server that holds the port."""
    import subprocess

    client = server.client()
    client.set("kept", b"value")
    second = subprocess.run(server.flags, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    assert second.returncode != 0
    assert b"in use" in second.stdout + second.stderr, (second.stdout + second.stderr)[-500:]
    assert server.is_alive()
    assert server.client().get("kept") == b"value"
