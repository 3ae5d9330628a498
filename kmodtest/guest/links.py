"""Wait for links after anything that may have reset them: the one helper every such step uses.

Emulated NICs report carrier asynchronously. Under QEMU 7.2, e1000e's driver sees the link
1.5-2 s after ``ip link set up`` and after every reset of the port, and an MTU change resets it;
a veth has carrier only once both ends are up. Frames sent before carrier are queued or lost,
and a socket then sees "No route to host" when ARP gives up. So boot, the reset between tests
and every link-changing step of a test (MTU, down/up, routes, new veths) end with the same wait:
every interface that is administratively up, in each namespace, reports carrier (LOWER_UP).
The rule needs no per-NIC knowledge, so it holds for every model, present and future.
"""

from __future__ import annotations

from collections.abc import Sequence

import testinfra.host

LINK_WAIT = 20  # seconds on the guest clock; a healthy link comes up within ~2 s

Namespaces = Sequence[str | None]  # None: the router's own namespace


def _probe(netns: str | None) -> str:
    """Shell: append ``ns/dev`` to ``$down`` for each up interface without carrier in ``netns``.

    The router's namespace is read from sysfs with shell builtins (free); another namespace
    needs one ``ip -o link`` (an exec) per poll.
    """
    if netns is None:
        return (
            "for i in /sys/class/net/*; do read f <$i/flags 2>/dev/null || continue; "
            "[ $((f & 1)) = 1 ] || continue; read c <$i/carrier 2>/dev/null || c=0; "
            '[ "$c" = 1 ] || down="$down ${i##*/}"; done'
        )
    return (
        f'down="$down $(ip -n {netns} -o link show | while read -r _ dev flags _; do '
        'f=",${flags#<}"; f="${f%>},"; case $f in *,UP,*) ;; *) continue;; esac; '
        'case $f in *,LOWER_UP,*) ;; *) dev=${dev%:}; echo "' + netns + '/${dev%@*}";; esac; '
        'done)"'
    )


def wait_script(namespaces: Namespaces, timeout: int = LINK_WAIT) -> str:
    """Shell: block until every up interface in ``namespaces`` has carrier, else exit 1 naming
    the interfaces still without it."""
    probes = "\n  ".join(_probe(ns) for ns in namespaces)
    return (
        "read u _ </proc/uptime; end=$(( ${u%.*} + " + str(timeout) + " ))\n"
        "while :; do\n"
        f'  down=""\n  {probes}\n'
        "  set -- $down; [ $# -gt 0 ] || break\n"
        "  read u _ </proc/uptime\n"
        '  [ ${u%.*} -lt $end ] || { echo "no carrier on $* after '
        f'{timeout} s" >&2; exit 1; }}\n'
        "  sleep 0.1\n"
        "done"
    )


class LinkError(AssertionError):
    """A link step failed in the guest, or a link stayed without carrier (fails the test)."""


def change(
    host: testinfra.host.Host, command: str, namespaces: Namespaces, timeout: int = LINK_WAIT
) -> str:
    """Run a link-changing guest ``command`` (must succeed), then :func:`wait_script`, in one
    round trip. Returns the command's output."""
    script = f"set -e\n{command}\n{wait_script(namespaces, timeout)}"
    result = host.run(script, timeout=timeout + 60)
    if result.rc != 0:
        raise LinkError(
            f"link step failed (exit {result.rc}): {result.stderr.strip()}\n"
            f"command: {command.strip()[:300]}"
        )
    return str(result.stdout)
