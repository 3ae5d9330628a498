"""Host processes: every child kmodtest starts is registered here and killed and reaped on any
exit, and every host tool it needs is looked up here (an absent one names its Debian package).

Three layers, so no QEMU outlives the test run:
1. the kernel kills the child when its parent dies (``PR_SET_PDEATHSIG``), even on SIGKILL;
2. an ``atexit`` hook kills whatever is still registered on a normal interpreter exit;
3. SIGTERM/SIGHUP are turned into ``KeyboardInterrupt``, which pytest (unlike ``SystemExit``
   in a test) treats as "stop the session", unwinding its fixtures first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from kmodtest.errors import BuildError, KmodtestError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_children: set[subprocess.Popen[bytes]] = set()
_lock = threading.Lock()
_signals_installed = False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):  # not Linux: atexit still applies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a registered child that dies with us."""
    install_signal_handlers()
    proc = subprocess.Popen(list(argv), preexec_fn=_die_with_parent, **kwargs)
    with _lock:
        _children.add(proc)
    return proc


def terminate(proc: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reap and unregister."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
    finally:
        with _lock:
            _children.discard(proc)
    return proc.returncode


def kill_all() -> None:
    for proc in list(_children):
        terminate(proc, grace=1.0)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Make SIGTERM/SIGHUP unwind like SIGINT does (main thread only; idempotent)."""
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_interrupt)
    _signals_installed = True


atexit.register(kill_all)
