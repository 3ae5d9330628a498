"""nftables ruleset text for the router, and reading its counters back.

One builder keeps every offload test on the same, upstream-shaped ruleset (nft_flowtable.sh):
a flowtable on both router ports, a forward chain whose first rule counts every packet that
takes the classic path (comment ``kt-slowpath``), then ``flow add`` for TCP and UDP (and GRE
when a test asks for it), and optionally masquerade on ``wan``. Offloaded packets bypass the
forward hook, so that counter staying far below the transferred traffic is the proof of
offload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from testinfra.backend.base import CommandResult

from kmodtest.guest.nft import Nft
from kmodtest.guest.traffic import FORWARDED

TABLE = "kt"
FLOWTABLE = "ft"
SLOWPATH = "kt-slowpath"  # comment of the rule counting packets that took the forward chain
ROUTER_PORTS = ("lan", "wan")
FLOW_ADD_COMMENT = "kt-flow-add"
INVALID = "kt-ct-invalid"  # comment of the rule counting packets conntrack found invalid
FLOW_PROTOCOLS = ("tcp", "udp")  # what the suite's ``flow add`` rule offloads
# GRE by number: nft parses a protocol name that is no keyword of its grammar through
# getprotobyname(), and the image has no /etc/protocols
GRE = (*FLOW_PROTOCOLS, "47")


@dataclass(frozen=True)
class Counter:
    packets: int
    bytes: int


def router_ruleset(
    flowtable: bool = True,
    nat: bool = False,
    counter: bool = False,
    offload: bool = False,
    flow_add: bool = True,
    devices: tuple[str, ...] = ROUTER_PORTS,
    table: str = TABLE,
    nat_ports: str = "",
    flow_protocols: tuple[str, ...] = FLOW_PROTOCOLS,
) -> str:
    """The router's ``inet`` table as one ``nft -f`` batch.

    ``counter``/``offload`` set the flowtable flags; ``flow_add=False`` keeps the flowtable but
    drops the rule that fills it (the negative control); ``nat`` masquerades out of ``wan``,
    to the source ports ``nat_ports`` (``"20000-20999"``) if given, else keeping them.
    ``flow_protocols`` are the ``meta l4proto`` values ``flow add`` takes (``GRE`` adds GRE to
    TCP and UDP).
    """
    lines = [f"table inet {table} {{"]
    if flowtable:
        lines += [
            f"  flowtable {FLOWTABLE} {{",
            f"    hook ingress priority filter; devices = {{ {', '.join(devices)} }};",
            *(["    flags offload;"] if offload else []),
            *(["    counter;"] if counter else []),  # a statement, not a flag, in nft syntax
            "  }",
        ]
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        # an anonymous counter: a named one needs nft_objref, a module of its own on 6.1
        f'    counter comment "{SLOWPATH}"',
    ]
    if flowtable and flow_add:
        lines.append(
            f"    meta l4proto {{ {', '.join(flow_protocols)} }} flow add @{FLOWTABLE} "
            f'comment "{FLOW_ADD_COMMENT}"'
        )
    # keeps conntrack hooked even without ``flow add`` (so a negative control still shows
    # entries), and counts what conntrack rejects, e.g. after a flow left the flowtable
    lines.append(f'    ct state invalid counter comment "{INVALID}"')
    lines.append("  }")
    if nat:
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            '    oifname "wan" masquerade'
            if not nat_ports
            # a port mapping needs the transport protocol matched first
            else f'    oifname "wan" meta l4proto {{ tcp, udp }} masquerade to :{nat_ports}',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines)


def _find_rule(objs: list[dict[str, Any]], comment: str) -> dict[str, Any]:
    for obj in objs:
        rule = obj.get("rule")
        if rule and rule.get("comment") == comment:
            return dict(rule)
    raise LookupError(f"no rule with comment {comment!r} in the forward chain")


def _rule(nft: Nft, comment: str, table: str) -> dict[str, Any]:
    return _find_rule(nft.json(f"chain inet {table} forward"), comment)  # JSON carries handles


def _counter(rule: dict[str, Any]) -> Counter:
    for expr in rule["expr"]:
        if "counter" in expr:
            return Counter(int(expr["counter"]["packets"]), int(expr["counter"]["bytes"]))
    raise LookupError(f"rule {rule.get('comment')!r} has no counter")


def read_counter(nft: Nft, comment: str = SLOWPATH, table: str = TABLE) -> Counter:
    """The counter of the forward-chain rule with this comment."""
    return _counter(_rule(nft, comment, table))


def flow_add_handle(nft: Nft, table: str = TABLE) -> int:
    """Handle of the ``flow add`` rule, to delete it (with the flowtable) in one batch."""
    return int(_rule(nft, FLOW_ADD_COMMENT, table)["handle"])


def remove_flowtable_batch(nft: Nft, table: str = TABLE) -> str:
    """Delete the ``flow add`` rule and the flowtable atomically (the rule pins the table)."""
    handle = flow_add_handle(nft, table)
    return (
        f"delete rule inet {table} forward handle {handle}\n"
        f"delete flowtable inet {table} {FLOWTABLE}"
    )


OFFLOAD_RATIO = 20  # "far below": the classic path carries at most 1/20 of packets and bytes


@dataclass(frozen=True)
class PathSample:
    """Where the router's packets went, at one moment; subtract two to measure a transfer."""

    slowpath: Counter  # nft forward-chain counter (classic path, per skb after GRO)
    forwarded: int  # ip(6)_forward packets: classic path, independent of nft
    rx_packets: int  # frames received on the router ports (wire level, both directions)
    rx_bytes: int = 0  # their bytes (Ethernet header included)

    def __sub__(self, other: PathSample) -> PathSample:
        return PathSample(
            Counter(
                self.slowpath.packets - other.slowpath.packets,
                self.slowpath.bytes - other.slowpath.bytes,
            ),
            self.forwarded - other.forwarded,
            self.rx_packets - other.rx_packets,
            self.rx_bytes - other.rx_bytes,
        )

    def mostly_classic(self) -> bool:
        """Nearly every byte the router received took the forward chain: >= 90% (the rest is
        Ethernet headers, 1% of a full frame, 21% of a bare ACK)."""
        return self.rx_bytes > 0 and self.slowpath.bytes * 10 >= self.rx_bytes * 9

    def mostly_offloaded(self, payload_bytes: int, by_bytes: bool = True) -> bool:
        """The nft_flowtable.sh criterion, tightened: slow path << traffic, by packets and bytes
        (``by_bytes=False``: packets only, where a test states why)."""
        return (
            self.slowpath.packets * OFFLOAD_RATIO <= self.rx_packets
            and (not by_bytes or self.slowpath.bytes * OFFLOAD_RATIO <= payload_bytes)
            and self.forwarded * OFFLOAD_RATIO <= self.rx_packets
        )

    def __str__(self) -> str:
        return (
            f"forward chain {self.slowpath.packets} pkts/{self.slowpath.bytes} B, "
            f"ip_forward {self.forwarded} pkts, router ports received {self.rx_packets} frames/"
            f"{self.rx_bytes} B"
        )


_SEP = "=kt-sep="


RX_FILES = ("rx_packets", "rx_bytes")


def _sample_script(family: int, ports: tuple[str, ...], table: str) -> str:
    stats = " ".join(
        f"/sys/class/net/{port}/statistics/{name}" for port in ports for name in RX_FILES
    )
    return (
        f"nft -j list chain inet {table} forward; echo {_SEP}; cat {stats}; echo {_SEP}; "
        f"{FORWARDED.command(family)}"
    )


def _parse_sample(out: str, family: int) -> PathSample:
    listing, rx_text, forwarded = out.split(_SEP)[-3:]  # not '#': nft's release names hold one
    counter = _counter(_find_rule(json.loads(listing)["nftables"], SLOWPATH))
    rx = [int(v) for v in rx_text.split()]
    return PathSample(counter, FORWARDED.parse(forwarded, family), sum(rx[0::2]), sum(rx[1::2]))


def sample_paths(
    nft: Nft, family: int, ports: tuple[str, ...] = ROUTER_PORTS, table: str = TABLE
) -> PathSample:
    """One guest round trip (each exec costs tens of ms under TCG, and tests sample often)."""
    return _parse_sample(nft.host.check_output(_sample_script(family, ports, table)), family)


def apply_and_sample(
    nft: Nft, batch: str, family: int, ports: tuple[str, ...] = ROUTER_PORTS, table: str = TABLE
) -> PathSample:
    """Apply an ``nft -f`` batch and sample the paths right after it, in one guest command:
    the sample marks the instant the batch took effect (e.g. a flowtable removed mid-stream).
    The batch must leave a forward chain with the ``kt-slowpath`` counter in ``table``."""
    script = (
        f"set -e\nnft -f - <<'KMODTEST_EOF'\n{batch}\nKMODTEST_EOF\n"
        f"echo {_SEP}\n{_sample_script(family, ports, table)}"
    )
    return _parse_sample(nft.host.check_output(script), family)


def slowpath_meter_ruleset(table: str = TABLE) -> str:
    """Only the forward chain's ``kt-slowpath`` counter: no flowtable, no conntrack rule."""
    return (
        f"table inet {table} {{\n  chain forward {{\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    counter comment "{SLOWPATH}"\n  }}\n}}'
    )


HW_PROBE_TABLE = "kt_hw_probe"


def hw_offload_probe_ruleset(devices: tuple[str, ...] = ROUTER_PORTS, offload: bool = True) -> str:
    """fw4's hardware-offload probe: a throwaway flowtable with ``flags offload``.

    OpenWrt's firewall4 loads this with ``nft -c`` (check only: the kernel builds the batch,
    asks each driver to bind, then aborts) and falls back to a software flowtable on failure.
    """
    flags = " flags offload;" if offload else ""
    devs = ", ".join(devices)
    return (
        f"table inet {HW_PROBE_TABLE} {{\n"
        f"  flowtable ft {{ hook ingress priority 0; devices = {{ {devs} }};{flags} }}\n"
        "}"
    )


def check(nft: Nft, ruleset: str) -> CommandResult:
    """``nft -c -f -``: validate a batch in the kernel without committing it."""
    return nft.host.run(f"nft -c -f - <<'KMODTEST_EOF'\n{ruleset}\nKMODTEST_EOF")
