"""The mutant generator on C that looks like the flowtable's, without a VM or a kernel tree.

The last test reads the real sources of a cell when they are in the cache (``kmodtest
mutate`` or ``validate`` fetched them once) and checks every mutant of every flowtable file
applies with ``patch`` and keeps the line count.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kmodtest.face.mutate import draw
from kmodtest.prepare.cache import default_cache_dir
from kmodtest.prepare.mutants import (
    DEFAULT_OPERATORS,
    FLOWTABLE_FILES,
    find_mutants,
    parse_errors,
    unreached_functions,
)

FILE = "net/netfilter/nf_flow_table_core.c"
SOURCE = b"""\
// SPDX-License-Identifier: GPL-2.0-only
static void flow_offload_fixup_ct(struct nf_conn *ct)
{
\tstruct flow_offload *flow = container_of(head, struct flow_offload, rcu_head);
\tint i;

\tfor (i = 0; i < 4; i++)
\t\tpr_debug("%d\\n", i);
\tif (ct && test_bit(IPS_OFFLOAD_BIT, &ct->status))
\t\tflow->timeout = nf_flowtable_time_stamp + 30;
\tset_bit(NF_FLOW_TEARDOWN, &flow->flags);
\tflow_offload_teardown(flow,
\t\t\t      ct);
\tnf_ct_put(ct);
#ifdef CONFIG_NF_FLOW_TABLE_PROCFS
\tflow_offload_count(ct);
#endif
}

unsigned int nf_flow_offload_ip_hook(void *priv, struct sk_buff *skb)
{
\tif (skb->len == 0)
\t\treturn NF_DROP;
\treturn NF_ACCEPT;
}

static bool helper(int x)
{
\treturn x != 0;
}

static int only_from_hook(void)
{
\treturn helper(1) ? -EINVAL : 0;
}

static int in_ops(void)
{
\treturn 0;
}

static const struct ops ops = { .fn = in_ops };
"""


def _by_op(mutants, op):
    return [m for m in mutants if m.operator == op]


def test_each_operator_finds_its_sites():
    ms = find_mutants(FILE, SOURCE)
    assert [m.original for m in _by_op(ms, "negate-condition")] == [
        "(ct && test_bit(IPS_OFFLOAD_BIT, &ct->status))",
        "(skb->len == 0)",
    ]
    assert [m.original for m in _by_op(ms, "off-by-one")] == ["<"]
    assert sorted(m.original for m in _by_op(ms, "equality")) == ["!=", "=="]
    assert [m.original for m in _by_op(ms, "logical")] == ["&&"]
    assert [m.original for m in _by_op(ms, "flag-swap")] == ["set_bit"]
    dropped = [m.original for m in _by_op(ms, "drop-call")]
    assert dropped == ["set_bit(NF_FLOW_TEARDOWN, &flow->flags);",
                       "flow_offload_teardown(flow,\n\t\t\t      ct);"]  # fmt: skip
    # the for loop's i++ is an expression of the loop, not a statement: not dropped
    assert [m.original for m in _by_op(ms, "drop-assign")] == [
        "flow->timeout = nf_flowtable_time_stamp + 30;"
    ]
    values = {(m.function, m.original, m.replacement) for m in _by_op(ms, "return-value")}
    assert values == {
        ("nf_flow_offload_ip_hook", "NF_DROP", "NF_ACCEPT"),
        ("nf_flow_offload_ip_hook", "NF_ACCEPT", "NF_DROP"),
    }
    early = {m.function: m.replacement for m in _by_op(ms, "early-return")}
    assert early == {
        "flow_offload_fixup_ct": "return; ",
        "nf_flow_offload_ip_hook": "return NF_ACCEPT; ",
    }


def test_logging_release_and_conditional_code_are_left_alone():
    ms = find_mutants(FILE, SOURCE)
    texts = " ".join(m.original for m in ms)
    assert "pr_debug" not in texts  # only a log line
    assert "nf_ct_put" not in texts  # a release: the debug cell's business
    assert "flow_offload_count" not in texts  # under #ifdef: may not be built
    with_release = find_mutants(FILE, SOURCE, [*DEFAULT_OPERATORS, "drop-release"])
    assert [m.original for m in _by_op(with_release, "drop-release")] == ["nf_ct_put(ct);"]


def test_statement_with_parse_error_is_skipped():
    assert parse_errors(SOURCE) > 0  # container_of(..., struct flow_offload, ...)
    assert not any("container_of" in m.original for m in find_mutants(FILE, SOURCE))


def test_mutants_keep_the_line_count_and_apply_with_patch(tmp_path):
    patch_tool = shutil.which("patch")
    if patch_tool is None:
        pytest.skip("the patch tool is not installed (apt-get install patch)")
    for m in find_mutants(FILE, SOURCE):
        mutated = m.mutated(SOURCE)
        assert mutated.count(b"\n") == SOURCE.count(b"\n"), m.id
        tree = tmp_path / m.id
        (tree / "net/netfilter").mkdir(parents=True)
        (tree / FILE).write_bytes(SOURCE)
        (tree / "m.patch").write_text(m.patch(SOURCE))
        subprocess.run([patch_tool, "-p1", "-s", "-i", "m.patch"], cwd=tree, check=True)
        assert (tree / FILE).read_bytes() == mutated, m.id


def test_draw_is_seeded_and_a_longer_draw_extends_a_shorter_one():
    ms = find_mutants(FILE, SOURCE)
    assert draw(ms, 7) == draw(ms, 7)
    assert draw(ms, 7) != draw(ms, 8)
    assert sorted(m.id for m in draw(ms, 7)) == sorted(m.id for m in ms)


def test_unreached_functions_from_probe_counts_and_callers():
    # only_from_hook: probed, 0 hits, mentioned nowhere else. helper: inlined (not probed),
    # used only by only_from_hook. in_ops: inlined, in an ops table: kept. nf_flow_offload_ip_hook:
    # its out-of-line copy had 0 hits but flow_offload_fixup_ct, which ran, mentions it (it may
    # be inlined there): kept
    source = SOURCE + b"static void uses_hook(void) { flow_offload_fixup_ct(0); }\n"
    source = source.replace(b"\tint i;\n", b"\tint i = nf_flow_offload_ip_hook(0, 0);\n")
    probed = {"flow_offload_fixup_ct": 3, "nf_flow_offload_ip_hook": 0, "only_from_hook": 0}
    out = unreached_functions(source, probed)
    assert out == {
        "only_from_hook": "kprobe: 0 hits",
        "helper": "inlined; used only by only_from_hook",
    }


@pytest.mark.parametrize("name", FLOWTABLE_FILES)
def test_real_flowtable_sources_give_applicable_mutants(name, tmp_path):
    trees = sorted((default_cache_dir() / "sources").glob("*/tree/net/netfilter"))
    trees = [t for t in trees if (t / name).is_file()]
    if not trees:
        pytest.skip("no kernel sources in the cache yet (kmodtest validate fetches them)")
    for tree in trees:
        source = (tree / name).read_bytes()
        ms = find_mutants(f"net/netfilter/{name}", source)
        assert ms, f"no mutant in {tree / name}"
        assert len({m.id for m in ms}) == len(ms), "mutant ids are not unique"
        for m in ms:
            assert m.mutated(source).count(b"\n") == source.count(b"\n"), m.id
