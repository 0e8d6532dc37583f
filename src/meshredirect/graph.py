"""Chain diagrams of a ruleset, as Graphviz DOT text (pure: no I/O).

Each hook a connection meets and each chain becomes a box; the rules of a
chain are listed inside its box, one row each, in a compact notation that
belongs to no backend; each ``jump`` or ``goto`` is an arrow from the rule's
row to the chain it enters (``goto`` dashed). Hooks are listed in netfilter
order, and a hook points at its base chains in priority order (the order in
which the kernel runs them). Chains are grouped in one box per table.

A :class:`Highlight` marks the path of one connection: the chains it
entered, the rules it was tested against and the rules that matched.

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
from collections.abc import Iterable, Iterator
from typing import Final, assert_never

import attrs

from meshredirect.ir import (
    FULL_MASK,
    Accept,
    AddressMatch,
    AddressRange,
    AddrTypeMatch,
    Chain,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    ConnmarkSet,
    Continue,
    CtState,
    CtStateMatch,
    CtZone,
    Direction,
    Dnat,
    Drop,
    Family,
    FamilyMatch,
    Goto,
    Hook,
    InterfaceMatch,
    IpSetMatch,
    Jump,
    Log,
    MarkMatch,
    Masquerade,
    Match,
    NatFlag,
    OwnerMatch,
    PortMatch,
    ProtocolMatch,
    Redirect,
    Reject,
    Return,
    Rule,
    Ruleset,
    SetMark,
    Snat,
    StatisticMatch,
    Table,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.values import AddressSet, IntervalSet, PortSet

__all__ = [
    "ChainRef",
    "Highlight",
    "RuleRef",
    "chain_node",
    "describe_match",
    "describe_rule",
    "describe_target",
    "hook_node",
    "jumps",
    "to_dot",
]

#: Members of an address, port or id set shown in a rule before the rest is summed up as "N more".
MAX_SET_MEMBERS: Final = 4
#: Netfilter's hooks in the order a packet meets them (PREROUTING and OUTPUT both start a path).
HOOK_ORDER: Final[tuple[Hook, ...]] = (Hook.PREROUTING, Hook.INPUT, Hook.FORWARD, Hook.OUTPUT, Hook.POSTROUTING)

# Colours: plain boxes are black on white; the highlighted path is orange.
_HEADER_COLOUR: Final = "#e8eaf6"
_HOOK_COLOUR: Final = "#eeeeee"
_PATH_COLOUR: Final = "#e65100"
_PATH_HEADER_COLOUR: Final = "#ffcc80"
_MATCHED_COLOUR: Final = "#ffb74d"
_VISITED_COLOUR: Final = "#fff3e0"
_MISSING_COLOUR: Final = "#c62828"


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


# ----------------------------------------------------------------------------- rule notation


def _members(values: Iterable[str], count: int) -> str:
    shown = []
    for index, value in enumerate(values):
        if index == MAX_SET_MEMBERS:
            shown.append(f"… {count - MAX_SET_MEMBERS} more")
            break
        shown.append(value)
    return shown[0] if count == 1 else "{" + ", ".join(shown) + "}"


def _addresses(addresses: AddressSet) -> str:
    return _members((str(network) for network in addresses), len(addresses.networks))


def _intervals(values: IntervalSet) -> str:
    texts = (str(low) if low == high else f"{low}-{high}" for low, high in values.intervals)
    return _members(texts, len(values.intervals))


def _op(negate: bool) -> str:
    return " != " if negate else " "


def _side(direction: Direction) -> str:
    return "src" if direction is Direction.SOURCE else "dst"


def _masked(name: str, value: int, mask: int, negate: bool) -> str:
    if mask == FULL_MASK:
        return f"{name}{_op(negate)}{value}"
    return f"{name} & {mask:#x}{' != ' if negate else ' == '}{value:#x}"


def describe_match(match: Match) -> str:
    """A match in the diagram's compact notation.

    >>> from meshredirect.ir import Protocol
    >>> from meshredirect.values import PortSet
    >>> describe_match(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15008), negate=True))
    'tcp dport != 15008'
    >>> describe_match(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of(*[f"10.0.{i}.0/24" for i in range(0, 20, 2)])))
    'dst {10.0.0.0/24, 10.0.2.0/24, 10.0.4.0/24, 10.0.6.0/24, … 6 more}'
    """
    match match:
        case ProtocolMatch(protocol=protocol, negate=negate):
            return f"proto{_op(negate)}{protocol.value}"
        case FamilyMatch(family=family):
            return f"family {family.value}"
        case AddressMatch(direction=direction, addresses=addresses, negate=negate):
            return f"{_side(direction)}{_op(negate)}{_addresses(addresses)}"
        case PortMatch(protocol=protocol, ports=ports, direction=direction, negate=negate):
            return f"{protocol.value} {_side(direction)[0]}port{_op(negate)}{_intervals(ports)}"
        case InterfaceMatch(direction=direction, name=name, negate=negate):
            return f"{'iif' if direction is Direction.SOURCE else 'oif'}{_op(negate)}{name}"
        case OwnerMatch(kind=kind, ids=ids, negate=negate, socketless=socketless):
            text = f"{kind.value}{_op(negate)}{_intervals(ids)}"
            if socketless != negate:
                text += f" (no socket: {'match' if socketless else 'no match'})"
            return text
        case MarkMatch(value=value, mask=mask, negate=negate):
            return _masked("mark", value, mask, negate)
        case ConnmarkMatch(value=value, mask=mask, negate=negate):
            return _masked("ctmark", value, mask, negate)
        case CtStateMatch(states=states, negate=negate):
            names = ",".join(state.value for state in CtState if state in states)
            return f"ctstate{_op(negate)}{names}"
        case AddrTypeMatch(direction=direction, types=types, negate=negate, limit_interface=limit):
            names = ",".join(sorted(t.value for t in types))
            return f"{_side(direction)} type{_op(negate)}{names}" + (" (this interface)" if limit else "")
        case IpSetMatch(name=name, flags=flags, negate=negate):
            return f"{','.join(_side(flag) for flag in flags)}{' not' if negate else ''} in ipset {name}"
        case StatisticMatch(probability=probability, every=every, packet=packet, negate=negate):
            text = f"random {probability}" if probability is not None else f"every {every} from {packet}"
            return ("not " if negate else "") + text
        case UnknownMatch(dialect=dialect, tokens=tokens):
            return f"unknown {dialect} match: {' '.join(tokens)}"
        case _:
            assert_never(match)


def _nat_to(addresses: AddressRange | None, ports: PortSet | None) -> str:
    text = ""
    if addresses is not None:
        first, last = addresses.first, addresses.last
        text = f" to {first}" if first == last else f" to {first}-{last}"
    if ports is not None:
        text += f" :{_intervals(ports)}"
    return text


def _nat_flags(flags: frozenset[NatFlag]) -> str:
    return "".join(f" {flag.value}" for flag in NatFlag if flag in flags)


def describe_target(target: Target) -> str:
    """A target in the diagram's compact notation.

    >>> describe_target(Redirect(ports=PortSet.of(15001)))
    'REDIRECT :15001'
    >>> describe_target(SetMark(value=0x4000, mask=0x4000))
    'MARK set 0x4000/0x4000'
    """
    match target:
        case Accept():
            return "ACCEPT"
        case Drop():
            return "DROP"
        case Return():
            return "RETURN"
        case Continue():
            return "continue"
        case Jump(chain=chain):
            return f"jump {chain}"
        case Goto(chain=chain):
            return f"goto {chain}"
        case Redirect(ports=ports, flags=flags):
            return "REDIRECT" + (f" :{_intervals(ports)}" if ports is not None else "") + _nat_flags(flags)
        case TProxy(port=port, address=address, mark=mark, mask=mask):
            text = f"TPROXY {address if address is not None else ''}:{port}"
            if mark is not None:
                text += f" mark {mark}" if mask == FULL_MASK else f" mark {mark:#x}/{mask:#x}"
            return text
        case SetMark(value=value, mask=mask):
            return f"MARK set {value}" if mask == FULL_MASK else f"MARK set {value:#x}/{mask:#x}"
        case ConnmarkSave(nfmask=nfmask, ctmask=ctmask):
            masks = "" if nfmask == ctmask == FULL_MASK else f" nfmask {nfmask:#x} ctmask {ctmask:#x}"
            return "CONNMARK save" + masks
        case ConnmarkRestore(nfmask=nfmask, ctmask=ctmask):
            masks = "" if nfmask == ctmask == FULL_MASK else f" nfmask {nfmask:#x} ctmask {ctmask:#x}"
            return "CONNMARK restore" + masks
        case ConnmarkSet(value=value, mask=mask):
            return f"CONNMARK set {value}" if mask == FULL_MASK else f"CONNMARK set {value:#x}/{mask:#x}"
        case CtZone(zone=zone):
            return f"CT zone {zone}"
        case Masquerade(ports=ports, flags=flags):
            return "MASQUERADE" + _nat_to(None, ports) + _nat_flags(flags)
        case Snat(addresses=addresses, ports=ports, flags=flags):
            return "SNAT" + _nat_to(addresses, ports) + _nat_flags(flags)
        case Dnat(addresses=addresses, ports=ports, flags=flags):
            return "DNAT" + _nat_to(addresses, ports) + _nat_flags(flags)
        case Reject(with_=with_):
            return "REJECT" + (f" with {with_}" if with_ else "")
        case Log(prefix=prefix, level=level):
            return "LOG" + (f" {prefix!r}" if prefix else "") + (f" level {level}" if level != Log().level else "")
        case UnknownTarget(dialect=dialect, name=name, tokens=tokens):
            return f"unknown {dialect} target: {' '.join((name, *tokens))}"
        case _:
            assert_never(target)


def describe_rule(rule: Rule) -> str:
    """A rule in the diagram's notation: its matches joined by commas, an arrow, its target.

    >>> describe_rule(Rule(target=Return()))
    'any → RETURN'
    """
    matches = ", ".join(describe_match(match) for match in rule.matches) or "any"
    return f"{matches} → {describe_target(rule.target)}"


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
    def __init__(self, ruleset: Ruleset, highlight: Highlight | None) -> None:
        self.ruleset = ruleset
        self.highlight = highlight or Highlight()
        self.lines: list[str] = []
        self.depth = 0

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
        if self.highlight.title:
            self.emit(f"label=<{html.escape(self.highlight.title)}>;")
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
        on_path = any(ChainRef(family=family, table=t.name, chain=c.name) in self.highlight.entered for t, c in bases)
        fill = _PATH_HEADER_COLOUR if on_path else _HOOK_COLOUR
        pen = f', color="{_PATH_COLOUR}", penwidth=2' if on_path else ""
        node = _quote(hook_node(family, hook))
        self.emit(
            f'{node} [shape=box, style="rounded,filled", fillcolor="{fill}"{pen}, '
            f"label=<<B>{hook.value}</B><BR/>{family.value} hook>];"
        )
        for order, (table, chain) in enumerate(bases, start=1):
            assert chain.base is not None
            ref = ChainRef(family=family, table=table.name, chain=chain.name)
            style = f', color="{_PATH_COLOUR}", penwidth=2.5' if ref in self.highlight.entered else ""
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
        entered = ref in self.highlight.entered
        header = f"<B>{html.escape(chain.name)}</B>"
        if chain.base is not None:
            base = chain.base
            header += (
                f'<BR ALIGN="LEFT"/><FONT POINT-SIZE="8">{base.hook.value} hook, {base.type.value}, '
                f'priority {base.priority}, policy {base.policy.value}</FONT><BR ALIGN="LEFT"/>'
            )
        rows = [
            f'<TR><TD PORT="h" ALIGN="LEFT" BGCOLOR="{_PATH_HEADER_COLOUR if entered else _HEADER_COLOUR}">'
            f"{header}</TD></TR>"
        ]
        for index, rule in enumerate(chain.rules):
            rule_ref = RuleRef(family=family, table=table.name, chain=chain.name, index=index)
            colour = ""
            if rule_ref in self.highlight.matched:
                colour = f' BGCOLOR="{_MATCHED_COLOUR}"'
            elif rule_ref in self.highlight.tested:
                colour = f' BGCOLOR="{_VISITED_COLOUR}"'
            text = html.escape(f"{index + 1}. {describe_rule(rule)}")
            rows.append(f'<TR><TD PORT="r{index}" ALIGN="LEFT"{colour}>{text}</TD></TR>')
        if not chain.rules:
            rows.append('<TR><TD ALIGN="LEFT"><I>no rules</I></TD></TR>')
        border = f' COLOR="{_PATH_COLOUR}"' if entered else ""
        self.emit(
            f"{_quote(chain_node(family, table.name, chain.name))} "
            f'[label=<<TABLE BORDER="1"{border} CELLBORDER="0" CELLSPACING="0" CELLPADDING="3">'
            + "".join(rows)
            + "</TABLE>>];"
        )

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
                if ref in self.highlight.matched:
                    attributes.append(f'color="{_PATH_COLOUR}", fontcolor="{_PATH_COLOUR}", penwidth=2.5')
                self.emit(
                    f"{_quote(chain_node(family, table.name, chain.name))}:r{index}:e -> "
                    f"{_quote(chain_node(family, table.name, target))}:h:w [{', '.join(attributes)}];"
                )


def to_dot(ruleset: Ruleset, *, highlight: Highlight | None = None) -> str:
    """The chain diagram of a ruleset as Graphviz DOT text, with an optional highlighted path.

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
    return _Writer(ruleset, highlight).graph()


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
