"""SIGINT to pytest in the middle of a VM test leaves no QEMU process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def qemu_children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"qemu-system" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigint_mid_test_kills_qemu(repo, tmp_path):
    _interrupt_mid_test(repo, tmp_path, signal.SIGINT)


def _interrupt_mid_test(repo: Path, tmp_path: Path, sig: signal.Signals) -> None:
    test = tmp_path / "test_slow.py"
    test.write_text(
        "def test_slow(router):\n    router.run('sleep 120', timeout=150)\n"
        "def test_never_reached(router):\n    pass\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(test), "-p", "fixtures.router",
         f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
         f"--log-dir={tmp_path / 'logs'}", "-q"],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # may include building the image once
        qemus: list[int] = []
        while not qemus and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            qemus = qemu_children(proc.pid)
        assert qemus, f"no QEMU appeared: {proc.stdout.read().decode() if proc.stdout else ''}"
        time.sleep(8)  # well inside the VM test now
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert b"KeyboardInterrupt" in out or b"Interrupted" in out
        assert b"passed" not in out  # the session stopped; the second test never ran
        time.sleep(0.5)
        assert [q for q in qemus if alive(q)] == [], out.decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_mid_test_stops_the_session_and_kills_qemu(repo, tmp_path):
    _interrupt_mid_test(repo, tmp_path, signal.SIGTERM)
