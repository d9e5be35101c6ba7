"""A standalone tandemd on a memory file (`-e PATH`) keeps its cache across a kill -9, on tmpfs and on
hugetlbfs (the appliance's hugepages), and no second process may map the same file.

memcached 1.6.18's -e restores only after a graceful shutdown (SIGUSR1); tandemd writes items in an order
that survives a crash (README, "A restartable cache"), so these tests kill with SIGKILL and run against
tandemd only. The hugetlbfs half reserves 2 MiB pages when it may (root) and is skipped with a printed
reason when the machine has none to give (a failure under CI=true, where it must run).
"""

import atexit
import os
import pathlib
import re
import subprocess

import pytest

from harness import requires_tandem, skip_unless, stats

MEMORY_MB = 64
THREADS = 2
# Each shard's file is its share of -m plus metadata, rounded up to 2 MiB pages: 17 pages at -m 64, -t 2.
HUGEPAGES_NEEDED = 64
NR_HUGEPAGES = pathlib.Path("/proc/sys/vm/nr_hugepages")

_hugepages_before = []


def _restore_hugepages():
    if _hugepages_before:
        try:
            NR_HUGEPAGES.write_text(_hugepages_before[0])
        except OSError:
            pass


def hugetlbfs_dir():
    """A mounted hugetlbfs with HUGEPAGES_NEEDED free 2 MiB pages (reserving them if it may), or the reason
    there is none."""
    mounts = [line.split() for line in pathlib.Path("/proc/mounts").read_text().splitlines()]
    mount = next((m[1] for m in mounts if m[2] == "hugetlbfs" and "pagesize=1G" not in m[3]), None)
    if mount is None:
        return None, "no hugetlbfs mounted (mount -t hugetlbfs nodev /dev/hugepages)"
    if not os.access(mount, os.W_OK):
        return None, f"{mount} is not writable by this user"

    def free():
        meminfo = pathlib.Path("/proc/meminfo").read_text()
        return int(re.search(r"HugePages_Free:\s+(\d+)", meminfo).group(1))

    if free() < HUGEPAGES_NEEDED:
        try:
            total = int(NR_HUGEPAGES.read_text())
            if not _hugepages_before:
                _hugepages_before.append(NR_HUGEPAGES.read_text())
                atexit.register(_restore_hugepages)
            NR_HUGEPAGES.write_text(f"{total + HUGEPAGES_NEEDED - free()}\n")
        except OSError as error:
            return None, f"{free()} free 2 MiB hugepages, {HUGEPAGES_NEEDED} needed, and none can be reserved ({error})"
    if free() < HUGEPAGES_NEEDED:
        return None, f"{free()} free 2 MiB hugepages after asking the kernel for more, {HUGEPAGES_NEEDED} needed"
    return mount, None


@pytest.fixture(params=["tmpfs", "hugetlbfs"])
def memory_file(request, tmp_path):
    """(path, the `memory_backing` stat tandemd must report); the shard files are removed afterwards."""
    if request.param == "tmpfs":
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
        backing = "memory_file"
    else:
        base, reason = hugetlbfs_dir()
        skip_unless(base is not None, f"memory file on hugetlbfs: {reason}")
        backing = "hugepages_file"
    path = os.path.join(base, f"tandem-test-{os.getpid()}-{tmp_path.name}")
    yield path, backing
    for shard in range(THREADS):
        try:
            os.unlink(f"{path}.{shard}")
        except FileNotFoundError:
            pass


def server_on(start, path):
    return start("-e", path, "-m", str(MEMORY_MB), "-t", str(THREADS))


def meta_get(conn, key):
    """`mg key v f c t` as its reply line and value, or None on a miss."""
    conn.send(b"mg " + key + b" v f c t\r\n")
    head = conn.recv_until(b"\r\n")
    if head == b"EN\r\n":
        return None
    assert head.startswith(b"VA "), head
    size = int(head.split()[1])
    value = conn.recv_exact(size + 2)[:-2]
    flags = dict((token[:1], token[1:]) for token in head.split()[2:])
    return {"value": value, "flags": flags[b"f"], "cas": int(flags[b"c"]), "ttl": int(flags[b"t"])}


@requires_tandem("memcached 1.6.18 restores its -e file only after a graceful shutdown (SIGUSR1)")
def test_the_cache_survives_kill_9_on_a_memory_file(start, memory_file):
    path, backing = memory_file
    server = server_on(start, path)
    assert stats(server)["memory_backing"] == backing
    conn = server.raw()
    big = bytes(range(256)) * 2048  # 512 KiB: a large item
    conn.expect(b"set big 7 0 %d\r\n" % len(big) + big + b"\r\n", b"STORED\r\n")
    for i in range(2000):
        conn.send(b"set key-%d %d 0 %d noreply\r\n%s\r\n" % (i, i, len(b"value-%d" % i), b"value-%d" % i))
    conn.expect(b"set lives 0 100 4\r\nlive\r\n", b"STORED\r\n")
    conn.expect(b"set gone 0 0 1\r\nx\r\n", b"STORED\r\n")
    conn.expect(b"delete gone\r\n", b"DELETED\r\n")
    conn.expect(b"set counter 0 0 2\r\n41\r\n", b"STORED\r\n")
    conn.expect(b"incr counter 1\r\n", b"42\r\n")
    conn.expect(b"append key-1 0 0 4\r\n-end\r\n", b"STORED\r\n")
    conn.expect(b"set flushed 0 0 1\r\nf\r\n", b"STORED\r\n")
    keys = [b"big", b"lives", b"counter"] + [b"key-%d" % i for i in range(2000)]
    before = {key: meta_get(conn, key) for key in keys}
    assert all(before.values()), [key for key, got in before.items() if got is None]
    conn.expect(b"flush_all\r\n", b"OK\r\n")  # everything set until now is gone...
    for key in keys:  # ...and set again, so flushed items and live ones share the file
        item = before[key]
        conn.send(b"set %s %s %d %d noreply\r\n%s\r\n" % (key, item["flags"], 100 if key == b"lives" else 0, len(item["value"]), item["value"]))
    before = {key: meta_get(conn, key) for key in keys}
    newest_cas = max(item["cas"] for item in before.values())

    server.process.kill()
    server.process.wait(timeout=10)
    again = server_on(start, path)
    assert stats(again)["memory_backing"] == backing
    conn = again.raw()
    after = {key: meta_get(conn, key) for key in keys}
    lost = [key for key in keys if after[key] is None]
    assert not lost, f"{len(lost)} keys lost, first {lost[:5]}"
    for key in keys:
        want, got = before[key], after[key]
        assert (got["value"], got["flags"], got["cas"]) == (want["value"], want["flags"], want["cas"]), key
    assert after[b"big"]["value"] == big and after[b"key-1"]["value"] == b"value-1-end"
    assert after[b"counter"]["value"] == b"42"
    assert 0 < after[b"lives"]["ttl"] <= 100, after[b"lives"]
    assert all(after[key]["ttl"] == -1 for key in keys if key != b"lives")
    assert meta_get(conn, b"gone") is None and meta_get(conn, b"flushed") is None
    # The CAS counter goes on from where it was: no reused CAS value can make a stale `cas` succeed.
    conn.expect(b"set fresh 0 0 1\r\nn\r\n", b"STORED\r\n")
    assert meta_get(conn, b"fresh")["cas"] > newest_cas


@requires_tandem("memcached 1.6.18 does not lock its -e file")
def test_a_second_process_cannot_map_a_memory_file_in_use(start, memory_file, tmp_path):
    path, _ = memory_file
    first = server_on(start, path)
    first.raw().expect(b"set kept 0 0 1\r\nk\r\n", b"STORED\r\n")
    from harness import free_port, server_binary
    second = subprocess.run([server_binary(), "-p", str(free_port()), "-l", "127.0.0.1", "-e", path,
                             "-m", str(MEMORY_MB), "-t", str(THREADS)], capture_output=True, timeout=30)
    assert second.returncode != 0
    message = (second.stdout + second.stderr).decode(errors="replace")
    assert "locked by another process" in message and path in message, message
    first.raw().expect(b"get kept\r\n", b"VALUE kept 0 1\r\nk\r\nEND\r\n")
