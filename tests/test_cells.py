"""kernels/*.yaml loading: the real matrix loads, and bad input names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.prepare.cells import load_matrix

GOOD = """\
cells:
  - id: a-amd64
    arch: x86_64
    source: {kind: debian, suite: trixie, kernel_package: linux-image-amd64}
    default: true
  - id: b-arm64
    arch: arm64
    source: {kind: debian, suite: bookworm, kernel_package: linux-image-arm64}
    nics: [virtio-net-pci, e1000]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.yaml").write_text(text)
    return tmp_path


def test_repository_matrix_loads_with_one_default(repo):
    matrix = load_matrix(repo / "kernels")
    assert matrix.default.spec.default
    assert len(set(matrix.ids())) == len(matrix.ids())
    assert {c.arch.name for c in matrix.cells} >= {"x86_64"}


def test_select_by_id_arch_and_all(tmp_path):
    matrix = load_matrix(write(tmp_path, GOOD))
    assert [c.id for c in matrix.select(None)] == ["a-amd64"]
    assert [c.id for c in matrix.select("all")] == ["a-amd64", "b-arm64"]
    assert [c.id for c in matrix.select("all", arches="arm64")] == ["b-arm64"]
    assert [c.id for c in matrix.select("b-arm64,a-amd64")] == ["b-arm64", "a-amd64"]
    assert [c.id for c in matrix.select("all", nics="e1000")] == ["b-arm64"]


def test_unknown_kernel_lists_known_ids(tmp_path):
    matrix = load_matrix(write(tmp_path, GOOD))
    with pytest.raises(ConfigError) as err:
        matrix.select("nope")
    assert "unknown kernel 'nope'" in str(err.value)
    assert "a-amd64, b-arm64" in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    write(tmp_path, "cells:\n  - id: x\n    arch: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_matrix(tmp_path)
    assert "m.yaml:" in str(err.value) and "malformed YAML" in str(err.value)


def test_bad_field_names_file_line_and_field(tmp_path):
    write(tmp_path, GOOD.replace("arch: arm64", "arch: mips"))
    with pytest.raises(ConfigError) as err:
        load_matrix(tmp_path)
    message = str(err.value)
    assert "m.yaml:7: cells[1].arch" in message
    assert "unknown arch 'mips'" in message


def test_missing_and_unknown_fields_are_reported(tmp_path):
    text = GOOD.replace("kernel_package: linux-image-arm64", "kernel_pkg: x")
    write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_matrix(tmp_path)
    message = str(err.value)
    assert "cells[1].source.debian.kernel_package: Field required" in message
    assert "cells[1].source.debian.kernel_pkg: Extra inputs are not permitted" in message


def test_unknown_nic_model(tmp_path):
    write(tmp_path, GOOD.replace("e1000]", "ne2k]"))
    with pytest.raises(ConfigError, match=r"m.yaml:9: cells\[1\].nics.*ne2k"):
        load_matrix(tmp_path)


def test_duplicate_ids_and_default_count(tmp_path):
    write(tmp_path, GOOD.replace("b-arm64", "a-amd64"))
    with pytest.raises(
        ConfigError,
        match=r"m.yaml:6: cells\[1\].id: cell id 'a-amd64' is already used at .*m.yaml:2\n",
    ):
        load_matrix(tmp_path)
    write(tmp_path, GOOD.replace("    default: true\n", ""))
    with pytest.raises(ConfigError, match="no cell has 'default: true'"):
        load_matrix(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(ConfigError, match="no kernel matrix files"):
        load_matrix(tmp_path)


def test_append_reaches_the_kernel_command_line(tmp_path):
    from kmodtest.guest.boot import kernel_cmdline

    text = GOOD.replace("    default: true\n", "    default: true\n    append: e1000e.IntMode=1\n")
    a, b = load_matrix(write(tmp_path, text)).select("all")
    assert kernel_cmdline(a).endswith(" e1000e.IntMode=1")
    assert kernel_cmdline(b).startswith("console=ttyAMA0 ") and "IntMode" not in kernel_cmdline(b)
    # the arch's own arguments: x86 boots without ACPI (measured faster), arm has none
    assert " acpi=off " in kernel_cmdline(a) and "acpi" not in kernel_cmdline(b)


def test_smp_comes_from_the_arch_unless_the_cell_says_and_reaches_the_machine(tmp_path):
    from kmodtest.guest.boot import cell_machine

    text = GOOD.replace("    default: true\n", "    default: true\n    smp: 2\n")
    a, b = load_matrix(write(tmp_path, text)).select("all")
    assert (a.smp, b.smp) == (2, b.arch.smp)

    machines = [
        cell_machine(
            c, "vm", (), tmp_path, tmp_path, "tcg", False, kernel=None, initrd=None, cmdline=None
        )
        for c in (a, b)
    ]
    assert [m.smp for m in machines] == [2, b.arch.smp]
    with pytest.raises(ConfigError, match="smp"):
        load_matrix(
            write(tmp_path, GOOD.replace("    default: true\n", "    smp: 0\n    default: true\n"))
        )
