"""The lifecycle on a real VM, without pytest's help: what the kernel logs up to a lab's stop
is scanned when it stops (at a case's last test, and when the run ends)."""

from __future__ import annotations

import pytest

from kmodtest.lifecycle.pool import RouterPool
from kmodtest.lifecycle.strategy import State

LATE = "echo '<4>WARNING: CPU: 0 PID: 1 at {}' >/dev/kmsg"


@pytest.fixture
def pool(kmodtest_session, tmp_path):
    """A pool of its own (the session's lab is stopped first: one VM at a time)."""
    kmodtest_session.pool.stop_current()
    own = RouterPool(kmodtest_session.pool.images, tmp_path / "logs", accel="auto")
    yield own
    own.close()


def test_what_the_kernel_logged_before_a_stop_is_that_test_s(pool, case):
    router = pool.acquire(case)
    assert pool.end_test(case) is None  # reset, and a clean window
    router.check(LATE.format("logged-before-the-stop"))  # after the window, before the stop
    problem = pool.finish_case(case)
    assert problem is not None and "logged-before-the-stop" in problem.excerpt
    assert not router.alive and pool.strategy(case).state is State.OFF


def test_what_is_found_when_the_run_ends_is_reported(pool, case):
    router = pool.acquire(case)
    router.check(LATE.format("logged-before-the-end"))
    problem = pool.end_test(case)  # that test's window: the test fails with it
    assert problem is not None and "logged-before-the-end" in problem.excerpt
    router.check(LATE.format("after-the-last-test"))
    problems = pool.close()
    assert len(problems) == 1 and "after-the-last-test" in problems[0]
    assert not router.alive
