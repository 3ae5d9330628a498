"""pytest plugin for mutation runs: the fastest tests first, so ``-x`` stops a mutant early.

``kmodtest mutate`` loads it with ``-p kmodtest.face.mutorder --order-durations FILE``; FILE
maps node ids to the seconds each test took in the unmutated control run. Tests the control
run did not time go last, in their collected order. Only order changes: every test of a
mutation run shares one cell and NIC, so one VM still serves them all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kmodtest").addoption(
        "--order-durations",
        default=None,
        metavar="FILE",
        help="JSON {node id: seconds}: run the fastest tests first (kmodtest mutate)",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("order_durations")
    if not path:
        return
    durations: dict[str, float] = json.loads(Path(path).read_text())
    position = {item.nodeid: index for index, item in enumerate(items)}
    items.sort(key=lambda item: (durations.get(item.nodeid, math.inf), position[item.nodeid]))
