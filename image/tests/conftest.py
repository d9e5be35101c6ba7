"""Fixtures of the appliance tests: the built image, and the facilities booting it needs.

The tests boot real VMs of the image made by image/build (TANDEM_IMAGE_DIR, default
/var/cache/tandem/image): they need root, qemu-system-x86_64, /dev/net/tun, dnsmasq and OVMF, and are
skipped, with the reason printed, only on a machine that lacks one of those; under CI=true that is a
failure instead (CI has them all; ``skip_unless`` of tests/python/harness.py). A missing image is a
failure, not a skip: tests/run-all.sh builds it first.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))

import appliance  # noqa: E402
from harness import skip_unless  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def facilities():
    """Before anything boots: skip every test on a machine that cannot boot appliances, or under CI=true
    fail them."""
    missing = appliance.missing_facilities()
    skip_unless(not missing, "this machine cannot boot appliances: no " + ", ".join(missing))


@pytest.fixture(scope="session")
def image_dir():
    for f in ("tandem.raw", "rootfs.ext4", "vmlinuz", "initrd.img"):
        assert (appliance.IMAGE_DIR / f).exists(), f"{appliance.IMAGE_DIR / f} missing: run image/build"
    return appliance.IMAGE_DIR
