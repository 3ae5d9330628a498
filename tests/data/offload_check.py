"""The smallest offload claim the patch-validation demo needs: a forwarded TCP flow gets
[OFFLOAD] in conntrack. Not named test_*.py, so only runs when given by path (as
tests/test_patch_validation.py does); vmtests/ holds the real suite."""

from __future__ import annotations

RULESET = """
table inet kt {
    flowtable ft { hook ingress priority 0; devices = { lan, wan }; }
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip protocol tcp flow add @ft
    }
}
"""


# One guest command holds the whole flow (background jobs end with the command). The server's
# stdin stays open (busybox nc closes the connection at EOF on stdin); the client sends a
# line every 0.3 s for ~3 s while conntrack is polled for [OFFLOAD].
FLOW = """
sleep 6 | ip netns exec server busybox nc -l -p 5555 >/dev/null 2>&1 &
sleep 0.3
(for i in 1 2 3 4 5 6 7 8 9 10; do echo hello; sleep 0.3; done) |
    ip netns exec client busybox nc 198.51.100.2 5555 >/dev/null 2>&1 &
for i in $(seq 30); do grep 'dport=5555' /proc/net/nf_conntrack | grep -q OFFLOAD && break
    sleep 0.1; done
grep 'dport=5555' /proc/net/nf_conntrack
wait
"""


def test_forwarded_tcp_flow_is_offloaded(host):
    host.check_output(f"nft -f - <<'EOF'\n{RULESET}\nEOF")
    out = host.check_output(FLOW)
    assert "dport=5555" in out, "the test flow never reached conntrack"
    assert "[OFFLOAD]" in out, f"the flow was forwarded but never offloaded:\n{out}"
