"""Many idle clients: 10,000 open connections do not stop a new client from being served promptly.

Both the test process and the server need more than the usual 1024 descriptors: the test raises its own
RLIMIT_NOFILE and starts the server with a raised one (memcached needs it as much as tandemd).
"""

import resource
import socket
import time

import pytest

from harness import RawConn

IDLE_CONNECTIONS = 10_000
SERVER_MAX_CONNECTIONS = 12_000
NOFILE_NEEDED = IDLE_CONNECTIONS + 500
SAMPLE_EVERY = 50  # a `version` on every 50th idle connection: 200 of them


@pytest.fixture
def raised_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NOFILE_NEEDED:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {NOFILE_NEEDED} needed for {IDLE_CONNECTIONS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NOFILE_NEEDED), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_new_client_is_served_within_1s_while_10000_idle_connections_stay_open(start, raised_nofile):
    server = start("-c", str(SERVER_MAX_CONNECTIONS), nofile=SERVER_MAX_CONNECTIONS + 1000)
    idle = []
    deadline = time.monotonic() + 60
    try:
        for _ in range(IDLE_CONNECTIONS):
            assert time.monotonic() < deadline, f"only {len(idle)} connections opened in 60 s"
            idle.append(socket.create_connection((server.host, server.port), timeout=5))

        started = time.monotonic()
        newcomer = RawConn(server.host, server.port, timeout=1)
        newcomer.expect(b"set fresh 0 0 2\r\nhi\r\n", b"STORED\r\n")
        newcomer.expect(b"get fresh\r\n", b"VALUE fresh 0 2\r\nhi\r\nEND\r\n")
        elapsed = time.monotonic() - started
        newcomer.close()
        print(f"connections: new client served in {elapsed * 1000:.1f} ms with {len(idle)} idle open")
        assert elapsed < 1.0

        answered = 0
        sample = idle[::SAMPLE_EVERY]
        for sock in sample:
            sock.sendall(b"version\r\n")
        for sock in sample:
            reply = b""
            for _ in range(10):  # bounded: each recv is bounded by the socket's 5 s timeout
                reply += sock.recv(100)
                if reply.endswith(b"\r\n") or not reply:
                    break
            answered += reply.startswith(b"VERSION ")
        assert answered == len(sample)
    finally:
        for sock in idle:
            sock.close()
    assert server.is_alive()
