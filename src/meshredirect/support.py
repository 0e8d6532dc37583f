"""What each installed backend can express: every IR node sample lowered by every backend.

Each sample of :mod:`meshredirect.testing.samples` is put in a rule of an
IPv4 table, where the kernel would accept it (NAT targets in ``nat``, with a
TCP match where the target needs one; ``TPROXY`` in mangle PREROUTING...),
and the ruleset is rendered by each backend found in the entry points. A
backend lowers the node or refuses it with
:class:`~meshredirect.errors.UnsupportedError` and its reason: the table the
documentation shows is this function's output, so it cannot drift from the code.

>>> cells = support_matrix(["iptables-save"])
>>> cell = next(c for c in cells if c.node_type == "OwnerMatch" and c.lowers)
>>> cell.backend, cell.lowers
('iptables-save', True)
>>> sorted({c.node_type for c in cells}) == sorted(node_types())
True
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import attrs

from meshredirect.backend import Backend
from meshredirect.errors import UnsupportedError
from meshredirect.ir import (
    Accept,
    Chain,
    Direction,
    Dnat,
    Family,
    Goto,
    Hook,
    InterfaceMatch,
    Jump,
    Masquerade,
    Match,
    Protocol,
    ProtocolMatch,
    Redirect,
    Reject,
    Return,
    Rule,
    Ruleset,
    Table,
    Target,
    TProxy,
    iptables_base_chain,
)

__all__ = ["SupportCell", "node_types", "sample_ruleset", "support_matrix"]

#: The user chain that sample jumps and gotos enter.
NEXT_CHAIN: typing.Final = "MESH_NEXT"
#: Targets that only work on TCP (or need a protocol for their ports).
_NEEDS_TCP: typing.Final = (Redirect, TProxy, Masquerade, Dnat)


@attrs.frozen(kw_only=True)
class SupportCell:
    """One backend and one IR node sample: lowered, or refused with the reason."""

    backend: str
    node_type: str
    node: Match | Target
    lowers: bool
    reason: str | None = None


def node_types() -> list[str]:
    """Names of every match and target class of the IR, matches first."""
    return [cls.__name__ for cls in (*typing.get_args(Match), *typing.get_args(Target))]


def sample_ruleset(node: Match | Target) -> Ruleset:
    """A small IPv4 ruleset holding ``node`` in one rule, in a table and hook where the kernel takes it.

    >>> from meshredirect.ir import Redirect
    >>> ruleset = sample_ruleset(Redirect())
    >>> [(t.name, [c.name for c in t.chains]) for t in ruleset.tables]
    [('nat', ['OUTPUT'])]
    """
    from meshredirect.testing.samples import SAMPLE_TARGETS, TARGET_PLACES

    if type(node) in SAMPLE_TARGETS:
        target = typing.cast(Target, node)
        table, hook = TARGET_PLACES.get(type(target), ("mangle", Hook.OUTPUT))
        needs_tcp = isinstance(target, _NEEDS_TCP) or (isinstance(target, Reject) and target.with_ == "tcp-reset")
        rule = Rule(matches=(ProtocolMatch(protocol=Protocol.TCP),) if needs_tcp else (), target=target)
    else:
        match = typing.cast(Match, node)
        incoming = isinstance(match, InterfaceMatch) and match.direction is Direction.SOURCE
        # xt_owner needs a local socket (OUTPUT); an input interface exists only on the way in (FORWARD).
        table, hook = ("filter", Hook.FORWARD) if incoming else ("filter", Hook.OUTPUT)
        rule = Rule(matches=(match,), target=Accept())
    chains = [Chain(name=hook.value, base=iptables_base_chain(table, hook), rules=(rule,))]
    if isinstance(rule.target, Jump | Goto):
        chains.append(Chain(name=NEXT_CHAIN, rules=(Rule(target=Return()),)))
    return Ruleset(tables=(Table(family=Family.IPV4, name=table, chains=tuple(chains)),))


def support_matrix(backends: Sequence[str | Backend] | None = None) -> list[SupportCell]:
    """Every sample of every IR node, lowered by every backend: all installed ones by default, or
    those named (or given as instances)."""
    from meshredirect.backend import available_backends, create_backend
    from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS

    samples: list[Match | Target] = [
        *(node for nodes in SAMPLE_MATCHES.values() for node in nodes),
        *(node for nodes in SAMPLE_TARGETS.values() for node in nodes),
    ]
    cells: list[SupportCell] = []
    for item in backends if backends is not None else available_backends():
        backend = create_backend(item) if isinstance(item, str) else item
        name = backend.name
        for node in samples:
            try:
                backend.render(sample_ruleset(node))
            except UnsupportedError as exc:
                cells.append(
                    SupportCell(backend=name, node_type=type(node).__name__, node=node, lowers=False, reason=exc.reason)
                )
            else:
                cells.append(SupportCell(backend=name, node_type=type(node).__name__, node=node, lowers=True))
    return cells
