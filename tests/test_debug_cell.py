"""The debug-kernel cell catches what a stock kernel lets pass: a planted use after free and a
planted leak in nf_flow_table (tests/data/flowtable-{use-after-free,leak}.patch).

On the stock trixie cell each patch passes the offload test unnoticed (the module loop,
``kmodtest validate``). On the debug cell (trixie's sources with KASAN, lockdep, kmemleak ...,
``kmodtest kernel build --debug``) the same patch, rebuilt against that kernel's build tree,
fails the same test with the kernel's own report. The debug kernel takes about 7 minutes to
build on 2 cores (381 s of compile), so these tests use the cached build and are skipped,
naming the command, until it exists; the nightly debug workflow builds it first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kmodtest.prepare.cache import Cache, default_cache_dir
from kmodtest.prepare.kernelbuild import KernelSpec, cached_source_tree, lookup_kernel

DATA = Path(__file__).parent / "data"
USE_AFTER_FREE = DATA / "flowtable-use-after-free.patch"
LEAK = DATA / "flowtable-leak.patch"
SUITE = "trixie"
# one offload case, and a test after it: kmemleak reports an object 5 s after its allocation
OFFLOAD = ["vmtests/test_offload.py", "-k", "virtio-net-pci and tcp-ipv4-routed"]
BUILD = f"kmodtest kernel build --debian-source {SUITE} --debug --out build/debug-{SUITE}-amd64"


def _run(repo: Path, argv: list[str], timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-8000:], result.stderr[-4000:])  # shown when the test fails
    return result


@pytest.fixture(scope="module")
def debug_kernel():
    cache = Cache(default_cache_dir())
    tree = cached_source_tree(cache, SUITE)
    built = lookup_kernel(cache, KernelSpec(tree, "x86_64", SUITE, debug=True)) if tree else None
    if built is None:
        pytest.skip(f"the debug kernel is not built yet: run `{BUILD}` (cached; see README)")
    return built


def _debug_run(repo: Path, tmp_path: Path, patch: Path | None) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "kernel"
    build = [sys.executable, "-m", "kmodtest.face.cli", "kernel", "build",
             "--debian-source", SUITE, "--debug", "--out", str(out)]  # fmt: skip
    if patch is not None:
        build += ["--module-patch", str(patch)]
    assert _run(repo, build).returncode == 0, "building the modules for the debug kernel failed"
    return _run(repo, [
        sys.executable, "-m", "pytest", *OFFLOAD, f"--kernel-image={out / 'bzImage'}",
        f"--modules={out / 'modules'}", f"--log-dir={tmp_path / 'logs'}", "-p", "no:cacheprovider",
    ])  # fmt: skip


def _stock_run(repo: Path, tmp_path: Path, patch: Path) -> subprocess.CompletedProcess[str]:
    return _run(repo, [
        sys.executable, "-m", "kmodtest.face.cli", "validate", "--patch", str(patch),
        f"--kernel=debian-{SUITE}-amd64", "--tests", OFFLOAD[0], "-k", OFFLOAD[2],
        f"--log-dir={tmp_path}",
    ])  # fmt: skip


@pytest.mark.parametrize("patch", [USE_AFTER_FREE, LEAK], ids=["use-after-free", "leak"])
def test_planted_bug_passes_unnoticed_on_the_stock_cell(repo, tmp_path, patch):
    result = _stock_run(repo, tmp_path, patch)
    assert result.returncode == 0, "the stock kernel noticed: the debug cell would not be needed"
    assert "PASS" in result.stdout


def test_debug_cell_passes_with_its_own_modules(repo, tmp_path, debug_kernel):
    result = _debug_run(repo, tmp_path, None)
    assert result.returncode == 0
    assert f"kernel {debug_kernel.release}" in result.stdout


def test_debug_cell_catches_the_use_after_free(repo, tmp_path, debug_kernel):
    result = _debug_run(repo, tmp_path, USE_AFTER_FREE)
    assert result.returncode == 1
    assert "BUG: KASAN: slab-use-after-free in flow_offload_add" in result.stdout
    assert "the kernel reported a problem during this test" in result.stdout


def test_debug_cell_catches_the_leak(repo, tmp_path, debug_kernel):
    result = _debug_run(repo, tmp_path, LEAK)
    assert result.returncode == 1
    assert "suspected memory leak" in result.stdout
    assert "flow_offload_add" in result.stdout  # kmemleak's backtrace of the allocation
