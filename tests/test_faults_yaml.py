"""Fault suite: malformed kernels/*.yaml. Each variant fails at load, before any VM, with one
``file:line: field: problem`` line and a ``fix:``; none loads silently (a duplicated key used to
be taken without a word, a duplicated cell id had no line)."""

from __future__ import annotations

import re

import pytest

from kmodtest.errors import ConfigError
from kmodtest.prepare.cells import load_matrix

GOOD = """\
cells:
  - id: a-amd64
    arch: x86_64
    source: {kind: debian, suite: trixie, kernel_package: linux-image-amd64}
    memory_mb: 512
    default: true
  - id: b-arm64
    arch: arm64
    source: {kind: debian, suite: bookworm, kernel_package: linux-image-arm64}
    nics: [virtio-net-pci, e1000]
"""

# name -> (file content, line, field, what the message must say)
VARIANTS: dict[str, tuple[str | bytes, int, str, str]] = {
    "bad-syntax": (GOOD.replace("e1000]", "e1000"), 11, "malformed YAML",
                   r"expected ',' or '\]'.*started at line 10"),
    "tab-indent": (GOOD.replace("    arch: arm64", "\tarch: arm64"), 8, "malformed YAML",
                   r"character '\\t'"),
    "unknown-key": (GOOD.replace("    memory_mb: 512\n", "    memory_mb: 512\n    colour: red\n"),
                    6, "cells[0].colour", "Extra inputs are not permitted"),
    "wrong-type": (GOOD.replace("memory_mb: 512", "memory_mb: lots"), 5, "cells[0].memory_mb",
                   "valid integer"),
    "wrong-type-nics": (GOOD.replace("[virtio-net-pci, e1000]", "{a: 1}"), 10, "cells[1].nics",
                        "valid tuple"),
    "missing-field": (GOOD.replace("    arch: arm64\n", ""), 7, "cells[1].arch", "Field required"),
    "unknown-arch": (GOOD.replace("arch: arm64", "arch: mips"), 8, "cells[1].arch",
                     "unknown arch 'mips'; known: x86_64"),
    "unknown-nic": (GOOD.replace("e1000]", "ne2k]"), 10, "cells[1].nics",
                    r"unknown NIC model\(s\) \['ne2k'\]; known: virtio-net-pci"),
    "duplicated-cell-id": (GOOD.replace("b-arm64", "a-amd64"), 7, "cells[1].id",
                           r"cell id 'a-amd64' is already used at \S*m.yaml:2"),
    "bad-memory": (GOOD.replace("memory_mb: 512", "memory_mb: 64"), 5, "cells[0].memory_mb",
                   "greater than or equal to 128"),
    "empty-file": ("", 1, "cells", r"Field required \(the file is empty\)"),
    "duplicated-key": (GOOD.replace("    arch: arm64\n", "    arch: arm64\n    arch: x86_64\n"),
                       9, "cells[1].arch", "given twice in one mapping"),
    "bad-id": (GOOD.replace("id: b-arm64", "id: B arm64"), 7, "cells[1].id", "lowercase letters"),
    "unknown-source-kind": (GOOD.replace("kind: debian, suite: bookworm", "kind: x, suite: b"), 9,
                            "cells[1].source", "Input tag 'x'.*'debian', 'local'"),
    "second-default": (GOOD.replace("    nics: [", "    default: true\n    nics: ["), 10,
                       "cells[1].default", r"second cell with 'default: true' \(the first is at"),
    "list-at-top": ("- id: a\n", 1, "(top level)", "valid dictionary"),
    "not-utf8": (GOOD.encode() + b"# caf\xe9\n", 11, "not UTF-8 text", "invalid continuation"),
    "two-documents": (GOOD + "---\ncells: []\n", 11, "malformed YAML", "single document"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_malformed_kernels_file_names_file_line_and_field(name, tmp_path, fault):
    fault.injected(f"kernels/*.yaml: {name}")
    text, line, field, says = VARIANTS[name]
    path = tmp_path / "m.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as caught:
        load_matrix(tmp_path)
    message = str(caught.value)
    first = message.splitlines()[0]
    prefix = f"{path}:{line}: {field}"
    clear = fault.clear_message(message, "^" + re.escape(prefix), says)
    assert clear, f"expected {prefix!r} ... {says!r} and a fix, got:\n{message}"
    assert len(message.splitlines()) == 2 and "  fix: " in message.splitlines()[1], message
    assert not first.startswith(str(tmp_path) + ":"), "the directory instead of the file"
