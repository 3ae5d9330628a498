"""A NIC model whose emulation a QEMU version gets wrong skips there, unless the run names it.

QEMU 7.2's e1000e corrupted guest memory (README: the e1000e double fault). The version is
read from the binary, so these tests put a stand-in ``qemu-system-x86_64`` first in PATH that
answers ``--version`` and ``-device help`` like the real one would.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kmodtest.run.devices import unreliable_nic

CASE_TEST = """
import pytest

@pytest.mark.per_nic
def test_case(vm_case):
    assert vm_case.nic
"""


def fake_qemu(directory: Path, version: str) -> str:
    """A qemu-system-x86_64 that reports ``version`` and offers the matrix's NIC models."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "qemu-system-x86_64"
    devices = "".join(f'name "{n}", bus PCI\\n' for n in ("virtio-net-pci", "e1000", "e1000e"))
    binary.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--version*) echo "QEMU emulator version {version} (fake)";;\n'
        f"  *\"-device help\"*) printf '{devices}';; esac\n"
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return str(binary)


def test_e1000e_is_unreliable_before_qemu_8_and_says_how_to_run_it(tmp_path):
    why = unreliable_nic(fake_qemu(tmp_path / "q72", "7.2.22"), "e1000e")
    assert why is not None
    assert "7.2.22" in why and "double fault" in why
    assert "QEMU 8.0+" in why and "--nic e1000e" in why


def test_e1000e_on_a_newer_qemu_and_other_models_are_trusted(tmp_path):
    assert unreliable_nic(fake_qemu(tmp_path / "q80", "8.0.0"), "e1000e") is None
    old = fake_qemu(tmp_path / "q72", "7.2.22")
    assert unreliable_nic(old, "e1000") is None
    assert unreliable_nic(old, "virtio-net-pci") is None


@pytest.mark.parametrize(
    ("args", "e1000e_outcome"),
    [((), "SKIPPED"), (("--nic", "e1000e"), "PASSED")],
    ids=["default-selection-skips", "named-runs"],
)
def test_the_default_run_skips_e1000e_on_qemu_7_2_and_a_named_one_runs_it(
    pytester, repo, tmp_path, monkeypatch, args, e1000e_outcome
):
    fake_qemu(tmp_path / "bin", "7.2.22")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    pytester.makepyfile(test_case=CASE_TEST)
    result = pytester.runpytest_subprocess(
        f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
        f"--image-cache={tmp_path / 'cache'}", "-v", "-rs", "-p", "no:cacheprovider", *args,
    )  # fmt: skip
    result.stdout.fnmatch_lines([f"*test_case*e1000e* {e1000e_outcome}*"])
    if e1000e_outcome == "SKIPPED":
        result.stdout.fnmatch_lines(["*emulates e1000e unreliably*--nic e1000e*"])
        result.stdout.fnmatch_lines(["*test_case*virtio-net-pci* PASSED*"])
