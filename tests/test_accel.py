"""KVM is chosen only when it really works; here (no vmx/svm) that means TCG, with a reason."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from kmodtest.arches import ARCHES
from kmodtest.errors import ConfigError
from kmodtest.run import accel


def test_foreign_arch_is_never_kvm():
    foreign = "arm64" if platform.machine() == "x86_64" else "x86_64"
    choice = accel.choose_accel(ARCHES[foreign], "auto")
    assert choice.accel == "tcg"
    assert "differs from host" in choice.reason


def test_explicit_choices_and_bad_value():
    assert accel.choose_accel(ARCHES["x86_64"], "tcg").accel == "tcg"
    assert accel.choose_accel(ARCHES["x86_64"], "kvm").accel == "kvm"
    with pytest.raises(ConfigError, match="use --accel auto, kvm or tcg"):
        accel.choose_accel(ARCHES["x86_64"], "hvf")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 host only")
def test_auto_on_this_host_matches_its_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text()
    choice = accel.choose_accel(ARCHES["x86_64"], "auto")
    if " vmx" not in flags and " svm" not in flags:
        assert choice.accel == "tcg"
        assert "neither vmx nor svm" in choice.reason or "kvm" in choice.reason.lower()
    else:  # the probe VM decides; either way the reason says which
        assert choice.reason


def test_probe_bios_has_reset_vector_program():
    bios = ARCHES["x86_64"].kvm_probe.firmware
    assert len(bios) == 0x10000
    assert bios[0xFFF0:0xFFF4] == bytes([0xB0, 0x31, 0xE6, 0xF4])
