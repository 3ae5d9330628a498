"""Kernel health windows on a real VM: what the reset after a test makes the kernel say is that
test's. (A guest panic mid-test is a fault of tests/test_faults_vm.py.)"""

from __future__ import annotations

# The reset after a test runs `nft flush ruleset` (the flowtable teardown path). This test
# puts a wrapper in front of nft that, once that flush is done, makes the kernel log a
# WARNING: the first line the kernel prints after the test's own body has returned.
PLANT_IN_RESET = r"""
WRAPPER = '''#!/bin/sh
/usr/sbin/nft.real "$@"; rc=$?
[ "$*" != "flush ruleset" ] || echo "<4>WARNING: CPU: 0 PID: 1 at planted-by-reset" >/dev/kmsg
exit $rc
'''

def test_leaves_a_warning_for_the_reset(router):
    router.check("nft add table inet planted")  # nf_tables loaded: the reset flushes
    router.check("mv /usr/sbin/nft /usr/sbin/nft.real")
    router.check(f"cat >/usr/sbin/nft <<'EOF'\n{WRAPPER}EOF\nchmod +x /usr/sbin/nft")
    assert "planted-by-reset" not in router.console_log.read_text()

def test_next_test_gets_a_new_vm(router):
    assert "boot2" in str(router.console_log)
    assert "planted-by-reset" not in router.console_log.read_text()
"""


def test_a_warning_during_the_reset_after_a_test_fails_that_test(pytester, repo, tmp_path):
    pytester.makepyfile(test_inner=PLANT_IN_RESET)
    result = pytester.runpytest_subprocess(
        f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
        f"--log-dir={tmp_path / 'logs'}", "--nic=virtio-net-pci",
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_leaves_a_warning_for_the_reset*",
            "*during this test or the reset after it*",
            "*WARNING: CPU: 0 PID: 1 at planted-by-reset",
            "*kmodtest: console sync*",  # the window closed after the reset
            "*FAILED test_inner.py::test_leaves_a_warning_for_the_reset*",
        ]
    )
    assert "outside any test" not in result.stdout.str()
