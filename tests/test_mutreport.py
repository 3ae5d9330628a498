"""Mutation verdicts and reports without a VM: reading a real pytest JUnit file, the score,
the reviewed list of equivalent survivors, and the JSON and JUnit a CI job reads."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.face.mutreport import (
    CellReport,
    MutantResult,
    apply_equivalents,
    load_equivalents,
    report_json,
    write_junit,
)
from kmodtest.face.mutsuite import read_junit

INNER_TESTS = """
def test_fast():
    pass

def test_assertion():
    assert 1 + 1 == 3, "offload counter did not move"

def test_kernel():
    raise AssertionError(
        "kmodtest: the kernel reported a problem during this test (the VM will be replaced)\\n"
        "kernel reported 'BUG:':\\nBUG: unable to handle page fault")
"""


def _junit(pytester: pytest.Pytester, *args: str) -> Path:
    pytester.makepyfile(test_inner=INNER_TESTS)
    pytester.runpytest_subprocess("--junitxml=junit.xml", "-p", "no:cacheprovider", *args)
    return pytester.path / "junit.xml"


def test_first_failure_is_the_killer_and_its_reason_is_kept(pytester):
    outcome = read_junit(_junit(pytester, "-x"), 3.0)
    assert outcome.status == "failed"
    assert (outcome.passed, outcome.failed) == (1, 1)
    assert outcome.first_failure == "test_inner.py::test_assertion"
    assert "offload counter did not move" in outcome.message


def test_kernel_report_is_a_crash(pytester):
    outcome = read_junit(_junit(pytester, "-k", "kernel"), 3.0)
    assert outcome.status == "crashed"
    assert outcome.first_failure == "test_inner.py::test_kernel"
    assert "BUG:" in outcome.message


def test_missing_junit_is_an_error_not_a_survivor(tmp_path):
    assert read_junit(tmp_path / "none.xml", 1.0).status == "error"


def test_order_plugin_runs_fastest_first(pytester):
    pytester.makepyfile(test_inner="def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n")
    durations = pytester.path / "d.json"
    durations.write_text(json.dumps({"test_inner.py::test_a": 9.0, "test_inner.py::test_b": 1.0}))
    result = pytester.runpytest_subprocess(
        "-p", "kmodtest.face.mutorder", f"--order-durations={durations}", "-v"
    )
    order = [ln.split("::")[1].split()[0] for ln in result.outlines if "PASSED" in ln]
    assert order == ["test_b", "test_a", "test_c"]  # timed ones by time, the rest after


def _result(mid: str, status: str, **kw) -> MutantResult:
    return MutantResult(mid, "net/netfilter/nf_flow_table_ip.c", "nf_flow_offload_ip_hook", 1,
                        "drop-call", f"{mid} change", status, **kw)  # fmt: skip


def _report() -> CellReport:
    r = CellReport("debian-bookworm-amd64", "6.1.0-57-amd64", "linux-source-6.1 6.1.1", 1)
    r.mutants = [
        _result("a", "killed", killer="vmtests/test_offload.py::test_x"),
        _result("b", "crashed", message="kernel reported 'BUG:'"),
        _result("c", "timeout"),
        _result("d", "survived", original="skb->mark = 0;", replacement=";", diff="-x\n+;\n"),
        _result("e", "survived", original="x++;", replacement=";"),
        _result("f", "same-code"),
        _result("g", "no-compile"),
    ]
    return r


def test_score_counts_crashes_and_timeouts_as_detected_and_ignores_discarded():
    assert _report().score() == pytest.approx(3 / 5)


def _reviewed(tmp_path: Path, section: str, original: str, why: str) -> Path:
    """A reviewed list with one drop-call entry of nf_flow_offload_ip_hook on 6.1."""
    listed = tmp_path / "equivalents.yaml"
    listed.write_text(
        f"{section}:\n"
        "  - file: nf_flow_table_ip.c\n"
        "    function: nf_flow_offload_ip_hook\n"
        "    operator: drop-call\n"
        f"    original: '{original}'\n"
        "    replacement: ';'\n"
        "    kernels: ['6.1']\n"
        f"    why: {why}\n"
    )
    return listed


def test_reviewed_equivalent_leaves_the_score_and_names_why(tmp_path):
    listed = _reviewed(tmp_path, "equivalents", "skb->mark = 0;",
                       "the mark is cleared again before transmit")  # fmt: skip
    report = _report()
    apply_equivalents(report, load_equivalents(listed))
    d = next(m for m in report.mutants if m.id == "d")
    assert d.status == "equivalent" and "cleared again" in d.why_equivalent
    assert report.score() == pytest.approx(3 / 4)
    other = _report()
    other.kernel = "6.12.1"  # reviewed on 6.1 only: not applied to another series
    apply_equivalents(other, load_equivalents(listed))
    assert other.score() == pytest.approx(3 / 5)


def test_an_entry_with_a_line_covers_only_the_mutant_of_that_line(tmp_path):
    """`||` occurs several times in one function: the review is for one of them."""
    listed = _reviewed(tmp_path, "equivalents", "||", "that one cannot differ here")
    listed.write_text(listed.read_text() + "    line: 'dev->addr_len != ETH_ALEN'\n")
    report = _report()
    report.mutants = [
        _result(mid, "survived", original="||", replacement=";", diff=f"-{line}\n+x\n")
        for mid, line in [("reviewed", "  dev->addr_len != ETH_ALEN || !valid"),
                          ("other", "  if (!dev || (dev->flags & IFF_LOOPBACK)")]
    ]  # fmt: skip
    apply_equivalents(report, load_equivalents(listed))
    status = {m.id: m.status for m in report.mutants}
    assert status == {"reviewed": "equivalent", "other": "survived"}


def test_an_entry_matches_across_tabs_and_line_breaks(tmp_path):
    """The kernel aligns with tabs and breaks long calls; an entry is written on one line."""
    listed = _reviewed(tmp_path, "equivalents", "bo->extack = extack;", "no driver writes it")
    report = _report()
    report.mutants = [_result("tabbed", "survived", original="bo->extack\t= extack;",
                              replacement=";\n\n")]  # fmt: skip
    apply_equivalents(report, load_equivalents(listed))
    assert report.mutants[0].status == "equivalent"


def test_untestable_survivor_stays_in_the_score_and_junit_with_its_reason(tmp_path):
    listed = _reviewed(tmp_path, "untestable", "x++;",
                       "needs a PPPoE server the image does not have")  # fmt: skip
    report = _report()
    apply_equivalents(report, load_equivalents(listed))
    e = next(m for m in report.mutants if m.id == "e")
    assert e.status == "survived" and "PPPoE server" in e.triage and not e.why_equivalent
    assert report.score() == pytest.approx(3 / 5)  # still a survivor
    write_junit([report], tmp_path / "junit.xml")
    failures = {
        c.get("name"): c.find("failure") for c in ET.parse(tmp_path / "junit.xml").iter("testcase")
    }
    assert failures["e"] is not None and "PPPoE server" in (failures["e"].text or "")


def test_equivalents_file_with_a_typo_names_file_and_line(tmp_path):
    listed = tmp_path / "equivalents.yaml"
    listed.write_text("equivalents:\n  - file: x.c\n    functon: f\n")
    with pytest.raises(ConfigError, match=r"equivalents\.yaml:3"):
        load_equivalents(listed)


def test_junit_makes_survivors_failures_and_discarded_skips(tmp_path):
    write_junit([_report()], tmp_path / "junit.xml")
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("7", "2", "2")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["d", "e"]


def test_json_has_scores_per_cell_and_file():
    data = report_json([_report()])["cells"][0]
    assert data["score"] == pytest.approx(0.6)
    assert data["files"]["net/netfilter/nf_flow_table_ip.c"]["counts"]["survived"] == 2
