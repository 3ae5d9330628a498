"""``kmodtest validate``: one command from a patch to a verdict per matrix cell.

For each selected cell: build (or reuse) the base image, rebuild the flowtable modules with the
change against the cell's own kernel sources (a cached layer), then run the VM suite on all of
them in one pytest session (``--module-patch``), and print cell, kernel, passed/failed and the
first failure, naming modules that failed to load with the kernel's own message.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kmodtest.errors import ConfigError, KmodtestError
from kmodtest.face import options
from kmodtest.face.patching import CASE_ARG, CELL_PROPERTY, LOAD_FAILURE_PROPERTY
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, load_matrix, unbuilt_local_kernel
from kmodtest.prepare.images import ImageBuilder
from kmodtest.prepare.modchange import ModuleChange
from kmodtest.prepare.overlay import OverlayBuilder, OverlayTimings, cross_build_skip
from kmodtest.progress import Progress

console = Console()
# the verdict is read in CI logs and pipes too, where rich would assume 80 columns
wide = console if console.is_terminal else Console(width=160)
QUICK_TESTS = ("vmtests/test_flowtable.py", "vmtests/test_offload.py")
QUICK_NIC = "virtio-net-pci"
# the flowtable tests, and two offload cases (TCP/IPv4 routed, UDP/IPv6 masqueraded) of the 8
QUICK_K = "not offloaded_and_payload_intact or tcp-ipv4-routed or udp-ipv6-masquerade"


@dataclass
class CellVerdict:
    cell: str
    kernel: str = "-"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    first_failure: str = ""
    load_failure: str = ""
    problem: str = ""  # could not build or run at all
    fix: str = ""  # what the problem's error says to do (e.g. the full build log's path)
    timings: OverlayTimings | None = None
    base_seconds: float = 0.0
    test_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problem and self.failed == 0 and self.passed > 0

    @property
    def verdict(self) -> str:
        if self.problem.startswith("skipped"):
            return "SKIP"
        return "PASS" if self.ok else "FAIL"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("validate", help="patch -> rebuilt modules -> VM suite -> verdict per cell")
    change = p.add_mutually_exclusive_group()
    change.add_argument("--patch", type=Path, help="a unified diff against the kernel tree")
    change.add_argument("--src", type=Path, help="a kernel source tree (net/netfilter, include)")
    options.add_to_argparse(p, ["kernel", "arch"])
    p.add_argument("--tests", nargs="+", default=None, help="test paths (default: vmtests)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{' '.join(QUICK_TESTS)} on {QUICK_NIC}, two offload cases: "
        "the ~25 s loop (default cell, 2 cores)",
    )
    p.add_argument("-k", dest="keyword", help="pytest -k expression")
    p.add_argument("--timings", action="store_true", help="print where the time went")
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="pytest-xdist workers for the VM suite (default: 2, each VM case on one worker)",
    )
    p.add_argument("--json", type=Path, help="also write the verdicts to this file, as JSON")
    options.add_to_argparse(p, ["log_dir", *options.DIRS])
    p.add_argument("--pytest-arg", action="append", default=[], help="passed on to pytest")
    p.set_defaults(func=run_validate)


class _Collector:
    """Per-cell outcomes from the in-process pytest run."""

    def __init__(self, verdicts: dict[str, CellVerdict]) -> None:
        self.verdicts = verdicts
        self.cell_of: dict[str, str] = {}
        self.outcome: dict[str, str] = {}  # nodeid -> passed/failed/skipped

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            callspec = getattr(item, "callspec", None)
            case = callspec.params.get(CASE_ARG) if callspec else None
            if case is not None:
                self.cell_of[item.nodeid] = case.cell.id

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # under xdist, collection happens on the workers: the report names its cell itself
        props = dict(report.user_properties)
        cell = str(props.get(CELL_PROPERTY) or self.cell_of.get(report.nodeid))
        if cell not in self.verdicts:
            return
        v = self.verdicts[cell]
        v.test_seconds += report.duration
        v.kernel = str(props.get("kernel_release", v.kernel))
        if report.failed:
            if self.outcome.get(report.nodeid) != "failed":
                v.failed += 1
                if self.outcome.get(report.nodeid) == "passed":
                    v.passed -= 1  # failed in teardown after passing
            self.outcome[report.nodeid] = "failed"
            if not v.first_failure:
                v.first_failure = f"{_short(report.nodeid)}: {_message(report)}"
            if props.get(LOAD_FAILURE_PROPERTY) and not v.load_failure:
                v.load_failure = str(props[LOAD_FAILURE_PROPERTY])
        elif report.when == "call" and report.passed:
            self.outcome[report.nodeid] = "passed"
            v.passed += 1
        elif report.skipped and report.nodeid not in self.outcome:
            self.outcome[report.nodeid] = "skipped"
            v.skipped += 1


def _short(nodeid: str) -> str:
    return nodeid.split("::")[-1].split("[")[0]


def _message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else "failed"
    if report.when != "call":
        first = f"({report.when}) {first}"
    return first[:160]


def _prebuild(
    cell: Cell, builder: ImageBuilder, overlay: OverlayBuilder, verdict: CellVerdict
) -> bool:
    """Base image and overlay before pytest starts, so build errors are verdicts, not errors."""
    if why := cross_build_skip(cell) or unbuilt_local_kernel(cell):  # the debug cell, unbuilt
        verdict.problem = f"skipped: {why}"
        return False
    try:
        start = time.monotonic()
        base = builder.get(cell)
        verdict.base_seconds = time.monotonic() - start
        verdict.kernel = base.kernel_version
        image = overlay.get(cell, base)
    except KmodtestError as exc:
        verdict.problem = f"build failed: {exc.problem}"
        verdict.fix = exc.fix or ""
        verdict.timings = overlay.timings.get(cell.id)
        return False
    verdict.timings = overlay.timings.get(cell.id)
    verdict.kernel = image.kernel_version
    info = image.manifest.get("overlay", {})
    verdict.warnings = [f"modpost: {w}" for w in info.get("modpost_warnings", [])]
    verdict.warnings += info.get("notes", [])
    return True


def run_validate(args: argparse.Namespace) -> int:
    start = time.monotonic()
    change = ModuleChange(
        patch=args.patch.absolute() if args.patch else None,
        source_tree=args.src.absolute() if args.src else None,
    )
    change.check()
    args.tests = args.tests or list(QUICK_TESTS if args.quick else ["vmtests"])
    if args.quick:
        args.pytest_arg = [f"--nic={QUICK_NIC}", *args.pytest_arg]
        args.keyword = f"({QUICK_K}) and ({args.keyword})" if args.keyword else QUICK_K
    for path in args.tests:
        if not Path(path.split("::")[0]).exists():
            raise ConfigError(f"test path {path} does not exist", "run from the kmodtest checkout")
    settings = options.Settings.from_args(args)
    matrix = load_matrix(settings.kernels_dir)
    cells = matrix.select(settings.kernel, settings.arch)
    cache = Cache(settings.image_cache)
    progress = Progress()
    builder = ImageBuilder(cache, settings.images_dir, progress)
    # failed builds' logs: the workspaces are temporary, the run's log directory is not
    build_logs = settings.log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-validate"
    overlay = OverlayBuilder(cache, change, progress, log_dir=build_logs)
    verdicts = {c.id: CellVerdict(c.id) for c in cells}
    runnable = [c for c in cells if _prebuild(c, builder, overlay, verdicts[c.id])]
    built_at = time.monotonic()
    if runnable:
        pytest_args = [
            *args.tests,
            f"--kernel={','.join(c.id for c in runnable)}",
            *settings.argv("image_cache", "kernels_dir", "images_dir", "log_dir"),
            *([f"--module-patch={change.patch}"] if change.patch else []),
            *([f"--module-src={change.source_tree}"] if change.source_tree else []),
            *([] if change.patch or change.source_tree else ["--module-rebuild"]),
            *(["-k", args.keyword] if args.keyword else []),
            *_xdist_args(args.workers),
            "-p",
            "no:cacheprovider",
            *args.pytest_arg,
        ]
        console.print(f"[bold]pytest {' '.join(pytest_args)}[/]", highlight=False)
        pytest.main(pytest_args, plugins=[_Collector(verdicts)])
    for v in verdicts.values():
        if not v.problem and v.passed + v.failed == 0:
            v.problem = "no test ran (see the pytest output above)"
    total = time.monotonic() - start
    print_verdicts(change, list(verdicts.values()))
    if args.json:
        write_json(args.json, change, list(verdicts.values()), total)
    if args.timings:
        print_timings(list(verdicts.values()), built_at - start, total)
    return exit_code(list(verdicts.values()))


def write_json(path: Path, change: ModuleChange, verdicts: list[CellVerdict], total: float) -> None:
    cells = [{"cell": v.cell, "kernel": v.kernel, "verdict": v.verdict, "passed": v.passed,
              "failed": v.failed, "skipped": v.skipped, "first_failure": v.first_failure,
              "load_failure": v.load_failure, "problem": v.problem, "fix": v.fix,
              "cross_built": bool(v.timings and v.timings.cross)}
             for v in verdicts]  # fmt: skip
    blob = {"change": change.label, "seconds": round(total, 1), "cells": cells}
    path.write_text(json.dumps(blob, indent=2) + "\n")


def exit_code(verdicts: list[CellVerdict]) -> int:
    """0 when every cell that ran passed and at least one ran; a table of SKIPs proves nothing."""
    if not any(v.verdict != "SKIP" for v in verdicts):
        wide.print("[red]kmodtest validate: no cell ran (every cell was skipped)[/]")
        return 1
    return 0 if all(v.ok or v.verdict == "SKIP" for v in verdicts) else 1


def _xdist_args(workers: int) -> list[str]:
    """``-n N``: the plugin's scheduler keeps each VM case (cell, NIC) on one worker."""
    return ["-n", str(workers)] if workers > 1 else []


def print_verdicts(change: ModuleChange, verdicts: list[CellVerdict]) -> None:
    table = Table(
        "cell", "kernel", "verdict", "passed", "failed", "first failure",
        title=f"kmodtest validate: {change.label}",
    )  # fmt: skip
    for v in verdicts:
        first = v.problem or v.first_failure
        if v.load_failure:
            first = f"module load failure: {v.load_failure}\n{first}"
        color = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}[v.verdict]
        table.add_row(
            v.cell, v.kernel, f"[{color}]{v.verdict}[/]", str(v.passed), str(v.failed),
            _escape(first),
        )  # fmt: skip
    wide.print(table)
    for v in verdicts:
        if v.fix:  # on a line of its own, unwrapped: it often ends in a path to copy
            wide.print(f"{v.cell}: fix: {_escape(v.fix)}", highlight=False, soft_wrap=True)
        for w in v.warnings:
            wide.print(f"[yellow]{v.cell}: {_escape(w)}[/]", highlight=False)


def print_timings(verdicts: list[CellVerdict], build_total: float, total: float) -> None:
    table = Table("cell", "step", "seconds", title="kmodtest validate --timings")
    for v in verdicts:
        table.add_row(v.cell, "base image (build or reuse)", f"{v.base_seconds:.1f}")
        if v.timings:
            for name, seconds in v.timings.rows():
                table.add_row(v.cell, name, f"{seconds:.1f}")
            if v.timings.cached:
                table.add_row(v.cell, "(overlay layer came from the cache)", "")
        table.add_row(v.cell, "tests (boot + suite, sum of test phases)", f"{v.test_seconds:.1f}")
    table.add_row("all", "build phase (all cells)", f"{build_total:.1f}")
    table.add_row("all", "[bold]patch -> verdict[/]", f"[bold]{total:.1f}[/]")
    wide.print(table)


def _escape(text: str) -> str:
    return escape(text)
