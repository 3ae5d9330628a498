"""Which lab a case gets, and the input errors that stop it before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.plans import debian_router, openwrt_router
from kmodtest.prepare.cells import PASSTHROUGH_NIC, load_matrix


class NoBuilds:
    """An image builder that must not be asked: the error comes before any build."""

    def get(self, cell: object, refresh: bool = False) -> None:
        raise AssertionError(f"an image of {cell} was built before the input error")


def _cell(repo: Path, openwrt: bool):
    return next(c for c in load_matrix(repo / "kernels").cells if (c.openwrt is None) != openwrt)


def test_passthrough_in_a_two_vm_lab_fails_before_the_image_build_with_a_fix(repo):
    images = Images(builder=NoBuilds(), two_vm=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not --topology two-vm") as err:
        debian_router(VmCase(_cell(repo, openwrt=False), PASSTHROUGH_NIC), images)
    assert "--topology one-vm" in (err.value.fix or "")


def test_passthrough_on_an_openwrt_router_fails_with_a_fix(repo):
    images = Images(builder=NoBuilds())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="for Debian routers only") as err:
        openwrt_router(VmCase(_cell(repo, openwrt=True), PASSTHROUGH_NIC), images)
    assert "Debian cell" in (err.value.fix or "")
