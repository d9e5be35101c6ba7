"""Malformed and hostile input: the exact answer memcached 1.6 gives, and that other clients stay served.

Every test ends by checking that a second, well-behaved client is still served normally.
"""

import socket
import struct
import time

import pytest

from harness import RawConn, assert_served, requires_tandem, stats

BINARY_HEADER = struct.Struct("!BBHBBHIIQ")  # magic opcode keylen extlen datatype vbucket/status bodylen opaque cas


def binary_request(opcode, key=b"", extras=b"", value=b"", keylen=None, bodylen=None):
    keylen = len(key) if keylen is None else keylen
    bodylen = len(extras) + len(key) + len(value) if bodylen is None else bodylen
    return BINARY_HEADER.pack(0x80, opcode, keylen, len(extras), 0, 0, bodylen, 0, 0) + extras + key + value


# --- text protocol ------------------------------------------------------------------------------


def test_line_without_newline_over_limit_closes_connection(server):
    # memcached 1.6.18 waits for up to 2 KiB of a command line; past that (no "\n" in 8 KiB here) it closes
    # the connection without a word.
    conn = server.raw()
    conn.send(b"g" * 8192)
    assert conn.recv_available(quiet_s=0.5) == b""
    assert conn.is_closed_by_peer()
    assert_served(server)


def test_long_multi_get_line_is_served(server):
    conn = server.raw()
    keys = b" ".join(b"key%d" % index for index in range(3000))  # about 24 KiB on one line
    conn.expect(b"get " + keys + b"\r\n", b"END\r\n")
    assert_served(server)


def test_key_over_250_bytes_is_client_error(server):
    conn = server.raw()
    conn.expect(b"get " + b"a" * 251 + b"\r\n", b"CLIENT_ERROR bad command line format\r\n")
    conn.expect(b"set " + b"a" * 5000 + b" 0 0 1\r\nv\r\n", b"CLIENT_ERROR bad command line format\r\nERROR\r\n")
    assert_served(server)


# memcached 1.6.18 splits a command line on spaces only, ends it at a NUL, and checks nothing of a key but
# its length: every other byte, control characters included, is part of the key (memaslap's keys start
# with \x10 bytes). protocol.txt asks clients not to send them; a drop-in stores what memcached stores.
CONTROL_KEYS = [b"a\x01b", b"tab\tkey", b"del\x7fkey", b"cr\rinside", b"\x10" * 8 + b"JRGFpc-S", b"high\x80\xff", b"ends\r"]


@pytest.mark.parametrize("key", CONTROL_KEYS)
def test_key_with_control_characters_is_stored_as_memcached_stores_it(server, key):
    conn = server.raw()
    conn.expect(b"set " + key + b" 5 0 1\r\nx\r\n", b"STORED\r\n")
    conn.expect(b"get " + key + b"\r\n", b"VALUE " + key + b" 5 1\r\nx\r\nEND\r\n")
    conn.expect(b"mg " + key + b" v k f\r\n", b"VA 1 k" + key + b" f5\r\nx\r\n")
    conn.expect(b"ms " + key + b" 2 T0\r\n12\r\n", b"HD\r\n")
    conn.expect(b"ma " + key + b" v\r\n", b"VA 2\r\n13\r\n")
    conn.expect(b"delete " + key + b"\r\n", b"DELETED\r\n")
    conn.expect(b"md " + key + b"\r\n", b"NF\r\n")
    assert_served(server)


def test_key_of_control_characters_is_limited_by_length_only(server):
    conn = server.raw()
    key = b"\x01\x7f\t" * 83 + b"\x02"  # 250 bytes
    conn.expect(b"set " + key + b" 0 0 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"get " + key + b"\r\n", b"VALUE " + key + b" 0 1\r\nv\r\nEND\r\n")
    conn.expect(b"get " + key + b"\x03\r\n", b"CLIENT_ERROR bad command line format\r\n")
    conn.expect(b"mg " + key + b"\x03 v\r\n", b"CLIENT_ERROR bad command line format\r\n")
    assert_served(server)


# After a refused storage command line memcached does not know the value's length, so it reads the data
# line as a command of its own: the client sees the CLIENT_ERROR and then ERROR.
@pytest.mark.parametrize(
    "command",
    [
        b"set k abc 0 1",  # non-numeric flags
        b"set k -1 0 1",  # negative flags
        b"set k 0 abc 1",  # non-numeric exptime
        b"set k 0 1.5 1",  # fractional exptime
        b"set k 0 0 abc",  # non-numeric bytes
        b"set k 0 0 -1",  # negative bytes
        b"set k 0 0 1 noreply extra",  # too many tokens
    ],
)
def test_bad_storage_command_line_is_client_error(server, command):
    conn = server.raw()
    expected = b"CLIENT_ERROR bad command line format\r\nERROR\r\n"
    if command.endswith(b"extra"):
        expected = b"ERROR\r\nERROR\r\n"
    conn.expect(command + b"\r\nv\r\n", expected)
    conn.expect(b"get k\r\n", b"END\r\n")
    assert_served(server)


def test_value_longer_than_announced_is_bad_data_chunk(server):
    conn = server.raw()
    conn.expect(b"set k 0 0 3\r\nabcdef\r\nget k\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\nEND\r\n")
    assert_served(server)


def test_value_shorter_than_announced_swallows_next_line_then_bad_data_chunk(server):
    # The 5 announced bytes are "ab\r\ng"; "et k" is not the "\r\n" terminator.
    conn = server.raw()
    conn.expect(b"set k 0 0 5\r\nab\r\nget k\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n")
    conn.expect(b"get k\r\n", b"END\r\n")
    assert_served(server)


def test_value_over_item_limit_is_refused_swallowed_and_connection_stays_usable(start):
    server = start("-I", "1m")
    conn = server.raw(timeout=10)
    conn.expect(b"set small 0 0 2\r\nok\r\n", b"STORED\r\n")
    size = 2 * 1024 * 1024
    conn.send(b"set huge 0 0 %d\r\n" % size)
    conn.send(b"h" * size + b"\r\n")
    conn.expect(b"get small huge\r\n",
                b"SERVER_ERROR object too large for cache\r\nVALUE small 0 2\r\nok\r\nEND\r\n")
    assert_served(server)


# --- binary protocol framing --------------------------------------------------------------------


def test_binary_packet_with_bad_magic_closes_connection(server):
    conn = server.raw()
    noop = binary_request(0x0A)
    bad = bytearray(noop)
    bad[0] = 0x13
    conn.send(noop + bytes(bad))
    reply = conn.recv_exact(24)
    assert reply[:2] == b"\x81\x0a" and reply[6:8] == b"\x00\x00"  # the first no-op is answered
    assert conn.is_closed_by_peer()
    assert_served(server)


def test_binary_key_longer_than_body_is_an_error_and_closes(server):
    # keylen 10 with bodylen 5. memcached 1.6.18 reads past the body for the key (it swallows the next
    # packet) and then answers status 0x81 "Unknown command" and closes; a stricter server may answer at
    # once. Either way: a non-zero status for this opcode, then the connection closes.
    conn = server.raw()
    conn.send(binary_request(0x00, key=b"abcde", keylen=10, bodylen=5) + binary_request(0x0A))
    header = conn.recv_exact(24)
    magic, opcode, _keylen, _extlen, _datatype, status, bodylen, _opaque, _cas = BINARY_HEADER.unpack(header)
    assert (magic, opcode) == (0x81, 0x00)
    assert status != 0
    conn.recv_exact(bodylen)
    assert conn.is_closed_by_peer()
    assert_served(server)


def test_binary_set_without_extras_is_invalid_arguments_and_closes(server):
    conn = server.raw()
    conn.send(binary_request(0x01, key=b"abc", value=b"d"))
    conn.expect(b"", BINARY_HEADER.pack(0x81, 0x01, 0, 0, 0, 0x04, 17, 0, 0) + b"Invalid arguments")
    assert conn.is_closed_by_peer()
    assert_served(server)


# --- connection limits --------------------------------------------------------------------------

# memcached 1.6.18 will not start with -c 10 and -t 2 ("failed creating eventfd for worker thread: Too many
# open files": it lowers its own RLIMIT_NOFILE to -c), so the limit tests use -c 32.
CONN_LIMIT = 32


def open_connections(server, count):
    """``count`` connections, each having sent `version`; returns (served, refused) lists."""
    served, refused = [], []
    for _ in range(count):
        conn = server.raw(timeout=2)
        conn.send(b"version\r\n")
        reply = conn.recv_until(b"\r\n")
        (served if reply.startswith(b"VERSION ") else refused).append((conn, reply))
    return served, refused


def test_connections_over_dash_c_are_refused_with_error_and_closed(start):
    server = start("-c", str(CONN_LIMIT))
    served, refused = open_connections(server, 2 * CONN_LIMIT)
    assert 0 < len(served) <= CONN_LIMIT
    assert refused
    for conn, reply in refused:
        assert reply == b"ERROR Too many open connections\r\n"
        assert conn.is_closed_by_peer(timeout=1)
    for conn, _ in served:  # the accepted ones keep working
        conn.send(b"version\r\n")
        assert conn.recv_until(b"\r\n").startswith(b"VERSION ")
    for conn, _ in served:
        conn.close()
    deadline = time.monotonic() + 3
    for _ in range(30):  # memcached notices closed connections asynchronously
        try:
            assert_served(server)
            break
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert int(stats(server)["rejected_connections"]) >= len(refused)


@requires_tandem("memcached 1.6.18 counts its own descriptors against -c: at -c 32 it serves 15 clients")
def test_exactly_dash_c_clients_are_served(start):
    server = start("-c", str(CONN_LIMIT))
    served, refused = open_connections(server, CONN_LIMIT + 5)
    assert len(served) == CONN_LIMIT
    assert len(refused) == 5


# --- slow and greedy clients --------------------------------------------------------------------


def assert_promptly_served(server, within_s=0.5):
    started = time.monotonic()
    assert_served(server)
    assert time.monotonic() - started < within_s


def test_half_sent_command_does_not_block_other_clients(server):
    stalled_line = server.raw()
    stalled_line.send(b"get half-a-comm")
    stalled_value = server.raw()
    stalled_value.send(b"set stalled 0 0 100\r\nonly part of the value")
    for _ in range(5):
        assert_promptly_served(server)
    stalled_value.expect(b"x" * 78 + b"\r\n", b"STORED\r\n")  # the stalled client may still finish
    stalled_line.expect(b"and\r\n", b"END\r\n")


def test_client_pipelining_gets_without_reading_does_not_block_others(server):
    value = b"v" * 10000
    setup = server.raw()
    setup.expect(b"set fat 0 0 %d\r\n" % len(value) + value + b"\r\n", b"STORED\r\n")
    greedy = socket.create_connection((server.host, server.port), timeout=2)
    greedy.setblocking(False)
    request = b"get fat\r\n" * 1000
    sent = 0
    deadline = time.monotonic() + 3
    for _ in range(10000):  # send until the server stops reading from us (both socket buffers full)
        if time.monotonic() > deadline:
            break
        try:
            sent += greedy.send(request)
        except BlockingIOError:
            time.sleep(0.01)
    try:
        assert sent > 100000, "the server never pushed back"
        for _ in range(5):
            assert_promptly_served(server)
        assert server.is_alive()
    finally:
        greedy.close()
    assert_served(server)


@requires_tandem("memcached 1.6.18 buffers a get line without end for as long as it grows")
def test_endless_get_line_is_cut_off_and_others_are_served(start):
    # A multi-get line that never ends may not hold the server's memory: past -I plus 1 MiB the
    # connection gets an error and is closed; everyone else is served throughout.
    server = start("-I", "1m")
    conn = server.raw(timeout=10)
    conn.send(b"get ")
    chunk = b"k" * 100 + b" "
    sent = 0
    closed = False
    for _ in range(40_000):  # bounded: at most ~4 MB
        try:
            conn.send(chunk * 100)
        except OSError:
            closed = True
            break
        sent += len(chunk) * 100
        if sent > 3 * 1024 * 1024:
            break
    assert_served(server)
    if not closed:
        assert conn.recv_until(b"\r\n") == b"SERVER_ERROR request too large\r\n"
    assert server.is_alive()
