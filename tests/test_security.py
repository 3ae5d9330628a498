"""Security basics: no network port is opened, private directories, and no value from YAML or
the command line is ever run by a shell (nor splits a QEMU option)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.toolchain import chroot_argv

_INET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6")
_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc prints


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _inet_sockets(inodes: set[str]) -> list[tuple[str, str]]:
    """(table, local address:port) of every IP socket among ``inodes``."""
    found = []
    for table in _INET_TABLES:
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.append((table, fields[1]))
    return found


def test_a_booted_vm_binds_nothing_but_unix_sockets_or_loopback(router):
    qemu_pid = router.vm.machine.proc.pid
    qemu_sockets = _socket_inodes(qemu_pid)
    unix = Path("/proc/net/unix").read_text()
    run_dir = str(router.spec.run_dir)
    # sanity: these are the right sockets (QEMU's agent, QMP and NIC links in the run dir)
    assert sum(1 for line in unix.splitlines() if run_dir in line) >= 3
    for pid, sockets in ((qemu_pid, qemu_sockets), (os.getpid(), _socket_inodes(os.getpid()))):
        exposed = [
            (table, addr)
            for table, addr in _inet_sockets(sockets)
            if addr.split(":")[0] not in _LOOPBACK
        ]
        assert exposed == [], f"pid {pid} has IP sockets off loopback: {exposed}"
    argv = (router.spec.log_dir / "qemu.argv").read_text()
    assert "-netdev dgram" in argv and not any(
        bad in argv for bad in ("tap,", "bridge,", "-netdev user", "hostfwd")
    ), argv


def test_run_and_work_directories_are_private(router, tmp_path):
    assert router.spec.run_dir.stat().st_mode & 0o777 == 0o700
    with Cache(tmp_path).workdir(prefix="x.") as work:
        assert work.stat().st_mode & 0o777 == 0o700


def test_a_cell_id_that_would_run_a_command_is_refused(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "cells:\n  - id: 'debian $(touch /tmp/kt-pwned)'\n    arch: x86_64\n"
        "    source: {kind: debian, suite: trixie, kernel_package: linux-image-amd64}\n"
        "    default: true\n"
    )
    with pytest.raises(ConfigError, match=r"m\.yaml:2: cells\[0\]\.id"):
        load_matrix(tmp_path)


def test_chroot_paths_stay_single_words_and_never_run(tmp_path):
    """The module loop's bind mounts: a source path with spaces, quotes and $(...)."""
    marker = tmp_path / "pwned"  # what the substitutions would create in the shell's cwd
    weird = tmp_path / "src $(touch pwned) \"q\" 'q' `touch pwned`"
    weird.mkdir()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls"
    for tool in ("mount", "mkdir", "chroot"):
        body = f'printf "%s|" {tool} "$@" >>"{log}"\necho >>"{log}"\n'
        (stubs / tool).write_text(f"#!/bin/sh\n{body}")
        (stubs / tool).chmod(0o755)
    argv = chroot_argv(tmp_path / "root", ["make", "-C", "/build"], weird, [(weird, "/src")])
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    subprocess.run(argv, env=env, check=True, cwd=tmp_path)
    calls = log.read_text().splitlines()
    assert f"mount|--bind|{weird}|{tmp_path / 'root'}/build|" in calls
    assert f"mount|--bind|{weird}|{tmp_path / 'root'}/src|" in calls
    assert any(c.startswith(f"chroot|{tmp_path / 'root'}|env|-i|") for c in calls)
    assert not marker.exists(), "a path was run by the shell"


INNER = """
def test_the_vm_works(router, host):
    assert host.check_output("echo ok") == "ok"
"""


def test_paths_with_spaces_commas_and_command_substitution(
    pytester, repo, inner_env, monkeypatch, kmodtest_session
):
    """--log-dir, --image-cache, --kernels-dir and TMPDIR (the VM's socket dir) all hold a
    space, a comma and $(...): the VM boots, and nothing is run or split."""
    marker = f"kt-pwned-{uuid.uuid4().hex[:8]}"  # a shell would create it in its cwd
    tricky = f"a b,c $(touch {marker})"
    base = Path(tempfile.mkdtemp(prefix="kt-sec-"))  # short: unix socket paths <= 107 bytes
    try:
        kernels = base / f"kernels {tricky}"
        shutil.copytree(repo / "kernels", kernels)
        cache = base / f"cache {tricky}"
        cache.symlink_to(kmodtest_session.cache.root)  # the shared images, through the path
        tmpdir = base / f"t{tricky}"
        tmpdir.mkdir()
        monkeypatch.setenv("TMPDIR", str(tmpdir))  # the VM's socket dir is made under it
        pytester.makepyfile(test_inner=INNER)
        result = pytester.runpytest_subprocess(
            "-p", "fixtures.router", f"--kernels-dir={kernels}",
            f"--images-dir={repo / 'images'}", f"--image-cache={cache}",
            f"--log-dir={base / ('logs ' + tricky)}", "--keep-logs",
        )  # fmt: skip
        assert result.ret == 0, result.stdout.str()[-3000:]
        result.assert_outcomes(passed=1)
        cwds = (repo, pytester.path, base, Path("/"), Path.home(), Path(tempfile.gettempdir()))
        assert not [d for d in cwds if (d / marker).exists()], "a path reached a shell unquoted"
        assert list((base / ("logs " + tricky)).rglob("console.log")), "no console log there"
    finally:
        shutil.rmtree(base, ignore_errors=True)
