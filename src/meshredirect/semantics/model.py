"""The connection model: one new connection, and the pod it starts in or arrives at.

A :class:`Connection` is the first packet of a new connection as netfilter
sees it: family, layer 4 protocol, addresses and ports, where it comes from
(:class:`Origin`: a local socket or a remote peer), its incoming interface
(remote only) and outgoing interface (local only, from the route function),
its socket (local only: uid and gid; None for a socketless packet), its
packet mark (a local socket's ``SO_MARK``) and its connection mark.

An :class:`Environment` describes the pod: its interfaces and their
addresses, which addresses are local, the route function, and the proxy that
runs in it (:class:`Proxy`: the uids and gids it runs as, its listener ports,
its inbound passthrough source). :meth:`Environment.for_policy` builds the
usual one for a policy.

Assumptions (documented in ``docs/semantics.md``):

- ``lo`` holds 127.0.0.1/8 and ::1 (and the policy's IPv6 passthrough
  address, which Istio adds to ``lo``); every address of 127.0.0.0/8 is local
  because the kernel adds a local route for lo's whole prefix.
- ``eth0`` holds the pod address (``POD_IPV4`` / ``POD_IPV6``) and
  carries the default route. Every further interface gets its own /24 (and
  /64) and is the route to that subnet only.
- A destination is routed to ``lo`` when it is local, or when the packet's
  mark selects a routing table whose default route is local (TPROXY's
  ``ip rule add fwmark M lookup T`` + ``ip route add local default dev lo
  table T``: :attr:`Environment.local_marks`).
- The pod does not forward packets (``net.ipv4.ip_forward=0``) unless
  :attr:`Environment.forwarding` says so.

>>> env = Environment.default()
>>> env.route(ipaddress.ip_address("10.0.0.5")), env.route(ipaddress.ip_address("1.1.1.1"))
('lo', 'eth0')
>>> env.is_local(ipaddress.ip_address("127.0.0.6"))
True
>>> c = Connection.local(env, dst="93.184.216.34", dport=80, uid=1000, gid=1000)
>>> print(c)
tcp 10.0.0.5:43210 -> 93.184.216.34:80 local uid=1000 gid=1000 out eth0
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable
from typing import Final, TypeAlias

import attrs

from meshredirect.ir import Direction, Family, InterfaceMatch, Protocol, Ruleset
from meshredirect.values import MAX_ID, MAX_MARK, MAX_PORT, IdSet, IPAddress, IPNetwork

__all__ = [
    "DEFAULT_APP_GID",
    "DEFAULT_APP_UID",
    "DEFAULT_SOURCE_PORT",
    "LOOPBACK_INTERFACE",
    "POD_INTERFACE",
    "POD_IPV4",
    "POD_IPV6",
    "Connection",
    "Environment",
    "Interface",
    "MarkRoute",
    "Origin",
    "Proxy",
    "Socket",
]

IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: The pod's own addresses (on ``eth0``) in the default environment.
POD_IPV4: Final = ipaddress.IPv4Address("10.0.0.5")
POD_IPV6: Final = ipaddress.IPv6Address("fd00::5")
LOOPBACK_INTERFACE: Final = "lo"
#: The pod's interface: its address and its default route.
POD_INTERFACE: Final = "eth0"
#: The uid and gid of "an application" where one is needed (the CLI's default).
DEFAULT_APP_UID: Final = 1000
DEFAULT_APP_GID: Final = 1000
#: A typical ephemeral source port (inside Linux's default 32768-60999).
DEFAULT_SOURCE_PORT: Final = 43210
#: Ports without meaning (ICMP) are modelled as 0.
NO_PORT: Final = 0
#: The longest interface name Linux accepts (IFNAMSIZ - 1).
MAX_INTERFACE_NAME: Final = 15

_LOOPBACK_V4: Final = ipaddress.IPv4Network("127.0.0.0/8")
#: Istio's proxy uid and gid.
DEFAULT_PROXY_IDS: Final = IdSet.of(1337)
#: The sources of the proxy's connections to the app after an inbound REDIRECT capture.
PASSTHROUGH_IPV4: Final = ipaddress.IPv4Address("127.0.0.6")
PASSTHROUGH_IPV6: Final = ipaddress.IPv6Address("::6")


class Origin(enum.Enum):
    """Where a connection starts: a socket of this pod, or a peer reached over an interface."""

    LOCAL = "local"
    REMOTE = "remote"


@attrs.frozen(kw_only=True)
class Socket:
    """The local socket that sends a packet: its owner's uid and gid."""

    uid: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(MAX_ID)))
    gid: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(MAX_ID)))

    def __str__(self) -> str:
        return f"uid={self.uid} gid={self.gid}"


def _port_field(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not NO_PORT <= value <= MAX_PORT:
        raise ValueError(f"expected a port 0-{MAX_PORT}, got {value!r}")
    return value


def _mark_field(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MARK:
        raise ValueError(f"expected a mark 0-{MAX_MARK:#x}, got {value!r}")
    return value


@attrs.frozen(kw_only=True)
class Connection:
    """The first packet of one new connection (see the module docstring).

    ``iif`` is set for remote connections only, ``oif`` for local ones only
    (the interface the route function gives); ``socket`` is None for remote
    connections and for socketless local packets.
    """

    family: Family
    protocol: Protocol
    src: IPAddress
    sport: int = attrs.field(converter=_port_field)
    dst: IPAddress
    dport: int = attrs.field(converter=_port_field)
    origin: Origin
    iif: str | None = None
    oif: str | None = None
    socket: Socket | None = None
    mark: int = attrs.field(default=0, converter=_mark_field)
    ctmark: int = attrs.field(default=0, converter=_mark_field)

    def __attrs_post_init__(self) -> None:
        if self.family is Family.INET:
            raise ValueError("a connection is IPv4 or IPv6, not inet")
        for name, address in (("src", self.src), ("dst", self.dst)):
            if address.version != self.family.version:
                raise ValueError(f"{name} {address} is not an {self.family.value} address")

    @classmethod
    def local(
        cls,
        env: Environment,
        *,
        dst: str | IPAddress,
        dport: int,
        src: str | IPAddress | None = None,
        sport: int = DEFAULT_SOURCE_PORT,
        uid: int | None = DEFAULT_APP_UID,
        gid: int | None = DEFAULT_APP_GID,
        protocol: Protocol = Protocol.TCP,
        mark: int = 0,
        oif: str | None = None,
    ) -> Connection:
        """A connection a local socket opens; the source and the outgoing interface come from ``env``
        unless given. ``uid=None`` makes a socketless packet."""
        destination = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
        source = (ipaddress.ip_address(src) if isinstance(src, str) else src) if src is not None else None
        return cls(
            family=family_of(destination),
            protocol=protocol,
            src=source if source is not None else env.source_for(destination, mark),
            sport=sport,
            dst=destination,
            dport=dport,
            origin=Origin.LOCAL,
            oif=oif if oif is not None else env.route(destination, mark),
            socket=None if uid is None else Socket(uid=uid, gid=gid if gid is not None else uid),
            mark=mark,
        )

    @classmethod
    def remote(
        cls,
        *,
        src: str | IPAddress,
        dst: str | IPAddress,
        dport: int,
        sport: int = DEFAULT_SOURCE_PORT,
        iif: str = POD_INTERFACE,
        protocol: Protocol = Protocol.TCP,
    ) -> Connection:
        """A connection from a peer, arriving on ``iif``.

        >>> print(Connection.remote(src="10.0.0.1", dst="10.0.0.5", dport=8080))
        tcp 10.0.0.1:43210 -> 10.0.0.5:8080 remote in eth0
        """
        source = ipaddress.ip_address(src) if isinstance(src, str) else src
        destination = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
        return cls(
            family=family_of(destination),
            protocol=protocol,
            src=source,
            sport=sport,
            dst=destination,
            dport=dport,
            origin=Origin.REMOTE,
            iif=iif,
        )

    def __str__(self) -> str:
        parts = [
            f"{self.protocol.value} {_endpoint(self.src, self.sport)} -> {_endpoint(self.dst, self.dport)}",
            self.origin.value,
        ]
        if self.origin is Origin.LOCAL:
            parts.append(str(self.socket) if self.socket is not None else "no socket")
        if self.mark:
            parts.append(f"mark={self.mark:#x}")
        if self.ctmark:
            parts.append(f"ctmark={self.ctmark:#x}")
        if self.iif is not None:
            parts.append(f"in {self.iif}")
        if self.oif is not None:
            parts.append(f"out {self.oif}")
        return " ".join(parts)


def _endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def family_of(address: IPAddress) -> Family:
    return Family.IPV4 if address.version == 4 else Family.IPV6


@attrs.frozen(kw_only=True)
class Interface:
    """A network interface of the pod and its addresses (with prefix lengths)."""

    name: str
    addresses: tuple[IPInterface, ...] = ()

    def first_address(self, family: Family) -> IPAddress | None:
        """The primary address of one family: what REDIRECT in PREROUTING rewrites to."""
        for address in self.addresses:
            if address.version == family.version:
                return address.ip
        return None


@attrs.frozen(kw_only=True)
class MarkRoute:
    """A policy-routing rule that sends packets with ``(mark & mask) == value`` to a table whose
    default route is local (``ip rule add fwmark value/mask lookup T``; ``ip route add local default
    dev lo table T``)."""

    value: int
    mask: int = MAX_MARK

    def matches(self, mark: int) -> bool:
        return (mark & self.mask) == self.value


@attrs.frozen(kw_only=True)
class Proxy:
    """The sidecar proxy of the pod: who it is and where it listens.

    ``uid``/``gid`` are the ids it runs as (its own connections carry them);
    ``uids``/``gids`` every id the policy treats as the proxy's.
    """

    uid: int = 1337
    gid: int = 1337
    uids: IdSet = DEFAULT_PROXY_IDS
    gids: IdSet = DEFAULT_PROXY_IDS
    outbound_port: int = 15001
    inbound_port: int = 15006
    tunnel_port: int | None = 15008
    dns_port: int | None = None
    #: The families whose DNS queries the proxy's resolver takes (and forwards upstream itself).
    dns_families: frozenset[Family] = frozenset({Family.IPV4, Family.IPV6})
    #: The source of the proxy's connections to the app after an inbound capture (REDIRECT mode).
    passthrough_ipv4: ipaddress.IPv4Address = PASSTHROUGH_IPV4
    passthrough_ipv6: ipaddress.IPv6Address = PASSTHROUGH_IPV6
    #: True when inbound capture is TPROXY: the proxy then connects to the app from the original
    #: source, with ``tproxy_mark`` on its socket.
    transparent: bool = False
    tproxy_mark: int = 1337

    def passthrough_for(self, family: Family) -> IPAddress:
        return self.passthrough_ipv4 if family is Family.IPV4 else self.passthrough_ipv6

    def owns(self, socket: Socket | None) -> bool:
        """Whether a socket is the proxy's (its uid or its gid is one of the proxy's)."""
        return socket is not None and (socket.uid in self.uids or socket.gid in self.gids)

    @property
    def listener_ports(self) -> tuple[int, ...]:
        """Every port the proxy listens on."""
        ports = [self.outbound_port, self.inbound_port]
        ports += [p for p in (self.tunnel_port, self.dns_port) if p is not None]
        return tuple(ports)

    @property
    def socket(self) -> Socket:
        return Socket(uid=self.uid, gid=self.gid)

    @property
    def marks(self) -> tuple[int, ...]:
        """The marks the proxy puts on its own sockets: none, or (TPROXY) the TPROXY mark."""
        return (0, self.tproxy_mark) if self.transparent else (0,)


def _default_interfaces() -> tuple[Interface, ...]:
    return (
        Interface(
            name=LOOPBACK_INTERFACE,
            addresses=(ipaddress.IPv4Interface("127.0.0.1/8"), ipaddress.IPv6Interface("::1/128")),
        ),
        Interface(
            name=POD_INTERFACE,
            addresses=(ipaddress.IPv4Interface(f"{POD_IPV4}/24"), ipaddress.IPv6Interface(f"{POD_IPV6}/64")),
        ),
    )


@attrs.frozen(kw_only=True)
class Environment:
    """The pod a connection starts in or arrives at (see the module docstring)."""

    interfaces: tuple[Interface, ...] = attrs.field(factory=_default_interfaces)
    #: The interface of the default route.
    default_interface: str = POD_INTERFACE
    #: Marks routed locally whatever the destination (TPROXY's policy routing).
    local_marks: tuple[MarkRoute, ...] = ()
    #: Whether packets for other hosts are forwarded (a pod does not, unless it routes for a VM).
    forwarding: bool = False
    #: Interfaces whose incoming traffic is the pod's own outbound traffic (a VM bridged into the
    #: pod): the facts about inbound connections do not apply to it.
    rerouted_interfaces: tuple[str, ...] = ()
    proxy: Proxy = attrs.field(factory=Proxy)

    def __attrs_post_init__(self) -> None:
        names = [i.name for i in self.interfaces]
        if LOOPBACK_INTERFACE not in names:
            raise ValueError("an environment needs the loopback interface 'lo'")
        if self.default_interface not in names:
            raise ValueError(f"the default interface {self.default_interface!r} is not one of {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"interface names repeat: {names}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def default(cls) -> Environment:
        """lo and eth0 with the documented addresses, Istio's proxy (uid/gid 1337, 15001/15006/15008)."""
        return cls()

    @classmethod
    def for_policy(cls, policy: object, *rulesets: Ruleset) -> Environment:
        """The usual environment of a pod that runs ``policy`` (a :class:`meshredirect.policy.Policy`):
        its proxy ids and ports, TPROXY policy routing, the interfaces it names (and those the
        ``rulesets`` name), and ``lo`` carrying the IPv6 passthrough address.

        >>> from meshredirect.policy import Policy
        >>> env = Environment.for_policy(Policy(exclude_interfaces="eth1", inbound_mode="TPROXY"))
        >>> [i.name for i in env.interfaces], env.local_marks
        (['lo', 'eth0', 'eth1'], (MarkRoute(value=1337, mask=4294967295),))
        """
        from meshredirect.policy import InterceptionMode, Policy

        assert isinstance(policy, Policy)
        transparent = policy.inbound_mode is InterceptionMode.TPROXY
        proxy = Proxy(
            uid=_first(policy.proxy_uids, 1337),
            gid=_first(policy.proxy_gids, 1337),
            uids=policy.proxy_uids,
            gids=policy.proxy_gids,
            outbound_port=policy.outbound_port,
            inbound_port=policy.inbound_port,
            tunnel_port=policy.inbound_tunnel_port,
            dns_port=policy.dns.port if policy.dns.enabled else None,
            dns_families=frozenset(f for f in (Family.IPV4, Family.IPV6) if policy.dns.active_for(f)),
            passthrough_ipv4=policy.passthrough_ipv4,
            passthrough_ipv6=policy.passthrough_ipv6,
            transparent=transparent,
            tproxy_mark=policy.tproxy_mark,
        )
        interfaces = list(_default_interfaces())
        if policy.passthrough_ipv6 != ipaddress.IPv6Address("::1"):
            lo = interfaces[0]
            interfaces[0] = attrs.evolve(
                lo, addresses=(*lo.addresses, ipaddress.IPv6Interface(f"{policy.passthrough_ipv6}/128"))
            )
        env = cls(
            interfaces=tuple(interfaces),
            local_marks=(MarkRoute(value=policy.tproxy_mark),) if transparent else (),
            proxy=proxy,
            forwarding=bool(policy.reroute_interfaces),
            rerouted_interfaces=policy.reroute_interfaces,
        )
        return env.with_interfaces((*policy.exclude_interfaces, *policy.reroute_interfaces)).covering(*rulesets)

    def with_interfaces(self, names: Iterable[str]) -> Environment:
        """This environment plus interfaces of these names (a trailing ``+`` names a prefix: an
        interface ``<prefix>0`` stands for it). The k-th added interface holds 10.k.0.5/24 and fd00:k::5/64."""
        interfaces = list(self.interfaces)
        for name in names:
            if any(InterfaceMatch(direction=Direction.SOURCE, name=name).matches(i.name) for i in interfaces):
                continue
            concrete = name[:-1] + "0" if name.endswith("+") else name
            concrete = concrete[:MAX_INTERFACE_NAME]
            k = len(interfaces) - 1
            interfaces.append(
                Interface(
                    name=concrete,
                    addresses=(
                        ipaddress.IPv4Interface(f"10.{k}.0.5/24"),
                        ipaddress.IPv6Interface(f"fd00:{k:x}::5/64"),
                    ),
                )
            )
        return attrs.evolve(self, interfaces=tuple(interfaces))

    def covering(self, *rulesets: Ruleset) -> Environment:
        """This environment plus an interface for every interface name the rulesets match on."""
        names: list[str] = []
        for ruleset in rulesets:
            for _table, _chain, rule in ruleset.rules():
                for match in rule.matches:
                    if isinstance(match, InterfaceMatch) and match.name not in names:
                        names.append(match.name)
        return self.with_interfaces(names)

    # ------------------------------------------------------------------ queries

    def interface(self, name: str) -> Interface | None:
        for interface in self.interfaces:
            if interface.name == name:
                return interface
        return None

    @property
    def interface_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)

    def pod_address(self, family: Family) -> IPAddress:
        """The pod's own address of one family (the default interface's first)."""
        interface = self.interface(self.default_interface)
        assert interface is not None
        address = interface.first_address(family)
        if address is None:
            raise ValueError(f"the pod has no {family.value} address on {self.default_interface}")
        return address

    def local_networks(self, family: Family) -> tuple[IPNetwork, ...]:
        """Every destination that is local: lo's whole prefixes and each other interface's own address."""
        out: list[IPNetwork] = []
        for interface in self.interfaces:
            for address in interface.addresses:
                if address.version != family.version:
                    continue
                out.append(
                    address.network if interface.name == LOOPBACK_INTERFACE else ipaddress.ip_network(address.ip)
                )
        return tuple(out)

    @functools.cached_property
    def _local_addresses(self) -> frozenset[IPAddress]:
        return frozenset(own.ip for interface in self.interfaces for own in interface.addresses)

    @functools.cached_property
    def _loopback_networks(self) -> tuple[IPNetwork, ...]:
        lo = self.interface(LOOPBACK_INTERFACE)
        assert lo is not None
        return tuple(own.network for own in lo.addresses)

    def is_local(self, address: IPAddress) -> bool:
        """Whether the kernel delivers packets for ``address`` locally."""
        if address in self._local_addresses:
            return True
        return any(n.version == address.version and address in n for n in self._loopback_networks)

    def is_loopback(self, address: IPAddress) -> bool:
        """127.0.0.0/8 or ::1: addresses that never appear on the wire."""
        if address.version == 4:
            return address in _LOOPBACK_V4
        return address == ipaddress.IPv6Address("::1")

    def routes_locally(self, mark: int) -> bool:
        return any(route.matches(mark) for route in self.local_marks)

    def route(self, dst: IPAddress, mark: int = 0) -> str:
        """The outgoing interface of a local packet: lo for local destinations (and marks routed
        locally), the interface whose subnet holds ``dst``, else the default interface."""
        if self.routes_locally(mark) or self.is_local(dst):
            return LOOPBACK_INTERFACE
        return self.subnet_route(dst)

    def subnet_route(self, dst: IPAddress) -> str:
        """The outgoing interface of a destination that is not local: the interface whose subnet
        holds it, else the default interface."""
        for interface in self.interfaces:
            if interface.name in (LOOPBACK_INTERFACE, self.default_interface):
                continue
            if any(a.version == dst.version and dst in a.network for a in interface.addresses):
                return interface.name
        return self.default_interface

    def source_for(self, dst: IPAddress, mark: int = 0) -> IPAddress:
        """The source address the kernel picks for a socket that does not bind one."""
        family = family_of(dst)
        if self.is_local(dst):
            for interface in self.interfaces:
                if interface.name != LOOPBACK_INTERFACE and any(a.ip == dst for a in interface.addresses):
                    return dst
            if self.is_loopback(dst):
                lo = self.interface(LOOPBACK_INTERFACE)
                assert lo is not None
                first = lo.first_address(family)
                assert first is not None
                return first
            return dst
        out = self.interface(self.route(dst, mark))
        if out is not None and out.name != LOOPBACK_INTERFACE:
            first = out.first_address(family)
            if first is not None:
                return first
        return self.pod_address(family)

    def first_address(self, interface: str, family: Family) -> IPAddress | None:
        """What REDIRECT in PREROUTING rewrites to: the incoming interface's primary address."""
        found = self.interface(interface)
        return found.first_address(family) if found is not None else None


def _first(ids: IdSet, default: int) -> int:
    for lo, _hi in ids.intervals:
        return lo
    return default
