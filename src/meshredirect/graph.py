"""Chain diagrams of a ruleset, as Graphviz DOT text (pure: no I/O).

Each hook a connection meets and each chain becomes a box; the rules of a
chain are listed inside its box, one row each, in the rule notation of
:mod:`meshredirect.notation`; each ``jump`` or ``goto`` is an arrow from the rule's
row to the chain it enters (``goto`` dashed). Hooks are listed in netfilter
order, and a hook points at its base chains in priority order (the order in
which the kernel runs them). Chains are grouped in one box per table.

A :class:`Highlight` marks the path of one connection: the chains it
entered, the rules it was tested against and the rules that matched
(:meth:`Highlight.of_trace` takes them from the semantics engine's trace).
Several highlights draw several connections, each in a colour of its own
(``meshredirect graph --trace --follow``: a connection and the follow-up
connections the proxy opens for it).

>>> from meshredirect import Policy, compile_policy
>>> dot = to_dot(compile_policy(Policy()))
>>> dot.splitlines()[0]
'digraph ruleset {'
>>> '"ipv4/nat/ISTIO_OUTPUT":r7:e -> "ipv4/nat/ISTIO_REDIRECT":h:w' in dot
True

``meshredirect graph`` prints this text, or hands it to Graphviz's ``dot``
for an SVG picture.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

import attrs

from meshredirect.ir import Chain, Family, Goto, Hook, Jump, Rule, Ruleset, Table
from meshredirect.notation import describe_rule

__all__ = [
    "ChainRef",
    "Highlight",
    "RuleRef",
    "chain_node",
    "hook_node",
    "jumps",
    "to_dot",
]

#: Netfilter's hooks in the order a packet meets them (PREROUTING and OUTPUT both start a path).
HOOK_ORDER: Final[tuple[Hook, ...]] = (Hook.PREROUTING, Hook.INPUT, Hook.FORWARD, Hook.OUTPUT, Hook.POSTROUTING)

# Colours: plain boxes are black on white; each highlighted path has a palette of its own.
_HEADER_COLOUR: Final = "#e8eaf6"
_HOOK_COLOUR: Final = "#eeeeee"
_MISSING_COLOUR: Final = "#c62828"


@attrs.frozen
class _Palette:
    line: str  # arrows, borders, the path's title
    header: str  # chains and hooks it entered
    matched: str  # rules that matched
    tested: str  # rules tested that did not match


#: One palette per highlighted connection, in order (orange, blue, green, purple; then again).
_PALETTES: Final = (
    _Palette("#e65100", "#ffcc80", "#ffb74d", "#fff3e0"),
    _Palette("#1565c0", "#90caf9", "#64b5f6", "#e3f2fd"),
    _Palette("#2e7d32", "#a5d6a7", "#81c784", "#e8f5e9"),
    _Palette("#6a1b9a", "#ce93d8", "#ba68c8", "#f3e5f5"),
)


@attrs.frozen(kw_only=True)
class ChainRef:
    """One chain of a ruleset: its table's family and name, and its own name."""

    family: Family
    table: str
    chain: str


@attrs.frozen(kw_only=True)
class RuleRef:
    """One rule of a ruleset: its chain and its 0-based index there."""

    family: Family
    table: str
    chain: str
    index: int

    @property
    def chain_ref(self) -> ChainRef:
        return ChainRef(family=self.family, table=self.table, chain=self.chain)


def _frozen_chains(value: Iterable[ChainRef]) -> frozenset[ChainRef]:
    return frozenset(value)


def _frozen_rules(value: Iterable[RuleRef]) -> frozenset[RuleRef]:
    return frozenset(value)


@attrs.frozen(kw_only=True)
class Highlight:
    """The path of one connection through a ruleset, to draw on top of it.

    ``entered``: chains the connection entered; ``tested``: rules it was
    tested against; ``matched``: rules whose matches all held, so that their
    target applied. A matched rule is also a tested one.

    >>> ref = RuleRef(family=Family.IPV4, table="nat", chain="OUTPUT", index=0)
    >>> Highlight(title="app to 10.0.0.1:80", tested=[ref], matched=[ref]).tested == {ref}
    True
    """

    title: str | None = None
    entered: frozenset[ChainRef] = attrs.field(default=frozenset(), converter=_frozen_chains)
    tested: frozenset[RuleRef] = attrs.field(default=frozenset(), converter=_frozen_rules)
    matched: frozenset[RuleRef] = attrs.field(default=frozenset(), converter=_frozen_rules)

    @classmethod
    def of_trace(cls, trace: Iterable[object], *, title: str | None = None) -> Highlight:
        """The path an evaluation's trace (:attr:`meshredirect.semantics.interpreter.Evaluation.trace`) took.

        Every rule visited is tested; those whose matches held are matched (a
        match the engine cannot decide is tested, not matched); every chain a
        rule was visited in, or that ended (its policy applied, or it returned),
        was entered.

        >>> from meshredirect import Policy, compile_policy
        >>> from meshredirect.semantics import evaluate
        >>> from meshredirect.semantics.model import Connection, Environment
        >>> env = Environment.default()
        >>> app = Connection.local(env, dst="93.184.216.34", dport=443)
        >>> path = Highlight.of_trace(evaluate(compile_policy(Policy()), app, env).trace)
        >>> sorted(f"{r.chain} {r.index + 1}" for r in path.matched)
        ['ISTIO_OUTPUT 8', 'ISTIO_REDIRECT 1', 'OUTPUT 1']
        >>> sorted(c.chain for c in path.entered)
        ['ISTIO_OUTPUT', 'ISTIO_REDIRECT', 'OUTPUT']
        """
        from meshredirect.semantics.interpreter import ChainEnd, MatchResult, RuleVisit

        entered: set[ChainRef] = set()
        tested: set[RuleRef] = set()
        matched: set[RuleRef] = set()
        for entry in trace:
            if isinstance(entry, (RuleVisit, ChainEnd)):
                entered.add(ChainRef(family=entry.family, table=entry.table, chain=entry.chain))
            if isinstance(entry, RuleVisit):
                # (a visit counts its rules from 1; a RuleRef from 0, as the diagram's ports do)
                ref = RuleRef(family=entry.family, table=entry.table, chain=entry.chain, index=entry.index - 1)
                tested.add(ref)
                if entry.result is MatchResult.MATCHED:
                    matched.add(ref)
        return cls(title=title, entered=entered, tested=tested, matched=matched)


# ----------------------------------------------------------------------------- DOT


def _quote(identifier: str) -> str:
    return '"' + identifier.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chain_node(family: Family, table: str, chain: str) -> str:
    """The DOT node id of a chain (unquoted).

    >>> chain_node(Family.IPV4, "nat", "OUTPUT")
    'ipv4/nat/OUTPUT'
    """
    return f"{family.value}/{table}/{chain}"


def hook_node(family: Family, hook: Hook) -> str:
    """The DOT node id of a hook of one family (unquoted)."""
    return f"{family.value}/hook/{hook.value}"


def _table_order(table: Table) -> tuple[int, int]:
    priorities = [chain.base.priority for chain in table.chains if chain.base is not None]
    return (min(priorities) if priorities else 1 << 20, 0)


def _family_order(family: Family) -> int:
    return list(Family).index(family)


def _chain_order(chains: tuple[Chain, ...]) -> list[Chain]:
    """Base chains by hook and priority, then user chains in the order they were defined."""
    base = sorted(
        (c for c in chains if c.base is not None),
        key=lambda c: (HOOK_ORDER.index(c.base.hook), c.base.priority) if c.base else (0, 0),
    )
    return base + [c for c in chains if c.base is None]


def _jump_target(rule: Rule) -> tuple[str, str] | None:
    match rule.target:
        case Jump(chain=chain):
            return chain, "jump"
        case Goto(chain=chain):
            return chain, "goto"
        case _:
            return None


class _Writer:
    def __init__(self, ruleset: Ruleset, paths: Sequence[Highlight]) -> None:
        self.ruleset = ruleset
        self.paths = [(path, _PALETTES[index % len(_PALETTES)]) for index, path in enumerate(paths)]
        self.lines: list[str] = []
        self.depth = 0

    def entering(self, ref: ChainRef) -> list[_Palette]:
        return [palette for path, palette in self.paths if ref in path.entered]

    def matching(self, ref: RuleRef) -> list[_Palette]:
        return [palette for path, palette in self.paths if ref in path.matched]

    def title(self) -> str | None:
        titled = [(index, path.title, palette) for index, (path, palette) in enumerate(self.paths, 1) if path.title]
        if len(self.paths) == 1:
            return html.escape(titled[0][1]) if titled else None
        lines = [
            f'<FONT COLOR="{palette.line}">{index}. {html.escape(title)}</FONT>' for index, title, palette in titled
        ]
        return '<BR ALIGN="LEFT"/>'.join(lines) + '<BR ALIGN="LEFT"/>' if lines else None

    def emit(self, text: str) -> None:
        self.lines.append("  " * self.depth + text)

    def graph(self) -> str:
        self.emit("digraph ruleset {")
        self.depth += 1
        self.emit("rankdir=LR;")
        self.emit("newrank=true;")
        self.emit("nodesep=0.25;")
        self.emit("ranksep=0.6;")
        self.emit('graph [fontname="Helvetica", fontsize=11];')
        self.emit('node [shape=plaintext, fontname="Helvetica", fontsize=10];')
        self.emit('edge [fontname="Helvetica", fontsize=9];')
        title = self.title()
        if title:
            self.emit(f"label=<{title}>;")
            self.emit("labelloc=t;")
        # Graphviz stacks top-level clusters bottom-up here: emit the families backwards so IPv4 comes first.
        families = sorted(self.ruleset.families, key=_family_order, reverse=True)
        for family in families:
            self.family(family)
        self.depth -= 1
        self.emit("}")
        return "\n".join(self.lines) + "\n"

    def family(self, family: Family) -> None:
        tables = sorted((t for t in self.ruleset.tables if t.family is family), key=lambda t: (_table_order(t), t.name))
        self.emit(f"subgraph {_quote('cluster_' + family.value)} {{")
        self.depth += 1
        self.emit(f'label=<<B>{family.value}</B>>; style="rounded"; color="#9e9e9e";')
        hooks = [h for h in HOOK_ORDER if any(t.base_chains(h) for t in tables)]
        for hook in hooks:
            self.hook(family, hook, tables)
        if len(hooks) > 1:
            # With rankdir=LR, Graphviz stacks a rank's nodes bottom-up along flat edges: link them backwards.
            chain = " -> ".join(_quote(hook_node(family, h)) for h in reversed(hooks))
            self.emit(f"{{ rank=same; {chain} [style=invis]; }}")
        for table in tables:
            self.table(table)
        for table in tables:
            self.edges(table)
        self.depth -= 1
        self.emit("}")

    def hook(self, family: Family, hook: Hook, tables: list[Table]) -> None:
        bases = sorted(
            ((t, c) for t in tables for c in t.base_chains(hook)),
            key=lambda tc: (tc[1].base.priority if tc[1].base else 0, tc[0].name),
        )
        on_path = [
            palette
            for path, palette in self.paths
            if any(ChainRef(family=family, table=t.name, chain=c.name) in path.entered for t, c in bases)
        ]
        fill = on_path[0].header if on_path else _HOOK_COLOUR
        pen = f', color="{on_path[0].line}", penwidth=2' if on_path else ""
        node = _quote(hook_node(family, hook))
        self.emit(
            f'{node} [shape=box, style="rounded,filled", fillcolor="{fill}"{pen}, '
            f"label=<<B>{hook.value}</B><BR/>{family.value} hook>];"
        )
        for order, (table, chain) in enumerate(bases, start=1):
            assert chain.base is not None
            ref = ChainRef(family=family, table=table.name, chain=chain.name)
            entering = self.entering(ref)
            style = f', color="{_colours(entering)}", penwidth=2.5' if entering else ""
            label = f"{order}. {table.name} ({chain.base.priority})"
            self.emit(
                f"{node} -> {_quote(chain_node(family, table.name, chain.name))}:h:w "
                f'[label="{label}", style=bold{style}];'
            )

    def table(self, table: Table) -> None:
        family = table.family
        self.emit(f"subgraph {_quote(f'cluster_{family.value}_{table.name}')} {{")
        self.depth += 1
        self.emit(f'label=<table <B>{html.escape(table.name)}</B>>; style="rounded,dashed"; color="#bdbdbd";')
        for chain in _chain_order(table.chains):
            self.chain(table, chain)
        for name in self.missing(table):
            node = _quote(chain_node(family, table.name, name))
            self.emit(
                f'{node} [label=<<TABLE BORDER="1" COLOR="{_MISSING_COLOUR}" CELLBORDER="0" CELLPADDING="4">'
                f'<TR><TD PORT="h"><FONT COLOR="{_MISSING_COLOUR}">{html.escape(name)}<BR/>'
                f"(no such chain)</FONT></TD></TR></TABLE>>];"
            )
        self.depth -= 1
        self.emit("}")

    def missing(self, table: Table) -> list[str]:
        """Chains that rules jump to but the table does not hold (rules read from a node can do that)."""
        names: list[str] = []
        for chain in table.chains:
            for rule in chain.rules:
                jump = _jump_target(rule)
                if jump and not table.has_chain(jump[0]) and jump[0] not in names:
                    names.append(jump[0])
        return names

    def chain(self, table: Table, chain: Chain) -> None:
        family = table.family
        ref = ChainRef(family=family, table=table.name, chain=chain.name)
        entering = self.entering(ref)
        header = f"<B>{html.escape(chain.name)}</B>"
        if chain.base is not None:
            base = chain.base
            header += (
                f'<BR ALIGN="LEFT"/><FONT POINT-SIZE="8">{base.hook.value} hook, {base.type.value}, '
                f'priority {base.priority}, policy {base.policy.value}</FONT><BR ALIGN="LEFT"/>'
            )
        rows = [
            f'<TR><TD PORT="h" ALIGN="LEFT" BGCOLOR="{entering[0].header if entering else _HEADER_COLOUR}">'
            f"{header}</TD></TR>"
        ]
        for index, rule in enumerate(chain.rules):
            rule_ref = RuleRef(family=family, table=table.name, chain=chain.name, index=index)
            rows.append(
                f'<TR><TD PORT="r{index}" ALIGN="LEFT"{self.row_colour(rule_ref)}>'
                f"{html.escape(f'{index + 1}. {describe_rule(rule)}')}{self.row_tags(rule_ref)}</TD></TR>"
            )
        if not chain.rules:
            rows.append('<TR><TD ALIGN="LEFT"><I>no rules</I></TD></TR>')
        border = f' COLOR="{entering[0].line}"' if entering else ""
        self.emit(
            f"{_quote(chain_node(family, table.name, chain.name))} "
            f'[label=<<TABLE BORDER="1"{border} CELLBORDER="0" CELLSPACING="0" CELLPADDING="3">'
            + "".join(rows)
            + "</TABLE>>];"
        )

    def row_colour(self, ref: RuleRef) -> str:
        """The first path that matched the rule colours its row, else the first that tested it."""
        for path, palette in self.paths:
            if ref in path.matched:
                return f' BGCOLOR="{palette.matched}"'
        for path, palette in self.paths:
            if ref in path.tested:
                return f' BGCOLOR="{palette.tested}"'
        return ""

    def row_tags(self, ref: RuleRef) -> str:
        """With several paths: after the rule, the number of each path that tested it (bold: matched)."""
        if len(self.paths) < 2:
            return ""
        tags = []
        for index, (path, palette) in enumerate(self.paths, 1):
            if ref in path.matched:
                tags.append(f'<FONT COLOR="{palette.line}"><B>[{index}: matched]</B></FONT>')
            elif ref in path.tested:
                tags.append(f'<FONT COLOR="{palette.line}">[{index}]</FONT>')
        return "  " + " ".join(tags) if tags else ""

    def edges(self, table: Table) -> None:
        family = table.family
        for chain in table.chains:
            for index, rule in enumerate(chain.rules):
                jump = _jump_target(rule)
                if jump is None:
                    continue
                target, kind = jump
                ref = RuleRef(family=family, table=table.name, chain=chain.name, index=index)
                attributes = [f'label="{kind}"']
                if kind == "goto":
                    attributes.append("style=dashed")
                matching = self.matching(ref)
                if matching:
                    attributes.append(f'color="{_colours(matching)}", fontcolor="{matching[0].line}", penwidth=2.5')
                self.emit(
                    f"{_quote(chain_node(family, table.name, chain.name))}:r{index}:e -> "
                    f"{_quote(chain_node(family, table.name, target))}:h:w [{', '.join(attributes)}];"
                )


def to_dot(ruleset: Ruleset, *, highlight: Highlight | Sequence[Highlight] | None = None) -> str:
    """The chain diagram of a ruleset as Graphviz DOT text, with highlighted paths (none, one or several).

    With several paths, each has a palette of its own (orange, blue, green,
    purple, in order); a rule's row takes the colour of the first path that matched it,
    else of the first that tested it, and ends with the numbers of the paths
    that tested it (``[2]``) or matched it (``[1: matched]``); an arrow that
    several paths took is drawn in all their colours side by side.

    Node ids are :func:`chain_node` and :func:`hook_node`; the rows of a
    chain's table are ports ``h`` (its header) and ``r0``, ``r1``... (its
    rules), so an arrow leaves the very rule that jumps.

    >>> from meshredirect.ir import Jump, Return, Rule, Chain, Table, iptables_base_chain
    >>> table = Table(family=Family.IPV4, name="nat", chains=(
    ...     Chain(name="OUTPUT", base=iptables_base_chain("nat", Hook.OUTPUT), rules=(Rule(target=Jump(chain="MESH")),)),
    ...     Chain(name="MESH", rules=(Rule(target=Return()),)),
    ... ))
    >>> print("\\n".join(line for line in to_dot(Ruleset(tables=(table,))).splitlines() if "->" in line))
        "ipv4/hook/OUTPUT" -> "ipv4/nat/OUTPUT":h:w [label="1. nat (-100)", style=bold];
        "ipv4/nat/OUTPUT":r0:e -> "ipv4/nat/MESH":h:w [label="jump"];
    """
    paths: Sequence[Highlight] = (
        () if highlight is None else (highlight,) if isinstance(highlight, Highlight) else highlight
    )
    return _Writer(ruleset, paths).graph()


def _colours(palettes: Sequence[_Palette]) -> str:
    """One colour, or several for parallel lines (Graphviz's ``color="a:b"``)."""
    return ":".join(palette.line for palette in palettes)


def jumps(ruleset: Ruleset) -> Iterator[tuple[RuleRef, ChainRef, str]]:
    """Every jump and goto of a ruleset: the rule, the chain it enters and ``"jump"`` or ``"goto"``."""
    for table in ruleset.tables:
        for chain in table.chains:
            for index, rule in enumerate(chain.rules):
                jump = _jump_target(rule)
                if jump is not None:
                    yield (
                        RuleRef(family=table.family, table=table.name, chain=chain.name, index=index),
                        ChainRef(family=table.family, table=table.name, chain=jump[0]),
                        jump[1],
                    )
