"""Fault suite: SIGINT and SIGTERM to pytest, mid-test and mid-build, alone and with ``-n 2``:
nothing is left running or lying around. Checked by process (every process the run started
carries a marker in its environment, whatever group or session it moved to) and by listing:
the run's private TMPDIR (VM socket dirs, ``kt-*``), the cache's ``work/`` and temporaries,
and its locks (none still held). SIGINT goes to the whole process group, as Ctrl-C in a
terminal sends it; SIGTERM to pytest's pid only, as ``kill PID`` does. tests/test_sigint.py
covers the moments of one VM's boot; this covers what else an interrupt could leave."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from kmodtest.prepare.cache import Cache

from .faults import held_locks, leftovers, processes_marked, wait_gone

INNER = """
import pytest

@pytest.mark.per_nic
def test_slow(router):
    router.run("sleep 120", timeout=150)
"""
NICS = "virtio-net-pci,e1000"  # two VM cases: under -n 2 each worker boots one


def _vms(marker: str) -> list[int]:
    return [
        p.pid
        for p in processes_marked(marker)
        if "qemu-system" in p.cmdline and "-name" in p.cmdline
    ]


def _building(marker: str) -> bool:
    return any("mmdebstrap" in p.cmdline for p in processes_marked(marker))


def _wait_for(condition, seconds: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, (
            "the run ended before the fault: " + proc.stdout.read().decode()[-3000:]
        )
        assert time.monotonic() < deadline, "the moment to interrupt never came"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("moment", "sig", "workers"),
    [
        ("test", signal.SIGINT, 0),
        ("test", signal.SIGTERM, 0),
        ("test", signal.SIGINT, 2),
        ("test", signal.SIGTERM, 2),
        ("build", signal.SIGINT, 0),
        ("build", signal.SIGTERM, 2),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_an_interrupt_leaves_nothing_behind(
    repo, tmp_path, short_tmp, built_cache, fault, moment, sig, workers
):
    """``-n 2`` runs need both VM slots (ktlock -2)."""
    fault.injected(f"{sig.name} to pytest mid-{moment}" + (f", -n {workers}" if workers else ""))
    cache = tmp_path / "cache"
    if moment == "test":
        shutil.copytree(built_cache, cache, symlinks=True)  # warm: straight to the VMs
    test = tmp_path / "test_slow.py"
    test.write_text(INNER)
    marker = f"ktf-{uuid.uuid4().hex}"
    env = {**os.environ, "KTF_MARK": marker, "TMPDIR": str(short_tmp)}
    argv = [sys.executable, "-m", "pytest", str(test), "-p", "no:cacheprovider",
            f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
            f"--image-cache={cache}", f"--log-dir={tmp_path / 'logs'}", f"--nic={NICS}",
            "-q"]  # fmt: skip
    if workers:
        argv += ["-n", str(workers)]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        if moment == "test":
            wanted = max(workers, 1)
            _wait_for(lambda: len(_vms(marker)) >= wanted, 600, proc)
            logs = tmp_path / "logs"
            _wait_for(
                lambda: (
                    sum(b"agent on" in p.read_bytes() for p in logs.rglob("console.log")) >= wanted
                ),
                300,
                proc,
            )
            time.sleep(5)  # network set up, the tests' guest commands running
        else:
            _wait_for(lambda: _building(marker), 600, proc)
            time.sleep(2)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            out = proc.communicate(timeout=90)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest still running 90 s after {sig.name}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = fault.count("orphans", [
        *wait_gone(marker), *leftovers(short_tmp), *leftovers(cache / "work"),
        *(cache / "images").glob(".*"), *held_locks(Cache(cache)),
    ])  # fmt: skip
    assert left == [], f"left behind after {sig.name}: {left}\n{out[-2000:]}"
    assert proc.returncode != 0 and " passed" not in out, out[-2000:]
    assert "KeyboardInterrupt" in out or "Interrupted" in out or "interrupted" in out, out[-2000:]
