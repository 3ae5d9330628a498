"""What a mutation run found: per mutant, per file and per cell, on the terminal and for CI.

Statuses: ``killed`` (a test failed), ``crashed`` (the kernel reported a problem or the VM
died: killed, and shown apart), ``timeout`` (no verdict in time: counted as detected, as
PIT and Stryker do), ``survived`` (the whole suite passed), ``equivalent`` (a survivor that
the reviewed list ``mutation/equivalents.yaml`` shows cannot change behaviour), and the
discarded ones: ``same-code`` (the modules' object code did not change) and ``no-compile``.
Score = detected / (detected + survived); equivalent and discarded mutants are not in it.
A survivor the same file lists under ``untestable`` (it changes behaviour, but on a setup this
suite cannot build, e.g. PPPoE without a PPPoE server in the image) stays a survivor, in the
score and in the JUnit failures, and carries the reviewed reason (``triage``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kmodtest.prepare.yamlfile import load_model

DETECTED = ("killed", "crashed", "timeout")
DISCARDED = ("same-code", "no-compile")
EQUIVALENTS_FILE = Path("mutation/equivalents.yaml")


@dataclass
class MutantResult:
    id: str
    file: str
    function: str
    line: int
    operator: str
    description: str
    status: str
    killer: str = ""  # node id of the test that failed first
    message: str = ""
    patch: str = ""  # the patch file a user can re-run
    diff: str = ""
    build_seconds: float = 0.0
    suite_seconds: float = 0.0
    boot_seconds: float = 0.0
    why_equivalent: str = ""
    triage: str = ""  # a survivor's reviewed reason why no test here kills it (untestable)
    original: str = ""
    replacement: str = ""


@dataclass
class CellReport:
    cell: str
    kernel: str
    sources: str  # linux-source package and version
    seed: int
    mutants: list[MutantResult] = field(default_factory=list)
    control: list[dict[str, object]] = field(default_factory=list)  # each control run
    candidates: int = 0  # mutants the generator found (before sampling)
    excluded_functions: list[str] = field(default_factory=list)  # never entered by the suite

    def counts(self, file: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.mutants:
            if file is None or m.file == file:
                out[m.status] = out.get(m.status, 0) + 1
        return out

    def score(self, file: str | None = None) -> float | None:
        c = self.counts(file)
        detected = sum(c.get(s, 0) for s in DETECTED)
        total = detected + c.get("survived", 0)
        return detected / total if total else None

    def files(self) -> list[str]:
        return sorted({m.file for m in self.mutants})

    def survivors(self) -> list[MutantResult]:
        return [m for m in self.mutants if m.status == "survived"]


class Equivalent(BaseModel):
    """A reviewed survivor: the change cannot alter what the modules do (and why)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str  # nf_flow_table_core.c
    function: str
    operator: str
    original: str
    replacement: str
    kernels: tuple[str, ...]  # the x.y series it was reviewed on
    why: str
    # for an original of one token (`||`, `<`) that a function has more than once: a piece of
    # the source line reviewed; then only a mutant whose diff removes a line with it matches
    line: str = ""

    def covers(self, m: MutantResult) -> bool:
        removed = (x for x in m.diff.splitlines() if x.startswith("-") and not x.startswith("---"))
        return not self.line or any(self.line in x for x in removed)


class EquivalentList(BaseModel):
    """The reviewed survivors: ``equivalents`` leave the score; ``untestable`` ones (same
    fields; ``why`` names what this suite's images or NICs lack) stay in it, explained."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    equivalents: tuple[Equivalent, ...] = ()
    untestable: tuple[Equivalent, ...] = ()


def load_equivalents(path: Path) -> EquivalentList:
    if not path.is_file():
        return EquivalentList()
    return load_model(path, EquivalentList, "see the schema in kmodtest/face/mutreport.py")


def _words(code: str) -> str:
    """Source text with each run of whitespace as one space: a reviewed entry is written on one
    line, the kernel aligns with tabs and breaks long calls."""
    return " ".join(code.split())


def _reviewed(m: MutantResult, entries: tuple[Equivalent, ...], series: str) -> str | None:
    """The reason of the entry that matches ``m`` (by text, not line), if one does."""
    for e in entries:
        mutant = (Path(m.file).name, m.function, m.operator, _words(m.original),
                  _words(m.replacement))  # fmt: skip
        entry = (e.file, e.function, e.operator, _words(e.original), _words(e.replacement))
        if mutant == entry and series in e.kernels and e.covers(m):
            return e.why.strip()
    return None


def apply_equivalents(report: CellReport, reviewed: EquivalentList) -> None:
    """Mark the survivors the reviewed list explains: equivalent ones leave the score,
    untestable ones stay survivors with their reason."""
    series = ".".join(report.kernel.split(".")[:2])
    for m in report.survivors():
        if (why := _reviewed(m, reviewed.equivalents, series)) is not None:
            m.status, m.why_equivalent = "equivalent", why
        elif (why := _reviewed(m, reviewed.untestable, series)) is not None:
            m.triage = why


def _pct(score: float | None) -> str:
    return "-" if score is None else f"{100 * score:.1f} %"


def print_report(reports: list[CellReport], console: Console) -> None:
    for r in reports:
        table = Table("file", "mutants", "killed", "crashed", "timeout", "survived",
                      "equivalent", "discarded", "score",
                      title=f"kmodtest mutate: {r.cell} ({r.kernel}, seed {r.seed})")  # fmt: skip
        for file in [*r.files(), None]:
            c = r.counts(file)
            name = Path(file).name if file else "[bold]all[/]"
            table.add_row(
                name, str(sum(c.values())), *(str(c.get(s, 0)) for s in
                ("killed", "crashed", "timeout", "survived", "equivalent")),
                str(sum(c.get(s, 0) for s in DISCARDED)), _pct(r.score(file)),
            )  # fmt: skip
        console.print(table)
        ran = [m for m in r.mutants if m.status not in DISCARDED]
        detail = Table("mutant", "change", "status", "test that failed first / why",
                       title=f"{r.cell}: the {len(ran)} mutants the suite ran on")  # fmt: skip
        colors = {"killed": "green", "crashed": "green", "timeout": "yellow",
                  "survived": "red", "equivalent": "blue"}  # fmt: skip
        for m in ran:
            why = m.why_equivalent if m.status == "equivalent" else _short(m.killer)
            if m.triage:
                why = f"untestable here: {m.triage}"
            if m.status == "crashed":
                why += f"\n{m.message.splitlines()[0] if m.message else ''}"
            detail.add_row(m.id, escape(m.description), f"[{colors.get(m.status, 'white')}]"
                           f"{m.status}[/]", escape(why))  # fmt: skip
        console.print(detail)
        for m in r.survivors():
            triaged = " (triaged: untestable here)" if m.triage else ""
            console.print(f"[red]survived[/] {m.id}{triaged} ({m.patch})", highlight=False)
            console.print(escape(m.diff), highlight=False)


def _short(nodeid: str) -> str:
    return nodeid.split("/")[-1] if nodeid else ""


def report_json(reports: list[CellReport]) -> dict[str, object]:
    cells = []
    for r in reports:
        data = dict(r.__dict__)
        data["mutants"] = [dict(m.__dict__) for m in r.mutants]
        data["score"] = r.score()
        data["files"] = {f: {"counts": r.counts(f), "score": r.score(f)} for f in r.files()}
        data["counts"] = r.counts()
        cells.append(data)
    return {"cells": cells}


def write_json(reports: list[CellReport], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_json(reports), indent=2) + "\n")


def write_junit(reports: list[CellReport], path: Path) -> None:
    """One test case per mutant: a survivor is a failure, a discarded mutant a skip."""
    root = ET.Element("testsuites", name="kmodtest mutate")
    for r in reports:
        suite = ET.SubElement(root, "testsuite", name=f"mutate.{r.cell}")
        counts = {"tests": 0, "failures": 0, "skipped": 0}
        for m in r.mutants:
            seconds = f"{m.build_seconds + m.suite_seconds:.1f}"
            classname = f"mutate.{r.cell}.{Path(m.file).stem}"
            case = ET.SubElement(suite, "testcase", classname=classname, name=m.id, time=seconds)
            counts["tests"] += 1
            if m.status == "survived":
                counts["failures"] += 1
                failure = ET.SubElement(case, "failure", message=f"survived: {m.description}")
                failure.text = f"untestable here: {m.triage}\n{m.diff}" if m.triage else m.diff
            elif m.status in DISCARDED or m.status == "equivalent":
                counts["skipped"] += 1
                reason = m.why_equivalent or m.status
                ET.SubElement(case, "skipped", message=f"{m.status}: {reason}"[:500])
            else:
                out = ET.SubElement(case, "system-out")
                out.text = f"{m.status} by {m.killer}\n{m.message}"
        for key, value in counts.items():
            suite.set(key, str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
