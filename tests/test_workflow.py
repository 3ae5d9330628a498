"""The GitHub Actions workflow lints clean and expands exactly ``kmodtest matrix``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kmodtest.face.cli import main as kmodtest_main
from kmodtest.prepare.cells import LocalSource, load_matrix

WORKFLOW = ".github/workflows/vmtests.yml"
NIGHTLY = ".github/workflows/nightly.yml"


@pytest.mark.parametrize("workflow", [WORKFLOW, NIGHTLY])
def test_actionlint_passes(repo, workflow):
    venv_bin = str(Path(sys.executable).parent)
    actionlint = shutil.which("actionlint", path=venv_bin) or shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (pip install -e '.[dev]' brings it)")
    result = subprocess.run([actionlint, workflow], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nightly_mutates_the_61_and_612_amd64_cells_and_runs_the_debug_cell(repo):
    workflow = yaml.safe_load((repo / NIGHTLY).read_text())
    assert "schedule" in workflow[True]  # PyYAML reads the key `on` as True
    jobs = workflow["jobs"]
    assert jobs["mutate"]["strategy"]["matrix"]["cell"] == [
        "debian-bookworm-amd64",
        "debian-trixie-amd64",
    ]
    known = load_matrix(repo / "kernels").ids()
    assert "debug-trixie-amd64" in known
    mutate = " ".join(step.get("run", "") for step in jobs["mutate"]["steps"])
    assert 'kmodtest mutate --kernel "$CELL"' in mutate and "--min-score" in mutate
    debug = " ".join(step.get("run", "") for step in jobs["debug-cell"]["steps"])
    assert "kernel build --debian-source trixie --debug" in debug
    assert "--kernel debug-trixie-amd64" in debug and "tests/test_debug_cell.py" in debug


def test_matrix_json_lists_every_cell_with_the_fields_the_workflow_uses(repo, capsys):
    assert kmodtest_main(["matrix", f"--kernels-dir={repo / 'kernels'}"]) == 0
    include = json.loads(capsys.readouterr().out)["include"]
    pushed = [c.id for c in load_matrix(repo / "kernels").cells if c.spec.workflow == "vmtests"]
    assert [row["cell"] for row in include] == pushed
    workflow = (repo / WORKFLOW).read_text()
    used = {name for row in include for name in row if f"matrix.{name}" in workflow}
    assert "cell" in used


def test_workflow_expands_the_kmodtest_matrix_output(repo):
    workflow = yaml.safe_load((repo / WORKFLOW).read_text())
    jobs = workflow["jobs"]
    producer = " ".join(step.get("run", "") for step in jobs["matrix"]["steps"])
    assert "kmodtest matrix" in producer
    assert jobs["vmtests"]["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.cells) }}"
    suite = " ".join(step.get("run", "") for step in jobs["vmtests"]["steps"])
    assert "pytest vmtests/" in suite and '--kernel "$CELL"' in suite


def test_ci_selection_is_a_subset_and_runs(repo, capsys):
    assert kmodtest_main(["matrix", "--ci", "--ids", f"--kernels-dir={repo / 'kernels'}"]) == 0
    ci_ids = capsys.readouterr().out.strip().split(",")
    all_ids = load_matrix(repo / "kernels").ids()
    assert ci_ids and set(ci_ids) <= set(all_ids)


def test_workflow_runs_the_newest_openwrt_cells_only_and_fetches_them_first(repo, capsys):
    dirs = f"--kernels-dir={repo / 'kernels'}"
    assert kmodtest_main(["matrix", "--kernel", "all", "--openwrt", "ci", dirs]) == 0
    include = json.loads(capsys.readouterr().out)["include"]
    openwrt = sorted(row["cell"] for row in include if row["openwrt"] == "yes")
    assert openwrt == [
        "openwrt-24.10-armsr-armv8",
        "openwrt-24.10-x86-64",
        "openwrt-25.12-armsr-armv8",
        "openwrt-25.12-x86-64",
    ]
    cells = load_matrix(repo / "kernels").cells
    debian = {c.id for c in cells if c.openwrt is None and c.spec.workflow == "vmtests"}
    assert debian <= {row["cell"] for row in include}  # every pushed Debian cell still runs
    workflow = yaml.safe_load((repo / WORKFLOW).read_text())
    producer = " ".join(step.get("run", "") for step in workflow["jobs"]["matrix"]["steps"])
    assert "--openwrt ci" in producer
    steps = workflow["jobs"]["vmtests"]["steps"]
    names = [step.get("name", "") for step in steps]
    fetch = next(s for s in steps if "kmodtest fetch" in s.get("run", ""))
    assert fetch["if"] == "matrix.openwrt == 'yes'"
    assert steps.index(fetch) < names.index("VM suite")


def test_push_workflow_gets_no_cell_it_cannot_boot_and_the_nightly_runs_the_rest(repo, capsys):
    """A job whose kernel nobody built skips every test, which this project counts as an error:
    a cell with a kernel built at run time (``kind: local``, the debug cell) must be marked
    ``workflow: nightly``, and the nightly workflow must name it."""
    assert kmodtest_main(["matrix", "--ids", f"--kernels-dir={repo / 'kernels'}"]) == 0
    pushed = set(capsys.readouterr().out.strip().split(","))
    cells = load_matrix(repo / "kernels").cells
    local = {c.id for c in cells if isinstance(c.spec.source, LocalSource)}
    assert local, "no kind: local cell in kernels/: the debug cell is gone?"
    assert not pushed & local, f"the push workflow would run cells nobody built: {pushed & local}"
    nightly_runs = " ".join(
        step.get("run", "")
        for job in yaml.safe_load((repo / NIGHTLY).read_text())["jobs"].values()
        for step in job["steps"]
    )
    for cell in cells:
        if cell.spec.workflow == "nightly":
            assert f"--kernel {cell.id}" in nightly_runs, f"{cell.id} is run by no workflow"
