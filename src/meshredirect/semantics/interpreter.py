"""The interpreter: what a ruleset does to the first packet of one new connection.

:func:`evaluate` runs a :class:`~meshredirect.ir.Ruleset` over a
:class:`~meshredirect.semantics.model.Connection` in an
:class:`~meshredirect.semantics.model.Environment` and returns an
:class:`Evaluation`: the ``Verdict`` (where the connection ends up), the
trace (every rule visited, matched or not, in order) and the connection as
the rules rewrote it.

The path through the hooks, as netfilter walks it:

- a LOCAL connection: OUTPUT (out the interface the route function gives),
  then POSTROUTING; when it leaves over ``lo`` (a local destination) it
  loops back: PREROUTING on ``lo``, then INPUT, then local delivery. A change
  of destination (nat) or of mark (a ``route`` chain, iptables' mangle
  OUTPUT) reroutes it.
- a REMOTE connection: PREROUTING on its incoming interface; then local
  delivery (INPUT) when the destination is local or its mark is routed
  locally, else FORWARD and POSTROUTING when the pod forwards, else a drop.

At each hook the base chains of the connection's family (and of ``inet``
tables) run in the order of their priorities (equal priorities: ruleset
order; nftables leaves it undefined). Conntrack attaches at priority -200.

Kernel facts encoded here (each has a unit test in ``tests/test_interpreter.py``):

1. NAT is decided once per connection, on its first packet: nat chains of a
   hook run only while the connection's destination (PREROUTING, OUTPUT) or
   source (INPUT, POSTROUTING) mapping is undecided; the first binding wins
   and ends the nat chains of that hook; when no chain binds, the kernel makes
   a null binding. So a connection that looped back over ``lo`` never meets
   nat PREROUTING when nat OUTPUT existed, while mangle PREROUTING sees it.
   Every nat chain runs at the nat core's priority (-100 for destination,
   100 for source mappings), ordered among the nat chains by its own.
2. REDIRECT in OUTPUT rewrites the destination to 127.0.0.1 (::1); in
   PREROUTING to the first address of the incoming interface (no address:
   dropped). A port range keeps the original port when inside it, else
   takes its lowest port.
3. ACCEPT (and a NAT binding, and TPROXY) ends the current base chain, which
   for iptables is the table at that hook; the next base chain still runs.
   DROP and REJECT end everything.
4. jump pushes a return frame, goto does not, RETURN (or the end of a chain)
   pops one; with no frame left the base chain's policy applies.
5. ``-m owner`` sees a socket only in OUTPUT and POSTROUTING; a packet
   without one gets :attr:`~meshredirect.ir.OwnerMatch.socketless`
   (``xt_owner``: true exactly when negated; nft ``meta skuid``: false).
6. TPROXY (PREROUTING) sets the mark and assigns the connection to a
   transparent listener on its port (address: its own, else the incoming
   interface's first address); the packet is then delivered locally when its
   mark is routed locally or its destination is local.
7. MARK and CONNMARK follow iptables' xor-and-mask arithmetic; the packet
   mark survives the loop over ``lo``; the socket does not.
8. CT zones: the first template wins; a packet whose connection is already
   tracked (it looped back) cannot get one.
9. Conntrack state: INVALID before conntrack attaches (raw), then NEW
   (plus DNAT / SNAT once a mapping changed the connection).
10. A match the interpreter cannot decide (ipset, unknown matches,
    ``addrtype --limit-iface``) is "unknown", never a silent match: a rule
    with an unknown match and a target with an effect ends the evaluation
    with :class:`Unknown`; an unknown target does too. So is a test of the
    source port after a NAT target picked it at random (``--random``,
    ``--random-fully``: where the connection goes does not change, which
    port it leaves from does), and a destination NAT to a range of ports
    with ``--random``.
11. A ``statistic`` match (random, or every n-th packet) may go either way
    for the first packet of a new connection: it is a *choice point*. The
    rule's other matches are tested first; when they hold, the evaluation
    takes one outcome: the one ``choices`` forces, else the tracer's (the
    proof explorer branches and covers both), else :data:`DEFAULT_CHOICE`
    (matched). The trace notes the choice on the rule's visit and
    :attr:`Evaluation.choices` lists the outcomes taken;
    :meth:`Interpreter.evaluate_all` gives every possible evaluation. A
    probability of 1 (or ``--every 1``) always matches and 0 never does.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> from meshredirect.semantics.model import Connection, Environment
>>> env = Environment.for_policy(Policy())
>>> app = Connection.local(env, dst="93.184.216.34", dport=80, uid=1000, gid=1000)
>>> evaluate(compile_policy(Policy()), app, env).verdict
Redirected(address=IPv4Address('127.0.0.1'), port=15001)
>>> proxy = Connection.local(env, dst="93.184.216.34", dport=80, uid=1337, gid=1337)
>>> evaluate(compile_policy(Policy()), proxy, env).verdict
Passed(address=IPv4Address('93.184.216.34'), port=80, local=False)
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, assert_never

import attrs

from meshredirect.ir import (
    CONNTRACK_PRIORITY,
    Accept,
    AddressMatch,
    AddressRange,
    AddrType,
    AddrTypeMatch,
    BaseChain,
    Chain,
    ChainPolicy,
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
from meshredirect.notation import describe_match, describe_rule
from meshredirect.semantics.explore import Eq, In, MarkSym, Mirror, Sym, Tracer, subtract_part
from meshredirect.semantics.model import LOOPBACK_INTERFACE, Connection, Environment, Origin, Socket
from meshredirect.values import MAX_MARK, AddressSet, IdSet, IPAddress, PortSet

if TYPE_CHECKING:
    from meshredirect.semantics.symmetry import Candidate, Mirrors, Partner

__all__ = [
    "DEFAULT_CHOICE",
    "ROUTED",
    "ChainEnd",
    "Choices",
    "Dropped",
    "Evaluation",
    "Event",
    "Interpreter",
    "MatchResult",
    "Passed",
    "Redirected",
    "RuleVisit",
    "TProxied",
    "TraceEntry",
    "Unknown",
    "Verdict",
    "evaluate",
]

#: Priority at which every nat chain of a hook runs (the nat core's hook), per mapping kind.
NAT_DESTINATION_PRIORITY: Final = -100
NAT_SOURCE_PRIORITY: Final = 100
#: Hooks whose nat chains decide the destination mapping; the others decide the source mapping.
DESTINATION_NAT_HOOKS: Final = frozenset({Hook.PREROUTING, Hook.OUTPUT})
#: Hooks where a packet still carries its socket.
SOCKET_HOOKS: Final = frozenset({Hook.OUTPUT, Hook.POSTROUTING})
#: In ``symbols``: the outgoing interface is the route function's answer for the destination and mark.
ROUTED: Final = "route"
#: Runs of more consecutive rules of a chain that do not match are shortened in :meth:`Evaluation.explain`.
ELIDE_AFTER: Final = 12
#: A guard against rulesets whose chains jump in circles (the kernel refuses to load those).
MAX_RULE_VISITS: Final = 100_000
LOOPBACK_V4: Final = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK_V6: Final = ipaddress.IPv6Address("::1")
_BROADCAST_V4: Final = ipaddress.IPv4Address("255.255.255.255")
_ZERONET_V4: Final = ipaddress.IPv4Network("0.0.0.0/8")

# A prepared match: (kind, ...) with the kinds below (see Interpreter._plan).
_Plan: TypeAlias = tuple[Any, ...]
_PROTOCOL: Final = "protocol"
_FAMILY: Final = "family"
_ADDRESS: Final = "address"
_PORT: Final = "port"
_IIF: Final = "iif"
_OIF: Final = "oif"
_OWNER: Final = "owner"
_MARK: Final = "mark"
_CTMARK: Final = "ctmark"
_CTSTATE: Final = "ctstate"
_ADDRTYPE: Final = "addrtype"
_UNKNOWN: Final = "unknown"
_CHOICE: Final = "choice"
_CONSTANT: Final = "constant"
#: NAT flags that make the kernel pick a port at random.
_RANDOM_PORTS: Final = frozenset({NatFlag.RANDOM, NatFlag.RANDOM_FULLY})


def _member_test(members: Any) -> Callable[[Any], Hashable]:
    """``value in members``, as fast as the members allow."""
    if isinstance(members, PortSet | IdSet) and len(members) <= _SMALL_SET:
        flat = frozenset(members)
        return flat.__contains__
    if isinstance(members, AddressSet) and all(n.num_addresses == 1 for n in members):
        hosts = frozenset(n.network_address for n in members)
        return hosts.__contains__
    return members.__contains__  # type: ignore[no-any-return]


#: Port and id sets up to this size are tested as hash sets.
_SMALL_SET: Final = 4096

# ----------------------------------------------------------------------------- verdicts


@attrs.frozen(kw_only=True)
class Passed:
    """The connection goes on to its own destination, unchanged: delivered locally or sent out."""

    address: IPAddress
    port: int
    local: bool

    def __str__(self) -> str:
        where = "delivered locally" if self.local else "sent out"
        return f"passed to {_endpoint(self.address, self.port)} ({where})"


@attrs.frozen(kw_only=True)
class Redirected:
    """NAT rewrote the destination (REDIRECT or DNAT): the connection goes to ``address:port``."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        return f"redirected to {_endpoint(self.address, self.port)}"


@attrs.frozen(kw_only=True)
class TProxied:
    """TPROXY handed the connection to a transparent listener on ``port`` (of ``address``), marked ``mark``."""

    port: int
    address: IPAddress
    mark: int

    def __str__(self) -> str:
        return f"TPROXY to {_endpoint(self.address, self.port)} with mark {self.mark:#x}"


@attrs.frozen(kw_only=True)
class Dropped:
    """The packet is dropped (``reject``: with an error sent back). The reason is for display only."""

    reject: bool = False
    reason: str = attrs.field(default="", eq=False)

    def __str__(self) -> str:
        return ("rejected" if self.reject else "dropped") + (f" ({self.reason})" if self.reason else "")


@attrs.frozen(kw_only=True)
class Unknown:
    """The interpreter cannot decide: a match or target it does not model was reached."""

    reason: str

    def __str__(self) -> str:
        return f"unknown: {self.reason}"


Verdict: TypeAlias = Passed | Redirected | TProxied | Dropped | Unknown

# ----------------------------------------------------------------------------- trace


class MatchResult(enum.Enum):
    MATCHED = "matched"
    NOT_MATCHED = "no match"
    UNKNOWN = "unknown"


@attrs.frozen(kw_only=True)
class RuleVisit:
    """One rule the packet met: where it stands (``index`` counts from 1) and whether it matched."""

    hook: Hook
    family: Family
    table: str
    chain: str
    index: int
    rule: Rule
    result: MatchResult
    #: What the rule did when it matched (e.g. "mark 0x0 -> 0x539"), or why its match is unknown.
    note: str | None = None

    def __str__(self) -> str:
        text = f"{self.table} {self.chain} #{self.index}: {describe_rule(self.rule)}  [{self.result.value}]"
        return text + (f" {self.note}" if self.note else "")


@attrs.frozen(kw_only=True)
class ChainEnd:
    """A chain ran out of rules or returned; for a base chain, its policy applied."""

    hook: Hook
    family: Family
    table: str
    chain: str
    outcome: str

    def __str__(self) -> str:
        return f"{self.table} {self.chain}: {self.outcome}"


@attrs.frozen(kw_only=True)
class Event:
    """Something the kernel does between rules: a hook begins, a reroute, a skipped nat chain."""

    hook: Hook | None
    text: str

    def __str__(self) -> str:
        return self.text


TraceEntry: TypeAlias = RuleVisit | ChainEnd | Event


@attrs.frozen(kw_only=True)
class Evaluation:
    """What a ruleset does to one connection.

    ``original`` is the connection as given; ``connection`` the same as the
    rules left it (destination and source after NAT, packet mark and
    connection mark, the last interfaces it was seen on); ``zone`` its
    conntrack zone when a CT target set one.
    """

    original: Connection
    verdict: Verdict
    connection: Connection
    trace: tuple[TraceEntry, ...] = ()
    zone: int | None = None
    #: During proof enumeration: which fields of ``connection`` (and ``verdict.address``,
    #: ``verdict.port``, ``verdict.mark``) still stand for a dimension of the enumeration.
    symbols: Mapping[str, Sym] = attrs.field(factory=dict, eq=False, repr=False)
    #: A local connection's outgoing interface as first routed (before any NAT or mark rerouted it).
    first_oif: str | None = None
    #: The outcomes this evaluation took at its choice points (random matches: True matched), in order.
    choices: tuple[bool, ...] = ()

    @property
    def rewritten(self) -> Connection:
        """The connection as the rules rewrote it (same as ``connection``)."""
        return self.connection

    def visits(self) -> tuple[RuleVisit, ...]:
        return tuple(e for e in self.trace if isinstance(e, RuleVisit))

    def explain(self, *, elide: int | None = ELIDE_AFTER) -> str:
        """The trace and the verdict as text, one line each (hook headings unindented).

        A run of more than ``elide`` consecutive rules of one chain that do not match (kube-proxy's
        KUBE-SERVICES holds one per service) shows its first and last rules and one line for the rest;
        ``elide=None`` shows every rule.
        """
        lines = []
        trace = self.trace
        at = 0
        while at < len(trace):
            entry = trace[at]
            end = at + 1
            if elide is not None and isinstance(entry, RuleVisit) and entry.result is MatchResult.NOT_MATCHED:
                while end < len(trace) and _continues(trace[end], trace[end - 1]):
                    end += 1
                if end - at > elide:
                    first, last = trace[at + 1], trace[end - 2]
                    assert isinstance(first, RuleVisit) and isinstance(last, RuleVisit)
                    lines += [f"  {entry}", f"  {first}"]
                    lines.append(
                        f"  {first.table} {first.chain} #{first.index + 1}-#{last.index}: "
                        f"{last.index - first.index} more rules  [{MatchResult.NOT_MATCHED.value}]"
                    )
                    lines.append(f"  {trace[end - 1]}")
                    at = end
                    continue
                end = at + 1
            lines.append(str(entry) if isinstance(entry, Event) and entry.text.startswith("==") else f"  {entry}")
            at = end
        lines.append(f"verdict: {self.verdict}")
        if self.choices:
            taken = ", ".join("matched" if c else "no match" for c in self.choices)
            lines.append(f"random choices taken: {taken} (the other outcomes are possible too)")
        return "\n".join(lines)


def _continues(entry: TraceEntry, before: TraceEntry) -> bool:
    """Whether ``entry`` is the next rule of ``before``'s chain, and does not match either."""
    return (
        isinstance(entry, RuleVisit)
        and isinstance(before, RuleVisit)
        and entry.result is MatchResult.NOT_MATCHED
        and entry.index == before.index + 1
        and (entry.hook, entry.family, entry.table, entry.chain)
        == (before.hook, before.family, before.table, before.chain)
    )


# ----------------------------------------------------------------------------- the interpreter


class _Stop(Exception):
    """Ends an evaluation with a final verdict (drop or unknown)."""

    def __init__(self, verdict: Dropped | Unknown) -> None:
        super().__init__(str(verdict))
        self.verdict = verdict


@attrs.frozen
class _Stage:
    priority: int
    nat: bool
    chains: tuple[tuple[Table, Chain], ...]


class _Outcome(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"


class Interpreter:
    """A ruleset prepared for many evaluations in one environment.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> interpreter = Interpreter(compile_policy(Policy()), Environment.for_policy(Policy()))
    >>> remote = Connection.remote(src="10.0.0.1", dst="10.0.0.5", dport=8080)
    >>> interpreter.evaluate(remote).verdict
    Redirected(address=IPv4Address('10.0.0.5'), port=15006)
    """

    def __init__(self, ruleset: Ruleset, env: Environment | None = None) -> None:
        self.ruleset = ruleset
        self.env = env if env is not None else Environment.default()
        self._stages: dict[tuple[str, str], tuple[_Stage, ...]] = {}
        self._plans: dict[int, tuple[Rule, tuple[_Plan, ...]]] = {}
        self._dispatch: dict[int, tuple[Chain, tuple[_Dispatch | None, ...] | None]] = {}
        self._member_tests: dict[Hashable, Callable[[Any], Hashable]] = {}
        self._unobserved: dict[int, tuple[_Stage, _SourceNatSummary | None]] = {}
        self._source_plans: dict[int, tuple[Rule, tuple[tuple[_Plan, ...], tuple[_Plan, ...]]]] = {}
        self._mark_effects: dict[int, tuple[Rule, tuple[SetMark, ...] | None]] = {}
        #: Whether untraced evaluations jump over runs of rules keyed by one field (see :class:`_Dispatch`).
        self.use_dispatch = True
        #: Whether proofs explore one outcome of a choice among alike chains (see :meth:`endpoints`).
        self.use_symmetry = True
        #: Whether a run that returns from a chain takes the connections that return a few rules on.
        self.use_merging = True
        #: Whether proofs explore, of the rules of a dispatch run that a mirror of the ruleset maps onto each
        #: other, one (see :meth:`partners`). Off unless whoever proves knows that the rules and the
        #: environment make every test of a constant the proof makes (``Checker`` without a policy: a
        #: policy's spec tests more).
        self.use_mirrors = False
        self._mirrors: Mirrors | None = None
        self._swaps: dict[int, tuple[Partner | Candidate, tuple[tuple[str, Hashable, Hashable], ...]]] = {}
        self._endpoints: dict[tuple[int, int], tuple[Chain, _Endpoints | None]] = {}
        self._separators: _Separators | None = None
        env = self.env
        # Tests on symbolic values need functions of stable identity (see explore.Run.decide).
        self.is_local: Callable[[Any], Hashable] = env.is_local
        self.is_loopback: Callable[[Any], Hashable] = env.is_loopback
        self.routes_locally: Callable[[Any], Hashable] = env.routes_locally
        self.subnet_route: Callable[[Any], Hashable] = env.subnet_route
        self.first_address: dict[Family, Callable[[Any], Hashable]] = {
            family: functools.partial(_first_address, env, family) for family in (Family.IPV4, Family.IPV6)
        }
        self.present: Callable[[Any], Hashable] = bool
        self.addr_type: Callable[[Any], Hashable] = lambda address: _addr_type(env, address)
        #: The mark tests the proof's mark classes are built from (as ``Constants.add_ruleset`` and
        #: ``Constants.add_environment`` collect them): each is constant on every mark class.
        self.mark_tests: frozenset[tuple[int, int]] = _mark_tests(ruleset, env)

    def stages(self, family: Family, hook: Hook) -> tuple[_Stage, ...]:
        key = (family._value_, hook._value_)  # (enum members hash slowly)
        found = self._stages.get(key)
        if found is None:
            found = self._stages[key] = _build_stages(self.ruleset, family, hook)
        return found

    def plans(self, rule: Rule) -> tuple[_Plan, ...]:
        """A rule's matches, prepared: what each tests, with tests of stable identity (see explore)."""
        found = self._plans.get(id(rule))
        if found is not None and found[0] is rule:
            return found[1]
        plans = tuple(self._plan(match) for match in rule.matches)
        self._plans[id(rule)] = (rule, plans)
        return plans

    def dispatch(self, chain: Chain) -> tuple[_Dispatch | None, ...] | None:
        """Per rule of ``chain``, the dispatch run it belongs to (None: none); None when the chain has none."""
        found = self._dispatch.get(id(chain))
        if found is not None and found[0] is chain:
            return found[1]
        runs = _dispatch_runs(chain, [self.plans(rule) for rule in chain.rules]) if self.use_dispatch else None
        self._dispatch[id(chain)] = (chain, runs)
        return runs

    def endpoints(self, table: Table, chain: Chain, index: int) -> _Endpoints | None:
        """The endpoints of a choice among alike chains, when rule ``index`` of ``chain`` is its first choice
        point (kube-proxy's KUBE-SVC-* spreading a service over KUBE-SEP-* chains with ``-m statistic``).

        The rules from ``index`` on are random choices but the last (which takes what is left), each a jump
        to its own chain; those chains are the same but for one address each (an endpoint: tested as a
        source or destination of its own, and the address DNAT sends to), and no other test of the rules
        or the environment tells the endpoints apart. Then the whole evaluation is symmetric in the
        endpoints: taking endpoint j on a connection does what taking the first does on the connection with
        the two swapped (its source or destination, if it is one), but for the endpoint's address, which
        nothing reads apart. When the run's region holds each connection's swapped one too (``_Run._alike``),
        the proof explores the first outcome only. None for any other rule.
        """
        key = (id(chain), index)
        found = self._endpoints.get(key)
        if found is not None and found[0] is chain:
            return found[1]
        endpoints = _find_endpoints(self, table, chain, index)
        self._endpoints[key] = (chain, endpoints)
        return endpoints

    def candidates(self, table: Table, chain: Chain, index: int) -> tuple[Candidate, ...]:
        """The rules :meth:`partners` may hold (see ``Mirrors.candidates``)."""
        return self.mirrors().candidates(table, chain, index)

    def partner(self, table: Table, chain: Chain, index: int, other: int) -> Partner | None:
        """Rule ``other`` as a partner of rule ``index`` (see :meth:`partners`), or None."""
        return self.mirrors().partner(table, chain, index, other)

    def mirrors(self) -> Mirrors:
        """The mirrors of the ruleset (see :mod:`meshredirect.semantics.symmetry`)."""
        if self._mirrors is None:
            from meshredirect.semantics.symmetry import Mirrors

            self._mirrors = Mirrors(self)
        return self._mirrors

    def partners(self, table: Table, chain: Chain, index: int) -> tuple[Partner, ...]:
        """The other rules of the dispatch run of rule ``index`` of ``chain`` that a mirror of the ruleset
        maps it onto (see :mod:`meshredirect.semantics.symmetry`: kube-proxy's services, alike but for
        their addresses; its node ports and health checks, alike but for their ports), each with the
        constants the mirror swaps. A connection for which rule ``index`` is the first of the run to hold
        is mapped onto one for which the partner is, and the rules do to it what they do to the first,
        swapped. When the run's region holds each connection's image too, the proof explores rule ``index``
        only (``_Run._mirrors``)."""
        return self.mirrors().partners(table, chain, index)

    def swaps(self, partner: Partner | Candidate) -> tuple[tuple[str, Hashable, Hashable], ...]:
        """The values a partner's mirror (or a candidate's swap of the first field) swaps in each dimension
        of the proof's classes (the same object each time: ``Tracer.mirror`` caches by identity)."""
        found = self._swaps.get(id(partner))
        if found is None or found[0] is not partner:
            swaps = tuple((dim, ours, theirs) for kind, ours, theirs in partner.pairs for dim in _MIRRORED_DIMS[kind])
            found = self._swaps[id(partner)] = (partner, swaps)
        return found[1]

    def separators(self) -> _Separators:
        """Every address set a test of the rules or the environment compares an address with."""
        if self._separators is None:
            self._separators = _Separators.of(self.ruleset, self.env)
        return self._separators

    def mark_effects(self, rule: Rule, table: Table) -> tuple[SetMark, ...] | None:
        """The mark rewrites a rule of ``table`` makes when it matches, when that is all it does and its
        tests stop nothing (like kube-proxy's jumps to KUBE-MARK-MASQ); None for any other rule."""
        found = self._mark_effects.get(id(rule))
        if found is not None and found[0] is rule:
            return found[1]
        effects: tuple[SetMark, ...] | None = None
        if not any(plan[0] is _UNKNOWN or plan[0] is _CHOICE for plan in self.plans(rule)):
            target = rule.target
            if isinstance(target, SetMark):
                effects = (target,)
            elif isinstance(target, Jump) and table.has_chain(target.chain):
                rules = table.chain(target.chain).rules
                if rules and all(not r.matches and isinstance(r.target, SetMark) for r in rules):
                    effects = tuple(r.target for r in rules)  # type: ignore[misc]
        self._mark_effects[id(rule)] = (rule, effects)
        return effects

    def source_plans(self, rule: Rule) -> tuple[tuple[_Plan, ...], tuple[_Plan, ...]]:
        """A rule's plans in two parts: those that do not read what source NAT may change, and those that
        do (the source address or port, the mark, the conntrack mark, the conntrack state SNAT)."""
        found = self._source_plans.get(id(rule))
        if found is not None and found[0] is rule:
            return found[1]
        plans = self.plans(rule)
        reading = tuple(plan for plan in plans if _reads_source(plan))
        split = (tuple(plan for plan in plans if not _reads_source(plan)), reading)
        self._source_plans[id(rule)] = (rule, split)
        return split

    def source_nat_summary(self, stage: _Stage) -> _SourceNatSummary | None:
        """What a source NAT stage may do, when that is only rewriting the source, the mark or the conntrack
        mark (see :class:`_SourceNatSummary`); None when it may do anything else: stop the evaluation
        (DROP, REJECT, a target or match not modelled, a jump to a missing chain, chains in a circle), meet
        a choice point, or test a mark after a rule of the stage rewrote one."""
        found = self._unobserved.get(id(stage))
        if found is not None and found[0] is stage:
            return found[1]
        summary = _summarise_source_nat(self, stage)
        self._unobserved[id(stage)] = (stage, summary)
        return summary

    def _member_test(self, members: Any) -> Callable[[Any], Hashable]:
        """One test per set of members (rules that test equal sets share it: the explorer partitions the
        classes by a test once, by its identity)."""
        found = self._member_tests.get(members)
        if found is None:
            found = self._member_tests[members] = _member_test(members)
        return found

    def _plan(self, match: Match) -> _Plan:
        match match:
            case ProtocolMatch():
                return (_PROTOCOL, match.protocol, match.negate)
            case FamilyMatch():
                return (_FAMILY, match.family)
            case AddressMatch():
                addresses = match.addresses
                field = "src" if match.direction is Direction.SOURCE else "dst"
                versions = frozenset(n.version for n in addresses)
                return (_ADDRESS, field, self._member_test(addresses), match.negate, versions)
            case PortMatch():
                field = "sport" if match.direction is Direction.SOURCE else "dport"
                return (_PORT, field, self._member_test(match.ports), match.negate, match.protocol)
            case InterfaceMatch():
                return (_IIF if match.direction is Direction.SOURCE else _OIF, match.matches)
            case OwnerMatch():
                field = "uid" if match.kind is OwnerKind.UID else "gid"
                return (_OWNER, field, self._member_test(match.ids), match.negate, match.socketless)
            case MarkMatch() | ConnmarkMatch():
                return (
                    _MARK if isinstance(match, MarkMatch) else _CTMARK,
                    MarkIs(match.mask, match.value),
                    match.negate,
                )
            case CtStateMatch():
                return (_CTSTATE, match.states, match.negate)
            case AddrTypeMatch():
                if match.limit_interface:
                    return (_UNKNOWN, "addrtype limited to an interface is not modelled")
                types = match.types
                addr_type = self.addr_type
                field = "src" if match.direction is Direction.SOURCE else "dst"
                return (_ADDRTYPE, field, lambda address: addr_type(address) in types, match.negate)
            case IpSetMatch():
                return (_UNKNOWN, f"the contents of ipset {match.name!r} are not known")
            case StatisticMatch():
                fixed = _statistic_outcome(match)
                if fixed is not None:
                    return (_CONSTANT, fixed)
                return (_CHOICE, describe_match(match))
            case UnknownMatch():
                return (_UNKNOWN, f"match [{match.dialect}: {' '.join(match.tokens)}] is not modelled")
            case _:
                assert_never(match)

    def evaluate(
        self,
        connection: Connection,
        *,
        trace: bool = True,
        symbols: Mapping[str, Sym] | None = None,
        tracer: Tracer | None = None,
        choices: Choices | Sequence[bool] | None = None,
        source_nat: bool = True,
    ) -> Evaluation:
        """Run the ruleset over ``connection``; ``trace=False`` skips recording the trace (faster).

        ``symbols`` and ``tracer`` serve the proof enumeration (:mod:`meshredirect.semantics.explore`):
        ``symbols`` says which fields of the connection stand for a dimension (``"oif"`` mapped to
        ``"route"`` means: derived from the destination and the mark by the route function), and
        every test on such a field goes to ``tracer``.

        ``choices`` fixes the outcomes of the choice points the evaluation meets (see :class:`Choices`);
        without it the tracer chooses (the explorer branches), or, with no tracer, every choice point
        takes :data:`DEFAULT_CHOICE`. :attr:`Evaluation.choices` says what was taken.

        ``source_nat=False`` serves proofs that never look at a connection's source after NAT (its
        address and port, mark and conntrack mark as the rules leave them): during proof enumeration
        (``tracer`` given, ``trace=False``), a source NAT stage that can only rewrite those (see
        :meth:`source_nat_summary`) is left out when the packet leaves the pod, and run only when a rule
        reads what it may change when the packet loops back over ``lo``; a rule of a nat chain that only
        rewrites the mark is decided when the mark is read, not when met. The splits their tests would
        make go with them. The verdict, the route and the choices taken are the same; only
        :attr:`Evaluation.connection` may then show the source and marks before them.
        """
        if choices is not None and not isinstance(choices, Choices):
            choices = Choices(choices)
        run = _Run(self, connection, trace, symbols or {}, tracer, choices=choices)
        run.unobserved_source = not source_nat and tracer is not None and not trace
        return run.evaluate()

    def evaluate_all(
        self,
        connection: Connection,
        *,
        trace: bool = True,
        symbols: Mapping[str, Sym] | None = None,
        tracer: Tracer | None = None,
    ) -> list[Evaluation]:
        """Every evaluation ``connection`` may get: one per combination of outcomes of its choice points.

        >>> from meshredirect.ir import Chain, Jump, Rule, StatisticMatch, Table, iptables_base_chain
        >>> nat = Table(family=Family.IPV4, name="nat", chains=(
        ...     Chain(name="OUTPUT", base=iptables_base_chain("nat", Hook.OUTPUT), rules=(
        ...         Rule(matches=(StatisticMatch(probability=0.5),), target=Dnat(ports=PortSet.of(81))),
        ...         Rule(target=Dnat(ports=PortSet.of(82))),
        ...     )),
        ... ))
        >>> interpreter = Interpreter(Ruleset(tables=(nat,)))
        >>> app = Connection.local(interpreter.env, dst="93.184.216.34", dport=80, uid=1000, gid=1000)
        >>> [(e.choices, str(e.verdict)) for e in interpreter.evaluate_all(app)]
        [((True,), 'redirected to 93.184.216.34:81'), ((False,), 'redirected to 93.184.216.34:82')]
        """
        found: list[Evaluation] = []
        todo: list[tuple[bool, ...]] = [()]
        while todo:
            forced = todo.pop()
            evaluation = self.evaluate(connection, trace=trace, symbols=symbols, tracer=tracer, choices=forced)
            found.append(evaluation)
            taken = evaluation.choices
            todo.extend((*taken[:i], not taken[i]) for i in range(len(forced), len(taken)))
        return found


def _build_stages(ruleset: Ruleset, family: Family, hook: Hook) -> tuple[_Stage, ...]:
    plain: list[tuple[int, int, Table, Chain]] = []
    nat: list[tuple[int, int, Table, Chain]] = []
    order = 0
    for table in ruleset.tables:
        if table.family is not family and table.family is not Family.INET:
            continue
        for chain in table.base_chains(hook):
            base = chain.base
            assert base is not None
            (nat if base.type is ChainType.NAT else plain).append((base.priority, order, table, chain))
            order += 1
    stages = [_Stage(priority=p, nat=False, chains=((t, c),)) for p, _o, t, c in plain]
    if nat:
        nat.sort(key=lambda item: (item[0], item[1]))
        priority = NAT_DESTINATION_PRIORITY if hook in DESTINATION_NAT_HOOKS else NAT_SOURCE_PRIORITY
        stages.append(_Stage(priority=priority, nat=True, chains=tuple((t, c) for _p, _o, t, c in nat)))
    # Stable: equal priorities keep ruleset order (nftables leaves that order undefined).
    stages.sort(key=lambda s: s.priority)
    return tuple(stages)


@attrs.frozen
class _SourceNatSummary:
    """A source NAT stage whose only effects are on the source address and port, the mark, the conntrack
    mark and the conntrack state (see :meth:`Interpreter.source_nat_summary`).

    When a packet leaves the pod after such a stage, nothing downstream reads those (the verdict, the
    route, the proxy's follow-up connections do not), so a proof that does not look at them may leave the
    stage out (``Interpreter.evaluate(..., source_nat=False)``), and with it the splits its tests would
    make; when it loops back over ``lo``, the stage runs only if a rule of the hooks it meets next reads
    them (and a rule whose other tests fail first does not). What could still stop the stage depends on the packet, and is checked before it is left out:
    MASQUERADE needs an address on the outgoing interface, and a mark test must stay inside the proof's
    mark classes.
    """

    masquerade: bool
    #: The mark and conntrack mark tests of the stage: (conntrack mark?, test).
    mark_tests: tuple[tuple[bool, MarkIs], ...]
    #: The most rules one pass through the stage visits.
    visits: int


@attrs.frozen
class _PendingMark:
    """A rule that only rewrites the mark, left for when something reads the mark (see ``_Run._force``)."""

    rule: Rule
    effects: tuple[SetMark, ...]
    #: The packet as the rule saw it (``_Run._view``).
    view: tuple[Any, ...]
    #: Where the rule is, for a verdict that cannot be decided.
    where: str


#: The fields of an evaluation a rule's tests read, besides the marks and the symbols (``_Run._view``).
_VIEW: Final = (
    "src",
    "sport",
    "dst",
    "dport",
    "hook",
    "iif",
    "oif",
    "socket",
    "own_iif",
    "tracked",
    "dnat",
    "snat",
    "sport_random",
)
#: Rules left for later whose combined effects on the mark are listed before a stage is left out.
_MAX_PENDING_MARKS: Final = 4

_MARK_WRITES: Final = (SetMark, ConnmarkSet, ConnmarkSave, ConnmarkRestore)
_UNOBSERVED_TARGETS: Final = (Return, Accept, Continue, Log, *_MARK_WRITES)
#: Targets that read or rewrite the mark or the conntrack mark.
_READS_MARKS: Final = (*_MARK_WRITES, TProxy)


@attrs.frozen
class _Endpoints:
    """The endpoints of a choice among alike chains (see :meth:`Interpreter.endpoints`)."""

    addresses: frozenset[IPAddress]
    #: Each endpoint's membership test, the very test the rules make of it (the proof's classes hold it).
    tests: tuple[Callable[[Any], Hashable], ...]


#: Where an endpoint's address stands in the shape its chain shares with the others.
_PLACEHOLDER: Final[dict[int, IPAddress]] = {4: ipaddress.IPv4Address("0.0.0.0"), 6: ipaddress.IPv6Address("::")}
#: Targets after which a chain of an endpoint does nothing more.
_FINAL_TARGETS: Final = (Dnat, Redirect, Accept, Drop, Reject, Return)
#: A chain of the rules: (family, table, chain).
_Origin: TypeAlias = tuple[Family, str, str]


def _find_endpoints(interpreter: Interpreter, table: Table, chain: Chain, index: int) -> _Endpoints | None:
    rules = chain.rules[index:]
    if len(rules) < 2:
        return None
    names = []
    for position, rule in enumerate(rules):
        kinds = [plan[0] for plan in interpreter.plans(rule)]
        if kinds != ([] if position == len(rules) - 1 else [_CHOICE]):
            return None
        if not isinstance(rule.target, Jump) or not table.has_chain(rule.target.chain):
            return None
        names.append(rule.target.chain)
    if len(set(names)) != len(names):
        return None
    addresses: list[IPAddress] = []
    shapes = set()
    for name in names:
        found = _endpoint_shape(table.chain(name))
        if found is None:
            return None
        addresses.append(found[0])
        shapes.add(found[1])
    if len(shapes) != 1 or len(set(addresses)) != len(addresses) or len({a.version for a in addresses}) != 1:
        return None
    if not interpreter.separators().alike(addresses, {(table.family, table.name, name) for name in names}):
        return None
    tests = tuple(interpreter._member_test(AddressSet.of(address)) for address in addresses)
    return _Endpoints(addresses=frozenset(addresses), tests=tests)


def _endpoint_shape(chain: Chain) -> tuple[IPAddress, tuple[Rule, ...]] | None:
    """The one address a chain holds as a single-address test or DNAT target, and the chain with a
    placeholder for it; None unless each rule either ends the chain's work or tests that address (so on a
    connection from and to other addresses, it does nothing)."""
    found: IPAddress | None = None
    shape = []
    for rule in chain.rules:
        guarded = False
        matches: list[Match] = []
        for match in rule.matches:
            if isinstance(match, AddressMatch) and len(match.addresses.networks) == 1:
                network = match.addresses.networks[0]
                if network.num_addresses == 1:
                    if match.negate or (found is not None and network.network_address != found):
                        return None
                    found = network.network_address
                    guarded = True
                    match = attrs.evolve(match, addresses=AddressSet.of(_PLACEHOLDER[found.version]))
            matches.append(match)
        target = rule.target
        if isinstance(target, Dnat) and target.addresses is not None:
            first = target.addresses.first
            if target.addresses.last != first or (found is not None and first != found):
                return None
            found = first
            here = _PLACEHOLDER[first.version]
            target = attrs.evolve(target, addresses=AddressRange(first=here, last=here))
        if not guarded and not isinstance(target, _FINAL_TARGETS):
            return None
        shape.append(attrs.evolve(rule, matches=tuple(matches), target=target, comment=None))
    if found is None or not any(isinstance(rule.target, Dnat) for rule in chain.rules):
        return None  # (the DNAT target makes the endpoint a class of its own in both address dimensions)
    return found, tuple(shape)


@attrs.frozen
class _Separators:
    """Every address set some test compares an address with (rules, environment, proof), by where it is."""

    #: Single addresses -> the chains that test them (None: the environment).
    singles: Mapping[IPAddress, frozenset[_Origin | None]]
    #: Wider sets (networks, ranges as (first, last)) and the chains that test them.
    wide: tuple[tuple[AddressSet | tuple[IPAddress, IPAddress], frozenset[_Origin | None]], ...]

    @classmethod
    def of(cls, ruleset: Ruleset, env: Environment) -> _Separators:
        singles: dict[IPAddress, set[_Origin | None]] = {}
        wide: dict[AddressSet | tuple[IPAddress, IPAddress], set[_Origin | None]] = {}

        def add(members: AddressSet | tuple[IPAddress, IPAddress], origin: _Origin | None) -> None:
            if isinstance(members, AddressSet) and len(members.networks) == 1:
                network = members.networks[0]
                if network.num_addresses == 1:
                    singles.setdefault(network.network_address, set()).add(origin)
                    return
            if isinstance(members, tuple) and members[0] == members[1]:
                singles.setdefault(members[0], set()).add(origin)
                return
            wide.setdefault(members, set()).add(origin)

        for table in ruleset.tables:
            for chain in table.chains:
                origin = (table.family, table.name, chain.name)
                for rule in chain.rules:
                    for match in rule.matches:
                        if isinstance(match, AddressMatch):
                            add(match.addresses, origin)
                    target = rule.target
                    if isinstance(target, (Dnat, Snat)) and target.addresses is not None:
                        add((target.addresses.first, target.addresses.last), origin)
                    if isinstance(target, TProxy) and target.address is not None:
                        add(AddressSet.of(target.address), origin)
        for interface in env.interfaces:
            for address in interface.addresses:
                add(AddressSet.of(address.ip), None)
                add(AddressSet.of(address.network), None)
        for family in (Family.IPV4, Family.IPV6):
            add(AddressSet.of(env.proxy.passthrough_for(family)), None)
        for network in _ALWAYS_TESTED:
            add(AddressSet.of(network), None)
        return cls(
            singles={a: frozenset(o) for a, o in singles.items()},
            wide=tuple((members, frozenset(o)) for members, o in wide.items()),
        )

    def alike(self, addresses: Sequence[IPAddress], exclude: set[_Origin]) -> bool:
        """Whether no test outside the chains ``exclude`` tells the addresses apart."""

        def signature(address: IPAddress) -> tuple[object, ...]:
            single = self.singles.get(address, frozenset()) - exclude
            inside = tuple(
                index
                for index, (members, origins) in enumerate(self.wide)
                if origins - exclude and _holds(members, address)
            )
            return bool(single), inside

        first = signature(addresses[0])
        return not first[0] and all(signature(address) == first for address in addresses[1:])


def _holds(members: AddressSet | tuple[IPAddress, IPAddress], address: IPAddress) -> bool:
    if isinstance(members, tuple):
        return members[0].version == address.version and members[0] <= address <= members[1]  # type: ignore[operator]
    return address in members


#: Addresses the interpreter and the proof test whatever the rules: loopback, broadcast, multicast.
_ALWAYS_TESTED: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "255.255.255.255/32", "0.0.0.0/8", "224.0.0.0/4", "ff00::/8")
)


def _reads_source(plan: _Plan) -> bool:
    kind = plan[0]
    if kind is _ADDRESS or kind is _PORT or kind is _ADDRTYPE:
        return plan[1] in ("src", "sport")
    return kind is _MARK or kind is _CTMARK or (kind is _CTSTATE and CtState.SNAT in plan[1])


def _summarise_source_nat(interpreter: Interpreter, stage: _Stage) -> _SourceNatSummary | None:
    masquerade = False
    tests: list[tuple[bool, MarkIs]] = []
    written = False  # a rule met so far (in rule order, through jumps) rewrites a mark

    def walk(table: Table, chain: Chain, path: tuple[str, ...]) -> int | None:
        """The most rules a pass through ``chain`` visits; None when the stage is not a summary's."""
        nonlocal masquerade, written
        if chain.name in path:
            return None  # a circle: the evaluation would stop
        visits = 0
        for rule in chain.rules:
            visits += 1
            for plan in interpreter.plans(rule):
                kind = plan[0]
                if kind is _UNKNOWN or kind is _CHOICE:
                    return None
                if kind is _MARK or kind is _CTMARK:
                    if written:
                        return None
                    tests.append((kind is _CTMARK, plan[1]))
            target = rule.target
            if isinstance(target, (Jump, Goto)):
                if not table.has_chain(target.chain):
                    return None
                inner = walk(table, table.chain(target.chain), (*path, chain.name))
                if inner is None:
                    return None
                visits += inner
            elif isinstance(target, Masquerade):
                masquerade = True
            elif isinstance(target, Snat):
                addresses = target.addresses
                if addresses is not None and (
                    addresses.first != addresses.last or addresses.first.version != table.family.version
                ):
                    return None
            elif isinstance(target, _MARK_WRITES):
                written = True
            elif not isinstance(target, _UNOBSERVED_TARGETS):
                return None
        return visits

    total = 0
    for table, chain in stage.chains:
        if table.family is Family.INET:
            return None  # an inet table's SNAT may name either family's address: left to the evaluation
        assert chain.base is not None
        if chain.base.policy is not ChainPolicy.ACCEPT:
            return None
        visits = walk(table, chain, ())
        if visits is None:
            return None
        total += visits
    return _SourceNatSummary(masquerade=masquerade, mark_tests=tuple(tests), visits=total)


#: Plans that neither stop an evaluation nor change its state when another test of their rule fails:
#: a rule made of these whose test of one field fails does not match, whatever its other tests do.
_SKIPPABLE: Final = frozenset(
    {_PROTOCOL, _FAMILY, _ADDRESS, _PORT, _IIF, _OIF, _OWNER, _CTSTATE, _ADDRTYPE, _UNKNOWN, _CHOICE, _CONSTANT}
)
#: The fields a dispatch run may be keyed by (not ``sport``: NAT may have made it unknown).
_DISPATCH_FIELDS: Final = ("dst", "dport", "src")
#: Runs shorter than this are walked rule by rule.
_DISPATCH_MIN: Final = 8
#: A run keeps the class masks of at most this many (field, explorer) pairs.
_DISPATCH_CACHE: Final = 64


class _Dispatch:
    """A run of consecutive rules of a chain (``start`` to ``end``) that each test a ``fields[0]`` (a
    destination address, like kube-proxy's KUBE-SERVICES; a destination port, like KUBE-NODEPORTS), and
    maybe the other ``fields``: a rule without a test of a field takes any value of it.

    A rule of the run whose test of a field fails does not match, whatever its other tests (they are
    skippable: see ``_SKIPPABLE``). So the first rule that may match is the first whose tests of the
    fields all hold: :meth:`split` finds it for the explorer's representative and restricts the region,
    in one step, to the classes on which it is also the first (every rule before it fails on them), instead
    of one decision per rule; the rest of the region goes to one other run.
    """

    __slots__ = ("_masks", "_none", "_possible", "end", "exact", "fields", "lacking", "others", "plans", "start")

    def __init__(
        self,
        fields: tuple[str, ...],
        start: int,
        end: int,
        tests: Sequence[Mapping[str, tuple[Callable[[Any], Hashable], bool]]],
        plans: Sequence[tuple[_Plan, ...]],
    ) -> None:
        self.fields, self.start, self.end = fields, start, end
        self.plans = tuple(plans)
        self._possible: dict[tuple[Protocol, Family], frozenset[int]] = {}
        self.exact: dict[str, dict[Hashable, tuple[int, ...]]] = {}
        self.others: dict[str, tuple[tuple[int, Callable[[Any], Hashable], bool], ...]] = {}
        self.lacking: dict[str, tuple[int, ...]] = {}
        for field in fields:
            exact: dict[Hashable, list[int]] = {}
            others: list[tuple[int, Callable[[Any], Hashable], bool]] = []
            lacking: list[int] = []
            for index, rule_tests in enumerate(tests, start):
                if field not in rule_tests:
                    lacking.append(index)
                    continue
                test, negate = rule_tests[field]
                members = getattr(test, "__self__", None)
                if not negate and isinstance(members, frozenset) and getattr(test, "__name__", "") == "__contains__":
                    for member in members:
                        exact.setdefault(member, []).append(index)
                else:
                    others.append((index, test, negate))
            self.exact[field] = {member: tuple(indices) for member, indices in exact.items()}
            self.others[field] = tuple(others)
            self.lacking[field] = tuple(lacking)
        # Per field and tuple of class values (one explorer's): the rules' masks and each class's rules.
        self._masks: dict[tuple[str, int], tuple[tuple[Any, ...], dict[int, int], list[tuple[int, ...]]]] = {}
        self._none: dict[Hashable, tuple[list[dict[int, int]], list[dict[int, int]]]] = {}

    def possible(self, protocol: Protocol, family: Family) -> frozenset[int]:
        """The rules of the run that a connection of ``protocol`` and ``family`` may match (the others
        test another protocol or family: they do not match, as ``_Run._rule_matches`` finds first)."""
        key = (protocol, family)
        found = self._possible.get(key)
        if found is None:
            found = self._possible[key] = frozenset(
                index
                for index, plans in enumerate(self.plans, self.start)
                if not any(_excludes(plan, protocol, family) for plan in plans)
            )
        return found

    def hits(self, field: str, value: Any) -> tuple[int, ...]:
        """The (sorted) rules of the run whose test of ``field`` holds for ``value`` (or that test none)."""
        hits = self.exact[field].get(value, ())
        others = self.others[field]
        lacking = self.lacking[field]
        if others or lacking:
            more = [index for index, test, negate in others if bool(test(value)) != negate]
            if more or lacking:
                return tuple(sorted({*hits, *more, *lacking}))
        return hits

    def masks(self, field: str, values: tuple[Any, ...]) -> tuple[dict[int, int], list[tuple[int, ...]]]:
        """Per rule, the classes (bit mask) whose value passes its test of ``field``; per class, those rules."""
        found = self._masks.get((field, id(values)))
        if found is not None and found[0] is values:
            return found[1], found[2]
        masks: dict[int, int] = {}
        by_class: list[tuple[int, ...]] = []
        for position, value in enumerate(values):
            hits = self.hits(field, value)
            by_class.append(hits)
            for rule in hits:
                masks[rule] = masks.get(rule, 0) | (1 << position)
        if len(self._masks) >= _DISPATCH_CACHE:
            # Both at once: the keys of `_none` name (by id) values and masks that `_masks` keeps alive.
            self._masks.clear()
            self._none.clear()
        self._masks[(field, id(values))] = (values, masks, by_class)
        return masks, by_class

    def split(
        self, tracer: Tracer, symbolic: Sequence[tuple[str, str]], index: int, allowed: frozenset[int] | None
    ) -> tuple[int, list[dict[int, int]], list[dict[int, int]]]:
        """:meth:`_Run._dispatch_next` on the symbolic fields (the others' rules are ``allowed``): the rule
        found, and the parts (per position, the classes) where it is the first to hold and where not."""
        first_field, first_dim = symbolic[0]
        position, values, representative = tracer.classes(first_dim)
        masks, by_class = self.masks(first_field, values)
        every_first = (1 << len(values)) - 1
        # The other symbolic fields: position, every class, the representative's class, the rules' masks.
        rest: list[tuple[int, int, int, dict[int, int]]] = []
        for field, dim in symbolic[1:]:
            other_position, other_values, other_representative = tracer.classes(dim)
            rest.append(
                (other_position, (1 << len(other_values)) - 1, other_representative, self.masks(field, other_values)[0])
            )
        every = {p: e for p, e, _, _ in rest}

        def box(rule: int) -> dict[int, int]:
            return {p: m.get(rule, 0) for p, _, _, m in rest}

        def live(rules: tuple[int, ...], below: int) -> list[int]:
            return [r for r in rules if index <= r < below and (allowed is None or r in allowed)]

        found = self.end
        for rule in live(by_class[representative], self.end):
            if all(m.get(rule, 0) >> r & 1 for _, _, r, m in rest):
                found = rule
                break
        inside: list[dict[int, int]]
        outside: list[dict[int, int]]
        if found < self.end:
            # The classes of the first field where rule `found` holds, grouped by the rules before it there;
            # on the other fields, its box less theirs.
            groups: dict[tuple[int, ...], int] = {}
            mask = masks[found]
            while mask:
                bit = mask & -mask
                mask ^= bit
                before = tuple(live(by_class[bit.bit_length() - 1], found))
                groups[before] = groups.get(before, 0) | bit
            inside, outside = _grouped(position, groups, box(found), box, every)
            outside.append({position: every_first & ~masks[found]})
        else:
            key = (first_dim, id(values), index, allowed, tuple((p, id(m)) for p, _, _, m in rest))
            cached = self._none.get(key)
            if cached is None:
                groups = {}
                for cls, rules in enumerate(by_class):
                    held = tuple(live(rules, self.end))
                    groups[held] = groups.get(held, 0) | (1 << cls)
                cached = self._none[key] = _grouped(position, groups, {}, box, every)
            inside, outside = cached
        return found, inside, outside


def _excludes(plan: _Plan, protocol: Protocol, family: Family) -> bool:
    """Whether a prepared match fails on every connection of ``protocol`` and ``family``."""
    kind = plan[0]
    if kind is _PROTOCOL:
        return bool((protocol is plan[1]) == plan[2])
    if kind is _FAMILY:
        return family is not plan[1]
    if kind is _ADDRESS:
        return family.version not in plan[4]
    if kind is _PORT:
        return protocol is not plan[4]
    return False


def _grouped(
    position: int,
    groups: Mapping[tuple[int, ...], int],
    first: Mapping[int, int],
    box: Callable[[int], Mapping[int, int]],
    every: Mapping[int, int],
) -> tuple[list[dict[int, int]], list[dict[int, int]]]:
    """For groups of classes of the first field (at ``position``), each with rules that hold there: the
    part of the other fields in ``first`` and in none of the rules' boxes (inside) and the rest (outside),
    as disjoint parts; parts equal on the other fields are merged across groups (their classes of the first
    field are disjoint)."""
    inside: dict[tuple[tuple[int, int], ...], int] = {}
    outside: dict[tuple[tuple[int, int], ...], int] = {}
    for rules, classes in groups.items():
        parts = [dict(first)]
        for rule in rules:
            parts = subtract_part(parts, box(rule), every)
        for part in parts:
            key = tuple(sorted(part.items()))
            inside[key] = inside.get(key, 0) | classes
        for part in _subtract_all([{}], parts, every):
            key = tuple(sorted(part.items()))
            outside[key] = outside.get(key, 0) | classes
    return (
        [{position: classes, **dict(key)} for key, classes in inside.items()],
        [{position: classes, **dict(key)} for key, classes in outside.items()],
    )


def _subtract_all(
    parts: list[dict[int, int]], boxes: Sequence[Mapping[int, int]], every: Mapping[int, int]
) -> list[dict[int, int]]:
    for box in boxes:
        parts = subtract_part(parts, box, every)
    return parts


def _dispatch_runs(chain: Chain, plans: Sequence[tuple[_Plan, ...]]) -> tuple[_Dispatch | None, ...] | None:
    """The dispatch runs of a chain: maximal runs of at least ``_DISPATCH_MIN`` skippable rules (see
    ``_SKIPPABLE``) that all test one field (address or port match: the one that makes the longest run),
    keyed by it and by the other fields some rules of the run test."""
    keyed: list[dict[str, tuple[Callable[[Any], Hashable], bool]]] = []
    for rule_plans in plans:
        fields: dict[str, tuple[Callable[[Any], Hashable], bool]] = {}
        if all(plan[0] in _SKIPPABLE for plan in rule_plans):
            for plan in rule_plans:
                if (plan[0] is _ADDRESS or plan[0] is _PORT) and plan[1] in _DISPATCH_FIELDS:
                    fields.setdefault(plan[1], (plan[2], plan[3]))
        keyed.append(fields)
    slots: list[_Dispatch | None] = [None] * len(plans)
    found = False
    start = 0
    while start < len(keyed):
        best: tuple[int, str | None] = (start, None)
        for field in _DISPATCH_FIELDS:
            end = start
            while end < len(keyed) and field in keyed[end]:
                end += 1
            if end > best[0]:
                best = (end, field)
        end, first = best
        if first is not None and end - start >= _DISPATCH_MIN:
            tests = keyed[start:end]
            more = [f for f in _DISPATCH_FIELDS if f != first and any(f in t for t in tests)]
            run = _Dispatch((first, *more), start, end, tests, plans[start:end])
            slots[start:end] = [run] * (end - start)
            found = True
            start = end
        else:
            start += 1
    return tuple(slots) if found else None


#: The fields of a connection that hold addresses and ports, and the proof's dimensions a mirror swaps of each.
_MIRRORED_FIELDS: Final = ("src", "dst", "sport", "dport")
_MIRRORED_DIMS: Final = {"address": ("src", "dst"), "port": ("sport", "dport")}

_CACHE: dict[int, tuple[Ruleset, Environment, Interpreter]] = {}
_CACHE_SIZE: Final = 16


def interpreter_for(ruleset: Ruleset, env: Environment) -> Interpreter:
    """A (cached) interpreter of ``ruleset`` in ``env``."""
    cached = _CACHE.get(id(ruleset))
    if cached is not None and cached[0] is ruleset and cached[1] is env:
        return cached[2]
    interpreter = Interpreter(ruleset, env)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(ruleset)] = (ruleset, env, interpreter)
    return interpreter


def evaluate(ruleset: Ruleset, connection: Connection, env: Environment | None = None) -> Evaluation:
    """What ``ruleset`` does to ``connection`` in ``env`` (default: ``Environment.default()``).

    See the module docstring for the model and an example.
    """
    return interpreter_for(ruleset, env if env is not None else Environment.default()).evaluate(connection)


#: The outcome a choice point takes when nothing else decides (a random match matches).
DEFAULT_CHOICE: Final = True


class Choices:
    """The outcomes of the choice points of one or more evaluations, in order (a random match: True
    matches): ``forced`` ones first, then :data:`DEFAULT_CHOICE` for each further point.

    One object can be passed to the evaluations of a chain of connections (the proxy's follow-ups),
    so that a sequence of outcomes (an explorer leaf's ``choices``) is replayed across them.

    >>> choices = Choices([False])
    >>> choices.next(), choices.next(), choices.taken
    (False, True, [False, True])
    """

    def __init__(self, forced: Sequence[bool] = ()) -> None:
        self.forced = tuple(forced)
        self.taken: list[bool] = []

    def next(self) -> bool:
        position = len(self.taken)
        taken = self.forced[position] if position < len(self.forced) else DEFAULT_CHOICE
        self.taken.append(taken)
        return taken


@attrs.frozen
class _Mark:
    """A mark's value, and what it stands for during proof enumeration (None: a constant)."""

    value: int
    sym: MarkSym | None = None

    def xor_mask(self, keep: int, xor: int) -> _Mark:
        """``(mark & keep) ^ xor``."""
        keep &= MAX_MARK
        value = (self.value & keep) ^ xor
        if self.sym is None:
            return _Mark(value)
        return _Mark(value, MarkSym(self.sym.dim, self.sym.and_mask & keep, (self.sym.xor & keep) ^ xor))

    def combine(self, keep: int, other: _Mark, take: int) -> _Mark:
        """``(self & keep) ^ (other & take)``."""
        keep &= MAX_MARK
        value = (self.value & keep) ^ (other.value & take)
        syms = [s for s in (self.sym, other.sym) if s is not None]
        if not syms:
            return _Mark(value)
        dim = syms[0].dim
        if any(s.dim != dim for s in syms):
            raise ValueError("marks of two different dimensions cannot be combined")
        a_self, x_self = (self.sym.and_mask, self.sym.xor) if self.sym is not None else (0, self.value)
        a_other, x_other = (other.sym.and_mask, other.sym.xor) if other.sym is not None else (0, other.value)
        return _Mark(value, MarkSym(dim, (a_self & keep) ^ (a_other & take), (x_self & keep) ^ (x_other & take)))


class _Run:
    """The mutable state of one evaluation."""

    def __init__(
        self,
        interpreter: Interpreter,
        connection: Connection,
        record: bool,
        symbols: Mapping[str, Sym],
        tracer: Tracer | None,
        *,
        choices: Choices | None = None,
    ) -> None:
        self.interpreter = interpreter
        self.env = interpreter.env
        self.c = connection
        self.record = record
        self.tracer = tracer
        self.trace: list[TraceEntry] = []
        self.family = connection.family
        self.src = connection.src
        self.sport = connection.sport
        self.dst = connection.dst
        self.dport = connection.dport
        self.sym: dict[str, Sym | None] = {
            field: symbols.get(field) if tracer is not None else None
            for field in ("src", "sport", "dst", "dport", "iif", "socket", "uid", "gid")
        }
        self.routed = tracer is not None and symbols.get("oif") == ROUTED
        self._symbols_at_start: dict[str, Sym] = dict(symbols) if tracer is not None else {}
        self._mark_before_sym: MarkSym | None = None
        self.mark = _Mark(connection.mark, _mark_sym(symbols.get("mark")) if tracer is not None else None)
        self.ctmark = _Mark(connection.ctmark, _mark_sym(symbols.get("ctmark")) if tracer is not None else None)
        self.zone: int | None = None
        self.tracked = False  # conntrack attached
        self.decided: set[bool] = set()  # True: destination mapping decided; False: source mapping
        self.dnat = False
        self.snat = False
        self.dst_rewritten = False
        self.dport_rewritten = False
        self.tproxy: TProxied | None = None
        self.tproxy_syms: dict[str, Sym | None] = {}
        self.choices = choices
        self.taken: list[bool] = []  # the outcomes of the choice points met, in order
        self.sport_random: str | None = None  # why the source port is unknown (NAT picked it at random)
        self.visits = 0
        self.out_interface: str | None = connection.oif
        self.first_oif: str | None = None
        # the packet's view at the current hook
        self.hook = Hook.OUTPUT
        self.iif: str | None = None
        self.oif: str | None = None
        self.own_iif = False  # the current iif is the connection's own (a symbolic dimension)
        self.socket: Socket | None = None
        #: Nothing reads the source after NAT (see Interpreter.evaluate's ``source_nat``).
        self.unobserved_source = False
        #: What the evaluation left for when something reads what it may change (see :meth:`_force`): rules
        #: of nat chains that only rewrite the mark, and the source NAT stage of a packet looping back over lo.
        self.pending: list[_Stage | _PendingMark] = []
        self.forcing = False
        #: The next choice point's outcomes behave alike (see Interpreter.endpoints).
        self.alike = False

    # ------------------------------------------------------------------ symbolic tests

    def _test(self, field: str, value: object, key: Callable[[Any], Hashable]) -> Any:
        """``key(value)`` of a connection field's current value, through the tracer when it is symbolic."""
        sym = self.sym.get(field)
        if sym is None or self.tracer is None:
            return key(value)
        return self.tracer.decide(sym, key)

    def _routes_locally(self, mark: _Mark) -> bool:
        """The environment's policy routing of a mark (does it select a table whose default route is local?)."""
        if not self.env.local_marks:
            return False
        if self.pending:
            self._force()
            mark = self.mark
        routes_locally = self.interpreter.routes_locally
        sym = mark.sym
        if sym is None or sym.constant or self.tracer is None:
            return bool(routes_locally(mark.value))
        if sym.and_mask == MAX_MARK and not sym.xor:
            return bool(self.tracer.decide(sym.dim, routes_locally))
        for route in self.env.local_marks:
            derived = self._derived_mark_test(sym, MarkIs(route.mask, route.value))
            if derived is True or (derived is not False and self.tracer.decide(sym.dim, derived)):
                return True
        return False

    def _derived_mark_test(self, sym: MarkSym, test: MarkIs) -> MarkIs | bool:
        """A test ``(m & mask) == value`` of a mark that is ``(v & a) ^ x`` of a dimension's value ``v``, as
        a test of ``v`` itself: ``(v & (a & mask)) == value ^ (x & mask)``, or its constant outcome.

        The mark classes are the atoms of the mark tests the rules and the environment make (see
        :class:`~meshredirect.semantics.classes.Constants`): a derived test that is not one of them could
        split a class, and is not claimed (unknown).
        """
        mask, value = test.mask & MAX_MARK, test.value
        if value & ~mask:
            return False
        derived_mask = sym.and_mask & mask
        derived_value = value ^ (sym.xor & mask)
        if derived_value & ~derived_mask:
            return False
        if not derived_mask:
            return True
        if (derived_mask, derived_value) not in self.interpreter.mark_tests:
            raise _Stop(
                Unknown(
                    reason=f"a mark rewritten by MARK/CONNMARK is tested as {derived_value:#x}/{derived_mask:#x} "
                    "of its original value: a test beyond the proof's classes"
                )
            )
        return MarkIs(derived_mask, derived_value)

    def _dst_test(self, key: Callable[[Any], Hashable]) -> Any:
        return self._test("dst", self.dst, key)

    def _route(self) -> str:
        """The route function of the environment, as tests on the destination and the mark."""
        if self._routes_locally(self.mark) or self._dst_test(self.interpreter.is_local):
            return LOOPBACK_INTERFACE
        return str(self._dst_test(self.interpreter.subnet_route))

    def _routed_locally(self) -> bool:
        return bool(self._routes_locally(self.mark) or self._dst_test(self.interpreter.is_local))

    def _has_socket(self) -> bool:
        return bool(self._test("socket", self.socket is not None, self.interpreter.present))

    # ------------------------------------------------------------------ the path

    def evaluate(self) -> Evaluation:
        try:
            verdict = self._local() if self.c.origin is Origin.LOCAL else self._remote()
        except _Stop as stop:
            verdict = stop.verdict
        c = self.c
        oif = self.out_interface if c.origin is Origin.LOCAL else c.oif
        if (
            self.src is c.src
            and self.dst is c.dst
            and self.sport == c.sport
            and self.dport == c.dport
            and self.mark.value == c.mark
            and self.ctmark.value == c.ctmark
            and oif == c.oif
        ):
            rewritten = c
        else:
            rewritten = attrs.evolve(
                c,
                src=self.src,
                sport=self.sport,
                dst=self.dst,
                dport=self.dport,
                mark=self.mark.value,
                ctmark=self.ctmark.value,
                oif=oif,
            )
        symbols: dict[str, Sym] = {}
        if self.tracer is not None:
            for field in ("src", "sport", "dst", "dport"):
                sym = self.sym[field]
                if sym is not None:
                    symbols[field] = sym
            for field, mark in (("mark", self.mark), ("ctmark", self.ctmark)):
                if mark.sym is not None and not mark.sym.constant:
                    symbols[field] = mark.sym
            if isinstance(verdict, (Passed, Redirected)):
                for field, name in (("address", "dst"), ("port", "dport")):
                    if name in symbols:
                        symbols["verdict." + field] = symbols[name]
            elif isinstance(verdict, TProxied):
                for field, sym in self.tproxy_syms.items():
                    if sym is not None:
                        symbols["verdict." + field] = sym
        return Evaluation(
            original=self.c,
            verdict=verdict,
            connection=rewritten,
            trace=tuple(self.trace),
            zone=self.zone,
            symbols=symbols,
            first_oif=self.first_oif,
            choices=tuple(self.taken),
        )

    def _local(self) -> Verdict:
        oif = self._route() if self.routed or self.c.oif is None else self.c.oif
        self.first_oif = oif
        self._hook(Hook.OUTPUT, iif=None, oif=oif, socket=self.c.socket)
        self._hook(Hook.POSTROUTING, iif=None, oif=self.oif, socket=self.c.socket)
        self.out_interface = self.oif
        if self.oif != LOOPBACK_INTERFACE:
            return self._delivered(local=False)
        self._event(None, f"loops back over {LOOPBACK_INTERFACE}")
        self._hook(Hook.PREROUTING, iif=LOOPBACK_INTERFACE, oif=None, socket=None)
        if not self._routed_locally():
            raise _Stop(Dropped(reason=f"arrived over {LOOPBACK_INTERFACE} for {self.dst}, which is not local"))
        self._hook(Hook.INPUT, iif=LOOPBACK_INTERFACE, oif=None, socket=None)
        return self._delivered(local=True)

    def _remote(self) -> Verdict:
        iif = self.c.iif if self.c.iif is not None else self.env.default_interface
        self._hook(Hook.PREROUTING, iif=iif, oif=None, socket=None, own_iif=True)
        lo = self._test("iif", iif, _IS_LOOPBACK_INTERFACE)
        if not lo:
            if self._test("src", self.src, self.interpreter.is_loopback) or self._test(
                "src", self.src, self.interpreter.is_local
            ):
                raise _Stop(Dropped(reason=f"martian source {self.src} arriving on {iif}"))
            if self._dst_test(self.interpreter.is_loopback):
                raise _Stop(Dropped(reason=f"martian destination {self.dst} arriving on {iif}"))
        if self._routed_locally():
            self._hook(Hook.INPUT, iif=iif, oif=None, socket=None, own_iif=True)
            return self._delivered(local=True)
        if self.tproxy is not None:
            raise _Stop(Dropped(reason="TPROXY assigned a listener but the packet is not routed locally"))
        if not self.env.forwarding:
            raise _Stop(Dropped(reason=f"{self.dst} is not local and the pod does not forward"))
        oif = self._route()
        self._hook(Hook.FORWARD, iif=iif, oif=oif, socket=None, own_iif=True)
        self._hook(Hook.POSTROUTING, iif=iif, oif=oif, socket=None, own_iif=True)
        return self._delivered(local=False)

    def _delivered(self, *, local: bool) -> Verdict:
        if self.tproxy is not None and local:
            return self.tproxy
        if self._unchanged("dst", self.dst_rewritten, self.dst) and self._unchanged(
            "dport", self.dport_rewritten, self.dport
        ):
            return Passed(address=self.dst, port=self.dport, local=local)
        return Redirected(address=self.dst, port=self.dport)

    def _unchanged(self, field: str, rewritten: bool, value: object) -> bool:
        """Whether a field still holds the connection's own value."""
        if not rewritten:
            return True
        original = self.c.dst if field == "dst" else self.c.dport
        sym = self._original_sym(field)
        if sym is None or self.tracer is None:
            return original == value
        return bool(self.tracer.decide(sym, Eq(value)))

    def _original_sym(self, field: str) -> Sym | None:
        return self._symbols_at_start.get(field)

    # ------------------------------------------------------------------ hooks

    def _event(self, hook: Hook | None, text: str) -> None:
        if self.record:
            self.trace.append(Event(hook=hook, text=text))

    def _hook(
        self, hook: Hook, *, iif: str | None, oif: str | None, socket: Socket | None, own_iif: bool = False
    ) -> None:
        self.hook, self.iif, self.oif, self.socket, self.own_iif = hook, iif, oif, socket, own_iif
        if self.record:
            where = ", ".join(x for x in (f"in {iif}" if iif else "", f"out {oif}" if oif else "") if x)
            self._event(hook, f"== {hook.value} ({where})" if where else f"== {hook.value}")
        stages = self.interpreter.stages(self.family, hook)
        for stage in stages:
            if not self.tracked and stage.priority >= CONNTRACK_PRIORITY:
                self.tracked = True
            if stage.nat:
                if (
                    self.unobserved_source
                    and hook is Hook.POSTROUTING
                    and stage is stages[-1]
                    and (self.oif != LOOPBACK_INTERFACE or self.c.origin is Origin.LOCAL)
                    and self._leaves_source_unobserved(stage)
                ):
                    # What this stage may change is read by nothing when the packet leaves the pod, and
                    # maybe by the rules of the hooks it meets next when it loops back over lo: then
                    # the stage runs when one of them reads it.
                    self.decided.add(False)
                    if self.oif == LOOPBACK_INTERFACE:
                        self.pending.append(stage)
                    continue
                self._nat_stage(hook, stage)
            else:
                table, chain = stage.chains[0]
                assert chain.base is not None
                route = hook is Hook.OUTPUT and chain.base.type is ChainType.ROUTE
                if route and self.pending:
                    self._force()  # what the route chain changes reroutes the packet
                before = (self.dst, self.dport, self.src, self.mark.value, self.dst_rewritten)
                self._base_chain(hook, table, chain)
                if route:
                    after = (self.dst, self.dport, self.src, self.mark.value, self.dst_rewritten)
                    if before != after or self.mark.sym != self._mark_before_sym:
                        self._reroute(hook)
        self.tracked = True

    def _merge_exits(
        self,
        chain: Chain,
        index: int,
        *,
        result: MatchResult,
        grew: int,
        exits: int | None,
        returning: bool,
        simple: dict[int, int] | Literal[False] | None,
    ) -> int | None:
        """After rule ``index`` of a chain: join the regions that return from the chain with no change
        (see :meth:`_merge_returns`). ``exits`` is a region left for later, by an earlier rule of the chain,
        that returns there, with every rule since failing on the whole region; ``grew``, how many regions
        this rule's test left for later; ``returning``, whether the rule returns and its tests are all
        class constraints. Returns what ``exits`` is after this rule."""
        assert self.tracer is not None
        if exits is not None:
            if simple is False and grew == 0:
                return exits  # fails on every connection of the region: passed over
            if returning and result is MatchResult.MATCHED and grew <= 1:
                # Those return here too, with the same state: they do what this run does from now on.
                self.tracer.take_back(exits)
                if grew:
                    self._merge_returns(chain, index, self.tracer.left() - 1)
                return None
            if returning and result is MatchResult.NOT_MATCHED and grew == 1:
                self.tracer.join_left(exits)  # both return from the chain with the same state
                return exits
            exits = None
        if returning and grew == 1:
            if result is MatchResult.NOT_MATCHED:
                return self.tracer.left() - 1  # the part that returns here was left for later
            if result is MatchResult.MATCHED:
                self._merge_returns(chain, index, self.tracer.left() - 1)
        return None

    def _merge_returns(self, chain: Chain, index: int, left: int) -> None:
        """Rule ``index`` of ``chain`` returned, and its test left the rest of the region for later: take
        back the part of it that the next rules return on too (each rule in between failing on the whole
        region): from the RETURN on, those connections meet the same state (the rules in between changed
        nothing), so they do what this run does. (Istio's ISTIO_OUTPUT returns for the proxy's uid and,
        a few rules on, for its gid.) A rule that may match and do anything else ends the search. ``left``:
        which region left for later this rule's test left."""
        assert self.tracer is not None
        for later in chain.rules[index + 1 :]:
            found = self._constraints(later)
            if found is False:
                continue  # does not match on any connection of the region
            if found is None or type(later.target) is not Return:
                return
            if not self.tracer.absorb(found, left) or not found:
                return  # nothing left, or it returns on every connection that reaches it

    def _constraints(self, rule: Rule) -> dict[int, int] | Literal[False] | None:
        """A rule's tests as one conjunction of class constraints (position -> classes) on the run's
        region; False when it fails on every connection of the region (a test of what is the same for all
        of them fails); None when its tests are not all of the kinds read here."""
        tracer = self.tracer
        assert tracer is not None
        constraints: dict[int, int] = {}
        for plan in self.interpreter.plans(rule):
            kind = plan[0]
            if kind is _PROTOCOL:
                if (self.c.protocol is plan[1]) == plan[2]:
                    return False
            elif kind is _FAMILY:
                if self.family is not plan[1]:
                    return False
            elif kind is _OIF:
                if not plan[1](self.oif or ""):
                    return False
            elif kind is _CONSTANT:
                if not plan[1]:
                    return False
            elif kind is _IIF and (self.iif is None or not self.own_iif):
                if not plan[1](self.iif or ""):
                    return False
            elif kind is _ADDRESS or kind is _PORT:
                if kind is _ADDRESS and self.family.version not in plan[4]:
                    return False
                if kind is _PORT and self.c.protocol is not plan[4]:
                    return False
                field = plan[1]
                if field == "sport" and self.sport_random is not None:
                    return None
                if not self._constrain(constraints, field, getattr(self, field), plan[2], not plan[3]):
                    return False
            elif kind is _OWNER:
                if self.hook is not Hook.OUTPUT and self.hook is not Hook.POSTROUTING:
                    if not plan[4]:
                        return False
                    continue
                if plan[4]:
                    return None
                socket = self.sym["socket"]
                if socket is None:
                    if self.socket is None:
                        return False
                else:
                    position, _outcome, outcomes = tracer.resolve(socket, self.interpreter.present)
                    constraints[position] = constraints.get(position, -1) & outcomes.get(True, 0)
                field = plan[1]
                value = None if self.socket is None else self.socket.uid if field == "uid" else self.socket.gid
                if not self._constrain(constraints, field, value, plan[2], not plan[3]):
                    return False
            else:
                return None
        return constraints

    def _constrain(
        self, constraints: dict[int, int], field: str, value: Any, test: Callable[[Any], Hashable], wanted: bool
    ) -> bool:
        """Add ``test(field) == wanted`` to ``constraints``; False when the field's value is not symbolic
        and fails the test."""
        sym = self.sym[field]
        if sym is None:
            return value is not None and bool(test(value)) == wanted
        assert self.tracer is not None
        position, _outcome, outcomes = self.tracer.resolve(sym, test)
        constraints[position] = constraints.get(position, -1) & outcomes.get(wanted, 0)
        return True

    def _alike(self, endpoints: _Endpoints) -> bool:
        """Whether swapping two endpoints of a choice among alike chains maps the run's region and state
        onto themselves: then taking endpoint j on a connection does what taking the first does on the
        connection with the two swapped, which the region holds too (see :meth:`Interpreter.endpoints`).
        The region must hold, in each box, every endpoint's class of source and destination or none; no
        address the run holds as a value may be an endpoint."""
        assert self.tracer is not None
        for field in ("src", "dst"):
            sym = self.sym[field]
            if sym is None:
                if getattr(self, field) in endpoints.addresses:
                    return False
            elif not isinstance(sym, str) or not self.tracer.alike(sym, endpoints.tests):
                return False
        return not any(address in endpoints.addresses for address in self._held())

    def _held(self) -> list[object]:
        """The addresses and ports the run holds as values, besides its fields: a TPROXY target's, and those
        of the packet as rules left for later saw it."""
        held: list[object] = [self.tproxy.address, self.tproxy.port] if self.tproxy is not None else []
        for item in self.pending:
            if isinstance(item, _PendingMark):
                view = dict(zip(_VIEW, item.view[:-1], strict=True))
                held += [view[field] for field in _MIRRORED_FIELDS]
        return held

    def _force(self) -> None:
        """Run what was left for later (:attr:`pending`), in order, as it would have run then: a rule that
        rewrites the mark on the packet as it was then; the source NAT stage in POSTROUTING, out ``lo``,
        with the packet's socket. What they read has not changed since (the mappings were decided; the mark
        and the conntrack mark are only rewritten after this runs)."""
        items, self.pending = self.pending, []
        self.forcing = True  # what runs now runs in full (it leaves nothing for later)
        try:
            for item in items:
                if isinstance(item, _PendingMark):
                    self._mark_rule(item)
                else:
                    self._source_nat_stage(item)
        finally:
            self.forcing = False

    def _mark_rule(self, item: _PendingMark) -> None:
        now = self._view()
        self._restore(item.view)
        try:
            result, why = self._rule_matches(item.rule)
        finally:
            self._restore(now)
        if result is MatchResult.UNKNOWN:
            raise _Stop(Unknown(reason=f"{item.where}: {why}"))
        if result is MatchResult.MATCHED:
            for target in item.effects:
                self.mark = self.mark.xor_mask(~target.mask, target.value)

    def _view(self) -> tuple[Any, ...]:
        """What a rule's tests read of the packet, besides the marks (see :meth:`_restore`)."""
        return (*(getattr(self, name) for name in _VIEW), dict(self.sym))

    def _restore(self, view: tuple[Any, ...]) -> None:
        *values, self.sym = view
        for name, value in zip(_VIEW, values, strict=True):
            setattr(self, name, value)

    def _source_nat_stage(self, stage: _Stage) -> None:
        view = (self.hook, self.iif, self.oif, self.socket, self.own_iif)
        self.hook, self.iif, self.oif, self.socket, self.own_iif = (
            Hook.POSTROUTING,
            None,
            LOOPBACK_INTERFACE,
            self.c.socket,
            False,
        )
        self.decided.discard(False)
        try:
            self._nat_stage(Hook.POSTROUTING, stage)
        finally:
            self.decided.add(False)
            self.hook, self.iif, self.oif, self.socket, self.own_iif = view

    def _leaves_source_unobserved(self, stage: _Stage) -> bool:
        """Whether leaving out a source NAT stage changes nothing but what nobody reads (see
        :class:`_SourceNatSummary`): it could not stop the evaluation of this packet."""
        summary = self.interpreter.source_nat_summary(stage)
        if summary is None or self.visits + summary.visits > MAX_RULE_VISITS:
            return False
        if summary.masquerade and (self.oif is None or self.env.first_address(self.oif, self.family) is None):
            return False
        if not summary.mark_tests:
            return True
        marks = self._possible_marks()
        if marks is None:
            return False
        for conntrack, test in summary.mark_tests:
            for sym in {self.ctmark.sym} if conntrack else {mark.sym for mark in marks}:
                if (
                    self.tracer is not None
                    and sym is not None
                    and not sym.constant
                    and (sym.and_mask != MAX_MARK or sym.xor)
                ):
                    try:
                        self._derived_mark_test(sym, test)
                    except _Stop:
                        return False
        return True

    def _possible_marks(self) -> list[_Mark] | None:
        """The marks the packet may have once the rules left for later have run (None: too many to list)."""
        items = [item for item in self.pending if isinstance(item, _PendingMark)]
        if len(items) > _MAX_PENDING_MARKS:
            return None
        marks = [self.mark]
        for item in items:
            changed = []
            for mark in marks:
                for target in item.effects:
                    mark = mark.xor_mask(~target.mask, target.value)
                changed.append(mark)
            marks += changed
        return marks

    def _reroute(self, hook: Hook) -> None:
        oif = self._route()
        if oif != self.oif:
            self._event(hook, f"rerouted: out {oif} (was {self.oif})")
            self.oif = oif

    def _nat_stage(self, hook: Hook, stage: _Stage) -> None:
        destination = hook is Hook.PREROUTING or hook is Hook.OUTPUT
        kind = "destination" if destination else "source"
        if destination in self.decided:
            if self.record:
                names = ", ".join(f"{t.name} {c.name}" for t, c in stage.chains)
                self._event(hook, f"skipped {names}: the {kind} NAT of this connection was decided on an earlier hook")
            return
        rewritten = self.dst_rewritten
        for index, (table, chain) in enumerate(stage.chains):
            self._base_chain(hook, table, chain)
            if destination in self.decided:
                rest = stage.chains[index + 1 :]
                if rest and self.record:
                    names = ", ".join(f"{t.name} {c.name}" for t, c in rest)
                    self._event(hook, f"skipped {names}: the first NAT binding wins")
                break
        else:
            self.decided.add(destination)
        if hook is Hook.OUTPUT and self.dst_rewritten != rewritten:
            self._reroute(hook)

    def _base_chain(self, hook: Hook, table: Table, base_chain: Chain) -> None:
        base = base_chain.base
        assert base is not None
        self._mark_before_sym = self.mark.sym
        outcome = self._chain(hook, table, base_chain, base)
        if outcome is _Outcome.DROP:
            raise _Stop(Dropped(reason=f"{table.name} {base_chain.name}"))
        if outcome is _Outcome.REJECT:
            raise _Stop(Dropped(reject=True, reason=f"{table.name} {base_chain.name}"))

    def _chain(self, hook: Hook, table: Table, chain: Chain, base: BaseChain) -> _Outcome:
        stack: list[tuple[Chain, int]] = []
        index = 0
        runs_of: Chain | None = None  # the chain `runs` belongs to
        runs: tuple[_Dispatch | None, ...] | None = None
        exits: int | None = None  # a region left for later that returns from `chain` (see _merge_exits)
        while True:
            if index >= len(chain.rules):
                if stack:
                    if self.record:
                        self.trace.append(
                            ChainEnd(
                                hook=hook,
                                family=table.family,
                                table=table.name,
                                chain=chain.name,
                                outcome="end, return",
                            )
                        )
                    chain, index = stack.pop()
                    exits = None
                    continue
                return self._policy(hook, table, chain, base, "end of chain")
            if not self.record:
                if runs_of is not chain:
                    runs_of, runs = chain, self.interpreter.dispatch(chain)
                if runs is not None:
                    run = runs[index]
                    if run is not None:
                        if self.pending and "src" in run.fields:
                            self._force()
                        following = self._dispatch_next(run, table, chain, index)
                        if following != index:
                            self.visits += following - index
                            index = following
                            exits = None
                            continue
            rule = chain.rules[index]
            self.visits += 1
            if self.visits > MAX_RULE_VISITS:
                raise _Stop(Unknown(reason=f"more than {MAX_RULE_VISITS} rules visited: chains that loop"))
            if self.pending and isinstance(rule.target, _READS_MARKS):
                self._force()
            if (
                self.unobserved_source
                and isinstance(rule.target, (SetMark, Jump))
                and base.type is ChainType.NAT
                and self.sport_random is None
                and not self.forcing
            ):
                effects = self.interpreter.mark_effects(rule, table)
                if effects is not None:
                    # Only rewrites the mark, which maybe nothing reads: decided when something does.
                    where = f"{table.name} {chain.name} #{index + 1}"
                    self.pending.append(_PendingMark(rule=rule, effects=effects, view=self._view(), where=where))
                    self.visits += len(effects)
                    index += 1
                    exits = None
                    continue
            if (
                self.tracer is not None
                and rule.matches
                and type(rule.matches[0]) is StatisticMatch
                and self.choices is None
                and self.interpreter.use_symmetry
            ):
                endpoints = self.interpreter.endpoints(table, chain, index)
                self.alike = endpoints is not None and self._alike(endpoints)
            tracer = self.tracer
            returning = (
                tracer is not None
                and type(rule.target) is Return
                and not self.record
                and not self.pending
                and self.interpreter.use_merging
            )
            if returning or exits is not None:
                assert tracer is not None
                left = tracer.left()
                simple = self._constraints(rule)
                returning = returning and simple is not None and simple is not False
            result, why = self._rule_matches(rule)
            self.alike = False
            if returning or exits is not None:
                assert tracer is not None
                exits = self._merge_exits(
                    chain,
                    index,
                    result=result,
                    grew=tracer.left() - left,
                    exits=exits,
                    returning=returning,
                    simple=simple,
                )
            target = rule.target
            if result is MatchResult.NOT_MATCHED:
                if self.record:
                    self._visit((hook, table, chain), index, rule, result, why)
                index += 1
                continue
            if result is MatchResult.UNKNOWN:
                self._visit((hook, table, chain), index, rule, result, why)
                if isinstance(target, (Continue, Log)):
                    index += 1
                    continue
                raise _Stop(Unknown(reason=f"{table.name} {chain.name} #{index + 1}: {why}"))
            match target:
                case Return():
                    if self.record:
                        self._visit((hook, table, chain), index, rule, result, why)
                    if stack:
                        chain, index = stack.pop()
                        continue
                    return self._policy(hook, table, chain, base, "RETURN from the base chain")
                case Accept():
                    self._visit((hook, table, chain), index, rule, result, why)
                    return _Outcome.ACCEPT
                case Drop():
                    self._visit((hook, table, chain), index, rule, result, why)
                    return _Outcome.DROP
                case Reject():
                    self._visit((hook, table, chain), index, rule, result, why)
                    return _Outcome.REJECT
                case Continue() | Log():
                    self._visit((hook, table, chain), index, rule, result, why)
                    index += 1
                case Jump() | Goto():
                    self._visit((hook, table, chain), index, rule, result, why)
                    if not table.has_chain(target.chain):
                        raise _Stop(
                            Unknown(reason=f"{table.name} {chain.name} #{index + 1}: no chain {target.chain!r}")
                        )
                    if isinstance(target, Jump):
                        stack.append((chain, index + 1))
                    chain, index = table.chain(target.chain), 0
                case Redirect() | Dnat():
                    note = self._destination_nat(hook, base, target)
                    self._visit((hook, table, chain), index, rule, result, _join(why, note))
                    return _Outcome.ACCEPT
                case Snat() | Masquerade():
                    note = self._source_nat(hook, base, target)
                    self._visit((hook, table, chain), index, rule, result, _join(why, note))
                    return _Outcome.ACCEPT
                case TProxy():
                    note = self._tproxy(hook, target)
                    self._visit((hook, table, chain), index, rule, result, _join(why, note))
                    return _Outcome.ACCEPT
                case SetMark():
                    old = self.mark.value
                    self.mark = self.mark.xor_mask(~target.mask, target.value)
                    self._visit(
                        (hook, table, chain), index, rule, result, _join(why, f"mark {old:#x} -> {self.mark.value:#x}")
                    )
                    index += 1
                case ConnmarkSave():
                    old = self.ctmark.value
                    self.ctmark = self.ctmark.combine(~target.ctmask, self.mark, target.nfmask)
                    self._visit(
                        (hook, table, chain),
                        index,
                        rule,
                        result,
                        _join(why, f"ctmark {old:#x} -> {self.ctmark.value:#x}"),
                    )
                    index += 1
                case ConnmarkRestore():
                    old = self.mark.value
                    self.mark = self.mark.combine(~target.nfmask, self.ctmark, target.ctmask)
                    self._visit(
                        (hook, table, chain), index, rule, result, _join(why, f"mark {old:#x} -> {self.mark.value:#x}")
                    )
                    index += 1
                case ConnmarkSet():
                    old = self.ctmark.value
                    self.ctmark = self.ctmark.xor_mask(~target.mask, target.value)
                    self._visit(
                        (hook, table, chain),
                        index,
                        rule,
                        result,
                        _join(why, f"ctmark {old:#x} -> {self.ctmark.value:#x}"),
                    )
                    index += 1
                case CtZone():
                    if self.tracked:
                        note = "no effect: the connection is already tracked"
                    elif self.zone is not None:
                        note = f"no effect: zone {self.zone} was set first"
                    else:
                        self.zone = target.zone
                        note = f"zone {target.zone}"
                    self._visit((hook, table, chain), index, rule, result, _join(why, note))
                    index += 1
                case UnknownTarget():
                    self._visit((hook, table, chain), index, rule, result)
                    raise _Stop(
                        Unknown(reason=f"{table.name} {chain.name} #{index + 1}: target {target.name} is not modelled")
                    )
                case _:
                    assert_never(target)

    def _dispatch_next(self, run: _Dispatch, table: Table, chain: Chain, index: int) -> int:
        """The first rule of ``run`` from ``index`` on whose tests of the run's fields all hold: the rules
        before it do not match. Through the tracer, the region keeps the classes on which exactly those
        rules fail (one combined constraint for all of them) and leaves the rest to one other run."""
        tracer = self.tracer
        allowed = run.possible(self.c.protocol, self.family)
        symbolic: list[tuple[str, str]] = []
        for field in run.fields:
            value = self.dst if field == "dst" else self.dport if field == "dport" else self.src
            sym = self.sym[field] if tracer is not None else None
            if sym is None:
                if value is None:
                    return index
                allowed = allowed.intersection(run.hits(field, value))
            elif isinstance(sym, str) and all(sym != dim for _, dim in symbolic):
                symbolic.append((field, sym))
            else:
                return index
        if not symbolic:
            return min((j for j in allowed if j >= index), default=run.end)
        assert tracer is not None
        found, inside, outside = run.split(tracer, symbolic, index, allowed)
        if found < run.end and self.interpreter.use_mirrors and symbolic[0][0] == run.fields[0]:
            mirrors = self._mirrors(table, chain, found, index, allowed)
            if mirrors and tracer.restrict_mirrored(inside, outside, mirrors):
                return found
        tracer.restrict(inside, outside)
        return found

    def _mirrors(self, table: Table, chain: Chain, found: int, index: int, allowed: frozenset[int]) -> list[Mirror]:
        """The mirrors of the proof's classes that map the connections for which rule ``found`` is the first
        of its dispatch run to hold onto those for which a partner is (see :meth:`Interpreter.partners`).
        The partner must be one the run may reach (at or after ``index``, ``allowed``); no value the run
        holds (an address, a port) may be one the mirror moves."""
        interpreter = self.interpreter
        candidates = [c for c in interpreter.candidates(table, chain, found) if c.rule >= index and c.rule in allowed]
        if not candidates:
            return []
        tracer = self.tracer
        assert tracer is not None
        # The candidates all swap the found rule's class of the first field: when no other class of it goes
        # with that one in every box of the region (a connection the proxy makes to one service), none can.
        first = tracer.mirror(interpreter.swaps(candidates[0]))
        if first is not None and any(tracer.agreeing(p, i) & ~(1 << i) == 0 for p, i, _j in first):
            return []
        held = set(self._held())
        held.update(getattr(self, field) for field in _MIRRORED_FIELDS if self.sym[field] is None)
        mirrors: list[Mirror] = []
        for candidate in candidates:
            # First the swap of the run's first field alone, which the region must hold (cheap); then the rest.
            first = tracer.mirror(interpreter.swaps(candidate))
            if first is None or not tracer.invariant(first):
                continue
            partner = interpreter.partner(table, chain, found, candidate.rule)
            if partner is None or not held.isdisjoint(partner.moved):
                continue
            mirror = tracer.mirror(interpreter.swaps(partner))
            if mirror is not None:
                mirrors.append(mirror)
        return mirrors

    def _policy(self, hook: Hook, table: Table, chain: Chain, base: BaseChain, why: str) -> _Outcome:
        if self.record:
            self.trace.append(
                ChainEnd(
                    hook=hook,
                    family=table.family,
                    table=table.name,
                    chain=chain.name,
                    outcome=f"{why}: policy {base.policy.value}",
                )
            )
        return _Outcome.ACCEPT if base.policy is ChainPolicy.ACCEPT else _Outcome.DROP

    def _visit(
        self, at: tuple[Hook, Table, Chain], index: int, rule: Rule, result: MatchResult, note: str | None = None
    ) -> None:
        if self.record:
            hook, table, chain = at
            self.trace.append(
                RuleVisit(
                    hook=hook,
                    family=table.family,
                    table=table.name,
                    chain=chain.name,
                    index=index + 1,
                    rule=rule,
                    result=result,
                    note=note,
                )
            )

    # ------------------------------------------------------------------ targets

    def _destination_nat(self, hook: Hook, base: BaseChain, target: Redirect | Dnat) -> str:
        name = type(target).__name__.upper()
        if base.type is not ChainType.NAT or hook not in DESTINATION_NAT_HOOKS:
            raise _Stop(Unknown(reason=f"{name} outside a nat chain of PREROUTING or OUTPUT"))
        old = (self.dst, self.dport)
        address: IPAddress
        if isinstance(target, Redirect):
            if hook is Hook.OUTPUT:
                address = LOOPBACK_V4 if self.family is Family.IPV4 else LOOPBACK_V6
            else:
                assert self.iif is not None
                found = self._iif_test(self.interpreter.first_address[self.family])
                if found is None:
                    raise _Stop(Dropped(reason=f"REDIRECT: {self.iif} has no {self.family.value} address"))
                address = found
            changed_address = not self._dst_test(Eq(address))
        elif target.addresses is None:
            address, changed_address = self.dst, False
        else:
            address = self._pick_address(target.addresses, name)
            changed_address = not self._dst_test(Eq(address))
        changed_port = False
        if target.flags & _RANDOM_PORTS and target.ports is not None and len(target.ports) > 1:
            raise _Stop(Unknown(reason=f"{name} --random to a range of ports: the kernel picks the port at random"))
        if target.ports is not None and target.ports and not self._test("dport", self.dport, In(target.ports)):
            # Outside the range: the kernel takes its lowest port (inside, the port stays).
            self.dport = target.ports.intervals[0][0]
            self.sym["dport"] = None
            self.dport_rewritten = changed_port = True
        if address is not self.dst:
            self.dst = address
            self.sym["dst"] = None
            self.dst_rewritten = self.dst_rewritten or changed_address
        self.decided.add(True)
        if changed_address or changed_port:
            self.dnat = True
        return f"destination {_endpoint(*old)} -> {_endpoint(self.dst, self.dport)}"

    def _source_nat(self, hook: Hook, base: BaseChain, target: Snat | Masquerade) -> str:
        name = type(target).__name__.upper()
        if base.type is not ChainType.NAT or hook in DESTINATION_NAT_HOOKS:
            raise _Stop(Unknown(reason=f"{name} outside a nat chain of INPUT or POSTROUTING"))
        old = (self.src, self.sport)
        address: IPAddress
        if isinstance(target, Masquerade):
            if self.oif is None:
                raise _Stop(Unknown(reason="MASQUERADE without an outgoing interface"))
            found = self.env.first_address(self.oif, self.family)
            if found is None:
                raise _Stop(Dropped(reason=f"MASQUERADE: {self.oif} has no {self.family.value} address"))
            address = found
        elif target.addresses is None:
            address = self.src
        else:
            address = self._pick_address(target.addresses, name)
        changed = False
        if address is not self.src:
            changed = not self._test("src", self.src, Eq(address))
            self.src = address
            self.sym["src"] = None
        if target.ports is not None and target.ports and not self._test("sport", self.sport, In(target.ports)):
            self.sport = target.ports.intervals[0][0]
            self.sym["sport"] = None
            changed = True
        random = target.flags & _RANDOM_PORTS
        if random and (target.ports is None or len(target.ports) > 1):
            # Where the connection goes does not change; which source port it leaves from is random.
            flags = " ".join(f"--{flag.value}" for flag in NatFlag if flag in random)
            self.sport_random = f"the source port was picked at random ({name} {flags})"
        self.decided.add(False)
        if changed:
            self.snat = True
        return f"source {_endpoint(*old)} -> {_endpoint(self.src, self.sport)}"

    def _pick_address(self, addresses: AddressRange, name: str) -> IPAddress:
        if addresses.first.version != self.family.version:
            raise _Stop(Unknown(reason=f"{name} to an address of the other family"))
        if addresses.first == addresses.last:
            return addresses.first
        raise _Stop(Unknown(reason=f"{name} to an address range: the kernel picks an address by hash"))

    def _iif_test(self, key: Callable[[Any], Hashable]) -> Any:
        if self.own_iif:
            return self._test("iif", self.iif, key)
        return key(self.iif)

    def _tproxy(self, hook: Hook, target: TProxy) -> str:
        if hook is not Hook.PREROUTING:
            raise _Stop(Unknown(reason="TPROXY outside PREROUTING"))
        if target.mark is not None:
            self.mark = self.mark.xor_mask(~target.mask, target.mark)
        address = target.address
        address_sym: Sym | None = None
        if address is None and self.iif is not None:
            address = self._iif_test(self.interpreter.first_address[self.family])
        if address is None:
            address, address_sym = self.dst, self.sym["dst"]
        self.tproxy = TProxied(port=target.port, address=address, mark=self.mark.value)
        self.tproxy_syms = {
            "address": address_sym,
            "mark": self.mark.sym if self.mark.sym is not None and not self.mark.sym.constant else None,
        }
        return f"listener {_endpoint(address, target.port)}, mark {self.mark.value:#x}"

    # ------------------------------------------------------------------ matches

    def _rule_matches(self, rule: Rule) -> tuple[MatchResult, str | None]:
        """Whether a rule's matches all hold. During proof enumeration they are one conjunction,
        decided at once, so that "the rule does not match" stays one region whichever match fails."""
        tracer = self.tracer
        constraints: dict[int, int] = {}
        holds = True
        unknown: str | None = None
        choice: str | None = None
        with_socket: tuple[int, int] | None = None  # (position, classes): the packet must have a socket
        if not self.pending:
            parts: tuple[tuple[_Plan, ...], ...] = (self.interpreter.plans(rule),)
        else:
            parts = self.interpreter.source_plans(rule)
        for plans in parts:
            if plans and plans is not parts[0]:
                # These read what the source NAT left for later may change: when the tests so far fail
                # (on the representative), the rule does not match where they fail, whatever the rest.
                if not holds:
                    assert tracer is not None
                    if with_socket is not None:
                        constraints[with_socket[0]] = constraints.get(with_socket[0], -1) & with_socket[1]
                    tracer.decide_constraints(constraints, False)
                    return MatchResult.NOT_MATCHED, None
                if self.pending:
                    self._force()
            for plan in plans:
                kind = plan[0]
                field: str
                value: Any
                if kind is _ADDRESS or kind is _PORT or kind is _ADDRTYPE:
                    if kind is _ADDRESS and self.family.version not in plan[4]:
                        # Only the other family's members: iptables would not load it; nft does not match.
                        return MatchResult.NOT_MATCHED, None
                    if kind is _PORT and self.c.protocol is not plan[4]:
                        return MatchResult.NOT_MATCHED, None
                    field = plan[1]
                    if field == "sport" and self.sport_random is not None:
                        unknown = unknown or self.sport_random
                        continue
                    value = getattr(self, field)
                    sym = self.sym[field]
                elif kind is _PROTOCOL:
                    if (self.c.protocol is plan[1]) == plan[2]:
                        return MatchResult.NOT_MATCHED, None
                    continue
                elif kind is _FAMILY:
                    if self.family is not plan[1]:
                        return MatchResult.NOT_MATCHED, None
                    continue
                elif kind is _OIF:
                    if not plan[1](self.oif or ""):
                        return MatchResult.NOT_MATCHED, None
                    continue
                elif kind is _IIF:
                    if self.iif is None or not self.own_iif:
                        if not plan[1](self.iif or ""):
                            return MatchResult.NOT_MATCHED, None
                        continue
                    field, value, sym = "iif", self.iif, self.sym["iif"]
                    plan = (_IIF, "iif", plan[1], False)
                elif kind is _OWNER:
                    if self.hook is not Hook.OUTPUT and self.hook is not Hook.POSTROUTING:
                        if not plan[4]:
                            return MatchResult.NOT_MATCHED, None
                        continue
                    field = plan[1]
                    sym = self.sym[field]
                    socket_sym = self.sym["socket"]
                    if tracer is not None and socket_sym is not None and sym is not None and not plan[4]:
                        # Socketless packets do not match: "the packet has a socket" is one more test of
                        # the conjunction, so they stay in one region with the others that do not match.
                        # (Added after the rule's other tests: the region of those that fail starts with
                        # connections that have a socket, the plainer examples.)
                        position, outcome, outcomes = tracer.resolve(socket_sym, self.interpreter.present)
                        with_socket = (
                            position,
                            with_socket[1] & outcomes.get(True, 0) if with_socket else outcomes.get(True, 0),
                        )
                        if not outcome:
                            holds = False
                        value = None  # tested through the tracer below
                    else:
                        if self.socket is None or not self._has_socket():
                            if not plan[4]:
                                return MatchResult.NOT_MATCHED, None
                            continue
                        value = self.socket.uid if field == "uid" else self.socket.gid
                elif kind is _MARK or kind is _CTMARK:
                    mark = self.mark if kind is _MARK else self.ctmark
                    value = mark.value
                    test = plan[1]
                    if mark.sym is None or mark.sym.constant or tracer is None:
                        sym = None
                    elif mark.sym.and_mask != MAX_MARK or mark.sym.xor:
                        try:
                            derived = self._derived_mark_test(mark.sym, test)
                        except _Stop as stop:
                            # Like a match not modelled: the rule does not match where another test fails.
                            assert isinstance(stop.verdict, Unknown)
                            unknown = unknown or stop.verdict.reason
                            continue
                        if isinstance(derived, bool):
                            if derived == plan[2]:
                                return MatchResult.NOT_MATCHED, None
                            continue
                        sym, test = mark.sym.dim, derived
                    else:
                        sym = mark.sym.dim
                    plan = (kind, "", test, plan[2])
                elif kind is _CTSTATE:
                    if bool(self._ct_states() & plan[1]) == plan[2]:
                        return MatchResult.NOT_MATCHED, None
                    continue
                elif kind is _CONSTANT:
                    if not plan[1]:
                        return MatchResult.NOT_MATCHED, None
                    continue
                elif kind is _CHOICE:
                    choice = choice or plan[1]
                    continue
                else:
                    assert kind is _UNKNOWN
                    unknown = unknown or plan[1]
                    continue
                test, negate = plan[2], plan[3]
                if sym is None or tracer is None:
                    if bool(test(value)) == negate:
                        return MatchResult.NOT_MATCHED, None
                    continue
                position, outcome, outcomes = tracer.resolve(sym, test)
                wanted = not negate
                constraints[position] = constraints.get(position, -1) & outcomes.get(wanted, 0)
                if outcome != wanted:
                    holds = False
        if with_socket is not None:
            position, mask = with_socket
            constraints[position] = constraints.get(position, -1) & mask
        if constraints:
            assert tracer is not None
            if not tracer.decide_constraints(constraints, holds):
                return MatchResult.NOT_MATCHED, None
        if unknown is not None:
            return MatchResult.UNKNOWN, unknown
        if choice is not None:
            taken = self._choose()
            outcome = "matched" if taken else "no match"
            note = f"a random choice ({choice}): this path takes {outcome}; the other outcome is possible too"
            return (MatchResult.MATCHED if taken else MatchResult.NOT_MATCHED), note
        return MatchResult.MATCHED, None

    def _choose(self) -> bool:
        """The outcome of a choice point: forced (``choices``), the explorer's (``tracer``), or the default."""
        if self.choices is not None:
            taken = self.choices.next()
        elif self.tracer is not None:
            taken = self.tracer.choose(alike=self.alike)
        else:
            taken = DEFAULT_CHOICE
        self.taken.append(taken)
        return taken

    def _ct_states(self) -> frozenset[CtState]:
        if not self.tracked:
            return frozenset({CtState.INVALID})
        states = {CtState.NEW}
        if self.dnat:
            states.add(CtState.DNAT)
        if self.snat:
            states.add(CtState.SNAT)
        return frozenset(states)


def _addr_type(env: Environment, address: IPAddress) -> AddrType:
    """The route type ``-m addrtype`` sees for an address."""
    if address.is_multicast:
        return AddrType.MULTICAST
    if isinstance(address, ipaddress.IPv4Address) and (address == _BROADCAST_V4 or address in _ZERONET_V4):
        return AddrType.BROADCAST
    if env.is_local(address):
        return AddrType.LOCAL
    return AddrType.UNICAST


def _first_address(env: Environment, family: Family, interface: str) -> IPAddress | None:
    return env.first_address(interface, family)


def _mark_sym(sym: Sym | None) -> MarkSym | None:
    if sym is None:
        return None
    if isinstance(sym, MarkSym):
        return sym
    return MarkSym(sym)


def _is_loopback_interface(name: object) -> bool:
    return name == LOOPBACK_INTERFACE


_IS_LOOPBACK_INTERFACE: Final = _is_loopback_interface


@attrs.frozen
class MarkIs:
    """The test ``(mark & mask) == value``, cached by value (see :class:`~meshredirect.semantics.explore.Eq`)."""

    mask: int
    value: int

    def __call__(self, mark: int) -> bool:
        return (mark & self.mask) == self.value


def _mark_tests(ruleset: Ruleset, env: Environment) -> frozenset[tuple[int, int]]:
    tests = {(route.mask, route.value) for route in env.local_marks}
    if env.proxy.transparent:
        tests.add((MAX_MARK, env.proxy.tproxy_mark))
    for _table, _chain, rule in ruleset.rules():
        for match in rule.matches:
            if isinstance(match, (MarkMatch, ConnmarkMatch)):
                tests.add((match.mask, match.value))
    return frozenset(tests)


def _join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


def _statistic_outcome(match: StatisticMatch) -> bool | None:
    """Whether a statistic match always (True) or never (False) matches; None: it may go either way.

    xt_statistic matches a random packet when a 31-bit random number is below the probability (so
    probability 1 always, 0 never), and counts packets in nth mode (every 1: each packet).
    """
    if match.probability is not None:
        if match.probability >= 1:
            return not match.negate
        if match.probability <= 0:
            return match.negate
        return None
    if match.every == 1:
        return not match.negate
    return None


def _endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def iter_visits(evaluation: Evaluation) -> Iterator[RuleVisit]:
    """The rules an evaluation visited, in order."""
    for entry in evaluation.trace:
        if isinstance(entry, RuleVisit):
            yield entry
