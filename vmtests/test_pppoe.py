"""A PPPoE session's control frames pass the flowtable on to the router's PPPoE client.

On DSL and many fibre lines the WAN port carries PPPoE, and that port is in the flowtable
(fw4 lists a zone's physical devices there; a PPPoE interface's is the port under it): the
flowtable's ingress hook sees every PPPoE session frame first. It takes the IPv4 and IPv6
packets of its flows; everything else, LCP echo keepalives and IPCP/IPv6CP renegotiation,
must go on to pppd. Dropped, pppd's LCP echoes would go unanswered and the session would be
torn down and redialled every minute or so (lcp-echo-failure) as soon as flow offloading is
on.

An LCP echo-request is 16 bytes of PPPoE, less than Ethernet's 46-byte minimum payload. Links
whose senders pad deliver it padded to 60 bytes; links that do not (veth, virtio-net here,
802.11) deliver it as it is, shorter than the PPPoE header check in the flowtable's hook asks
for. Both shapes are sent. The router's receiver is a packet socket for PPPoE session frames
on its WAN port (:mod:`kmodtest.guest.frames`), served after the ingress hooks, like the
kernel's pppoe driver.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import frames
from kmodtest.guest.rulesets import router_ruleset

pytestmark = pytest.mark.per_nic

LCP = 0xC021  # PPP protocol number of the Link Control Protocol
SESSION_ID = 0x0BAD
# LCP code 9 (echo-request), identifier 1, length 8, the sender's magic number
LCP_ECHO_REQUEST = bytes([9, 1, 0, 8]) + bytes.fromhex("5a17c0de")
WAIT = 10.0  # seconds for a frame to reach the router's socket


def pppoe_session(dst: str, src: str, ppp_protocol: int, payload: bytes) -> bytes:
    """A PPPoE session-stage frame (RFC 2516: version 1, type 1, code 0) carrying one PPP
    packet."""
    ppp = ppp_protocol.to_bytes(2, "big") + payload
    header = bytes([0x11, 0x00]) + SESSION_ID.to_bytes(2, "big") + len(ppp).to_bytes(2, "big")
    return frames.ethernet(dst, src, frames.ETH_P_PPP_SES, header + ppp)


def test_pppoe_lcp_echo_reaches_the_router_through_a_flowtable_port(router, host, endpoints, nft):
    assert nft.apply(router_ruleset()).rc == 0
    wan = router.topology.segments[1]
    r, e = wan.router, wan.endpoint
    echo = pppoe_session(
        frames.mac_of(host, r.netns, r.name), frames.mac_of(endpoints, e.netns, e.name),
        LCP, LCP_ECHO_REQUEST,
    )  # fmt: skip
    shapes = {
        f"as sent ({len(echo)} bytes)": echo,
        f"padded to {frames.ETH_ZLEN} bytes": echo.ljust(frames.ETH_ZLEN, b"\0"),
    }
    for shape, frame in shapes.items():
        with frames.stack_receiver(host, r.netns, r.name, frames.ETH_P_PPP_SES) as received:
            frames.send(endpoints, e.netns, e.name, frame)
            got = received(len(frame), WAIT)
        what = f"a PPPoE LCP echo-request {shape}, from the server to the router's {r.name} port"
        assert got, f"{what}: the router's PPPoE socket received nothing in {WAIT:.0f} s"
        # a NIC may pad it on the way; padding is zeros after the frame
        assert got[: len(frame)] == frame and not got[len(frame) :].strip(b"\0"), (
            f"{what}: received {got.hex()}, sent {frame.hex()}"
        )
