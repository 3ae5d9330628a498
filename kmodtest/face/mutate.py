"""``kmodtest mutate``: how much of the flowtable code does the suite actually guard?

For a cell: rebuild the unchanged modules and run the suite on them (the control: it must
pass, and it times every test); then draw single-change mutants of the cell's own flowtable
sources (:mod:`kmodtest.prepare.mutants`) in a seeded order, build each one through the module
loop (a cached overlay), drop those that do not compile or whose object code is unchanged
(:mod:`kmodtest.prepare.objcode`), and run the suite on the first ``--max`` that remain,
fastest tests first, stopping at the first failure. Each verdict is cached by (base image,
mutant, suite code, test selection): an interrupted run resumes where it stopped, and a second
run with a larger ``--max`` only runs the new mutants.

One VM boot per mutant, not a module reload into a running VM: a mutant can corrupt kernel
state (a list, a refcount, a timer) that would then be blamed on the next one, and a boot is
~8 s of a suite run that takes minutes (``--timings`` shows both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from kmodtest.errors import ConfigError, KmodtestError
from kmodtest.face import mutreport, options
from kmodtest.face.mutreport import CellReport, MutantResult
from kmodtest.face.mutsuite import SuiteOutcome, SuiteSelection, run_suite
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, load_matrix
from kmodtest.prepare.images import Image, ImageBuilder
from kmodtest.prepare.keys import artifact_key
from kmodtest.prepare.ksource import KernelSources, get_sources
from kmodtest.prepare.modchange import ModuleChange
from kmodtest.prepare.mutants import (
    DEFAULT_OPERATORS,
    FLOWTABLE_FILES,
    MODULE_DIR,
    OPERATORS,
    Mutant,
    find_mutants,
    unreached_functions,
)
from kmodtest.prepare.objcode import code_digests
from kmodtest.prepare.overlay import OverlayBuilder, cross_build_skip, kernel_packages
from kmodtest.prepare.toolchain import Toolchain, get_toolchain
from kmodtest.progress import Progress

console = Console()
wide = console if console.is_terminal else Console(width=160)
MUTATION_LAYOUT = 2  # bump when a cached verdict's meaning changes
DEFAULT_NIC = "virtio-net-pci"
# what a verdict depends on besides the mutant: the tests and the framework they run on
# (the mutation tooling's own reporting code is not in it, so editing a report keeps the cache)
SUITE_CODE = (
    "vmtests/**/*.py", "fixtures/**/*.py", "conftest.py", "images/*.yaml",
    "kmodtest/*.py", "kmodtest/run/*.py", "kmodtest/guest/**/*", "kmodtest/prepare/*.py",
    "kmodtest/face/plugin.py", "kmodtest/face/session.py", "kmodtest/face/scheduling.py",
    "kmodtest/face/patching.py", "kmodtest/face/mutorder.py", "kmodtest/face/mutsuite.py",
)  # fmt: skip
NOT_SUITE_CODE = ("kmodtest/prepare/mutants.py", "kmodtest/prepare/objcode.py")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "mutate", help="mutation-test the suite: single-change mutants of the flowtable modules"
    )
    options.add_to_argparse(p, ["kernel", *options.DIRS])
    p.add_argument("--seed", type=int, default=1, help="which mutants, in which order (1)")
    p.add_argument("--max", type=int, default=40,
                   help="run the suite on this many mutants that compile and change the object "
                   "code (default 40); discarded ones do not count")  # fmt: skip
    p.add_argument("--files", help=f"comma-separated subset of: {', '.join(FLOWTABLE_FILES)}")
    p.add_argument("--operators", default=",".join(DEFAULT_OPERATORS),
                   help=f"comma-separated subset of: {', '.join(OPERATORS)}")  # fmt: skip
    p.add_argument("-n", "--workers", type=int, default=1, help="mutants at once (VMs, builds)")
    p.add_argument("--tests", nargs="+", default=["vmtests"], help="test paths (vmtests)")
    p.add_argument("--nic", default=DEFAULT_NIC, help=f"NIC model of the runs ({DEFAULT_NIC})")
    p.add_argument("-k", dest="keyword", help="pytest -k expression")
    p.add_argument(
        "--control-runs",
        type=int,
        default=1,
        help="runs of the suite on the unmutated modules first; all must pass",
    )
    p.add_argument(
        "--all-functions",
        action="store_true",
        help="also mutate functions the control run never entered (they can only survive)",
    )
    p.add_argument("--list", action="store_true", help="only list the drawn mutants")
    p.add_argument("--out", type=Path, default=Path("kmodtest-mutants"),
                   help="patches, report.json and junit.xml go here")  # fmt: skip
    p.add_argument("--equivalents", type=Path, default=mutreport.EQUIVALENTS_FILE,
                   help="the reviewed list of equivalent survivors")  # fmt: skip
    p.add_argument("--min-score", type=float, default=0.0,
                   help="exit 1 if a cell's score (percent) is lower")  # fmt: skip
    p.add_argument("--timings", action="store_true", help="print where the time went")
    p.set_defaults(func=run_mutate)


def suite_digest(root: Path) -> str:
    """Digest of the code a verdict depends on (see SUITE_CODE)."""
    h = hashlib.sha256()
    files = {p for pattern in SUITE_CODE for p in root.glob(pattern) if p.is_file()}
    for path in sorted(files):
        rel = str(path.relative_to(root))
        if rel in NOT_SUITE_CODE or "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


@dataclass
class Timings:
    control: float = 0.0


@dataclass
class CellRun:
    """Everything one cell's mutation run shares between its mutants."""

    cell: Cell
    cache: Cache
    base: Image
    sources: KernelSources
    toolchain: Toolchain
    selection: SuiteSelection
    suite: str  # suite_digest
    out: Path
    seed: int
    baseline: dict[str, str] = field(default_factory=dict)  # module -> code digest
    order: Path | None = None
    deadline: float | None = None
    timings: Timings = field(default_factory=Timings)
    build_seconds: dict[str, float] = field(default_factory=dict)  # mutant id -> screening

    def key(self, what: str) -> str:
        """A verdict's key; the suite digest stands for the code (tests and framework)."""
        inputs = {"layout": MUTATION_LAYOUT, "base": self.base.path.name,
                  "sources": f"{self.sources.package}={self.sources.version}", "what": what,
                  "suite": self.suite, "selection": self.selection.key_material()}  # fmt: skip
        return artifact_key(inputs, ())

    def pristine(self, mutant: Mutant) -> bytes:
        return (self.sources.root / mutant.file).read_bytes()

    def patch_file(self, mutant: Mutant) -> Path:
        path = self.out / "patches" / f"{mutant.id}.patch"
        if not path.is_file():
            header = (
                f"cell: {self.cell.id} ({self.sources.package} {self.sources.version})\n"
                f"re-run: kmodtest validate --patch {path.name} --kernel {self.cell.id}\n"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(mutant.patch(self.pristine(mutant), header))
        return path


def _result(run: CellRun, m: Mutant, status: str, **kw: object) -> MutantResult:
    return MutantResult(
        m.id, m.file, m.function, m.line, m.operator, m.description, status,
        patch=str(run.patch_file(m)), diff=m.diff(run.pristine(m)),
        original=m.original, replacement=m.replacement, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _load_cached(run: CellRun, m: Mutant) -> MutantResult | None:
    path = run.cache.path("mutants", run.key(m.digest(run.pristine(m)))) / "result.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["patch"] = str(run.patch_file(m))  # the user's copy, not the cache's
    return MutantResult(**data)


def _move_into(work: Path, out: Path) -> None:
    """A finished run's files become the cache entry's; the emptied work directory goes."""
    for item in work.iterdir():
        item.rename(out / item.name)
    work.rmdir()


def _store(run: CellRun, m: Mutant, result: MutantResult, suite_dir: Path | None) -> None:
    def build(out: Path) -> None:
        if suite_dir is not None:
            _move_into(suite_dir, out)
        (out / "result.json").write_text(json.dumps(result.__dict__, indent=2) + "\n")

    run.cache.get_or_build("mutants", run.key(m.digest(run.pristine(m))), build)


def screen(run: CellRun, m: Mutant) -> MutantResult | None:
    """Build ``m``; a result if it is discarded (or already has a verdict), None to run it."""
    if cached := _load_cached(run, m):
        return cached
    start = time.monotonic()
    builder = OverlayBuilder(run.cache, ModuleChange(patch=run.patch_file(m).absolute()))
    try:
        image = builder.get(run.cell, run.base)
    except KmodtestError as exc:
        result = _result(run, m, "no-compile", message=exc.problem[-1500:],
                         build_seconds=time.monotonic() - start)  # fmt: skip
        _store(run, m, result, None)
        return result
    digests = code_digests(run.toolchain, image, run.base, run.cache.root / "work")
    seconds = time.monotonic() - start
    if digests == run.baseline:
        same = "the rebuilt modules' object code is the unmutated one's"
        result = _result(run, m, "same-code", build_seconds=seconds, message=same)
        _store(run, m, result, None)
        return result
    run.build_seconds[m.id] = seconds
    return None


def execute(run: CellRun, m: Mutant) -> MutantResult:
    """Run the suite on ``m`` (built by :func:`screen`) and cache the verdict."""
    if cached := _load_cached(run, m):
        return cached
    work = run.cache.root / "work" / f"mutant-{run.cell.id}-{m.id}-{time.time_ns()}"
    patch = run.patch_file(m).absolute()
    outcome = run_suite(run.selection, [f"--module-patch={patch}"], work, run.deadline,
                        run.order, cwd=Path.cwd())  # fmt: skip
    status = {"passed": "survived", "failed": "killed"}.get(outcome.status, outcome.status)
    if status == "error":
        raise KmodtestError(
            f"mutant {m.id}: the suite did not run: {outcome.message}",
            f"see {work / 'pytest.log'}; fix the cause and run again (verdicts so far are kept)",
        )
    result = _result(run, m, status, killer=outcome.first_failure, message=outcome.message,
                     suite_seconds=outcome.seconds, boot_seconds=sum(outcome.boots),
                     build_seconds=run.build_seconds.get(m.id, 0.0))  # fmt: skip
    _store(run, m, result, work)
    return result


def control(run: CellRun, index: int) -> SuiteOutcome:
    """The suite on the unmutated, rebuilt modules; cached like a mutant's verdict."""
    entry = run.cache.path("mutants", run.key(f"control-{index}"))
    if (entry / "outcome.json").is_file():
        return SuiteOutcome.from_json(json.loads((entry / "outcome.json").read_text()))
    work = run.cache.root / "work" / f"control-{run.cell.id}-{index}-{time.time_ns()}"
    # the first run times the tests in collected order; the others run in the mutants' order
    # (fastest first), so a test that depends on what ran before it fails here, not as a kill
    outcome = run_suite(run.selection, ["--module-rebuild"], work, None, run.order,
                        stop_first=False, cwd=Path.cwd())  # fmt: skip
    if outcome.status != "passed":
        raise KmodtestError(
            f"{run.cell.id}: control run {index + 1} failed on the unmutated modules "
            f"({outcome.status}): {outcome.first_failure}\n{outcome.message}",
            f"a mutation score needs a green suite first; see {work / 'pytest.log'}",
        )

    def build(out: Path) -> None:
        _move_into(work, out)
        (out / "outcome.json").write_text(json.dumps(outcome.to_json(), indent=2) + "\n")

    run.cache.get_or_build("mutants", run.key(f"control-{index}"), build)
    return outcome


def coverage(run: CellRun) -> dict[str, int]:
    """Function -> entries during one suite run on the unmutated modules (kprobes; cached)."""
    entry = run.cache.path("mutants", run.key("coverage"))
    if not (entry / "coverage.json").is_file():
        work = run.cache.root / "work" / f"coverage-{run.cell.id}-{time.time_ns()}"
        cov = ["-p", "kmodtest.face.mutcoverage", f"--function-coverage={work / 'coverage.json'}"]
        outcome = run_suite(run.selection, ["--module-rebuild", *cov], work, None,
                            stop_first=False, cwd=Path.cwd())  # fmt: skip
        written = work / "coverage.json"
        probed = json.loads(written.read_text()) if written.is_file() else {}
        if outcome.status not in ("passed", "failed") or not any(probed.get("probed", {}).values()):
            raise KmodtestError(
                f"{run.cell.id}: the coverage run counted no function entries ({outcome.status})",
                f"see {work / 'pytest.log'}; or pass --all-functions to mutate every function",
            )
        if outcome.status == "failed":
            console.print(f"[yellow]{run.cell.id}: under kprobes {outcome.first_failure} "
                          "failed; coverage is what ran[/]", highlight=False)  # fmt: skip

        def build(out: Path) -> None:
            _move_into(work, out)

        entry = run.cache.get_or_build("mutants", run.key("coverage"), build)
    data: dict[str, dict[str, int]] = json.loads((entry / "coverage.json").read_text())
    return data["probed"]


def candidates(
    run: CellRun,
    files: list[str],
    operators: list[str],
    probed: dict[str, int] | None,
    excluded: list[str],
) -> list[Mutant]:
    """Every mutant of ``files``; with ``probed``, only in functions the suite can reach."""
    out = []
    for name in files:
        path = f"{MODULE_DIR}/{name}"
        if not (run.sources.root / path).is_file():
            continue  # a file this kernel version does not have
        source = (run.sources.root / path).read_bytes()
        skip = unreached_functions(source, probed) if probed is not None else {}
        excluded.extend(f"{name}: {fn}() ({why})" for fn, why in sorted(skip.items()))
        out.extend(m for m in find_mutants(path, source, operators) if m.function not in skip)
    return out


def draw(mutants: list[Mutant], seed: int) -> list[Mutant]:
    """The seeded order mutants are tried in: a larger --max extends, never reshuffles."""
    order = list(mutants)
    random.Random(seed).shuffle(order)
    return order


def _parse_list(text: str | None, known: tuple[str, ...], what: str) -> list[str]:
    if not text:
        return list(known)
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}", f"use: {', '.join(known)}")
    return items


def _status_line(done: int, total: int, r: MutantResult) -> str:
    extra = f" by {r.killer.split('::')[-1]}" if r.killer else ""
    color = {"survived": "red", "killed": "green", "crashed": "green"}.get(r.status, "yellow")
    return f"[{done}/{total}] {r.id}: [{color}]{r.status}[/]{extra}"


def mutate_cell(args: argparse.Namespace, cell: Cell, cache: Cache) -> CellReport:
    if why := cross_build_skip(cell):
        raise ConfigError(f"cell {cell.id}: {why}", "pick a cell of this host's arch")
    progress = Progress()
    base = ImageBuilder(cache, args.images_dir, progress).get(cell)
    kernel = kernel_packages(cell, base)
    tests = tuple(str(Path(t).absolute()) for t in args.tests)
    for t in tests:
        if not Path(t.split("::")[0]).exists():
            raise ConfigError(f"test path {t} does not exist", "run from the kmodtest checkout")
    selection = SuiteSelection(tests, cell.id, args.nic, args.keyword, cache.root,
                               args.kernels_dir.absolute(), args.images_dir.absolute())  # fmt: skip
    run = CellRun(
        cell, cache, base, get_sources(cache, kernel, progress),
        get_toolchain(cache, kernel, progress), selection, suite_digest(Path.cwd()),
        args.out / cell.id, args.seed,
    )  # fmt: skip
    files = _parse_list(args.files, FLOWTABLE_FILES, "file")
    operators = _parse_list(args.operators, tuple(OPERATORS), "operator")
    report = CellReport(cell.id, base.kernel_version,
                        f"{run.sources.package} {run.sources.version}", args.seed)  # fmt: skip

    with progress.step(f"{cell.id}: unmutated modules (the baseline object code)"):
        image = OverlayBuilder(cache, ModuleChange()).get(cell, base)
        run.baseline = code_digests(run.toolchain, image, base, cache.root / "work")
    probed = None
    if not args.all_functions:
        with progress.step(f"{cell.id}: which functions the suite enters (kprobe run)"):
            probed = coverage(run)
    pool = draw(candidates(run, files, operators, probed, report.excluded_functions), args.seed)
    report.candidates = len(pool)
    if args.list:
        for m in pool[: args.max]:
            console.print(f"{m.id}  {m.description}", highlight=False)
        return report
    start = time.monotonic()
    for index in range(args.control_runs):
        with progress.step(f"{cell.id}: control run {index + 1}/{args.control_runs}"):
            outcome = control(run, index)
        report.control.append({"passed": outcome.passed, "skipped": outcome.skipped,
                               "seconds": round(outcome.seconds, 1)})  # fmt: skip
        if index == 0:
            run.order = run.out / "durations.json"
            run.order.parent.mkdir(parents=True, exist_ok=True)
            run.order.write_text(json.dumps(outcome.durations, indent=1) + "\n")
            run.deadline = max(outcome.seconds * 2.5, outcome.seconds + 300)
    run.timings.control = time.monotonic() - start

    # screen in the seeded order until --max mutants compile and change the code
    chosen: list[MutantResult | Mutant] = []
    runnable = 0
    with ThreadPoolExecutor(args.workers) as ex:
        position = 0
        while runnable < args.max and position < len(pool):
            batch = pool[position : position + args.workers]
            position += len(batch)
            for m, screened in zip(batch, ex.map(lambda m: screen(run, m), batch), strict=True):
                if runnable >= args.max:
                    break
                if screened is None or screened.status not in mutreport.DISCARDED:
                    runnable += 1
                chosen.append(screened or m)
                console.print(f"screened {m.id}: {screened.status if screened else 'changed'}",
                              highlight=False)  # fmt: skip
        to_run = [c for c in chosen if isinstance(c, Mutant)]
        results: dict[str, MutantResult] = {}
        for done, r in enumerate(ex.map(lambda m: execute(run, m), to_run), 1):
            results[r.id] = r
            console.print(_status_line(done, len(to_run), r), highlight=False)
    for c in chosen:
        report.mutants.append(results[c.id] if isinstance(c, Mutant) else c)
    report.mutants.sort(key=lambda r: (r.file, r.line, r.id))
    if args.timings:
        print_timings(report, run.timings.control)
    return report


def print_timings(report: CellReport, control_seconds: float) -> None:
    """Where a mutant's time goes (verdicts from the cache included: they carry theirs)."""
    ran = [m for m in report.mutants if m.suite_seconds]
    built = [m for m in report.mutants if m.build_seconds]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    console.print(
        f"{report.cell}: control runs {control_seconds:.0f} s; per mutant: build + object-code "
        f"check {mean([m.build_seconds for m in built]):.1f} s ({len(built)} built), suite "
        f"{mean([m.suite_seconds for m in ran]):.1f} s of which VM boot "
        f"{mean([m.boot_seconds for m in ran]):.1f} s ({len(ran)} run; survivors "
        f"{mean([m.suite_seconds for m in ran if m.status == 'survived']):.0f} s, killed "
        f"{mean([m.suite_seconds for m in ran if m.status != 'survived']):.0f} s)",
        highlight=False,
    )


def run_mutate(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.max < 1 or args.control_runs < 1:
        raise ConfigError("--workers, --max and --control-runs start at 1")
    settings = options.Settings.from_args(args)
    args.kernels_dir, args.images_dir = settings.kernels_dir, settings.images_dir
    cache = Cache(settings.image_cache)
    cells = load_matrix(settings.kernels_dir).select(settings.kernel, None)
    reviewed = mutreport.load_equivalents(args.equivalents)
    reports = []
    for cell in cells:
        report = mutate_cell(args, cell, cache)
        mutreport.apply_equivalents(report, reviewed)
        reports.append(report)
    if args.list:
        return 0
    mutreport.print_report(reports, wide)
    mutreport.write_json(reports, args.out / "report.json")
    mutreport.write_junit(reports, args.out / "junit.xml")
    console.print(f"report: {args.out / 'report.json'}, {args.out / 'junit.xml'}")
    low = [r for r in reports if (r.score() or 0.0) * 100 < args.min_score]
    return 1 if low else 0
