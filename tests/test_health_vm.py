"""A kernel crash during a test fails that test with the console excerpt, and the next test
gets a freshly booted VM (real kernel, real panic via sysrq)."""

from __future__ import annotations

INNER = """
def test_crashes_the_kernel(router):
    router.run("echo c > /proc/sysrq-trigger", timeout=10)

def test_next_test_gets_a_new_vm(router):
    assert router.check("echo up") == "up\\n"
    assert "boot2" in str(router.console_log)
"""


def test_kernel_crash_fails_the_test_and_replaces_the_vm(pytester, repo, inner_env, tmp_path):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "fixtures.router", f"--kernels-dir={repo / 'kernels'}",
        f"--images-dir={repo / 'images'}", f"--log-dir={tmp_path / 'logs'}",
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*kmodtest console*", "*console log: *console.log*"])
    text = result.stdout.str()
    assert "sysrq: Trigger a crash" in text or "Kernel panic" in text
