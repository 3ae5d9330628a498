"""The one place that knows where kmodtest keeps built artifacts, and how they get there.

Artifacts are directories published atomically: built in a temporary sibling directory, then
renamed into place while holding a per-key lock, so parallel runs (pytest-xdist workers, two
terminals) never see or leave a half-built image.

What a VM boots (images, overlays) is also checked at every use: each entry carries a content
manifest (sha256 and size of every file, written inside the temporary directory, so it is
published by the same rename), and an entry that no longer matches it (a truncated or
corrupted file, a disk error, a manual edit) is discarded and rebuilt, never booted. Every
publish appends a line to ``builds.log`` at the cache root: what was built, when, by whom.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "KMODTEST_CACHE"
# kinds whose entries are never modified after publish and are booted: checked at every use
CHECKED_KINDS = frozenset({"images", "overlays"})
CONTENT_MANIFEST = ".kmodtest-content"  # inside an entry: "<sha256> <size> <relative path>"
BUILD_LOG = "builds.log"  # at the cache root: one line per published entry
_HASH_CHUNK = 1 << 20
# entries this process has checked, keyed with their manifest's identity: hash once per process
_checked: dict[Path, tuple[int, int]] = {}
# what this process discarded, one line each, for the run's summary (a rebuild is no secret)
discarded: list[str] = []


def default_cache_dir() -> Path:
    """``$KMODTEST_CACHE``, else ``$XDG_CACHE_HOME/kmodtest``, else ``~/.cache/kmodtest``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kmodtest"


def mark_used(entry: Path) -> Path:
    """Stamp ``entry``'s mtime with now: ``cache prune --unused-for DAYS`` goes by it."""
    with contextlib.suppress(OSError):  # a read-only or shared cache still serves
        os.utime(entry)
    return entry


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


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in chunks (images are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_content_manifest(directory: Path) -> None:
    """Record the sha256 and size of every regular file under ``directory`` (symlinks and
    directories are structure, not content)."""
    files = sorted(
        Path(root, name).relative_to(directory)
        for root, _dirs, names in os.walk(directory)
        for name in names
        if name != CONTENT_MANIFEST and not Path(root, name).is_symlink()
    )
    lines = [
        f"{file_sha256(directory / rel)} {(directory / rel).stat().st_size} {rel}\n"
        for rel in files
    ]
    (directory / CONTENT_MANIFEST).write_text("".join(lines))


def content_problem(directory: Path) -> str | None:
    """What is wrong with a published entry's content, or None when every file it was
    published with is there with its size and sha256."""
    manifest = directory / CONTENT_MANIFEST
    try:
        text = manifest.read_text()
    except FileNotFoundError:
        return f"no content manifest ({CONTENT_MANIFEST}): made before entries were checked"
    for line in text.splitlines():
        sha, size, rel = line.split(" ", 2)
        path = directory / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if actual != int(size):
            return f"{rel} is {actual} bytes, published with {size} (truncated or overwritten)"
        if file_sha256(path) != sha:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


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

    def entry(self, kind: str, key: str) -> Path | None:
        """The published entry ``kind/key`` if it is there and intact, else None; one whose
        content check fails is discarded (so the caller builds it again)."""
        final = self.path(kind, key)
        if not final.is_dir():
            return None
        if kind not in CHECKED_KINDS or self._intact(final):
            return mark_used(final)
        with self.lock(kind, key):
            if not final.is_dir():  # another process discarded it meanwhile
                return None
            if self._intact(final):  # ... or rebuilt it
                return final
            self._discard(kind, key, content_problem(final))
        return None

    def _intact(self, final: Path) -> bool:
        try:
            stat = (final / CONTENT_MANIFEST).stat()
        except FileNotFoundError:
            return False
        identity = (stat.st_ino, stat.st_mtime_ns)
        if _checked.get(final) == identity:
            return True
        if content_problem(final) is not None:
            return False
        _checked[final] = identity
        return True

    def _discard(self, kind: str, key: str, problem: str | None) -> None:
        """Move a bad entry out of the way (a temporary name: its key's lock covers it, and
        ``cache prune`` counts it stale if we die now) and remove it."""
        final = self.path(kind, key)
        note = (
            f"{final} was damaged ({problem}): discarded and rebuilt; see {self.root / BUILD_LOG}"
        )
        log.warning("%s", note)
        discarded.append(note)
        self._log_event("discarded", kind, key, problem or "")
        aside = Path(tempfile.mkdtemp(prefix=f".{key}.damaged.", dir=final.parent))
        os.rename(final, aside / key)
        _checked.pop(final, None)
        shutil.rmtree(aside, ignore_errors=True)

    def _log_event(self, event: str, kind: str, key: str, note: str = "") -> None:
        """One line in ``builds.log``; appends of one short line are atomic between writers."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {event} {kind}/{key} pid={os.getpid()} {note}".rstrip() + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / BUILD_LOG, "a") as handle:
            handle.write(line)

    def builds(self, kind: str | None = None) -> list[str]:
        """The ``built`` lines of ``builds.log`` (for ``kind`` only, when given)."""
        try:
            lines = (self.root / BUILD_LOG).read_text().splitlines()
        except FileNotFoundError:
            return []
        want = f" built {kind}/" if kind else " built "
        return [line for line in lines if want in line]

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """Return the artifact directory for ``key``, building it with ``build(tmpdir)`` once.

        ``build`` fills an empty temporary directory; only if it returns normally is the
        directory renamed to its final name. A failed build leaves nothing behind. An entry of
        a :data:`CHECKED_KINDS` kind that fails its content check is rebuilt.
        """
        if found := self.entry(kind, key):
            return found
        final = self.path(kind, key)
        with self.lock(kind, key):
            if final.is_dir():  # another process finished it while we waited, or it is bad
                if kind not in CHECKED_KINDS or self._intact(final):
                    return mark_used(final)
                self._discard(kind, key, content_problem(final))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
            started = time.monotonic()
            try:
                build(tmp)
                if kind in CHECKED_KINDS:
                    write_content_manifest(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._log_event("built", kind, key, f"seconds={time.monotonic() - started:.1f}")
            log.info("cached %s/%s", kind, key)
            return final
