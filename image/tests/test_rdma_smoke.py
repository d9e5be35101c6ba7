"""The replication ring over real verbs: two appliances with Soft-RoCE on their NICs run rdma-smoke
(replica/examples/rdma_smoke.rs, built with feature `rdma`): the active writes batch frames into the
standby's registered ring with one-sided RDMA WRITE and WRITE_WITH_IMM, the standby checks every record
and returns credits with RDMA WRITEs of its own. Then a write with a wrong rkey must fail with the
completion status named. Under TCG this says nothing about speed; it asserts correctness only.

The binary is TANDEM_RDMA_SMOKE, or the release example under CARGO_TARGET_DIR (tests/run-all.sh builds
it in its RDMA step); it is copied into the guests through the guest agent (same rdma-core 44 there).
"""

import base64
import os
import time
from pathlib import Path

import pytest

from appliance import Appliance, Identity, Network
from harness import skip_unless

A = Identity(hostname="rdma-a", address="10.77.0.21/24")
B = Identity(hostname="rdma-b", address="10.77.0.22/24")
FRAMES = 400
PORT = 7471


def smoke_binary() -> Path:
    given = os.environ.get("TANDEM_RDMA_SMOKE")
    if given:
        return Path(given)
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path(__file__).resolve().parents[2] / "target"))
    return target / "release" / "examples" / "rdma-smoke"


def upload(box: Appliance, source: Path, dest: str) -> None:
    """Copies a file into the guest with guest-file-write, in pieces the agent's JSON parser takes."""
    handle = box.agent.call("guest-file-open", {"path": dest, "mode": "w"})
    try:
        data = source.read_bytes()
        for start in range(0, len(data), 512 << 10):
            box.agent.call("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data[start:start + (512 << 10)]).decode()})
    finally:
        box.agent.call("guest-file-close", {"handle": handle})
    box.sh(f"chmod 755 {dest}").check()


def add_soft_roce(box: Appliance, ip: str) -> None:
    netdev = box.sh(f"ip -o -4 addr show | awk '$4 ~ /^{ip}\\// {{print $2}}'").check().out.strip()
    assert netdev, box.sh("ip -o -4 addr show").out
    box.sh(f"modprobe rdma_rxe && rdma link add rxe0 type rxe netdev {netdev}").check()
    # The port goes ACTIVE and the IPv4-mapped RoCE v2 GID appears once the link is up.
    box.wait_until("rxe0 port active with a RoCE v2 GID",
                   "ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE && grep -qx 'RoCE v2' /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/1",
                   timeout=60)


@pytest.fixture(scope="module")
def boxes(image_dir):
    binary = smoke_binary()
    build = "cargo build --release -p replica --features rdma --example rdma-smoke (needs libibverbs-dev)"
    skip_unless(binary.exists(), f"{binary} is not built: {build}")
    net = Network("rdma")
    members = []
    try:
        started = time.monotonic()
        members = [Appliance("a", net, boot="direct", identity=A), Appliance("b", net, boot="direct", identity=B)]
        for box in members:
            box.wait_system_up()
        print(f"\ntwo guests up in {time.monotonic() - started:.0f} s (TCG)")
        for box, identity in zip(members, (A, B)):
            add_soft_roce(box, identity.ip)
            upload(box, binary, "/usr/local/bin/rdma-smoke")
        yield members
    finally:
        for box in members:
            box.close()
        net.close()


def start(box: Appliance, args: list[str]) -> int:
    return box.agent.call("guest-exec", {"path": "/usr/local/bin/rdma-smoke", "arg": args, "capture-output": True})["pid"]


def wait(box: Appliance, pid: int, timeout: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = box.agent.call("guest-exec-status", {"pid": pid})
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
            return status.get("exitcode", -1), out + err
        time.sleep(0.5)
    raise TimeoutError(f"rdma-smoke {pid} still running after {timeout} s")


def test_frames_cross_the_ring_one_sided_intact_and_in_order(boxes):
    active, standby = boxes
    standby_pid = start(standby, ["standby", f"0.0.0.0:{PORT}", "--frames", str(FRAMES)])
    time.sleep(2)
    started = time.monotonic()
    active_pid = start(active, ["active", f"{B.ip}:{PORT}", "--frames", str(FRAMES)])
    active_code, active_out = wait(active, active_pid, 600)
    standby_code, standby_out = wait(standby, standby_pid, 60)
    print(f"\n{active_out}{standby_out}took {time.monotonic() - started:.1f} s")
    assert (active_code, standby_code) == (0, 0), active_out + standby_out
    assert f"{FRAMES} records applied in order and intact" in standby_out
    assert f"the standby applied {FRAMES}" in active_out


def test_the_verbs_layer_tests_run_against_a_device(boxes):
    """replica's rdma::verbs tests (built with feature rdma) skip on a host without RDMA; here they run."""
    binary = os.environ.get("TANDEM_RDMA_VERBS_TEST")
    skip_unless(binary, "TANDEM_RDMA_VERBS_TEST (replica's test binary with feature rdma) is not set; tests/run-all.sh sets it in its RDMA step")
    box = boxes[0]
    upload(box, Path(binary), "/usr/local/bin/replica-verbs-tests")
    result = box.exec(["/usr/local/bin/replica-verbs-tests", "rdma::verbs", "--nocapture", "--test-threads=1"], timeout=300)
    print(f"\n{result.out}{result.err}")
    assert result.code == 0, result.out + result.err
    assert "skipped" not in result.out + result.err, "a device test skipped inside a guest with rxe0"
    assert "a_queue_pair_writes_into_a_region_through_the_device ... ok" in result.out


def test_a_wrong_rkey_is_refused_by_name(boxes):
    active, standby = boxes
    standby_pid = start(standby, ["standby", f"0.0.0.0:{PORT + 1}", "--frames", "1"])
    time.sleep(2)
    code, out = wait(active, start(active, ["active", f"{B.ip}:{PORT + 1}", "--wrong-rkey"]), 300)
    print(f"\n{out}")
    assert code == 0, out
    assert "remote access error" in out
    # The standby got nothing and waits for frames that never come: stop it.
    standby.sh(f"kill {standby_pid}")
    wait(standby, standby_pid, 60)
