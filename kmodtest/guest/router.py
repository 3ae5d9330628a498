"""The router a test gets: its guest VM(s), the test network, and how that network is reset.

A :class:`Router` is "something with a Host and ports": the Debian router in one VM, an OpenWrt
router, or a router VM next to an endpoints VM all look the same to a test. Which guest runs
the client and server namespaces is the network's business (:attr:`Router.endpoints`), so
traffic helpers take it from there instead of assuming the router. Booting, reuse, health
windows and teardown are the lifecycle's (:mod:`kmodtest.lifecycle`), not this object's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import testinfra.host

from kmodtest.guest.channel import Reply
from kmodtest.guest.health import HealthProblem
from kmodtest.guest.topology import Topology
from kmodtest.guest.vm import GuestVM
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import Image
from kmodtest.run.machine import MachineSpec

ROUTER = "router"  # the role of the guest that forwards (and whose kernel is under test)
ENDPOINTS = "endpoints"  # the role of a two-VM lab's guest holding the client and server
NETWORK_TIMEOUT = 60.0


class Network(Protocol):
    """How a lab's test network is configured after boot and put back between tests."""

    topology: Topology
    endpoints_role: str  # the guest that runs the client and server

    def setup(self, guests: Mapping[str, GuestVM], timeout: float) -> None:
        """After boot; each guest's set-up may take ``timeout`` s (the boot timeout: a slow
        host that needs a longer boot needs a longer set-up too)."""

    def reset(self, guests: Mapping[str, GuestVM]) -> None: ...


@dataclass(frozen=True)
class OneVmNetwork:
    """Router ports and the client/server namespaces in one guest (the Debian default)."""

    topology: Topology
    endpoints_role: str = ROUTER

    def setup(self, guests: Mapping[str, GuestVM], timeout: float) -> None:
        guests[ROUTER].check(self.topology.setup_script(), timeout=timeout)

    def reset(self, guests: Mapping[str, GuestVM]) -> None:
        """Flush ruleset and conntrack, restore links, addresses and routes."""
        guests[ROUTER].check(self.topology.reset_script(), timeout=NETWORK_TIMEOUT)


@dataclass(frozen=True)
class TwoVmNetwork:
    """A Debian router VM and an endpoints VM cabled to it (``--topology two-vm``): the client
    and server no longer share the router's emulated CPU. Each VM runs its half of the same
    scripts as one VM does."""

    topology: Topology
    endpoints_role: str = ENDPOINTS

    def setup(self, guests: Mapping[str, GuestVM], timeout: float) -> None:
        guests[ROUTER].check(self.topology.setup_script(endpoints=False), timeout=timeout)
        guests[ENDPOINTS].check(self.topology.setup_script(router=False), timeout=timeout)

    def reset(self, guests: Mapping[str, GuestVM]) -> None:
        guests[ROUTER].check(self.topology.reset_script(endpoints=False), timeout=NETWORK_TIMEOUT)
        guests[ENDPOINTS].check(self.topology.reset_script(router=False), timeout=NETWORK_TIMEOUT)


@dataclass
class Router:
    cell: Cell
    image: Image
    network: Network
    guests: dict[str, GuestVM]  # by role: "router", and "endpoints" when it has its own VM
    tainted: str | None = None  # why this router must not be reused

    @property
    def vm(self) -> GuestVM:
        return self.guests[ROUTER]

    @property
    def endpoints(self) -> GuestVM:
        """The guest that runs the client and server: the router itself in one-VM labs."""
        return self.guests[self.network.endpoints_role]

    @property
    def topology(self) -> Topology:
        return self.network.topology

    @property
    def namespaces(self) -> tuple[str | None, ...]:
        """Where the router guest's links must have carrier (:func:`links.change`): its own
        namespace, and the client's and server's when they share its VM."""
        return self.topology.namespaces if self.network.endpoints_role == ROUTER else (None,)

    @property
    def host(self) -> testinfra.host.Host:
        return self.vm.host

    @property
    def spec(self) -> MachineSpec:
        return self.vm.spec

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def console_log(self) -> Path:
        return self.vm.spec.console_log

    @property
    def boot_seconds(self) -> float:
        return max(g.boot_seconds for g in self.guests.values())

    @property
    def alive(self) -> bool:
        return all(g.alive for g in self.guests.values())

    def run(self, command: str, timeout: float = 120.0) -> Reply:
        return self.vm.run(command, timeout)

    def check(self, command: str, timeout: float = 120.0) -> str:
        return self.vm.check(command, timeout)

    def reset(self) -> None:
        self.network.reset(self.guests)

    def kernel_release(self) -> str:
        return self.check("uname -r").strip()

    def health(self, leaks: bool = True) -> HealthProblem | None:
        """The first problem any guest shows since its last scan (``leaks``: kmemleak too)."""
        problems = [g.health(leaks) for g in self.guests.values()]
        return next((p for p in problems if p is not None), None)

    def stop(self) -> HealthProblem | None:
        """Stop every guest; the first problem in what their consoles said last."""
        problems = [g.stop() for g in self.guests.values()]
        return next((p for p in problems if p is not None), None)
