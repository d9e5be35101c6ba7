"""Text protocol: every command as a client sees it, byte for byte as memcached 1.6 answers.

pymemcache drives the semantic checks; raw sockets pin exact bytes where the bytes are the contract.
Expiry tests use 1-3 s TTLs and bounded polling.
"""

import random
import re
import subprocess
import time
import urllib.parse

import pytest

import harness
from harness import IS_MEMCACHED, requires_tandem, stats
from loadgen import pipelined_hits, pipelined_set

MAX_KEY = b"k" * 250
# The largest value memcached 1.6.18 stores with a 250-byte key at -I 1m (measured: item header, key and
# value must fit the 1 MiB item limit). tandemd must store at least this much.
MAX_VALUE_WITH_MAX_KEY = 1048267


def wait_until(predicate, timeout_s, step_s=0.1):
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; returns its last result."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / step_s) + 2):
        if predicate():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(step_s)
    return predicate()


def cas_unique(conn, key):
    conn.send(b"gets " + key + b"\r\n")
    header = conn.recv_until(b"\r\n")
    match = re.match(rb"VALUE \S+ \d+ (\d+) (\d+)\r\n", header)
    assert match, header
    conn.recv_until(b"END\r\n")
    return int(match.group(2))


# --- storage commands ---------------------------------------------------------------------------


def test_set_then_get_returns_value_and_flags(conn):
    conn.expect(b"set greeting 42 0 5\r\nhello\r\n", b"STORED\r\n")
    conn.expect(b"get greeting\r\n", b"VALUE greeting 42 5\r\nhello\r\nEND\r\n")


def test_get_of_missing_key_is_just_end(conn):
    conn.expect(b"get nothing-here\r\n", b"END\r\n")


def test_zero_byte_value_round_trips(conn):
    conn.expect(b"set empty 0 0 0\r\n\r\n", b"STORED\r\n")
    conn.expect(b"get empty\r\n", b"VALUE empty 0 0\r\n\r\nEND\r\n")


def test_flags_use_full_32_bits(conn):
    conn.expect(b"set f 4294967295 0 1\r\nx\r\n", b"STORED\r\n")
    conn.expect(b"get f\r\n", b"VALUE f 4294967295 1\r\nx\r\nEND\r\n")


def test_largest_value_under_1m_item_limit_round_trips(start):
    server = start("-I", "1m")
    conn = server.raw(timeout=10)
    value = bytes(random.Random(7).getrandbits(8) for _ in range(256)) * (MAX_VALUE_WITH_MAX_KEY // 256)
    value += b"z" * (MAX_VALUE_WITH_MAX_KEY - len(value))
    conn.expect(b"set " + MAX_KEY + b" 0 0 %d\r\n" % len(value) + value + b"\r\n", b"STORED\r\n")
    expected = b"VALUE " + MAX_KEY + b" 0 %d\r\n" % len(value) + value + b"\r\nEND\r\n"
    conn.expect(b"get " + MAX_KEY + b"\r\n", expected)


def test_value_of_full_mebibyte_is_refused_as_too_large(start):
    # memcached counts its ~50-byte item header and the key against -I, so a value of exactly 1 MiB is
    # refused there. tandemd's limit is on the value itself: -I bytes fit, one more does not.
    server = start("-I", "1m")
    conn = server.raw(timeout=10)
    size = 1024 * 1024
    if IS_MEMCACHED:
        conn.expect(b"set big 0 0 %d\r\n" % size + b"v" * size + b"\r\n",
                    b"SERVER_ERROR object too large for cache\r\n")
        conn.expect(b"get big\r\n", b"END\r\n")
        return
    conn.expect(b"set big 0 0 %d\r\n" % size + b"v" * size + b"\r\n", b"STORED\r\n")
    conn.send(b"get big\r\n")
    assert conn.recv_exact(len(b"VALUE big 0 %d\r\n" % size) + size + 7).endswith(b"v\r\nEND\r\n")
    conn.expect(b"set bigger 0 0 %d\r\n" % (size + 1) + b"v" * (size + 1) + b"\r\n",
                b"SERVER_ERROR object too large for cache\r\n")
    conn.expect(b"get bigger\r\n", b"END\r\n")


def test_key_of_250_bytes_is_accepted(conn):
    conn.expect(b"set " + MAX_KEY + b" 0 0 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"get " + MAX_KEY + b"\r\n", b"VALUE " + MAX_KEY + b" 0 1\r\nv\r\nEND\r\n")


def test_key_of_251_bytes_is_refused_by_get(conn):
    conn.expect(b"get " + b"k" * 251 + b"\r\n", b"CLIENT_ERROR bad command line format\r\n")


def test_key_of_251_bytes_is_refused_by_set(conn):
    # memcached refuses the command line and then reads the data line as a command of its own.
    conn.expect(b"set " + b"k" * 251 + b" 0 0 1\r\nv\r\n", b"CLIENT_ERROR bad command line format\r\nERROR\r\n")
    conn.expect(b"get " + b"k" * 250 + b"\r\n", b"END\r\n")


def test_key_with_control_characters_works_in_every_text_command(conn):
    # memcached 1.6.18 checks only a key's length: a tab, a lone CR and other control bytes are key bytes.
    key = b"\x10\x10a\x01b\tc\x7fd\re"
    conn.expect(b"set " + key + b" 3 0 2\r\n10\r\n", b"STORED\r\n")
    conn.expect(b"incr " + key + b" 5\r\n", b"15\r\n")
    conn.expect(b"append " + key + b" 0 0 1\r\n0\r\n", b"STORED\r\n")
    conn.expect(b"touch " + key + b" 100\r\n", b"TOUCHED\r\n")
    conn.expect(b"gat 100 " + key + b" other\x01\r\n", b"VALUE " + key + b" 3 3\r\n150\r\nEND\r\n")
    conn.send(b"gets " + key + b"\r\n")
    unique = re.fullmatch(rb"VALUE " + re.escape(key) + rb" 3 3 (\d+)\r\n150\r\nEND\r\n", conn.recv_until(b"END\r\n"))
    assert unique, "gets names the key as sent"
    conn.expect(b"cas " + key + b" 4 0 1 " + unique.group(1) + b"\r\nx\r\n", b"STORED\r\n")
    conn.expect(b"get " + key + b"\r\n", b"VALUE " + key + b" 4 1\r\nx\r\nEND\r\n")
    conn.expect(b"delete " + key + b"\r\n", b"DELETED\r\n")
    conn.expect(b"get " + key + b"\r\n", b"END\r\n")


def test_add_stores_only_when_key_is_absent(conn):
    conn.expect(b"add a 0 0 1\r\n1\r\n", b"STORED\r\n")
    conn.expect(b"add a 0 0 1\r\n2\r\n", b"NOT_STORED\r\n")
    conn.expect(b"get a\r\n", b"VALUE a 0 1\r\n1\r\nEND\r\n")


def test_replace_stores_only_when_key_is_present(conn):
    conn.expect(b"replace r 0 0 1\r\n1\r\n", b"NOT_STORED\r\n")
    conn.expect(b"get r\r\n", b"END\r\n")
    conn.expect(b"set r 0 0 1\r\n1\r\n", b"STORED\r\n")
    conn.expect(b"replace r 7 0 1\r\n2\r\n", b"STORED\r\n")
    conn.expect(b"get r\r\n", b"VALUE r 7 1\r\n2\r\nEND\r\n")


def test_append_and_prepend_extend_value_and_keep_flags(conn):
    conn.expect(b"set ap 5 0 2\r\nmm\r\n", b"STORED\r\n")
    conn.expect(b"append ap 9 0 1\r\nZ\r\n", b"STORED\r\n")
    conn.expect(b"prepend ap 9 0 1\r\nA\r\n", b"STORED\r\n")
    conn.expect(b"get ap\r\n", b"VALUE ap 5 4\r\nAmmZ\r\nEND\r\n")


def test_append_and_prepend_on_missing_key_are_not_stored(conn):
    conn.expect(b"append nope 0 0 1\r\nx\r\n", b"NOT_STORED\r\n")
    conn.expect(b"prepend nope 0 0 1\r\nx\r\n", b"NOT_STORED\r\n")
    conn.expect(b"get nope\r\n", b"END\r\n")


# --- cas ----------------------------------------------------------------------------------------


def test_gets_returns_a_cas_unique_that_changes_on_write(conn):
    conn.expect(b"set c 0 0 1\r\n1\r\n", b"STORED\r\n")
    first = cas_unique(conn, b"c")
    conn.expect(b"set c 0 0 1\r\n2\r\n", b"STORED\r\n")
    assert cas_unique(conn, b"c") != first


def test_cas_race_first_writer_wins_second_gets_exists(server):
    alice, bob = server.raw(), server.raw()
    alice.expect(b"set race 0 0 4\r\nzero\r\n", b"STORED\r\n")
    unique_alice, unique_bob = cas_unique(alice, b"race"), cas_unique(bob, b"race")
    assert unique_alice == unique_bob
    alice.expect(b"cas race 0 0 5 %d\r\nalice\r\n" % unique_alice, b"STORED\r\n")
    bob.expect(b"cas race 0 0 3 %d\r\nbob\r\n" % unique_bob, b"EXISTS\r\n")
    bob.expect(b"get race\r\n", b"VALUE race 0 5\r\nalice\r\nEND\r\n")


def test_cas_on_missing_key_is_not_found(conn):
    conn.expect(b"cas ghost 0 0 1 12345\r\nx\r\n", b"NOT_FOUND\r\n")
    conn.expect(b"get ghost\r\n", b"END\r\n")


def test_cas_with_pymemcache_reports_outcomes(server):
    client = server.client()
    client.set("pc", b"v1")
    _, unique = client.gets("pc")
    assert client.cas("pc", b"v2", unique) is True
    assert client.cas("pc", b"v3", unique) is False
    assert client.cas("missing-pc", b"v", unique) is None
    assert client.get("pc") == b"v2"


def test_without_cas_disabled_gets_shows_zero_cas(start):
    # -C disables CAS: memcached 1.6.18 still answers gets, with a cas unique of 0, and a cas command then
    # answers EXISTS whatever unique it carries.
    conn = start("-C").raw()
    conn.expect(b"set k 0 0 1\r\na\r\n", b"STORED\r\n")
    conn.expect(b"gets k\r\n", b"VALUE k 0 1 0\r\na\r\nEND\r\n")
    conn.expect(b"cas k 0 0 1 0\r\nb\r\n", b"EXISTS\r\n")
    conn.expect(b"get k\r\n", b"VALUE k 0 1\r\na\r\nEND\r\n")


# --- expiry, touch, gat -------------------------------------------------------------------------


def test_relative_ttl_expires_the_item(client):
    client.set("ttl", b"v", expire=1)
    assert client.get("ttl") == b"v"
    assert wait_until(lambda: client.get("ttl") is None, timeout_s=3.5)


def test_absolute_unix_time_ttl_expires_the_item(server, client):
    now = int(stats(server)["time"])
    client.set("abs", b"v", expire=now + 2)
    assert client.get("abs") == b"v"
    assert wait_until(lambda: client.get("abs") is None, timeout_s=4.5)


def test_absolute_unix_time_in_the_past_is_expired_at_once(server, client):
    now = int(stats(server)["time"])
    client.set("past", b"v", expire=now - 10)
    assert client.get("past") is None


def test_negative_ttl_is_expired_at_once(conn):
    conn.expect(b"set neg 0 -1 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"get neg\r\n", b"END\r\n")


def test_touch_extends_expiry(conn):
    conn.expect(b"set t 0 1 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"touch t 60\r\n", b"TOUCHED\r\n")
    time.sleep(2.2)
    conn.expect(b"get t\r\n", b"VALUE t 0 1\r\nv\r\nEND\r\n")


def test_touch_shortens_expiry(conn):
    conn.expect(b"set t 0 60 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"touch t 1\r\n", b"TOUCHED\r\n")
    assert wait_until(lambda: conn.call(b"get t\r\n", 5) == b"END\r\n", timeout_s=3.5)


def test_touch_on_missing_key_is_not_found(conn):
    conn.expect(b"touch nope 10\r\n", b"NOT_FOUND\r\n")


def test_gat_returns_value_and_sets_new_expiry(conn):
    conn.expect(b"set g 3 60 2\r\nhi\r\n", b"STORED\r\n")
    conn.expect(b"gat 1 g missing\r\n", b"VALUE g 3 2\r\nhi\r\nEND\r\n")
    assert wait_until(lambda: conn.call(b"get g\r\n", 5) == b"END\r\n", timeout_s=3.5)


def test_gats_returns_value_with_cas_and_extends_expiry(conn):
    conn.expect(b"set g 0 1 2\r\nhi\r\n", b"STORED\r\n")
    unique = cas_unique(conn, b"g")
    conn.expect(b"gats 60 g\r\n", b"VALUE g 0 2 %d\r\nhi\r\nEND\r\n" % unique)
    time.sleep(2.2)
    conn.expect(b"get g\r\n", b"VALUE g 0 2\r\nhi\r\nEND\r\n")


def test_gat_with_non_numeric_exptime_is_client_error(conn):
    conn.expect(b"gat soon g\r\n", b"CLIENT_ERROR invalid exptime argument\r\n")


# --- incr / decr --------------------------------------------------------------------------------


def test_incr_and_decr_return_new_value(conn):
    conn.expect(b"set n 0 0 2\r\n10\r\n", b"STORED\r\n")
    conn.expect(b"incr n 5\r\n", b"15\r\n")
    conn.expect(b"decr n 3\r\n", b"12\r\n")
    conn.expect(b"get n\r\n", b"VALUE n 0 2\r\n12\r\nEND\r\n")


def test_incr_wraps_at_2_pow_64(conn):
    conn.expect(b"set n 0 0 20\r\n18446744073709551615\r\n", b"STORED\r\n")
    conn.expect(b"incr n 1\r\n", b"0\r\n")


def test_incr_by_largest_delta_wraps(conn):
    conn.expect(b"set n 0 0 1\r\n1\r\n", b"STORED\r\n")
    conn.expect(b"incr n 18446744073709551615\r\n", b"0\r\n")


def test_decr_floors_at_zero(conn):
    conn.expect(b"set n 0 0 1\r\n5\r\n", b"STORED\r\n")
    conn.expect(b"decr n 100\r\n", b"0\r\n")


def test_incr_growing_digits_lengthens_value(conn):
    conn.expect(b"set n 0 0 2\r\n99\r\n", b"STORED\r\n")
    conn.expect(b"incr n 1\r\n", b"100\r\n")
    conn.expect(b"get n\r\n", b"VALUE n 0 3\r\n100\r\nEND\r\n")


def test_decr_shrinking_digits_pads_value_with_spaces(conn):
    # memcached decrements in place: the stored length stays, the number is padded with spaces.
    conn.expect(b"set n 0 0 3\r\n100\r\n", b"STORED\r\n")
    conn.expect(b"decr n 1\r\n", b"99\r\n")
    conn.expect(b"get n\r\n", b"VALUE n 0 3\r\n99 \r\nEND\r\n")


def test_incr_on_non_numeric_value_is_client_error(conn):
    conn.expect(b"set s 0 0 3\r\nabc\r\n", b"STORED\r\n")
    conn.expect(b"incr s 1\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")
    conn.expect(b"decr s 1\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")


@pytest.mark.parametrize("delta", [b"abc", b"-1", b"18446744073709551616"])
def test_incr_with_invalid_delta_is_client_error(conn, delta):
    conn.expect(b"set n 0 0 1\r\n1\r\n", b"STORED\r\n")
    conn.expect(b"incr n " + delta + b"\r\n", b"CLIENT_ERROR invalid numeric delta argument\r\n")


def test_incr_and_decr_on_missing_key_are_not_found(conn):
    conn.expect(b"incr missing 1\r\n", b"NOT_FOUND\r\n")
    conn.expect(b"decr missing 1\r\n", b"NOT_FOUND\r\n")


# --- delete, flush_all --------------------------------------------------------------------------


def test_delete_removes_then_reports_not_found(conn):
    conn.expect(b"set d 0 0 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"delete d\r\n", b"DELETED\r\n")
    conn.expect(b"delete d\r\n", b"NOT_FOUND\r\n")
    conn.expect(b"get d\r\n", b"END\r\n")


def test_delete_with_a_time_argument_is_refused(conn):
    conn.expect(b"delete d 5\r\n",
                b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n")


def test_flush_all_removes_every_item(client):
    client.set_many({f"f{i}": b"v" for i in range(20)})
    assert client.flush_all() is True
    assert client.get_many([f"f{i}" for i in range(20)]) == {}


def test_flush_all_with_delay_removes_items_only_after_the_delay(conn):
    conn.expect(b"set later 0 0 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"flush_all 2\r\n", b"OK\r\n")
    conn.expect(b"get later\r\n", b"VALUE later 0 1\r\nv\r\nEND\r\n")
    assert wait_until(lambda: conn.call(b"get later\r\n", 5) == b"END\r\n", timeout_s=4.5)


def test_flush_all_with_invalid_delay_is_client_error(conn):
    conn.expect(b"flush_all soon\r\n", b"CLIENT_ERROR invalid exptime argument\r\n")


def test_flush_all_is_refused_when_disabled(start):
    conn = start("-F").raw()
    conn.expect(b"set kept 0 0 1\r\nv\r\n", b"STORED\r\n")
    conn.expect(b"flush_all\r\n", b"CLIENT_ERROR flush_all not allowed\r\n")
    conn.expect(b"flush_all noreply\r\n" + b"get kept\r\n", b"VALUE kept 0 1\r\nv\r\nEND\r\n")


# --- noreply ------------------------------------------------------------------------------------

NOREPLY_CASES = {
    "set": (b"", b"set k 0 0 1 noreply\r\nA\r\n", b"VALUE k 0 1\r\nA\r\nEND\r\n"),
    "add": (b"", b"add k 0 0 1 noreply\r\nA\r\n", b"VALUE k 0 1\r\nA\r\nEND\r\n"),
    "replace": (b"set k 0 0 1\r\nA\r\n", b"replace k 0 0 1 noreply\r\nB\r\n", b"VALUE k 0 1\r\nB\r\nEND\r\n"),
    "append": (b"set k 0 0 1\r\nA\r\n", b"append k 0 0 1 noreply\r\nB\r\n", b"VALUE k 0 2\r\nAB\r\nEND\r\n"),
    "prepend": (b"set k 0 0 1\r\nA\r\n", b"prepend k 0 0 1 noreply\r\nB\r\n", b"VALUE k 0 2\r\nBA\r\nEND\r\n"),
    "incr": (b"set k 0 0 1\r\n1\r\n", b"incr k 5 noreply\r\n", b"VALUE k 0 1\r\n6\r\nEND\r\n"),
    "decr": (b"set k 0 0 1\r\n9\r\n", b"decr k 5 noreply\r\n", b"VALUE k 0 1\r\n4\r\nEND\r\n"),
    "delete": (b"set k 0 0 1\r\nA\r\n", b"delete k noreply\r\n", b"END\r\n"),
    "touch": (b"set k 0 1 1\r\nA\r\n", b"touch k 0 noreply\r\n", b"VALUE k 0 1\r\nA\r\nEND\r\n"),
    "flush_all": (b"set k 0 0 1\r\nA\r\n", b"flush_all noreply\r\n", b"END\r\n"),
    "verbosity": (b"set k 0 0 1\r\nA\r\n", b"verbosity 1 noreply\r\n", b"VALUE k 0 1\r\nA\r\nEND\r\n"),
}


@pytest.mark.parametrize("command", sorted(NOREPLY_CASES))
def test_noreply_sends_nothing_and_takes_effect(conn, command):
    setup, silent, get_reply = NOREPLY_CASES[command]
    if setup:
        conn.expect(setup, b"STORED\r\n")
    conn.send(silent)
    if command == "touch":
        time.sleep(2.2)  # the item would have expired by now had touch (exptime 0 = never) not applied
    conn.expect(b"get k\r\n", get_reply)


def test_noreply_cas_sends_nothing_and_takes_effect(conn):
    conn.expect(b"set k 0 0 1\r\nA\r\n", b"STORED\r\n")
    unique = cas_unique(conn, b"k")
    conn.expect(b"cas k 0 0 1 %d noreply\r\nB\r\nget k\r\n" % unique, b"VALUE k 0 1\r\nB\r\nEND\r\n")


# --- multi-get ----------------------------------------------------------------------------------


def test_multi_get_of_100_keys_returns_hits_in_request_order(conn):
    keys = [b"mk%03d" % i for i in range(100)]
    stored = set(keys[::2])
    for key in sorted(stored):
        conn.expect(b"set " + key + b" 0 0 " + b"%d" % len(key) + b"\r\n" + key + b"\r\n", b"STORED\r\n")
    order = keys[:]
    random.Random(42).shuffle(order)
    expected = b"".join(
        b"VALUE " + key + b" 0 %d\r\n" % len(key) + key + b"\r\n" for key in order if key in stored
    ) + b"END\r\n"
    conn.expect(b"get " + b" ".join(order) + b"\r\n", expected)


def test_get_many_with_pymemcache_returns_only_hits(client):
    client.set_many({f"pm{i}": str(i).encode() for i in range(0, 100, 3)})
    found = client.get_many([f"pm{i}" for i in range(100)])
    assert found == {f"pm{i}": str(i).encode() for i in range(0, 100, 3)}


# --- misc commands ------------------------------------------------------------------------------


def test_version_answers_version_line(conn):
    conn.send(b"version\r\n")
    assert re.fullmatch(rb"VERSION \S+\r\n", conn.recv_until(b"\r\n"))


def test_verbosity_answers_ok(conn):
    conn.expect(b"verbosity 1\r\n", b"OK\r\n")


def test_quit_closes_the_connection(conn):
    conn.send(b"quit\r\n")
    assert conn.is_closed_by_peer()


def test_unknown_command_is_error(conn):
    conn.expect(b"bogus\r\n", b"ERROR\r\n")
    conn.expect(b"GET k\r\n", b"ERROR\r\n")  # commands are case-sensitive


def test_shutdown_is_refused_without_dash_a(server, conn):
    conn.expect(b"shutdown\r\n", b"ERROR: shutdown not enabled\r\n")
    assert server.is_alive()
    harness.assert_served(server)


def test_shutdown_with_dash_a_stops_the_server(start):
    server = start("-A")
    conn = server.raw()
    conn.send(b"shutdown\r\n")
    assert conn.is_closed_by_peer()
    assert server.wait_exit(timeout_s=5) is not None


# --- stats --------------------------------------------------------------------------------------

GENERAL_STATS = (
    "pid uptime time version pointer_size rusage_user rusage_system curr_connections total_connections "
    "rejected_connections cmd_get cmd_set cmd_flush cmd_touch get_hits get_misses get_expired get_flushed "
    "delete_hits delete_misses incr_hits incr_misses decr_hits decr_misses cas_hits cas_misses cas_badval "
    "touch_hits touch_misses bytes_read bytes_written limit_maxbytes threads curr_items total_items bytes "
    "evictions reclaimed"
).split()


def test_stats_lists_every_general_counter(server):
    general = stats(server)
    missing = [name for name in GENERAL_STATS if name not in general]
    assert missing == []
    assert int(general["pid"]) == server.pid
    assert int(general["threads"]) == 2
    assert int(general["limit_maxbytes"]) == 64 * 1024 * 1024


def test_stats_counters_follow_operations(server):
    conn = server.raw()
    before = {name: int(float(value)) for name, value in stats(server).items() if name in GENERAL_STATS
              and name not in ("version",)}
    conn.expect(b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\nx\r\n", b"STORED\r\nSTORED\r\n")
    conn.expect(b"get a b nope\r\n", b"VALUE a 0 1\r\n1\r\nVALUE b 0 1\r\nx\r\nEND\r\n")
    conn.expect(b"incr a 1\r\nincr nope 1\r\ndecr a 1\r\ndecr nope 1\r\n", b"2\r\nNOT_FOUND\r\n1\r\nNOT_FOUND\r\n")
    conn.expect(b"touch a 0\r\ntouch nope 0\r\n", b"TOUCHED\r\nNOT_FOUND\r\n")
    unique = cas_unique(conn, b"b")
    conn.expect(b"cas b 0 0 1 %d\r\ny\r\ncas b 0 0 1 %d\r\nz\r\ncas nope 0 0 1 1\r\nz\r\n" % (unique, unique),
                b"STORED\r\nEXISTS\r\nNOT_FOUND\r\n")
    conn.expect(b"delete b\r\ndelete b\r\n", b"DELETED\r\nNOT_FOUND\r\n")
    after = {name: int(float(value)) for name, value in stats(server).items() if name in before}
    delta = {name: after[name] - before[name] for name in before}
    expected = {
        "cmd_set": 5, "cmd_get": 4, "get_hits": 3, "get_misses": 1, "incr_hits": 1, "incr_misses": 1,
        "decr_hits": 1, "decr_misses": 1, "touch_hits": 1, "touch_misses": 1, "cmd_touch": 2, "cas_hits": 1,
        "cas_badval": 1, "cas_misses": 1, "delete_hits": 1, "delete_misses": 1, "curr_items": 1,
        "total_items": 3,
    }
    assert {name: delta[name] for name in expected} == expected
    assert delta["bytes_read"] > 0 and delta["bytes_written"] > 0
    assert after["curr_connections"] >= 2  # this connection and the stats one


def settled_stats(server):
    """`stats` once curr_connections stops moving: each `stats()` call opens its own connection, and a
    server notices the previous one's close only when it sees EOF, so one read can still count it."""
    current = stats(server)
    for _ in range(40):  # bounded: 2 s
        time.sleep(0.05)
        again = stats(server)
        if again["curr_connections"] == current["curr_connections"]:
            return again
        current = again
    return current


def test_stats_counts_connections(server):
    before = settled_stats(server)
    extra = [server.raw() for _ in range(3)]
    for conn in extra:
        conn.expect(b"version\r\n", b"VERSION " + before["version"].encode() + b"\r\n")
    # total_connections only grows: one read right away counts the 3 extra ones and its own.
    assert int(stats(server)["total_connections"]) == int(before["total_connections"]) + 4
    after = settled_stats(server)
    assert int(after["curr_connections"]) == int(before["curr_connections"]) + 3


def test_stats_counts_flush_expired_and_flushed_gets(server):
    conn = server.raw()
    conn.expect(b"set soon 0 1 1\r\nv\r\nset f 0 0 1\r\nv\r\n", b"STORED\r\nSTORED\r\n")
    before = stats(server)
    conn.expect(b"flush_all 0\r\n", b"OK\r\n")
    conn.expect(b"get f\r\n", b"END\r\n")
    after = stats(server)
    assert int(after["cmd_flush"]) - int(before["cmd_flush"]) == 1
    assert int(after["get_flushed"]) - int(before["get_flushed"]) == 1
    conn.expect(b"set soon 0 1 1\r\nv\r\n", b"STORED\r\n")
    assert wait_until(lambda: conn.call(b"get soon\r\n", 5) == b"END\r\n", timeout_s=3.5)
    assert int(stats(server)["get_expired"]) - int(after["get_expired"]) == 1


@pytest.mark.parametrize("group", ["settings", "items", "slabs", "sizes", "conns"])
def test_stats_group_answers_stat_lines_then_end(server, group):
    server.client().set("something", b"v")
    conn = server.raw()
    conn.send(b"stats " + group.encode() + b"\r\n")
    reply = conn.recv_until(b"END\r\n")
    assert reply.endswith(b"END\r\n")
    lines = reply.split(b"\r\n")[:-2]
    assert lines, reply
    assert all(re.fullmatch(rb"STAT \S+ .*", line) for line in lines), reply


def test_stats_settings_reflects_flags(start):
    server = start("-m", "32", "-c", "77")
    settings = stats(server, "settings")
    assert int(settings["maxbytes"]) == 32 * 1024 * 1024
    assert int(settings["maxconns"]) == 77
    assert int(settings["num_threads"]) == 2


# --- memory limits ------------------------------------------------------------------------------


def test_out_of_memory_with_dash_m_refuses_stores_and_keeps_items(start):
    conn = start("-M", "-m", "8").raw()
    value = b"x" * 1000
    stored = 0
    reply = b""
    for index in range(20000):  # 8 MiB holds well under 20000 items of 1 KB
        conn.send(b"set oom%d 0 0 %d\r\n" % (index, len(value)) + value + b"\r\n")
        reply = conn.recv_until(b"\r\n")
        if reply != b"STORED\r\n":
            break
        stored += 1
    assert reply == b"SERVER_ERROR out of memory storing object\r\n"
    assert stored > 1000
    for index in (0, stored // 2, stored - 1):
        conn.expect(b"get oom%d\r\n" % index, b"VALUE oom%d 0 1000\r\n" % index + value + b"\r\nEND\r\n")


@requires_tandem("memcached counts its item header against -I, so a value of exactly -I bytes is refused there")
def test_values_larger_than_a_segment_round_trip_and_evict(start):
    # tandemd's arena is cut into 1 MiB segments; bigger values continue across segments.
    server = start("-m", "64", "-I", "8m")
    client = server.client(timeout=30)
    sizes = [1024 * 1024 + 1, 2 * 1024 * 1024 + 17, 5 * 1000 * 1000, 8 * 1024 * 1024]
    for size in sizes:
        value = bytes((i * 7 + size) % 251 for i in range(size))
        assert client.set(b"big:%d" % size, value)
        assert client.get(b"big:%d" % size) == value
    conn = server.raw(timeout=30)
    too_big = 8 * 1024 * 1024 + 1
    conn.expect(b"set over 0 0 %d\r\n" % too_big + b"o" * too_big + b"\r\n",
                b"SERVER_ERROR object too large for cache\r\n")
    # Twenty 5 MB values through 64 MB: the oldest go, the newest stay whole.
    for i in range(20):
        assert client.set(b"churn:%d" % i, bytes([i]) * (5 * 1000 * 1000))
    assert client.get(b"churn:19") == bytes([19]) * (5 * 1000 * 1000)
    assert client.get(b"churn:0") is None
    assert int(stats(server)["evictions"]) > 0


# --- cache_memlimit and stats cachedump ---------------------------------------------------------
# pymemcache's own suite (its test_misc) uses both.

MIB = 1024 * 1024


@pytest.mark.parametrize("line, reply", [
    (b"cache_memlimit\r\n", b"ERROR\r\n"),
    (b"cache_memlimit x\r\n", b"ERROR\r\n"),
    (b"cache_memlimit -1\r\n", b"ERROR\r\n"),
    (b"cache_memlimit 50 foo bar\r\n", b"ERROR\r\n"),
    (b"cache_memlimit 7\r\n", b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"),
    (b"cache_memlimit 1000000001\r\n", b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"),
    (b"stats cachedump\r\n", b"CLIENT_ERROR bad command line\r\n"),
    (b"stats cachedump 1\r\n", b"CLIENT_ERROR bad command line\r\n"),
    (b"stats cachedump x 1\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"stats cachedump 1 -1\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"stats cachedump 64 1\r\n", b"CLIENT_ERROR Illegal slab id\r\n"),
    (b"stats cachedump 63 1\r\n", b"END\r\n"),
    (b"stats cachedump 0 0\r\n", b"END\r\n"),
])
def test_cache_memlimit_and_cachedump_answer_bad_arguments_as_memcached(conn, line, reply):
    conn.expect(line, reply)
    conn.expect(b"version\r\n", b"VERSION ")  # nothing else was sent


def test_cache_memlimit_with_noreply_is_silent_even_when_refused(server, conn):
    conn.send(b"cache_memlimit 7 noreply\r\ncache_memlimit x noreply\r\ncache_memlimit 32 noreply\r\n")
    conn.expect(b"mn\r\n", b"MN\r\n")
    assert int(stats(server)["limit_maxbytes"]) == 32 * MIB


def test_cache_memlimit_changes_limit_maxbytes(server, conn):
    conn.expect(b"cache_memlimit 32\r\n", b"OK\r\n")
    assert int(stats(server)["limit_maxbytes"]) == 32 * MIB
    assert int(stats(server, "settings")["maxbytes"]) == 32 * MIB
    conn.expect(b"cache_memlimit 64 x\r\n", b"OK\r\n")  # a last token other than noreply is ignored
    assert int(stats(server)["limit_maxbytes"]) == 64 * MIB


@requires_tandem("memcached mallocs more pages; tandemd's arenas are mapped from -m at start-up")
def test_cache_memlimit_above_the_start_up_limit_is_refused(start):
    server = start("-m", "64", "-t", "2")
    conn = server.raw()
    conn.expect(b"cache_memlimit 65\r\n", b"MEMLIMIT_ADJUST_FAILED out of bounds or unable to adjust\r\n")
    assert int(stats(server)["limit_maxbytes"]) == 64 * MIB


@requires_tandem("memcached keeps the slab pages it holds when its limit is lowered; tandemd evicts down to it")
def test_a_lowered_cache_memlimit_caps_the_items_kept(start):
    server = start("-m", "64", "-t", "2")
    conn = server.raw(timeout=30)
    value = b"v" * 1000
    assert pipelined_set(conn, [b"before:%d" % i for i in range(70_000)], value) == 70_000
    assert int(stats(server)["bytes"]) > 48 * MIB
    conn.expect(b"cache_memlimit 16\r\n", b"OK\r\n")
    assert int(stats(server)["limit_maxbytes"]) == 16 * MIB
    # Writing more makes each shard evict down to its half of the new limit.
    after = [b"after:%d" % i for i in range(40_000)]
    assert pipelined_set(conn, after, value) == len(after)
    general = stats(server)
    print(f"after cache_memlimit 16: bytes {general['bytes']}, curr_items {general['curr_items']}, "
          f"segments_used {general['segments_used']}/{general['segments_total']}, evictions {general['evictions']}")
    assert int(general["bytes"]) <= 16 * MIB
    assert int(general["segments_used"]) * MIB <= 16 * MIB
    assert int(general["segments_total"]) == 16
    assert 8_000 < int(general["curr_items"]) < 16 * MIB // 1000
    assert pipelined_hits(conn, after[-2000:], len(value)) == 2000, "the newest items are kept"
    assert pipelined_hits(conn, [b"before:%d" % i for i in range(69_000, 70_000)], len(value)) == 0
    # Raised again, up to -m: the store grows back.
    conn.expect(b"cache_memlimit 64\r\n", b"OK\r\n")
    assert pipelined_set(conn, [b"again:%d" % i for i in range(60_000)], value) == 60_000
    assert int(stats(server)["bytes"]) > 48 * MIB


# A key holds any byte but a space (control characters too), as memcached lists it.
CACHEDUMP_LINE = re.compile(rb"ITEM ([^ ]+) \[(\d+) b; (\d+) s\]")


def cachedump(conn, line):
    conn.send(line)
    reply = conn.recv_until(b"END\r\n")
    assert reply.endswith(b"END\r\n"), reply
    lines = reply.split(b"\r\n")[:-2]
    assert all(CACHEDUMP_LINE.fullmatch(item) for item in lines), reply
    return [CACHEDUMP_LINE.fullmatch(item).groups() for item in lines]


def test_stats_cachedump_lists_keys_sizes_and_expiry(start):
    # One worker: its store is class 1 (memcached puts these small items in class 1 too).
    conn = start("-t", "1").raw()
    conn.expect(b"set foo 0 0 3\r\nbar\r\n", b"STORED\r\n")
    conn.expect(b"set ex 5 100 2\r\nhi\r\n", b"STORED\r\n")
    expected_expiry = time.time() + 100
    items = {}

    def dumped():
        # memcached lists a class's COLD LRU, which its LRU maintainer fills a moment after a set.
        items.update((key, (int(size), int(exptime))) for key, size, exptime in cachedump(conn, b"stats cachedump 1 0\r\n"))
        return len(items) == 2

    assert wait_until(dumped, timeout_s=5), items
    assert set(items) == {b"foo", b"ex"}
    assert items[b"foo"] == (3, 0)
    assert items[b"ex"][0] == 2 and abs(items[b"ex"][1] - expected_expiry) <= 2, items
    assert len(cachedump(conn, b"stats cachedump 1 1\r\n")) == 1
    assert cachedump(conn, b"stats cachedump 2 0\r\n") == []


def test_dumps_list_keys_with_control_characters_as_memcached(start):
    # stats cachedump shows a key's bytes as they are; lru_crawler metadump URL-encodes them. Both give
    # back the keys that were set, so tools that compare two nodes by their dumps see these keys too.
    conn = start("-t", "1").raw()
    keys = {b"a\x01b", b"t\tk", b"c\rr", b"\x10\x10Z\x7f\xff", b"ends\r"}
    for key in sorted(keys):
        conn.expect(b"set " + key + b" 0 0 1\r\nx\r\n", b"STORED\r\n")
    listed = set()

    def dumped():
        listed.update(key for key, _, _ in cachedump(conn, b"stats cachedump 1 0\r\n"))
        return listed >= keys

    assert wait_until(dumped, timeout_s=5), listed
    assert listed == keys
    conn.send(b"lru_crawler metadump all\r\n")
    reply = conn.recv_until(b"END\r\n")
    assert reply.endswith(b"END\r\n"), reply
    encoded = [re.match(rb"key=(\S+) ", line).group(1) for line in reply[: -len(b"END\r\n")].split(b"\n") if line]
    assert all(re.fullmatch(rb"[A-Za-z0-9._~%-]+", key) for key in encoded), encoded
    assert {urllib.parse.unquote_to_bytes(key) for key in encoded} == keys


@requires_tandem("tandemd's slab class N is the store of worker N - 1; memcached's classes are item sizes")
def test_stats_cachedump_class_per_shard_covers_every_key(start):
    server = start("-t", "2")
    conn = server.raw()
    keys = {b"key:%d" % i for i in range(200)}
    assert pipelined_set(conn, sorted(keys), b"x") == len(keys)
    per_class = [{key for key, _, _ in cachedump(conn, b"stats cachedump %d 0\r\n" % c)} for c in (1, 2)]
    assert per_class[0] | per_class[1] == keys and not per_class[0] & per_class[1]
    items = stats(server, "items")
    assert [int(items[f"items:{c}:number"]) for c in (1, 2)] == [len(per_class[0]), len(per_class[1])]
    assert cachedump(conn, b"stats cachedump 3 0\r\n") == []
    # lru_crawler metadump (and me) name the same class.
    conn.send(b"lru_crawler metadump all\r\n")
    lines = [line for line in conn.recv_until(b"END\r\n").split(b"\n") if line.startswith(b"key=")]  # \n-ended, as memcached's
    metadump_class = {urllib.parse.unquote_to_bytes(re.search(rb"key=(\S+)", line).group(1)): int(re.search(rb" cls=(\d+)", line).group(1))
                      for line in lines}
    assert {key for key, c in metadump_class.items() if c == 1} == per_class[0]
    assert {key for key, c in metadump_class.items() if c == 2} == per_class[1]


def test_pymemcache_integration_suite_passes(server):
    """pymemcache's own integration tests, every one, over kernel sockets."""
    command = harness.pymemcache_suite(server.host, server.port)
    harness.assert_pymemcache_suite_passed(subprocess.run(command, capture_output=True, text=True, timeout=300))
