"""Where labs keep their sockets: one short directory per run, removed by whoever made it.

A lab's run directory holds unix sockets (paths are limited to 107 bytes), so it lives
directly under the temp dir. The process that starts the run (pytest's controller, the CLI)
names one run root and removes it whole when it ends; xdist workers put their labs into
their controller's root (its name is passed down in the environment). So a worker killed by
its controller on SIGINT/SIGTERM, before it could remove its own lab directories, leaves
nothing behind. The root is created by the first lab (in whichever process): a run that
boots no VM leaves no trace in the temp dir. The one exception to the removal is a lab kept
for debugging (``--keep-vm-on-failure``): it stays, in its run root, until ``kmodtest stop``
releases it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from kmodtest.errors import MachineError

RUN_ROOT_ENV = "KMODTEST_RUN_ROOT"
KEPT_MARK = ".kept"  # in a lab directory: its VM outlives the run (keep_lab_dir)
_own_root: Path | None = None


def start_run(worker: bool = False) -> Path:
    """This process's run root, by name (made by the first lab): its controller's for an
    xdist ``worker``, else a new one, which the environment hands to the workers it starts."""
    global _own_root
    inherited = os.environ.get(RUN_ROOT_ENV)
    if worker and inherited:
        return Path(inherited)
    if _own_root is None:
        _own_root = Path(tempfile.gettempdir(), f"kt-{secrets.token_hex(4)}")
        os.environ[RUN_ROOT_ENV] = str(_own_root)
        atexit.register(end_run)  # the CLI, or a pytest that never reached unconfigure
    return _own_root


def _made(root: Path) -> Path:
    """``root``, created private (0700) unless it is already there as our own directory
    (another worker of the run made it first). The temp dir is shared: a name someone else
    took (a symlink, another user's directory) is refused, never used."""
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
        return root
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise MachineError(
            f"run root {root} exists and is not a private directory of ours",
            f"remove it, or unset {RUN_ROOT_ENV} so that a new one is named",
        )
    return root


def end_run() -> None:
    """Remove this process's run root (its workers have stopped by now), but for kept labs."""
    global _own_root
    if _own_root is not None:
        _remove_unkept(_own_root)
        if os.environ.get(RUN_ROOT_ENV) == str(_own_root):
            del os.environ[RUN_ROOT_ENV]
        _own_root = None


def _remove_unkept(root: Path) -> None:
    """Remove ``root`` with every lab in it, except kept ones (the root stays while one does)."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if (entry / KEPT_MARK).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: a kept lab is in it
        root.rmdir()


def new_lab_dir() -> Path:
    """A fresh, private (0700) directory for one lab's sockets, inside the run root."""
    # a process started by a run (a worker, the CLI under a test) files its labs under that run
    return Path(tempfile.mkdtemp(prefix="", dir=_made(_own_root or start_run(worker=True))))


def keep_lab_dir(lab_dir: Path) -> None:
    """Let a lab's directory outlive its run, for its VM kept running after it
    (``--keep-vm-on-failure``); whichever process removes the run root spares it.

    It stays where it is: QEMU holds its sockets' paths, and its dgram links send each packet
    to the peer socket's *path*, so a moved directory would cut the kept VM's network."""
    (lab_dir / KEPT_MARK).touch()


def release_lab_dir(lab_dir: Path) -> None:
    """A kept lab's VM is gone: remove its directory, and its run root once nothing else is
    in it."""
    shutil.rmtree(lab_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another kept lab, or a run still going
        lab_dir.parent.rmdir()
