"""The console watch finds kernel trouble after its mark, and only there."""

from __future__ import annotations

from kmodtest.guest.health import PATTERNS, ConsoleWatch

SPLAT = """\
[   12.1] ------------[ cut here ]------------
[   12.1] WARNING: CPU: 0 PID: 7 at net/netfilter/nf_flow_table_core.c:123 flow_offload_add
[   12.1] Call Trace:
[   12.1]  <TASK>
"""


def test_problem_after_mark_is_found_with_excerpt(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("[ 1.0] booting\n")
    watch = ConsoleWatch(log)
    watch.mark()
    assert watch.scan() is None
    with open(log, "a") as f:
        f.write(SPLAT)
    problem = watch.scan()
    assert problem is not None
    assert problem.pattern == "WARNING:"
    assert "nf_flow_table_core.c:123" in problem.excerpt and "cut here" in problem.excerpt


def test_problem_before_mark_belongs_to_an_earlier_test(tmp_path):
    log = tmp_path / "console.log"
    log.write_text(SPLAT)
    watch = ConsoleWatch(log)
    watch.mark()
    assert watch.scan() is None


def test_every_pattern_is_detected(tmp_path):
    log = tmp_path / "console.log"
    for pattern in PATTERNS:
        log.write_text(f"[ 3.0] something {pattern} happened\n")
        found = ConsoleWatch(log).scan()
        assert found is not None and found.pattern == pattern


def test_missing_log_is_not_a_problem(tmp_path):
    assert ConsoleWatch(tmp_path / "none.log").scan() is None
