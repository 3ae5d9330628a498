"""Host processes: every child kmodtest starts is registered here and killed and reaped on any
exit, and every host tool it needs is looked up here (an absent one names its Debian package).

Each child leads a process group of its own, and is always killed with that whole group:
mmdebstrap (apt, dpkg) and make (gcc) spawn children that would outlive their parent.
Three layers, so nothing outlives the test run:
1. the kernel kills the child when its parent dies (``PR_SET_PDEATHSIG``), even on SIGKILL;
   a parent that died before the death signal was set is caught by the child itself (below);
2. an ``atexit`` hook kills whatever is still registered on a normal interpreter exit;
3. SIGTERM/SIGHUP are turned into ``KeyboardInterrupt``, which pytest (unlike ``SystemExit``
   in a test) treats as "stop the session", unwinding its fixtures first.

No ``preexec_fn``: running Python between fork and exec can deadlock when other threads exist
(pytest-xdist's execnet threads, rich's refresh thread). The group comes from
``process_group=0`` and the death signal from util-linux's ``setpriv --pdeathsig``, which sets it
and execs the real program through a one-line ``sh`` guard. Popen returns once setpriv has been
exec'd, before its prctl: a parent killed right then would leave an orphan that no signal ever
reaches. So after the prctl the guard compares its parent pid with ours and exits if we are
already gone; if we die after the prctl, the death signal kills it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kmodtest.errors import BuildError, KmodtestError

log = logging.getLogger(__name__)

_children: set[subprocess.Popen[bytes]] = set()
_lock = threading.Lock()
_signals_installed = False


# runs after setpriv's prctl: "$1" is the pid of the process that spawned us
_PARENT_GUARD = 'test "$PPID" = "$1" || exit 1; shift; exec "$@"'


@functools.cache
def _setpriv() -> str | None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.debug("no setpriv: children die with us only through atexit")
    return setpriv


def _dies_with_us(argv: Sequence[str]) -> list[str]:
    """``argv`` behind ``setpriv --pdeathsig KILL`` and the parent guard (setpriv is in
    util-linux, so always there on Debian; without it, only the ``atexit`` hook)."""
    setpriv = _setpriv()
    if setpriv is None:
        return [*argv]
    guard = ["/bin/sh", "-c", _PARENT_GUARD, "kmodtest-spawn", str(os.getpid())]
    return [setpriv, "--pdeathsig", "KILL", "--", *guard, *argv]


def require_tool(
    name: str, package: str, needed_for: str = "", error: type[KmodtestError] = BuildError
) -> str:
    """The path of host tool ``name``; if absent, ``error`` naming the package that has it."""
    path = shutil.which(name)
    if not path:
        why = f" (needed for {needed_for})" if needed_for else ""
        raise error(
            f"{name} is not installed{why}",
            f"install it: apt-get install {package}  (or run: bash .ci/bootstrap)",
        )
    return path


def spawn(argv: Sequence[str], detachable: bool = False, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a registered child, leader of its own process group, that dies with us.

    ``detachable``: no death signal, and a session of its own (no terminal's hangup or Ctrl-C
    reaches it), so :func:`detach` can let it outlive us (a VM kept for debugging). Until
    then it is registered like any child and killed on exit.
    """
    install_signal_handlers()
    if detachable:
        proc = subprocess.Popen([*argv], start_new_session=True, **kwargs)
    else:
        proc = subprocess.Popen(_dies_with_us(argv), process_group=0, **kwargs)
    with _lock:
        _children.add(proc)
    return proc


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` s for the leader to exit *without reaping it*: while its zombie
    exists, its pid (the group id) cannot be reused, so killing the group stays exact."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
        except ChildProcessError:  # already reaped (by Popen.poll/wait)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def terminate(proc: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
    """SIGTERM the child's group, wait ``grace`` s, SIGKILL the group; always reap, unregister.

    The group is killed even when the leader already exited on its own: whatever it started
    (apt under mmdebstrap, gcc under make) may still run.
    """
    try:
        if proc.returncode is None:
            if not _exited(proc, 0):
                _signal_group(proc, signal.SIGTERM)
                if not _exited(proc, grace):
                    _signal_group(proc, signal.SIGKILL)
                    _exited(proc, grace)
            _signal_group(proc, signal.SIGKILL)  # stragglers; the leader's zombie holds the id
        proc.wait(grace)
    finally:
        _forget_if_reaped(proc)
    return proc.returncode


def wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the child to exit on its own, kill what it left running in its group, reap.

    An interrupt while waiting leaves the child registered: :func:`terminate` (or the
    ``atexit`` hook) still kills it.
    """
    _exited(proc, float("inf"))
    if proc.returncode is None:
        _signal_group(proc, signal.SIGKILL)
    rc = proc.wait()
    _forget_if_reaped(proc)
    return rc


def _forget_if_reaped(proc: subprocess.Popen[bytes]) -> None:
    """Unregister only a reaped child: one an interrupt left running stays for ``atexit``."""
    if proc.returncode is not None:
        with _lock:
            _children.discard(proc)


def detach(proc: subprocess.Popen[bytes]) -> int:
    """Let a child started ``detachable`` outlive us: no longer killed on exit. Its pid."""
    with _lock:
        _children.discard(proc)
    return proc.pid


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends (one that came meanwhile is
    delivered right after): a cleanup such as stopping a VM is never cut short by a second
    signal (a closing terminal sends SIGHUP, then its session may send SIGTERM)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def kill_all() -> None:
    for proc in list(_children):
        terminate(proc, grace=1.0)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Make SIGTERM/SIGHUP unwind like SIGINT does, and SIGINT always unwind (main thread only;
    idempotent).

    A SIGINT ignored on entry is restored too: a shell without job control starts background
    commands (``pytest ... &`` in a script, some CI runners) with SIGINT ignored, and Python
    then keeps it ignored, so ``kill -INT`` would neither stop the run nor clean up its VMs.
    SIGHUP stays ignored when it was (that is what ``nohup`` asks for).
    """
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _signals_installed = True


atexit.register(kill_all)
