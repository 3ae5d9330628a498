"""The libvirt backend against a real libvirtd: a transient domain boots the default cell, and
no domain, QEMU or helper outlives a release, a failing test, a guest panic, SIGINT/SIGTERM
(also under ``-n 2``) or a killed pytest (autodestroy on connection close).

Needs a running libvirtd (``.ci/run`` starts one with ``.ci/libvirtd-up``); without one these
tests skip naming the URI and libvirt's own error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtest.errors import ChannelError, MachineError

libvirt = pytest.importorskip("libvirt", reason="libvirt-python not installed (.ci/bootstrap)")

from kmodtest.guest.router import Router  # noqa: E402
from kmodtest.lifecycle.case import VmCase  # noqa: E402
from kmodtest.lifecycle.pool import RouterPool  # noqa: E402
from kmodtest.prepare.cache import default_cache_dir  # noqa: E402
from kmodtest.run.domainxml import METADATA_NS  # noqa: E402
from kmodtest.run.libvirt_launcher import DEFAULT_URI  # noqa: E402

URI = os.environ.get("KMODTEST_LIBVIRT_URI", DEFAULT_URI)
CACHE = default_cache_dir()  # inner pytest runs get another HOME: share the built images


@pytest.fixture(scope="module")
def conn() -> Iterator[object]:
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        pytest.skip(f"no libvirtd at {URI} ({exc.get_error_message()}); bash .ci/libvirtd-up")
    yield connection
    connection.close()


def owned_domains(conn, pids: set[int]) -> dict[str, int]:
    """Running kmodtest domains whose <metadata> owner is one of ``pids``: name -> pid."""
    found = {}
    for dom in conn.listAllDomains():
        if not dom.name().startswith("kmodtest-"):
            continue
        try:
            owner = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
        except libvirt.libvirtError:
            continue
        if int(owner.get("pid", -1)) in pids:
            found[dom.name()] = int(owner.get("pid"))
    return found


def processes_naming(names: set[str]) -> list[str]:
    """Command lines of live processes that mention any of ``names`` (QEMU has -name guest=)."""
    hits = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in text for name in names):
            hits.append(f"{cmdline.parent.name}: {text[:200]}")
    return hits


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def assert_gone(conn, names: set[str]) -> None:
    running = {d.name() for d in conn.listAllDomains()}
    assert not names & running, f"domains left running: {names & running}"
    assert processes_naming(names) == []


@pytest.fixture
def libvirt_vm(conn, kmodtest_session, tmp_path) -> Iterator[Router]:
    cell = kmodtest_session.cells[0]
    kmodtest_session.pool.stop_current()  # one VM at a time on this machine
    pool = RouterPool(
        kmodtest_session.pool.images, tmp_path / "logs", backend="libvirt", libvirt_uri=URI
    )
    try:
        yield pool.acquire(VmCase(cell, cell.spec.nics[0]))
    finally:
        pool.close()


def test_transient_domain_boots_routes_and_leaves_nothing(conn, libvirt_vm):
    vm = libvirt_vm
    dom = conn.lookupByName(vm.vm.machine.name)
    assert dom.isActive() and not dom.isPersistent(), "not a transient domain"
    out = vm.check("ip netns exec client ping -c 1 -W 5 198.51.100.2")
    assert "1 packets received" in out
    ports = vm.vm.machine.lease.ports
    name = vm.vm.machine.name
    vm.stop()
    assert_gone(conn, {name})
    assert (vm.spec.log_dir / "libvirt-domain.log").is_file()  # moved next to the console log
    assert (vm.spec.log_dir / "domain.xml").is_file()
    from kmodtest.run.ports import PortLease

    again = PortLease.take(len(ports))  # released: the lock files are free again
    again.release()
    assert vm.vm.machine.stop() is None  # idempotent


def test_guest_panic_ends_the_domain_and_says_why(conn, libvirt_vm):
    vm = libvirt_vm
    name = vm.vm.machine.name
    with pytest.raises((ChannelError, MachineError)):  # the channel dies with the guest
        vm.run("echo c > /proc/sysrq-trigger; sleep 30", timeout=60)
    deadline = time.monotonic() + 30
    while vm.vm.machine.alive and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not vm.vm.machine.alive, "the domain outlived its kernel panic"
    said = vm.vm.machine.stderr_text()  # our event's words, or the domain log's when the
    # transient domain was already gone when we looked (libvirt: "Domain not found")
    assert any(w in said for w in ("shut down or rebooted", "destroyed", "shutting down")), said
    vm.stop()
    assert_gone(conn, {name})


def test_unreachable_libvirtd_is_a_usage_error_with_the_fix(pytester, repo, inner_env):
    pytester.makepyfile(test_x="def test_x(router):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "fixtures.router", f"--kernels-dir={repo / 'kernels'}",
        f"--images-dir={repo / 'images'}", f"--image-cache={CACHE}", "--backend", "libvirt",
        "--libvirt-uri", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot connect to libvirt at qemu+unix:///system*"])
    result.stderr.fnmatch_lines(["*fix: start libvirtd and virtlogd*libvirtd-up*"])


PANIC_AND_FAIL = """
def test_fails(router):
    assert router.check("echo up") == "down\\n"

def test_crashes_the_kernel(router):
    router.run("echo c > /proc/sysrq-trigger", timeout=10)

def test_next_test_gets_a_new_vm(router):
    assert router.check("echo up") == "up\\n"
    assert "boot2" in str(router.console_log)
"""


def test_failing_test_and_guest_panic_leave_no_domain(conn, pytester, repo, inner_env, tmp_path):
    pytester.makepyfile(test_inner=PANIC_AND_FAIL)
    seen: set[str] = set()
    proc = pytester.popen(
        [sys.executable, "-m", "pytest", "-p", "fixtures.router", "test_inner.py",
         f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
         f"--image-cache={CACHE}",
         f"--log-dir={tmp_path / 'logs'}", "--backend", "libvirt", f"--libvirt-uri={URI}"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    while proc.poll() is None:  # note every domain the run starts, to check them afterwards
        seen |= set(owned_domains(conn, descendants(proc.pid)))
        time.sleep(0.5)
    out = proc.stdout.read().decode()
    assert "2 failed, 1 passed" in out, out[-3000:]
    assert "sysrq: Trigger a crash" in out or "Kernel panic" in out
    assert len(seen) == 2, seen  # the panic replaced the first VM
    assert_gone(conn, seen)


SLOW = """
import pytest

@pytest.mark.per_nic
def test_slow(router):
    router.run('sleep 120', timeout=150)

@pytest.mark.per_nic
def test_never_reached(router):
    pass
"""


def _interrupt(conn, pytester, repo, tmp_path, sig: int, workers: int) -> None:
    pytester.makepyfile(test_slow=SLOW)
    args = [sys.executable, "-m", "pytest", "-p", "fixtures.router", "test_slow.py",
            f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
         f"--image-cache={CACHE}",
            f"--log-dir={tmp_path / 'logs'}", "--backend", "libvirt", f"--libvirt-uri={URI}",
            "-q", "-p", "no:cacheprovider"]  # fmt: skip
    if workers > 1:  # two VM cases (NIC models), one per worker, both booted at once
        args += ["-n", str(workers), "--nic", "virtio-net-pci,e1000"]
    # a shell starting us in the background ignores SIGINT, and Python keeps an ignored SIGINT
    # ignored: give the inner pytest the default, so it gets its KeyboardInterrupt handler
    proc = pytester.popen(args, stdin=subprocess.DEVNULL, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 600  # may include building the image once
        domains: dict[str, int] = {}
        while len(domains) < workers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            domains = owned_domains(conn, descendants(proc.pid))
        assert len(domains) == workers, proc.stdout.read().decode()[-3000:]
        time.sleep(8)  # inside the VM test now
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        out = proc.stdout.read().decode()
        # SIGKILL: only libvirtd's autodestroy is left to clean up; under xdist, a worker the
        # interrupted controller stops (or kills) may still be destroying its domain, and
        # libvirtd destroys it when that worker's connection closes: seconds, not never
        if sig == signal.SIGKILL or workers > 1:
            names = set(domains)
            end = time.monotonic() + 30
            while names & {d.name() for d in conn.listAllDomains()} and time.monotonic() < end:
                time.sleep(0.5)
        assert_gone(conn, set(domains))
        if sig != signal.SIGKILL:
            assert proc.returncode != 0
            assert "KeyboardInterrupt" in out or "Interrupted" in out, out
            assert " passed" not in out, out  # the session stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_mid_test_destroys_the_domain(conn, pytester, repo, inner_env, tmp_path):
    _interrupt(conn, pytester, repo, tmp_path, signal.SIGINT, workers=1)


def test_sigterm_under_xdist_destroys_both_domains(conn, pytester, repo, inner_env, tmp_path):
    _interrupt(conn, pytester, repo, tmp_path, signal.SIGTERM, workers=2)


def test_sigint_under_xdist_destroys_both_domains(conn, pytester, repo, inner_env, tmp_path):
    _interrupt(conn, pytester, repo, tmp_path, signal.SIGINT, workers=2)


def test_killed_pytest_domain_is_autodestroyed(conn, pytester, repo, inner_env, tmp_path):
    """SIGKILL runs no cleanup at all: the connection closes and libvirtd destroys the domain."""
    _interrupt(conn, pytester, repo, tmp_path, signal.SIGKILL, workers=1)
