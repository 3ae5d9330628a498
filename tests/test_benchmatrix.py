"""bench-matrix reads outcomes, boot times and test times from pytest's JUnit XML."""

from __future__ import annotations

from pathlib import Path

from kmodtest.face.benchmatrix import compare, parse_junit

XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="vmtests.test_a" name="test_ok[c1]" time="2.5">
  <properties><property name="arch" value="x86_64"/>
  <property name="vm_boot_seconds" value="7.50"/><property name="vm_boot" value="/l/b1"/>
  </properties></testcase>
<testcase classname="vmtests.test_a" name="test_bad[c1]" time="1.0">
  <properties><property name="arch" value="x86_64"/>
  <property name="vm_boot_seconds" value="7.50"/><property name="vm_boot" value="/l/b1"/>
  </properties><failure message="boom"/></testcase>
<testcase classname="vmtests.test_a" name="test_skip[c1]" time="0"><skipped/></testcase>
<testcase classname="vmtests.test_a" name="test_ok[c1]" time="0.5"><error message="td"/>
</testcase>
</testsuite></testsuites>
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.xml"
    path.write_text(text)
    return path


def test_outcomes_boots_and_times(tmp_path):
    r = parse_junit(_write(tmp_path, XML), "serial", 10.0, 1)
    assert r.outcomes == {
        "vmtests.test_a::test_ok[c1]": "error",  # a teardown error outranks the pass
        "vmtests.test_a::test_bad[c1]": "failed",
        "vmtests.test_a::test_skip[c1]": "skipped",
    }
    assert r.boots == {"/l/b1": ("x86_64", 7.5)}  # one VM, counted once
    assert r.seconds["vmtests.test_a::test_ok[c1]"] == 3.0


def test_compare_names_tests_that_differ_or_are_missing(tmp_path):
    a = parse_junit(_write(tmp_path, XML), "serial", 10.0, 1)
    b = parse_junit(_write(tmp_path, XML.replace('<failure message="boom"/>', "")), "-n 2", 6, 1)
    assert compare([a, a]) == []
    assert compare([a, b]) == ["vmtests.test_a::test_bad[c1]"]
    b.outcomes.pop("vmtests.test_a::test_skip[c1]")
    assert "vmtests.test_a::test_skip[c1]" in compare([a, b])
