"""Saved VM states on a real VM: the first boot of a case saves it, later VMs restore it."""

from __future__ import annotations

import json
import time

import pytest

from kmodtest.errors import MachineError
from kmodtest.lifecycle.plans import plan_for
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.lifecycle.snapshots import FINGERPRINT, KIND, STATE, Snapshots
from kmodtest.prepare.cache import Cache

BOOT_LOG = "dmesg | head -5"  # with its timestamps: a second boot would differ


@pytest.fixture
def snapshots(tmp_path) -> Snapshots:
    return Snapshots(Cache(tmp_path / "cache"))  # a cold cache of its own


@pytest.fixture
def pool(kmodtest_session, tmp_path, snapshots):
    kmodtest_session.pool.stop_current()  # one VM at a time
    own = RouterPool(
        kmodtest_session.pool.images, tmp_path / "logs", accel="auto", snapshots=snapshots
    )
    yield own
    own.close()


def test_a_case_boots_once_and_later_vms_restore_its_state(pool, case, snapshots):
    cold = pool.acquire(case)
    assert not pool.strategy(case).restored
    entries = list((snapshots.cache.root / KIND).iterdir())
    assert len(entries) == 1 and (entries[0] / STATE).stat().st_size > 0
    meta = json.loads((entries[0] / "snapshot.json").read_text())
    assert meta["verify_restore_seconds"] > 0  # a second QEMU restored it before publishing
    boot_log, network = cold.check(BOOT_LOG), cold.check(FINGERPRINT)
    assert pool.finish_case(case) is None and not cold.alive

    restored = pool.acquire(case)
    assert pool.strategy(case).restored and "restored" in pool.booted[-1]
    assert restored.check(BOOT_LOG) == boot_log  # the same boot, not a new one
    assert restored.check(FINGERPRINT) == network
    assert "Linux version" not in restored.console_log.read_text()  # its console is its own
    guest_now = int(restored.check("date +%s"))
    assert abs(guest_now - time.time()) < 60, "the wall clock was not set after the restore"
    client, server = restored.topology.client.netns, restored.topology.server
    restored.check(f"ip netns exec {client} ping -c 1 -W 10 {server.address()}")
    assert pool.end_test(case) is None  # its reset and health window work as after a boot
    assert pool.finish_case(case) is None


def test_a_state_that_does_not_load_fails_the_case_naming_it(pool, case, snapshots, tmp_path):
    plan = plan_for(case, pool.images)
    node = plan.router
    run = tmp_path / "run"
    accel = pool.accel_for(case.cell).accel
    spec = node.boot.machine_spec(case.name, node.cell, node.image, node.nics(run), run,
                                  tmp_path, accel, False)  # fmt: skip
    key = snapshots.key(spec, plan.network)
    entry = snapshots.cache.path(KIND, key)
    entry.mkdir(parents=True)
    (entry / STATE).write_bytes(b"not a QEMU migration stream")
    with pytest.raises(MachineError) as info:
        pool.acquire(case)
    assert str(entry) in info.value.problem and "--no-snapshots" in (info.value.fix or "")
    assert not pool.strategy(case)._launched  # the QEMU that could not load it is gone
