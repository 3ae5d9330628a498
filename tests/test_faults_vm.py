"""Fault suite: faults inside a VM test, each in a real pytest run (pytester subprocess) on a
real VM: a guest kernel panic, a guest command that never returns (killed by the agent, or an
agent that stalls), QEMU killed with SIGKILL. The test with the fault fails with a message that
names it; the run goes on, on a fresh VM where the old one is gone."""

from __future__ import annotations

import os
import uuid

import pytest

from .faults import leftovers, wait_gone
from .test_sigint import alive

PANIC = """
from pathlib import Path
PIDS = Path({pids!r})

def test_crashes_the_kernel(router):
    PIDS.write_text(f"{{router.vm.machine.proc.pid}}\\n")
    router.run("echo c > /proc/sysrq-trigger", timeout=10)

def test_next_test_gets_a_fresh_vm(router):
    with PIDS.open("a") as pids:
        pids.write(f"{{router.vm.machine.proc.pid}}\\n")
    assert router.check("echo up") == "up\\n"
"""

HANG = """
import time
import pytest
from kmodtest.errors import CommandTimeout

def test_a_command_that_never_returns(router):
    router.check("sleep 100000; echo never", timeout=3)

def test_an_agent_that_stalls_then_answers_late(router):
    # the agent stops for 20 s (guest clock), so the host gives up on the next command; when
    # the agent resumes it answers that command late, and the host must skip that reply
    # the agent is the parent of the subshell that runs a command (read is a builtin: no fork)
    owner = router.check("read -r _ _ _ owner _ </proc/self/stat; echo $owner").strip()
    assert owner.isdigit(), owner
    router.check(f"setsid sh -c 'sleep 1; kill -STOP {{owner}}; sleep 20; kill -CONT {{owner}}'"
                 " </dev/null >/dev/null 2>&1 &")
    time.sleep(4)  # the agent is stopped by now
    with pytest.raises(CommandTimeout, match="no reply from the guest agent in time"):
        router.check("echo first", timeout=2)
    assert router.check("echo second", timeout=60) == "second\\n"

def test_the_channel_is_in_sync(router):
    for i in range(5):
        assert router.check(f"echo own-{{i}}; echo err-{{i}} >&2") == f"own-{{i}}\\n"
    reply = router.run("printf 'a\\\\0b'; exit 7")
    assert (reply.exit_status, reply.stdout) == (7, b"a\\0b")
"""

SIGKILL = """
import os, signal, threading
from pathlib import Path
PIDS = Path({pids!r})

def test_qemu_is_killed_mid_command(router):
    pid = router.vm.machine.proc.pid
    PIDS.write_text(f"{{pid}}\\n")
    threading.Timer(3, os.kill, (pid, signal.SIGKILL)).start()
    router.run("sleep 60", timeout=90)

def test_next_vm_boots(router):
    with PIDS.open("a") as pids:
        pids.write(f"{{router.vm.machine.proc.pid}}\\n")
    assert router.check("echo up") == "up\\n"
"""


def _run(
    pytester, repo, tmp_path, short_tmp, fault, source: str
) -> tuple[pytest.RunResult, list[int]]:
    """Run ``source`` as an inner pytest on the default cell (one NIC); count what it left."""
    pids = tmp_path / "pids"
    pytester.makepyfile(test_inner=source.format(pids=str(pids)))
    marker = f"ktf-{uuid.uuid4().hex}"
    os.environ["KTF_MARK"] = marker  # inherited by the inner run and all it starts
    try:
        result = pytester.runpytest_subprocess(
            f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
            f"--log-dir={tmp_path / 'logs'}", "--nic=virtio-net-pci", "-p", "no:cacheprovider",
            timeout=900,
        )  # fmt: skip
    finally:
        del os.environ["KTF_MARK"]
    fault.count("orphans", [*wait_gone(marker), *leftovers(short_tmp)])
    qemus = [int(p) for p in pids.read_text().split()] if pids.exists() else []
    return result, qemus


@pytest.fixture
def inner_tmp(short_tmp, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(short_tmp))  # the inner run's VM socket dirs land here
    return short_tmp


def _boots(result: pytest.RunResult) -> int:
    """VMs started in the inner run: booted cold, or restored from the case's saved state."""
    started = (" up in ", " restored from its saved state in ")
    return sum(
        1 for line in result.outlines if ": kernel " in line and any(s in line for s in started)
    )


def test_guest_panic_fails_that_test_and_the_next_gets_a_fresh_vm(
    pytester, repo, tmp_path, inner_tmp, fault
):
    fault.injected("guest kernel panic (sysrq c) mid-test")
    result, qemus = _run(pytester, repo, tmp_path, inner_tmp, fault, PANIC)
    text = result.stdout.str()
    assert fault.clear_message(
        text, r"sysrq: Trigger a crash|Kernel panic", "console log: .*console.log"
    ), text[-3000:]
    result.assert_outcomes(passed=1, failed=1)
    assert "FAILED test_inner.py::test_crashes_the_kernel" in text
    assert len(qemus) == 2 and qemus[0] != qemus[1], qemus
    assert _boots(result) == 2, text[-2000:]
    assert not alive(qemus[0]) and not alive(qemus[1])


def test_a_command_that_never_returns_times_out_and_the_channel_stays_in_sync(
    pytester, repo, tmp_path, inner_tmp, fault
):
    fault.injected("guest command that never returns; an agent that stalls")
    result, _ = _run(pytester, repo, tmp_path, inner_tmp, fault, HANG)
    text = result.stdout.str()
    assert fault.clear_message(
        text, r"guest command killed after 3 s: 'sleep 100000", "fix: pass a larger timeout"
    ), text[-3000:]
    result.assert_outcomes(passed=2, failed=1)
    assert "FAILED test_inner.py::test_a_command_that_never_returns" in text
    # the whole command was killed: the shell did not go on to its next statement
    assert "stdout so far: b''" in text, text[-3000:]
    assert _boots(result) == 1, "a timeout must not cost the VM: " + text[-2000:]


def test_qemu_killed_mid_test_is_named_and_the_next_vm_boots(
    pytester, repo, tmp_path, inner_tmp, fault
):
    fault.injected("QEMU killed with SIGKILL mid-test")
    result, qemus = _run(pytester, repo, tmp_path, inner_tmp, fault, SIGKILL)
    text = result.stdout.str()
    assert fault.clear_message(
        text, "QEMU exited while a command was running", "killed by SIGKILL"
    ), text[-3000:]
    result.assert_outcomes(passed=1, failed=1)
    assert "FAILED test_inner.py::test_qemu_is_killed_mid_command" in text
    assert len(qemus) == 2 and qemus[0] != qemus[1], qemus
    assert not alive(qemus[0]) and not alive(qemus[1])
