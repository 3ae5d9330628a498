"""Run the VM suite once for one module change, in its own pytest process, and say how it went.

A separate process per run (not ``pytest.main`` in this one): two runs go side by side, a run
past its deadline is stopped like Ctrl-C (pytest unwinds its fixtures and stops its VM), and
nothing of one run's collected test modules leaks into the next. The outcome is read from
the run's JUnit XML: which test failed first and why, and whether the kernel itself reported a
problem (the plugin's health scan) or the VM died, which a mutation report shows as a crash.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest import processes

# what the plugin's failure text says when the kernel, not an assertion, failed the test
CRASH_MARKERS = (
    "the kernel reported a problem",
    "did not come up",
    "QEMU exited",
    "channel closed",
)
# the plugin's summary line per boot: "<vm>: kernel <release>, tcg, up in 6.5 s"
_BOOTED = re.compile(r", up in ([0-9.]+) s$", re.M)
# pytest exit codes: 0 all passed, 1 some failed; 2-5 mean the run itself went wrong
PYTEST_OK = (0, 1)


@dataclass(frozen=True)
class SuiteSelection:
    """What one run executes: the same for the control and for every mutant of a cell."""

    tests: tuple[str, ...]
    cell: str
    nic: str | None
    keyword: str | None
    cache_dir: Path
    kernels_dir: Path
    images_dir: Path
    extra: tuple[str, ...] = ()

    def key_material(self) -> dict[str, object]:
        return {"tests": list(self.tests), "cell": self.cell, "nic": self.nic,
                "keyword": self.keyword, "extra": list(self.extra)}  # fmt: skip


@dataclass
class SuiteOutcome:
    status: str  # passed, failed, crashed, timeout, error
    seconds: float
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    first_failure: str = ""  # node id
    message: str = ""
    durations: dict[str, float] = field(default_factory=dict)  # node id -> seconds
    exit_code: int | None = None
    boots: list[float] = field(default_factory=list)  # seconds to the first command, per boot

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SuiteOutcome:
        return cls(**data)  # type: ignore[arg-type]


def pytest_argv(
    selection: SuiteSelection,
    change: list[str],
    out: Path,
    order: Path | None,
    stop_first: bool,
) -> list[str]:
    argv = [
        sys.executable, "-m", "pytest", *selection.tests,
        f"--kernel={selection.cell}",
        f"--image-cache={selection.cache_dir}",
        f"--kernels-dir={selection.kernels_dir}",
        f"--images-dir={selection.images_dir}",
        f"--log-dir={out / 'logs'}",
        f"--junitxml={out / 'junit.xml'}",
        "-p", "no:cacheprovider", "-p", "kmodtest.face.mutorder", "-q", "-rfE",
        *change,
    ]  # fmt: skip
    if selection.nic:
        argv.append(f"--nic={selection.nic}")
    if selection.keyword:
        argv += ["-k", selection.keyword]
    if order is not None:
        argv.append(f"--order-durations={order}")
    if stop_first:
        argv.append("-x")
    return [*argv, *selection.extra]


def run_suite(
    selection: SuiteSelection,
    change: list[str],
    out: Path,
    timeout: float | None = None,
    order: Path | None = None,
    stop_first: bool = True,
    cwd: Path | None = None,
) -> SuiteOutcome:
    """Run the suite with ``change`` (``--module-patch X`` ...) into ``out``; never raises
    for a failing run: the outcome says what happened."""
    out.mkdir(parents=True, exist_ok=True)
    argv = pytest_argv(selection, change, out, order, stop_first)
    (out / "pytest.argv").write_text(json.dumps(argv) + "\n")
    start = time.monotonic()
    timed_out = False
    with open(out / "pytest.log", "wb") as log:
        proc = processes.spawn(argv, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=cwd)  # fmt: skip
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # SIGTERM is Ctrl-C for pytest: its fixtures stop the VM before it exits
            code = processes.terminate(proc, grace=30.0)
    seconds = time.monotonic() - start
    outcome = read_junit(out / "junit.xml", seconds)
    outcome.exit_code = code
    log_text = (out / "pytest.log").read_text(errors="replace")
    outcome.boots = [float(m) for m in _BOOTED.findall(log_text)]
    if timed_out:
        outcome.status = "timeout"
        outcome.message = f"no verdict after {timeout:.0f} s; stopped"
    elif code not in PYTEST_OK or (outcome.passed + outcome.failed == 0):
        outcome.status = "error"
        tail = log_text.splitlines()[-15:]
        outcome.message = f"pytest exited {code}:\n" + "\n".join(tail)
    return outcome


def _nodeid(case: ET.Element) -> str:
    module = case.get("classname", "").replace(".", "/")
    return f"{module}.py::{case.get('name', '')}"


def read_junit(path: Path, seconds: float) -> SuiteOutcome:
    outcome = SuiteOutcome("passed", seconds)
    if not path.is_file():
        outcome.status = "error"
        return outcome
    for case in ET.parse(path).getroot().iter("testcase"):
        nodeid = _nodeid(case)
        outcome.durations[nodeid] = float(case.get("time", "0") or 0)
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if case.find("skipped") is not None and bad is None:
            outcome.skipped += 1
        elif bad is None:
            outcome.passed += 1
        else:
            outcome.failed += 1
            if not outcome.first_failure:
                text = f"{bad.get('message', '')}\n{bad.text or ''}"
                outcome.first_failure = nodeid
                outcome.message = _summary(text)
                crashed = any(marker in text for marker in CRASH_MARKERS)
                outcome.status = "crashed" if crashed else "failed"
    return outcome


def _summary(text: str, limit: int = 600) -> str:
    """The lines that say why: the kernel's report if there is one, else the assertion."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for index, line in enumerate(lines):
        if "kernel reported" in line or "did not come up" in line:
            return "\n".join(lines[index : index + 8])[:limit]
    asserts = [ln for ln in lines if ln.lstrip().startswith("E ")]
    return "\n".join(asserts[:6] or lines[:6])[:limit]
