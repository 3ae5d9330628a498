"""Which QEMU runs each arch (--qemu), and the Debian QEMU the cache unpacks for old hosts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from kmodtest.arches import ARCHES
from kmodtest.errors import ConfigError
from kmodtest.guest.topology import Topology
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.qemu import INHERITED_ENV, DebianQemu, get_debian_qemu
from kmodtest.progress import Progress
from kmodtest.run import emulator
from kmodtest.run.devices import qemu_devices
from kmodtest.run.machine import MachineSpec
from kmodtest.run.qemu import qemu_argv

X86 = ARCHES["x86_64"]


@pytest.fixture
def host_qemu_version(tmp_path, monkeypatch):
    """A host whose qemu-system-x86_64 says the version the test sets; the Debian entry is a
    stand-in that counts its builds (the real one is tested below)."""
    monkeypatch.setattr(emulator, "_chosen", {})
    built: list[int] = []

    def debian(cache, progress):
        built.append(1)
        return DebianQemu(tmp_path / "debian/bin", "trixie", "1:10.0.13+ds-0+deb13u1")

    monkeypatch.setattr(emulator, "get_debian_qemu", debian)

    def set_version(version: str) -> list[int]:
        host = tmp_path / f"host-{version}"
        host.mkdir()
        script = host / X86.qemu_binary
        script.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (Debian)'\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", str(host))
        return built

    return set_version


def test_auto_replaces_a_host_qemu_older_than_8_0(host_qemu_version, tmp_path):
    built = host_qemu_version("7.2.22")
    (choice,) = emulator.choose_qemu([X86], "auto", None, Progress(quiet=True))
    assert choice.command == str(tmp_path / "debian/bin/qemu-system-x86_64")
    assert emulator.qemu_binary(X86) == choice.command
    assert "7.2.22, older than 8.0" in choice.reason and built == [1]
    assert "Debian trixie 1:10.0.13" in emulator.describe(choice)


def test_auto_keeps_a_host_qemu_of_8_0_or_newer(host_qemu_version):
    built = host_qemu_version("8.2.2")
    (choice,) = emulator.choose_qemu([X86], "auto", None, Progress(quiet=True))
    assert (choice.command, choice.origin, built) == ("qemu-system-x86_64", "host 8.2.2", [])


def test_host_and_debian_force_the_choice(host_qemu_version, tmp_path):
    built = host_qemu_version("7.2.22")
    (host,) = emulator.choose_qemu([X86], "host", None, Progress(quiet=True))
    assert host.command == "qemu-system-x86_64" and built == []
    (debian,) = emulator.choose_qemu([X86], "debian", None, Progress(quiet=True))
    assert debian.command.startswith(str(tmp_path / "debian")) and built == [1]


def test_a_host_without_qemu_keeps_the_error_that_names_its_package(host_qemu_version, tmp_path):
    built = host_qemu_version("7.2.22")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(empty))
        (choice,) = emulator.choose_qemu([X86], "auto", None, Progress(quiet=True))
    assert choice.command == "qemu-system-x86_64" and built == []


def test_an_unknown_choice_is_refused():
    with pytest.raises(ConfigError, match="unknown --qemu 'newest'"):
        emulator.choose_qemu([X86], "newest", None, Progress(quiet=True))


def test_the_debian_qemu_runs_with_its_own_libraries_and_has_igb(kmodtest_session):
    """The real entry (mmdebstrap, Debian's packages): every arch's binary starts, says its
    version, and offers the NIC models the host's 7.2 lacks."""
    debian = get_debian_qemu(kmodtest_session.cache, Progress(quiet=True))
    for arch in ARCHES.values():
        out = subprocess.run([debian.binary(arch), "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and "QEMU emulator version" in out.stdout, out.stderr
    devices = qemu_devices(str(debian.binary(X86)))
    assert {"igb", "e1000e", "e1000", "virtio-net-pci"} <= devices


def test_four_igbs_fit_one_machine(kmodtest_session, tmp_path):
    """Side by side QEMU refused them (their SR-IOV functions collide); at the slots our argv
    gives them the machine builds, and stops before its CPU runs (-S)."""
    debian = get_debian_qemu(kmodtest_session.cache, Progress(quiet=True))
    spec = MachineSpec(
        name="vm", arch=X86, machine=X86.machine, cpu=X86.cpu, memory_mb=256, kernel=None,
        initrd=None, cmdline=None,
        run_dir=tmp_path, log_dir=tmp_path, nics=Topology("igb").nics(tmp_path),
    )  # fmt: skip
    argv = [*qemu_argv(spec, str(debian.binary(X86))), "-S"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # still running, paused: every device was accepted
        # named like any QEMU, for whatever looks for QEMU processes (orphan checks, ps)
        argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0]
        proc.kill()
        proc.communicate()
        assert argv0 == b"qemu-system-x86_64"
        return
    pytest.fail(f"QEMU exited with {proc.returncode}: {out}")


def test_a_record_naming_another_binary_keeps_it(host_qemu_version):
    host_qemu_version("7.2.22")
    emulator.choose_qemu([X86], "auto", None, Progress(quiet=True))
    other = dataclasses.replace(X86, qemu_binary="qemu-system-kt-missing")
    assert emulator.qemu_binary(other) == "qemu-system-kt-missing"


def test_a_child_run_reuses_its_parents_entry_instead_of_unpacking_its_own(
    kmodtest_session, tmp_path
):
    """Inner runs with a cache of their own (the fault tests, validate's pytest) would each
    unpack ~475 MB; the parent's entry, named in the environment, is the same content."""
    parent = get_debian_qemu(kmodtest_session.cache, Progress(quiet=True))
    assert os.environ[INHERITED_ENV] == str(parent.bin_dir.parent)
    empty = Cache(tmp_path / "child-cache")
    child = get_debian_qemu(empty, Progress(quiet=True))
    assert child.bin_dir == parent.bin_dir and not (tmp_path / "child-cache" / "qemu").exists()
