"""Each emulated NIC model as a small record of data, like :mod:`kmodtest.arches` for arches.

Adding a NIC model is adding a record here: cells may then list it (``nics:`` in
``kernels/*.yaml``), the image builder puts its driver into every image, a minimal kernel
(``kmodtest kernel build``) gets its kconfig symbols, and the test network loads its driver and
applies its link options. Nothing else switches on the model name.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmodtest.errors import ConfigError


@dataclass(frozen=True)
class NicModel:
    model: str  # QEMU -device name; the name cells and --nic use
    driver: str  # guest kernel module that drives it
    kconfig: tuple[str, ...]  # CONFIG_ lines a minimal kernel needs for that driver
    # some distribution kernels lack the driver (arm kernels and igb/8139cp): the image builder
    # records it as missing instead of failing, and the NIC's tests fail at `modprobe`
    optional: bool = False
    # ``ip link set`` options every port of this model gets, at setup and on every reset
    link_options: str = ""
    # root-bus slots from one device of this model to the next: igb is an SR-IOV physical
    # function whose 8 virtual functions QEMU puts 16-17 slots above it, so two igbs in
    # neighbouring slots collide ("slot 20 function 0 not available for igbvf")
    pci_slots: int = 1


_INTEL = "CONFIG_NET_VENDOR_INTEL=y"

NICS: dict[str, NicModel] = {
    n.model: n
    for n in (
        NicModel("virtio-net-pci", "virtio_net", ("CONFIG_VIRTIO_NET=m",)),
        NicModel("e1000", "e1000", (_INTEL, "CONFIG_E1000=m")),
        # Measured under QEMU 7.2 (TCG, dgram links): its emulation turns the guest's TSO
        # super-frames into IP fragments on the wire; the router reassembles them and the
        # flowtable never takes fragments, so nearly every byte went the classic path. One
        # segment per send (no TSO) keeps frames whole. Its driver sees carrier 1.5-2 s after
        # the port comes up (and after an MTU change resets it); every model's links are waited
        # for the same way (kmodtest/guest/links.py), so no flag is needed here.
        NicModel(
            "e1000e",
            "e1000e",
            (_INTEL, "CONFIG_E1000E=m"),
            link_options="gso_max_segs 1",
        ),
        NicModel("igb", "igb", (_INTEL, "CONFIG_IGB=m"), optional=True, pci_slots=2),  # QEMU 8.0+
        NicModel(
            "rtl8139", "8139cp", ("CONFIG_NET_VENDOR_REALTEK=y", "CONFIG_8139CP=m"), optional=True
        ),
    )
}


def get_nic(model: str) -> NicModel:
    try:
        return NICS[model]
    except KeyError:
        raise ConfigError(f"unknown NIC {model!r}", f"use one of: {', '.join(NICS)}") from None
