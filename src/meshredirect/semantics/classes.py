"""Equivalence classes of connections: what makes checking finitely many of them a proof.

:class:`Constants` collects every value the rules of some rulesets (and the
environment, and the checks) compare a connection with: CIDR bounds, ports,
uids, gids, marks, interface names, protocols. Each dimension of a
connection is split at those values into classes: two values are in one
class when every one of those tests treats them alike (e.g. every
destination outside every named network is one class; 10.0.0.5, the pod's
address, is a class of its own). A :class:`ClassSpace` holds the classes of
every dimension, per *root* (a family, an origin and a protocol), and yields
one representative connection per combination of classes:
:func:`connection_classes`. Checking every one of them checks every
connection.

The combinations that cannot exist are pruned, each for a stated reason:

- a remote connection has no socket (its packets come from another host),
  no packet mark (marks do not cross into the namespace) and arrives on an
  interface other than ``lo``; its source is neither local nor loopback (the
  kernel drops such martians whatever the rules say);
- a local connection has no incoming interface, and its outgoing interface
  is the route function's answer for its destination and mark;
- a new connection's conntrack mark is 0 (conntrack creates it);
- a protocol without ports (ICMP) has port 0 only.

Local sources are not restricted: with ``IP_TRANSPARENT`` or
``IP_FREEBIND`` a local socket can use any source address (the TPROXY proxy
does).

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> from meshredirect.semantics.model import Environment
>>> ruleset = compile_policy(Policy())
>>> space = ClassSpace([ruleset], Environment.for_policy(Policy()))
>>> space.count() == sum(1 for _ in connection_classes([ruleset], Environment.for_policy(Policy())))
True
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import attrs

from meshredirect.ir import (
    AddressMatch,
    AddrTypeMatch,
    ConnmarkMatch,
    Direction,
    Dnat,
    Family,
    FamilyMatch,
    MarkMatch,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Ruleset,
    Snat,
    TProxy,
)
from meshredirect.semantics.explore import Explorer, Partitions
from meshredirect.semantics.interpreter import ROUTED
from meshredirect.semantics.model import (
    DEFAULT_APP_GID,
    DEFAULT_APP_UID,
    DEFAULT_SOURCE_PORT,
    LOOPBACK_INTERFACE,
    NO_PORT,
    Connection,
    Environment,
    Origin,
    Socket,
)
from meshredirect.values import MAX_ID, MAX_MARK, MAX_PORT, AddressSet, IdSet, IPAddress, IPNetwork, PortSet

__all__ = ["ClassSpace", "Constants", "Root", "ValueClass", "connection_classes", "mark_classes"]

#: Protocols whose packets carry ports.
PORTED: Final = frozenset({Protocol.TCP, Protocol.UDP, Protocol.SCTP})
#: Protocols every proof covers (the mesh's own), whatever the rules name.
BASE_PROTOCOLS: Final = (Protocol.TCP, Protocol.UDP)
#: Readable representatives, tried first.
NICE_REMOTE: Final[dict[int, tuple[str, ...]]] = {
    4: ("203.0.113.10", "198.51.100.10", "192.0.2.10", "93.184.216.34"),
    6: ("2001:db8:ffff::10", "2001:db8::10", "2606:2800:220:1::10"),
}
NICE_PORTS: Final = (8080, 80, 443, 53, 22, 9090, 5432, 3306)
#: The DNS port the checks look at.
DNS_PORT: Final = 53
_BROADCAST_NETWORKS: Final = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("255.255.255.255/32"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("ff00::/8"),
)
#: More mark tests than this would make too many mark classes (2**n sign patterns).
MAX_MARK_TESTS: Final = 12


@attrs.define
class Constants:
    """Every value a test compares a connection with (mutable while collected)."""

    networks: dict[tuple[Family, Direction], list[AddressSet]] = attrs.Factory(dict)
    ports: dict[tuple[Protocol, Direction], list[PortSet]] = attrs.Factory(dict)
    #: Ports any test looks at, for every protocol with ports (listeners, DNS, NAT targets).
    any_ports: list[PortSet] = attrs.Factory(list)
    ids: dict[OwnerKind, list[IdSet]] = attrs.Factory(dict)
    #: Mark tests as (mask, value): ``(mark & mask) == value``.
    marks: list[tuple[int, int]] = attrs.Factory(list)
    protocols: list[Protocol] = attrs.Factory(list)
    families: list[Family] = attrs.Factory(list)
    #: Addresses worth using as representatives (the pod's, the passthrough source...).
    preferred: list[IPAddress] = attrs.Factory(list)
    # The members of each list of ``networks`` as a set (rebuilt when the list changed behind its back).
    _network_sets: dict[tuple[Family, Direction], set[AddressSet]] = attrs.field(
        factory=dict, init=False, repr=False, eq=False
    )
    _port_sets: dict[tuple[Protocol, Direction], set[PortSet]] = attrs.field(
        factory=dict, init=False, repr=False, eq=False
    )

    def add_networks(self, direction: Direction | None, addresses: Iterable[IPNetwork | IPAddress]) -> None:
        """Networks compared with the source, the destination, or (None) both."""
        members = addresses if isinstance(addresses, AddressSet) else AddressSet.of(*addresses)
        for family in (Family.IPV4, Family.IPV6):
            part = members.for_version(family.version)
            if not part:
                continue
            for d in (Direction.SOURCE, Direction.DESTINATION) if direction is None else (direction,):
                bucket = self.networks.setdefault((family, d), [])
                seen = self._network_sets.get((family, d))
                if seen is None or len(seen) != len(bucket):
                    seen = self._network_sets[(family, d)] = set(bucket)
                if part not in seen:
                    bucket.append(part)
                    seen.add(part)

    def add_ports(self, protocol: Protocol | None, direction: Direction, ports: PortSet | Iterable[int]) -> None:
        members = ports if isinstance(ports, PortSet) else PortSet.of(*ports)
        if not members:
            return
        if protocol is None:
            if members not in self.any_ports:
                self.any_ports.append(members)
            return
        bucket = self.ports.setdefault((protocol, direction), [])
        seen = self._port_sets.get((protocol, direction))
        if seen is None or len(seen) != len(bucket):
            seen = self._port_sets[(protocol, direction)] = set(bucket)
        if members not in seen:
            bucket.append(members)
            seen.add(members)

    def add_ids(self, kind: OwnerKind, ids: IdSet | Iterable[int]) -> None:
        members = ids if isinstance(ids, IdSet) else IdSet.of(*ids)
        bucket = self.ids.setdefault(kind, [])
        if members and members not in bucket:
            bucket.append(members)

    def add_mark(self, mask: int, value: int) -> None:
        if (mask, value) not in self.marks:
            self.marks.append((mask, value))

    def add_protocol(self, protocol: Protocol) -> None:
        if protocol not in self.protocols:
            self.protocols.append(protocol)

    def add_family(self, family: Family) -> None:
        for f in (Family.IPV4, Family.IPV6) if family is Family.INET else (family,):
            if f not in self.families:
                self.families.append(f)

    def add_preferred(self, *addresses: IPAddress) -> None:
        for address in addresses:
            if address not in self.preferred:
                self.preferred.append(address)

    # ------------------------------------------------------------------ sources

    def add_ruleset(self, ruleset: Ruleset) -> None:
        """Every constant the rules of ``ruleset`` test or rewrite to."""
        for table in ruleset.tables:
            self.add_family(table.family)
        for _table, _chain, rule in ruleset.rules():
            for match in rule.matches:
                if isinstance(match, AddressMatch):
                    self.add_networks(match.direction, match.addresses)
                elif isinstance(match, PortMatch):
                    self.add_protocol(match.protocol)
                    self.add_ports(match.protocol, match.direction, match.ports)
                elif isinstance(match, ProtocolMatch):
                    self.add_protocol(match.protocol)
                elif isinstance(match, OwnerMatch):
                    self.add_ids(match.kind, match.ids)
                elif isinstance(match, (MarkMatch, ConnmarkMatch)):
                    self.add_mark(match.mask, match.value)
                elif isinstance(match, AddrTypeMatch):
                    self.add_networks(None, _BROADCAST_NETWORKS)
                elif isinstance(match, FamilyMatch):
                    self.add_family(match.family)
            target = rule.target
            if isinstance(target, (Redirect, Dnat, Snat)) and target.ports is not None:
                self.add_ports(None, Direction.DESTINATION, target.ports)
            if isinstance(target, (Dnat, Snat)) and target.addresses is not None:
                self.add_networks(None, (target.addresses.first, target.addresses.last))
            if isinstance(target, TProxy):
                self.add_ports(None, Direction.DESTINATION, (target.port,))
                if target.address is not None:
                    self.add_networks(None, (target.address,))

    def add_environment(self, env: Environment) -> None:
        """The environment's addresses, subnets, listener ports, proxy ids and routed marks."""
        for interface in env.interfaces:
            for address in interface.addresses:
                self.add_networks(None, (address.ip,))
                self.add_networks(None, (address.network,))
                if interface.name != LOOPBACK_INTERFACE:
                    self.add_preferred(address.ip)
        self.add_networks(None, (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")))
        proxy = env.proxy
        for family in (Family.IPV4, Family.IPV6):
            self.add_networks(None, (proxy.passthrough_for(family),))
        self.add_ports(None, Direction.DESTINATION, (*proxy.listener_ports, DNS_PORT))
        self.add_ids(OwnerKind.UID, proxy.uids)
        self.add_ids(OwnerKind.UID, (proxy.uid,))
        self.add_ids(OwnerKind.GID, proxy.gids)
        self.add_ids(OwnerKind.GID, (proxy.gid,))
        for route in env.local_marks:
            self.add_mark(route.mask, route.value)
        if proxy.transparent:
            self.add_mark(MAX_MARK, proxy.tproxy_mark)


# ----------------------------------------------------------------------------- partitions


@attrs.frozen
class ValueClass:
    """One class of a dimension: its representative and the values it holds (closed intervals)."""

    value: Any
    intervals: tuple[tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.intervals) or 1


def partition(
    low: int,
    high: int,
    sets: Sequence[Sequence[tuple[int, int]]],
    preferred: Sequence[int] = (),
    pick: Any = None,
) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """Split ``low..high`` into classes of values that lie in the same ``sets``.

    Returns (representative, intervals) per class: preferred values first (in
    their order), then the other classes by their lowest value.

    >>> partition(0, 9, [[(2, 3)], [(3, 5)]], preferred=[4])
    [(4, ((4, 5),)), (0, ((0, 1), (6, 9))), (2, ((2, 2),)), (3, ((3, 3),))]
    """
    starts: dict[int, list[int]] = {low: []}
    ends: dict[int, list[int]] = {}
    for index, intervals in enumerate(sets):
        for lo, hi in intervals:
            lo, hi = max(lo, low), min(hi, high)
            if lo > hi:
                continue
            starts.setdefault(lo, []).append(index)
            if hi + 1 <= high:
                ends.setdefault(hi + 1, []).append(index)
    boundaries = sorted(set(starts) | set(ends))
    active: set[int] = set()
    groups: dict[frozenset[int], list[tuple[int, int]]] = {}
    elementary: list[frozenset[int]] = []
    for position, boundary in enumerate(boundaries):
        for index in ends.get(boundary, ()):
            active.discard(index)
        for index in starts.get(boundary, ()):
            active.add(index)
        stop = boundaries[position + 1] - 1 if position + 1 < len(boundaries) else high
        signature = frozenset(active)
        elementary.append(signature)
        groups.setdefault(signature, []).append((boundary, stop))
    chosen: dict[frozenset[int], int] = {}
    order: list[frozenset[int]] = []
    for value in preferred:
        if not low <= value <= high:
            continue
        signature = elementary[bisect.bisect_right(boundaries, value) - 1]
        if signature not in chosen:
            chosen[signature] = value
            order.append(signature)
    for signature in groups:
        if signature not in chosen:
            lo, hi = groups[signature][0]
            chosen[signature] = pick(lo, hi) if pick is not None else lo
            order.append(signature)
    return [(chosen[s], tuple(groups[s])) for s in order]


def _address_pick(lo: int, hi: int) -> int:
    # Skip a network's first address (often unusable) when the class has room.
    return lo + 1 if hi - lo >= 2 else lo


def address_classes(
    family: Family, networks: Iterable[AddressSet], preferred: Iterable[IPAddress] = ()
) -> list[ValueClass]:
    """The classes of addresses of one family that the networks tell apart."""
    version = family.version
    top = 2**32 - 1 if version == 4 else 2**128 - 1
    sets = [
        [(int(n.network_address), int(n.broadcast_address)) for n in members if n.version == version]
        for members in networks
    ]
    candidates = [int(a) for a in preferred if a.version == version]
    candidates += [int(ipaddress.ip_address(a)) for a in NICE_REMOTE[version]]
    for members in networks:
        for network in members:
            if network.version == version:
                candidates.append(int(network.network_address) + (1 if network.num_addresses > 2 else 0))
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return [
        ValueClass(value=make(value), intervals=intervals)
        for value, intervals in partition(0, top, sets, candidates, _address_pick)
    ]


def int_classes(
    low: int, high: int, sets: Iterable[Sequence[tuple[int, int]]], preferred: Sequence[int]
) -> list[ValueClass]:
    return [
        ValueClass(value=value, intervals=intervals) for value, intervals in partition(low, high, list(sets), preferred)
    ]


def mark_classes(tests: Sequence[tuple[int, int]], preferred: int = 0) -> list[int]:
    """One mark for every combination of outcomes of ``(mark & mask) == value`` tests that some mark gives.

    >>> mark_classes([(0xFFFFFFFF, 1337), (0xFFFFFFFF, 1338)])
    [0, 1337, 1338]
    >>> mark_classes([(0xFF, 0), (0xFF, 1)])
    [0, 1, 3]
    """
    tests = list(dict.fromkeys(tests))
    if len(tests) > MAX_MARK_TESTS:
        raise ValueError(f"more than {MAX_MARK_TESTS} distinct mark tests")
    found: dict[tuple[bool, ...], int] = {}
    for pattern in itertools.product((False, True), repeat=len(tests)):
        mark = _mark_witness(tests, pattern, preferred)
        if mark is not None:
            signature = tuple((mark & mask) == value for mask, value in tests)
            found.setdefault(signature, mark)
    ordered = sorted(found.values(), key=lambda m: (m != preferred, bin(m).count("1"), m))
    return ordered


def _mark_witness(tests: Sequence[tuple[int, int]], pattern: Sequence[bool], preferred: int) -> int | None:
    """A mark giving each test the outcome ``pattern`` asks for, as close to ``preferred`` as found; None if none."""
    set_mask = 0
    set_value = 0
    for (mask, value), want in zip(tests, pattern, strict=True):
        if not want:
            continue
        if value & ~mask or (set_value ^ value) & set_mask & mask:
            return None
        set_mask |= mask
        set_value = (set_value & ~mask) | value
    negatives = [(mask, value) for (mask, value), want in zip(tests, pattern, strict=True) if not want]

    def search(index: int, set_mask: int, set_value: int) -> int | None:
        if index == len(negatives):
            return (preferred & ~set_mask & MAX_MARK) | set_value
        mask, value = negatives[index]
        if value & ~mask or (set_value ^ value) & set_mask & mask:
            return search(index + 1, set_mask, set_value)  # cannot match, or already differs
        free = [1 << b for b in range(32) if (mask & ~set_mask) >> b & 1]
        free.sort(key=lambda bit: (preferred & bit) == (value & bit))  # keep the preferred bits if they differ
        for bit in free:
            found = search(index + 1, set_mask | bit, set_value | (~value & bit))
            if found is not None:
                return found
        return None

    return search(0, set_mask, set_value)


# ----------------------------------------------------------------------------- the class space


@attrs.frozen
class Root:
    """The part of the space with one family, origin and protocol, and its dimensions' classes."""

    family: Family
    origin: Origin
    protocol: Protocol
    dims: Mapping[str, tuple[ValueClass, ...]]
    #: Partitions that the explorers of the roots of one class space share (see ``Explorer``).
    #: Per tuple of classes (by identity: one class space memoizes them), its values and their partitions.
    shared: dict[int, tuple[tuple[ValueClass, ...], tuple[Any, ...], Partitions]] = attrs.field(
        factory=dict, eq=False, repr=False
    )

    def values(self) -> dict[str, tuple[Any, ...]]:
        return {name: tuple(c.value for c in classes) for name, classes in self.dims.items()}

    def count(self) -> int:
        total = 1
        for classes in self.dims.values():
            total *= len(classes)
        return total

    def explorer(self) -> Explorer:
        values: dict[str, tuple[Any, ...]] = {}
        partitions: dict[str, Partitions] = {}
        for name, classes in self.dims.items():
            found = self.shared.get(id(classes))
            if found is None or found[0] is not classes:
                found = self.shared[id(classes)] = (classes, tuple(c.value for c in classes), {})
            values[name], partitions[name] = found[1], found[2]
        return Explorer(values, partitions=partitions)


#: The symbols of a root connection's fields: each stands for the dimension of its name.
LOCAL_SYMBOLS: Final = {
    "src": "src",
    "sport": "sport",
    "dst": "dst",
    "dport": "dport",
    "socket": "socket",
    "uid": "uid",
    "gid": "gid",
    "mark": "mark",
    "oif": ROUTED,
}
REMOTE_SYMBOLS: Final = {"src": "src", "sport": "sport", "dst": "dst", "dport": "dport", "iif": "iif"}


class ClassSpace:
    """The classes of every dimension of connections, for some rulesets in an environment.

    ``families`` defaults to the families the rulesets program (IPv4 when
    none); ``protocols`` to TCP, UDP, every protocol the rules name and one
    more that none names. ``constants`` adds tests made elsewhere (a
    policy's exclusions, for ``meshredirect.semantics.check.check``).
    """

    def __init__(
        self,
        rulesets: Sequence[Ruleset],
        env: Environment,
        *,
        families: Sequence[Family] | None = None,
        protocols: Sequence[Protocol] | None = None,
        constants: Constants | None = None,
    ) -> None:
        self.env = env
        found = constants if constants is not None else Constants()
        for ruleset in rulesets:
            found.add_ruleset(ruleset)
        found.add_environment(env)
        self.constants = found
        self.families = tuple(families) if families is not None else (tuple(found.families) or (Family.IPV4,))
        add_other = protocols is None
        if protocols is None:
            protocols = list(dict.fromkeys([*BASE_PROTOCOLS, *found.protocols]))
        self.protocols = tuple(protocols)
        self._classes: dict[tuple[Any, ...], tuple[ValueClass, ...]] = {}
        self._shared: dict[int, tuple[tuple[ValueClass, ...], tuple[Any, ...], Partitions]] = {}
        self.roots = tuple(
            self._root(family, origin, protocol)
            for family in self.families
            for origin in (Origin.LOCAL, Origin.REMOTE)
            for protocol in self._protocols_for(family, add_other)
        )

    def _protocols_for(self, family: Family, add_other: bool) -> tuple[Protocol, ...]:
        protocols = list(self.protocols)
        if add_other:
            other = Protocol.ICMP if family is Family.IPV4 else Protocol.ICMPV6
            if other in protocols:
                other = next(p for p in Protocol if p not in protocols and p is not Protocol.ICMP)
            if other not in protocols:
                protocols.append(other)
        return tuple(protocols)

    def _memo(self, key: tuple[Any, ...], make: Any) -> tuple[ValueClass, ...]:
        """Classes shared by several roots, computed once."""
        found = self._classes.get(key)
        if found is None:
            found = self._classes[key] = tuple(make())
        return found

    def _root(self, family: Family, origin: Origin, protocol: Protocol) -> Root:
        k = self.constants
        env = self.env
        preferred = [a for a in k.preferred if a.version == family.version]
        pod = env.pod_address(family)
        src_preferred = [pod, env.proxy.passthrough_for(family), *preferred]
        src = self._memo(
            ("src", family),
            lambda: address_classes(family, k.networks.get((family, Direction.SOURCE), []), src_preferred),
        )
        dst = self._memo(
            ("dst", family),
            lambda: address_classes(
                family, k.networks.get((family, Direction.DESTINATION), []), [*_nice_addresses(family), pod, *preferred]
            ),
        )
        dims: dict[str, tuple[ValueClass, ...]] = {}
        if origin is Origin.REMOTE:
            src = tuple(c for c in src if not (env.is_local(c.value) or env.is_loopback(c.value)))
        dims["src"] = tuple(src)
        dims["dst"] = tuple(dst)
        if protocol in PORTED:
            sports = [ps.intervals for ps in k.ports.get((protocol, Direction.SOURCE), [])]
            dports = [ps.intervals for ps in (*k.ports.get((protocol, Direction.DESTINATION), []), *k.any_ports)]
            dims["sport"] = self._memo(
                ("sport", protocol), lambda: int_classes(1, MAX_PORT, sports, [DEFAULT_SOURCE_PORT])
            )
            dims["dport"] = self._memo(("dport", protocol), lambda: int_classes(1, MAX_PORT, dports, NICE_PORTS))
        else:
            dims["sport"] = (ValueClass(value=NO_PORT),)
            dims["dport"] = (ValueClass(value=NO_PORT),)
        if origin is Origin.LOCAL:
            dims["socket"] = (ValueClass(value=True), ValueClass(value=False))
            proxy = env.proxy
            uids = [s.intervals for s in k.ids.get(OwnerKind.UID, [])]
            gids = [s.intervals for s in k.ids.get(OwnerKind.GID, [])]
            dims["uid"] = self._memo(
                ("uid",), lambda: int_classes(0, MAX_ID, uids, [DEFAULT_APP_UID, proxy.uid, 0, 65534])
            )
            dims["gid"] = self._memo(
                ("gid",), lambda: int_classes(0, MAX_ID, gids, [DEFAULT_APP_GID, proxy.gid, 0, 65534])
            )
            dims["mark"] = self._memo(("mark",), lambda: [ValueClass(value=m) for m in mark_classes(k.marks)])
        else:
            names = [n for n in env.interface_names if n != LOOPBACK_INTERFACE]
            names.sort(key=lambda n: n != env.default_interface)
            dims["iif"] = tuple(ValueClass(value=n) for n in names)
        return Root(family=family, origin=origin, protocol=protocol, dims=dims, shared=self._shared)

    # ------------------------------------------------------------------ queries

    def count(self) -> int:
        """How many class combinations there are (after pruning)."""
        return sum(root.count() for root in self.roots)

    def connection(self, root: Root, values: Mapping[str, Any]) -> Connection:
        """The connection of ``root`` with these dimension values."""
        if root.origin is Origin.LOCAL:
            socket = Socket(uid=values["uid"], gid=values["gid"]) if values["socket"] else None
            return Connection(
                family=root.family,
                protocol=root.protocol,
                src=values["src"],
                sport=values["sport"],
                dst=values["dst"],
                dport=values["dport"],
                origin=Origin.LOCAL,
                oif=self.env.route(values["dst"], values["mark"]),
                socket=socket,
                mark=values["mark"],
            )
        return Connection(
            family=root.family,
            protocol=root.protocol,
            src=values["src"],
            sport=values["sport"],
            dst=values["dst"],
            dport=values["dport"],
            origin=Origin.REMOTE,
            iif=values["iif"],
        )

    @staticmethod
    def symbols(root: Root) -> Mapping[str, str]:
        """Which fields of a root's connections stand for which dimension."""
        return LOCAL_SYMBOLS if root.origin is Origin.LOCAL else REMOTE_SYMBOLS

    def connections(self) -> Iterator[Connection]:
        """One representative connection per class combination (see :func:`connection_classes`)."""
        for root in self.roots:
            names = list(root.dims)
            for combination in itertools.product(*(root.dims[n] for n in names)):
                yield self.connection(root, {n: c.value for n, c in zip(names, combination, strict=True)})

    def describe(self, root: Root, region: Mapping[str, Iterable[int]]) -> str:
        """A region of classes in words: what its connections have in common."""
        parts = [f"{root.family.value} {root.protocol.value} {root.origin.value}"]
        for name, classes in root.dims.items():
            indices = sorted(region.get(name, range(len(classes))))
            if len(indices) == len(classes) or len(classes) <= 1:
                continue
            shown = [_class_text(name, classes[i]) for i in indices[:4]]
            more = f" or {len(indices) - 4} more" if len(indices) > 4 else ""
            parts.append(f"{name} {' or '.join(shown)}{more}")
        return "; ".join(parts)


def _nice_addresses(family: Family) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(a) for a in NICE_REMOTE[family.version])


def _class_text(name: str, value_class: ValueClass) -> str:
    value = value_class.value
    if name in ("src", "dst") and value_class.intervals:
        lo, hi = value_class.intervals[0]
        if len(value_class.intervals) == 1 and lo == hi:
            return str(value)
        make = ipaddress.IPv4Address if value.version == 4 else ipaddress.IPv6Address
        ranges = ", ".join(f"{make(a)}-{make(b)}" if a != b else str(make(a)) for a, b in value_class.intervals[:2])
        more = ", ..." if len(value_class.intervals) > 2 else ""
        return f"like {value} ({ranges}{more})"
    if name in ("sport", "dport", "uid", "gid") and value_class.intervals:
        if len(value_class.intervals) == 1 and value_class.intervals[0][0] == value_class.intervals[0][1]:
            return str(value)
        ranges = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in value_class.intervals[:3])
        more = ",..." if len(value_class.intervals) > 3 else ""
        return f"like {value} ({ranges}{more})"
    if name == "mark":
        return f"{value:#x}"
    if name == "socket":
        return "present" if value else "none"
    return str(value)


def connection_classes(
    rulesets: Sequence[Ruleset],
    env: Environment,
    *,
    families: Sequence[Family] | None = None,
    protocols: Sequence[Protocol] | None = None,
) -> Iterator[Connection]:
    """One representative connection per combination of classes of the rulesets' constants.

    Every connection behaves like the representative of its class
    combination in each of the rulesets, so checking all of them is a proof.
    This is the full product (it can be large); ``meshredirect.semantics.check``
    explores the same classes path by path instead.
    """
    return ClassSpace(rulesets, env, families=families, protocols=protocols).connections()
