"""The real guest agent script (busybox ash) against the real host channel, over a raw pty.

Same bytes on the wire as in a VM, minus the VM: framing, binary safety, exit codes, stderr
separation, the guest-side timeout and the skipping of late replies are all exercised here.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
import tty
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from kmodtest.errors import CommandTimeout
from kmodtest.guest import channel as channel_mod
from kmodtest.guest.channel import AgentChannel, encode_command

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(
    BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)"
)


class PtyTransport:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.fd, data) :]

    def recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        try:
            return os.read(self.fd, 1 << 20)
        except OSError:
            return b""

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentChannel]:
    script = resources.files("kmodtest.guest").joinpath("files", "agent")
    agent_path = tmp_path / "agent"
    agent_path.write_bytes(script.read_bytes())
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "shadows").write_text("")
    master, slave = pty.openpty()
    tty.setraw(slave)
    env = {
        "PATH": "/usr/bin:/bin",
        "KMODTEST_RUN": str(run),
        "KMODTEST_SHADOWS": str(tmp_path / "shadows"),
    }
    procs = [
        subprocess.Popen([BUSYBOX, "sh", str(agent_path), "watchdog"], env=env),
        subprocess.Popen([BUSYBOX, "sh", str(agent_path), os.ttyname(slave)], env=env),
    ]
    chan = AgentChannel(PtyTransport(master))
    chan.agent_pid = procs[1].pid  # type: ignore[attr-defined]  (for the watchdog tests)
    chan.run_dir = run  # type: ignore[attr-defined]
    try:
        yield chan
    finally:
        for p in procs:
            p.kill()
            p.wait()
        chan.close()
        os.close(slave)


def test_exit_code_stdout_and_stderr_are_separate(agent):
    reply = agent.run("echo out; echo err >&2; exit 3")
    assert (reply.exit_status, reply.stdout, reply.stderr) == (3, b"out\n", b"err\n")


def test_binary_output_survives_byte_for_byte(agent):
    every_byte = 'i=0; while [ $i -lt 256 ]; do printf "\\\\$(printf %o $i)"; i=$((i+1)); done'
    reply = agent.run(every_byte)
    assert reply.stdout == bytes(range(256))


def test_commands_with_newlines_quotes_and_unicode(agent):
    command = "cat <<'EOF'\nline one\n  'quoted' \"double\" \\back $HOME ü\nEOF"
    assert agent.run(command).stdout.decode() == "line one\n  'quoted' \"double\" \\back $HOME ü\n"


def test_large_output(agent):
    reply = agent.run("head -c 3000000 /dev/zero | tr '\\0' x")
    assert reply.stdout == b"x" * 3_000_000


def test_timeout_kills_the_command_and_the_channel_stays_usable(agent):
    with pytest.raises(CommandTimeout, match="killed after 1 s"):
        agent.run("echo started; sleep 30", timeout=1)
    assert agent.run("echo next").stdout == b"next\n"


def test_late_reply_of_a_host_side_timeout_is_skipped(agent, monkeypatch):
    # The host gives up first (a stuck transport, as it looks from the host) ...
    monkeypatch.setattr(channel_mod, "HOST_FACTOR", 0.1)
    monkeypatch.setattr(channel_mod, "REPLY_MARGIN", 0.0)
    with pytest.raises(CommandTimeout, match="no reply"):
        agent.run("sleep 2; echo late", timeout=3)
    monkeypatch.undo()
    # ... and the late reply to request 1 must not be mistaken for request 2's.
    assert agent.run("echo fresh").stdout == b"fresh\n"


def test_each_command_runs_in_its_own_subshell(agent):
    start = agent.run("pwd").stdout
    agent.run("cd /tmp; X=1; set -e")
    reply = agent.run("pwd; echo ${X:-unset}; false; echo still-running")
    assert reply.stdout == start + b"unset\nstill-running\n"


def test_encoding_keeps_everything_on_one_line():
    encoded = encode_command("a b\nc\\d\tü%")
    assert "\n" not in encoded and " " not in encoded
    assert encoded == "a\\0040b\\0012c\\0134d\\0011\\0303\\0274%"


def test_a_straggling_background_writer_never_leaks_into_the_next_reply(agent):
    first = agent.run("(sleep 1; echo LATE; echo LATE >&2) & echo now")
    assert first.stdout == b"now\n"
    second = agent.run("sleep 2; echo second")
    assert (second.stdout, second.stderr) == (b"second\n", b"")
    assert agent.run("echo third").stdout == b"third\n"


def test_a_stale_timeout_flag_never_marks_the_next_command(agent):
    """The watchdog flags a timeout just as its command ends: the flag, landing while the next
    command runs, names the old request, so the next reply is not a false timeout."""
    assert agent.run("echo first").stdout == b"first\n"  # request 1
    reply = agent.run(f"echo 1 >{agent.run_dir}/timedout; echo second")  # request 2
    assert (reply.stdout, reply.timed_out) == (b"second\n", False)


def test_the_watchdog_never_kills_a_pid_that_is_no_longer_the_command(agent):
    """A stale entry (the command ended, its pid reused by another process) past its deadline:
    the process with that pid is not the agent's child, so it lives."""
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (agent.run_dir / "running").write_text(f"9 {bystander.pid} {agent.agent_pid} 0\n")
        time.sleep(2.5)  # the watchdog looks once a second
        assert bystander.poll() is None, "the watchdog killed an unrelated process"
        (agent.run_dir / "running").write_text("")
        assert agent.run("echo alive").stdout == b"alive\n"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_one_second_timeout_never_fires_early(agent):
    """Deadlines are whole seconds of uptime: without a margin, a 1 s timeout started at x.95
    would fire 50 ms later."""
    for _ in range(5):
        assert agent.run("sleep 0.6; echo done", timeout=1).stdout == b"done\n"


def test_what_a_command_leaves_running_does_not_hold_the_agent_s_port(agent):
    """In a VM the port opens only once every holder has closed it: a daemon a test started,
    holding it, would keep a restarted agent out for good (a kept VM's `kmodtest attach`
    then waits forever)."""
    pid = int(agent.run("sleep 300 >/dev/null 2>&1 </dev/null & echo $!").stdout)
    port = os.path.realpath(f"/proc/{agent.agent_pid}/fd/3")  # open: the agent has answered
    try:
        fds = Path(f"/proc/{pid}/fd")
        held = [os.path.realpath(fd) for fd in fds.iterdir()]
        assert port.startswith("/dev/pts/") and port not in held
    finally:
        os.kill(pid, 9)
