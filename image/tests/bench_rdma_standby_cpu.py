"""Benchmark, run only when asked (pytest collects test_*.py; this file runs when named):

    flock /tmp/tandem-vm.lock .venv/bin/pytest -p no:cacheprovider -q -s image/tests/bench_rdma_standby_cpu.py

What the standby's tandemd spends, in CPU time, per record it applies, over RDMA and over TCP, in the
same two appliance guests (test_rdma_pair.py's pair: TCG, Soft-RoCE on the guests' NICs), with the same
workload; and the write batching the active achieves (records per posted RDMA WRITE, records per
shipment). Under TCG and Soft-RoCE this says nothing about speed: rxe does in the guest kernel, on the
same emulated CPU, what a RoCE or InfiniBand NIC does in hardware, and that kernel time is not the
standby's tandemd's (it is not in /proc/<pid>/stat). What it shows is the work the standby's process
does per record on each transport. See BENCHMARKS.md for the numbers and for measuring on real hardware.

Per transport (async mode, tandemd restarted with it: test_rdma_pair.reconfigure), ROUNDS rounds of
RECORDS pipelined `set`s of 32-byte values on one connection to the active; each round reads the
standby's /proc/<pid>/stat and /proc/<pid>/task/*/stat (utime + stime, clock ticks) and the standby
guest's /proc/stat (all but idle and iowait: the kernel's receive work, TCP's or rxe's, wherever it is
charged) before the workload and after the standby has applied every record (its `applied` equals the
active's `newest`), then over an idle window as long as the round, to show what doing nothing costs
(the net figures take it out). Prints a table; medians over the rounds. TANDEM_BENCH_ROUNDS and TANDEM_BENCH_RECORDS change the counts.
"""

import os
import statistics
import time

from appliance import memcached_call
from test_rdma_pair import applied, pair, reconfigure, stats, wait_streaming_over_rdma  # noqa: F401 (pair: the fixture)

ROUNDS = int(os.environ.get("TANDEM_BENCH_ROUNDS", "5"))
RECORDS = int(os.environ.get("TANDEM_BENCH_RECORDS", "50000"))
CLOCK_TICKS = 100  # USER_HZ on Debian's kernels (getconf CLK_TCK in the guest)


def cpu_ticks(box) -> tuple[int, dict[str, int], int]:
    """The standby's tandemd: utime + stime of the process, and of each thread by name; and the whole
    guest's busy time (/proc/stat's cpu line but idle and iowait: the kernel's TCP or rxe work too,
    whoever it is charged to). Clock ticks."""
    out = box.sh("head -n 1 /proc/stat; pid=$(systemctl show -p MainPID --value tandemd); cat /proc/$pid/stat; echo; "
                 "for t in /proc/$pid/task/*; do cat $t/stat; echo; done").check().out
    lines = [line for line in out.splitlines() if line.strip()]
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    machine = [int(x) for x in lines.pop(0).split()[1:]]
    machine_busy = sum(machine[:8]) - machine[3] - machine[4]

    def parse(line: str) -> tuple[str, int]:
        name, rest = line[line.index("(") + 1:line.rindex(")")], line[line.rindex(")") + 2:].split()
        # After the name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
        return name, int(rest[11]) + int(rest[12])

    threads: dict[str, int] = {}
    for line in lines[1:]:
        name, ticks = parse(line)
        threads[name] = threads.get(name, 0) + ticks
    return parse(lines[0])[1], threads, machine_busy


def wait_applied(pair, timeout=300) -> dict:
    a, b = pair.members[:2]
    deadline = time.monotonic() + timeout
    while True:
        active, standby = stats(pair, a), stats(pair, b)
        if standby["applied"] == active["newest"]:
            return active
        assert time.monotonic() < deadline, (active, standby)
        time.sleep(0.5)


def measure(pair, transport: str) -> dict:
    a, b = pair.members[:2]
    reconfigure(pair, mode="async", transport=transport)
    wait_streaming_over_rdma(pair, transport=transport)
    rounds = []
    for r in range(ROUNDS):
        writes = b"".join(b"set %s-%d-%d 0 0 32\r\n%s\r\n" % (transport.encode(), r, i, b"v" * 32) for i in range(RECORDS))
        active_before = wait_applied(pair)
        standby_before = stats(pair, b)
        total_before, threads_before, machine_before = cpu_ticks(b)
        started = time.monotonic()
        reply = memcached_call(pair.net, a.identity.ip, writes, timeout=300)
        assert reply == b"STORED\r\n" * RECORDS, reply[-200:]
        active_after = wait_applied(pair)
        took = time.monotonic() - started
        total_after, threads_after, machine_after = cpu_ticks(b)
        standby_after = stats(pair, b)
        records = applied(standby_after) - applied(standby_before)
        assert records >= RECORDS, (standby_before, standby_after)
        idle_before, _, idle_machine_before = cpu_ticks(b)
        idle_started = time.monotonic()
        time.sleep(took)
        idle_after, _, idle_machine_after = cpu_ticks(b)
        idle_took = time.monotonic() - idle_started
        idle_rate = (idle_after - idle_before) / idle_took
        idle_machine_rate = (idle_machine_after - idle_machine_before) / idle_took
        us = 1e6 / CLOCK_TICKS / records
        row = {
            "records": records,
            "seconds": took,
            "us_per_record": (total_after - total_before) * us,
            # What the process would have spent in that time doing nothing, taken out.
            "net_us_per_record": (total_after - total_before - idle_rate * took) * us,
            "machine_us_per_record": (machine_after - machine_before) * us,
            "machine_net_us_per_record": (machine_after - machine_before - idle_machine_rate * took) * us,
            "idle_ticks_per_s": idle_rate,
            "machine_idle_ticks_per_s": idle_machine_rate,
            "busy_ticks": total_after - total_before,
            "threads": {name: threads_after.get(name, 0) - ticks for name, ticks in threads_before.items()
                        if threads_after.get(name, 0) - ticks > 0},
            "shipments": int(active_after["shipments"]) - int(active_before["shipments"]),
        }
        if transport == "rdma":
            row["writes_posted"] = int(active_after["standby_0_rdma_writes_posted"]) - int(active_before["standby_0_rdma_writes_posted"])
            row["credit_stalls"] = int(active_after["standby_0_rdma_credit_stalls"]) - int(active_before["standby_0_rdma_credit_stalls"])
            row["doorbells"] = int(standby_after["rdma_doorbells"]) - int(standby_before["rdma_doorbells"])
        print(f"{transport} round {r}: {row}")
        rounds.append(row)
    return {
        key: statistics.median(x[key] for x in rounds)
        for key in ("us_per_record", "net_us_per_record", "machine_us_per_record", "machine_net_us_per_record",
                    "idle_ticks_per_s", "machine_idle_ticks_per_s")
    } | {
        "seconds": statistics.median(x["seconds"] for x in rounds),
        "repl_ticks": statistics.median(x["threads"].get("tandem-repl", 0) for x in rounds),
        "worker_ticks": statistics.median(x["threads"].get("tandem-w0", 0) for x in rounds),
        "records_per_shipment": statistics.median(x["records"] / max(x["shipments"], 1) for x in rounds),
        "records_per_write": statistics.median(x["records"] / x["writes_posted"] for x in rounds) if transport == "rdma" else None,
    }


def test_standby_cpu_per_applied_record_rdma_and_tcp(pair):
    results = {transport: measure(pair, transport) for transport in ("rdma", "tcp")}
    print(f"\n{ROUNDS} rounds of {RECORDS} sets (32 B values), async mode, medians (TCG + Soft-RoCE):")
    print("us/record: CPU time per applied record; net: less what the same time idle costs; ticks/s idle: 100 = one CPU")
    print(f"{'transport':10} {'tandemd us/rec':>15} {'net':>6} {'guest us/rec':>13} {'net':>6} {'idle tandemd':>13} "
          f"{'idle guest':>11} {'repl ticks':>11} {'w0 ticks':>9} {'round s':>8} {'rec/shipment':>13} {'rec/WRITE':>10}")
    for transport, m in results.items():
        per_write = f"{m['records_per_write']:.1f}" if m["records_per_write"] is not None else "-"
        print(f"{transport:10} {m['us_per_record']:15.2f} {m['net_us_per_record']:6.2f} {m['machine_us_per_record']:13.2f} "
              f"{m['machine_net_us_per_record']:6.2f} {m['idle_ticks_per_s']:13.1f} {m['machine_idle_ticks_per_s']:11.1f} "
              f"{m['repl_ticks']:11.0f} {m['worker_ticks']:9.0f} {m['seconds']:8.1f} {m['records_per_shipment']:13.1f} {per_write:>10}")
