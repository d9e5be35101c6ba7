"""One appliance, booted from the GPT disk through UEFI (systemd-boot) with no identity given: it must
come up as a standalone cache with a DHCP address, serve memcached (memccapable 54/54 from the bridge),
and be kept alive by systemd: SIGKILL means a restart, a stopped poll loop (SIGSTOP) means the watchdog
restarts it. Also: the hugepage, NIC (vfio-pci) and Soft-RoCE units do what /etc/tandem says."""

import time

import pytest

from appliance import Appliance, Network, memcached_call
from memccapable import assert_memccapable_passes


@pytest.fixture(scope="module")
def single(image_dir):
    net = Network("single", dhcp=True)
    try:
        # Two NICs: the first serves, the second is for the DPDK binding test.
        box = Appliance("single", net, boot="uefi", nics=2)
        try:
            started = time.monotonic()
            state = box.wait_system_up()
            print(f"\nbooted (UEFI, TCG) to '{state}' in {time.monotonic() - started:.0f} s")
            box.ip = box.address()
            yield box
        finally:
            box.close()
    finally:
        net.close()


def prop(box, name: str) -> str:
    return box.sh(f"systemctl show -p {name} --value tandemd").check().out.strip()


def wait_serving(box, old_pid: str | None = None, timeout: float = 120) -> str:
    """Waits until tandemd is active under a new main PID (when old_pid is given) and answers from the
    bridge; returns its PID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = prop(box, "MainPID")
        if pid not in ("0", old_pid) and box.sh("systemctl is-active tandemd").out.strip() == "active":
            try:
                if memcached_call(box.net, box.ip, b"version\r\n").startswith(b"VERSION "):
                    return pid
            except OSError:
                pass
        time.sleep(1)
    raise TimeoutError(f"tandemd not serving again within {timeout} s:\n"
                       + box.sh("systemctl status tandemd --no-pager; journalctl -u tandemd -n 30 --no-pager").out)


def test_boots_with_every_unit_healthy_and_tandemd_active(single):
    assert single.sh("systemctl is-active tandemd").out.strip() == "active"
    assert single.sh("systemctl is-active tandem.target").out.strip() == "active"
    failed = single.sh("systemctl --failed --no-legend --plain").out.strip()
    assert failed == "", failed


def test_status_says_in_one_line_what_tandemd_does(single):
    assert prop(single, "StatusText") == "serving memcached on 0.0.0.0:11211, 1 shards"
    identity = single.sh("journalctl -b -u tandem-identity -o cat --no-pager").out
    assert "no identity given: standalone cache, address by DHCP" in identity


def test_standalone_takes_a_dhcp_address_and_passes_memccapable(single):
    assert single.ip.startswith("10.77.0.1"), single.ip  # dnsmasq's range .100-.199
    assert_memccapable_passes(single.net, single.ip)


def test_hugepages_are_reserved_from_the_config_and_used(single):
    # memory_mb = 256 in /etc/tandem/tandem.toml: 128 pages of 2 MiB, all taken by tandemd's arena.
    assert single.sh("cat /proc/sys/vm/nr_hugepages").out.strip() == "128"
    assert single.sh("findmnt -n -o FSTYPE /dev/hugepages").out.strip() == "hugetlbfs"
    stats = memcached_call(single.net, single.ip, b"stats\r\n").decode()
    assert "STAT memory_backing hugepages\r\n" in stats, stats


def test_tandemd_runs_as_its_own_user_without_capabilities(single):
    pid = prop(single, "MainPID")
    status = single.sh(f"cat /proc/{pid}/status").check().out
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = single.sh("id -u tandem").check().out.strip()
    assert fields["Uid"].split()[0] == uid != "0"
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(fields[cap].strip(), 16) == 0, (cap, fields[cap])
    assert prop(single, "WatchdogUSec") == "10s"
    assert prop(single, "Type") == "notify"


def test_sigkill_makes_systemd_restart_it_and_it_serves_again(single):
    pid = prop(single, "MainPID")
    restarts = int(prop(single, "NRestarts"))
    single.sh(f"kill -KILL {pid}").check()
    new_pid = wait_serving(single, old_pid=pid)
    assert int(prop(single, "NRestarts")) == restarts + 1
    reply = memcached_call(single.net, single.ip, b"set after-kill 0 0 2\r\nok\r\nget after-kill\r\n")
    assert reply == b"STORED\r\nVALUE after-kill 0 2\r\nok\r\nEND\r\n", reply
    print(f"SIGKILL of {pid}: restarted as {new_pid}")


def test_sigstop_starves_the_watchdog_and_systemd_restarts_it(single):
    pid = prop(single, "MainPID")
    restarts = int(prop(single, "NRestarts"))
    single.sh(f"kill -STOP {pid}").check()
    started = time.monotonic()
    # WatchdogSec=10s, then SIGABRT, then SIGKILL after TimeoutAbortSec=10s at the latest, RestartSec=1s.
    new_pid = wait_serving(single, old_pid=pid, timeout=120)
    took = time.monotonic() - started
    assert int(prop(single, "NRestarts")) == restarts + 1
    journal = single.sh(f"journalctl -u tandemd --no-pager -o cat --since=-{int(took) + 30}s").out
    assert "Watchdog timeout" in journal, journal
    print(f"SIGSTOP of {pid}: watchdog restart as {new_pid} after {took:.0f} s")


def test_appliance_conf_binds_a_nic_for_dpdk_adds_soft_roce_and_pins_cpus(single):
    # The second NIC (by PCI address) goes to vfio-pci; the first (the one that serves) gets rxe0.
    # PCI address, interface name, MAC (a virtio NIC's device is virtioN under its PCI device).
    nics = single.sh("for d in /sys/class/net/*/device; do n=${d%/device}; "
                     "echo $(basename $(dirname $(readlink -f $d))) ${n##*/} $(cat $n/address); done").check().out.split("\n")
    nics = [line.split() for line in nics if line.strip()]
    serving = next(n for n in nics if n[2] == single.macs[0])
    spare = next(n for n in nics if n[2] == single.macs[1])
    conf = (f"HUGEPAGES=auto\\nCPUS=0\\nDPDK_NICS={spare[0]}\\nDPDK_DRIVER=vfio-pci\\nRDMA_NETDEVS={serving[1]}\\n")
    single.sh(f"cp /etc/tandem/appliance.conf /run/appliance.conf.orig && printf '{conf}' >/etc/tandem/appliance.conf "
              "&& systemctl daemon-reload && systemctl start tandem.target", timeout=120).check()
    try:
        wants = single.sh("systemctl list-dependencies --plain --no-legend tandem.target").out
        assert "tandem-nic.service" in wants and "tandem-rdma.service" in wants, wants
        assert single.sh("systemctl is-active tandem-nic tandem-rdma").out.split() == ["active", "active"]
        driver = single.sh(f"basename $(readlink -f /sys/bus/pci/devices/{spare[0]}/driver)").out.strip()
        assert driver == "vfio-pci"
        links = single.sh("rdma link show").check().out
        assert f"link rxe0/1 state ACTIVE" in links and f"netdev {serving[1]}" in links, links
        assert prop(single, "CPUAffinity") == "0"
        # Undo: the NIC returns to virtio-net, rxe0 goes away.
        single.sh("systemctl stop tandem-nic tandem-rdma").check()
        driver = single.sh(f"basename $(readlink -f /sys/bus/pci/devices/{spare[0]}/driver)").out.strip()
        assert driver == "virtio-pci" or driver.startswith("virtio"), driver
        assert "rxe0" not in single.sh("rdma link show").out
    finally:
        single.sh("cp /run/appliance.conf.orig /etc/tandem/appliance.conf && systemctl daemon-reload")


def test_a_bad_setting_is_named_by_systemctl_status(single):
    single.sh("cp /etc/tandem/tandem.toml /run/tandem.toml.orig && echo 'max_conections = 10' >>/etc/tandem/tandem.toml").check()
    try:
        assert single.sh("systemctl restart tandemd", timeout=120).code != 0
        status = single.wait_until("the bad key in systemctl status",
                                   "systemctl status tandemd --no-pager -n 5 | grep -F 'Status: \"cannot start: '", timeout=30)
        assert "max_conections" in status, status
    finally:
        single.sh("cp /run/tandem.toml.orig /etc/tandem/tandem.toml && systemctl reset-failed tandemd; systemctl restart tandemd",
                  timeout=120)
    wait_serving(single)
