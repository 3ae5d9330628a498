"""Fault suite: the image cache. A truncated and a corrupted image are found at use, discarded
and rebuilt, and the VM never boots them; four runs starting together on one cold cache build
the image once and all pass. Real builds (Debian packages), real QEMU; a private cache each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from kmodtest.prepare.cache import BUILD_LOG, Cache, content_problem

from .faults import held_locks, leftovers, wait_gone

AGENT_TEXT = b"kmodtest guest agent"  # the first line of /usr/lib/kmodtest/agent, in the cpio
MARK = b"CORRUPTED-BY-FAULTS!"  # same length: an image carrying it still boots
INNER = """
from pathlib import Path

def test_boots_an_intact_image(router):
    assert router.check("echo up") == "up\\n"
    Path({out!r}).write_text(router.check("head -c 100 /usr/lib/kmodtest/agent"))
"""


def _inner_argv(repo: Path, test: Path, cache: Path, logs: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", str(test), "-p", "no:cacheprovider",
            f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
            f"--image-cache={cache}", f"--log-dir={logs}", "--nic=virtio-net-pci",
            "-q"]  # fmt: skip


def _the_image(cache: Path) -> Path:
    (image,) = (cache / "images").iterdir()
    return image


def _damage_and_run(repo, tmp_path, tmp_dir, built_cache, fault, damage) -> tuple[str, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache, symlinks=True)
    image = _the_image(cache)
    damage(image / "initrd.cpio")
    problem = content_problem(image)
    assert problem is not None, "the damage was not there to find"
    out = tmp_path / "agent-head"
    test = tmp_path / "test_inner.py"
    test.write_text(INNER.format(out=str(out)))
    marker = f"ktf-{uuid.uuid4().hex}"
    env = {**os.environ, "KTF_MARK": marker, "TMPDIR": str(tmp_dir)}
    done = subprocess.run(_inner_argv(repo, test, cache, tmp_path / "logs"), cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    text = done.stdout + done.stderr
    fault.count("orphans", [*wait_gone(marker), *leftovers(tmp_dir), *held_locks(Cache(cache))])
    # the VM ran from the image at this path: it must be whole now, and built after the discard
    used = fault.count("corrupt_used", [out] if MARK.decode() in out.read_text() else [])
    # only the image's own events: the run also builds other entries (saved VM states) after it
    lines = Cache(cache).root.joinpath(BUILD_LOG).read_text().splitlines()
    events = [line for line in lines if f" images/{image.name} " in line]
    assert done.returncode == 0, text[-3000:]
    assert used == [], "the VM booted the damaged image"
    assert [e.split()[1] for e in events[-2:]] == ["discarded", "built"], events
    assert content_problem(_the_image(cache)) is None
    return text, cache


def test_a_truncated_image_is_rebuilt_not_booted(repo, tmp_path, built_cache, fault, short_tmp):
    fault.injected("cache: truncated initrd")

    def truncate(initrd: Path) -> None:
        os.truncate(initrd, initrd.stat().st_size // 2)

    text, _cache = _damage_and_run(repo, tmp_path, short_tmp, built_cache, fault, truncate)
    assert fault.clear_message(text, r"initrd\.cpio is \d+ bytes, published with \d+",
                               "discarded and rebuilt")  # fmt: skip


def test_a_corrupted_image_is_rebuilt_not_booted(repo, tmp_path, built_cache, fault, short_tmp):
    fault.injected("cache: corrupted initrd (same size)")

    def corrupt(initrd: Path) -> None:
        data = initrd.read_bytes()
        assert AGENT_TEXT in data
        initrd.write_bytes(data.replace(AGENT_TEXT, MARK))

    text, _cache = _damage_and_run(repo, tmp_path, short_tmp, built_cache, fault, corrupt)
    assert fault.clear_message(text, r"initrd\.cpio does not match its sha256",
                               "discarded and rebuilt")  # fmt: skip


def test_four_runs_on_one_cold_cache_build_once(repo, tmp_path, fault, short_tmp):
    """Needs both VM slots (ktlock -2): four VMs boot at about the same time."""
    fault.injected("cache: 4 concurrent runs, cold cache")
    cache = tmp_path / "cache"
    marker = f"ktf-{uuid.uuid4().hex}"
    env = {**os.environ, "KTF_MARK": marker, "TMPDIR": str(short_tmp)}
    runs = []
    for i in range(4):
        run = tmp_path / f"run{i}"
        run.mkdir()
        test = run / "test_inner.py"
        test.write_text(INNER.format(out=str(run / "agent-head")))
        argv = _inner_argv(repo, test, cache, run / "logs")
        runs.append(subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=1800)[0] for p in runs]
    left = fault.count("orphans", [*wait_gone(marker), *leftovers(short_tmp),
                                   *leftovers(cache / "work"), *held_locks(Cache(cache)),
                                   *(cache / "images").glob(".*")])  # fmt: skip
    image = _the_image(cache)
    bad = fault.count("corrupt_used", [image] if content_problem(image) else [])
    assert [p.returncode for p in runs] == [0] * 4, "\n\n".join(o[-1500:] for o in outputs)
    assert left == [] and bad == []
    builds = Cache(cache).builds("images")
    assert len(builds) == 1, builds
    assert len(list((cache / "index").glob("*.json"))) == 1
    for i in range(4):
        assert (tmp_path / f"run{i}" / "agent-head").read_text().startswith("# kmodtest guest")
