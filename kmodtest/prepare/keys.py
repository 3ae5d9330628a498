"""One way to key every cached artifact: its inputs plus a digest of the code that makes it.

Images, kernel sources, toolchain chroots, module overlays and kernel trees (and whatever is
cached next: snapshots, OpenWrt downloads) are all keyed by :func:`artifact_key`, so none can
outlive a change to the data it was made from or to the code that made it. Artifacts whose
inputs only name a moving target (a Debian suite) are found through an index entry that maps
those inputs to the key they last resolved to (:func:`read_index`, :func:`write_index`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

KEY_LENGTH = 20  # hex digits: short paths (unix sockets, cpio names), no collisions in practice


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise LookupError(f"no source for module {name}")
    return Path(spec.origin).read_bytes()


def code_digest(modules: Iterable[str]) -> str:
    """sha256 over the source of ``modules`` (dotted names), in a stable order."""
    return _sha256(b"".join(_module_source(m) for m in sorted(set(modules))))


def artifact_key(inputs: Mapping[str, Any], code: Iterable[str]) -> str:
    """The cache key of an artifact made from ``inputs`` by the modules named in ``code``."""
    blob = {"inputs": inputs, "code": code_digest(code)}
    return _sha256(json.dumps(blob, sort_keys=True, default=str).encode())[:KEY_LENGTH]


def read_index(path: Path) -> dict[str, Any] | None:
    """An index entry (inputs -> resolved key), or None when there is none."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def write_index(path: Path, entry: Mapping[str, Any]) -> None:
    """Write an index entry atomically: a reader sees the old entry or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(entry), sort_keys=True))
    os.replace(tmp, path)
