"""Conntrack entries as data: parsed from ``/proc/net/nf_conntrack`` and ``conntrack -L``.

Offload claims are read from kernel state, so tests need the entry's flags ([OFFLOAD],
[HW_OFFLOAD], [ASSURED] ...), its TCP state, its timeout and, with accounting on, its
per-direction counters. Both sources are parsed because they differ: /proc prints one status
word (HW_OFFLOAD > OFFLOAD > ASSURED), the tool prints every flag it knows.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import testinfra.host

_FLAG = re.compile(r"^\[([A-Z_]+)\]$")
_L4 = {"tcp", "udp", "udplite", "icmp", "icmpv6", "sctp", "dccp", "gre", "unknown"}


@dataclass(frozen=True)
class Direction:
    """One tuple of an entry: addresses, ports and (with nf_conntrack_acct) counters."""

    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    packets: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class Entry:
    proto: str  # tcp, udp, ...
    timeout: int | None  # seconds left; conntrack -L prints none for offloaded entries
    state: str | None  # TCP state (ESTABLISHED, TIME_WAIT ...), None for stateless protocols
    orig: Direction
    reply: Direction
    flags: frozenset[str]  # OFFLOAD, HW_OFFLOAD, ASSURED, UNREPLIED ...
    family: str | None  # ipv4/ipv6 (only /proc prints it)
    fields: dict[str, str]  # the rest: mark, zone, use, ...
    raw: str

    @property
    def offloaded(self) -> bool:
        return bool(self.flags & {"OFFLOAD", "HW_OFFLOAD"})

    @property
    def hw_offloaded(self) -> bool:
        return "HW_OFFLOAD" in self.flags

    @property
    def packets(self) -> int:
        """Both directions' packet counters (0 without accounting)."""
        return (self.orig.packets or 0) + (self.reply.packets or 0)

    @property
    def bytes(self) -> int:
        return (self.orig.bytes or 0) + (self.reply.bytes or 0)

    def matches(self, proto: str | None = None, dport: int | None = None) -> bool:
        return (proto is None or self.proto == proto) and (
            dport is None or self.orig.dport == dport
        )


def _ip(text: str) -> str:
    """Compressed form: /proc prints IPv6 in full (2001:0db8:0001:...), the tool compressed."""
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text


def _direction(pairs: list[tuple[str, str]]) -> Direction:
    d = dict(pairs)

    def num(key: str) -> int | None:
        return int(d[key]) if key in d else None

    return Direction(
        _ip(d["src"]), _ip(d["dst"]), num("sport"), num("dport"), num("packets"), num("bytes")
    )


def parse_line(line: str) -> Entry:
    """One line of either format; raises ValueError on anything else."""
    words = line.split()
    family = None
    if words and words[0] in ("ipv4", "ipv6"):
        family, words = words[0], words[2:]  # "ipv4 2": family name and number
    if len(words) < 3 or words[0] not in _L4:
        raise ValueError(f"not a conntrack entry: {line!r}")
    proto, rest = words[0], words[2:]
    timeout = int(rest.pop(0)) if rest and rest[0].isdigit() else None
    state = rest.pop(0) if rest and "=" not in rest[0] and not _FLAG.match(rest[0]) else None
    tuples: list[list[tuple[str, str]]] = [[], []]
    flags: set[str] = set()
    fields: dict[str, str] = {}
    side = -1
    for word in rest:
        if m := _FLAG.match(word):
            flags.add(m.group(1))
            continue
        key, _, value = word.partition("=")
        if key == "src":
            side += 1
        if 0 <= side <= 1 and key in ("src", "dst", "sport", "dport", "packets", "bytes"):
            if key in dict(tuples[side]):  # a third src=: not a tuple of ours
                fields[key] = value
            else:
                tuples[side].append((key, value))
        else:
            fields[key] = value
    if side < 1:
        raise ValueError(f"conntrack entry without two tuples: {line!r}")
    return Entry(
        proto, timeout, state, _direction(tuples[0]), _direction(tuples[1]), frozenset(flags),
        family, fields, line.strip(),
    )  # fmt: skip


def parse_table(text: str) -> list[Entry]:
    """Every entry in a listing; summary lines ("N flow entries ...") are skipped."""
    out = []
    for line in text.splitlines():
        try:
            out.append(parse_line(line))
        except ValueError:
            continue
    return out


def proc_entries(host: testinfra.host.Host) -> list[Entry]:
    return parse_table(host.check_output("cat /proc/net/nf_conntrack"))


def tool_entries(host: testinfra.host.Host) -> list[Entry]:
    """``conntrack -L`` for both address families (the tool's default is one family)."""
    out = host.check_output("conntrack -L -f ipv4 2>/dev/null; conntrack -L -f ipv6 2>/dev/null")
    return parse_table(out)


def find(entries: list[Entry], proto: str | None = None, dport: int | None = None) -> list[Entry]:
    return [e for e in entries if e.matches(proto, dport)]


def the_entry(entries: list[Entry], proto: str, dport: int) -> Entry:
    """The single entry of a test flow; a clear error (with the table) if not exactly one."""
    found = find(entries, proto, dport)
    if len(found) != 1:
        table = "\n".join(e.raw for e in entries) or "(empty)"
        raise AssertionError(
            f"expected one {proto} entry to port {dport}, got {len(found)}:\n{table}"
        )
    return found[0]


CONNTRACK_SYSCTLS = "net.netfilter.nf_conntrack_"  # nf_conntrack's own (not the flowtable's)


def sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def has_sysctl(host: testinfra.host.Host, name: str) -> bool:
    return bool(host.file(sysctl_path(name)).exists)


def read_sysctl(host: testinfra.host.Host, name: str) -> str:
    return str(host.check_output(f"cat {sysctl_path(name)}")).strip()


@contextmanager
def sysctls(host: testinfra.host.Host, values: dict[str, int | str]) -> Iterator[dict[str, str]]:
    """Set sysctls for a block, e.g. ``{"net.netfilter.nf_conntrack_acct": 1}``.

    The VM is reused by later tests and its reset does not touch sysctls, so the old values
    are put back even when the block fails. Yields the old values.
    """
    old: dict[str, str] = {}
    if any(n.startswith(CONNTRACK_SYSCTLS) and not has_sysctl(host, n) for n in values):
        # they appear when nf_conntrack loads, which a test run alone may not have had yet
        host.check_output("modprobe nf_conntrack")
    try:
        for name, value in values.items():
            old[name] = read_sysctl(host, name)
            host.check_output(f"echo {value} >{sysctl_path(name)}")
        yield old
    finally:
        for name, value in old.items():
            host.run(f"echo {value} >{sysctl_path(name)}")


def tcp_timeout(host: testinfra.host.Host, state: str) -> int:
    """The conntrack timeout (s) of a TCP state, from its sysctl (TIME_WAIT -> ..._time_wait)."""
    return int(read_sysctl(host, f"net.netfilter.nf_conntrack_tcp_timeout_{state.lower()}"))


def state_report(host: testinfra.host.Host) -> str:
    """Ruleset, conntrack table, flowtable sysctls and port counters: for assertion messages."""
    out = host.run(
        "echo '## nft list ruleset'; nft list ruleset 2>&1; "
        "echo '## /proc/net/nf_conntrack'; cat /proc/net/nf_conntrack 2>&1; "
        "echo '## conntrack -L'; conntrack -L 2>&1; "
        "echo '## sysctl'; sysctl net.netfilter.nf_flowtable_tcp_timeout "
        "net.netfilter.nf_flowtable_udp_timeout net.netfilter.nf_conntrack_acct 2>&1; "
        "echo '## router ports'; ip -s -br link 2>&1; ip -br addr 2>&1; ip route 2>&1"
    )
    return f"\n--- router state ---\n{out.stdout}{out.stderr}"


def wait_entry(
    host: testinfra.host.Host,
    proto: str,
    dport: int,
    predicate: Callable[[Entry | None], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> Entry | None:
    """Poll /proc until the flow's entry (None: gone) satisfies ``predicate``.

    Kernel state changes asynchronously (the flowtable GC runs once a second), so tests wait
    for it with a deadline instead of sleeping a guessed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        entries = proc_entries(host)
        found = find(entries, proto, dport)
        entry = found[0] if len(found) == 1 else None
        if len(found) <= 1 and predicate(entry):
            return entry
        if time.monotonic() > deadline:
            table = "\n".join(e.raw for e in entries) or "(empty)"
            raise AssertionError(f"{proto} port {dport}: no {what} within {timeout} s:\n{table}")
        time.sleep(0.2)


def in_flowtable(entry: Entry | None) -> bool:
    """A :func:`wait_entry` predicate: the entry exists and is offloaded."""
    return entry is not None and entry.offloaded


def in_classic_path(entry: Entry | None) -> bool:
    """A :func:`wait_entry` predicate: the entry exists and conntrack tracks it again."""
    return entry is not None and not entry.offloaded
