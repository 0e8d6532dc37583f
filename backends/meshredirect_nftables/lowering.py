"""IR to the libnftables JSON schema: one table of our own per address family.

The lowering has two steps, both pure:

1. :meth:`NftLowering.layout` rewrites the IR into the shape nftables holds
   (itself IR, so the semantics engine can run it and the reader's output can
   be compared with it): the tables of one family merge into one table of
   ours (family ``ip``, ``ip6``, or ``inet`` for an inet IR table); the chains
   of a table with another name (the compiler's ``raw``/``mangle``/``nat``)
   are re-homed as ``TABLE-CHAIN`` (``nat-OUTPUT``, ``mangle-ISTIO_INBOUND``),
   and jumps follow them; matches are put in the form ``nft`` prints back.
   Reading back what the kernel holds gives exactly this layout.
2. :meth:`NftLowering.commands` writes the layout as ``{"nftables": [...]}``
   commands: ``add table; delete table; add table``, then chains, then rules:
   one transaction that replaces our table (or creates it) atomically.

**Priorities.** A re-homed base chain runs one step earlier than the
iptables table it comes from: raw -301, mangle -151, nat -101 (PREROUTING,
OUTPUT) and 99 (INPUT, POSTROUTING). Base chains of equal priority on one
hook run in an undefined order, and -100/100 are what iptables-nft,
Istio's own nft tables and kube-proxy use for NAT; -101 is taken by none of
them, so our NAT decision is made first, deterministically (the first NAT
binding wins), and our relative order (raw before conntrack at -200,
mangle, then nat) is the iptables one. Tables already named like ours keep
their priorities as written.

**Families.** An IPv4 IR table becomes an ``ip`` table, which the kernel
only ever shows IPv4 packets: an IPv4-only policy cannot capture IPv6, and
the reverse (``inet`` would need ``meta nfproto`` guards in every rule).

**Exactness.** Every node is lowered to what means the same in the kernel, or
refused with :class:`~meshredirect.errors.UnsupportedError`:

- owner matches: ``meta skuid/skgid`` never match a packet without a socket,
  negated or not; an OwnerMatch that must match socketless packets
  (``socketless=True``) is refused. The compiler emits positive ones only.
- TPROXY: nft's ``tproxy`` is not terminal and, with no transparent listener,
  lets the packet go on; xt_TPROXY sets the mark and accepts, or drops. So
  a TProxy rule becomes ``tproxy to :P meta mark set M accept`` followed by
  the same matches with ``drop``.
- sets: port, id and address sets become anonymous interval sets (one lookup
  however many members); a single member is written as a plain value; runs
  of rules that look up one key become one set or one verdict map where that
  is exact (:func:`merge_lookups`).
- ipset and statistic matches, ct states SNAT/DNAT, connmark save/restore
  with partial masks, and NAT targets of several port ranges are refused.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> laid = NftLowering().layout(compile_policy(Policy()))
>>> [(t.family.value, t.name) for t in laid.tables]
[('ipv4', 'istio')]
>>> [(c.name, c.base.priority if c.base else None) for c in laid.tables[0].chains][:3]
[('nat-PREROUTING', -101), ('nat-OUTPUT', -101), ('nat-ISTIO_OUTPUT', None)]
>>> NftLowering().commands(compile_policy(Policy()))[Family.IPV4][:2]
[{'add': {'table': {'family': 'ip', 'name': 'istio'}}}, {'delete': {'table': {'family': 'ip', 'name': 'istio'}}}]
"""

from __future__ import annotations

import ipaddress
import json
import operator
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Final, TypeAlias, assert_never

import attrs

from meshredirect.errors import PolicyError, UnsupportedError
from meshredirect.ir import (
    CONNTRACK_PRIORITY,
    FULL_MASK,
    Accept,
    AddressMatch,
    AddrTypeMatch,
    Chain,
    ChainType,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    ConnmarkSet,
    Continue,
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
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
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
from meshredirect.readers.nftables import (
    ADDRTYPE_NAMES,
    CTSTATE_NAMES,
    DIALECT,
    FAMILY_NAMES,
    HOOK_NAMES,
    ICMP_REJECT_CODES,
    ICMPV6_REJECT_CODES,
    LOG_LEVELS,
    verdict_order,
)
from meshredirect.values import AddressSet, IntervalSet, IPNetwork, PortSet

__all__ = ["DEFAULT_TABLE", "PRIORITY_OFFSET", "TPROXY_DROP_COMMENT", "NftLowering", "Place", "merge_lookups"]

Json = Any

#: Our base chains run this much earlier than the iptables table they come from (see the module docstring).
PRIORITY_OFFSET: Final = -1
#: The table name when the ruleset names no owner (otherwise the owner prefix, lower case).
DEFAULT_TABLE: Final = "meshredirect"
#: The comment of the rule that follows every tproxy rule (it makes a failed tproxy drop, as xt_TPROXY does).
TPROXY_DROP_COMMENT: Final = "no transparent listener: drop, as xt_TPROXY does"
#: nft limits (NFT_NAME_MAXLEN - 1, NF_LOG_PREFIXLEN - 1, NFT_USERDATA_MAXLEN for comments).
MAX_NAME: Final = 255
MAX_LOG_PREFIX: Final = 127
MAX_COMMENT: Final = 128
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_PORT_PROTOCOLS: Final = frozenset({Protocol.TCP, Protocol.UDP, Protocol.SCTP})
_DEFAULT_LOG_LEVEL: Final = 4
_LEVEL_NAMES: Final = {level: name for name, level in LOG_LEVELS.items()}
_MARK: Final[Json] = {"meta": {"key": "mark"}}
_CTMARK: Final[Json] = {"ct": {"key": "mark"}}
#: Hooks where packets have no input (output) interface: nft's iifname (oifname) never matches there.
_NO_INPUT_INTERFACE: Final = frozenset({Hook.OUTPUT, Hook.POSTROUTING})
_NO_OUTPUT_INTERFACE: Final = frozenset({Hook.PREROUTING, Hook.INPUT})


@attrs.frozen
class Place:
    """A base chain a chain can be reached from: where its rules can run (hook, chain type, priority)."""

    hook: Hook
    chain_type: ChainType
    priority: int


def _version_of(family: Family) -> int | None:
    return None if family is Family.INET else family.version


class NftLowering:
    """Shared lowering of the nftables backends (JSON and text build on it).

    ``table`` names our table (default: the ruleset's owner prefix in lower
    case, else ``meshredirect``); ``counters`` adds a counter to every rule.
    """

    name: ClassVar[str] = "nftables"

    def __init__(self, table: str | None = None, counters: bool = False) -> None:
        if table is not None and (not _TABLE_NAME.match(table) or len(table) > MAX_NAME):
            raise PolicyError(
                "nftables table",
                expected=f"a name of 1-{MAX_NAME} characters: a letter or '_', then letters, digits, '_.-'",
                got=table,
            )
        self.table = table
        self.counters = bool(counters)

    def table_name(self, ruleset: Ruleset) -> str:
        """The name of our table for this ruleset."""
        if self.table is not None:
            return self.table
        return ruleset.owner_prefix.lower() if ruleset.owner_prefix else DEFAULT_TABLE

    # ----------------------------------------------------------------------------- layout

    def layout(self, ruleset: Ruleset) -> Ruleset:
        """The IR as nftables will hold it: one table of ours per family (see the module docstring)."""
        name = self.table_name(ruleset)
        tables = []
        for family in ruleset.families:
            chains: list[Chain] = []
            seen: set[str] = set()
            for table in ruleset.tables:
                if table.family is not family:
                    continue
                own = table.name == name
                names = {c.name: c.name if own else f"{table.name}-{c.name}" for c in table.chains}
                for chain in table.chains:
                    new_name = names[chain.name]
                    if new_name in seen or len(new_name) > MAX_NAME:
                        raise UnsupportedError(
                            self.name, chain, f"chain name {new_name!r} is taken or too long in table {name}"
                        )
                    seen.add(new_name)
                    base = chain.base
                    if base is not None and not own:
                        base = attrs.evolve(base, priority=base.priority + PRIORITY_OFFSET)
                    rules: list[Rule] = []
                    for rule in chain.rules:
                        rules.extend(self.canonical_rules(family, self._renamed(rule, names, table)))
                    rules = merge_lookups(_with_tproxy_drops(rules))
                    chains.append(Chain(name=new_name, rules=tuple(rules), base=base))
            tables.append(Table(family=family, name=name, chains=tuple(chains)))
        return Ruleset(tables=tuple(tables))

    def _renamed(self, rule: Rule, names: dict[str, str], table: Table) -> Rule:
        target = rule.target
        if isinstance(target, (Jump, Goto)):
            if target.chain not in names:
                raise UnsupportedError(self.name, target, f"table {table.name} has no chain {target.chain!r}")
            return attrs.evolve(rule, target=attrs.evolve(target, chain=names[target.chain]))
        return rule

    def canonical_rules(self, family: Family, rule: Rule) -> list[Rule]:
        """One IR rule in the form nft holds and prints: zero, one or (inet, two families) two rules."""
        if isinstance(rule.target, Continue) and not rule.matches:
            return []  # does nothing; nft prints a rule without statements oddly
        variants = self._family_variants(family, rule)
        return [self._canonical_matches(family, variant) for variant in variants]

    def _family_variants(self, family: Family, rule: Rule) -> list[Rule]:
        version = _version_of(family)
        if not any(isinstance(m, (FamilyMatch, AddressMatch)) for m in rule.matches):
            return [rule]
        if version is not None:
            matches: list[Match] = []
            for match in rule.matches:
                if isinstance(match, FamilyMatch):
                    if match.family is not family:
                        return []  # never holds in this table
                    continue  # always holds
                if isinstance(match, AddressMatch) and any(n.version != version for n in match.addresses):
                    networks = match.addresses.for_version(version)
                    if not networks:
                        return []  # no member of this family: never holds, negated or not (as nft's inet tables)
                    match = attrs.evolve(match, addresses=networks)
                matches.append(match)
            return [rule if len(matches) == len(rule.matches) and all(map(operator.is_, matches, rule.matches))
                    else attrs.evolve(rule, matches=tuple(matches))]  # fmt: skip
        # inet: an address match of both versions splits the rule in two; a packet is of one version only.
        versions = {4, 6}
        for match in rule.matches:
            if isinstance(match, AddressMatch):
                if not match.addresses:
                    raise UnsupportedError(self.name, match, "an empty address set in an inet table")
                versions &= {n.version for n in match.addresses}
        if not any(isinstance(m, AddressMatch) for m in rule.matches):
            return [rule]
        out = []
        for v in sorted(versions):
            matches = [
                attrs.evolve(m, addresses=m.addresses.for_version(v)) if isinstance(m, AddressMatch) else m
                for m in rule.matches
            ]
            out.append(attrs.evolve(rule, matches=tuple(matches)))
        return out

    def _canonical_matches(self, family: Family, rule: Rule) -> Rule:
        port_protocols = {m.protocol for m in rule.matches if isinstance(m, PortMatch)}
        # nft leaves out (and does not print) a protocol match that a port match implies.
        matches = [
            m
            for m in rule.matches
            if not (isinstance(m, ProtocolMatch) and not m.negate and m.protocol in port_protocols)
        ]
        target = rule.target
        if isinstance(target, Reject):
            if target.with_ is None and family is not Family.INET:
                target = Reject(with_="icmp6-port-unreachable" if family is Family.IPV6 else "icmp-port-unreachable")
            if target.with_ == "tcp-reset" and Protocol.TCP not in port_protocols:
                # nft hides the tcp match 'reject with tcp reset' needs; it is put first, where readers put it back.
                tcp = ProtocolMatch(protocol=Protocol.TCP)
                matches = [tcp, *(m for m in matches if m != tcp)]
        if isinstance(target, TProxy) and target.mark is not None and target.mark == 0 and target.mask == 0:
            target = TProxy(port=target.port, address=target.address)  # sets no bit: no mark
        if target is rule.target and len(matches) == len(rule.matches):
            return rule
        return attrs.evolve(rule, matches=tuple(matches), target=target)

    # ----------------------------------------------------------------------------- commands

    def commands(self, ruleset: Ruleset) -> dict[Family, list[Json]]:
        """Per family, the commands that replace our table with this ruleset's rules, in one transaction."""
        laid = self.layout(ruleset)
        return {table.family: self.table_commands(table) for table in laid.tables}

    def removal(self, family: Family, name: str) -> list[Json]:
        """Commands that delete our table of a family if it exists (adding it first makes deleting always valid)."""
        spec = {"family": FAMILY_NAMES[family], "name": name}
        return [{"add": {"table": dict(spec)}}, {"delete": {"table": dict(spec)}}]

    def table_commands(self, table: Table) -> list[Json]:
        """The replace transaction of one laid-out table."""
        family = FAMILY_NAMES[table.family]
        commands = [*self.removal(table.family, table.name), {"add": {"table": {"family": family, "name": table.name}}}]
        places = self.places(table)
        for chain in table.chains:
            spec: dict[str, Json] = {"family": family, "table": table.name, "name": chain.name}
            if chain.base is not None:
                self.check_base(chain)
                spec.update(
                    type=chain.base.type.value,
                    hook=HOOK_NAMES[chain.base.hook],
                    prio=chain.base.priority,
                    policy=chain.base.policy.value.lower(),
                )
            commands.append({"add": {"chain": spec}})
        for chain in table.chains:
            for run in _verdict_map_runs(chain.rules):
                rule = run[0]
                spec = {"family": family, "table": table.name, "chain": chain.name}
                if len(run) > 1:
                    spec["expr"] = self.verdict_map_expr(table.family, run, places.get(chain.name, frozenset()))
                    commands.append({"add": {"rule": spec}})
                    continue
                spec["expr"] = self.rule_expr(table.family, rule, places.get(chain.name, frozenset()))
                if rule.comment is not None:
                    if len(rule.comment.encode()) > MAX_COMMENT - 1:
                        raise UnsupportedError(self.name, rule, f"nft comments hold at most {MAX_COMMENT - 1} bytes")
                    spec["comment"] = rule.comment
                commands.append({"add": {"rule": spec}})
        return commands

    def check_base(self, chain: Chain) -> None:
        base = chain.base
        assert base is not None
        if base.type is ChainType.ROUTE and base.hook is not Hook.OUTPUT:
            raise UnsupportedError(self.name, chain, "nft route chains exist only at the output hook")
        if base.type is ChainType.NAT and base.hook is Hook.FORWARD:
            raise UnsupportedError(self.name, chain, "nft has no nat chains at the forward hook")

    def places(self, table: Table) -> dict[str, frozenset[Place]]:
        """For every chain, the base chains it can run under (through jumps and gotos)."""
        by_name = {c.name: c for c in table.chains}
        result: dict[str, set[Place]] = {}
        for chain in table.chains:
            if chain.base is None:
                continue
            place = Place(chain.base.hook, chain.base.type, chain.base.priority)
            todo = [chain.name]
            while todo:
                name = todo.pop()
                places = result.setdefault(name, set())
                if place in places:
                    continue
                places.add(place)
                for rule in by_name[name].rules if name in by_name else ():
                    if isinstance(rule.target, (Jump, Goto)) and rule.target.chain in by_name:
                        todo.append(rule.target.chain)
        return {name: frozenset(places) for name, places in result.items()}

    # ----------------------------------------------------------------------------- rules

    def rule_expr(self, family: Family, rule: Rule, places: Iterable[Place] = ()) -> list[Json]:
        """The statements of one laid-out rule."""
        places = tuple(places)
        for match in rule.matches:
            self.check_place(match, places)
        self.check_place(rule.target, places)
        expr = [self.match_expr(family, match) for match in rule.matches]
        if self.counters:
            expr.append({"counter": None})
        expr += self.target_statements(family, rule)
        return expr

    def verdict_map_expr(self, family: Family, run: list[Rule], places: Iterable[Place] = ()) -> list[Json]:
        """One lookup for a run of rules on one key with disjoint sets and distinct verdicts (see :func:`merge_lookups`)."""
        places = tuple(places)
        pairs: list[Json] = []
        left: Json = None
        for rule in run:
            self.check_place(rule.target, places)
            match = self.match_expr(family, rule.matches[0])["match"]
            left = match["left"]
            (verdict,) = self.target_statements(family, rule)
            right = match["right"]
            for member in right["set"] if isinstance(right, dict) and "set" in right else [right]:
                pairs.append([member, verdict])
        expr: list[Json] = [{"counter": None}] if self.counters else []
        return [*expr, {"vmap": {"key": left, "data": {"set": pairs}}}]

    def check_place(self, node: Match | Target, places: tuple[Place, ...]) -> None:
        """Refuse what cannot run where the rule can run (the kernel would reject it, or it would never act)."""
        for place in places:
            problem = _misplaced(node, place)
            if problem:
                raise UnsupportedError(self.name, node, problem)

    def match_expr(self, family: Family, match: Match) -> Json:
        op = "!=" if getattr(match, "negate", False) else "=="
        match match:
            case ProtocolMatch():
                return _match(op, {"meta": {"key": "l4proto"}}, match.protocol.value)
            case FamilyMatch():
                if family is not Family.INET:
                    raise UnsupportedError(self.name, match, "meta nfproto is only meaningful in an inet table")
                return _match("==", {"meta": {"key": "nfproto"}}, _nfproto(match))
            case AddressMatch():
                versions = {n.version for n in match.addresses}
                if len(versions) != 1:
                    raise UnsupportedError(self.name, match, "one nft match holds addresses of one IP version")
                (version,) = versions
                if _version_of(family) not in (None, version):
                    raise UnsupportedError(self.name, match, f"IPv{version} addresses in an {family.value} table")
                field = "saddr" if match.direction is Direction.SOURCE else "daddr"
                left: Json = {"payload": {"protocol": "ip" if version == 4 else "ip6", "field": field}}
                return _match(op, left, _set_of([_network_value(n) for n in match.addresses]))
            case PortMatch():
                if match.protocol not in _PORT_PROTOCOLS:
                    raise UnsupportedError(self.name, match, f"{match.protocol.value} has no ports")
                if not match.ports:
                    raise UnsupportedError(self.name, match, "an empty port set")
                field = "sport" if match.direction is Direction.SOURCE else "dport"
                left = {"payload": {"protocol": match.protocol.value, "field": field}}
                return _match(op, left, _interval_value(match.ports))
            case InterfaceMatch():
                key = "iifname" if match.direction is Direction.SOURCE else "oifname"
                return _match(op, {"meta": {"key": key}}, self._interface(match))
            case OwnerMatch():
                if match.socketless:
                    raise UnsupportedError(
                        self.name,
                        match,
                        "meta skuid/skgid never match a packet without a socket; this match must (socketless=True)",
                    )
                if not match.ids:
                    raise UnsupportedError(self.name, match, "an empty id set")
                key = "skuid" if match.kind is OwnerKind.UID else "skgid"
                return _match(op, {"meta": {"key": key}}, _interval_value(match.ids))
            case MarkMatch() | ConnmarkMatch():
                if match.mask == 0:
                    raise UnsupportedError(self.name, match, "a mark match with mask 0 tests nothing")
                register = _MARK if isinstance(match, MarkMatch) else _CTMARK
                left = register if match.mask == FULL_MASK else {"&": [register, match.mask]}
                return _match(op, left, match.value)
            case CtStateMatch():
                if not match.states:
                    raise UnsupportedError(self.name, match, "an empty conntrack state set")
                missing = match.states - CTSTATE_NAMES.keys()
                if missing:
                    raise UnsupportedError(
                        self.name, match, "nft's ct state has no SNAT or DNAT state (they are ct status bits)"
                    )
                names = [name for state, name in CTSTATE_NAMES.items() if state in match.states]
                if len(names) == 1:
                    return _match("!=" if match.negate else "in", {"ct": {"key": "state"}}, names[0])
                return _match(op, {"ct": {"key": "state"}}, {"set": names})
            case AddrTypeMatch():
                if not match.types:
                    raise UnsupportedError(self.name, match, "an empty address type set")
                flags = ["saddr" if match.direction is Direction.SOURCE else "daddr"]
                if match.limit_interface:
                    flags.append("iif" if match.direction is Direction.SOURCE else "oif")
                names = [name for kind, name in ADDRTYPE_NAMES.items() if kind in match.types]
                right = names[0] if len(names) == 1 else {"set": names}
                return _match(op, {"fib": {"result": "type", "flags": flags}}, right)
            case IpSetMatch():
                raise UnsupportedError(self.name, match, "nftables cannot see ipsets; use an nft set")
            case StatisticMatch():
                raise UnsupportedError(
                    self.name, match, "xt_statistic's counters and random test have no exact nft form"
                )
            case UnknownMatch():
                if match.dialect != DIALECT:
                    raise UnsupportedError(self.name, match, f"an unknown {match.dialect} match has no nftables form")
                return json.loads(match.tokens[0])
            case _:
                assert_never(match)

    def _interface(self, match: InterfaceMatch) -> str:
        name = match.name
        if not name or any(ch in name[:-1] for ch in '+*\\"') or name[-1] in '*\\"':
            raise UnsupportedError(self.name, match, "nft interface names cannot hold '*', '\\', '\"' or an inner '+'")
        return name[:-1] + "*" if name.endswith("+") else name

    def target_statements(self, family: Family, rule: Rule) -> list[Json]:
        target = rule.target
        match target:
            case Accept():
                return [{"accept": None}]
            case Drop():
                return [{"drop": None}]
            case Return():
                return [{"return": None}]
            case Continue():
                return []
            case Jump():
                return [{"jump": {"target": target.chain}}]
            case Goto():
                return [{"goto": {"target": target.chain}}]
            case Redirect():
                spec: dict[str, Json] = _nat_flags(target)
                if target.ports is not None:
                    self._need_protocol(rule, target)
                    spec = {"port": self._single_range(target, target.ports), **spec}
                return [{"redirect": spec or None}]
            case TProxy():
                self._need_protocol(rule, target)
                spec = {}
                if target.address is not None:
                    if _version_of(family) not in (None, target.address.version):
                        raise UnsupportedError(self.name, target, f"an IPv{target.address.version} address here")
                    if family is Family.INET:
                        spec["family"] = "ip" if target.address.version == 4 else "ip6"
                    spec["addr"] = str(target.address)
                spec["port"] = target.port
                statements: list[Json] = [{"tproxy": spec}]
                if target.mark is not None:
                    statements.append(
                        {"mangle": {"key": _MARK, "value": _bit_function(_MARK, target.mark, target.mask)}}
                    )
                return [*statements, {"accept": None}]
            case SetMark():
                return [{"mangle": {"key": _MARK, "value": _bit_function(_MARK, target.value, target.mask)}}]
            case ConnmarkSave() | ConnmarkRestore():
                if target.nfmask != FULL_MASK or target.ctmask != FULL_MASK:
                    raise UnsupportedError(self.name, target, "nft copies whole marks only (no partial masks)")
                if isinstance(target, ConnmarkSave):
                    return [{"mangle": {"key": _CTMARK, "value": _MARK}}]
                return [{"mangle": {"key": _MARK, "value": _CTMARK}}]
            case ConnmarkSet():
                return [{"mangle": {"key": _CTMARK, "value": _bit_function(_CTMARK, target.value, target.mask)}}]
            case CtZone():
                return [{"mangle": {"key": {"ct": {"key": "zone"}}, "value": target.zone}}]
            case Masquerade():
                spec = _nat_flags(target)
                if target.ports is not None:
                    self._need_protocol(rule, target)
                    spec = {"port": self._single_range(target, target.ports), **spec}
                return [{"masquerade": spec or None}]
            case Snat() | Dnat():
                key = "snat" if isinstance(target, Snat) else "dnat"
                spec = {}
                if target.addresses is not None:
                    first, last = target.addresses.first, target.addresses.last
                    if first.version != last.version or _version_of(family) not in (None, first.version):
                        raise UnsupportedError(
                            self.name, target, f"addresses of another family in an {family.value} table"
                        )
                    if first > last:  # type: ignore[operator]
                        raise UnsupportedError(
                            self.name, target, "an address range whose first address is after its last"
                        )
                    if family is Family.INET:
                        spec["family"] = "ip" if first.version == 4 else "ip6"
                    spec["addr"] = str(first) if first == last else {"range": [str(first), str(last)]}
                if target.ports is not None:
                    self._need_protocol(rule, target)
                    spec["port"] = self._single_range(target, target.ports)
                if not spec:
                    raise UnsupportedError(self.name, target, "a NAT statement needs an address or a port")
                return [{key: spec | _nat_flags(target)}]
            case Reject():
                return [self._reject(family, target)]
            case Log():
                if target.level not in _LEVEL_NAMES:
                    raise UnsupportedError(self.name, target, "nft log levels are 0-7")
                if target.prefix is not None and len(target.prefix.encode()) > MAX_LOG_PREFIX:
                    raise UnsupportedError(self.name, target, f"nft log prefixes hold at most {MAX_LOG_PREFIX} bytes")
                spec = {}
                if target.prefix is not None:
                    spec["prefix"] = target.prefix
                if target.level != _DEFAULT_LOG_LEVEL:
                    spec["level"] = _LEVEL_NAMES[target.level]
                return [{"log": spec or None}]
            case UnknownTarget():
                if target.dialect != DIALECT:
                    raise UnsupportedError(
                        self.name, target, f"an unknown {target.dialect} target has no nftables form"
                    )
                statements = json.loads(target.tokens[0]) if target.tokens else []
                return list(statements)
            case _:
                assert_never(target)

    def _reject(self, family: Family, target: Reject) -> Json:
        if target.with_ == "tcp-reset":
            return {"reject": {"type": "tcp reset"}}
        if target.with_ is None and family is Family.INET:
            return {"reject": None}
        if target.with_ in ICMP_REJECT_CODES and family is Family.IPV4:
            return {"reject": {"type": "icmp", "expr": ICMP_REJECT_CODES[target.with_]}}
        if target.with_ in ICMPV6_REJECT_CODES and family is Family.IPV6:
            return {"reject": {"type": "icmpv6", "expr": ICMPV6_REJECT_CODES[target.with_]}}
        raise UnsupportedError(self.name, target, f"no nft reject code for {target.with_!r} in an {family.value} table")

    def _need_protocol(self, rule: Rule, target: Target) -> None:
        for match in rule.matches:
            if isinstance(match, PortMatch) or (
                isinstance(match, ProtocolMatch) and not match.negate and match.protocol in _PORT_PROTOCOLS
            ):
                return
        raise UnsupportedError(self.name, target, "nft maps ports only after a tcp, udp or sctp match in the rule")

    def _single_range(self, node: object, ports: PortSet) -> Json:
        if not ports.is_single():
            raise UnsupportedError(self.name, node, "nft NAT statements take one port or one range")
        lo, hi = ports.intervals[0]
        return lo if lo == hi else {"range": [lo, hi]}


# ----------------------------------------------------------------------------- helpers


#: nft's names of the NAT port-selection flags, in the order nft prints them.
NFT_NAT_FLAGS: Final = {
    NatFlag.RANDOM: "random",
    NatFlag.RANDOM_FULLY: "fully-random",
    NatFlag.PERSISTENT: "persistent",
}


def _nat_flags(target: Redirect | Masquerade | Snat | Dnat) -> dict[str, Json]:
    """``{"flags": ...}`` of a NAT statement (one name, or a list of them), or nothing."""
    names: list[Json] = [name for flag, name in NFT_NAT_FLAGS.items() if flag in target.flags]
    if not names:
        return {}
    return {"flags": names[0] if len(names) == 1 else names}


def _nfproto(match: FamilyMatch) -> str:
    return "ipv4" if match.family is Family.IPV4 else "ipv6"


def _match(op: str, left: Json, right: Json) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _set_of(values: list[Json]) -> Json:
    return values[0] if len(values) == 1 else {"set": values}


def _interval_value(values: IntervalSet) -> Json:
    items: list[Json] = [lo if lo == hi else {"range": [lo, hi]} for lo, hi in values.intervals]
    return _set_of(items)


def _network_value(network: IPNetwork) -> Json:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _bit_function(register: Json, value: int, mask: int) -> Json:
    """``register = (register & ~mask) ^ value`` as an nft expression."""
    if mask == FULL_MASK:
        return value
    keep = ~mask & FULL_MASK
    kept = register if keep == FULL_MASK else {"&": [register, keep]}
    return kept if value == 0 else {"^": [kept, value]}


def _with_tproxy_drops(rules: list[Rule]) -> list[Rule]:
    """After each TProxy rule, the same matches with drop (unless already there)."""
    out: list[Rule] = []
    for index, rule in enumerate(rules):
        out.append(rule)
        if isinstance(rule.target, TProxy):
            following = rules[index + 1] if index + 1 < len(rules) else None
            if not (following and isinstance(following.target, Drop) and following.matches == rule.matches):
                out.append(Rule(matches=rule.matches, target=Drop(), comment=TPROXY_DROP_COMMENT))
    return out


# ----------------------------------------------------------------------------- one lookup for many rules

_Verdict: TypeAlias = Accept | Drop | Return | Jump | Goto


def _lookup_key(rule: Rule) -> tuple[object, ...] | None:
    """What a rule looks up, if it is one positive set match with a verdict: (kind, details) or None."""
    if len(rule.matches) != 1 or rule.comment is not None or not isinstance(rule.target, _Verdict.__args__):  # type: ignore[attr-defined]
        return None
    match = rule.matches[0]
    if isinstance(match, AddressMatch) and not match.negate:
        versions = {n.version for n in match.addresses}
        return ("address", match.direction, versions.pop()) if len(versions) == 1 else None
    if isinstance(match, PortMatch) and not match.negate and match.protocol in _PORT_PROTOCOLS and match.ports:
        return ("port", match.protocol, match.direction)
    return None


def _members(match: Match) -> AddressSet | PortSet:
    assert isinstance(match, (AddressMatch, PortMatch))
    return match.addresses if isinstance(match, AddressMatch) else match.ports


def _with_members(match: Match, members: AddressSet | PortSet) -> Match:
    if isinstance(match, AddressMatch):
        assert isinstance(members, AddressSet)
        return attrs.evolve(match, addresses=members)
    assert isinstance(match, PortMatch) and isinstance(members, PortSet)
    return attrs.evolve(match, ports=members)


def _spans(members: AddressSet | PortSet) -> dict[int, list[tuple[int, int]]]:
    """Sorted, disjoint integer intervals per IP version (0 for ports): sets are normalised, so already sorted."""
    if isinstance(members, PortSet):
        return {0: list(members.intervals)}
    spans: dict[int, list[tuple[int, int]]] = {}
    for network in members:
        spans.setdefault(network.version, []).append((int(network.network_address), int(network.broadcast_address)))
    return {version: sorted(items) for version, items in spans.items()}


def _spans_disjoint(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return False
    return True


def _spans_minus(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``a`` without ``b``, in one sweep over both sorted lists."""
    out: list[tuple[int, int]] = []
    j = 0
    for lo, hi in a:
        while j < len(b) and b[j][1] < lo:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            if b[k][0] > lo:
                out.append((lo, b[k][0] - 1))
            lo = max(lo, b[k][1] + 1)
            if lo > hi:
                break
            k += 1
        if lo <= hi:
            out.append((lo, hi))
    return out


def _disjoint(a: AddressSet | PortSet, b: AddressSet | PortSet) -> bool:
    spans_b = _spans(b)
    return all(_spans_disjoint(items, spans_b.get(version, [])) for version, items in _spans(a).items())


def _difference(a: AddressSet | PortSet, b: AddressSet | PortSet) -> AddressSet | PortSet:
    spans_b = _spans(b)
    if isinstance(a, PortSet):
        return PortSet(tuple(_spans_minus(list(a.intervals), spans_b.get(0, []))))
    networks: list[IPNetwork] = []
    for version, items in _spans(a).items():
        kind = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for lo, hi in _spans_minus(items, spans_b.get(version, [])):
            networks.extend(ipaddress.summarize_address_range(kind(lo), kind(hi)))  # type: ignore[arg-type]
    return AddressSet(tuple(networks))


def _union(a: AddressSet | PortSet, b: AddressSet | PortSet) -> AddressSet | PortSet:
    if isinstance(a, PortSet):
        assert isinstance(b, PortSet)
        return a.union(b)
    assert isinstance(b, AddressSet)
    return AddressSet(a.networks + b.networks)


def merge_lookups(rules: Iterable[Rule]) -> list[Rule]:
    """Consecutive rules that look up one key become one lookup: a set (one verdict) or a verdict map.

    A run of rules, each one positive address or port set with a verdict, is
    exactly one lookup whose entries are each rule's set minus the sets before
    it (a packet met the first rule that matched), provided that no packet
    could come back from a ``jump`` and match a later rule of the run: the set
    of every jump rule must be disjoint from the sets after it (otherwise the
    run is cut there). The result, in IR, is one rule per verdict (in
    :func:`~meshredirect.readers.nftables.verdict_order`), with disjoint sets:
    the order no longer matters, and the nftables JSON holds it as one
    ``vmap`` (or one set when there is a single verdict).

    >>> from meshredirect.values import AddressSet
    >>> def to(cidrs, target):
    ...     return Rule(matches=(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of(*cidrs)),), target=target)
    >>> merged = merge_lookups([to(["127.0.0.1"], Return()), to(["10.96.0.0/12"], Return()), to(["10.0.0.0/8"], Jump(chain="R"))])
    >>> [(str(r.matches[0].addresses), r.target) for r in merged]
    [('10.96.0.0/12,127.0.0.1/32', Return()), ('10.0.0.0/10,10.64.0.0/11,10.112.0.0/12,10.128.0.0/9', Jump(chain='R'))]
    """
    rules = list(rules)
    out: list[Rule] = []
    index = 0
    while index < len(rules):
        key = _lookup_key(rules[index])
        if key is None:
            out.append(rules[index])
            index += 1
            continue
        end = index
        while end < len(rules) and _lookup_key(rules[end]) == key:
            end += 1
        group: list[Rule] = []
        for rule in rules[index:end]:
            jumps = [g for g in group if isinstance(g.target, Jump)]
            if any(not _disjoint(_members(g.matches[0]), _members(rule.matches[0])) for g in jumps):
                out.extend(_one_lookup(group))
                group = []
            group.append(rule)
        out.extend(_one_lookup(group))
        index = end
    return out


def _one_lookup(group: list[Rule]) -> list[Rule]:
    if len(group) < 2:
        return group
    covered: AddressSet | PortSet | None = None
    entries: dict[object, tuple[Target, AddressSet | PortSet]] = {}
    for rule in group:
        members = _members(rule.matches[0])
        entry = members if covered is None else _difference(members, covered)
        covered = members if covered is None else _union(covered, members)
        if not entry:
            continue  # shadowed by the rules before it
        target, sofar = entries.get(rule.target, (rule.target, None))  # type: ignore[arg-type]
        entries[rule.target] = (target, entry if sofar is None else _union(sofar, entry))
    template = group[0].matches[0]
    merged = [Rule(matches=(_with_members(template, members),), target=target) for target, members in entries.values()]
    return sorted(merged, key=lambda r: verdict_order(r.target))


def _verdict_map_runs(rules: Iterable[Rule]) -> list[list[Rule]]:
    """Split a chain's rules into runs: a run of several rules is one verdict map (as :func:`merge_lookups` leaves
    them: one key, distinct verdicts in verdict order, disjoint sets); every other rule is a run of one."""
    runs: list[list[Rule]] = []
    for rule in rules:
        key = _lookup_key(rule)
        last = runs[-1] if runs else None
        if (
            key is not None
            and last is not None
            and _lookup_key(last[0]) == key
            and all(r.target != rule.target for r in last)
            and verdict_order(last[-1].target) < verdict_order(rule.target)
            and all(_disjoint(_members(r.matches[0]), _members(rule.matches[0])) for r in last)
        ):
            last.append(rule)
        else:
            runs.append([rule])
    return runs


def _misplaced(node: Match | Target, place: Place) -> str | None:
    hook = place.hook
    if isinstance(node, InterfaceMatch):
        if node.direction is Direction.SOURCE and hook in _NO_INPUT_INTERFACE:
            return f"packets have no input interface at {hook.value}"
        if node.direction is Direction.DESTINATION and hook in _NO_OUTPUT_INTERFACE:
            return f"packets have no output interface yet at {hook.value}"
    elif isinstance(node, (Redirect, Dnat)):
        if place.chain_type is not ChainType.NAT or hook not in (Hook.PREROUTING, Hook.OUTPUT):
            return "redirect and dnat run in nat chains at prerouting or output"
    elif isinstance(node, (Snat, Masquerade)):
        if place.chain_type is not ChainType.NAT or hook not in (Hook.POSTROUTING, Hook.INPUT):
            return "snat and masquerade run in nat chains at postrouting or input"
    elif isinstance(node, TProxy):
        if hook is not Hook.PREROUTING or place.chain_type is not ChainType.FILTER:
            return "tproxy runs in filter chains at prerouting"
    elif isinstance(node, CtZone) and place.priority >= CONNTRACK_PRIORITY:
        return f"ct zone set must run before conntrack (priority below {CONNTRACK_PRIORITY}), not at {place.priority}"
    return None
