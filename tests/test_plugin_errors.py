"""Bad input fails at once, before any VM, with a message naming the problem and the fix."""

from __future__ import annotations

import pytest

VM_TEST = """
def test_uses_router(router):
    assert router.alive
"""


def run(pytester: pytest.Pytester, repo, *args: str, kernels=None) -> pytest.RunResult:
    pytester.makepyfile(test_vm=VM_TEST)
    kernels_dir = kernels or repo / "kernels"
    return pytester.runpytest_subprocess(
        f"--kernels-dir={kernels_dir}", f"--images-dir={repo / 'images'}", "-rs", *args,
    )  # fmt: skip


def test_unknown_kernel(pytester, repo):
    result = run(pytester, repo, "--kernel", "debian-potato-amd64")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown kernel 'debian-potato-amd64'*"])
    result.stderr.fnmatch_lines(["*use one of: debian-trixie-amd64*"])


def test_unknown_arch(pytester, repo):
    result = run(pytester, repo, "--arch", "sparc")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown arch 'sparc'*", "*fix: use one of: x86_64*"])


def test_malformed_matrix_yaml(pytester, repo, tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "bad.yaml").write_text("cells:\n  - id: x\n   arch: x86_64\n")
    result = run(pytester, repo, kernels=kernels)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad.yaml:3: malformed YAML*", "*fix: edit*bad.yaml*"])


def test_malformed_recipe(pytester, repo, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "debian-router.yaml").write_text("packages: nftables\nmodules: [a\n")
    pytester.makepyfile(test_vm=VM_TEST)
    result = pytester.runpytest_subprocess(
        f"--kernels-dir={repo / 'kernels'}", f"--images-dir={images}"
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*debian-router.yaml:3: malformed YAML*"])


def test_missing_qemu_fails_for_a_named_cell(pytester, repo, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-* anywhere
    result = run(pytester, repo, "--kernel", "debian-trixie-amd64")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*qemu-system-x86_64 is not installed", "*fix: *apt-get install qemu-system-x86*"]
    )


def test_missing_qemu_fails_for_the_default_cell(pytester, repo, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # `pytest vmtests/` on a machine without QEMU
    result = run(pytester, repo)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cell debian-trixie-amd64: qemu-system-x86_64 is not installed*"])


def test_a_run_that_skips_every_vm_test_fails_loudly(pytester, repo, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = run(pytester, repo, "--kernel", "all")  # a broad selection: missing QEMU skips
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 1 and "passed" not in outcomes
    result.stdout.fnmatch_lines(["*SKIPPED*qemu-system-*is not installed*"])
    result.stdout.fnmatch_lines(["*kmodtest: nothing was tested*", "*VM tests were skipped*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_plugin_stays_out_of_non_kmodtest_trees(pytester):
    pytester.makepyfile(test_plain="def test_ok():\n    assert True\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_boot_timeout_must_be_positive_seconds(pytester, repo, value):
    result = run(pytester, repo, f"--boot-timeout={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*--boot-timeout '{value}' is not a positive number of seconds*", "*fix: e.g.*"]
    )
