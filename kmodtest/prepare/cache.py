"""The one place that knows where kmodtest keeps built artifacts, and how they get there.

Artifacts are directories published atomically: built in a temporary sibling directory, then
renamed into place while holding a per-key lock, so parallel runs (pytest-xdist workers, two
terminals) never see or leave a half-built image.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "KMODTEST_CACHE"


def default_cache_dir() -> Path:
    """``$KMODTEST_CACHE``, else ``$XDG_CACHE_HOME/kmodtest``, else ``~/.cache/kmodtest``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kmodtest"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """Take the exclusive lock on ``path`` if nobody holds it; yields whether it was taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Cache:
    """A cache root with one sub-directory per artifact kind ("images", "downloads", ...)."""

    root: Path

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def _lock_path(self, kind: str, key: str) -> Path:
        return self.root / "locks" / f"{kind}-{key}.lock"

    def lock(self, kind: str, key: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(self._lock_path(kind, key))

    def try_lock(self, kind: str, key: str) -> contextlib.AbstractContextManager[bool]:
        return try_file_lock(self._lock_path(kind, key))

    @staticmethod
    def lock_of(kind: str, name: str) -> tuple[str, str]:
        """The (kind, key) lock that whoever writes the entry ``kind/name`` holds meanwhile:
        ``.KEY.xxxx`` is :meth:`get_or_build`'s temporary for KEY, ``KEY.json`` an index entry,
        anything else its own key (a :meth:`workdir` is locked under its own name)."""
        if name.startswith(".") and "." in name[1:]:
            return kind, name[1:].split(".", 1)[0]
        return kind, name.removesuffix(".json")

    @contextlib.contextmanager
    def workdir(self, prefix: str, kind: str = "work") -> Iterator[Path]:
        """A scratch directory under ``kind/``, locked while it exists (so ``cache prune`` never
        removes it from under a running build) and removed afterwards."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            with self.lock(*self.lock_of(kind, path.name)):
                yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """Return the artifact directory for ``key``, building it with ``build(tmpdir)`` once.

        ``build`` fills an empty temporary directory; only if it returns normally is the
        directory renamed to its final name. A failed build leaves nothing behind.
        """
        final = self.path(kind, key)
        if final.is_dir():
            return final
        with self.lock(kind, key):
            if final.is_dir():  # another process finished it while we waited
                return final
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
            try:
                build(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("cached %s/%s", kind, key)
            return final
