"""Fixtures of the appliance tests: the built image, and the facilities booting it needs.

The tests boot real VMs of the image made by image/build (TANDEM_IMAGE_DIR, default
/var/cache/tandem/image): they need root, qemu-system-x86_64, /dev/net/tun, dnsmasq and OVMF, and are
skipped, with the reason printed, only on a machine that lacks one of those (CI has them all). A missing
image is a failure, not a skip: tests/run-all.sh builds it first.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import appliance  # noqa: E402


def pytest_collection_modifyitems(config, items):
    missing = appliance.missing_facilities()
    if missing:
        skip = pytest.mark.skip(reason="this machine cannot boot appliances: no " + ", ".join(missing))
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def image_dir():
    for f in ("tandem.raw", "rootfs.ext4", "vmlinuz", "initrd.img"):
        assert (appliance.IMAGE_DIR / f).exists(), f"{appliance.IMAGE_DIR / f} missing: run image/build"
    return appliance.IMAGE_DIR
