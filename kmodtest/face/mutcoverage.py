"""pytest plugin: which flowtable functions the suite enters (``kmodtest mutate``'s scope).

Loaded with ``-p kmodtest.face.mutcoverage --function-coverage FILE``. Before the first test
on each VM it arms counting kprobes (:mod:`kmodtest.guest.fncoverage`); after every test it
reads the counts, so a VM replaced mid-run loses nothing. At the end FILE holds
``{"probed": {function: hits}}``: a function listed with 0 hits was visible to the probes and
never entered; a function missing from it was inlined (or is ``notrace``), and only the
generator's call-graph rule can say whether it ran.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtest.guest import fncoverage


class FunctionCoverage:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: dict[str, str] = {}  # event -> C function
        self.per_vm: dict[int, dict[str, int]] = {}  # id(vm) -> latest counts of that VM
        self.armed: set[int] = set()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        vm = getattr(item, "funcargs", {}).get("router")
        if vm is None or vm.host is None:
            yield
            return
        if id(vm) not in self.armed:
            self.events.update(fncoverage.arm(vm.host))
            self.armed.add(id(vm))
        yield
        if vm.alive:
            self.per_vm[id(vm)] = fncoverage.hits(vm.host)
            self.write()

    def totals(self) -> dict[str, int]:
        out = {name: 0 for name in self.events.values()}
        for counts in self.per_vm.values():
            for event, n in counts.items():
                name = self.events.get(event)
                if name is not None:
                    out[name] += n
        return dict(sorted(out.items()))

    def write(self) -> None:
        self.path.write_text(json.dumps({"probed": self.totals()}, indent=1) + "\n")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kmodtest").addoption(
        "--function-coverage",
        default=None,
        metavar="FILE",
        help="count entries into the flowtable modules' functions (kprobes); write JSON here",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("function_coverage")
    if path:
        config.pluginmanager.register(FunctionCoverage(Path(path)), "kmodtest-fncoverage")
