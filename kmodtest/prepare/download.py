"""Download a file into the cache: resumable, with progress, verified before anything uses it.

Plain ``urllib`` from the standard library: one GET with a ``Range`` header is all a resumable
download needs, and it adds no dependency to a tool that otherwise only talks to Debian's
mirrors through mmdebstrap. The file is written to ``partial/<key>.part`` (under the
artifact's lock, so two processes never write one file), resumed from its size with
``Range: bytes=N-`` when the connection drops or an earlier run was interrupted, hashed, and
only if the sha256 matches moved into the artifact directory that
:meth:`Cache.get_or_build` publishes atomically. A mismatch or a download that stays short
removes the partial file and raises: the cache is left as it was.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import KmodtestError
from kmodtest.prepare.cache import Cache, file_sha256
from kmodtest.progress import Progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RESUME_ATTEMPTS = 4  # connections per download: the first, and resumes after a drop
TIMEOUT = 60.0  # seconds without a byte before a connection counts as dropped
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(KmodtestError):
    """A download failed, was cut short, or did not have the published sha256."""


@dataclass(frozen=True)
class Remote:
    """A file to fetch: where from, what to call it, and the sha256 it must have."""

    url: str  # http(s)://, file://
    name: str
    sha256: str


def fetch_verified(
    cache: Cache,
    kind: str,
    key: str,
    remote: Remote,
    progress: Progress,
    note: dict[str, str] | None = None,
) -> Path:
    """The cache directory holding ``remote.name``, downloaded and verified once per ``key``.

    ``note`` is written next to the file as ``source.json`` (where it came from, whose hash).
    """

    def build(out: Path) -> None:
        part = cache.root / "partial" / f"{key}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        # a download that stays short fails inside its step: no "✓ downloading" before the error
        with progress.step(f"downloading {remote.name}"):
            total = _download(remote, part, progress)
            size = part.stat().st_size
            if total is not None and size < total:
                actual = file_sha256(part)
                part.unlink()
                raise DownloadError(
                    f"{remote.name}: download truncated at {size} of {total} bytes from "
                    f"{remote.url}\n  expected sha256 {remote.sha256}\n  actual sha256   {actual}",
                    "retry; if it stays short, the server or a proxy cuts it: try --openwrt-mirror",
                )
        actual = file_sha256(part)
        if actual != remote.sha256:
            part.unlink()
            raise DownloadError(
                f"{remote.name}: sha256 mismatch ({size} bytes from {remote.url})\n"
                f"  expected sha256 {remote.sha256}\n  actual sha256   {actual}",
                "the file on the server is not the published one: use another mirror "
                "(--openwrt-mirror), or correct the hash if it was mistyped",
            )
        os.replace(part, out / remote.name)
        if note is not None:
            (out / "source.json").write_text(json.dumps(note, indent=2) + "\n")

    return cache.get_or_build(kind, key, build)


def _download(remote: Remote, part: Path, progress: Progress) -> int | None:
    """Fill ``part`` with the whole file, resuming; return the total size if the server said."""
    total: int | None = None
    last_error = ""
    for _attempt in range(RESUME_ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        if total is not None and have >= total:
            return total
        request = urllib.request.Request(remote.url, headers={"User-Agent": "kmodtest"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing past what we have: the file is complete
                return have
            raise DownloadError(
                f"{remote.name}: {remote.url} answered {exc.code} {exc.reason}",
                "check the release, target and file name, or the mirror (--openwrt-mirror)",
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(
                f"{remote.name}: cannot reach {remote.url}: {reason}",
                "check the network, or point --openwrt-mirror (or $KMODTEST_OPENWRT_MIRROR) at "
                "a reachable mirror",
            ) from None
        with response:
            start, total = _resume_point(response, have, total)
            with open(part, "r+b" if start else "wb") as handle:
                handle.truncate(start)
                handle.seek(start)
                done = start
                try:
                    while block := response.read(CHUNK):
                        handle.write(block)
                        done += len(block)
                        progress.detail(_progress_text(remote.name, done, total))
                except (http.client.IncompleteRead, OSError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    log.info("%s: connection dropped at %d bytes: %s", remote.name, done, exc)
                    continue
        if total is None or done >= total:
            return total
        log.info("%s: connection ended at %d of %d bytes; resuming", remote.name, done, total)
    log.info("%s: giving up after %d connections (%s)", remote.name, RESUME_ATTEMPTS, last_error)
    return total


def _resume_point(
    response: http.client.HTTPResponse, have: int, total: int | None
) -> tuple[int, int | None]:
    """Where the response's bytes start, and the file's full size if known.

    A 206 must continue exactly where the partial file ends; a 200 (a server or file:// URL
    that ignores Range) starts over.
    """
    status = getattr(response, "status", None) or 200
    length = response.headers.get("Content-Length")
    if status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match and int(match[1]) == have:
            full = None if match[3] == "*" else int(match[3])
            return have, full if full is not None else total
        return 0, total  # a range we did not ask for: start over (rare; costs a re-download)
    return 0, int(length) if length is not None else total


def _progress_text(name: str, done: int, total: int | None) -> str:
    if total:
        return f"{name}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)"
    return f"{name}: {done / 1e6:.1f} MB"


def fetch_text(url: str) -> str:
    """A small text file (a release's ``sha256sums``), not cached."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(
            f"cannot reach {url}: {getattr(exc, 'reason', exc)}",
            "check the network, or point --openwrt-mirror at a reachable mirror",
        ) from None
