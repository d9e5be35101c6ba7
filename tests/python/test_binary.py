"""Binary protocol: raw packets built with struct, answers compared field by field with memcached 1.6.

Covers every data command, the quiet (Q) and key-returning (K) variants, and the exact error statuses and
messages.
"""

import struct
import time
from dataclasses import dataclass

import pytest

from harness import RawConn

HEADER = struct.Struct("!BBHBBHIIQ")
REQUEST_MAGIC, RESPONSE_MAGIC = 0x80, 0x81

GET, SET, ADD, REPLACE, DELETE, INCR, DECR, QUIT, FLUSH, GETQ, NOOP, VERSION = range(0x0C)
GETK, GETKQ, APPEND, PREPEND, STAT, SETQ, ADDQ, REPLACEQ, DELETEQ, INCRQ, DECRQ, QUITQ, FLUSHQ = range(0x0C, 0x19)
APPENDQ, PREPENDQ = 0x19, 0x1A
TOUCH, GAT, GATQ, GATK, GATKQ = 0x1C, 0x1D, 0x1E, 0x23, 0x24

OK, KEY_NOT_FOUND, KEY_EXISTS, TOO_LARGE, INVALID_ARGUMENTS, NOT_STORED, NON_NUMERIC = range(7)
UNKNOWN_COMMAND = 0x81

ERROR_TEXT = {
    KEY_NOT_FOUND: b"Not found",
    KEY_EXISTS: b"Data exists for key.",
    NOT_STORED: b"Not stored.",
    NON_NUMERIC: b"Non-numeric server-side value for incr or decr",
    INVALID_ARGUMENTS: b"Invalid arguments",
    UNKNOWN_COMMAND: b"Unknown command",
    TOO_LARGE: b"Too large.",
}


@dataclass
class Response:
    opcode: int
    status: int
    opaque: int
    cas: int
    extras: bytes
    key: bytes
    value: bytes


def request(opcode, key=b"", extras=b"", value=b"", opaque=0, cas=0):
    body_length = len(extras) + len(key) + len(value)
    return HEADER.pack(REQUEST_MAGIC, opcode, len(key), len(extras), 0, 0, body_length, opaque, cas) + extras + key + value


def storage_extras(flags=0, exptime=0):
    return struct.pack("!II", flags, exptime)


def counter_extras(delta, initial=0, exptime=0):
    return struct.pack("!QQI", delta, initial, exptime)


def read_response(conn: RawConn):
    header = conn.recv_exact(HEADER.size)
    assert len(header) == HEADER.size, f"short header: {header!r}"
    magic, opcode, key_length, extras_length, _datatype, status, body_length, opaque, cas = HEADER.unpack(header)
    assert magic == RESPONSE_MAGIC
    body = conn.recv_exact(body_length)
    assert len(body) == body_length
    extras = body[:extras_length]
    key = body[extras_length:extras_length + key_length]
    value = body[extras_length + key_length:]
    return Response(opcode, status, opaque, cas, extras, key, value)


def call(conn, opcode, **fields):
    conn.send(request(opcode, **fields))
    return read_response(conn)


def assert_error(response, opcode, status):
    assert (response.opcode, response.status, response.value) == (opcode, status, ERROR_TEXT[status])


def set_value(conn, key, value, flags=0, exptime=0):
    response = call(conn, SET, key=key, extras=storage_extras(flags, exptime), value=value)
    assert (response.opcode, response.status) == (SET, OK)
    return response.cas


def get_value(conn, key):
    """(flags, value) or None if missing."""
    response = call(conn, GET, key=key)
    if response.status == KEY_NOT_FOUND:
        return None
    assert response.status == OK
    return struct.unpack("!I", response.extras)[0], response.value


# --- get / set / add / replace ------------------------------------------------------------------


def test_set_then_get_returns_flags_value_and_cas(conn):
    cas = set_value(conn, b"bk", b"hello", flags=0xDEADBEEF)
    assert cas != 0
    response = call(conn, GET, key=b"bk", opaque=77)
    assert response == Response(GET, OK, 77, cas, struct.pack("!I", 0xDEADBEEF), b"", b"hello")


def test_get_of_missing_key_is_not_found(conn):
    assert_error(call(conn, GET, key=b"missing"), GET, KEY_NOT_FOUND)


def test_getk_returns_the_key(conn):
    set_value(conn, b"kk", b"v")
    response = call(conn, GETK, key=b"kk")
    assert (response.status, response.key, response.value) == (OK, b"kk", b"v")


def test_set_with_matching_cas_succeeds_and_stale_cas_is_exists(conn):
    cas = set_value(conn, b"c", b"1")
    response = call(conn, SET, key=b"c", extras=storage_extras(), value=b"2", cas=cas)
    assert response.status == OK and response.cas != cas
    assert_error(call(conn, SET, key=b"c", extras=storage_extras(), value=b"3", cas=cas), SET, KEY_EXISTS)
    assert get_value(conn, b"c") == (0, b"2")


def test_set_with_cas_on_missing_key_is_not_found(conn):
    assert_error(call(conn, SET, key=b"nokey", extras=storage_extras(), value=b"x", cas=123), SET, KEY_NOT_FOUND)


def test_add_on_existing_key_is_exists(conn):
    response = call(conn, ADD, key=b"a", extras=storage_extras(), value=b"1")
    assert response.status == OK
    assert_error(call(conn, ADD, key=b"a", extras=storage_extras(), value=b"2"), ADD, KEY_EXISTS)
    assert get_value(conn, b"a") == (0, b"1")


def test_replace_on_missing_key_is_not_found(conn):
    assert_error(call(conn, REPLACE, key=b"r", extras=storage_extras(), value=b"1"), REPLACE, KEY_NOT_FOUND)
    set_value(conn, b"r", b"1")
    assert call(conn, REPLACE, key=b"r", extras=storage_extras(5), value=b"2").status == OK
    assert get_value(conn, b"r") == (5, b"2")


def test_value_over_item_limit_is_too_large(conn):
    big = b"x" * (1024 * 1024 + 1)
    assert_error(call(conn, SET, key=b"big", extras=storage_extras(), value=big), SET, TOO_LARGE)
    assert get_value(conn, b"big") is None


# --- append / prepend / delete ------------------------------------------------------------------


def test_append_and_prepend(conn):
    set_value(conn, b"ap", b"mid", flags=3)
    assert call(conn, APPEND, key=b"ap", value=b"-end").status == OK
    assert call(conn, PREPEND, key=b"ap", value=b"start-").status == OK
    assert get_value(conn, b"ap") == (3, b"start-mid-end")


def test_append_and_prepend_on_missing_key_are_not_stored(conn):
    assert_error(call(conn, APPEND, key=b"none", value=b"x"), APPEND, NOT_STORED)
    assert_error(call(conn, PREPEND, key=b"none", value=b"x"), PREPEND, NOT_STORED)


def test_delete_then_delete_again_is_not_found(conn):
    set_value(conn, b"d", b"v")
    assert call(conn, DELETE, key=b"d").status == OK
    assert_error(call(conn, DELETE, key=b"d"), DELETE, KEY_NOT_FOUND)
    assert get_value(conn, b"d") is None


# --- incr / decr --------------------------------------------------------------------------------


def test_incr_on_missing_key_creates_initial_value(conn):
    response = call(conn, INCR, key=b"n", extras=counter_extras(5, initial=100))
    assert (response.status, response.value) == (OK, struct.pack("!Q", 100))
    response = call(conn, INCR, key=b"n", extras=counter_extras(5, initial=100))
    assert (response.status, response.value) == (OK, struct.pack("!Q", 105))
    assert get_value(conn, b"n") == (0, b"105")


def test_decr_floors_at_zero_and_incr_wraps(conn):
    call(conn, INCR, key=b"n", extras=counter_extras(0, initial=3))
    assert call(conn, DECR, key=b"n", extras=counter_extras(10)).value == struct.pack("!Q", 0)
    set_value(conn, b"w", b"18446744073709551615")
    assert call(conn, INCR, key=b"w", extras=counter_extras(2)).value == struct.pack("!Q", 1)


def test_incr_with_no_create_expiry_on_missing_key_is_not_found(conn):
    assert_error(call(conn, INCR, key=b"none", extras=counter_extras(1, 0, 0xFFFFFFFF)), INCR, KEY_NOT_FOUND)
    assert_error(call(conn, DECR, key=b"none", extras=counter_extras(1, 0, 0xFFFFFFFF)), DECR, KEY_NOT_FOUND)


def test_incr_created_value_expires_with_given_exptime(conn):
    call(conn, INCR, key=b"brief", extras=counter_extras(1, initial=7, exptime=1))
    assert get_value(conn, b"brief") == (0, b"7")
    deadline = time.monotonic() + 3.5
    while get_value(conn, b"brief") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get_value(conn, b"brief") is None


def test_incr_on_non_numeric_value_is_error(conn):
    set_value(conn, b"s", b"abc")
    assert_error(call(conn, INCR, key=b"s", extras=counter_extras(1)), INCR, NON_NUMERIC)


# --- touch / gat --------------------------------------------------------------------------------


def test_touch_sets_new_expiry(conn):
    set_value(conn, b"t", b"v", exptime=60)
    assert call(conn, TOUCH, key=b"t", extras=struct.pack("!I", 1)).status == OK
    assert_error(call(conn, TOUCH, key=b"none", extras=struct.pack("!I", 1)), TOUCH, KEY_NOT_FOUND)
    deadline = time.monotonic() + 3.5
    while get_value(conn, b"t") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get_value(conn, b"t") is None


def test_gat_returns_value_and_updates_expiry(conn):
    set_value(conn, b"g", b"v", flags=9, exptime=1)
    response = call(conn, GAT, key=b"g", extras=struct.pack("!I", 60))
    assert (response.status, response.extras, response.key, response.value) == (OK, struct.pack("!I", 9), b"", b"v")
    time.sleep(2.2)
    assert get_value(conn, b"g") == (9, b"v")
    response = call(conn, GATK, key=b"g", extras=struct.pack("!I", 60))
    assert (response.status, response.key) == (OK, b"g")


def test_gatq_is_silent_on_miss_and_answers_on_hit(conn):
    set_value(conn, b"hit", b"v")
    conn.send(request(GATQ, key=b"miss", extras=struct.pack("!I", 60), opaque=1)
              + request(GATQ, key=b"hit", extras=struct.pack("!I", 60), opaque=2)
              + request(NOOP, opaque=3))
    first, second = read_response(conn), read_response(conn)
    assert (first.opcode, first.status, first.opaque, first.value) == (GATQ, OK, 2, b"v")
    assert (second.opcode, second.opaque) == (NOOP, 3)


# --- quiet variants -----------------------------------------------------------------------------


def test_getkq_pipeline_answers_only_hits_then_noop(conn):
    for index in range(0, 10, 2):
        set_value(conn, b"q%d" % index, b"v%d" % index)
    conn.send(b"".join(request(GETKQ, key=b"q%d" % index, opaque=index) for index in range(10))
              + request(NOOP, opaque=99))
    responses = [read_response(conn) for _ in range(6)]
    assert [(r.opcode, r.status, r.opaque, r.key, r.value) for r in responses[:5]] == [
        (GETKQ, OK, index, b"q%d" % index, b"v%d" % index) for index in range(0, 10, 2)
    ]
    assert (responses[5].opcode, responses[5].opaque) == (NOOP, 99)


def test_getq_misses_are_silent(conn):
    conn.send(request(GETQ, key=b"nothing") + request(NOOP, opaque=5))
    response = read_response(conn)
    assert (response.opcode, response.opaque) == (NOOP, 5)


@pytest.mark.parametrize(
    "opcode, extras, value",
    [
        (SETQ, storage_extras(), b"1"),
        (ADDQ, storage_extras(), b"1"),
        (APPENDQ, b"", b"1"),
        (PREPENDQ, b"", b"1"),
        (DELETEQ, b"", b""),
        (INCRQ, counter_extras(1, initial=1), b""),
        (DECRQ, counter_extras(1, initial=1), b""),
    ],
)
def test_quiet_commands_are_silent_on_success(conn, opcode, extras, value):
    if opcode in (APPENDQ, PREPENDQ, DELETEQ):
        set_value(conn, b"qk", b"0")
    conn.send(request(opcode, key=b"qk", extras=extras, value=value) + request(NOOP, opaque=1))
    response = read_response(conn)
    assert (response.opcode, response.opaque) == (NOOP, 1)


def test_quiet_commands_still_report_errors(conn):
    set_value(conn, b"exists", b"1")
    conn.send(request(ADDQ, key=b"exists", extras=storage_extras(), value=b"2", opaque=1)
              + request(REPLACEQ, key=b"missing", extras=storage_extras(), value=b"2", opaque=2)
              + request(DELETEQ, key=b"missing", opaque=3)
              + request(NOOP, opaque=4))
    responses = [read_response(conn) for _ in range(4)]
    assert [(r.opcode, r.status, r.opaque) for r in responses] == [
        (ADDQ, KEY_EXISTS, 1), (REPLACEQ, KEY_NOT_FOUND, 2), (DELETEQ, KEY_NOT_FOUND, 3), (NOOP, OK, 4)
    ]


# --- flush / stat / version / noop / quit -------------------------------------------------------


def test_flush_removes_everything(conn):
    set_value(conn, b"f", b"v")
    assert call(conn, FLUSH).status == OK
    assert get_value(conn, b"f") is None


def test_flush_with_delay_removes_items_after_the_delay(conn):
    set_value(conn, b"f", b"v")
    assert call(conn, FLUSH, extras=struct.pack("!I", 2)).status == OK
    assert get_value(conn, b"f") == (0, b"v")
    deadline = time.monotonic() + 4.5
    while get_value(conn, b"f") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get_value(conn, b"f") is None


def test_flushq_is_silent(conn):
    set_value(conn, b"f", b"v")
    conn.send(request(FLUSHQ) + request(NOOP, opaque=8))
    assert read_response(conn).opaque == 8
    assert get_value(conn, b"f") is None


def test_stat_streams_key_values_then_empty_terminator(conn):
    stats = {}
    conn.send(request(STAT, opaque=4))
    for _ in range(500):
        response = read_response(conn)
        assert (response.opcode, response.status, response.opaque) == (STAT, OK, 4)
        if not response.key:
            break
        stats[response.key] = response.value
    assert response.key == b"" and response.value == b""
    assert {b"pid", b"uptime", b"curr_items", b"get_hits", b"version"} <= set(stats)


def test_version_returns_version_string(conn):
    response = call(conn, VERSION)
    assert response.status == OK and response.value and b" " not in response.value


def test_noop_echoes_opaque(conn):
    assert call(conn, NOOP, opaque=0xCAFEBABE) == Response(NOOP, OK, 0xCAFEBABE, 0, b"", b"", b"")


def test_quit_answers_then_closes(conn):
    response = call(conn, QUIT, opaque=6)
    assert (response.opcode, response.status, response.opaque) == (QUIT, OK, 6)
    assert conn.is_closed_by_peer()


def test_quitq_closes_without_answer(conn):
    conn.send(request(QUITQ))
    assert conn.recv_available(quiet_s=0.3) == b""
    assert conn.is_closed_by_peer()


def test_unknown_opcode_is_unknown_command(conn):
    assert_error(call(conn, 0xEE), 0xEE, UNKNOWN_COMMAND)
    assert call(conn, NOOP, opaque=1).opaque == 1  # the connection stays usable


def test_get_without_key_is_invalid_arguments_and_closes(conn):
    assert_error(call(conn, GET), GET, INVALID_ARGUMENTS)
    assert conn.is_closed_by_peer()
