"""A pure-Python reference model of the generated program: the same plan, run step by step.

:func:`decide` is what ``mr_connect4``/``mr_connect6`` do for one
``connect()``: gather the fields (the task's uid/gid, the bound source or the
route's preferred source, the route's interface from the environment's maps),
run the family's decision (IPv4 for IPv4-mapped destinations), and return the
``Outcome``. Map lookups behave as the kernel's maps do: an LPM trie finds
the longest prefix covering an address, a hash map its exact key.

>>> import ipaddress
>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> from meshredirect_ebpf.environment import LOOPBACK_INTERFACE, Environment
>>> from meshredirect_ebpf.lowering import lower
>>> program = lower(compile_policy(Policy(inbound_ports="")), Environment.pod("10.0.0.5"))
>>> app = ConnectCall(family=Family.IPV4, destination=ipaddress.ip_address("10.96.0.1"), port=443, uid=1000, gid=1000)
>>> decide(program, app)
Rewritten(address=IPv4Address('127.0.0.1'), port=15001)
>>> decide(program, attrs.evolve(app, uid=1337))
Unchanged()
>>> decide(program, attrs.evolve(app, uid=1337, destination=ipaddress.ip_address("10.0.0.5")))
Rewritten(address=IPv4Address('127.0.0.1'), port=15006)
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final, TypeAlias, assert_never
from typing import Protocol as TypingProtocol

import attrs

from meshredirect.ir import ChainPolicy, Family, Protocol
from meshredirect.values import AddressSet, IdSet, IPAddress, PortSet
from meshredirect_ebpf.environment import LOOPBACK_INTERFACE, Environment
from meshredirect_ebpf.plan import (
    AcceptConnection,
    AllOf,
    Call,
    Condition,
    Constant,
    Decision,
    Deny,
    DestinationIsLocal,
    Field,
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
)

__all__ = [
    "ConnectCall",
    "In",
    "Outcome",
    "Port",
    "Probe",
    "Refused",
    "Rewritten",
    "RouteOf",
    "Unchanged",
    "decide",
    "run",
]

LOOPBACK: Final[dict[int, IPAddress]] = {4: ipaddress.IPv4Address("127.0.0.1"), 6: ipaddress.IPv6Address("::1")}
#: What ``mr_route_of*`` leaves in ``c->oif`` for a destination without a route.
NO_ROUTE: Final = 0


@attrs.frozen(kw_only=True)
class ConnectCall:
    """One ``connect()`` as the hook sees it.

    ``family`` is the socket's (an IPv6 socket may connect to an IPv4-mapped
    address); ``bound`` is the address the socket was bound to before, if any.
    """

    family: Family
    destination: IPAddress
    port: int
    uid: int
    gid: int
    protocol: Protocol = Protocol.TCP
    bound: IPAddress | None = None
    #: The socket's mark (SO_MARK).
    mark: int = 0


@attrs.frozen(kw_only=True)
class Unchanged:
    """connect() goes where the application asked."""


@attrs.frozen(kw_only=True)
class Rewritten:
    """connect() goes to ``address``:``port`` instead (the original is kept for SO_ORIGINAL_DST)."""

    address: IPAddress
    port: int


@attrs.frozen(kw_only=True)
class Refused:
    """connect() fails (EPERM)."""


#: What the program does with one connect().
Outcome: TypeAlias = Unchanged | Rewritten | Refused


#: What the route of a destination gives the program: the interface number, whether the destination is
#: local, the preferred source (None: none).
RouteFacts: TypeAlias = tuple[int, bool, IPAddress | None]


class Probe(TypingProtocol):
    """How the model reads the connection: every test on a field goes through :meth:`test`.

    Fields: ``dst``, ``src`` (the bound address; unspecified when unbound), ``dport``, ``uid``, ``gid``,
    ``mark``.
    A test's key must be hashable by value or stable in identity (the path explorer of the semantics
    engine caches the classes of a field by key).
    """

    def test(self, field: str, key: Callable[[Any], Hashable]) -> Any: ...

    def value(self, field: str) -> Any: ...


@attrs.frozen
class _Concrete:
    values: Mapping[str, Any]

    def test(self, field: str, key: Callable[[Any], Hashable]) -> Any:
        return key(self.values[field])

    def value(self, field: str) -> Any:
        return self.values[field]


@attrs.frozen
class RouteOf:
    """``mr_route_of*``: the route of a destination in the environment, as the program sees it."""

    environment: Environment

    def __call__(self, destination: IPAddress) -> RouteFacts:
        route = self.environment.route(destination)
        if route is None:
            return (NO_ROUTE, False, None)
        return (self.environment.interface_id(route.interface), route.local, route.source)


@attrs.frozen
class MarkRouted:
    """``mr_mark_routed``: whether the environment's policy routing sends this mark to lo."""

    environment: Environment

    def __call__(self, mark: int) -> bool:
        return self.environment.routes_locally(mark)


@attrs.frozen
class MarkTest:
    """``(mark & mask) == value``; hashable by value."""

    value: int
    mask: int

    def __call__(self, mark: int) -> bool:
        return (mark & self.mask) == self.value


@functools.cache
def _mark_test(value: int, mask: int) -> MarkTest:
    return MarkTest(value=value, mask=mask)


@functools.cache
def _mark_routed(environment: Environment) -> MarkRouted:
    return MarkRouted(environment)


class _Index:
    """What a program's runs look up again and again, built once per program: the test of each set, the
    route test, the interface numbers (tests must also keep their identity across the explorer's runs)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.route = route_key(program.environment)
        self.mark_routed = _mark_routed(program.environment)
        self.members = {item.name: _members(item) for item in program.sets}
        env = program.environment
        self.interfaces = {name: env.interface_id(name) for name in env.interfaces}


_INDEXES: dict[int, _Index] = {}
#: Programs whose index is kept (the proof and the property tests use a few at a time).
_INDEX_CACHE_SIZE: Final = 16


def _index(program: Program) -> _Index:
    found = _INDEXES.get(id(program))
    if found is not None and found.program is program:
        return found
    if len(_INDEXES) >= _INDEX_CACHE_SIZE:
        _INDEXES.pop(next(iter(_INDEXES)))
    index = _INDEXES[id(program)] = _Index(program)
    return index


def _is_unspecified(address: IPAddress) -> bool:
    return address.is_unspecified


@functools.cache
def route_key(environment: Environment) -> RouteOf:
    """The route test of an environment (one object per environment: the explorer caches tests by identity)."""
    return RouteOf(environment)


@functools.cache
def _members(item: PrefixSet | IntegerSet) -> In:
    """The set a map holds, as a test by value (``In`` is cached by value by the explorer)."""
    if isinstance(item, PrefixSet):
        return In(AddressSet(item.networks))
    if item.bits == 16:
        return In(PortSet(tuple((max(lo, 1), hi) for lo, hi in item.intervals)))
    return In(IdSet(item.intervals))


@attrs.frozen
class In:
    """``value in members``; hashable by value."""

    members: Hashable

    def __call__(self, value: object) -> bool:
        return value in self.members  # type: ignore[operator]


@attrs.frozen
class Port:
    """A redirect's port: a constant, or (``kept``) the connection's destination port."""

    number: int
    kept: bool


class _Run:
    """``mr{4,6}_decide`` and what it calls, over a probe."""

    def __init__(self, program: Program, decision: Decision, protocol: Protocol, probe: Probe) -> None:
        self.program = program
        self.decision = decision
        self.protocol = protocol
        self.probe = probe
        self.index = _index(program)
        self._route: RouteFacts | None = None
        self._source: IPAddress | bool | None = False

    def route(self) -> RouteFacts:
        if self._route is None:
            oif, local, source = self.probe.test("dst", self.index.route)
            if self.probe.test("mark", self.index.mark_routed):
                oif = self.index.interfaces[LOOPBACK_INTERFACE]
            self._route = (oif, local, source)
        return self._route

    def source_is_member(self, members: In) -> bool:
        """The bound source, or (unbound) the route's preferred source (none: the unspecified address)."""
        if self.probe.test("src", _is_unspecified):
            source = self.route()[2]
            if source is None:
                source = ipaddress.ip_address(0 if self.decision.family is Family.IPV4 else "::")
            return members(source)
        return bool(self.probe.test("src", members))

    def holds(self, condition: Condition) -> bool:
        match condition:
            case Constant():
                return condition.value
            case ProtocolIs():
                return self.protocol is condition.protocol
            case Member():
                members = self.index.members[condition.map]
                if condition.field is Field.SOURCE:
                    return self.source_is_member(members)
                return bool(self.probe.test(condition.field.value, members))
            case OutputInterface():
                oif = self.route()[0]
                return any(oif == self.index.interfaces.get(name) for name in condition.interfaces)
            case DestinationIsLocal():
                return self.route()[1]
            case MarkIs():
                return bool(self.probe.test("mark", _mark_test(condition.value, condition.mask)))
            case Not():
                return not self.holds(condition.operand)
            case AllOf():
                return all(self.holds(operand) for operand in condition.operands)
            case _:
                assert_never(condition)

    def call(self, name: str) -> Port | str:
        """A chain function: ``"return"``, ``"accept"``, ``"deny"`` or the redirect's port."""
        for step in self.decision.function(name).steps:
            if not self.holds(step.condition):
                continue
            action = step.action
            match action:
                case ReturnToCaller():
                    return "return"
                case AcceptConnection():
                    return "accept"
                case Deny():
                    return "deny"
                case RedirectTo():
                    if action.port is None:
                        return Port(number=self.probe.value("dport"), kept=True)
                    return Port(number=action.port, kept=False)
                case Call():
                    verdict = self.call(action.function)
                    if verdict != "return":
                        return verdict
                case GoTo():
                    return self.call(action.function)
                case Nothing():
                    pass
                case _:
                    assert_never(action)
        return "return"

    def decide(self) -> Port | str:
        for entry in self.decision.entries:
            verdict = self.call(entry.function)
            if verdict == "return":
                verdict = "accept" if entry.policy is ChainPolicy.ACCEPT else "deny"
            if verdict != "accept":
                return verdict
        return "accept"


def run(program: Program, family: Family, protocol: Protocol, probe: Probe) -> Port | str:
    """The decision of ``family`` for a connection read through ``probe``: ``"accept"`` (unchanged),
    ``"deny"``, or the :class:`Port` of a redirect to loopback. For the proof enumeration."""
    decision = program.decision(family)
    if decision is None:
        return "accept"
    return _Run(program, decision, protocol, probe).decide()


def decide(program: Program, call: ConnectCall) -> Outcome:
    """What the program does with one ``connect()`` (see the module docstring)."""
    destination, bound, family = call.destination, call.bound, call.family
    mapped = isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped is not None
    if mapped:
        assert isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped is not None
        destination = destination.ipv4_mapped
        bound = bound.ipv4_mapped if isinstance(bound, ipaddress.IPv6Address) else None
        family = Family.IPV4
    if bound is None:
        bound = ipaddress.ip_address(0 if family is Family.IPV4 else "::")
    values = {
        "dst": destination,
        "src": bound,
        "dport": call.port,
        "uid": call.uid,
        "gid": call.gid,
        "mark": call.mark,
    }
    verdict = run(program, family, call.protocol, _Concrete(values))
    if verdict == "deny":
        return Refused()
    if verdict == "accept":
        return Unchanged()
    assert isinstance(verdict, Port)
    if mapped:
        return Rewritten(address=ipaddress.IPv6Address("::ffff:127.0.0.1"), port=verdict.number)
    return Rewritten(address=LOOPBACK[family.version], port=verdict.number)
