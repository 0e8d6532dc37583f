"""Broken rulesets on purpose: the mistakes that make redirect rules loop or leak, as IR rewrites.

A checker is only worth something when it is seen to fail: feed it a ruleset
with a known mistake and it must say so, with a concrete connection.
:func:`mutate` makes such rulesets from any :class:`~meshredirect.ir.Ruleset`
(compiled by meshredirect, or read from a node), one :class:`Mutation` at a
time; the proxy it is about (its uids, gids, ports, passthrough source) comes
from a :class:`~meshredirect.semantics.model.Proxy`, Istio's by default.

Each mutation is a rewrite of rules, not of meaning: whether the damage shows
depends on the rules (removing the proxy's exemption loops only where the
proxy's own traffic would otherwise be captured, so not in rules that capture
nothing outbound). :func:`applicable` names the mutations that change a
ruleset at all.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> ruleset = compile_policy(Policy())
>>> broken = mutate(ruleset, Mutation.DROP_PROXY_EXEMPTIONS)
>>> len(list(ruleset.rules())) - len(list(broken.rules()))
2
>>> [m.name for m in applicable(ruleset)]
['DROP_PROXY_EXEMPTIONS', 'DROP_PASSTHROUGH', 'CAPTURE_LOOPBACK', 'SWAP_LISTENERS', 'REDIRECT_ALL']
>>> mutate(Ruleset(), Mutation.DROP_PASSTHROUGH)
Traceback (most recent call last):
...
meshredirect.testing.mutations.NotApplicable: DROP_PASSTHROUGH changes nothing in this ruleset: it has no rule that lets the passthrough source 127.0.0.6 / ::6 pass
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

import attrs

from meshredirect.ir import (
    Accept,
    AddressMatch,
    Chain,
    ChainType,
    Direction,
    Family,
    Hook,
    InterfaceMatch,
    MarkMatch,
    Match,
    OwnerKind,
    OwnerMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Table,
    TProxy,
    iptables_base_chain,
)
from meshredirect.semantics.model import LOOPBACK_INTERFACE, Proxy
from meshredirect.values import AddressSet, PortSet

__all__ = ["Mutation", "NotApplicable", "applicable", "mutate"]

#: What a loopback destination is, per family (what "include 127.0.0.0/8 for capture" brings back).
LOOPBACK: Final = AddressSet.of("127.0.0.0/8", "::1/128")


class Mutation(enum.Enum):
    """One mistake, and what it should make a checker report; the value says it in words.

    >>> Mutation.DROP_PASSTHROUGH.value
    'remove the rules that let the passthrough source 127.0.0.6 / ::6 pass'
    >>> [m.name for m in Mutation]
    ['DROP_PROXY_EXEMPTIONS', 'DROP_PASSTHROUGH', 'CAPTURE_LOOPBACK', 'SWAP_LISTENERS', 'REDIRECT_ALL']
    """

    #: Remove the rules that let the proxy's own uids and gids pass: the proxy's upstream
    #: connections are captured again (a loop wherever outbound traffic is captured).
    DROP_PROXY_EXEMPTIONS = "remove the rules that let the proxy's uid/gid pass"
    #: Remove the nat rules that let the inbound passthrough pass (from 127.0.0.6 / ::6; with
    #: TPROXY, marked with the TPROXY mark, over lo): the proxy's connection to the app is captured
    #: again by the lo hairpin (a loop).
    DROP_PASSTHROUGH = "remove the rules that let the passthrough source 127.0.0.6 / ::6 pass"
    #: Include loopback destinations for capture: remove the rules that let 127.0.0.0/8 and ::1
    #: pass, and the "not to loopback" conditions of the others: the proxy's own connections to
    #: localhost (its own listeners included) are captured by the lo hairpin.
    CAPTURE_LOOPBACK = "include 127.0.0.0/8 and ::1 for capture"
    #: Swap the outbound and the inbound listener in every REDIRECT and TPROXY: inbound traffic
    #: reaches the outbound side, whose upstream hairpins back to it (a loop).
    SWAP_LISTENERS = "swap the outbound and inbound listener ports"
    #: Put a rule first in nat OUTPUT that sends every TCP connection to the outbound port, the
    #: proxy's own included (a loop in any ruleset).
    REDIRECT_ALL = "redirect every local TCP connection to the outbound port first"


class NotApplicable(ValueError):
    """The mutation would not change this ruleset (a :class:`ValueError`).

    >>> try:
    ...     mutate(Ruleset(), Mutation.DROP_PROXY_EXEMPTIONS)
    ... except NotApplicable as error:
    ...     print(error)
    DROP_PROXY_EXEMPTIONS changes nothing in this ruleset: it has no rule that lets the proxy's uid/gid pass
    """


def mutate(ruleset: Ruleset, mutation: Mutation, proxy: Proxy | None = None) -> Ruleset:
    """``ruleset`` with ``mutation`` applied for ``proxy`` (default: Istio's); :class:`NotApplicable` when unchanged.

    ``proxy`` names the uids, gids, listener ports and passthrough source the
    mutation is about (:attr:`Environment.proxy <meshredirect.semantics.model.Environment.proxy>`
    of the pod the rules run in):

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> from meshredirect.semantics import Environment
    >>> policy = Policy(outbound_port=15101, inbound_port=15106)
    >>> broken = mutate(compile_policy(policy), Mutation.SWAP_LISTENERS, Environment.for_policy(policy).proxy)
    >>> [(chain.name, rule.target) for _, chain, rule in broken.rules() if isinstance(rule.target, Redirect)]
    [('ISTIO_REDIRECT', Redirect(ports=PortSet('15106'), flags=frozenset())), ('ISTIO_IN_REDIRECT', Redirect(ports=PortSet('15101'), flags=frozenset()))]
    >>> nat = mutate(compile_policy(policy), Mutation.REDIRECT_ALL).tables[0]
    >>> nat.chain("OUTPUT").rules[0].comment
    'mutation: redirect everything'
    """
    proxy = proxy if proxy is not None else Proxy()
    result = _MUTATORS[mutation](ruleset, proxy)
    if result == ruleset:
        raise NotApplicable(
            f"{mutation.name} changes nothing in this ruleset: it has no rule that {_MISSING[mutation]}"
        )
    return result


def applicable(ruleset: Ruleset, proxy: Proxy | None = None) -> tuple[Mutation, ...]:
    """The mutations that change ``ruleset`` (for ``proxy``, default: Istio's), in :class:`Mutation` order.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> [m.name for m in applicable(compile_policy(Policy(inbound_ports="", outbound_cidrs="")))]
    ['DROP_PROXY_EXEMPTIONS', 'DROP_PASSTHROUGH', 'CAPTURE_LOOPBACK', 'SWAP_LISTENERS', 'REDIRECT_ALL']
    >>> [m.name for m in applicable(Ruleset())]
    ['REDIRECT_ALL']
    """
    proxy = proxy if proxy is not None else Proxy()
    return tuple(m for m in Mutation if _MUTATORS[m](ruleset, proxy) != ruleset)


_MISSING: Final = {
    Mutation.DROP_PROXY_EXEMPTIONS: "lets the proxy's uid/gid pass",
    Mutation.DROP_PASSTHROUGH: "lets the passthrough source 127.0.0.6 / ::6 pass",
    Mutation.CAPTURE_LOOPBACK: "exempts loopback destinations",
    Mutation.SWAP_LISTENERS: "redirects to the outbound or inbound listener",
    Mutation.REDIRECT_ALL: "could take a first rule",  # never: REDIRECT_ALL always adds one
}


def _map_rules(
    ruleset: Ruleset, rewrite: Callable[[Rule], Rule | None], *, tables: tuple[str, ...] | None = None
) -> Ruleset:
    """Every rule (of the named tables, or of all) rewritten (None: removed)."""
    result = []
    for table in ruleset.tables:
        if tables is not None and table.name not in tables and not _has_nat_chains(table):
            result.append(table)
            continue
        chains = []
        for chain in table.chains:
            rules = tuple(r for r in (rewrite(rule) for rule in chain.rules) if r is not None)
            chains.append(chain if rules == chain.rules else attrs.evolve(chain, rules=rules))
        result.append(attrs.evolve(table, chains=tuple(chains)))
    return attrs.evolve(ruleset, tables=tuple(result))


def _has_nat_chains(table: Table) -> bool:
    """An nftables table (any name) whose base chains are of type nat."""
    return any(c.base is not None and c.base.type is ChainType.NAT for c in table.chains)


def _lets_pass(rule: Rule) -> bool:
    return isinstance(rule.target, (Return, Accept))


def _drop_proxy_exemptions(ruleset: Ruleset, proxy: Proxy) -> Ruleset:
    def is_exemption(match: Match) -> bool:
        if not isinstance(match, OwnerMatch) or match.negate:
            return False
        ids = proxy.uids if match.kind is OwnerKind.UID else proxy.gids
        return match.ids.intersects(ids)

    return _map_rules(ruleset, lambda r: None if _lets_pass(r) and any(map(is_exemption, r.matches)) else r)


def _drop_passthrough(ruleset: Ruleset, proxy: Proxy) -> Ruleset:
    sources = (proxy.passthrough_ipv4, proxy.passthrough_ipv6)

    def is_passthrough_source(match: Match) -> bool:
        return (
            isinstance(match, AddressMatch)
            and match.direction is Direction.SOURCE
            and not match.negate
            and any(s in match.addresses for s in sources)
        )

    def is_marked_over_lo(rule: Rule) -> bool:
        # TPROXY: the passthrough keeps the original source and carries the TPROXY mark instead.
        marked = any(
            isinstance(m, MarkMatch) and not m.negate and (proxy.tproxy_mark & m.mask) == m.value for m in rule.matches
        )
        over_lo = any(
            isinstance(m, InterfaceMatch) and not m.negate and m.name == LOOPBACK_INTERFACE for m in rule.matches
        )
        return marked and over_lo

    def rewrite(rule: Rule) -> Rule | None:
        if _lets_pass(rule) and (any(map(is_passthrough_source, rule.matches)) or is_marked_over_lo(rule)):
            return None
        return rule

    return _map_rules(ruleset, rewrite, tables=("nat",))


def _is_loopback_destination(match: Match) -> bool:
    return (
        isinstance(match, AddressMatch)
        and match.direction is Direction.DESTINATION
        and bool(match.addresses)
        and all(network in LOOPBACK for network in match.addresses)
    )


def _capture_loopback(ruleset: Ruleset, _proxy: Proxy) -> Ruleset:
    def rewrite(rule: Rule) -> Rule | None:
        loopback = [m for m in rule.matches if _is_loopback_destination(m)]
        if not loopback:
            return rule
        assert all(isinstance(m, AddressMatch) for m in loopback)
        if _lets_pass(rule) and any(isinstance(m, AddressMatch) and not m.negate for m in loopback):
            return None
        kept = tuple(m for m in rule.matches if not (_is_loopback_destination(m) and getattr(m, "negate", False)))
        return attrs.evolve(rule, matches=kept)

    return _map_rules(ruleset, rewrite)


def _swap_listeners(ruleset: Ruleset, proxy: Proxy) -> Ruleset:
    swap = {proxy.outbound_port: proxy.inbound_port, proxy.inbound_port: proxy.outbound_port}

    def rewrite(rule: Rule) -> Rule:
        target = rule.target
        if isinstance(target, TProxy) and target.port in swap:
            return attrs.evolve(rule, target=attrs.evolve(target, port=swap[target.port]))
        if isinstance(target, Redirect) and target.ports is not None and target.ports.is_single():
            (port,) = tuple(target.ports)
            if port in swap:
                return attrs.evolve(rule, target=Redirect(ports=PortSet.of(swap[port])))
        return rule

    return _map_rules(ruleset, rewrite)


def _redirect_all(ruleset: Ruleset, proxy: Proxy) -> Ruleset:
    first = Rule(
        matches=(ProtocolMatch(protocol=Protocol.TCP),),
        target=Redirect(ports=PortSet.of(proxy.outbound_port)),
        comment="mutation: redirect everything",
    )
    present = set(ruleset.families)
    if Family.INET in present:
        present |= {Family.IPV4, Family.IPV6}
    families = [f for f in (Family.IPV4, Family.IPV6) if f in present] or [Family.IPV4]
    tables = list(ruleset.tables)
    for family in families:
        for index, table in enumerate(tables):
            output = _nat_output(table) if table.family is family and table.name == "nat" else None
            if output is not None:
                chains = tuple(attrs.evolve(c, rules=(first, *c.rules)) if c is output else c for c in table.chains)
                tables[index] = attrs.evolve(table, chains=chains)
                break
        else:
            base = iptables_base_chain("nat", Hook.OUTPUT)
            tables.insert(
                0, Table(family=family, name="nat", chains=(Chain(name="OUTPUT", rules=(first,), base=base),))
            )
    return attrs.evolve(ruleset, tables=tuple(tables))


def _nat_output(table: Table) -> Chain | None:
    for chain in table.base_chains(Hook.OUTPUT):
        if chain.base is not None and chain.base.type is ChainType.NAT:
            return chain
    return None


_MUTATORS: Final[dict[Mutation, Callable[[Ruleset, Proxy], Ruleset]]] = {
    Mutation.DROP_PROXY_EXEMPTIONS: _drop_proxy_exemptions,
    Mutation.DROP_PASSTHROUGH: _drop_passthrough,
    Mutation.CAPTURE_LOOPBACK: _capture_loopback,
    Mutation.SWAP_LISTENERS: _swap_listeners,
    Mutation.REDIRECT_ALL: _redirect_all,
}
