"""NIC models are checked against what the QEMU binary really offers (``-device help``)."""

from __future__ import annotations

import re
import shutil

import pytest

from kmodtest.run.devices import missing_nic, qemu_devices

QEMU = "qemu-system-x86_64"
pytestmark = pytest.mark.skipif(not shutil.which(QEMU), reason=f"{QEMU} is not installed")


def test_the_binary_lists_the_nics_the_matrix_uses():
    devices = qemu_devices(QEMU)
    assert {"virtio-net-pci", "e1000"} <= devices
    assert missing_nic(QEMU, "virtio-net-pci") is None


def test_a_nic_the_binary_lacks_is_named_with_the_qemu_version():
    why = missing_nic(QEMU, "kmodtest-no-such-nic")
    assert why is not None
    assert QEMU in why and "kmodtest-no-such-nic" in why
    assert re.search(rf"{QEMU} \d+\.\d+", why), why  # the version, so the reader knows why


def test_igb_follows_the_binary():
    offered = "igb" in qemu_devices(QEMU)
    assert (missing_nic(QEMU, "igb") is None) == offered
