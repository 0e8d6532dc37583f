"""A pure-Python reference model of the generated program: the same plan, run step by step.

:func:`decide` is what ``mr_connect4``/``mr_connect6`` do for one
``connect()``: gather the fields (the task's uid/gid, the bound source or the
route's preferred source, the route's interface from the environment's maps),
run the family's decision (IPv4 for IPv4-mapped destinations), and return the
:data:`Outcome`. Map lookups behave as the kernel's maps do: an LPM trie finds
the longest prefix covering an address, a hash map its exact key.

>>> import ipaddress
>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> from meshredirect_ebpf.environment import Environment
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

import ipaddress
from typing import Final, TypeAlias, assert_never

import attrs

from meshredirect.ir import ChainPolicy, Family, Protocol
from meshredirect.values import IPAddress
from meshredirect_ebpf.environment import Environment
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

__all__ = ["ConnectCall", "Outcome", "Refused", "Rewritten", "Unchanged", "decide"]

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


Outcome: TypeAlias = Unchanged | Rewritten | Refused


@attrs.frozen(kw_only=True)
class _Connection:
    family: Family
    protocol: Protocol
    dst: IPAddress
    dport: int
    src: IPAddress
    uid: int
    gid: int
    oif: int
    local: bool


def _unspecified(version: int) -> IPAddress:
    return ipaddress.IPv4Address(0) if version == 4 else ipaddress.IPv6Address(0)


def _gather(
    environment: Environment, family: Family, call: ConnectCall, dst: IPAddress, bound: IPAddress | None
) -> _Connection:
    """``mr_fill4`` / the IPv6 prologue and ``mr_route_of*``."""
    version = family.version
    src = bound if bound is not None and not bound.is_unspecified else _unspecified(version)
    route = environment.route(dst)
    oif, local = NO_ROUTE, False
    if route is not None:
        oif, local = environment.interface_id(route.interface), route.local
        if src.is_unspecified and route.source is not None:
            src = route.source
    return _Connection(
        family=family,
        protocol=call.protocol,
        dst=dst,
        dport=call.port,
        src=src,
        uid=call.uid,
        gid=call.gid,
        oif=oif,
        local=local,
    )


class _Run:
    def __init__(self, program: Program, decision: Decision, connection: _Connection) -> None:
        self.program = program
        self.decision = decision
        self.c = connection

    def holds(self, condition: Condition) -> bool:
        c = self.c
        match condition:
            case Constant():
                return condition.value
            case ProtocolIs():
                return c.protocol is condition.protocol
            case Member():
                item = self.program.set_map(condition.map)
                if isinstance(item, PrefixSet):
                    address = c.dst if condition.field is Field.DESTINATION else c.src
                    return any(address.version == n.version and address in n for n in item.networks)
                assert isinstance(item, IntegerSet)
                value = {Field.DESTINATION_PORT: c.dport, Field.UID: c.uid, Field.GID: c.gid}[condition.field]
                return value in item
            case OutputInterface():
                env = self.program.environment
                return any(c.oif == env.interface_id(name) for name in condition.interfaces)
            case DestinationIsLocal():
                return c.local
            case Not():
                return not self.holds(condition.operand)
            case AllOf():
                return all(self.holds(operand) for operand in condition.operands)
            case _:
                assert_never(condition)

    def call(self, name: str) -> int | str:
        """A chain function: ``"return"``, ``"accept"``, ``"deny"`` or the redirect port (-1: keep)."""
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
                    return self.c.dport if action.port is None else action.port
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

    def decide(self) -> int | str:
        for entry in self.decision.entries:
            verdict = self.call(entry.function)
            if verdict == "return":
                verdict = "accept" if entry.policy is ChainPolicy.ACCEPT else "deny"
            if verdict != "accept":
                return verdict
        return "accept"


def decide(program: Program, call: ConnectCall) -> Outcome:
    """What the program does with one ``connect()`` (see the module docstring)."""
    destination, bound, family = call.destination, call.bound, call.family
    mapped = isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped is not None
    if mapped:
        assert isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped is not None
        destination = destination.ipv4_mapped
        mapped_bound = bound.ipv4_mapped if isinstance(bound, ipaddress.IPv6Address) else None
        bound = mapped_bound
        family = Family.IPV4
    decision = program.decision(family)
    if decision is None:
        return Unchanged()
    connection = _gather(program.environment, family, call, destination, bound)
    verdict = _Run(program, decision, connection).decide()
    if verdict == "deny":
        return Refused()
    if verdict == "accept":
        return Unchanged()
    assert isinstance(verdict, int)
    if mapped:
        return Rewritten(address=ipaddress.IPv6Address("::ffff:127.0.0.1"), port=verdict)
    return Rewritten(address=LOOPBACK[family.version], port=verdict)
