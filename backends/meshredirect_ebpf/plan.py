"""The program plan: what the generated eBPF program decides, as data.

The lowering (:mod:`meshredirect_ebpf.lowering`) turns the IR's nat OUTPUT
chains into a :class:`Program`: one :class:`Function` per chain, one
:class:`Step` per rule (a ``Condition`` and an ``Action``), and the
sets the conditions look up, as map definitions with their contents. The C
source (:mod:`meshredirect_ebpf.csource`) is printed from the plan, statement
for statement, and the reference model (:mod:`meshredirect_ebpf.model`) runs
the same plan, so the two cannot drift apart.

>>> step = Step(condition=ProtocolIs(protocol=Protocol.TCP), action=RedirectTo(port=15001), origin="rule 1")
>>> step.action
RedirectTo(port=15001)
"""

from __future__ import annotations

import enum
from typing import Final, TypeAlias

import attrs

from meshredirect.ir import ChainPolicy, Family, Protocol
from meshredirect.values import IPNetwork
from meshredirect_ebpf.environment import Environment

__all__ = [
    "PROGRAMS",
    "AcceptConnection",
    "Action",
    "AllOf",
    "Call",
    "Condition",
    "Constant",
    "Decision",
    "Deny",
    "DestinationIsLocal",
    "EntryPoint",
    "Field",
    "Function",
    "GoTo",
    "IntegerSet",
    "MarkIs",
    "Member",
    "Not",
    "Nothing",
    "OutputInterface",
    "PrefixSet",
    "Program",
    "ProtocolIs",
    "RedirectTo",
    "ReturnToCaller",
    "SetMap",
    "Step",
]


#: Section, function name and bpftool cgroup attach type of every program, in the order the C source defines them.
PROGRAMS: Final = (
    ("sockops", "mr_sockops", "sock_ops"),
    ("cgroup/getsockopt", "mr_getsockopt", "getsockopt"),
    ("cgroup/connect4", "mr_connect4", "connect4"),
    ("cgroup/connect6", "mr_connect6", "connect6"),
    ("cgroup/sendmsg4", "mr_sendmsg4", "sendmsg4"),
    ("cgroup/sendmsg6", "mr_sendmsg6", "sendmsg6"),
    ("cgroup/getpeername4", "mr_getpeername4", "getpeername4"),
    ("cgroup/getpeername6", "mr_getpeername6", "getpeername6"),
    ("cgroup/recvmsg4", "mr_recvmsg4", "recvmsg4"),
    ("cgroup/recvmsg6", "mr_recvmsg6", "recvmsg6"),
)


class Field(enum.Enum):
    """A value of the connection a condition looks at."""

    DESTINATION = "dst"
    #: The bound source address, or (unbound) the preferred source of the route.
    SOURCE = "src"
    DESTINATION_PORT = "dport"
    #: The connecting task's uid and gid.
    UID = "uid"
    GID = "gid"
    #: The socket's mark (SO_MARK): the packet mark at nat OUTPUT when no mangle rule changes it.
    MARK = "mark"


# ----------------------------------------------------------------------------- maps


@attrs.frozen(kw_only=True)
class PrefixSet:
    """IPv4 or IPv6 prefixes: an address is a member when some prefix covers it.

    Every prefix set of a family lives in one LPM trie (``mr_sets4``/``mr_sets6``), under its
    ``index``: the key is the set's number, then the prefix.
    """

    name: str
    index: int
    version: int
    networks: tuple[IPNetwork, ...]
    purpose: str


@attrs.frozen(kw_only=True)
class IntegerSet:
    """16-bit ports or 32-bit ids (ranges expanded: a hash holds single keys).

    Every port set lives in one hash map (``mr_ports``), every uid/gid set in another (``mr_ids``),
    under its ``index``: the key is the set's number, then the value.
    """

    name: str
    index: int
    bits: int
    intervals: tuple[tuple[int, int], ...]
    purpose: str

    @property
    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.intervals)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and any(lo <= value <= hi for lo, hi in self.intervals)


#: Every set map: the closed union of what a condition looks up.
SetMap: TypeAlias = PrefixSet | IntegerSet

# ----------------------------------------------------------------------------- conditions


@attrs.frozen(kw_only=True)
class Constant:
    """Known when the program is generated (e.g. an address set with no member of this family)."""

    value: bool


@attrs.frozen(kw_only=True)
class ProtocolIs:
    protocol: Protocol


@attrs.frozen(kw_only=True)
class Member:
    """The connection's ``field`` is in the set called ``map``."""

    field: Field
    map: str


@attrs.frozen(kw_only=True)
class OutputInterface:
    """The route of the destination leaves on one of ``interfaces`` (names known to the environment)."""

    interfaces: tuple[str, ...]


@attrs.frozen(kw_only=True)
class MarkIs:
    """``(mark & mask) == value`` for the socket's mark."""

    value: int
    mask: int


@attrs.frozen(kw_only=True)
class DestinationIsLocal:
    """The destination is an address of this node (the local routing table has it)."""


@attrs.frozen(kw_only=True)
class Not:
    operand: Condition


@attrs.frozen(kw_only=True)
class AllOf:
    operands: tuple[Condition, ...]


#: Every condition: the closed union the C printer and the model handle in full.
Condition: TypeAlias = Constant | ProtocolIs | Member | MarkIs | OutputInterface | DestinationIsLocal | Not | AllOf

# ----------------------------------------------------------------------------- actions


@attrs.frozen(kw_only=True)
class ReturnToCaller:
    """IR ``Return``: back to the calling chain; from an entry chain, its policy applies."""


@attrs.frozen(kw_only=True)
class AcceptConnection:
    """IR ``Accept``: this entry chain makes no NAT decision; the next entry chain runs."""


@attrs.frozen(kw_only=True)
class Deny:
    """IR ``Drop``: the connection never leaves (connect() fails with EPERM instead of timing out)."""


@attrs.frozen(kw_only=True)
class RedirectTo:
    """IR ``Redirect``: rewrite the destination to loopback, port ``port`` (None keeps the port)."""

    port: int | None


@attrs.frozen(kw_only=True)
class Call:
    """IR ``Jump``: run ``function``; when it returns, go on with the next step."""

    function: str


@attrs.frozen(kw_only=True)
class GoTo:
    """IR ``Goto``: continue in ``function``; its return returns from this function too."""

    function: str


@attrs.frozen(kw_only=True)
class Nothing:
    """IR ``Continue``: a rule without a verdict."""


#: Every action of a step: the closed union the C printer and the model handle in full.
Action: TypeAlias = ReturnToCaller | AcceptConnection | Deny | RedirectTo | Call | GoTo | Nothing

# ----------------------------------------------------------------------------- structure


@attrs.frozen(kw_only=True)
class Step:
    """One IR rule: when ``condition`` holds, do ``action``. ``origin`` says which rule, for people."""

    condition: Condition
    action: Action
    origin: str


@attrs.frozen(kw_only=True)
class Function:
    """One IR chain; ``name`` is its C identifier."""

    name: str
    chain: str
    table: str
    steps: tuple[Step, ...]


@attrs.frozen(kw_only=True)
class EntryPoint:
    """A nat OUTPUT base chain: run in priority order; ``policy`` applies when it returns."""

    function: str
    policy: ChainPolicy
    priority: int


@attrs.frozen(kw_only=True)
class Decision:
    """The decision procedure of one address family: entry chains and every function they reach."""

    family: Family
    entries: tuple[EntryPoint, ...]
    #: Callees before callers (C needs a definition before its use).
    functions: tuple[Function, ...]

    def function(self, name: str) -> Function:
        for function in self.functions:
            if function.name == name:
                return function
        raise KeyError(name)


class ConnectionState(enum.Enum):
    """Maps the program itself fills (not from the policy)."""

    BY_COOKIE = "mr_orig_cookie"
    BY_TUPLE = "mr_orig_tuple"


@attrs.frozen(kw_only=True)
class Program:
    """Everything the backend renders: decisions per family, set maps, the environment."""

    decisions: tuple[Decision, ...]
    sets: tuple[SetMap, ...]
    environment: Environment
    #: Chains of the ruleset the program does not implement (``local_only``), described for people.
    left_out: tuple[str, ...] = ()

    def decision(self, family: Family) -> Decision | None:
        for decision in self.decisions:
            if decision.family is family:
                return decision
        return None

    def set_map(self, name: str) -> SetMap:
        for item in self.sets:
            if item.name == name:
                return item
        raise KeyError(name)
