"""Children die with their whole process group, with us, and without preexec_fn."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from kmodtest import processes


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _spawn_with_grandchild() -> tuple[subprocess.Popen[bytes], int]:
    """A child that starts a grandchild (as mmdebstrap starts apt) and reports its pid."""
    proc = processes.spawn(
        ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_terminate_kills_the_whole_process_group():
    proc, grandchild = _spawn_with_grandchild()
    assert os.getpgid(proc.pid) == proc.pid, "the child does not lead a group of its own"
    assert os.getpgid(grandchild) == proc.pid
    processes.terminate(proc, grace=2)
    assert _gone(grandchild), "the grandchild outlived terminate()"
    assert proc not in processes._children


def test_wait_kills_what_the_child_left_behind():
    proc = processes.spawn(
        ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    straggler = int(proc.stdout.readline())
    assert processes.wait(proc) == 0
    assert _gone(straggler), "a process the child left running survived wait()"
    assert proc not in processes._children


def test_spawn_from_a_thread_works_without_preexec_fn(monkeypatch):
    """xdist runs execnet threads: Python between fork and exec could deadlock there."""
    real_popen = subprocess.Popen
    seen: list[dict[str, object]] = []

    def popen(*args, **kwargs):
        seen.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(processes.wait(processes.spawn(["true"]))))
    thread.start()
    thread.join(10)
    assert out == [0]
    assert seen and all(kw.get("preexec_fn") is None for kw in seen)


def test_children_die_when_their_parent_is_killed(tmp_path):
    """SIGKILL leaves no atexit and no signal handler: only PR_SET_PDEATHSIG kills the child."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from kmodtest import processes
        proc = processes.spawn(["sleep", "300"], stdin=subprocess.DEVNULL)
        print(proc.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    # setpriv sets the death signal, then execs: wait for the exec (a loaded machine may not
    # have got there yet; a parent killed in that millisecond window is not what this tests)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "the child never exec'd sleep"
        time.sleep(0.05)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _gone(child), "the child outlived its SIGKILLed parent"


def test_a_signal_during_a_held_cleanup_waits_until_it_is_done(tmp_path):
    """A second SIGTERM while a VM is being stopped must not cut the stop short: it is
    delivered (as KeyboardInterrupt) only once the held block has finished."""
    script = textwrap.dedent(
        """
        import os, signal
        from kmodtest import processes
        processes.install_signal_handlers()
        try:
            with processes.signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a second one while held: merged
                print("cleanup finished", flush=True)
        except KeyboardInterrupt as exc:
            print(f"then: {exc}", flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "cleanup finished"
    assert out.stdout.splitlines()[1].startswith("then: signal ")


def _processes_with(token: str) -> list[int]:
    """Pids of live processes whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_no_child_survives_a_parent_killed_before_its_death_signal_is_set():
    """The worst moment: Popen returns once setpriv has been exec'd, before its prctl set the
    death signal. A parent SIGKILLed right then must not leave an orphan (the child checks,
    after the prctl, that its parent is still the one that started it)."""
    token = f"kmodtest-orphan-probe-{os.getpid()}-{time.monotonic_ns()}"
    script = textwrap.dedent(
        f"""
        import os, signal, subprocess
        from kmodtest import processes
        processes.spawn(["sh", "-c", "sleep 300; : {token}"], stdin=subprocess.DEVNULL)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    try:
        for _ in range(30):
            subprocess.run([sys.executable, "-c", script], check=False)
        deadline = time.monotonic() + 5
        while _processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = _processes_with(token)
        assert not orphans, f"{len(orphans)} of 30 children outlived their SIGKILLed parent"
    finally:
        for pid in _processes_with(token):  # each leads its own group (ours: we started it)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
