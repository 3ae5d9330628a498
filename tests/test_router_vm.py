"""The framework against a real booted router (default cell): channel, testinfra, reset."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import pytest

from kmodtest.errors import CommandTimeout, MachineError
from kmodtest.guest.boot import BOOT_TIMEOUT
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.strategy import CaseStrategy, State
from kmodtest.run import qemu
from kmodtest.run.launcher import QemuLauncher


def test_testinfra_modules_work_over_the_agent(host):
    assert host.file("/etc/kmodtest/boot-modules").exists
    assert host.file("/usr/sbin/nft").is_file
    assert host.sysctl("net.ipv4.ip_forward") == 1
    assert host.check_output("uname -m") in ("x86_64", "aarch64", "armv7l")
    assert host.run("exit 7").rc == 7


def test_ip_and_modprobe_are_the_real_tools_not_busybox(host):
    assert "iproute2" in host.check_output("ip -V")
    assert "kmod" in host.check_output("modprobe --version")
    assert "iproute2" in host.check_output("sh -c 'ip -V'")


def test_binary_output_from_the_guest_is_byte_exact(router):
    reply = router.run("head -c 200000 /dev/urandom | tee /tmp/blob >/dev/null; cat /tmp/blob")
    guest_sum = router.check("sha256sum /tmp/blob").split()[0]
    assert len(reply.stdout) == 200000
    assert hashlib.sha256(reply.stdout).hexdigest() == guest_sum


def test_guest_timeout_then_next_command_works(router):
    with pytest.raises(CommandTimeout):
        router.run("sleep 60", timeout=2)
    assert router.check("echo alive") == "alive\n"


def test_reset_restores_the_base_network(router):
    router.check("nft add table inet junk; ip link set lan mtu 1280")
    router.check("ip -n client route del default")
    router.reset()
    assert "junk" not in router.check("nft list ruleset")
    assert "mtu 1500" in router.check("ip link show lan")
    assert "default via 192.0.2.1" in router.check("ip -n client route")


def test_client_reaches_server_through_the_router(router):
    out = router.check("ip netns exec client ping -c 1 -W 5 198.51.100.2")
    assert "1 packets received" in out
    out = router.check("ip netns exec client ping -c 1 -W 5 2001:db8:2::2")
    assert "1 packets received" in out


class CountingLauncher(QemuLauncher):
    """The real QEMU launcher, counting its launches."""

    def __init__(self) -> None:
        self.machines = []

    def start(self, spec):
        self.machines.append(super().start(spec))
        return self.machines[-1]


def test_boot_without_agent_port_fails_at_once_then_the_case_fails_fast(
    kmodtest_session, monkeypatch, tmp_path
):
    """/init finds no agent port: the boot fails on its console message, not the timeout; the
    case is then broken, and asking again fails at once with that reason, booting nothing."""
    monkeypatch.setattr(qemu, "AGENT_PORT_NAME", "org.kmodtest.elsewhere")
    cell = kmodtest_session.cells[0]
    launcher = CountingLauncher()
    pool = kmodtest_session.pool
    strategy = CaseStrategy(
        VmCase(cell, cell.spec.nics[0]), pool.images, launcher, pool.accel_for(cell).accel,
        log_dir=lambda: tmp_path / "logs",
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(MachineError, match=r"no virtio-serial port named org\.kmodtest\.agent"):
        strategy.ready()
    assert time.monotonic() - start < BOOT_TIMEOUT, "waited out the boot timeout"
    assert strategy.state is State.BROKEN and len(launcher.machines) == 1
    [machine] = launcher.machines
    assert not machine.alive, "QEMU left running"
    assert not machine.spec.run_dir.exists(), "run directory left behind"

    with pytest.raises(MachineError, match=r"(?s)no virtio-serial port.*failed earlier"):
        strategy.ready()
    assert len(launcher.machines) == 1, "a broken case was booted again"


class MissingBinaryLauncher(QemuLauncher):
    """QEMU's launcher asked for a binary that is not installed; it records what it got."""

    def __init__(self) -> None:
        self.specs = []
        self.modes = []

    def start(self, spec):
        self.specs.append(spec)
        self.modes.append(spec.run_dir.stat().st_mode & 0o777)
        missing = dataclasses.replace(spec.arch, qemu_binary="qemu-system-kt-missing")
        return super().start(dataclasses.replace(spec, arch=missing))


def test_failed_launch_leaves_no_run_directory(kmodtest_session, tmp_path):
    """QEMU cannot even start (its binary is missing): the per-VM socket dir is removed."""
    cell = kmodtest_session.cells[0]
    pool = kmodtest_session.pool
    launcher = MissingBinaryLauncher()
    strategy = CaseStrategy(
        VmCase(cell, cell.spec.nics[0]), pool.images, launcher, "tcg",
        log_dir=lambda: tmp_path / "logs",
    )  # fmt: skip
    with pytest.raises(MachineError, match="qemu-system-kt-missing is not installed"):
        strategy.ready()
    [spec] = launcher.specs
    assert launcher.modes == [0o700]  # sockets: private to us
    assert not spec.run_dir.exists(), "the run directory outlived the failed launch"
