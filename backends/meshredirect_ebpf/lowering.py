"""IR to program plan: the nat OUTPUT chains become functions, their rules steps, their sets maps.

What the compiler decides for connections that local processes open lives in
the nat OUTPUT chains; a cgroup ``connect4``/``connect6`` hook sees exactly
those connections, at ``connect()``, before the first packet. The lowering
walks every chain reachable from a nat OUTPUT base chain, rule by rule, and
translates each match into a condition on what the hook knows:

======================  =================================================================
IR                      at connect time
======================  =================================================================
``-p``                  the socket's protocol
``-d`` / ``-s``         the destination / the bound source, else the route's preferred
                        source (LPM trie maps)
``--dport``             the destination port (hash map); ``--sport`` is refused (the
                        kernel picks it later)
``-o IFACE``            the interface of the destination's route in the environment's
                        routing tables (``-o lo``: the destination is a local address)
``--uid/gid-owner``     the connecting task's uid / gid (hash maps); there is always a
                        socket, so ``socketless`` never matters
``--ctstate``           NEW (a connection being opened)
``--mark``              the socket's mark (SO_MARK); ``connmark``: 0, a new connection's
``--dst-type LOCAL``    the destination is a local address
``REDIRECT``            rewrite the destination to 127.0.0.1 / ::1 (TCP only)
======================  =================================================================

Everything else is refused with :class:`~meshredirect.errors.UnsupportedError`
naming the node. Chains of other hooks and tables (nat PREROUTING for remote
inbound connections, mangle TPROXY, raw DNS zones) are refused too, unless
``local_only`` is set: then they are left out and listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final, assert_never

import attrs

from meshredirect.errors import UnsupportedError
from meshredirect.ir import (
    Accept,
    AddressMatch,
    AddrType,
    AddrTypeMatch,
    Chain,
    ChainType,
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
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.notation import describe_rule
from meshredirect.values import IPNetwork
from meshredirect_ebpf.environment import Environment
from meshredirect_ebpf.limits import HASH_ENTRIES_MAX, PORT_SETS_MAX
from meshredirect_ebpf.plan import (
    AcceptConnection,
    Action,
    AllOf,
    Call,
    Condition,
    Constant,
    Decision,
    Deny,
    DestinationIsLocal,
    EntryPoint,
    Field,
    Function,
    GoTo,
    IntegerSet,
    MarkIs,
    Member,
    Not,
    Nothing,
    OutputInterface,
    PrefixSet,
    Program,
    ProtocolIs,
    RedirectTo,
    ReturnToCaller,
    SetMap,
    Step,
)

__all__ = ["lower"]

BACKEND: Final = "ebpf"
#: The protocols whose sockets call connect(); None stands for every other protocol.
ANY_PROTOCOL: Final[frozenset[Protocol | None]] = frozenset({*Protocol, None})

_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_]")


def lower(ruleset: Ruleset, environment: Environment, *, local_only: bool = False) -> Program:
    """The program plan of a ruleset's nat OUTPUT chains (see the module docstring).

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> program = lower(compile_policy(Policy(inbound_ports="")), Environment.pod("10.0.0.5"))
    >>> [f.chain for f in program.decisions[0].functions]
    ['ISTIO_IN_REDIRECT', 'ISTIO_REDIRECT', 'ISTIO_OUTPUT', 'OUTPUT']
    >>> [s.name for s in program.sets]
    ['a4_0', 'a4_1', 'p_0', 'id_0']
    """
    return _Lowering(ruleset, environment, local_only=local_only).program()


def _unsupported(node: object, reason: str) -> UnsupportedError:
    return UnsupportedError(BACKEND, node, reason)


def _is_entry(chain: Chain) -> bool:
    return chain.base is not None and chain.base.hook is Hook.OUTPUT and chain.base.type is ChainType.NAT


def _left_out_reason(table: Table, chain: Chain) -> str:
    assert chain.base is not None
    hook, kind = chain.base.hook, chain.base.type.value
    if hook is Hook.PREROUTING:
        return (
            f"{table.family.value} {table.name} {chain.name} decides for connections arriving from other hosts; a cgroup "
            "connect hook sees only connections that local processes open, so capturing remote inbound connections "
            "needs another mechanism (render with local_only, --local-only on the command line, and install these chains with an iptables or nftables "
            "backend, or send mesh traffic to the peer's inbound port at the client's connect)"
        )
    return (
        f"{table.family.value} {table.name} {chain.name} is a {kind} chain of the {hook.value} hook: only the nat "
        "OUTPUT decision (where a local connection goes) is made at connect time (render with local_only, --local-only, "
        "to leave it to another backend)"
    )


def _summary(chain: Chain) -> Chain:
    """The chain without its rules: names it in an error without printing every rule."""
    return attrs.evolve(chain, rules=())


# ----------------------------------------------------------------------------- descriptions


# ----------------------------------------------------------------------------- constant folding


def _not(condition: Condition) -> Condition:
    if isinstance(condition, Constant):
        return Constant(value=not condition.value)
    if isinstance(condition, Not):
        return condition.operand
    return Not(operand=condition)


def _all(conditions: Iterable[Condition]) -> Condition:
    kept: list[Condition] = []
    for condition in conditions:
        if isinstance(condition, Constant):
            if not condition.value:
                return condition
            continue
        kept += condition.operands if isinstance(condition, AllOf) else [condition]
    if not kept:
        return Constant(value=True)
    if len(kept) == 1:
        return kept[0]
    return AllOf(operands=tuple(kept))


# ----------------------------------------------------------------------------- the lowering


class _FunctionNames:
    """C identifiers of the chains of one family: ``mr4_ISTIO_OUTPUT``, made unique."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.names: dict[tuple[str, str], str] = {}
        self.used: set[str] = set()

    def __call__(self, table: Table, chain: str) -> str:
        key = (table.name, chain)
        if key not in self.names:
            base = f"mr{self.family.version}_" + (_NOT_IDENTIFIER.sub("_", chain) or "chain")
            candidate, n = base, 1
            while candidate in self.used:
                n += 1
                candidate = f"{base}_{n}"
            self.used.add(candidate)
            self.names[key] = candidate
        return self.names[key]


class _Lowering:
    def __init__(self, ruleset: Ruleset, environment: Environment, *, local_only: bool) -> None:
        self.ruleset = ruleset
        self.environment = environment
        self.local_only = local_only
        self.sets: dict[tuple[object, ...], SetMap] = {}
        self.counters: dict[str, int] = {}
        self.names = _FunctionNames(Family.IPV4)

    def program(self) -> Program:
        left_out: list[str] = []
        for table in self.ruleset.tables:
            for chain in table.chains:
                if chain.base is None or _is_entry(chain):
                    continue
                if not self.local_only:
                    raise _unsupported(_summary(chain), _left_out_reason(table, chain))
                base = chain.base
                left_out.append(
                    f"{table.family.value} {table.name} {chain.name} ({base.type.value} chain of {base.hook.value})"
                )
        decisions = []
        for family in (Family.IPV4, Family.IPV6):
            tables = [
                t for t in self.ruleset.tables if t.family in (family, Family.INET) and any(map(_is_entry, t.chains))
            ]
            if tables:
                decisions.append(self.decision(family, tables))
        return Program(
            decisions=tuple(decisions),
            sets=tuple(self.sets.values()),
            environment=self.environment,
            left_out=tuple(left_out),
        )

    # -- one family -------------------------------------------------------------

    def decision(self, family: Family, tables: list[Table]) -> Decision:
        self.names = _FunctionNames(family)
        identifier = self.names
        entries: list[tuple[Table, Chain]] = [(t, c) for t in tables for c in t.chains if _is_entry(c)]
        entries.sort(key=lambda tc: tc[1].base.priority)  # type: ignore[union-attr]
        order = list(self._post_order(entries))
        contexts = self._protocol_contexts(order)
        functions = []
        for table, chain in order:
            steps = tuple(
                self.step(family, table, chain, index=index, rule=rule, context=contexts[(table.name, chain.name)])
                for index, rule in enumerate(chain.rules, start=1)
            )
            functions.append(
                Function(name=identifier(table, chain.name), chain=chain.name, table=table.name, steps=steps)
            )
        entry_points = tuple(
            EntryPoint(
                function=identifier(table, chain.name),
                policy=chain.base.policy,  # type: ignore[union-attr]
                priority=chain.base.priority,  # type: ignore[union-attr]
            )
            for table, chain in entries
        )
        return Decision(family=family, entries=entry_points, functions=tuple(functions))

    def _callees(self, table: Table, chain: Chain) -> Iterator[tuple[Rule, Chain]]:
        for rule in chain.rules:
            if isinstance(rule.target, (Jump, Goto)):
                if not table.has_chain(rule.target.chain):
                    raise _unsupported(rule.target, f"table {table.name} has no chain {rule.target.chain!r}")
                yield rule, table.chain(rule.target.chain)

    def _post_order(self, entries: list[tuple[Table, Chain]]) -> Iterator[tuple[Table, Chain]]:
        """Every chain reachable from the entries, callees first; a cycle is refused (BPF has no recursion)."""
        done: set[tuple[str, str]] = set()
        active: list[tuple[str, str]] = []

        def visit(table: Table, chain: Chain) -> Iterator[tuple[Table, Chain]]:
            key = (table.name, chain.name)
            if key in done:
                return
            if key in active:
                cycle = " -> ".join(name for _, name in active[active.index(key) :]) + f" -> {chain.name}"
                raise _unsupported(_summary(chain), f"the chains call each other in a cycle ({cycle})")
            active.append(key)
            for _, callee in self._callees(table, chain):
                yield from visit(table, callee)
            active.pop()
            done.add(key)
            yield table, chain

        for table, chain in entries:
            yield from visit(table, chain)

    def _protocol_contexts(self, order: list[tuple[Table, Chain]]) -> dict[tuple[str, str], frozenset[Protocol | None]]:
        """Which protocols can reach each chain (an over-approximation: earlier verdicts are ignored)."""
        contexts: dict[tuple[str, str], frozenset[Protocol | None]] = {}
        for table, chain in reversed(order):  # callers before callees
            key = (table.name, chain.name)
            if _is_entry(chain):
                contexts[key] = ANY_PROTOCOL
            here = contexts.get(key, frozenset())
            for rule, callee in self._callees(table, chain):
                callee_key = (table.name, callee.name)
                contexts[callee_key] = contexts.get(callee_key, frozenset()) | _rule_protocols(rule, here)
        return contexts

    # -- one rule ----------------------------------------------------------------

    def step(
        self,
        family: Family,
        table: Table,
        chain: Chain,
        *,
        index: int,
        rule: Rule,
        context: frozenset[Protocol | None],
    ) -> Step:
        where = f"{family.value} {chain.name} rule {index}"
        condition = _all(self.condition(family, match, where) for match in rule.matches)
        action = self.action(table, rule, context)
        origin = f"{table.name} {chain.name} rule {index}: {describe_rule(rule)}"
        if rule.comment:
            origin += f" ({rule.comment})"
        return Step(condition=condition, action=action, origin=origin)

    def condition(self, family: Family, match: Match, where: str) -> Condition:
        match match:
            case ProtocolMatch():
                condition: Condition = ProtocolIs(protocol=match.protocol)
                return _not(condition) if match.negate else condition
            case FamilyMatch():
                return Constant(value=match.family in (family, Family.INET))
            case AddressMatch():
                networks = tuple(n for n in match.addresses if n.version == family.version)
                if not networks:
                    # The IR's rule: an address of the other IP version never matches, negated or
                    # not; an empty set holds no address of any version.
                    return Constant(value=match.negate and not match.addresses)
                side = "source" if match.direction is Direction.SOURCE else "destination"
                prefix_map = self.prefix_set(family, networks, f"{where}: {side}", match)
                field = Field.SOURCE if match.direction is Direction.SOURCE else Field.DESTINATION
                condition = Member(field=field, map=prefix_map.name)
                return _not(condition) if match.negate else condition
            case PortMatch():
                if match.direction is Direction.SOURCE:
                    raise _unsupported(
                        match, "the source port of a connection is chosen by the kernel after connect() runs"
                    )
                protocol = ProtocolIs(protocol=match.protocol)
                if not match.ports:
                    return _all([protocol, Constant(value=match.negate)])
                port_map = self.integer_set(16, match.ports.intervals, f"{where}: destination port", match)
                member: Condition = Member(field=Field.DESTINATION_PORT, map=port_map.name)
                return _all([protocol, _not(member) if match.negate else member])
            case InterfaceMatch():
                if match.direction is Direction.SOURCE:
                    raise _unsupported(match, "a connection opened by a local process has no input interface")
                positive = attrs.evolve(match, negate=False)
                names = tuple(n for n in self.environment.interfaces if positive.matches(n))
                condition = OutputInterface(interfaces=names) if names else Constant(value=False)
                return _not(condition) if match.negate else condition
            case OwnerMatch():
                field = Field.UID if match.kind is OwnerKind.UID else Field.GID
                if not match.ids:
                    return Constant(value=match.negate)
                id_map = self.integer_set(32, match.ids.intervals, f"{where}: {match.kind.value}", match)
                condition = Member(field=field, map=id_map.name)
                return _not(condition) if match.negate else condition
            case CtStateMatch():
                # connect() opens a new connection: conntrack will call it NEW.
                return Constant(value=(CtState.NEW in match.states) != match.negate)
            case AddrTypeMatch():
                if match.direction is Direction.DESTINATION and match.types == {AddrType.LOCAL}:
                    if match.limit_interface:
                        raise _unsupported(match, "--limit-iface-out needs the outgoing interface's own addresses")
                    condition = DestinationIsLocal()
                    return _not(condition) if match.negate else condition
                raise _unsupported(match, "only the destination type LOCAL is known at connect time")
            case MarkMatch():
                # The socket's SO_MARK: the packet mark at nat OUTPUT unless a mangle rule changes it
                # (mangle chains are not part of the program; see the environment's assumption).
                condition = MarkIs(value=match.value, mask=match.mask)
                return _not(condition) if match.negate else condition
            case ConnmarkMatch():
                # conntrack creates a new connection's mark as 0; only rules the program does not run set it.
                return Constant(value=((0 & match.mask) == match.value) != match.negate)
            case IpSetMatch():
                raise _unsupported(match, "an ipset's members live outside the ruleset")
            case StatisticMatch():
                raise _unsupported(match, "a random or every-nth match has no deterministic equivalent to check")
            case UnknownMatch():
                raise _unsupported(match, f"an unknown {match.dialect} match")
            case _:
                assert_never(match)

    def action(self, table: Table, rule: Rule, context: frozenset[Protocol | None]) -> Action:
        target = rule.target
        match target:
            case Accept():
                return AcceptConnection()
            case Return():
                return ReturnToCaller()
            case Continue():
                return Nothing()
            case Drop():
                return Deny()
            case Jump():
                return Call(function=self.names(table, target.chain))
            case Goto():
                return GoTo(function=self.names(table, target.chain))
            case Redirect():
                if target.flags:
                    flags = ", ".join(f"--{flag.value}" for flag in NatFlag if flag in target.flags)
                    raise _unsupported(
                        target, f"{flags}: connect() rewrites to one fixed port; it has no NAT port selection to flag"
                    )
                others = _rule_protocols(rule, context) - {Protocol.TCP, Protocol.UDP}
                if others:
                    shown = ", ".join(sorted(p.value if p else "other" for p in others))
                    raise _unsupported(
                        rule,
                        f"this REDIRECT can be reached by {shown} connections; the program redirects TCP and UDP "
                        "only (the protocols whose sockets connect() and sendmsg() hooks rewrite)",
                    )
                if target.ports is None:
                    return RedirectTo(port=None)
                if len(target.ports) != 1:
                    raise _unsupported(target, "a redirect to a range of ports (connect() rewrites to one port)")
                return RedirectTo(port=target.ports.intervals[0][0])
            case TProxy():
                raise _unsupported(
                    target, "TPROXY hands packets arriving from outside to a transparent socket; connect() sees none"
                )
            case SetMark() | ConnmarkSave() | ConnmarkRestore() | ConnmarkSet():
                raise _unsupported(target, "marks belong to packets and conntrack, which do not exist at connect()")
            case CtZone():
                raise _unsupported(target, "conntrack zones are chosen in the raw table, not at connect()")
            case Masquerade() | Snat():
                raise _unsupported(target, "source NAT happens in POSTROUTING, after routing")
            case Dnat():
                raise _unsupported(target, "DNAT to another host is not implemented (only REDIRECT)")
            case Reject():
                raise _unsupported(target, "a rejection's error differs from a refused connect(); not implemented")
            case Log():
                raise _unsupported(target, "logging from the connect hook is not implemented")
            case UnknownTarget():
                raise _unsupported(target, f"an unknown {target.dialect} target")
            case _:
                assert_never(target)

    # -- maps ----------------------------------------------------------------------

    def _name(self, kind: str) -> tuple[str, int]:
        """A new set's name and its number among the sets of its map."""
        n = self.counters.get(kind, 0)
        self.counters[kind] = n + 1
        return f"{kind}_{n}", n

    def _reuse(self, key: tuple[object, ...], purpose: str) -> PrefixSet | IntegerSet | None:
        """The set already made for ``key``, with ``purpose`` added to its purposes (None when there is none)."""
        existing = self.sets.get(key)
        if existing is None:
            return None
        if purpose not in existing.purpose.split("; "):
            existing = attrs.evolve(existing, purpose=f"{existing.purpose}; {purpose}")
            self.sets[key] = existing
        return existing

    def prefix_set(self, family: Family, networks: tuple[IPNetwork, ...], purpose: str, node: object) -> PrefixSet:
        key: tuple[object, ...] = ("prefix", family.version, networks)
        existing = self._reuse(key, purpose)
        if existing is not None:
            assert isinstance(existing, PrefixSet)
            return existing
        name, index = self._name(f"a{family.version}")
        created = PrefixSet(name=name, index=index, version=family.version, networks=networks, purpose=purpose)
        self.sets[key] = created
        return created

    def integer_set(self, bits: int, intervals: tuple[tuple[int, int], ...], purpose: str, node: object) -> IntegerSet:
        key: tuple[object, ...] = ("integer", bits, intervals)
        existing = self._reuse(key, purpose)
        if existing is not None:
            assert isinstance(existing, IntegerSet)
            return existing
        kind = "p" if bits == 16 else "id"
        if kind == "p" and self.counters.get(kind, 0) >= PORT_SETS_MAX:
            raise _unsupported(
                node, f"more than {PORT_SETS_MAX} distinct port sets (the key holds a 16-bit set number)"
            )
        name, index = self._name(kind)
        created = IntegerSet(name=name, index=index, bits=bits, intervals=intervals, purpose=purpose)
        total = created.size + sum(s.size for s in self.sets.values() if isinstance(s, IntegerSet) and s.bits == bits)
        if total > HASH_ENTRIES_MAX:
            what = "port" if bits == 16 else "uid and gid"
            raise _unsupported(
                node,
                f"the policy's {what} sets hold {total} values together with this one; their hash map holds at most "
                f"{HASH_ENTRIES_MAX} (kernel/bpf/hashtab.c: U32_MAX / sizeof(struct bucket) buckets)",
            )
        self.sets[key] = created
        return created


def _rule_protocols(rule: Rule, context: frozenset[Protocol | None]) -> frozenset[Protocol | None]:
    """The protocols a connection can have when it matches ``rule``, reached with ``context``."""
    possible = context
    for match in rule.matches:
        if isinstance(match, ProtocolMatch):
            possible = possible - {match.protocol} if match.negate else possible & {match.protocol}
        elif isinstance(match, PortMatch):
            possible = possible & {match.protocol}
    return possible
