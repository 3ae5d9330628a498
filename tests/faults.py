"""The fault-injection suite's bookkeeping (tests/test_faults_*.py) and its figures.

Each fault test injects one fault and records what it measured *before* asserting on it:
processes and directories left behind, damaged cache entries a VM was given, and messages that
did not name the problem and the fix. At the end of the run pytest prints the figures (faults
injected, survived, orphans, corrupt cache entries used, unclear messages); a fault "survived"
when its test passed. Reports carry the records as user properties, so ``-n 2`` sums them too.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodtest.prepare.cache import Cache, try_file_lock

PREFIX = "kmodtest_fault"
COUNTS = ("orphans", "corrupt_used", "unclear")
LABELS = {
    "orphans": "orphans (processes, run/temp dirs, held locks)",
    "corrupt_used": "corrupt cache entries used",
    "unclear": "unclear messages",
}


@dataclass
class FaultRecord:
    """What one fault test measured; written to its report as it is recorded."""

    node: pytest.Item

    def injected(self, what: str) -> None:
        self.node.user_properties.append((PREFIX, what))

    def count(self, name: str, found: Iterable[object]) -> list[object]:
        """Record how many ``found`` there are under ``name``; returns them for the assert."""
        assert name in COUNTS, name
        items = list(found)
        self.node.user_properties.append((f"{PREFIX}_{name}", len(items)))
        return items

    def clear_message(self, text: str, *needles: str) -> bool:
        """Count ``text`` as unclear unless it has each needle (regex) and says how to fix
        it (``fix:``) or where to look (``console log:``/``see ``)."""
        ok = all(re.search(n, text) for n in needles) and bool(
            re.search(r"fix: |console log: |see /", text)
        )
        self.count("unclear", [] if ok else [text])
        return ok


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> FaultRecord:
    return FaultRecord(request.node)


def is_fault_test(nodeid: str) -> bool:
    """Every test of a ``test_faults_*.py`` file is one fault (counted even if it errors before
    it could record anything)."""
    return Path(nodeid.split("::")[0]).name.startswith("test_faults_")


class FaultFigures:
    """Sums the records of the run's fault tests and prints them at the end. A fault survived
    when every phase of its test passed (a skip is not survival)."""

    def __init__(self) -> None:
        self.faults: dict[str, bool] = {}  # nodeid -> survived
        self.totals = dict.fromkeys(COUNTS, 0)
        self._not_passed: set[str] = set()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed or report.skipped:
            self._not_passed.add(report.nodeid)
        if report.when != "teardown" or not is_fault_test(report.nodeid):
            return
        self.faults[report.nodeid] = report.nodeid not in self._not_passed
        for key, value in report.user_properties:
            if key.startswith(f"{PREFIX}_"):
                self.totals[key.removeprefix(f"{PREFIX}_")] += int(value)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.faults:
            return
        terminalreporter.section("kmodtest fault figures")
        survived = sum(self.faults.values())
        terminalreporter.write_line(f"faults injected: {len(self.faults)}, survived: {survived}")
        for name in COUNTS:
            terminalreporter.write_line(f"{LABELS[name]}: {self.totals[name]}")


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # xdist workers send reports; the controller sums
        config.pluginmanager.register(FaultFigures(), "kmodtest-fault-figures")


# -- what a run leaves behind ------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    cmdline: str


def processes_marked(marker: str) -> list[Proc]:
    """Live processes (not zombies) whose environment holds ``marker``: everything an inner run
    started inherits it, whatever process group or session it moved to."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state != "Z" and int(entry.name) != os.getpid():
            found.append(Proc(int(entry.name), cmdline.strip()))
    return found


def wait_gone(marker: str, seconds: float = 5.0) -> list[Proc]:
    """The marked processes still alive after up to ``seconds`` (the kernel reaps a killed
    group within moments; this never waits when there are none)."""
    deadline = time.monotonic() + seconds
    while (left := processes_marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def held_locks(cache: Cache) -> list[Path]:
    """Lock files of ``cache`` someone still holds."""
    held = []
    for path in sorted((cache.root / "locks").glob("*.lock")):
        with try_file_lock(path) as free:
            if not free:
                held.append(path)
    return held


def leftovers(directory: Path) -> list[Path]:
    """Entries under ``directory`` (a run's private TMPDIR, a cache's work/): what a run that
    cleaned up after itself leaves there is nothing. pytest's own ``pytest-of-<user>`` is
    not ours: xdist's controller makes its base temp there for the workers, and pytest keeps
    the newest three by design."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith("pytest-of-"))


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache holding the default cell's image (built once per run): copy it to get
    a warm cache whose locks, work directory and entries only one inner run touches."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("built") / "cache"
    build = [str(Path(sys.executable).parent / "kmodtest"), "build", f"--image-cache={root}",
             f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}"]  # fmt: skip
    done = subprocess.run(build, cwd=repo, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private, short TMPDIR for an inner run: its VMs' socket dirs (kt-*) are made here, so
    listing it before and after is exact, and unix socket paths stay under 108 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ktf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
