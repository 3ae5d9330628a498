"""The ``kmodtest`` command itself: version, help for every subcommand and option, a reader
that leaves early, one-line errors with a fix."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmodtest import __version__
from kmodtest.errors import ConfigError
from kmodtest.face.cli import build_parser
from kmodtest.face.interactive import Put, command_text

KMODTEST = [sys.executable, "-m", "kmodtest.face.cli"]


def test_version() -> None:
    out = subprocess.run([*KMODTEST, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kmodtest {__version__}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"kmodtest {name} has no one-line help"
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in _subcommands(sub).items()})
    return found


def test_every_subcommand_and_option_has_help() -> None:
    subs = _subcommands(build_parser())
    assert {"run", "shell", "ps", "attach", "stop", "repro", "matrix"} <= set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"kmodtest {name} {action.option_strings or action.dest}: no help"


def test_output_cut_short_by_the_reader_ends_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: it always fails
    try:
        out = subprocess.run([*KMODTEST, "matrix"], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert out.stderr.decode() == ""
    assert out.returncode == 141  # 128 + SIGPIPE, like any program the reader left
    # and as users write it (the reader may also leave after the output fit in the pipe)
    pipeline = f"{' '.join(KMODTEST)} matrix | head -c 300 >/dev/null"
    shell = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True)
    assert shell.stderr == ""


def test_run_errors_are_one_line_and_a_fix() -> None:
    out = subprocess.run([*KMODTEST, "run", "--kernel", "no-such-cell", "--", "true"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 125
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert lines[0].startswith("kmodtest: ") and "no-such-cell" in lines[0]
    assert lines[1].strip().startswith("fix: ")


def test_run_command_words() -> None:
    assert command_text(["--", "nft", "--version"]) == "nft --version"
    assert command_text(["--", "echo a; echo b"]) == "echo a; echo b"  # one word: shell text
    assert command_text(["printf", "%s\n", "a b"]) == "printf '%s\n' 'a b'"  # several: quoted


def test_put_needs_an_existing_source_and_an_absolute_guest_path(tmp_path: Path) -> None:
    (tmp_path / "x.sh").write_text("true\n")
    assert Put.parse(f"{tmp_path}/x.sh").dest == "/root/x.sh"
    assert Put.parse(f"{tmp_path}/x.sh:/opt/y").dest == "/opt/y"
    with pytest.raises(ConfigError, match="not an absolute guest path"):
        Put.parse(f"{tmp_path}/x.sh:opt/y")
    with pytest.raises(ConfigError, match="does not exist"):
        Put.parse(f"{tmp_path}/missing")
