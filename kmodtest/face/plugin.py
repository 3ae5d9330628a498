"""The kmodtest pytest plugin (entry point ``pytest11``): options, markers, fixtures, matrix
parametrization, kernel health in test reports, xdist scheduling, the run's verdict.

Installed with the package, it needs no conftest: a project's ``test_x.py`` that asks for
``router`` or ``host`` runs on the default cell of ``./kernels`` (or of the matrix kmodtest
ships). Options are validated in ``pytest_configure`` so bad input fails before collection;
outside a kmodtest tree the plugin stays out of the way until a test asks for a router.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kmodtest import processes
from kmodtest.errors import ConfigError, KmodtestError, MachineError
from kmodtest.face import fixtures, options, patching
from kmodtest.face.fixtures import ROUTER_KEY, SESSION_KEY, HostAlias
from kmodtest.face.kept import KeptVm, keep_lab
from kmodtest.face.options import Settings
from kmodtest.face.scheduling import make_scheduler
from kmodtest.face.session import KmodtestSession
from kmodtest.guest.health import tail
from kmodtest.lifecycle.case import VmCase, case_nics, wanted_nics
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.lifecycle.snapshots import Snapshots
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cache import discarded as discarded_entries
from kmodtest.prepare.cells import (
    PASSTHROUGH_NIC,
    Matrix,
    PassthroughSpec,
    load_matrix,
    unbuilt_local_kernel,
)
from kmodtest.prepare.images import ImageBuilder
from kmodtest.prepare.openwrt import OpenWrtImages
from kmodtest.prepare.recipes import load_recipe
from kmodtest.prepare.tools import ToolsLayer
from kmodtest.progress import Progress
from kmodtest.run import rundirs
from kmodtest.run.devices import missing_nic
from kmodtest.run.emulator import choose_qemu, describe, qemu_binary
from kmodtest.run.libvirt_launcher import DEFAULT_URI
from kmodtest.run.passthrough import missing_prerequisites
from kmodtest.run.qemu import require_qemu

CASE_ARG = "vm_case"
VM_MARK = "kmodtest_vm"
MARKERS = {
    VM_MARK: "the test runs on a booted router VM (added by kmodtest to every such test)",
    "per_nic": "run once per NIC model of the cell instead of once per kernel",
}
HOST_INI = "kmodtest_host_fixture"


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_to_pytest(parser)
    patching.add_options(parser.getgroup("kmodtest"))
    parser.getgroup("kmodtest").addoption(
        "--openwrt-package",
        action="append",
        default=[],
        metavar="FILE",
        help="an .ipk (opkg, up to 24.10) or .apk (25.12+) to install on OpenWrt routers after "
        "boot, e.g. a patched kmod-nft-offload from your OpenWrt SDK (repeatable)",
    )
    parser.getgroup("kmodtest").addoption(
        "--keep-vm-on-failure",
        action="store_true",
        help="leave the VM of the first failing test running after the session, as the test "
        "left it (kmodtest ps / attach ID / stop ID); QEMU backend only",
    )
    parser.addini(
        HOST_INI,
        "give tests kmodtest's `host` (the router's testinfra Host); false keeps testinfra's",
        type="bool",
        default=True,
    )


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _make_session(config: pytest.Config, settings: Settings) -> KmodtestSession:
    matrix = load_matrix(settings.kernels_dir)
    if ports := passthrough_option(settings.passthrough):  # before --nic selects
        matrix = Matrix(tuple(cell.with_passthrough(ports) for cell in matrix.cells))
    cells = patching.adhoc_cells(config) or matrix.select(
        settings.kernel, settings.arch, settings.nic
    )
    for cell in cells:  # a malformed recipe fails now, not at the first test
        load_recipe(settings.images_dir, cell.spec.image)
    cache = Cache(settings.image_cache)
    # one directory per run and worker: concurrent runs in one checkout never share logs
    run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{_worker()}-{os.getpid()}"
    log_root = settings.log_dir / run_name
    quiet = _worker() != "main"
    images = Images(
        ImageBuilder(cache, settings.images_dir, Progress(quiet=quiet)),
        refresh=settings.refresh_images,
        overlay=patching.overlay_builder(config, cache, quiet, log_root),  # --module-patch
        openwrt=OpenWrtImages(
            cache, settings.images_dir, Progress(quiet=quiet), settings.openwrt_mirror
        ),
        openwrt_packages=_openwrt_packages(config),
        endpoints=matrix.default,
        two_vm=settings.topology == "two-vm",
        tools=ToolsLayer(cache, progress=Progress(quiet=quiet)),  # cells' extra_packages:
    )
    # before anything asks a QEMU binary (accelerator probe, NIC models, saved-state keys)
    qemu = choose_qemu([c.arch for c in (*cells, matrix.default)], settings.qemu, cache,
                       Progress(quiet=quiet))  # fmt: skip
    keep = bool(config.getoption("keep_vm_on_failure"))
    pool = RouterPool(
        images, log_root, accel=settings.accel, icount=settings.icount,
        backend=settings.backend, libvirt_uri=settings.libvirt_uri, detachable=keep,
        boot_timeout=settings.boot_timeout,
        # a module change (--module-patch/--module-src) is a new image each time: its saved
        # state would be used by one run and kept for nothing
        snapshots=None if settings.no_snapshots or images.overlay else Snapshots(cache),
    )  # fmt: skip
    session = KmodtestSession(matrix, cells, cache, pool, log_root, settings.keep_logs,
                              keep_on_failure=keep, qemu=qemu)  # fmt: skip
    if keep:  # a libvirt cell cannot keep its VM: say so now, not after the first failure
        for cell in cells:
            pool.launcher_for(cell)
    broad = settings.kernel == "all"  # a missing QEMU skips; for named or default cells it fails
    for cell in cells:
        if cell.openwrt is not None:  # downloaded ahead of time; never fetched mid-run
            assert images.openwrt is not None
            if why := images.openwrt.missing(cell, _fetch_command(settings, cell.id)):
                session.skips[cell.id] = why
                continue
        arch = cell.arch
        try:
            require_qemu(arch)
        except MachineError as exc:
            if not broad:
                raise KmodtestError(f"cell {cell.id}: {exc.problem}", exc.fix) from None
            session.skips[cell.id] = f"{exc.problem}; fix: {exc.fix}"
            continue
        if why := unbuilt_local_kernel(cell):  # the debug cell before its build
            if not broad:
                raise KmodtestError(f"cell {cell.id}: {why}")
            session.skips[cell.id] = why
            continue
        for nic in cell.spec.nics:
            if why := missing_nic(qemu_binary(cell.arch), nic):
                session.nic_skips[(cell.id, nic)] = why
        if cell.spec.passthrough:
            backend = pool.backend_for(cell)
            addresses = cell.spec.passthrough.by_port().values()
            if missing := missing_prerequisites(addresses, backend):
                why = f"passthrough ({backend} backend) not possible here: " + "; ".join(missing)
                session.nic_skips[(cell.id, PASSTHROUGH_NIC)] = why
    for cell in cells:  # an unreachable libvirtd fails now, naming the fix
        if cell.id not in session.skips and pool.backend_for(cell) == "libvirt":
            pool.launcher_for(cell).check()
    if images.overlay is not None:  # cells the module loop cannot build for (cross arches)
        session.skips.update(patching.overlay_skips(cells, session.skips))
    return session


def _openwrt_packages(config: pytest.Config) -> tuple[Path, ...]:
    packages = tuple(Path(p).absolute() for p in config.getoption("openwrt_package", []))
    for package in packages:
        if not package.is_file():
            raise ConfigError(
                f"--openwrt-package {package} does not exist",
                "pass the .ipk/.apk your OpenWrt SDK built (bin/packages/...)",
            )
    return packages


def _fetch_command(settings: Settings, cell_id: str) -> str:
    """The ``kmodtest fetch`` line that puts a cell's image where this run looks for it."""
    return " ".join(
        ["kmodtest fetch", cell_id]
        + [a for a in settings.argv(*options.DIRS, "openwrt_mirror")
           if a.split("=")[0].lstrip("-").replace("-", "_") in settings.given]
    )  # fmt: skip


def passthrough_option(value: str | None) -> PassthroughSpec | None:
    """``--passthrough lan=PCI,client=PCI,wan=PCI,server=PCI`` as a cell's passthrough:."""
    if not value:
        return None
    try:
        ports = {}
        for item in value.split(","):
            port, sep, address = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} is not PORT=PCI-ADDRESS")
            ports[port.strip()] = address.strip()
        return PassthroughSpec(**ports)
    except (ValueError, TypeError, ValidationError) as exc:
        raise ConfigError(
            f"--passthrough {value!r}: {str(exc).splitlines()[-1].strip()}",
            "name all four ports: --passthrough lan=0000:03:00.0,client=0000:03:00.1,"
            "wan=0000:04:00.0,server=0000:04:00.1 (PCI addresses from lspci -D)",
        ) from None


def session_of(config: pytest.Config) -> KmodtestSession:
    """The run's session, made on first need (a project without kernels/ gets the packaged
    matrix the moment a test asks for a router)."""
    if SESSION_KEY not in config.stash:
        try:
            config.stash[SESSION_KEY] = _make_session(config, Settings.from_pytest(config))
        except KmodtestError as exc:
            raise pytest.UsageError(f"kmodtest: {exc}") from None
    return config.stash[SESSION_KEY]


def pytest_configure(config: pytest.Config) -> None:
    processes.install_signal_handlers()  # before any build or boot: an interrupt always stops
    # before xdist starts its workers: they inherit the run root's name (made by the first lab)
    rundirs.start_run(worker=hasattr(config, "workerinput"))
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.pluginmanager.register(RunVerdict(config), RunVerdict.NAME)
    # registered now, after every entry-point plugin: see HostAlias for why that matters
    config.pluginmanager.register(fixtures, "kmodtest-fixtures")
    if config.getini(HOST_INI):
        if getattr(config.option, "hosts", None):
            raise pytest.UsageError(
                "kmodtest: --hosts selects testinfra's `host`, but kmodtest's `host` (the "
                f"router) replaces it here; set `{HOST_INI} = false` in your pytest ini and "
                "use `router_host` for the router"
            )
        config.pluginmanager.register(HostAlias(), HostAlias.NAME)
    config.pluginmanager.register(patching.ModuleLoadReporter(), "kmodtest-modload")
    try:
        settings = Settings.from_pytest(config)
    except KmodtestError as exc:
        raise pytest.UsageError(f"kmodtest: {exc}") from None
    asked = settings.given & {"kernel", "arch", "nic", "kernels_dir"}
    if asked or config.getoption("kernel_image") or (config.rootpath / "kernels").is_dir():
        session_of(config)  # a kmodtest tree: bad input fails now, before collection


@pytest.hookimpl(optionalhook=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    rundirs.end_run()  # the labs' socket directories, a killed worker's too


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n N`` (xdist's default ``load``, or ``loadgroup``): a module of a VM case per
    worker at a time; a whole case when its VMs boot cold (see ``scheduling``)."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None or config.option.dist not in ("load", "loadgroup"):
        return None
    restored = session.pool.snapshots is not None
    nics = wanted_nics(config.getoption("nic"))
    return make_scheduler(config, log, session.cells, nics, split_cases=restored)


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return []
    lines = [f"kmodtest cache: {session.cache.root}  logs: {session.log_root}"]
    backends = sorted({session.pool.backend_for(c) for c in session.cells})
    uri = session.pool.libvirt_uri or DEFAULT_URI
    lines.append(
        "kmodtest backend: " + ", ".join(f"{b} ({uri})" if b == "libvirt" else b for b in backends)
    )
    for cell in session.cells:
        try:
            image = session.pool.images.cached(cell)
        except KmodtestError:
            image = None
        version = image.kernel_version if image else "(image not built yet)"
        skip = f"  SKIP: {session.skips[cell.id]}" if cell.id in session.skips else ""
        lines.append(f"kmodtest cell {cell.id}: {cell.arch.name} kernel {version}{skip}")
    by_reason: dict[str, list[str]] = {}
    for (cell_id, _nic), why in session.nic_skips.items():
        by_reason.setdefault(why, []).append(cell_id)
    for why, cell_ids in by_reason.items():
        lines.append(f"kmodtest SKIP on {len(cell_ids)} cell(s): {why}")
    for arch in sorted({c.arch.name for c in session.cells if c.id not in session.skips}):
        cell = next(c for c in session.cells if c.arch.name == arch)
        choice = session.pool.accel_for(cell)
        lines.append(f"kmodtest accel {arch}: {choice.accel} ({choice.reason})")
    lines += [f"kmodtest {describe(choice)}" for choice in session.qemu]
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if CASE_ARG not in metafunc.fixturenames:
        return
    if "host" in metafunc.fixturenames and hasattr(metafunc.module, "testinfra_hosts"):
        raise pytest.UsageError(
            f"kmodtest: {metafunc.module.__name__} sets testinfra_hosts, but `host` is "
            f"kmodtest's router there; set `{HOST_INI} = false` and use `router_host`"
        )
    session = session_of(metafunc.config)
    per_nic = metafunc.definition.get_closest_marker("per_nic") is not None
    wanted = wanted_nics(metafunc.config.getoption("nic"))
    params = []
    for cell in session.cells:
        nics = case_nics(cell, wanted)
        for nic in nics if per_nic else nics[:1]:
            case = VmCase(cell, nic, per_nic)
            skip = session.skips.get(cell.id) or session.nic_skips.get((cell.id, nic))
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize(CASE_ARG, params, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and CASE_ARG in callspec.params:
            item.add_marker(VM_MARK)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    held = item.stash.get(ROUTER_KEY, None)
    if held is None or report.when not in ("call", "setup"):
        return
    session, case, vm = held
    if report.when == "call" and report.failed and session.keep_on_failure and not session.kept:
        # kept as the test left it: no reset, no health window (the user looks at it now)
        if kept := keep_lab(session.pool, case, item.nodeid):
            session.kept.append(kept)
            report.sections.append(("kmodtest kept VM", _kept_text(kept)))
    elif report.when == "call":
        # the reset after the test, and the console window of test and reset, belong to it
        problem = session.pool.end_test(case)
        if problem is not None:
            text = (
                f"kmodtest: the kernel reported a problem during this test or the reset after "
                f"it (the VM will be replaced)\n{problem}\nconsole log: {vm.console_log}"
            )
            if report.failed:  # the test's own error stays: the kernel's report explains it
                report.sections.append(("kmodtest kernel health", text))
            else:
                report.outcome = "failed"
                report.longrepr = text
    if report.failed:
        report.sections.append(
            ("kmodtest console", f"console log: {vm.console_log}\n{tail(vm.console_log)}")
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    """After the last test of a VM case (here: on this worker), its lab stops, and what its
    console said last is that test's: a teardown error, not a line nobody reads."""
    yield
    held = item.stash.get(ROUTER_KEY, None)
    if held is None or (nextitem is not None and _case_of(nextitem) in (None, held[1].key)):
        return  # no router, or the next test reuses it (or needs none)
    session, case, vm = held
    if problem := session.pool.finish_case(case):
        raise pytest.fail.Exception(
            f"kmodtest: the kernel reported a problem after this test, when its VM stopped\n"
            f"{problem}\nconsole log: {vm.console_log}",
            pytrace=False,
        )


def _kept_text(vm: KeptVm) -> str:
    return (
        f"the VM of this test is kept running: {vm.id} (QEMU pid {vm.pid})\n"
        f"  a shell in it: kmodtest attach {vm.id}\n"
        f"  stop it:       kmodtest stop {vm.id}\n"
        f"  console log:   {vm.console_log}"
    )


def _case_of(item: pytest.Item | None) -> tuple[str, str] | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get(CASE_ARG) if callspec is not None else None
    return case.key if case is not None else None


class RunVerdict:
    """What the run proved: VM tests that ran or were skipped, and kernel problems found
    outside any test (xdist workers send theirs to the controller). A run in which every VM
    test was skipped, or a kernel problem was found, fails loudly."""

    NAME = "kmodtest-verdict"

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.ran = 0
        self.skipped = 0
        self.problems: list[str] = []
        self.discarded: list[str] = []  # damaged cache entries found (and rebuilt) in this run

    @property
    def nothing_tested(self) -> bool:
        return self.skipped > 0 and self.ran == 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if VM_MARK not in report.keywords:
            return
        if report.when == "call" or (report.when == "setup" and report.failed):
            self.ran += 1
        elif report.when == "setup" and report.skipped:
            self.skipped += 1

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {})
        self.problems += output.get("kmodtest_problems", [])
        self.discarded += output.get("kmodtest_discarded", [])

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        state = self.config.stash.get(SESSION_KEY, None)
        if state is not None:  # exit 5 (nothing collected) keeps the logs too
            self.problems += state.finish(failed=exitstatus != 0 or session.testsfailed > 0)
        self.discarded += discarded_entries
        if hasattr(self.config, "workeroutput"):  # an xdist worker: the controller reports
            self.config.workeroutput["kmodtest_problems"] = self.problems
            self.config.workeroutput["kmodtest_discarded"] = self.discarded
        elif self.problems or self.nothing_tested:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        state = self.config.stash.get(SESSION_KEY, None)
        if state is not None and state.pool.booted:
            terminalreporter.section("kmodtest VMs")
            for line in state.pool.booted:
                terminalreporter.write_line(line)
        if self.discarded:
            terminalreporter.section("kmodtest cache: damaged entries", yellow=True)
            for note in self.discarded:
                terminalreporter.write_line(note, yellow=True)
        for vm in state.kept if state is not None else []:
            terminalreporter.section("kmodtest: kept VM", yellow=True)
            terminalreporter.write_line(f"{vm.test}\n{_kept_text(vm)}")
        for problem in self.problems:
            terminalreporter.section("kmodtest: kernel problem outside any test", red=True)
            terminalreporter.write_line(problem)
        if self.nothing_tested:
            terminalreporter.section("kmodtest: nothing was tested", red=True)
            terminalreporter.write_line(
                f"all {self.skipped} VM tests were skipped (the reasons: pytest -rs): this run "
                "proves nothing about the kernel, so it fails",
                red=True,
                bold=True,
            )
