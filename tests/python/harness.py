"""Harness for Tandem's integration tests: start a server process, talk to it over real sockets.

The same tests run against tandemd and against memcached 1.6 (the reference):

- ``TANDEM_SERVER``: path to the server binary (default ``target/release/tandemd`` in the repo root).
- ``TANDEM_SERVER_KIND=memcached``: run ``/usr/bin/memcached`` instead (``TANDEM_SERVER`` overrides the path).
- ``TANDEM_NET_BACKEND=uring|epoll``: start tandemd with ``[net] backend = "..."`` (a config file written
  next to its log) unless the test passes its own ``--config``; the protocol tests run once per kernel-socket
  backend in run-all.sh this way.
- ``TANDEM_FORCE_TANDEM_TESTS=1``: also run the tests marked ``requires_tandem`` against memcached, to
  measure where memcached stands (they are expected to fail there).

What this module offers:

- ``ServerProcess``: one running server on a free loopback port (host, port, process), with helpers to open
  pymemcache clients and raw connections to it.
- ``start_server(flags, ...)``: start a server and wait until it accepts connections.
- ``RawConn``: a raw TCP connection with a timeout, for asserting exact bytes.
- ``requires_tandem(reason)``: a marker that skips, with its reason printed under ``pytest -rs``, when the
  server is memcached and the test pins one of tandemd's deliberate improvements.
- ``skip_unless(condition, reason)``: skips the test when the machine lacks what it needs (root,
  hugepages, the DPDK build, qemu, a tool CI installs), and fails it instead when ``CI=true``: CI has all
  of these, and must never skip silently what it is there to run. ``needs_root(why)`` is the root case.
  tests/python/conftest.py's session fixture ``root`` applies it to whole modules
  (``pytestmark = pytest.mark.usefixtures("root")``), before any of their fixtures; image/tests uses it too.
- ``pymemcache_suite(host, port)`` and ``assert_pymemcache_suite_passed(run)``: pymemcache's own
  integration tests, all of them, against a server.

Every wait here is bounded in both iterations and time, and every socket has a timeout.
"""

import os
import pathlib
import resource
import socket
import subprocess
import sys
import time

import pytest
from pymemcache.client.base import Client

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
SOCKET_TIMEOUT_S = 3.0
START_TIMEOUT_S = 5.0

SERVER_KIND = os.environ.get("TANDEM_SERVER_KIND", "tandemd")
IS_MEMCACHED = SERVER_KIND == "memcached"
FORCE_TANDEM_TESTS = os.environ.get("TANDEM_FORCE_TANDEM_TESTS") == "1"
NET_BACKEND = os.environ.get("TANDEM_NET_BACKEND")


def server_binary():
    """Path of the server under test."""
    if "TANDEM_SERVER" in os.environ:
        return os.environ["TANDEM_SERVER"]
    if IS_MEMCACHED:
        return "/usr/bin/memcached"
    return str(REPO_ROOT / "target" / "release" / "tandemd")


def requires_tandem(reason):
    """Mark a test that pins a deliberate difference from memcached: skipped against memcached."""
    return pytest.mark.skipif(
        IS_MEMCACHED and not FORCE_TANDEM_TESTS,
        reason=f"requires tandemd (memcached differs: {reason})",
    )


CI = os.environ.get("CI") == "true"


def skip_unless(condition, reason):
    """Goes on if ``condition`` holds; otherwise skips the calling test or fixture with ``reason`` (printed
    under ``pytest -rs``), or, under ``CI=true``, fails it with the same reason."""
    __tracebackhide__ = True  # reports name the caller's line
    if condition:
        return
    if CI:
        pytest.fail(f"{reason} (CI=true: CI must run this, not skip it)", pytrace=False)
    pytest.skip(reason)


def needs_root(why):
    """``skip_unless`` running as root; ``why`` says what root is needed for."""
    __tracebackhide__ = True
    skip_unless(os.geteuid() == 0, f"needs root ({why}); CI runs as root")


def free_port():
    """A loopback TCP port that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def has_flag(flags, name):
    return any(flag == name or flag.startswith(name) and len(flag) > 2 for flag in flags)


class ServerProcess:
    """A server under test, listening on (host, port)."""

    def __init__(self, process, host, port, flags, log_path):
        self.process = process
        self.host = host
        self.port = port
        self.flags = flags
        self.log_path = log_path
        self._opened = []

    @property
    def pid(self):
        return self.process.pid

    def client(self, **options):
        """A pymemcache client with timeouts that waits for replies (closed at teardown)."""
        options.setdefault("connect_timeout", SOCKET_TIMEOUT_S)
        options.setdefault("timeout", SOCKET_TIMEOUT_S)
        options.setdefault("default_noreply", False)  # wait for each reply, so effects are ordered
        client = Client((self.host, self.port), **options)
        self._opened.append(client)
        return client

    def raw(self, timeout=SOCKET_TIMEOUT_S):
        """A raw TCP connection (closed at teardown)."""
        conn = RawConn(self.host, self.port, timeout)
        self._opened.append(conn)
        return conn

    def is_alive(self):
        return self.process.poll() is None

    def wait_exit(self, timeout_s):
        """Wait for the process to exit by itself; returns its exit code or None if it did not exit."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        for opened in self._opened:
            try:
                opened.close()
            except Exception:
                pass
        self._opened.clear()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _raise_nofile(limit):
    def preexec():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))

    return preexec


def start_server(flags=(), log_dir=None, nofile=None):
    """Start the server with memcached-style flags on a free loopback port and wait until it accepts.

    ``-p`` and ``-l`` are chosen here; ``-t 2`` is the default thread count. ``nofile`` raises the
    server's RLIMIT_NOFILE (soft limit, up to the hard limit) before it starts.
    """
    flags = list(flags)
    binary = server_binary()
    if not os.path.exists(binary):
        pytest.fail(f"server binary not found: {binary} (set TANDEM_SERVER or TANDEM_SERVER_KIND=memcached)")
    extra = []
    if not has_flag(flags, "-t"):
        extra += ["-t", "2"]
    if IS_MEMCACHED:
        extra += ["-U", "0"]  # memcached serves UDP unless told not to; tandemd has no UDP.
        if os.geteuid() == 0:
            extra += ["-u", "root"]  # memcached refuses to run as root without -u.
    last_error = None
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        log_path = pathlib.Path(log_dir or "/tmp") / f"server-{port}.log"
        backend = []
        if NET_BACKEND and not IS_MEMCACHED and not has_flag(flags, "--config"):
            config = log_path.with_suffix(".toml")
            config.write_text(f'[net]\nbackend = "{NET_BACKEND}"\n')
            backend = ["--config", str(config)]
        argv = [binary, "-p", str(port), "-l", HOST] + extra + backend + flags
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile(nofile) if nofile else None,
            )
        server = ServerProcess(process, HOST, port, argv, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        for _ in range(500):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                return server
            except OSError as error:
                last_error = error
                time.sleep(0.01)
        server.stop()
        last_error = f"{argv} exited with {process.returncode}: {log_path.read_text(errors='replace')[-2000:]}"
    pytest.fail(f"server did not start: {last_error}")


class RawConn:
    """A raw TCP connection for exact-bytes assertions. Every read is bounded by a deadline."""

    def __init__(self, host, port, timeout=SOCKET_TIMEOUT_S):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        """Read once more into the buffer; False on timeout or EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except (socket.timeout, ConnectionResetError):
            return False
        if not chunk:
            return False
        self.pending += chunk
        return True

    def recv_exact(self, size, timeout=None):
        """Up to ``size`` bytes; fewer only if the server stops sending or closes."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.pending) < size and self._fill(deadline):
            pass
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def recv_until(self, terminator, timeout=None):
        """Bytes up to and including ``terminator`` (or whatever came before the deadline)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while terminator not in self.pending and self._fill(deadline):
            pass
        end = self.pending.find(terminator)
        end = len(self.pending) if end < 0 else end + len(terminator)
        data, self.pending = self.pending[:end], self.pending[end:]
        return data

    def recv_until_count(self, terminator, count, timeout=None):
        """Bytes up to and including the ``count``-th ``terminator`` (or whatever came before the deadline)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.pending.count(terminator) < count and self._fill(deadline):
            pass
        end = -1
        for _ in range(count):
            end = self.pending.find(terminator, end + 1)
            if end < 0:
                end = len(self.pending)
                break
        else:
            end += len(terminator)
        data, self.pending = self.pending[:end], self.pending[end:]
        return data

    def recv_available(self, quiet_s=0.2):
        """Everything that arrives until the server has been quiet for ``quiet_s``."""
        for _ in range(1000):
            if not self._fill(time.monotonic() + quiet_s):
                break
        data, self.pending = self.pending, b""
        return data

    def call(self, request, expected_len):
        """Send a request and read ``expected_len`` bytes of reply."""
        self.send(request)
        return self.recv_exact(expected_len)

    def expect(self, request, expected):
        """Send a request and assert the reply is exactly ``expected`` (and nothing more follows)."""
        self.send(request)
        reply = self.recv_exact(len(expected))
        assert reply == expected
        return reply

    def is_closed_by_peer(self, timeout=SOCKET_TIMEOUT_S):
        """True if the server closes the connection (EOF or reset) before the deadline."""
        deadline = time.monotonic() + timeout
        for _ in range(10000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
        return False


def pymemcache_suite(host, port):
    """The command line that runs pymemcache's own integration tests (every one) against host:port.
    pymemcache skips three of them itself (its issue 39); -rs prints why."""
    import pymemcache

    suite = pathlib.Path(pymemcache.__file__).parent / "test" / "test_integration.py"
    return [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:warnings", "-m", "integration",
            str(suite), "--server", host, "--port", str(port)]


def assert_pymemcache_suite_passed(run):
    """``run``: the finished ``pymemcache_suite`` process (text output)."""
    print(run.stdout[-300:])
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout
    assert "deselected" not in run.stdout, run.stdout


def stats(server, group=None):
    """The server's `stats [group]` as a dict of name -> string value."""
    conn = RawConn(server.host, server.port)
    try:
        conn.send(b"stats" + (b" " + group.encode() if group else b"") + b"\r\n")
        raw = conn.recv_until(b"END\r\n")
    finally:
        conn.close()
    assert raw.endswith(b"END\r\n"), raw
    result = {}
    for line in raw.split(b"\r\n")[:-2]:
        stat, name, value = line.decode().split(" ", 2)
        assert stat == "STAT", line
        result[name] = value
    return result


def assert_served(server):
    """A fresh client gets a normal answer: set then get round-trips."""
    conn = RawConn(server.host, server.port)
    try:
        conn.expect(b"set served-probe 0 0 2\r\nok\r\n", b"STORED\r\n")
        conn.expect(b"get served-probe\r\n", b"VALUE served-probe 0 2\r\nok\r\nEND\r\n")
    finally:
        conn.close()
