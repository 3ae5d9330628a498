"""The ``kmodtest`` command itself: version, help for every subcommand and option, a reader
that leaves early, one-line errors with a fix."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from kmodtest import __version__
from kmodtest.face.cli import build_parser

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
