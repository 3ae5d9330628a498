"""A project outside this repository: ``pip install kmodtest`` and one test file are enough.

The package is built as a wheel and installed into a fresh venv (its third-party dependencies
are reused from this venv through a ``.pth`` line, so nothing is downloaded twice). The project
directory holds nothing but ``test_x.py``: no conftest, no kernels/, no PYTHONPATH. The plugin
arrives through its ``pytest11`` entry point with its fixtures, markers and ini keys, and the
test runs on the default cell of the matrix the package ships.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = ("pyproject.toml", "README.md", "kmodtest", "kernels", "images")  # what the wheel needs

TEST_X = """
def test_the_router_forwards_between_its_ports(router, host):
    assert host.check_output("uname -r") == router.image.kernel_version
    assert host.sysctl("net.ipv4.ip_forward") == 1
    assert host is router.host
"""

# kmodtest_host_fixture = false: testinfra's own `host` (the local machine) is back
TESTINFRA_HOST = """
import os

def test_host_is_testinfra_s_local_host(host):
    assert host.backend.NAME == "local"
    assert host.check_output("uname -r") == os.uname().release
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the kmodtest wheel installed; returns its python."""
    root = tmp_path_factory.mktemp("scratch-venv")
    source, wheels = root / "source", root / "wheels"
    source.mkdir()
    for name in SOURCE:  # a copy: an in-tree build would leave build/ in the checkout
        if (REPO / name).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=skip)
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # the dependencies (pytest, testinfra, pydantic, ...) from this venv; kmodtest from the wheel
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    [wheel] = wheels.glob("kmodtest-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib,
         str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    return python


def _pytest(python: Path, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [python, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip


def test_the_installed_package_is_the_one_used(installed, tmp_path):
    out = subprocess.run(
        [installed, "-c", "import kmodtest.face.plugin as p; print(p.__file__)"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert str(REPO) not in out and "site-packages" in out


def test_a_project_of_one_test_file_runs_on_the_default_cell(installed, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_x.py").write_text(TEST_X)
    result = _pytest(installed, project, f"--log-dir={tmp_path / 'logs'}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 passed" in out
    assert "PASSED test_x.py::test_the_router_forwards_between_its_ports[debian-trixie-amd64]" in (
        out
    )
    assert sorted(p.name for p in project.iterdir()) == ["test_x.py"]


def test_testinfra_s_host_comes_back_when_the_alias_is_off(installed, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_local.py").write_text(TESTINFRA_HOST)
    (project / "pytest.ini").write_text("[pytest]\nkmodtest_host_fixture = false\n")
    result = _pytest(installed, project)
    assert result.returncode == 0, result.stdout + result.stderr

    (project / "pytest.ini").unlink()
    (project / "test_local.py").write_text('testinfra_hosts = ["local://"]\n' + TESTINFRA_HOST)
    result = _pytest(installed, project)  # refused at collection, never silently replaced
    assert result.returncode == pytest.ExitCode.INTERRUPTED
    assert "sets testinfra_hosts, but `host` is kmodtest's router there" in result.stdout
    assert "kmodtest_host_fixture = false" in result.stdout
