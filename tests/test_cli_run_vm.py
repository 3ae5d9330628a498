"""``kmodtest run``, ``shell``, ``--keep-vm-on-failure`` / ``ps`` / ``attach`` / ``stop`` on real
VMs of the default cell, driven as a user drives them: the installed command, a pty for the
shell. Every test checks that no QEMU of its own is left behind (its logs go to ``tmp_path``,
which every QEMU it starts names on its command line)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtest.face.interactive import EXIT_CRASH, EXIT_TIMEOUT
from kmodtest.face.options import packaged
from kmodtest.prepare.cells import load_matrix

KMODTEST = [sys.executable, "-m", "kmodtest.face.cli"]


def qemus_naming(text: str) -> list[int]:
    """Pids of QEMU processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(text.encode() in a for a in argv):
            found.append(int(proc.name))
    return found


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs"
    yield path
    assert qemus_naming(str(path)) == [], "a QEMU of this test is still running"


def run(logs: Path, *words: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KMODTEST, "run", "--log-dir", str(logs), *words],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_run_prints_the_guest_nft_version_and_exits_0(logs: Path) -> None:
    out = run(logs, "--", "nft", "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("nftables v"), out.stdout


def test_run_exits_with_the_command_s_status(logs: Path) -> None:
    out = run(logs, "--", "false")
    assert out.returncode == 1, out.stderr


def test_run_network_sets_up_the_client_and_server_the_command_uses(logs: Path) -> None:
    """``--network``: the client reaches the server through the router, as in the fixtures;
    without it there is no client namespace."""
    ping = "ip netns exec client ping -c 1 -W 10 198.51.100.2"
    out = run(logs, "--network", "--", ping)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 packets received" in out.stdout, out.stdout
    bare = run(logs, "--", ping)
    assert bare.returncode != 0, bare.stdout


def test_run_streams_output_while_the_command_runs(logs: Path) -> None:
    """The command never ends (it waits for a file nothing creates): its first line can only
    reach us if output streams; then Ctrl-C stops kmodtest and its VM."""
    proc = subprocess.Popen(
        [*KMODTEST, "run", "--log-dir", str(logs), "--",
         "echo first; echo to-stderr >&2; while ! [ -e /tmp/never ]; do sleep 0.2; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "first\n"
        assert proc.stderr is not None and proc.stderr.readline() == "to-stderr\n"
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr


def test_run_put_copies_a_script_that_then_runs(logs: Path, tmp_path: Path) -> None:
    script = tmp_path / "probe.sh"
    script.write_text('#!/bin/sh\necho "ran on $(uname -r) with $*"\nexit 7\n')
    script.chmod(0o755)
    out = run(logs, "--put", f"{script}:/opt/probe.sh", "--", "/opt/probe.sh", "a b", "c")
    assert out.returncode == 7, out.stderr
    assert out.stdout.startswith("ran on ") and out.stdout.endswith(" with a b c\n")


def test_run_package_and_module_add_a_layer_the_command_uses(logs: Path) -> None:
    """bash and xfrm_user are not in the router image; --package/--module put them in."""
    out = run(logs, "--package", "bash", "--module", "xfrm_user", "--",
              "bash -c 'echo bash $BASH_VERSION' && modprobe xfrm_user && "
              "grep -o '^xfrm_user' /proc/modules")  # fmt: skip
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("bash 5.") and second == "xfrm_user"
    without = run(logs, "--", "command -v bash || echo no bash")
    assert without.stdout == "no bash\n"


def test_run_timeout_kills_the_command_and_exits_124(logs: Path) -> None:
    out = run(logs, "--timeout", "3", "--", "echo before; sleep 600; echo never")
    assert out.returncode == EXIT_TIMEOUT, out.stderr
    assert out.stdout == "before\n"
    assert "--timeout 3" in out.stderr


def test_a_command_that_panics_the_guest_gives_the_crash_code_and_excerpt(logs: Path) -> None:
    out = run(logs, "--", "echo c >/proc/sysrq-trigger")
    assert out.returncode == EXIT_CRASH, out.stderr
    assert "Kernel panic" in out.stderr and "sysrq" in out.stderr.lower(), out.stderr
    assert "console log: " in out.stderr


class Terminal:
    """A program on a pty of its own, as a terminal window runs it: with ``ctty`` the pty is
    its controlling terminal (``setsid -c``), so resizing and closing the window reach it as
    SIGWINCH and SIGHUP. Leaving the ``with`` block ends the program (the escape, then
    SIGKILL), so a failed test still leaves the QEMU check a finished program."""

    def __init__(self, argv: list[str], env: dict[str, str], ctty: bool = True) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.rows = 0
        self.resize(30, 100)
        setsid = ["setsid", "--ctty"] if ctty else []
        self.proc = subprocess.Popen([*setsid, *argv], stdin=slave, stdout=slave, stderr=slave,
                                     env=env)  # fmt: skip
        os.close(slave)
        self.seen = b""

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc.poll() is None and self.master >= 0:
            self.send(b"\x1d")
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its QEMU goes too (its death signal)
            self.proc.wait()
        self.hang_up()

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.rows = rows

    def expect(self, text: bytes, within: float = 300) -> None:
        """Read until ``text`` appears (``within`` only bounds a hang; it measures nothing)."""
        deadline = time.monotonic() + within
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{text!r} never came; the terminal shows:\n{self.tail}")
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the program exited and closed the pty
                raise AssertionError(f"{text!r} never came; it exited:\n{self.tail}") from None
            if b"\x1b[6n" in data:
                # ash asks where the cursor is and a terminal answers (kmodtest passes it on):
                # the last row, after ash's 4-column prompt. Not row 1 column 3: busybox takes
                # "ESC [ 1 ; 3" for the start of Alt-Right and swallows the keys that follow
                # within 50 ms (a script's, not a person's)
                self.send(f"\x1b[{self.rows};5R".encode())
            self.seen += data
        self.seen = self.seen[self.seen.index(text) + len(text) :]

    @property
    def tail(self) -> str:
        return self.seen[-2000:].decode(errors="replace")

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def hang_up(self) -> None:
        """Close the terminal window."""
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def wait(self) -> int:
        return self.proc.wait(timeout=120)


def test_shell_through_a_pty_types_reads_interrupts_resizes_and_leaves(logs: Path) -> None:
    with Terminal([*KMODTEST, "shell", "--log-dir", str(logs)],
                  dict(os.environ, TERM="xterm")) as term:  # fmt: skip
        term.expect(b"console log: ")
        term.expect(b"# ")  # ash's prompt for root
        term.send(b"echo $((6*7))\r")
        term.expect(b"42")
        term.send(b"stty size\r")  # the guest pty's size is the terminal's ...
        term.expect(b"30 100")
        term.resize(40, 120)  # ... and follows it
        term.send(b"stty size\r")
        term.expect(b"40 120")
        # the job itself says it runs (the echoed command line reads re''ady, not ready): by
        # then it is the terminal's foreground job, so a Ctrl-C cannot reach ash's line editor
        term.send(b"sh -c 'echo re''ady; exec sleep 1000'\r")
        term.expect(b"ready")
        term.send(b"\x03")  # Ctrl-C reaches the guest's foreground job ...
        term.send(b"echo after-$((1+1))\r")
        term.expect(b"after-2")  # ... or this would wait 1000 s
        term.send(b"\x1d")  # the escape: Ctrl-]
        term.expect(b"left the shell (escape)")
        assert term.wait() == 0


@pytest.mark.parametrize("ending", ["exit", "end-of-input", "hangup", "read-error", "sigterm"])
def test_the_vm_goes_with_the_shell_however_it_ends(logs: Path, ending: str) -> None:
    """exit: the guest shell exits; end-of-input: stdin is a pipe the user closes; hangup: the
    terminal window closes (SIGHUP); read-error: the same without a controlling terminal, so
    reading the keys fails (an exception); sigterm: the process is told to stop. In every case
    kmodtest ends by itself (not by the signal's default action: it unwinds) and the fixture
    finds no QEMU of it."""
    argv = [*KMODTEST, "shell", "--log-dir", str(logs)]
    if ending == "end-of-input":
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        seen = b""
        while b"# " not in seen:
            chunk = proc.stdout.read1(65536)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(timeout=120) == 0, out
        assert b"left the shell (closed)" in out, out
        return
    with Terminal(argv, dict(os.environ, TERM="xterm"), ctty=ending != "read-error") as term:
        term.expect(b"# ")
        if ending == "exit":
            term.send(b"exit\r")
            term.expect(b"left the shell (exit)")
            assert term.wait() == 0
        elif ending == "sigterm":
            term.proc.send_signal(signal.SIGTERM)
            assert term.wait() == 130
        else:
            term.hang_up()
            assert term.wait() >= 0  # an exit code: kmodtest unwound, the signal did not kill it


KEEP_TESTS = """
def test_fails_after_leaving_a_mark(router):
    router.check("nft add table inet kept_mark")
    router.check("sleep 1000 >/dev/null 2>&1 </dev/null &")  # as a test's daemon would
    assert False, "deliberate failure"


def test_after_it_boots_a_fresh_vm(router):
    assert "kept_mark" not in router.check("nft list tables")
"""


def test_keep_vm_on_failure_keeps_exactly_that_vm_attach_reaches_it_stop_removes_it(
    logs: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_keep.py").write_text(KEEP_TESTS)
    env = dict(os.environ, KMODTEST_STATE=str(tmp_path / "state"), TERM="xterm")
    session = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--keep-vm-on-failure",
         "--log-dir", str(logs), "test_keep.py", "-rA"],
        cwd=project, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert session.returncode == 1, session.stdout[-3000:]
    assert "1 failed, 1 passed" in session.stdout, session.stdout[-3000:]
    records = sorted((tmp_path / "state" / "vms").glob("*.json"))
    assert len(records) == 1, records
    kept = json.loads(records[0].read_text())
    try:
        default = load_matrix(packaged("kernels")).default.id
        assert kept["test"] == f"test_keep.py::test_fails_after_leaving_a_mark[{default}]"
        assert f"kmodtest attach {kept['id']}" in session.stdout
        # exactly that VM outlived the session (the second test's VM was stopped)
        assert qemus_naming(str(logs)) == [kept["pid"]]
        ps = subprocess.run([*KMODTEST, "ps"], env=env, capture_output=True, text=True, check=True)
        assert ps.stdout.count(kept["id"]) == 1, ps.stdout

        # the agent is back after the session's end (the daemon the test left does not hold
        # its port), and the lab's links still carry packets (its sockets were not moved)
        with Terminal([*KMODTEST, "attach", kept["id"][:20]], env) as term:
            term.expect(b"# ")
            term.send(b"nft list tables\r")
            term.expect(b"table inet kept_mark")  # the network state the failing test left
            for ns, router_address in (("client", "192.0.2.1"), ("server", "198.51.100.1")):
                term.send(f"ip netns exec {ns} ping -c 1 -W 5 {router_address} >/dev/null "
                          f"&& echo {ns}-''reached\r".encode())  # fmt: skip
                term.expect(f"{ns}-reached".encode())
            term.send(b"\x1d")
            assert term.wait() == 0
        assert qemus_naming(str(logs)) == [kept["pid"]]  # leaving the shell keeps the VM
    finally:
        stop = subprocess.run([*KMODTEST, "stop", kept["id"]], env=env, capture_output=True,
                              text=True)  # fmt: skip
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"stopped {kept['id']}"
    lab = Path(kept["lab_dir"])
    assert not lab.exists() and not lab.parent.exists()  # its run's root went with it
    ps = subprocess.run([*KMODTEST, "ps"], env=env, capture_output=True, text=True, check=True)
    assert ps.stdout.startswith("no kept VMs")
