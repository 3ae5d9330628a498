"""The console watch scans every byte of a console exactly once, window after window."""

from __future__ import annotations

import threading
import time

from kmodtest.guest.health import PATTERNS, ConsoleWatch, sync_command

SPLAT = """\
[   12.1] ------------[ cut here ]------------
[   12.1] WARNING: CPU: 0 PID: 7 at net/netfilter/nf_flow_table_core.c:123 flow_offload_add
[   12.1] Call Trace:
[   12.1]  <TASK>
"""


def append(log, text: str) -> None:
    with open(log, "a") as f:
        f.write(text)


def test_a_problem_is_found_once_in_the_window_it_arrived_in(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("[ 1.0] booting\n")
    watch = ConsoleWatch(log)
    assert watch.scan() is None
    append(log, SPLAT)
    problem = watch.scan()
    assert problem is not None
    assert problem.pattern == "WARNING:"
    assert "nf_flow_table_core.c:123" in problem.excerpt and "cut here" in problem.excerpt
    assert watch.scan() is None, "the same bytes were scanned twice"


def test_nothing_before_the_first_scan_is_skipped(tmp_path):
    log = tmp_path / "console.log"
    log.write_text(SPLAT)  # e.g. output while booting
    assert ConsoleWatch(log).scan() is not None


def test_a_line_still_being_written_belongs_to_the_next_window(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("[ 5.0] ok\n[ 5.1] WARN")
    watch = ConsoleWatch(log)
    assert watch.scan() is None
    append(log, "ING: CPU: 0 PID: 1 at x.c:1\n")
    problem = watch.scan()
    assert problem is not None and "x.c:1" in problem.excerpt


def test_the_final_scan_takes_an_unfinished_last_line(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("[ 7.0] Kernel panic - not syncing: Fatal exception")
    watch = ConsoleWatch(log)
    assert watch.scan() is None
    problem = watch.scan(final=True)
    assert problem is not None and problem.pattern == "Kernel panic"


def test_wait_for_a_sync_line_then_the_window_ends_after_it(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("")
    watch = ConsoleWatch(log)
    command, line = sync_command()
    assert line in command and command.endswith(">/dev/kmsg")
    assert not any(p in line for p in PATTERNS)

    def guest_writes() -> None:
        time.sleep(0.2)
        append(log, f"[ 9.0] {SPLAT.splitlines()[1]}\n[ 9.1] {line}\n")

    writer = threading.Thread(target=guest_writes)
    writer.start()
    assert watch.wait_for(line, timeout=10)
    writer.join()
    problem = watch.scan()
    assert problem is not None and problem.pattern == "WARNING:"
    assert not watch.wait_for("never written", timeout=0.1)


def test_every_pattern_is_detected(tmp_path):
    log = tmp_path / "console.log"
    for pattern in PATTERNS:
        log.write_text(f"[ 3.0] something {pattern} happened\n")
        found = ConsoleWatch(log).scan()
        assert found is not None and found.pattern == pattern


def test_missing_log_is_not_a_problem(tmp_path):
    assert ConsoleWatch(tmp_path / "none.log").scan() is None
