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


@dataclass(frozen=True)
class Cache:
    """A cache root with one sub-directory per artifact kind ("images", "downloads", ...)."""

    root: Path

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lock(self, kind: str, key: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / "locks" / f"{kind}-{key}.lock")

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
