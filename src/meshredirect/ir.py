"""The backend-neutral intermediate representation: tables, chains, rules.

The compiler produces it, backends lower it, readers rebuild it from real
rules, and the semantics engine runs it. Nodes are frozen, slotted,
keyword-only attrs classes with tuple children and no parent pointers; they
hold typed values, never strings of rule syntax. Source positions (set by
readers) are excluded from equality.

The model follows netfilter: a :class:`Table` of one address family holds
:class:`Chain` objects; a base chain is attached to a :class:`Hook` with a
type and a priority (iptables tables are tables whose base chains carry the
standard priorities, see :func:`iptables_base_chain`); a :class:`Rule` is a
conjunction of :data:`Match` nodes and exactly one :data:`Target`.

>>> from meshredirect.values import PortSet
>>> rule = Rule(matches=(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15008)),), target=Return())
>>> rule.target
Return()
>>> rule == Rule(matches=(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15008)),), target=Return())
True
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Final, TypeAlias

import attrs

from meshredirect.errors import SourcePosition
from meshredirect.values import MAX_MARK, AddressSet, IdSet, IPAddress, PortSet

__all__ = [
    "IPTABLES_BUILTIN_HOOKS",
    "IPTABLES_PRIORITY",
    "Accept",
    "AddrType",
    "AddrTypeMatch",
    "AddressMatch",
    "AddressRange",
    "BaseChain",
    "Chain",
    "ChainPolicy",
    "ChainType",
    "ConnmarkMatch",
    "ConnmarkRestore",
    "ConnmarkSave",
    "ConnmarkSet",
    "Continue",
    "CtState",
    "CtStateMatch",
    "CtZone",
    "Direction",
    "Dnat",
    "Drop",
    "Family",
    "FamilyMatch",
    "Goto",
    "Hook",
    "InterfaceMatch",
    "IpSetMatch",
    "Jump",
    "Log",
    "MarkMatch",
    "Masquerade",
    "Match",
    "NatFlag",
    "OwnerKind",
    "OwnerMatch",
    "PortMatch",
    "Protocol",
    "ProtocolMatch",
    "Redirect",
    "Reject",
    "Return",
    "Rule",
    "Ruleset",
    "SetMark",
    "Snat",
    "StatisticMatch",
    "TProxy",
    "Table",
    "Target",
    "UnknownMatch",
    "UnknownTarget",
    "iptables_base_chain",
]

FULL_MASK: Final = MAX_MARK


class Family(enum.Enum):
    """Address family of a table. ``INET`` (nftables only) sees both."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"
    INET = "inet"

    @property
    def version(self) -> int:
        """4 or 6; raises for INET."""
        if self is Family.IPV4:
            return 4
        if self is Family.IPV6:
            return 6
        raise ValueError("the inet family has no single IP version")


class Hook(enum.Enum):
    """Netfilter hooks, in the order a forwarded packet would meet them."""

    PREROUTING = "PREROUTING"
    INPUT = "INPUT"
    FORWARD = "FORWARD"
    OUTPUT = "OUTPUT"
    POSTROUTING = "POSTROUTING"


class ChainType(enum.Enum):
    """nftables base chain types; iptables tables map onto them."""

    FILTER = "filter"
    NAT = "nat"
    ROUTE = "route"


class ChainPolicy(enum.Enum):
    ACCEPT = "ACCEPT"
    DROP = "DROP"


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "ipv6-icmp"
    SCTP = "sctp"


class Direction(enum.Enum):
    """Which side of the packet a match looks at."""

    SOURCE = "source"
    DESTINATION = "destination"


class OwnerKind(enum.Enum):
    UID = "uid"
    GID = "gid"


class CtState(enum.Enum):
    """Conntrack states, in the order iptables prints them."""

    INVALID = "INVALID"
    NEW = "NEW"
    RELATED = "RELATED"
    ESTABLISHED = "ESTABLISHED"
    UNTRACKED = "UNTRACKED"
    SNAT = "SNAT"
    DNAT = "DNAT"


class AddrType(enum.Enum):
    """Route types of ``-m addrtype``."""

    UNSPEC = "UNSPEC"
    UNICAST = "UNICAST"
    LOCAL = "LOCAL"
    BROADCAST = "BROADCAST"
    ANYCAST = "ANYCAST"
    MULTICAST = "MULTICAST"
    BLACKHOLE = "BLACKHOLE"
    UNREACHABLE = "UNREACHABLE"
    PROHIBIT = "PROHIBIT"
    THROW = "THROW"
    NAT = "NAT"
    XRESOLVE = "XRESOLVE"


class NatFlag(enum.Enum):
    """How a NAT target picks the ports (and, with ``persistent``, the address of a range) it maps to.

    They never change where a connection goes (its new destination, or which source address it takes
    when the target names one address), only which port the kernel picks when it must pick one.
    """

    #: ``--random``: randomised port selection (``NF_NAT_RANGE_PROTO_RANDOM``).
    RANDOM = "random"
    #: ``--random-fully``: fully randomised port selection (``NF_NAT_RANGE_PROTO_RANDOM_FULLY``).
    RANDOM_FULLY = "random-fully"
    #: ``--persistent``: the same client keeps the same address of a range (``NF_NAT_RANGE_PERSISTENT``).
    PERSISTENT = "persistent"


def _frozenset_of_flags(value: Iterable[NatFlag]) -> frozenset[NatFlag]:
    return frozenset(value)


def _frozenset_of_states(value: Iterable[CtState]) -> frozenset[CtState]:
    return frozenset(value)


def _frozenset_of_addrtypes(value: Iterable[AddrType]) -> frozenset[AddrType]:
    return frozenset(value)


# ----------------------------------------------------------------------------- matches


@attrs.frozen(kw_only=True)
class ProtocolMatch:
    """The layer 4 protocol is (not) ``protocol``."""

    protocol: Protocol
    negate: bool = False


@attrs.frozen(kw_only=True)
class FamilyMatch:
    """The packet is of this IP version (``meta nfproto``); only meaningful in ``inet`` tables."""

    family: Family


@attrs.frozen(kw_only=True)
class AddressMatch:
    """The source or destination address is (not) inside ``addresses``.

    Only the members of the packet's IP version count, and a set with no member of
    that version never matches, negated or not (as nft's ``ip6 daddr != X`` never
    matches an IPv4 packet).
    """

    direction: Direction
    addresses: AddressSet
    negate: bool = False


@attrs.frozen(kw_only=True)
class PortMatch:
    """The packet is ``protocol`` and its source/destination port is (not) in ``ports``.

    Negation applies to the port only: a packet of another protocol never matches.
    """

    protocol: Protocol
    ports: PortSet
    direction: Direction = Direction.DESTINATION
    negate: bool = False


@attrs.frozen(kw_only=True)
class InterfaceMatch:
    """The input or output interface is (not) ``name``; a trailing ``+`` matches a prefix."""

    direction: Direction  # SOURCE = input interface, DESTINATION = output interface
    name: str
    negate: bool = False

    def matches(self, interface: str) -> bool:
        hit = interface.startswith(self.name[:-1]) if self.name.endswith("+") else interface == self.name
        return hit != self.negate


def _socketless_default(self: OwnerMatch) -> bool:
    return self.negate


@attrs.frozen(kw_only=True)
class OwnerMatch:
    """The packet's socket is owned by a uid/gid (not) in ``ids``.

    ``socketless`` is the result for a packet that has no socket. iptables'
    ``xt_owner`` matches such a packet exactly when the match is negated (the
    default here); nftables' ``meta skuid`` never matches it.
    """

    kind: OwnerKind
    ids: IdSet
    negate: bool = False
    socketless: bool = attrs.field(default=attrs.Factory(_socketless_default, takes_self=True))


@attrs.frozen(kw_only=True)
class MarkMatch:
    """``(packet mark & mask) == value``, or not."""

    value: int
    mask: int = FULL_MASK
    negate: bool = False


@attrs.frozen(kw_only=True)
class ConnmarkMatch:
    """``(connection mark & mask) == value``, or not."""

    value: int
    mask: int = FULL_MASK
    negate: bool = False


@attrs.frozen(kw_only=True)
class CtStateMatch:
    """The connection's conntrack state is (not) one of ``states``."""

    states: frozenset[CtState] = attrs.field(converter=_frozenset_of_states)
    negate: bool = False


@attrs.frozen(kw_only=True)
class AddrTypeMatch:
    """The route type of the source or destination address is (not) one of ``types``."""

    direction: Direction
    types: frozenset[AddrType] = attrs.field(converter=_frozenset_of_addrtypes)
    negate: bool = False
    limit_interface: bool = False


@attrs.frozen(kw_only=True)
class IpSetMatch:
    """Membership in a named ipset (its contents live outside the ruleset: unknown to tracing)."""

    name: str
    flags: tuple[Direction, ...]
    negate: bool = False


@attrs.frozen(kw_only=True)
class StatisticMatch:
    """``-m statistic``: random (``probability``) or every ``every``-th packet from ``packet``."""

    probability: float | None = None
    every: int | None = None
    packet: int = 0
    negate: bool = False


@attrs.frozen(kw_only=True)
class UnknownMatch:
    """A match a reader could not model; its tokens are kept for display only. Tracing says 'unknown'."""

    dialect: str
    tokens: tuple[str, ...]


#: Every match node: the closed union a backend must handle (or refuse) in full.
Match: TypeAlias = (
    ProtocolMatch
    | FamilyMatch
    | AddressMatch
    | PortMatch
    | InterfaceMatch
    | OwnerMatch
    | MarkMatch
    | ConnmarkMatch
    | CtStateMatch
    | AddrTypeMatch
    | IpSetMatch
    | StatisticMatch
    | UnknownMatch
)

# ----------------------------------------------------------------------------- targets


@attrs.frozen(kw_only=True)
class Accept:
    """Accept the packet for this hook's table (iptables) or base chain (nftables)."""


@attrs.frozen(kw_only=True)
class Drop:
    """Drop the packet."""


@attrs.frozen(kw_only=True)
class Return:
    """Return to the calling chain; in a base chain, apply its policy."""


@attrs.frozen(kw_only=True)
class Continue:
    """No verdict: go on with the next rule (an iptables rule without ``-j``)."""


@attrs.frozen(kw_only=True)
class Jump:
    """Call ``chain``; when it returns, go on after this rule."""

    chain: str


@attrs.frozen(kw_only=True)
class Goto:
    """Continue in ``chain`` without a return frame."""

    chain: str


@attrs.frozen(kw_only=True)
class Redirect:
    """NAT: send the connection to a local port (OUTPUT: 127.0.0.1/::1; PREROUTING: the incoming interface's address)."""

    ports: PortSet | None = None
    flags: frozenset[NatFlag] = attrs.field(factory=frozenset, converter=_frozenset_of_flags)


@attrs.frozen(kw_only=True)
class TProxy:
    """Mangle PREROUTING: assign the connection to a transparent listener and set the packet mark."""

    port: int
    address: IPAddress | None = None
    mark: int | None = None
    mask: int = FULL_MASK


@attrs.frozen(kw_only=True)
class SetMark:
    """``mark = (mark & ~mask) ^ value`` (iptables ``MARK --set-xmark``)."""

    value: int
    mask: int = FULL_MASK


@attrs.frozen(kw_only=True)
class ConnmarkSave:
    """``ctmark = (ctmark & ~ctmask) ^ (mark & nfmask)``."""

    nfmask: int = FULL_MASK
    ctmask: int = FULL_MASK


@attrs.frozen(kw_only=True)
class ConnmarkRestore:
    """``mark = (mark & ~nfmask) ^ (ctmark & ctmask)``."""

    nfmask: int = FULL_MASK
    ctmask: int = FULL_MASK


@attrs.frozen(kw_only=True)
class ConnmarkSet:
    """``ctmark = (ctmark & ~mask) ^ value``."""

    value: int
    mask: int = FULL_MASK


@attrs.frozen(kw_only=True)
class CtZone:
    """Raw table: put a new connection into conntrack zone ``zone`` (the first template set wins)."""

    zone: int


@attrs.frozen(kw_only=True)
class AddressRange:
    """An inclusive address range of NAT targets."""

    first: IPAddress
    last: IPAddress


@attrs.frozen(kw_only=True)
class Masquerade:
    """NAT: the source becomes the outgoing interface's address (and a port of ``ports``, when given)."""

    ports: PortSet | None = None
    flags: frozenset[NatFlag] = attrs.field(factory=frozenset, converter=_frozenset_of_flags)


@attrs.frozen(kw_only=True)
class Snat:
    """NAT: the source becomes an address of ``addresses`` (and a port of ``ports``)."""

    addresses: AddressRange | None = None
    ports: PortSet | None = None
    flags: frozenset[NatFlag] = attrs.field(factory=frozenset, converter=_frozenset_of_flags)


@attrs.frozen(kw_only=True)
class Dnat:
    """NAT: the destination becomes an address of ``addresses`` (and a port of ``ports``)."""

    addresses: AddressRange | None = None
    ports: PortSet | None = None
    flags: frozenset[NatFlag] = attrs.field(factory=frozenset, converter=_frozenset_of_flags)


@attrs.frozen(kw_only=True)
class Reject:
    """Drop with an ICMP error or a TCP reset (``with_`` as iptables names it, e.g. ``tcp-reset``)."""

    with_: str | None = None


@attrs.frozen(kw_only=True)
class Log:
    """Log and continue."""

    prefix: str | None = None
    #: syslog level; 4 (warning) is the kernel's default.
    level: int = 4


@attrs.frozen(kw_only=True)
class UnknownTarget:
    """A target a reader could not model; tracing stops with 'unknown' when it is reached."""

    dialect: str
    name: str
    tokens: tuple[str, ...] = ()


#: Every target node: the closed union a backend must handle (or refuse) in full.
Target: TypeAlias = (
    Accept
    | Drop
    | Return
    | Continue
    | Jump
    | Goto
    | Redirect
    | TProxy
    | SetMark
    | ConnmarkSave
    | ConnmarkRestore
    | ConnmarkSet
    | CtZone
    | Masquerade
    | Snat
    | Dnat
    | Reject
    | Log
    | UnknownTarget
)

# ----------------------------------------------------------------------------- structure


@attrs.frozen(kw_only=True)
class Rule:
    """A conjunction of matches and one target."""

    matches: tuple[Match, ...] = ()
    target: Target
    comment: str | None = None
    position: SourcePosition | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class BaseChain:
    """What makes a chain a base chain: its hook, type, priority and policy."""

    hook: Hook
    type: ChainType = ChainType.FILTER
    priority: int = 0
    policy: ChainPolicy = ChainPolicy.ACCEPT


@attrs.frozen(kw_only=True)
class Chain:
    """A named list of rules; a base chain when ``base`` is set."""

    name: str
    rules: tuple[Rule, ...] = ()
    base: BaseChain | None = None

    @property
    def is_base(self) -> bool:
        return self.base is not None


@attrs.frozen(kw_only=True)
class Table:
    """Chains of one address family under one name (``nat``, ``mangle``... for iptables)."""

    family: Family
    name: str
    chains: tuple[Chain, ...] = ()

    @cached_property
    def _by_name(self) -> dict[str, Chain]:
        return {chain.name: chain for chain in self.chains}

    def chain(self, name: str) -> Chain:
        """The chain called ``name``; ``KeyError`` when absent."""
        return self._by_name[name]

    def has_chain(self, name: str) -> bool:
        return name in self._by_name

    def base_chains(self, hook: Hook) -> tuple[Chain, ...]:
        return tuple(c for c in self.chains if c.base is not None and c.base.hook is hook)


@attrs.frozen(kw_only=True)
class Ruleset:
    """Everything one policy (or one node) holds, across families and tables."""

    tables: tuple[Table, ...] = ()
    #: User chains whose names start with ``owner_prefix + "_"`` belong to whoever produced this
    #: ruleset (the compiler sets the policy's chain prefix); None when read from a node.
    owner_prefix: str | None = None

    def owns(self, chain: str) -> bool:
        """Whether a user chain of this name belongs to the ruleset's owner."""
        return self.owner_prefix is not None and chain.startswith(self.owner_prefix + "_")

    @property
    def families(self) -> tuple[Family, ...]:
        seen: list[Family] = []
        for table in self.tables:
            if table.family not in seen:
                seen.append(table.family)
        return tuple(seen)

    def for_family(self, family: Family) -> Ruleset:
        """Only the tables of one family."""
        return Ruleset(tables=tuple(t for t in self.tables if t.family is family), owner_prefix=self.owner_prefix)

    def table(self, family: Family, name: str) -> Table | None:
        for table in self.tables:
            if table.family is family and table.name == name:
                return table
        return None

    def rules(self) -> Iterator[tuple[Table, Chain, Rule]]:
        """Every rule with its table and chain, in order."""
        for table in self.tables:
            for chain in table.chains:
                for rule in chain.rules:
                    yield table, chain, rule


# ----------------------------------------------------------------------------- iptables conventions

#: Built-in chains of each iptables table, in the order iptables-save prints them.
IPTABLES_BUILTIN_HOOKS: Final[dict[str, tuple[Hook, ...]]] = {
    "raw": (Hook.PREROUTING, Hook.OUTPUT),
    "mangle": (Hook.PREROUTING, Hook.INPUT, Hook.FORWARD, Hook.OUTPUT, Hook.POSTROUTING),
    "nat": (Hook.PREROUTING, Hook.INPUT, Hook.OUTPUT, Hook.POSTROUTING),
    "filter": (Hook.INPUT, Hook.FORWARD, Hook.OUTPUT),
    "security": (Hook.INPUT, Hook.FORWARD, Hook.OUTPUT),
}

#: NF_IP_PRI_* of each iptables table (nat differs per hook: -100 before routing, 100 after).
IPTABLES_PRIORITY: Final[dict[str, int]] = {
    "raw": -300,
    "mangle": -150,
    "nat": -100,
    "filter": 0,
    "security": 50,
}
#: Conntrack itself runs at -200: after raw, before mangle.
CONNTRACK_PRIORITY: Final = -200


def iptables_base_chain(table: str, hook: Hook, policy: ChainPolicy = ChainPolicy.ACCEPT) -> BaseChain:
    """The base chain an iptables built-in chain corresponds to.

    >>> iptables_base_chain("nat", Hook.OUTPUT)
    BaseChain(hook=<Hook.OUTPUT: 'OUTPUT'>, type=<ChainType.NAT: 'nat'>, priority=-100, policy=<ChainPolicy.ACCEPT: 'ACCEPT'>)
    """
    if hook not in IPTABLES_BUILTIN_HOOKS[table]:
        raise ValueError(f"iptables table {table!r} has no built-in chain {hook.value}")
    priority = IPTABLES_PRIORITY[table]
    if table == "nat":
        chain_type = ChainType.NAT
        if hook in (Hook.POSTROUTING, Hook.INPUT):
            priority = 100
    elif table == "mangle" and hook is Hook.OUTPUT:
        chain_type = ChainType.ROUTE
    else:
        chain_type = ChainType.FILTER
    return BaseChain(hook=hook, type=chain_type, priority=priority, policy=policy)


def loopback_network(family: Family) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """127.0.0.0/8 or ::1/128."""
    return ipaddress.ip_network("127.0.0.0/8") if family is Family.IPV4 else ipaddress.ip_network("::1/128")
