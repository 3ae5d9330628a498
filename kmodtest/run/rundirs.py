"""Where labs keep their sockets: one short directory per run, removed by whoever made it.

A lab's run directory holds unix sockets (paths are limited to 107 bytes), so it lives
directly under the temp dir. The process that starts the run (pytest's controller, the CLI)
makes one run root and removes it whole when it ends; xdist workers put their labs into
their controller's root (passed down in the environment). So a worker killed by its
controller on SIGINT/SIGTERM, before it could remove its own lab directories, leaves nothing
behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

RUN_ROOT_ENV = "KMODTEST_RUN_ROOT"
_own_root: Path | None = None


def start_run(worker: bool = False) -> Path:
    """This process's run root: its controller's for an xdist ``worker``, else a new one,
    which the environment hands to the workers it starts."""
    global _own_root
    inherited = os.environ.get(RUN_ROOT_ENV)
    if worker and inherited and Path(inherited).is_dir():
        return Path(inherited)
    if _own_root is None:
        _own_root = Path(tempfile.mkdtemp(prefix="kt-"))
        os.environ[RUN_ROOT_ENV] = str(_own_root)
        atexit.register(end_run)  # the CLI, or a pytest that never reached unconfigure
    return _own_root


def end_run() -> None:
    """Remove this process's run root (its workers have stopped by now)."""
    global _own_root
    if _own_root is not None:
        shutil.rmtree(_own_root, ignore_errors=True)
        if os.environ.get(RUN_ROOT_ENV) == str(_own_root):
            del os.environ[RUN_ROOT_ENV]
        _own_root = None


def new_lab_dir() -> Path:
    """A fresh, private (0700) directory for one lab's sockets, inside the run root."""
    # a process started by a run (a worker, the CLI under a test) files its labs under that run
    return Path(tempfile.mkdtemp(prefix="", dir=_own_root or start_run(worker=True)))


def keep_outside_run(lab_dir: Path) -> Path:
    """Move a kept lab's directory out of the run root, which is removed when the run ends:
    its VM outlives the run, and its bound sockets move with the directory (same file system)."""
    kept = Path(tempfile.mkdtemp(prefix="kt-kept-"))
    os.rename(lab_dir, kept)  # onto an empty directory: allowed, and atomic
    return kept
