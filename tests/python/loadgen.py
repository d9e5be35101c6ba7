"""Fast pipelined writes and reads over raw sockets, for the tests that fill a server's memory.

Requests go out in batches; each batch's replies are read before the next, so the client never runs ahead
of the server by more than one batch and nothing grows without bound.
"""

from harness import RawConn

STORED = b"STORED\r\n"


def pipelined_set(conn: RawConn, keys, value, batch=1000):
    """Set every key to ``value``; returns how many answered STORED."""
    stored = 0
    header_tail = b" 0 0 %d\r\n" % len(value)
    body = value + b"\r\n"
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        conn.send(b"".join(b"set " + key + header_tail + body for key in chunk))
        replies = conn.recv_until_count(b"\r\n", len(chunk))
        stored += replies.count(STORED)
    return stored


def pipelined_hits(conn: RawConn, keys, value_len, batch=100):
    """How many of ``keys`` a multi-get finds."""
    hits = 0
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        conn.send(b"get " + b" ".join(chunk) + b"\r\n")
        reply = conn.recv_until(b"END\r\n", timeout=10)
        assert reply.endswith(b"END\r\n"), reply[-200:]
        hits += reply.count(b"VALUE ")
    return hits
