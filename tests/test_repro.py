"""``kmodtest repro``: the command it prints for a failed CI test selects exactly that test."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from kmodtest.face.repro import failures, report

FAILING = """
import pytest

@pytest.mark.parametrize("case", ["debian-trixie-amd64-e1000", "debian-trixie-amd64-igb"])
def test_offload(case):
    assert case.endswith("igb"), "flow not offloaded"

class TestGroup:
    def test_in_class(self):
        raise RuntimeError("boom")

def test_passes():
    pass
"""


def _junit(tmp_path: Path) -> Path:
    (tmp_path / "vmtests").mkdir()
    (tmp_path / "vmtests" / "test_x.py").write_text(FAILING)
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:kmodtest",
         "vmtests/test_x.py", f"--junitxml={junit}", "-q"],
        cwd=tmp_path, capture_output=True, check=False,
    )  # fmt: skip
    return junit


def test_each_printed_command_selects_exactly_the_failed_test(tmp_path: Path) -> None:
    junit = _junit(tmp_path)
    failed = failures(junit)
    assert [f.test_id for f in failed] == [
        "vmtests/test_x.py::test_offload[debian-trixie-amd64-e1000]",
        "vmtests/test_x.py::TestGroup::test_in_class",
    ]
    assert "flow not offloaded" in failed[0].message
    text = report(junit, "debian-trixie-amd64", {"kernel_version": "6.12.1",
                  "packages": {"linux-image-6.12.1": "6.12.1-1", "nftables": "1.1.3-1"},
                  "initrd_sha256": "ab" * 32}, ["--nic", "e1000"])  # fmt: skip
    lines = [line.strip() for line in text.splitlines()]
    assert "image: kernel 6.12.1 (linux-image-6.12.1 6.12.1-1), nftables 1.1.3-1" in lines[1]
    commands = [line for line in lines if line.startswith(".venv/bin/pytest")]
    assert len(commands) == 2
    for command, failure in zip(commands, failed, strict=True):
        argv = shlex.split(command)
        assert argv[argv.index("--kernel") + 1] == "debian-trixie-amd64"
        assert argv[-2:] == ["--nic", "e1000"]
        # the node id, given back to pytest, collects that one test and nothing else
        collected = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:kmodtest",
             "--collect-only", "-q", argv[1]],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert [c for c in collected if "::" in c] == [failure.test_id]


def test_a_passing_run_says_there_is_nothing_to_reproduce(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="vmtests.test_x" '
                     'name="test_passes"/></testsuite></testsuites>')  # fmt: skip
    assert report(junit, "c", None, []) == f"kmodtest repro: no failed test in {junit}"
