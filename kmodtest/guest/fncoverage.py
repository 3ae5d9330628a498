"""Which flowtable functions does a test run enter? kprobe hit counts, read in the guest.

A kprobe event on every function of the flowtable modules that ftrace can see
(``available_filter_functions``: not inlined, not ``notrace``), named ``MOD:SYM`` so it is
re-armed when a test unloads and reloads the module. ``kprobe_profile`` counts every hit,
whether or not tracing records anything, so ``tracing_on`` stays 0 and nothing fills the ring
buffer. Debian's kernels have kprobe events but not the function profiler.
"""

from __future__ import annotations

import re

import testinfra.host

from kmodtest.flowtable import MODULES

TRACEFS = "/sys/kernel/tracing"
GROUP = "ktcov"

_ARM = """
set -e
T={tracefs}
[ -e $T/kprobe_events ] || mount -t tracefs nodev $T
modprobe -a {modules}
echo 0 > $T/tracing_on
[ -d $T/events/{group} ] && exit 0
grep -E ' \\[({alternation})\\]$' $T/available_filter_functions | sort -u |
while read f m; do
    m=${{m#[}}; m=${{m%]}}
    e=$(echo "$f" | tr . _)
    echo "p:{group}/$e $m:$f" >> $T/kprobe_events 2>/dev/null && echo "$e $f $m" || true
done
echo 1 > $T/events/{group}/enable
"""


def arm(host: testinfra.host.Host, modules: tuple[str, ...] = MODULES) -> dict[str, str]:
    """Put a counting kprobe on every visible function; event name -> C function name."""
    script = _ARM.format(
        tracefs=TRACEFS, modules=" ".join(modules), group=GROUP, alternation="|".join(modules)
    )
    out = host.check_output(script)
    events = {}
    for line in out.splitlines():
        event, symbol, _module = line.split()
        events[event] = c_name(symbol)
    return events


def c_name(symbol: str) -> str:
    """``flow_offload_fill_route.isra.0`` (a GCC clone) -> ``flow_offload_fill_route``."""
    return symbol.split(".")[0]


_PROFILE = re.compile(r"^\s*(\S+)\s+(\d+)\s+(\d+)\s*$")


def hits(host: testinfra.host.Host) -> dict[str, int]:
    """Event name -> hits so far (this boot), for the events of :func:`arm`."""
    text = host.check_output(f"grep -v '^ *$' {TRACEFS}/kprobe_profile || true")
    out = {}
    for line in text.splitlines():
        if m := _PROFILE.match(line):
            out[m[1].split("/")[-1]] = int(m[2])
    return out
