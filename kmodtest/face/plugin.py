"""The kmodtest pytest plugin: options, matrix parametrization, kernel health, failure reports.

Fixtures themselves live in ``fixtures/`` and stay thin; everything they compose is here or
below. Options are validated in ``pytest_configure`` so bad input fails before collection.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from kmodtest import processes
from kmodtest.errors import ConfigError, KmodtestError
from kmodtest.face import options, patching
from kmodtest.face.options import Settings
from kmodtest.face.scheduling import make_scheduler
from kmodtest.face.session import (
    KmodtestSession,
    RouterPool,
    VmCase,
    case_nics,
    wanted_nics,
)
from kmodtest.guest.health import tail
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import (
    PASSTHROUGH_NIC,
    Matrix,
    PassthroughSpec,
    load_matrix,
    unbuilt_local_kernel,
)
from kmodtest.prepare.images import ImageBuilder
from kmodtest.prepare.recipes import load_recipe
from kmodtest.progress import Progress
from kmodtest.run.devices import missing_nic
from kmodtest.run.libvirt_launcher import DEFAULT_URI
from kmodtest.run.passthrough import missing_prerequisites

SESSION_KEY = pytest.StashKey[KmodtestSession]()
CASE_ARG = "vm_case"


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_to_pytest(parser)
    patching.add_options(parser.getgroup("kmodtest"))


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _make_session(config: pytest.Config) -> KmodtestSession | None:
    settings = Settings.from_pytest(config)
    asked = settings.given & {"kernel", "arch", "nic", "kernels_dir"}
    tree = (config.rootpath / "kernels").is_dir()
    if not asked and not config.getoption("kernel_image") and not tree:
        return None  # not a kmodtest tree and no kmodtest option: stay out of the way
    images_dir = settings.images_dir
    matrix = load_matrix(settings.kernels_dir)
    if ports := passthrough_option(settings.passthrough):  # before --nic selects
        matrix = Matrix(tuple(cell.with_passthrough(ports) for cell in matrix.cells))
    kernel_opt = settings.kernel
    cells = patching.adhoc_cells(config) or matrix.select(kernel_opt, settings.arch, settings.nic)
    for cell in cells:  # a malformed recipe fails now, not at the first test
        load_recipe(images_dir, cell.spec.image)
    cache = Cache(settings.image_cache)
    # one directory per run and worker: concurrent runs in one checkout never share logs
    run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{_worker()}-{os.getpid()}"
    log_root = settings.log_dir / run_name
    quiet = _worker() != "main"
    builder = ImageBuilder(cache, images_dir, Progress(quiet=quiet))
    pool = RouterPool(
        builder,
        log_root,
        accel=settings.accel,
        icount=settings.icount,
        backend=settings.backend,
        libvirt_uri=settings.libvirt_uri,
        refresh_images=settings.refresh_images,
    )
    pool.overlay = patching.overlay_builder(config, cache, quiet, log_root)  # --module-patch
    session = KmodtestSession(
        matrix, cells, bool(kernel_opt), cache, pool, log_root, settings.keep_logs
    )
    for cell in cells:
        if not shutil.which(cell.arch.qemu_binary):
            why = (
                f"{cell.arch.qemu_binary} is not installed; "
                f"fix: apt-get install {cell.arch.qemu_package} (or bash .ci/bootstrap)"
            )
            if session.explicit and kernel_opt != "all":
                raise KmodtestError(f"cell {cell.id}: {why}")
            session.skips[cell.id] = why
            continue
        if why := unbuilt_local_kernel(cell):  # the debug cell before its build
            if session.explicit and kernel_opt != "all":
                raise KmodtestError(f"cell {cell.id}: {why}")
            session.skips[cell.id] = why
            continue
        for nic in cell.spec.nics:
            if why := missing_nic(cell.arch.qemu_binary, nic):
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
    if pool.overlay is not None:  # cells the module loop cannot build for (cross arches)
        session.skips.update(patching.overlay_skips(cells, session.skips))
    return session


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


def pytest_configure(config: pytest.Config) -> None:
    processes.install_signal_handlers()  # before any build or boot: an interrupt always stops
    try:
        session = _make_session(config)
    except KmodtestError as exc:
        raise pytest.UsageError(f"kmodtest: {exc}") from None
    if session is not None:
        config.stash[SESSION_KEY] = session
        config.pluginmanager.register(patching.ModuleLoadReporter(), "kmodtest-modload")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n N`` (xdist's default ``load``, or ``loadgroup``): one worker per VM case."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None or config.option.dist not in ("load", "loadgroup"):
        return None
    return make_scheduler(config, log, session.cells, wanted_nics(config.getoption("nic")))


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
            image = session.pool.builder.cached(cell)
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
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if CASE_ARG not in metafunc.fixturenames:
        return
    session = metafunc.config.stash.get(SESSION_KEY, None)
    if session is None:
        raise pytest.UsageError(
            f"kmodtest: {metafunc.function.__name__} needs a router VM but no kernels/ "
            "directory was found; pass --kernels-dir DIR"
        )
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    vm = getattr(item, "funcargs", {}).get("router")
    if vm is None or report.when not in ("call", "setup"):
        return
    if report.when == "call":
        problem = vm.health()
        if problem is not None:
            vm.tainted = f"kernel health: {problem.pattern}"
            report.outcome = "failed"
            report.longrepr = (
                f"kmodtest: the kernel reported a problem during this test "
                f"(the VM will be replaced)\n{problem}\nconsole log: {vm.console_log}"
            )
    if report.failed:
        report.sections.append(
            ("kmodtest console", f"console log: {vm.console_log}\n{tail(vm.console_log)}")
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    state = terminalreporter.config.stash.get(SESSION_KEY, None)
    if state is not None and state.pool.booted:
        terminalreporter.section("kmodtest VMs")
        for line in state.pool.booted:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None:
        state.finish(failed=exitstatus not in (0, 5) or session.testsfailed > 0)
