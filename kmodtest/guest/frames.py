"""Raw Ethernet frames into and out of a guest, through socat's packet sockets (the images
have socat, not Python): a frame no socket of the endpoints' stack would build (a PPPoE
session frame without a PPPoE session), and a receiver on the router that gets a frame
only when the router's stack is handed it.

The receiver is bound to one ethertype, which the kernel serves after the ingress hooks, as
it serves its own protocol handlers (the pppoe driver, IP). An ``ETH_P_ALL`` socket, like
tcpdump's or socat's ``INTERFACE``, would see each frame before the hooks, including one a
hook then drops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import testinfra.host

ETH_P_PPP_SES = 0x8864  # PPPoE session stage (RFC 2516)
ETH_ZLEN = 60  # Ethernet's minimum frame without the FCS: shorter ones are padded by most senders
AF_PACKET, SOCK_RAW = 17, 3
WORK = "/tmp/kt-frames"
# 1 on a little-endian guest: a packet socket's protocol number and a sockaddr_ll's ifindex
# are in the guest's byte order (the protocol as htons() gives it)
_LITTLE_ENDIAN = "[ \"$(printf '\\001\\000' | od -An -tu2 | tr -d ' ')\" = 1 ]"


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame without FCS; MAC addresses as ``52:54:00:...``."""
    macs = bytes.fromhex(dst.replace(":", "") + src.replace(":", ""))
    return macs + ethertype.to_bytes(2, "big") + payload


def _in(netns: str | None) -> str:
    return f"ip netns exec {netns} " if netns else ""


def mac_of(host: testinfra.host.Host, netns: str | None, dev: str) -> str:
    """The MAC address ``dev`` has in the guest (a passthrough NIC's is the hardware's own)."""
    return host.check_output(f"{_in(netns)}cat /sys/class/net/{dev}/address").strip()


def send(host: testinfra.host.Host, netns: str | None, dev: str, frame: bytes) -> None:
    """Put ``frame`` on ``dev`` as it is (no padding added here)."""
    octal = "".join(f"\\{b:03o}" for b in frame)
    host.check_output(f"printf '{octal}' | {_in(netns)}socat -u STDIN INTERFACE:{dev}")


@contextmanager
def stack_receiver(
    host: testinfra.host.Host, netns: str | None, dev: str, ethertype: int
) -> Iterator[Callable[[int, float], bytes]]:
    """A packet socket on ``dev`` for ``ethertype`` frames, for a block. Yields
    ``received(nbytes, timeout)``: the bytes received so far, once there are ``nbytes`` of
    them or ``timeout`` seconds have passed."""
    ns = _in(netns)
    work = f"{WORK}/{dev}-{ethertype:04x}"
    # sockaddr_ll after its family: protocol (network order), ifindex, then hatype, pkttype,
    # halen and an 8-byte address, all zero
    host.check_output(
        f"""set -e
rm -rf {work}; mkdir -p {work}
idx=$({ns}cat /sys/class/net/{dev}/ifindex)
if {_LITTLE_ENDIAN}; then
  proto=$(( ({ethertype} >> 8) | (({ethertype} & 255) << 8) ))
  ifx=$(printf '%02x%02x%02x%02x' \\
    $((idx & 255)) $((idx >> 8 & 255)) $((idx >> 16 & 255)) $((idx >> 24)))
else
  proto={ethertype}; ifx=$(printf '%08x' $idx)
fi
{ns}socat -u SOCKET-RECV:{AF_PACKET}:{SOCK_RAW}:$proto:x{ethertype:04x}${{ifx}}{"00" * 12} \\
  OPEN:{work}/frames,creat,trunc </dev/null >{work}/socat.log 2>&1 &
echo $! >{work}/pid
for i in $(seq 50); do
  {ns}grep -q ' {ethertype:04x} ' /proc/net/packet && exit 0
  kill -0 $(cat {work}/pid) 2>/dev/null || break
  sleep 0.1
done
echo "no packet socket for ethertype {ethertype:04x} on {dev}: $(cat {work}/socat.log)" >&2
exit 1
"""
    )

    def received(nbytes: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            dump = host.check_output(f"od -An -v -tx1 {work}/frames")
            data = bytes.fromhex("".join(dump.split()))
            if len(data) >= nbytes or time.monotonic() > deadline:
                return data
            time.sleep(0.2)

    try:
        yield received
    finally:
        host.run(f"kill $(cat {work}/pid) 2>/dev/null; rm -rf {work}")
