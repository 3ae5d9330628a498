"""OpenWrt boot paths, console bootstrap, agent channel and the two-VM lab, on the stand-in.

The stand-in (kmodtest/prepare/standin.py) is Debian's kernel and busybox in OpenWrt's image
formats, fetched from a local HTTP server on 127.0.0.1 through the code path real images take:
x86 combined disk booted directly (vmlinuz and GRUB's command line out of partition 1,
partition 2 as root) and as shipped (SeaBIOS -> GRUB), the arm64 initramfs kernel, and arm64
kernel.bin + ext4 rootfs. It is never OpenWrt coverage. Run through ktlock: these boot VMs.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest

from kmodtest.guest.openwrt import OpenWrtBoot, put_file
from kmodtest.guest.vm import GuestVM
from kmodtest.prepare.cache import Cache, default_cache_dir
from kmodtest.prepare.openwrt import OpenWrtImages
from kmodtest.run.accel import choose_accel
from kmodtest.run.launcher import QemuLauncher

CASES = {
    # cell: the device mounted on /
    "standin-x86-64": "/dev/vda2",
    "standin-x86-64-firmware": "/dev/vda2",
    "standin-armsr-armv8": "rootfs",
    "standin-armsr-armv8-kernel-rootfs": "/dev/vda",
}
LAB_CELL = "standin-x86-64"  # the two-VM lab tests' router
# read before pytester points HOME at a temporary directory: the inner runs share this cache
SHARED_CACHE = default_cache_dir()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("cell_id", list(CASES))
def test_standin_boots_and_serves_the_agent(cell_id, standin, standin_images, tmp_path):
    cell = standin.matrix.get(cell_id)
    image = standin_images.fetch(cell)
    disk_before = sha256(image.disk) if image.disk else None
    boot = OpenWrtBoot(image.packages)
    run_dir = Path(tmp_path / "r")
    run_dir.mkdir()
    spec = boot.machine_spec(
        cell_id, cell, image, (), run_dir, tmp_path / "logs", choose_accel(cell.arch).accel, False
    )
    machine = QemuLauncher().start(spec)
    started = time.monotonic()
    guest = None
    try:
        guest = GuestVM.connected(
            spec, machine, boot.connect(machine, 180), time.monotonic() - started
        )
        host = guest.host
        mounts = host.check_output("cat /proc/mounts")
        root = next(line.split()[0] for line in mounts.splitlines() if line.split()[1] == "/")
        assert root == CASES[cell_id], mounts
        cmdline = host.check_output("cat /proc/cmdline")
        if cell_id.startswith("standin-x86-64"):
            # OpenWrt's own command line from grub.cfg, on both boot paths
            assert image.cmdline in cmdline, cmdline
            assert "root=PARTUUID=" in cmdline
        elif cell_id.endswith("kernel-rootfs"):
            assert cmdline == "root=/dev/vda rootwait"
        else:
            assert "root=" not in cmdline
        release = host.file("/etc/openwrt_release").content_string
        assert "DISTRIB_ID='kmodtest-stand-in'" in release
        assert "Package: kmod-nft-offload" in host.file("/usr/lib/opkg/status").content_string
        # the channel is the Debian images' one: exit codes, stderr, binary output
        result = host.run("printf 'a\\0b'; echo err >&2; exit 3")
        assert (result.rc, result.stdout_bytes, result.stderr) == (3, b"a\0b", "err\n")
        assert host.check_output("hostname") == "OpenWrt"
        console = spec.console_log.read_text(errors="replace")
        assert "procd: - init complete -" in console
        assert "Please press Enter to activate this console." in console
        if cell_id == "standin-x86-64-firmware":
            assert "GNU GRUB" in console
            assert "-kernel" not in (spec.log_dir / "qemu.argv").read_text()
        if cell_id == "standin-x86-64":  # how --openwrt-package files reach the router
            blob = bytes(range(256)) * 80 + b"'\\%b\n"
            put_file(guest.channel, blob, "/tmp/kmodtest/packages/x.ipk")
            remote = host.check_output("sha256sum /tmp/kmodtest/packages/x.ipk").split()[0]
            assert remote == hashlib.sha256(blob).hexdigest()
        assert guest.health() is None
    finally:
        if guest is not None:
            guest.stop()
        else:
            machine.stop()
    assert not machine.alive and not run_dir.exists()
    if disk_before is not None:
        assert sha256(image.disk) == disk_before, "the cached image was modified"


@pytest.fixture
def standin_lab(standin, standin_server, tmp_path) -> list[str]:
    """Options for an inner pytest on the stand-in's two-VM lab, after ``kmodtest fetch``
    downloaded and verified its files from the local server into the shared cache (content
    keyed, so warm after the first run; the endpoints VM's Debian image is there too)."""
    from kmodtest.face import cli

    dirs = [
        f"--kernels-dir={standin.kernels_dir}", f"--images-dir={standin.images_dir}",
        f"--image-cache={SHARED_CACHE}",
    ]  # fmt: skip
    assert cli.main(["fetch", LAB_CELL, *dirs, f"--openwrt-mirror={standin_server.url}"]) == 0
    images = OpenWrtImages(Cache(SHARED_CACHE), standin.images_dir)
    assert images.cached(standin.matrix.get(LAB_CELL)) is not None
    return [*dirs, f"--kernel={LAB_CELL}", "--nic=virtio-net-pci", f"--log-dir={tmp_path / 'l'}"]


ENDPOINTS_WARNING = """
def test_the_endpoints_kernel_warns(router):
    assert len(router.guests) == 2
    router.endpoints.check(
        'echo "<4>WARNING: CPU: 0 PID: 1 at planted-on-endpoints" >/dev/kmsg'
    )

def test_next_test_gets_a_new_lab(router):
    assert router.check("echo up") == "up\\n"
"""


def test_a_warning_on_the_endpoints_vm_fails_the_test(pytester, standin_lab):
    """Every guest of a lab is health-scanned, every console byte once: the endpoints VM's
    kernel WARNING fails the test that was running, like the router's would."""
    pytester.makepyfile(test_inner=ENDPOINTS_WARNING)
    result = pytester.runpytest_subprocess(*standin_lab)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*WARNING: CPU: 0 PID: 1 at planted-on-endpoints",
            "*FAILED test_inner.py::test_the_endpoints_kernel_warns*",
        ]
    )


def test_the_vm_suite_on_the_standin_lab(pytester, standin_lab, repo):
    """``pytest vmtests/ --kernel standin-x86-64``: the lab boots (stand-in router + Debian
    endpoints VM), the forwarding tests pass through it, and every test the stand-in cannot
    run says why (vmtests/conftest.py); nothing errors."""
    result = pytester.runpytest_subprocess(str(repo / "vmtests"), "-rs", *standin_lab)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 2 and not outcomes.get("failed"), result.stdout.str()
    assert not outcomes.get("errors") and outcomes.get("skipped", 0) > 10, outcomes
    result.stdout.fnmatch_lines(["*the OpenWrt stand-in is busybox on Debian's kernel*"])
    print(f"stand-in lab outcomes: {outcomes}", file=sys.stderr)
