"""Test oracle: the IR that the iptables-save text of a ruleset stands for, line by line.

The iptables backends print an IR rule as one or more kernel rules (one per
member of a positive address set, per owner interval, per 15 multiport
slots), in the kernel's order of options, leaving out what the kernel does
not store (a FamilyMatch, a positive 0.0.0.0/0, a ProtocolMatch implied by a
port match). The reader returns exactly those kernel rules. This module
states, independently of both, what that IR is, so that the round trip can be
checked with plain equality: ``read_iptables(save(ir)) == canonical(ir)``.

It is checked against the backend too: ``save(canonical(ir)) == save(ir)``
(the oracle changes nothing the kernel would see).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable

import attrs

from meshredirect.ir import (
    FULL_MASK,
    IPTABLES_BUILTIN_HOOKS,
    AddressMatch,
    Chain,
    ChainPolicy,
    Direction,
    Family,
    FamilyMatch,
    InterfaceMatch,
    Match,
    OwnerMatch,
    PortMatch,
    ProtocolMatch,
    Reject,
    Rule,
    Ruleset,
    StatisticMatch,
    Table,
    Target,
    TProxy,
)
from meshredirect.values import AddressSet, IdSet, PortSet
from meshredirect_iptables.lowering import MULTIPORT_LIMIT

TABLE_ORDER = ("raw", "mangle", "nat", "filter", "security")
DEFAULT_REJECT = {Family.IPV4: "icmp-port-unreachable", Family.IPV6: "icmp6-port-unreachable"}
ALL_IDS = IdSet.of((0, 2**32 - 2))


def canonical(ruleset: Ruleset) -> Ruleset:
    tables = [canonical_table(t) for t in ruleset.tables if t.family in (Family.IPV4, Family.IPV6)]
    tables = [t for t in tables if t.chains]
    tables.sort(key=lambda t: ((Family.IPV4, Family.IPV6).index(t.family), TABLE_ORDER.index(t.name)))
    return Ruleset(tables=tuple(tables))


def canonical_table(table: Table) -> Table:
    builtin = {c.base.hook: c for c in table.chains if c.base is not None}
    chains: list[Chain] = []
    for hook in IPTABLES_BUILTIN_HOOKS[table.name]:
        chain = builtin.get(hook)
        if chain is None:
            continue
        assert chain.base is not None
        rules = canonical_rules(table.family, chain.rules)
        if rules or chain.base.policy is not ChainPolicy.ACCEPT:
            chains.append(attrs.evolve(chain, rules=rules))
    for chain in sorted((c for c in table.chains if c.base is None), key=lambda c: c.name):
        chains.append(attrs.evolve(chain, rules=canonical_rules(table.family, chain.rules)))
    return attrs.evolve(table, chains=tuple(chains))


def canonical_rules(family: Family, rules: Iterable[Rule]) -> tuple[Rule, ...]:
    out: list[Rule] = []
    for rule in rules:
        variants = [_variants(family, match) for match in rule.matches]
        target = _target(family, rule.target)
        for combination in itertools.product(*variants):
            matches = _order([m for m in combination if m is not None])
            out.append(Rule(matches=tuple(matches), target=target, comment=rule.comment))
    return tuple(out)


def _variants(family: Family, match: Match) -> list[Match | None]:
    """The kernel rules one match splits into (None: nothing printed; []: the rule disappears)."""
    if isinstance(match, FamilyMatch):
        return [None] if match.family is family else []
    if isinstance(match, AddressMatch):
        networks = [n for n in match.addresses if n.version == family.version]
        if not networks:
            return []  # no member of this family: the match never holds, negated or not (the IR's meaning)
        out: list[Match | None] = []
        for network in networks:
            if network.prefixlen == 0 and not match.negate:
                out.append(None)
            else:
                out.append(attrs.evolve(match, addresses=AddressSet((network,))))
        return out
    if isinstance(match, PortMatch):
        return [attrs.evolve(match, ports=chunk) for chunk in _port_chunks(match.ports)]
    if isinstance(match, OwnerMatch) and not match.negate:
        return [attrs.evolve(match, ids=IdSet((interval,))) for interval in match.ids.intervals]
    if isinstance(match, StatisticMatch) and match.probability is not None:
        stored = round(match.probability * 0x80000000) / 0x80000000
        return [attrs.evolve(match, probability=float(f"{stored:.11f}"))]
    return [match]


def _port_chunks(ports: PortSet) -> list[PortSet]:
    chunks: list[list[tuple[int, int]]] = [[]]
    used = 0
    for lo, hi in ports.intervals:
        cost = 1 if lo == hi else 2
        if used + cost > MULTIPORT_LIMIT:
            chunks.append([])
            used = 0
        chunks[-1].append((lo, hi))
        used += cost
    return [PortSet(tuple(chunk)) for chunk in chunks]


def _rank(match: Match) -> int:
    if isinstance(match, AddressMatch):
        return 0 if match.direction is Direction.SOURCE else 1
    if isinstance(match, InterfaceMatch):
        return 2 if match.direction is Direction.SOURCE else 3
    if isinstance(match, ProtocolMatch):
        return 4
    return 5


def _order(matches: list[Match]) -> list[Match]:
    ordered = sorted(matches, key=_rank)  # stable: modules keep their order
    ports = {m.protocol for m in ordered if isinstance(m, PortMatch)}
    ordered = [m for m in ordered if not (isinstance(m, ProtocolMatch) and not m.negate and m.protocol in ports)]
    ordered = [m for i, m in enumerate(ordered) if not (isinstance(m, ProtocolMatch) and m in ordered[:i])]
    merged: list[Match] = []
    for match in ordered:
        last = merged[-1] if merged else None
        if (
            isinstance(match, OwnerMatch)
            and isinstance(last, OwnerMatch)
            and match.negate
            and last.negate
            and match.kind is last.kind
            and match.socketless == last.socketless
            and ALL_IDS not in (match.ids, last.ids)
        ):
            merged[-1] = attrs.evolve(last, ids=last.ids.union(match.ids))
        else:
            merged.append(match)
    return merged


def _target(family: Family, target: Target) -> Target:
    if isinstance(target, Reject) and target.with_ == DEFAULT_REJECT[family]:
        return Reject()
    if isinstance(target, TProxy):
        address = target.address
        if address is not None and address == ipaddress.ip_address("0.0.0.0" if family is Family.IPV4 else "::"):
            address = None
        mark, mask = target.mark, target.mask
        if mark is None or (mark == 0 and mask == 0):
            mark, mask = None, FULL_MASK
        return TProxy(port=target.port, address=address, mark=mark, mask=mask)
    return target
