"""Fetching OpenWrt images, proven on the stand-in served from 127.0.0.1: download, resume,
sha256 mismatch, truncation, cache reuse, and the image prepared for its boot path.
The stand-in is kmodtest's own build in OpenWrt's formats, not OpenWrt."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from kmodtest.prepare import diskimage
from kmodtest.prepare.download import DownloadError
from kmodtest.prepare.openwrt import OpenWrtImages

COMBINED = "kmodtest-standin-x86-64-generic-ext4-combined.img.gz"


def cache_files(images: OpenWrtImages) -> list[str]:
    """Everything in the cache but lock files: what a failed fetch must not leave."""
    root = images.cache.root
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.startswith("locks/"):
                found.append(rel)
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_verifies_prepares_and_reuses(standin, standin_images, standin_server):
    cell = standin.matrix.get("standin-x86-64")
    assert standin_images.missing(cell, "kmodtest fetch standin-x86-64").endswith(
        "fix: kmodtest fetch standin-x86-64"
    )
    image = standin_images.fetch(cell)

    assert image.stand_in and "STAND-IN" in image.description
    source = image.manifest["sources"]["combined"]
    served = standin.www / "releases/standin/targets/x86/64" / COMBINED
    assert source["sha256"] == sha256(served)
    assert source["sha256_from"] == "openwrt-releases.yaml"
    # the first gzip member only: the disk, without the metadata after the stream
    assert image.manifest["grub"]["trailing_bytes"] > 0
    mbr = diskimage.read_mbr(image.disk)
    assert [p.number for p in mbr.partitions] == [1, 2]
    assert image.cmdline == (
        f"root=PARTUUID={mbr.signature}-02 rootfstype=ext4 rootwait "
        "console=tty1 console=ttyS0,115200n8 noinitrd"
    )
    assert image.kernel.stat().st_size > 1_000_000  # /boot/vmlinuz out of partition 1
    assert standin_images.missing(cell, "x") is None

    gets = len(standin_server.gets(COMBINED))
    again = standin_images.fetch(cell)  # cached: no new request
    assert again.path == image.path
    assert len(standin_server.gets(COMBINED)) == gets == 1


def test_dropped_connection_resumes_with_range(standin, standin_images, standin_server):
    standin_server.faults.drop_once_after = 3_000_000
    image = standin_images.fetch(standin.matrix.get("standin-x86-64"))
    first, second = standin_server.gets(COMBINED)
    assert first.range is None and first.status == 200
    assert second.range == "bytes=3000000-" and second.status == 206
    served = standin.www / "releases/standin/targets/x86/64" / COMBINED
    assert image.manifest["sources"]["combined"]["sha256"] == sha256(served)
    assert not any(f.startswith("partial/") for f in cache_files(standin_images))


def test_partial_file_of_an_interrupted_run_is_resumed(standin, standin_images, standin_server):
    cell = standin.matrix.get("standin-x86-64")
    [artifact] = standin_images.artifacts(cell)
    served = standin.www / "releases/standin/targets/x86/64" / COMBINED
    part = standin_images.cache.root / "partial" / f"{artifact.key}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(served.read_bytes()[:1_000_000])
    standin_images.fetch(cell)
    [only] = standin_server.gets(COMBINED)
    assert only.range == "bytes=1000000-" and only.status == 206


def test_sha256_mismatch_fails_and_leaves_the_cache_clean(standin, standin_images, standin_server):
    standin_server.faults.corrupt = True
    served = standin.www / "releases/standin/targets/x86/64" / COMBINED
    with pytest.raises(DownloadError) as err:
        standin_images.fetch(standin.matrix.get("standin-x86-64"))
    corrupted = bytearray(served.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    message = str(err.value)
    assert f"{COMBINED}: sha256 mismatch" in message
    assert f"expected sha256 {sha256(served)}" in message
    assert f"actual sha256   {hashlib.sha256(corrupted).hexdigest()}" in message
    assert cache_files(standin_images) == []


def test_truncated_download_fails_and_leaves_the_cache_clean(
    standin, standin_images, standin_server
):
    standin_server.faults.truncate_after = 2_000_000
    served = standin.www / "releases/standin/targets/x86/64" / COMBINED
    with pytest.raises(DownloadError) as err:
        standin_images.fetch(standin.matrix.get("standin-x86-64"))
    message = str(err.value)
    size = served.stat().st_size
    assert f"{COMBINED}: download truncated at 2000000 of {size} bytes" in message
    assert f"expected sha256 {sha256(served)}" in message
    head = hashlib.sha256(served.read_bytes()[:2_000_000]).hexdigest()
    assert f"actual sha256   {head}" in message
    assert len(standin_server.gets(COMBINED)) > 1  # it tried to resume before giving up
    assert cache_files(standin_images) == []


def test_unpinned_file_is_checked_against_the_release_sha256sums(
    standin, standin_images, standin_server
):
    image = standin_images.fetch(standin.matrix.get("standin-armsr-armv8-kernel-rootfs"))
    sources = image.manifest["sources"]
    assert sources["kernel"]["sha256_from"].startswith(
        f"{standin_server.url}/releases/standin/targets/armsr/armv8/sha256sums"
    )
    served = standin.www / "releases/standin/targets/armsr/armv8" / sources["kernel"]["file"]
    assert sources["kernel"]["sha256"] == sha256(served)
    assert sources["rootfs"]["sha256_from"] == "openwrt-releases.yaml"
    assert image.cmdline == "root=/dev/vda rootwait"
    assert image.disk.name == "rootfs.img" and image.initrd is not None
    record = json.loads(
        (standin_images.cache.path("downloads", standin_images.artifacts(
            standin.matrix.get("standin-armsr-armv8-kernel-rootfs"))[0].key) / "source.json"
         ).read_text()
    )  # fmt: skip
    assert record["sha256"] == sources["kernel"]["sha256"]
