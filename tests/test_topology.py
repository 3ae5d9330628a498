"""The test network's addresses are chosen so that the rewrites the suite checks change the
packets' checksums: a NAT whose checksum update went missing must break the transfer."""

from __future__ import annotations

import ipaddress

import pytest

from kmodtest.guest.topology import Topology


def ones_complement_sum(address: str) -> int:
    """The address's share of a TCP/UDP pseudo-header checksum: its 16-bit words summed with
    end-around carry."""
    packed = ipaddress.ip_address(address).packed
    total = sum(int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_the_sum_is_the_checksum_arithmetic():
    # the pair the suite used to have: 1 + 2 == 2 + 1, so masquerade left the sum unchanged
    assert ones_complement_sum("2001:db8:1::2") == ones_complement_sum("2001:db8:2::1")
    assert ones_complement_sum("0.0.255.255") == 0xFFFF
    assert ones_complement_sum("255.255.0.1") == 0x0001  # 0xffff + 0x0001, the carry wrapped


@pytest.mark.parametrize("family", [4, 6])
def test_masquerade_changes_the_checksum_sum(family):
    """Masquerade rewrites the client's address to the router's WAN address (and back)."""
    topology = Topology("virtio-net-pci")
    client = topology.client.address(family)
    wan = topology.segments[1].router.address(family)
    assert ones_complement_sum(client) != ones_complement_sum(wan), (client, wan)
