"""What a VM case boots: which guests, from which images, how each boots, how the network is set.

One plan per kind of kernel source. Debian packages and a user's own kernel boot as a Debian
router holding the client and server namespaces in one VM (or, with ``--topology two-vm``,
next to an endpoints VM that holds them). An OpenWrt release (a disk image
that boots its own way, configured with uci) is another entry in :data:`PLANS`, with a second
node, the endpoints VM, wired to the router's LAN and WAN; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import ConfigError
from kmodtest.guest.boot import Boot, DirectBoot
from kmodtest.guest.openwrt import OpenWrtBoot
from kmodtest.guest.openwrt_net import OpenWrtNetwork
from kmodtest.guest.router import ENDPOINTS, ROUTER, Network, OneVmNetwork, TwoVmNetwork
from kmodtest.guest.topology import Topology
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images
from kmodtest.prepare.cells import PASSTHROUGH_NIC, Cell
from kmodtest.prepare.images import Image
from kmodtest.prepare.openwrt import OpenWrtImage
from kmodtest.run.machine import Nic
from kmodtest.run.passthrough import PassthroughUnavailable, missing_guest_driver


@dataclass(frozen=True)
class NodePlan:
    """One guest of a lab: its role, what it boots and how, and its NICs (given the lab's
    directory, where the dgram sockets linking its guests live)."""

    role: str
    cell: Cell  # arch, machine, cpu, memory, kernel command line
    image: Image | OpenWrtImage
    boot: Boot
    nics: Callable[[Path], tuple[Nic, ...]]


@dataclass(frozen=True)
class LabPlan:
    nodes: tuple[NodePlan, ...]
    network: Network

    @property
    def router(self) -> NodePlan:
        return next(n for n in self.nodes if n.role == ROUTER)


def debian_router(case: VmCase, images: Images) -> LabPlan:
    """The default lab: a Debian router with the client and server namespaces, in one VM."""
    if images.two_vm and case.nic == PASSTHROUGH_NIC:  # before an image build, not after
        raise ConfigError(
            f"{case.cell.id}: passthrough NICs are for one-VM labs, not --topology two-vm",
            "run the passthrough cases with --topology one-vm (the default)",
        )
    image = images.image(case.cell)
    ports = case.cell.spec.passthrough.by_port() if case.cell.spec.passthrough else {}
    if case.nic == PASSTHROUGH_NIC and ports:
        modules = image.manifest["modules"] + image.manifest.get("modules_builtin", [])
        if why := missing_guest_driver(ports, modules):
            raise PassthroughUnavailable(why)
    topology = Topology(case.nic, passthrough=ports)
    if not images.two_vm:
        router = NodePlan(ROUTER, case.cell, image, DirectBoot(), topology.nics)
        return LabPlan((router,), OneVmNetwork(topology))
    router = NodePlan(ROUTER, case.cell, image, DirectBoot(), topology.router_nics)
    return LabPlan((router, _endpoints_node(case, images, topology)), TwoVmNetwork(topology))


def _endpoints_node(case: VmCase, images: Images, topology: Topology) -> NodePlan:
    """The endpoints VM of a two-VM lab: the matrix default cell's Debian image."""
    if images.endpoints is None:
        raise ConfigError(
            f"{case.cell.id}: a two-VM lab needs an endpoints VM, and the matrix has no "
            "default cell to boot it from",
            "mark a Debian cell of the matrix `default: true`",
        )
    cell = images.endpoints
    return NodePlan(ENDPOINTS, cell, images.image(cell), DirectBoot(), topology.endpoint_nics)


def openwrt_router(case: VmCase, images: Images) -> LabPlan:
    """An OpenWrt release (or the stand-in) as the router, booted from its own disk with the
    agent started from its console; the client and server in an endpoints VM (the matrix
    default cell's Debian image), since stock OpenWrt has no network namespaces."""
    if case.nic == PASSTHROUGH_NIC:
        raise ConfigError(
            f"{case.cell.id}: passthrough NICs are for Debian routers only",
            "run the passthrough cases on a Debian cell (`kmodtest cells` lists them)",
        )
    image = images.openwrt_image(case.cell)
    topology = Topology(case.nic)
    boot = OpenWrtBoot(image.packages, images.openwrt_packages)
    router = NodePlan(ROUTER, case.cell, image, boot, topology.router_nics)
    endpoints = _endpoints_node(case, images, topology)
    return LabPlan((router, endpoints), OpenWrtNetwork(topology, stand_in=image.stand_in))


# kernel source kind (kernels/*.yaml `source.kind`) -> the lab its cells boot
PLANS: dict[str, Callable[[VmCase, Images], LabPlan]] = {
    "debian": debian_router,
    "local": debian_router,
    "openwrt": openwrt_router,
}


def plan_for(case: VmCase, images: Images) -> LabPlan:
    return PLANS[case.cell.spec.source.kind](case, images)
