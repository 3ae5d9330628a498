"""What reaches the wire, seen from the endpoints: nft counters on an endpoint NIC's ingress,
and nft rewriting what an endpoint sends.

The router's own counters say which path a packet took; only the far end can say what the
router put on the wire (the TTL it left, whether an oversize or expiring packet got through
at all). Each helper is a context manager that adds one nft table in the endpoint's
namespace and removes it afterwards: the reset between tests flushes the router's ruleset,
not the namespaces'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import testinfra.host

METER_TABLE = "kt_meter"
REWRITE_TABLE = "kt_rewrite"
GRO_SIZES = ("gro_max_size", "gro_ipv4_max_size")  # the second exists since Linux 6.3
HOP_FIELD = {4: "ip ttl", 6: "ip6 hoplimit"}  # nft's name of the hop count, per IP family


@contextmanager
def _table(
    host: testinfra.host.Host, netns: str, family: str, name: str, chain: str, rules: list[str]
) -> Iterator[Callable[[], dict[str, int]]]:
    """One nft table with one base chain in ``netns`` for a block; yields a function returning
    the packet counters of its rules, by comment."""
    nft = f"ip netns exec {netns} nft"
    body = "\n".join(f"    {line}" for line in rules)
    host.check_output(
        f"{nft} -f - <<'KMODTEST_EOF'\ntable {family} {name} {{\n  chain c {{\n"
        f"    {chain};\n{body}\n  }}\n}}\nKMODTEST_EOF"
    )

    def counters() -> dict[str, int]:
        listing = json.loads(host.check_output(f"{nft} -j list chain {family} {name} c"))
        out = {}
        for obj in listing["nftables"]:
            rule = obj.get("rule", {})
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    out[rule["comment"]] = int(expr["counter"]["packets"])
        return out

    try:
        yield counters
    finally:
        host.run(f"{nft} delete table {family} {name}")


@contextmanager
def ingress_meter(
    host: testinfra.host.Host, netns: str, dev: str, matches: Mapping[str, str]
) -> Iterator[Callable[[], dict[str, int]]]:
    """Count packets arriving on ``dev`` in ``netns`` per nft match (``{"name": "ip ttl 63"}``),
    in a netdev ingress chain: after GRO, before anything of the endpoint's own stack. Yields
    a function returning ``{name: packets}``."""
    rules = [f'{match} counter comment "{name}"' for name, match in matches.items()]
    chain = f"type filter hook ingress device {dev} priority 0"
    with _table(host, netns, "netdev", METER_TABLE, chain, rules) as counters:
        yield counters


@contextmanager
def oversize_meter(
    host: testinfra.host.Host, netns: str, dev: str, mtu: int
) -> Iterator[Callable[[], int]]:
    """Count frames longer than ``mtu`` (IP bytes) arriving on ``dev`` in ``netns``, e.g. on the
    server: did anything cross a link bigger than its MTU? GRO is stopped on ``dev`` meanwhile
    (its size limits set to 0), so the counter sees each frame as it came off the wire, not a
    merged super-packet; the GRO limits are put back afterwards."""
    ip = f"ip -n {netns}"
    [link] = json.loads(host.check_output(f"{ip} -d -j link show dev {dev}"))
    gro = {k: link[k] for k in GRO_SIZES if k in link}
    if not gro:
        raise AssertionError(f"cannot stop GRO on {netns}/{dev}: ip shows no gro_max_size")
    host.check_output(f"{ip} link set dev {dev} {' '.join(f'{k} 0' for k in gro)}")
    try:
        with ingress_meter(host, netns, dev, {"oversize": f"meta length > {mtu}"}) as counts:
            yield lambda: counts()["oversize"]
    finally:
        host.run(f"{ip} link set dev {dev} {' '.join(f'{k} {v}' for k, v in gro.items())}")


@contextmanager
def rewrite_sent(
    host: testinfra.host.Host, netns: str, match: str, statement: str
) -> Iterator[Callable[[], int]]:
    """While the block runs, the endpoint in ``netns`` applies nft ``statement`` to the packets
    it sends that ``match`` (``"udp dport 5001"``, ``"ip ttl set 1"``): a packet the
    application could not have made, sent down the same flow. Yields a function returning how
    many packets were rewritten."""
    rules = [f'{match} {statement} counter comment "rewritten"']
    chain = "type filter hook output priority 0"
    with _table(host, netns, "inet", REWRITE_TABLE, chain, rules) as counters:
        yield lambda: counters()["rewritten"]


def poll_count(read: Callable[[], int], enough: int, timeout: float = 20.0) -> int:
    """Read a guest counter until it reaches ``enough`` or the deadline passes; the last value.
    (Kernel counters move asynchronously to the command that caused them.)"""
    deadline = time.monotonic() + timeout
    while (value := read()) < enough and time.monotonic() < deadline:
        time.sleep(0.2)
    return value
