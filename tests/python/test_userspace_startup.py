"""The userspace dataplane's start-up and idling: clear errors when DPDK cannot start, and a worker that
does not burn its core when no traffic comes (it spins only briefly after traffic, then sleeps).

Root and the DPDK-enabled tandemd are needed, as for test_userspace.py (whose Dataplane this reuses).
"""

import os
import pathlib
import subprocess
import time

import pytest

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


def test_dpdk_without_hugepages_names_the_fix(tmp_path):
    """EAL 22.11 without free hugepages stops with EACCES ("Cannot get hugepage information"), which read
    as "DPDK needs root": tandemd checks first and says to reserve hugepages or try --no-huge.

    The pool is emptied only while this one tandemd starts, and restored as soon as it exits (other jobs on
    the machine may be using hugepages).
    """
    needs_root()
    dpdk_server()
    vm = pathlib.Path("/proc/sys/vm")
    before = {name: (vm / name).read_text() for name in ("nr_hugepages", "nr_overcommit_hugepages")}
    try:
        for name in before:
            (vm / name).write_text("0\n")
        code, out = start_failure(tmp_path, ["--no-pci", "--in-memory", "--no-telemetry"])
    finally:
        for name, value in before.items():
            (vm / name).write_text(value)
    print(out[-800:])
    assert code != 0
    assert "DPDK needs hugepages and none is free" in out, out
    assert "echo 256 > /proc/sys/vm/nr_hugepages" in out and '"--no-huge"' in out, out
    assert "permission denied" not in out, out


CONFIGURED_MAC = "02:54:61:6e:64:6d"


def test_a_configured_mac_is_the_one_clients_see(tmp_path):
    """net_af_packet takes another MAC (it sets its interface's): the client's neighbour table holds it."""
    needs_root()
    with Dataplane(tmp_path, "dpdk-af_packet", extra=f'mac = "{CONFIGURED_MAC}"\n') as dataplane:
        # (The request helper's output comes back with universal newlines.)
        assert dataplane.request(b"set mac 0 0 3\r\nyes\r\n").splitlines() == ["STORED"]
        assert dataplane.request(b"get mac\r\n").splitlines() == ["VALUE mac 0 3", "yes", "END"]
        assert dataplane.server_mac() == CONFIGURED_MAC


def test_a_mac_the_driver_cannot_take_stops_start_up_saying_so(tmp_path):
    """net_af_xdp (DPDK 22.11) cannot change its MAC: start-up fails and names the driver's answer."""
    needs_root()
    with pytest.raises(AssertionError) as refused:
        Dataplane(tmp_path, "dpdk-af_xdp", extra=f'mac = "{CONFIGURED_MAC}"\n')
    message = str(refused.value)
    print(message[-600:])
    assert f"net.dpdk.mac: DPDK port 0 (net_af_xdp0) (net_af_xdp) refused the MAC address {CONFIGURED_MAC}: " in message
    assert "Operation not supported (the driver cannot change its MAC address;" in message
    assert "ip link set dev <interface> address <mac>" in message


@pytest.mark.parametrize("mac, why", [
    ("ff:ff:ff:ff:ff:ff", "is the broadcast address"),
    ("01:00:5e:00:00:01", "is a multicast address"),
    ("00:00:00:00:00:00", "is all zeros"),
    ("02:00:00:00:00", "is not a MAC address"),
])
def test_a_mac_no_neighbour_can_use_is_a_configuration_error(tmp_path, mac, why):
    needs_root()
    code, out = start_failure(tmp_path, ["--no-pci", "--in-memory", "--no-telemetry"], extra=f'mac = "{mac}"\n')
    assert code != 0
    assert "net.dpdk.mac" in out and why in out, out
    assert "EAL" not in out, "refused before DPDK starts"


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
