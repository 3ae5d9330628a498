"""Single-change mutants of the flowtable sources, found with a real C parser.

tree-sitter's C grammar parses the kernel's own, unpreprocessed files in milliseconds and
confines what it cannot read (``container_of(p, struct x, m)``, an unbraced
``list_for_each_entry``, ``__init``) to small error nodes, so a site is only mutated when its
statement parsed cleanly. pycparser needs preprocessed input and stops at the first GNU
extension of the kernel headers (``__builtin_va_list``, line 31 of 76,000 for
nf_flow_table_core.c), and a mutant of preprocessed code is not a patch a user can read; a
regex mutator cannot tell a condition from a macro argument.

Every mutant keeps the file's line count, so ``__LINE__`` (WARN_ON's bug table) is unchanged
and an object-code comparison sees only the mutation. Mutants are enumerated in source order
and sampled with ``random.Random(seed)``: the same sources and seed give the same mutants.
"""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tree_sitter
import tree_sitter_c

MODULE_DIR = "net/netfilter"
# the sources of kmod-nft-offload's three modules that carry its logic
FLOWTABLE_FILES = (
    "nf_flow_table_core.c",
    "nf_flow_table_ip.c",
    "nf_flow_table_inet.c",
    "nf_flow_table_offload.c",
    "nft_flow_offload.c",
)
SHORT = {
    "nf_flow_table_core.c": "core",
    "nf_flow_table_ip.c": "ip",
    "nf_flow_table_inet.c": "inet",
    "nf_flow_table_offload.c": "offload",
    "nft_flow_offload.c": "nft",
}

# operator -> what bug it stands for
OPERATORS = {
    "negate-condition": "an if/while condition inverted",
    "off-by-one": "a < <= > >= boundary moved by one",
    "equality": "== and != swapped",
    "logical": "&& and || swapped",
    "drop-call": "a call statement removed (a teardown, a refresh, a NAT rewrite ...)",
    "drop-assign": "an assignment or increment removed (a timeout refresh, a counter ...)",
    "early-return": "the function returns before doing anything",
    "flag-swap": "set_bit and clear_bit swapped",
    "return-value": "true/false, NF_ACCEPT/NF_DROP swapped, an error return made 0",
    "drop-release": "a free, put, unlock or get removed (memory and locking bugs)",
}
# drop-release's bugs (leaks, use after free, unbalanced locks) are invisible to a stock kernel:
# they are the debug-kernel cell's business, so the default set leaves them out
DEFAULT_OPERATORS = tuple(op for op in OPERATORS if op != "drop-release")

# calls whose removal changes only logs or debug checks: never mutated
_LOGGING = re.compile(
    r"^(pr_\w+|printk\w*|net_\w+_ratelimited|netdev_(dbg|info|warn|err)\w*|dev_(dbg|info|warn|err)"
    r"\w*|WARN\w*|BUG\w*|BUILD_BUG\w*|lockdep_\w+|might_sleep\w*|trace_\w+|kmemleak_\w+)$"
)
_RELEASE = re.compile(
    r"(free|_put$|^put_|release|destroy|unlock|_lock$|^lock|_lock_|rcu_read|local_bh|preempt_"
    r"|synchronize|_hold$|_get$|^get_|refcount_|_rcu$)"
)
_FLAG_SWAP = {"set_bit": "clear_bit", "clear_bit": "set_bit",
              "__set_bit": "__clear_bit", "__clear_bit": "__set_bit"}  # fmt: skip
_OFF_BY_ONE = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}
_EQUALITY = {"==": "!=", "!=": "=="}
_LOGICAL = {"&&": "||", "||": "&&"}
_RETURN_SWAP = {"true": "false", "false": "true", "NF_ACCEPT": "NF_DROP", "NF_DROP": "NF_ACCEPT"}
_INTEGER_TYPES = re.compile(r"^(unsigned |signed )?(int|long|short|char|u8|u16|u32|u64|s8|s16"
                            r"|s32|s64|__be16|__be32|size_t|ssize_t|enum \w+)$")  # fmt: skip
_CONDITIONAL = ("preproc_if", "preproc_ifdef", "preproc_elif", "preproc_else", "preproc_elifdef")

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_c.language()))


@dataclass(frozen=True)
class Mutant:
    """One change at one place of one file; ``patch()`` is what a user re-runs."""

    file: str  # net/netfilter/nf_flow_table_core.c
    function: str
    line: int  # 1-based
    column: int  # 1-based
    operator: str
    original: str
    replacement: str
    start: int  # byte offsets of ``original`` in the pristine file
    end: int

    @property
    def id(self) -> str:
        short = SHORT.get(Path(self.file).name, Path(self.file).stem)
        return f"{short}-{self.line:04d}-{self.column:02d}-{self.operator}"

    @property
    def location(self) -> str:
        return f"{Path(self.file).name}:{self.line}"

    @property
    def description(self) -> str:
        before, after = _one_line(self.original), _one_line(self.replacement)
        if self.operator == "early-return":
            return f"{self.function}(): `{after.strip()}` first"
        return f"{self.function}(): `{before}` -> `{after}`"

    def mutated(self, pristine: bytes) -> bytes:
        if pristine[self.start : self.end].decode() != self.original:
            raise ValueError(f"{self.id}: the sources do not match the mutant")
        return pristine[: self.start] + self.replacement.encode() + pristine[self.end :]

    def diff(self, pristine: bytes) -> str:
        old = pristine.decode().splitlines(keepends=True)
        new = self.mutated(pristine).decode().splitlines(keepends=True)
        return "".join(difflib.unified_diff(old, new, f"a/{self.file}", f"b/{self.file}", n=3))

    def patch(self, pristine: bytes, header: str = "") -> str:
        """A ``git apply``/``patch -p1`` patch, with what it is in front (both ignore it)."""
        head = f"kmodtest mutant {self.id}: {OPERATORS[self.operator]}\n"
        head += f"{self.location} in {self.description}\n{header}---\n"
        return head + self.diff(pristine)

    def digest(self, pristine: bytes) -> str:
        return hashlib.sha256(self.diff(pristine).encode()).hexdigest()[:16]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text(node: tree_sitter.Node) -> str:
    return node.text.decode() if node.text is not None else ""


def _ancestors(node: tree_sitter.Node) -> Iterator[tree_sitter.Node]:
    parent = node.parent
    while parent is not None:
        yield parent
        parent = parent.parent


def _clean(node: tree_sitter.Node) -> bool:
    """Parsed without error (a macro loop header lacks its ';'), and not in a preprocessor
    conditional block (which the cell's config may not build)."""
    if node.has_error:
        return False
    return not any(a.type in _CONDITIONAL or a.type == "ERROR" for a in _ancestors(node))


def function_name(fn: tree_sitter.Node) -> str:
    decl = fn.child_by_field_name("declarator")
    while decl is not None and decl.type != "function_declarator":
        decl = decl.child_by_field_name("declarator")
    name = decl.child_by_field_name("declarator") if decl is not None else None
    return _text(name) if name is not None else "?"


def _return_value(fn: tree_sitter.Node, name: str) -> str | None:
    """What an early ``return`` gives back in ``fn``; None when there is no neutral value."""
    declarator = fn.child_by_field_name("declarator")
    if declarator is not None and declarator.type == "pointer_declarator":
        return "NULL"
    rtype = fn.child_by_field_name("type")
    text = _one_line(_text(rtype)) if rtype is not None else ""
    if text == "void":
        return ""
    if text == "bool":
        return "false"
    if text == "unsigned int" and name.endswith("_hook"):
        return "NF_ACCEPT"  # a netfilter hook: let the packet through untouched
    if _INTEGER_TYPES.match(text):
        return "0"
    return None


class _Finder:
    """Walks one function body and yields every mutant site in it."""

    def __init__(self, file: str, fn: tree_sitter.Node, operators: tuple[str, ...]) -> None:
        self.file = file
        self.fn = fn
        self.name = function_name(fn)
        self.operators = operators

    def make(self, op: str, node: tree_sitter.Node, replacement: str) -> Mutant:
        return Mutant(
            self.file, self.name, node.start_point.row + 1, node.start_point.column + 1, op,
            _text(node), replacement, node.start_byte, node.end_byte,
        )  # fmt: skip

    def sites(self) -> Iterator[Mutant]:
        body = self.fn.child_by_field_name("body")
        if body is None:
            return
        yield from self._early_return(body)
        stack = [body]
        while stack:
            node = stack.pop()
            stack.extend(reversed(node.children))
            if _clean(node):
                yield from self._at(node)

    def _early_return(self, body: tree_sitter.Node) -> Iterator[Mutant]:
        value = _return_value(self.fn, self.name)
        statements = [c for c in body.named_children if c.type not in ("declaration", "comment")]
        if "early-return" not in self.operators or value is None or not statements:
            return
        first = statements[0]
        if first.type == "return_statement" or not _clean(first):
            return
        ret = f"return {value};" if value else "return;"
        # an insertion: the site is the empty span before the first statement
        yield Mutant(self.file, self.name, first.start_point.row + 1,
                     first.start_point.column + 1, "early-return", "", f"{ret} ",
                     first.start_byte, first.start_byte)  # fmt: skip

    def _at(self, node: tree_sitter.Node) -> Iterator[Mutant]:
        ops, kind = self.operators, node.type
        if kind in ("if_statement", "while_statement") and "negate-condition" in ops:
            cond = node.child_by_field_name("condition")
            if cond is not None and cond.type == "parenthesized_expression":
                inner = _text(cond)[1:-1]
                yield self.make("negate-condition", cond, f"(!({inner}))")
        elif kind == "binary_expression":
            operator = node.child_by_field_name("operator")
            token = _text(operator) if operator is not None else ""
            for op, table in (("off-by-one", _OFF_BY_ONE), ("equality", _EQUALITY),
                              ("logical", _LOGICAL)):  # fmt: skip
                if token in table and op in ops and operator is not None:
                    yield self.make(op, operator, table[token])
        elif kind == "expression_statement":
            yield from self._statement_drop(node)
        elif kind == "call_expression" and "flag-swap" in ops:
            callee = node.child_by_field_name("function")
            if callee is not None and _text(callee) in _FLAG_SWAP:
                yield self.make("flag-swap", callee, _FLAG_SWAP[_text(callee)])
        elif kind == "return_statement" and "return-value" in ops:
            value = node.named_children[0] if node.named_children else None
            if value is None:
                return
            if _text(value) in _RETURN_SWAP:
                yield self.make("return-value", value, _RETURN_SWAP[_text(value)])
            elif re.fullmatch(r"-E[A-Z]+", _text(value).replace(" ", "")):
                yield self.make("return-value", value, "0")

    def _statement_drop(self, node: tree_sitter.Node) -> Iterator[Mutant]:
        expr = node.named_children[0] if node.named_children else None
        if expr is None:
            return
        # keep the line count: the statement's newlines stay, the rest becomes ';'
        empty = ";" + "\n" * _text(node).count("\n")
        if expr.type == "call_expression":
            callee = expr.child_by_field_name("function")
            name = _text(callee) if callee is not None else ""
            if _LOGGING.match(name):
                return
            op = "drop-release" if _RELEASE.search(name) else "drop-call"
            if op in self.operators:
                yield self.make(op, node, empty)
        elif (
            expr.type in ("assignment_expression", "update_expression")
            and "drop-assign" in self.operators
        ):
            yield self.make("drop-assign", node, empty)


def find_mutants(
    file: str, source: bytes, operators: Iterable[str] = DEFAULT_OPERATORS
) -> list[Mutant]:
    """Every mutant of ``source`` (the file at ``file``, relative to the tree), in source order."""
    ops = tuple(operators)
    tree = _PARSER.parse(source)
    out: list[Mutant] = []
    for fn in tree.root_node.children:
        if fn.type == "function_definition":
            out.extend(_Finder(file, fn, ops).sites())
    return sorted(out, key=lambda m: (m.start, m.end, m.operator, m.replacement))


def parse_errors(source: bytes) -> int:
    """How many places tree-sitter could not parse (macro idioms); their statements are skipped."""
    count = 0
    stack = [_PARSER.parse(source).root_node]
    while stack:
        node = stack.pop()
        count += node.type == "ERROR" or node.is_missing
        stack.extend(node.children)
    return count


def functions(source: bytes) -> list[str]:
    tree = _PARSER.parse(source)
    return [function_name(n) for n in tree.root_node.children if n.type == "function_definition"]


def sample(mutants: list[Mutant], seed: int, count: int | None) -> list[Mutant]:
    """``count`` mutants chosen by ``seed`` (all when None), returned in source order."""
    if count is None or count >= len(mutants):
        return list(mutants)
    chosen = set(random.Random(seed).sample(range(len(mutants)), count))
    return [m for i, m in enumerate(mutants) if i in chosen]


_EXPORT = "<EXPORT_SYMBOL>"  # a mention that only says other modules call it


def _references(root: tree_sitter.Node, names: set[str]) -> dict[str, set[str | None]]:
    """name -> the functions whose bodies mention it (None: mentioned at file scope, e.g. in
    an ops table or rhashtable params, where the compiler may still inline it; ``_EXPORT``:
    in ``EXPORT_SYMBOL``, which only other modules use, never inlined)."""
    out: dict[str, set[str | None]] = {n: set() for n in names}
    for top in root.children:
        owner = function_name(top) if top.type == "function_definition" else None
        if top.type == "expression_statement" and _text(top).startswith("EXPORT_SYMBOL"):
            owner = _EXPORT
        stack = [top.child_by_field_name("body") if owner else top]
        while stack:
            node = stack.pop()
            if node is None:
                continue
            if node.type == "identifier" and _text(node) in out and _text(node) != owner:
                out[_text(node)].add(owner)
            stack.extend(node.children)
    return out


def unreached_functions(source: bytes, probed: dict[str, int]) -> dict[str, str]:
    """Functions of ``source`` a run never entered, with how that is known.

    ``probed``: kprobe hit counts of the functions the probes could see. A hit proves a
    function ran. No hit proves only that its out-of-line copy did not: GCC may also have
    inlined it into a caller, so it counts as not entered only when every function of the
    file that mentions it was not entered either, and no initializer at file scope names it
    (a constant ops table or rhashtable params can be inlined through; an ``EXPORT_SYMBOL``
    cannot: other modules call the counted copy). A function the probes could not see (fully
    inlined) needs the same, and at least one mention. Anything else stays in scope.
    """
    root = _PARSER.parse(source).root_node
    names = {function_name(n) for n in root.children if n.type == "function_definition"}
    candidates = {n for n in names if not probed.get(n)}
    refs = _references(root, candidates)
    out: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name in sorted(candidates - out.keys()):
            users = refs[name]
            callers = sorted(u for u in users if u not in (None, _EXPORT))
            if None in users or not all(u in out for u in callers):
                continue
            if name in probed:
                how = "kprobe: 0 hits" + (f"; used only by {', '.join(callers)}" if callers else "")
            elif callers and _EXPORT not in users:
                how = f"inlined; used only by {', '.join(callers)}"
            else:
                continue
            out[name] = how
            changed = True
    return out
