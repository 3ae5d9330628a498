"""Kept-VM records: a pid is the VM's only while its start time matches and it has not exited,
so `ps` forgets VMs that are gone and `stop` never signals a stranger."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.face import kept


def _record(pid: int, lab: Path, name: str = "vm") -> kept.KeptVm:
    return kept.KeptVm(
        id=f"{name}-{pid}", pid=pid, pid_start=kept.start_time(pid) or -1, name=name,
        test="t.py::test", kernel="6.12", agent_socket="", qmp_socket=str(lab / "qmp.sock"),
        lab_dir=str(lab), console_log="", kept_at=time.time(),
    )  # fmt: skip


def test_records_of_exited_processes_are_forgotten_and_their_lab_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMODTEST_STATE", str(tmp_path / "state"))
    alive = subprocess.Popen(["sleep", "300"])
    gone = subprocess.Popen(["true"])
    try:
        while kept.start_time(gone.pid) is not None:  # a zombie until reaped: already exited
            time.sleep(0.01)
        labs = [tmp_path / "lab-alive", tmp_path / "lab-gone"]
        for lab in labs:
            lab.mkdir()
        _record(alive.pid, labs[0], "alive").save()
        record = _record(gone.pid, labs[1], "gone")
        assert record.pid_start == -1
        record.save()
        assert [v.name for v in kept.kept_vms()] == ["alive"]
        assert labs[0].is_dir() and not labs[1].exists()
        assert kept.find("alive").pid == alive.pid
        with pytest.raises(ConfigError, match="no kept VM matches 'gone'"):
            kept.find("gone")
    finally:
        alive.kill()
        alive.wait()
        gone.wait()


def test_a_reused_pid_is_not_the_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMODTEST_STATE", str(tmp_path / "state"))
    (tmp_path / "lab").mkdir()
    record = _record(os.getpid(), tmp_path / "lab")
    stranger = kept.KeptVm(**{**record.__dict__, "pid_start": record.pid_start + 1})
    assert record.alive and not stranger.alive
    stranger.save()
    assert kept.kept_vms() == []  # forgotten, and this process (the "stranger") untouched
