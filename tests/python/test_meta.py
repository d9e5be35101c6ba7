"""Meta protocol (mg ms md ma mn me): flags, quiet mode, base64 keys, invalidation, vivify and recache,
byte for byte as memcached 1.6.18 answers.

Return flags come back in the order they were asked for. CAS values differ between servers, so tests that
ask for ``c`` read it with a pattern.
"""

import base64
import re

import pytest

from harness import RawConn


def test_mn_answers_mn(conn):
    conn.expect(b"mn\r\n", b"MN\r\n")


# --- mg -----------------------------------------------------------------------------------------


def test_mg_returns_requested_flags_in_request_order(conn):
    conn.expect(b"ms mk 2 T0 F5\r\nhi\r\n", b"HD\r\n")
    conn.expect(b"mg mk s v f t k\r\n", b"VA 2 s2 f5 t-1 kmk\r\nhi\r\n")


def test_mg_without_v_answers_hd_with_flags(conn):
    conn.expect(b"ms mk 2 F7\r\nhi\r\n", b"HD\r\n")
    conn.expect(b"mg mk f s\r\n", b"HD f7 s2\r\n")
    conn.expect(b"mg mk\r\n", b"HD\r\n")


def test_mg_miss_is_en(conn):
    conn.expect(b"mg missing v\r\n", b"EN\r\n")


def test_mg_quiet_miss_is_silent_until_mn(conn):
    conn.expect(b"mg missing v q\r\nmg missing O1 k q\r\nmn\r\n", b"MN\r\n")


def test_mg_quiet_hit_is_answered(conn):
    conn.expect(b"ms mk 2\r\nhi\r\n", b"HD\r\n")
    conn.expect(b"mg mk v q O123\r\nmn\r\n", b"VA 2 O123\r\nhi\r\nMN\r\n")


def test_mg_echoes_opaque_and_key(conn):
    conn.expect(b"ms mk 1\r\nx\r\n", b"HD\r\n")
    conn.expect(b"mg mk O99 k\r\n", b"HD O99 kmk\r\n")
    conn.expect(b"mg nope O98 k\r\n", b"EN O98 knope\r\n")


def test_mg_c_returns_the_cas_of_the_item(conn):
    conn.expect(b"ms mk 1\r\nx\r\n", b"HD\r\n")
    conn.send(b"mg mk c\r\n")
    cas = re.fullmatch(rb"HD c(\d+)\r\n", conn.recv_until(b"\r\n"))
    assert cas
    conn.send(b"gets mk\r\n")
    assert conn.recv_until(b"END\r\n") == b"VALUE mk 0 1 %s\r\nx\r\nEND\r\n" % cas.group(1)


def test_mg_with_base64_key_reads_the_decoded_key(conn):
    conn.expect(b"set mk 0 0 2\r\nhi\r\n", b"STORED\r\n")
    conn.expect(b"mg " + base64.b64encode(b"mk") + b" b v\r\n", b"VA 2\r\nhi\r\n")


def test_key_stored_in_base64_is_returned_in_base64(conn):
    # memcached 1.6.18 remembers that the key came in base64: k returns it encoded, with the b flag, even
    # when the item is fetched by its plain name.
    encoded = base64.b64encode(b"b64key")
    conn.expect(b"ms " + encoded + b" 2 b\r\nhi\r\n", b"HD\r\n")
    conn.expect(b"mg " + encoded + b" b k v\r\n", b"VA 2 k" + encoded + b" b\r\nhi\r\n")
    conn.expect(b"mg b64key k v\r\n", b"VA 2 k" + encoded + b" b\r\nhi\r\n")


def test_mg_t_updates_ttl(conn):
    conn.expect(b"ms ttl 1 T100\r\nr\r\n", b"HD\r\n")
    conn.expect(b"mg ttl v T5 t\r\n", b"VA 1 t5\r\nr\r\n")
    conn.expect(b"mg ttl t\r\n", b"HD t5\r\n")


def test_mg_hit_flag_and_u_leaves_item_unfetched(conn):
    conn.expect(b"ms hx 1\r\na\r\n", b"HD\r\n")
    conn.expect(b"mg hx u h\r\n", b"HD h0\r\n")  # u: no LRU bump, not marked fetched
    conn.expect(b"mg hx h l\r\n", b"HD h0 l0\r\n")
    conn.expect(b"mg hx h\r\n", b"HD h1\r\n")


def test_mg_invalid_flag_is_client_error(conn):
    conn.expect(b"mg mk v !\r\n", b"CLIENT_ERROR invalid flag\r\n")


def test_mg_key_over_250_bytes_is_client_error(conn):
    conn.expect(b"mg " + b"a" * 251 + b" v\r\n", b"CLIENT_ERROR bad command line format\r\n")


# --- invalidation, vivify, recache --------------------------------------------------------------


def test_md_with_invalidate_marks_stale_and_hands_one_client_the_win(conn):
    conn.expect(b"ms s 1 T60\r\na\r\n", b"HD\r\n")
    conn.expect(b"md s I T30\r\n", b"HD\r\n")
    conn.expect(b"mg s v t\r\n", b"VA 1 t30 X W\r\na\r\n")  # stale, and this client should recache
    conn.expect(b"mg s v\r\n", b"VA 1 Z X\r\na\r\n")  # stale, and someone else already won
    conn.expect(b"ms s 1\r\nb\r\n", b"HD\r\n")
    conn.expect(b"mg s v\r\n", b"VA 1\r\nb\r\n")  # fresh again


def test_ms_in_invalidate_mode_replaces_a_stale_item(conn):
    conn.expect(b"ms st 1 T60\r\na\r\n", b"HD\r\n")
    conn.expect(b"md st I T30\r\n", b"HD\r\n")
    conn.expect(b"ms st 1 I\r\nb\r\n", b"HD\r\n")
    conn.expect(b"mg st v\r\n", b"VA 1\r\nb\r\n")


def test_mg_vivify_on_miss_creates_placeholder_and_wins_once(conn):
    conn.expect(b"mg viv v N30 t\r\n", b"VA 0 t30 W\r\n\r\n")
    conn.expect(b"mg viv v N30\r\n", b"VA 0 Z\r\n\r\n")
    conn.expect(b"ms viv 1\r\nz\r\n", b"HD\r\n")
    conn.expect(b"mg viv v\r\n", b"VA 1\r\nz\r\n")


def test_mg_recache_wins_when_ttl_below_threshold(conn):
    conn.expect(b"ms rc 1 T100\r\nr\r\n", b"HD\r\n")
    conn.expect(b"mg rc v R30\r\n", b"VA 1\r\nr\r\n")  # 100 s left: above the threshold
    conn.expect(b"mg rc v R200\r\n", b"VA 1 W\r\nr\r\n")  # below: this client recaches
    conn.expect(b"mg rc v R200 t\r\n", b"VA 1 t100 Z\r\nr\r\n")


# --- ms -----------------------------------------------------------------------------------------


def test_ms_mode_sequence_add_append_prepend_replace_set(conn):
    conn.expect(b"ms m1 1 MA\r\nX\r\n", b"NS\r\n")  # append to missing
    conn.expect(b"ms m1 1 ME\r\nA\r\n", b"HD\r\n")  # add
    conn.expect(b"ms m1 1 ME\r\nB\r\n", b"NS\r\n")  # add to existing
    conn.expect(b"ms m1 1 MA\r\nC\r\n", b"HD\r\n")  # append
    conn.expect(b"ms m1 1 MP\r\nD\r\n", b"HD\r\n")  # prepend
    conn.expect(b"mg m1 v\r\n", b"VA 3\r\nDAC\r\n")
    conn.expect(b"ms m1 1 MR\r\nE\r\n", b"HD\r\n")  # replace
    conn.expect(b"ms m2 1 MR\r\nE\r\n", b"NS\r\n")  # replace missing
    conn.expect(b"ms m1 1 MS\r\nF\r\n", b"HD\r\n")  # set
    conn.expect(b"mg m1 v\r\nmg m2 v\r\n", b"VA 1\r\nF\r\nEN\r\n")


def test_ms_invalid_mode_is_client_error_and_value_is_swallowed(conn):
    conn.expect(b"ms m1 1 MZ\r\nF\r\nmn\r\n", b"CLIENT_ERROR invalid mode for ms M token\r\nMN\r\n")


def test_ms_with_base64_key_stores_the_decoded_key(conn):
    conn.expect(b"ms " + base64.b64encode(b"plain") + b" 2 b\r\nhi\r\n", b"HD\r\n")
    conn.expect(b"get plain\r\n", b"VALUE plain 0 2\r\nhi\r\nEND\r\n")


def test_ms_compare_and_swap(conn):
    conn.send(b"ms k 2 c\r\nab\r\n")
    cas = re.fullmatch(rb"HD c(\d+)\r\n", conn.recv_until(b"\r\n")).group(1)
    conn.expect(b"ms k 2 C" + str(int(cas) + 1000).encode() + b"\r\nzz\r\n", b"EX\r\n")
    conn.expect(b"ms k 2 C" + cas + b"\r\ncd\r\n", b"HD\r\n")
    conn.expect(b"mg k v\r\n", b"VA 2\r\ncd\r\n")
    conn.expect(b"ms gone 2 C1\r\nab\r\n", b"NF\r\n")


def test_ms_quiet_is_silent_on_success(conn):
    conn.expect(b"ms k 2 q\r\nab\r\nmn\r\n", b"MN\r\n")
    conn.expect(b"mg k v\r\n", b"VA 2\r\nab\r\n")


def test_ms_echoes_opaque_and_key_and_sets_flags_and_ttl(conn):
    conn.expect(b"ms k 2 O9 k F3 T50\r\nab\r\n", b"HD O9 kk\r\n")
    conn.expect(b"mg k f t v\r\n", b"VA 2 f3 t50\r\nab\r\n")


def test_ms_bad_data_chunk(conn):
    conn.expect(b"ms k 2\r\nabcd\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n")


@pytest.mark.parametrize("line", [b"ms k", b"ms k abc"])
def test_ms_bad_command_line_is_client_error(conn, line):
    conn.expect(line + b"\r\n", b"CLIENT_ERROR bad command line format\r\n")


# --- md -----------------------------------------------------------------------------------------


def test_md_deletes_then_not_found(conn):
    conn.expect(b"ms k 1\r\na\r\n", b"HD\r\n")
    conn.expect(b"md k\r\n", b"HD\r\n")
    conn.expect(b"md k O5 k\r\n", b"NF O5 kk\r\n")
    conn.expect(b"mg k v\r\n", b"EN\r\n")


def test_md_quiet_hides_success_but_reports_not_found(conn):
    conn.expect(b"ms k 1\r\na\r\n", b"HD\r\n")
    conn.expect(b"md k q\r\nmd k q\r\nmn\r\n", b"NF\r\nMN\r\n")


# --- ma -----------------------------------------------------------------------------------------


def test_ma_on_missing_key_is_nf(conn):
    conn.expect(b"ma cnt\r\n", b"NF\r\n")


def test_ma_vivify_uses_initial_value_then_counts(conn):
    conn.expect(b"ma cnt N0 J10 v\r\n", b"VA 2\r\n10\r\n")
    conn.expect(b"ma cnt v\r\n", b"VA 2\r\n11\r\n")
    conn.expect(b"ma cnt D5 v\r\n", b"VA 2\r\n16\r\n")


def test_ma_modes_decrement_floor_and_increment(conn):
    conn.expect(b"ma cnt N0 J16\r\n", b"HD\r\n")
    conn.expect(b"ma cnt MD D3 v\r\n", b"VA 2\r\n13\r\n")
    conn.expect(b"ma cnt M- D100 v\r\n", b"VA 1\r\n0\r\n")
    conn.expect(b"ma cnt M+ D2 v t\r\n", b"VA 1 t-1\r\n2\r\n")
    conn.expect(b"ma cnt MI v\r\n", b"VA 1\r\n3\r\n")
    # As with text decr, the stored value keeps its length and is padded with spaces.
    conn.expect(b"get cnt\r\n", b"VALUE cnt 0 2\r\n3 \r\nEND\r\n")


def test_ma_quiet_hides_success_but_reports_not_found(conn):
    conn.expect(b"ma cnt N0 J1\r\n", b"HD\r\n")
    conn.expect(b"ma cnt q\r\nma nope q\r\nmn\r\n", b"NF\r\nMN\r\n")
    conn.expect(b"ma cnt v\r\n", b"VA 1\r\n3\r\n")


def test_ma_with_base64_key(conn):
    conn.expect(b"set cnt 0 0 1\r\n4\r\n", b"STORED\r\n")
    conn.expect(b"ma " + base64.b64encode(b"cnt") + b" b v\r\n", b"VA 1\r\n5\r\n")


def test_ma_on_non_numeric_value_is_client_error(conn):
    conn.expect(b"ms s 1\r\nx\r\n", b"HD\r\n")
    conn.expect(b"ma s\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")


@pytest.mark.parametrize("line, error", [
    (b"ma cnt Dabc", b"CLIENT_ERROR invalid or duplicate flag"),
    (b"ma cnt MX", b"CLIENT_ERROR invalid mode for ma M token"),
])
def test_ma_bad_flags_are_client_errors(conn, line, error):
    conn.expect(line + b"\r\n", error + b"\r\n")


# --- me -----------------------------------------------------------------------------------------


def test_me_describes_an_item_and_misses_with_en(conn: RawConn):
    conn.expect(b"ms dbg 1\r\na\r\n", b"HD\r\n")
    conn.send(b"me dbg\r\n")
    line = conn.recv_until(b"\r\n")
    assert re.fullmatch(rb"ME dbg exp=-1 la=\d+ cas=\d+ fetch=no cls=\d+ size=\d+\r\n", line), line
    conn.expect(b"me nope\r\n", b"EN\r\n")
