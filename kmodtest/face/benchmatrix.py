"""``kmodtest bench-matrix``: the whole matrix, serial and under ``pytest -n N``, compared.

It runs the very command a user runs (``pytest vmtests/ --kernel …``) once per mode, each with
its own JUnit XML, then prints the wall time of each, whether both gave the same outcome for
every test, and the boot time per arch (from the ``vm_boot_seconds`` JUnit property the
``router`` fixture records). Images are built first, so neither mode pays for them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kmodtest.face.options import Settings
from kmodtest.face.scheduling import case_of
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import ImageBuilder

console = Console(width=max(Console().width, 110))


@dataclass
class RunResult:
    """One pytest run: its wall time, exit status and per-test outcome."""

    mode: str
    wall_seconds: float
    exit_code: int
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed/failed/...
    boots: dict[str, tuple[str, float]] = field(default_factory=dict)  # boot dir -> (arch, s)
    seconds: dict[str, float] = field(default_factory=dict)  # test id -> its time (JUnit)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


def parse_junit(path: Path, mode: str, wall: float, exit_code: int) -> RunResult:
    result = RunResult(mode, wall, exit_code)
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "error"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        # an error in teardown adds a second entry for the same test: the worse one wins
        if result.outcomes.get(test_id) in (None, "passed"):
            result.outcomes[test_id] = outcome
        result.seconds[test_id] = result.seconds.get(test_id, 0.0) + float(case.get("time", 0))
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "vm_boot" in props and "vm_boot_seconds" in props:
            result.boots[str(props["vm_boot"])] = (
                str(props.get("arch")),
                float(str(props["vm_boot_seconds"])),
            )
    return result


def _pytest_argv(args: argparse.Namespace, workers: int, junit: Path, logs: Path) -> list[str]:
    settings = Settings.from_args(args)
    argv = [sys.executable, "-m", "pytest", *args.tests,
            *settings.argv("kernel", "nic", "arch", "kernels_dir", "images_dir", "image_cache"),
            f"--junitxml={junit}", f"--log-dir={logs}", "-p", "no:cacheprovider",
            "-rfE"]  # fmt: skip
    if workers > 1:
        argv += ["-n", str(workers)]
    extra = list(args.pytest_args)
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def run_mode(args: argparse.Namespace, workers: int, out: Path) -> RunResult:
    mode = "serial" if workers <= 1 else f"-n {workers}"
    tag = "serial" if workers <= 1 else f"n{workers}"
    junit, log = out / f"{tag}.xml", out / f"{tag}.log"
    argv = _pytest_argv(args, workers, junit, out / f"{tag}-logs")
    console.print(f"[bold]{mode}[/]: {' '.join(argv[1:])}\n  output: {log}")
    start = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if not junit.exists():
        console.print(f"[red]{mode}: pytest wrote no JUnit XML (exit {proc.returncode}); see {log}")
        return RunResult(mode, wall, proc.returncode)
    result = parse_junit(junit, mode, wall, proc.returncode)
    console.print(
        f"  {mode}: exit {proc.returncode}, {wall:.0f} s, {result.count('passed')} passed, "
        f"{result.count('failed')} failed, {result.count('error')} errors, "
        f"{result.count('skipped')} skipped"
    )
    return result


def boot_table(result: RunResult) -> Table:
    per_arch: dict[str, list[float]] = defaultdict(list)
    for arch, seconds in result.boots.values():
        per_arch[arch].append(seconds)
    table = Table("arch", "boots", "median (s)", "min (s)", "max (s)",
                  title=f"boot to first command, per arch ({result.mode} run)")  # fmt: skip
    for arch, values in sorted(per_arch.items()):
        table.add_row(arch, str(len(values)), f"{statistics.median(values):.1f}",
                      f"{min(values):.1f}", f"{max(values):.1f}")  # fmt: skip
    return table


def cell_table(result: RunResult, cells: list[Cell]) -> Table:
    """Test time per cell (setup, which includes boots, + call + teardown), from the JUnit XML."""
    per_cell: dict[str, list[float]] = defaultdict(list)
    for test_id, seconds in result.seconds.items():
        case = case_of(test_id, cells, None)
        cell = next((c.id for c in cells if case and case.startswith(c.id + "-")), "(no VM)")
        per_cell[cell].append(seconds)
    table = Table("cell", "tests", "time (s)", title=f"suite time per cell ({result.mode} run)")
    for cell_id, values in sorted(per_cell.items()):
        table.add_row(cell_id, str(len(values)), f"{sum(values):.0f}")
    return table


def compare(results: list[RunResult]) -> list[str]:
    """Test ids whose outcome differs between the runs (or that one run lacks)."""
    ids = sorted(set().union(*(r.outcomes for r in results)))
    return [i for i in ids if len({r.outcomes.get(i, "missing") for r in results}) > 1]


def run_bench_matrix(args: argparse.Namespace, cells: list[Cell], builder: ImageBuilder) -> int:
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for cell in cells:  # warm the image cache: neither timed run should pay for a build
        builder.get(cell)
    console.print(f"images of {len(cells)} cells ready in {time.monotonic() - start:.0f} s")

    results = [run_mode(args, workers, out) for workers in args.workers]
    table = Table("run", "wall (s)", "passed", "failed", "errors", "skipped", "exit",
                  title=f"pytest {' '.join(args.tests)} --kernel {args.kernel}")  # fmt: skip
    for r in results:
        table.add_row(r.mode, f"{r.wall_seconds:.0f}", str(r.count("passed")),
                      str(r.count("failed")), str(r.count("error")), str(r.count("skipped")),
                      str(r.exit_code))  # fmt: skip
    console.print(table)
    if len(results) > 1 and results[-1].wall_seconds > 0:
        ratio = results[0].wall_seconds / results[-1].wall_seconds
        console.print(f"wall time {results[0].mode} / {results[-1].mode}: {ratio:.2f}x")
    differ = compare(results) if len(results) > 1 else []
    if len(results) > 1:
        if differ:
            console.print(f"[red]{len(differ)} tests differ between the runs:[/]")
            for test_id in differ:
                seen = ", ".join(f"{r.mode}: {r.outcomes.get(test_id, 'missing')}" for r in results)
                console.print(f"  {test_id}  ({seen})")
        else:
            total = len(results[0].outcomes)
            console.print(f"same outcome for all {total} tests in every run")
    console.print(cell_table(results[0], cells))
    for r in results:
        if r.boots:
            console.print(boot_table(r))
    failed = any(r.exit_code != 0 for r in results)
    return 1 if failed or differ else 0
