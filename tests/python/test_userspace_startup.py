"""The userspace dataplane's start-up and idling: clear errors when DPDK cannot start, and a worker that
does not burn its core when no traffic comes (it spins only briefly after traffic, then sleeps).

Root and the DPDK-enabled tandemd are needed, as for test_userspace.py (whose Dataplane this reuses).
"""

import os
import subprocess
import time

from test_userspace import PORT, Dataplane, dpdk_server, needs_root


def start_failure(tmp_path, eal_args, extra=""):
    """Starts the DPDK tandemd with ``eal_args``; returns (exit code, output) once it exits (bounded)."""
    args = ", ".join(f'"{a}"' for a in eal_args)
    config = tmp_path / "bad.toml"
    config.write_text(f'[net]\nbackend = "dpdk"\n[net.dpdk]\neal_args = [{args}]\naddress = "10.250.0.2/24"\n{extra}')
    run = subprocess.run(
        [dpdk_server(), "-p", str(PORT), "-t", "1", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    return run.returncode, run.stdout + run.stderr


def test_dpdk_start_up_failures_name_what_to_fix(tmp_path):
    needs_root()
    code, out = start_failure(tmp_path, ["--no-pci", "--in-memory", "--no-telemetry", "--vdev=net_af_packet0,iface=tdu-missing0"])
    print(out[-600:])
    assert code != 0
    assert "DPDK found no port: --vdev=net_af_packet0,iface=tdu-missing0 made none" in out, out

    code, out = start_failure(tmp_path, ["--no-pci", "--in-memory", "--no-telemetry", "--no-such-eal-option"])
    assert code != 0
    assert "bad EAL arguments" in out, out

    code, out = start_failure(tmp_path, ["--no-pci", "--in-memory", "--no-telemetry"])
    assert code != 0
    assert "found no port" in out and "--vdev" in out, out


def cpu_seconds(pid):
    """User plus system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_dpdk_worker_sleeps_instead_of_spinning(tmp_path):
    needs_root()
    with Dataplane(tmp_path, "dpdk-af_packet") as dataplane:
        dataplane.request(b"set warm 0 0 1\r\nx\r\n")
        time.sleep(0.5)
        before = cpu_seconds(dataplane.process.pid)
        time.sleep(3)
        used = cpu_seconds(dataplane.process.pid) - before
        print(f"idle DPDK tandemd used {used:.2f} s of CPU in 3 s")
        # A spinning worker would use about 3 s; sleeping in 500 us steps costs a few percent of a core.
        assert used < 0.45, used
        assert "VALUE warm" in dataplane.request(b"get warm\r\n"), "and it still answers at once"
