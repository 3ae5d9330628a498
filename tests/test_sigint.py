"""SIGINT/SIGTERM to pytest, at any moment of a VM test, stops the session and leaves no QEMU.

The interrupt is delivered at several moments (mid-boot, around the end of the boot, mid-test)
and also to a pytest started with SIGINT ignored, as a shell without job control starts
background commands: the flake this replaces ("still running 60 s after the SIGINT") was an
interrupt that landed at a moment the old test did not control.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

INNER = (
    "def test_slow(router):\n    router.run('sleep 120', timeout=150)\n"
    "def test_never_reached(router):\n    pass\n"
)
EXIT_WITHIN = 60  # seconds from the interrupt to pytest's exit (cleanup takes a few)


def qemu_children(parent: int, vm_only: bool = False) -> list[int]:
    """QEMU processes whose parent is ``parent``; ``vm_only``: the router VM (``-name``), not
    the ``-device help`` query pytest runs at start-up, which lives for a fraction of a second."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) != parent or not cmdline or b"qemu-system" not in cmdline[0]:
            continue
        if not vm_only or b"-name" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _console_has(log_dir: Path, text: bytes) -> bool:
    return any(text in p.read_bytes() for p in log_dir.rglob("console.log"))


def _interrupt(
    repo: Path, tmp_path: Path, sig: signal.Signals, moment: str, ignore_sigint: bool = False
) -> None:
    """Run a two-test session, send ``sig`` at ``moment``, and check it stopped cleanly.

    ``moment``: ``boot`` (the VM's QEMU just started), ``agent`` (the guest's agent just came
    up: the end of the boot, where the host's first command and the network setup run), or
    ``test`` (the test body's guest command is running).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    test = tmp_path / "test_slow.py"
    test.write_text(INNER)
    logs = tmp_path / "logs"
    argv = [sys.executable, "-m", "pytest", str(test), "-p", "fixtures.router",
            f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
            f"--log-dir={logs}", "-q", "--no-snapshots"]  # fmt: skip
    # --no-snapshots: the moments are a boot's (a restored VM's console has no "agent on")
    if ignore_sigint:  # as `pytest ... &` in a script: SIGINT ignored from the start
        argv = [sys.executable, "-c",
                "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])", *argv]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # may include building the image once
        qemus: list[int] = []
        while not qemus and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            qemus = qemu_children(proc.pid, vm_only=True)
        assert qemus, f"no VM appeared: {proc.stdout.read().decode() if proc.stdout else ''}"
        if moment in ("agent", "test"):
            while not _console_has(logs, b"agent on") and time.monotonic() < deadline:
                time.sleep(0.02)
        if moment == "test":
            time.sleep(4)  # boot's first command, network setup, then the test's sleep
        proc.send_signal(sig)
        sent = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest still running {EXIT_WITHIN} s after {sig.name} at {moment}")
        text = out.decode(errors="replace")
        took = time.monotonic() - sent
        assert proc.returncode != 0, text[-2000:]
        assert "KeyboardInterrupt" in text or "Interrupted" in text, text[-2000:]
        assert " passed" not in text, text[-2000:]  # the session stopped: no second test
        time.sleep(0.5)
        assert [q for q in qemus if alive(q)] == [], f"QEMU left running:\n{text[-2000:]}"
        print(f"{sig.name} at {moment}: pytest exited {took:.1f} s later")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigint_at_any_moment_of_a_vm_test_stops_the_session_and_kills_qemu(repo, tmp_path):
    for moment in ("boot", "agent", "test"):
        _interrupt(repo, tmp_path / moment, signal.SIGINT, moment)


def test_sigint_stops_a_pytest_started_with_sigint_ignored(repo, tmp_path):
    _interrupt(repo, tmp_path, signal.SIGINT, "test", ignore_sigint=True)


def test_sigterm_mid_test_stops_the_session_and_kills_qemu(repo, tmp_path):
    _interrupt(repo, tmp_path, signal.SIGTERM, "test")
