"""The lab itself: the client reaches the server through the router, both ways, byte for byte.

Runs on every router, the OpenWrt stand-in included (``any_router``): on a two-VM lab it is
what proves the endpoints VM's NICs are cabled to the router's ``lan`` and ``wan``. No
ruleset is loaded, so the router forwards on its classic path.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import traffic

pytestmark = [pytest.mark.per_nic, pytest.mark.any_router]

NBYTES = 200_000


@pytest.mark.parametrize("direction", ["up", "down"])
def test_client_and_server_reach_each_other_through_the_router(router, endpoints, direction):
    result = traffic.transfer(endpoints, router.topology, "tcp", 4, direction, NBYTES)
    assert result.intact, str(result)
    assert router.check("cat /proc/sys/net/ipv4/ip_forward").strip() == "1"
