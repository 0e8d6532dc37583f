"""What the eBPF program must know about the node that netfilter learns from routing.

netfilter's nat OUTPUT runs after routing: it knows the outgoing interface
(``-o lo``) and the source address the route chose. A cgroup ``connect4`` /
``connect6`` hook runs before routing, so the program looks both up in maps
filled from an explicit :class:`Environment`:

- ``local``: the kernel's local routing table (addresses of this node; every
  connection to one of them leaves on ``lo``), with the source address each
  one gives an unbound socket (127.0.0.0/8 gives 127.0.0.1; a pod address
  gives itself);
- ``routes``: the main routing table (longest prefix wins), each with its
  interface and preferred source.

- ``mark_routes``: packet marks that policy routing sends to a table whose
  default route is local (TPROXY's ``ip rule add fwmark M lookup T`` with
  ``ip route add local default dev lo table T``): a socket with such a mark
  leaves on ``lo`` whatever its destination.

The assumption this translation rests on, stated once: routing depends on the
destination and those marks only (no other policy routing by mark, uid or
source; no ``SO_BINDTODEVICE``), the packet mark is the socket's ``SO_MARK``,
and the maps are kept equal to the routing tables.

>>> env = Environment.pod("10.0.0.5", "fd00::5")
>>> [str(r.network) for r in env.local]
['127.0.0.0/8', '10.0.0.5/32', '::1/128', 'fd00::5/128']
>>> env.interfaces
('lo', 'eth0')
>>> env.route(ipaddress.ip_address("10.0.0.5"))
Route(network=IPv4Network('10.0.0.5/32'), interface='lo', source=IPv4Address('10.0.0.5'), local=True)
>>> env.route(ipaddress.ip_address("192.0.2.1")).interface
'eth0'
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

import attrs

from meshredirect.errors import PolicyError
from meshredirect.values import MAX_MARK, IPAddress, IPNetwork, network_of

__all__ = ["LOOPBACK_INTERFACE", "Environment", "MarkRoute", "Route"]

LOOPBACK_INTERFACE: Final = "lo"


def _source(value: object) -> IPAddress | None:
    if value is None or isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise PolicyError("route source", expected="an IPv4 or IPv6 address", got=value) from None


def _address(value: str | IPAddress, *, field: str) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise PolicyError(field, expected="IPv4 or IPv6 addresses", got=value) from None


def _route(text: str) -> Route:
    network, sep, interface = text.partition("=")
    if not sep or not interface.strip():
        raise PolicyError("routes", expected="NETWORK=INTERFACE, e.g. 10.1.0.0/16=eth1", got=text)
    return Route(network=network.strip(), interface=interface.strip())


def _network(value: object) -> IPNetwork:
    return network_of(value, field="route")  # type: ignore[arg-type]


@attrs.frozen(kw_only=True)
class Route:
    """One route: destinations in ``network`` leave on ``interface``; an unbound socket gets ``source``."""

    network: IPNetwork = attrs.field(converter=_network)
    interface: str
    source: IPAddress | None = attrs.field(default=None, converter=_source)
    #: A route of the local table (a local address: always leaves on lo).
    local: bool = False

    def __attrs_post_init__(self) -> None:
        if self.source is not None and self.source.version != self.network.version:
            raise PolicyError(
                "route source",
                expected=f"an IPv{self.network.version} address for route {self.network}",
                got=str(self.source),
            )
        if self.local and self.interface != LOOPBACK_INTERFACE:
            raise PolicyError("local route", expected="interface lo", got=self.interface)


def _routes(value: Iterable[Route]) -> tuple[Route, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class MarkRoute:
    """Packets whose ``mark & mask == value`` are routed locally (they leave on lo)."""

    value: int
    mask: int = MAX_MARK

    def matches(self, mark: int) -> bool:
        return (mark & self.mask) == self.value


def _mark_routes(value: Iterable[MarkRoute]) -> tuple[MarkRoute, ...]:
    return tuple(value)


#: The loopback routes every Linux network namespace has.
LOOPBACK_ROUTES: Final = (
    Route(network="127.0.0.0/8", interface=LOOPBACK_INTERFACE, source="127.0.0.1", local=True),
    Route(network="::1/128", interface=LOOPBACK_INTERFACE, source="::1", local=True),
)


@attrs.frozen(kw_only=True)
class Environment:
    """The node's local addresses and routes, as the program's maps hold them (see the module docstring)."""

    local: tuple[Route, ...] = attrs.field(default=LOOPBACK_ROUTES, converter=_routes)
    routes: tuple[Route, ...] = attrs.field(
        default=(Route(network="0.0.0.0/0", interface="eth0"), Route(network="::/0", interface="eth0")),
        converter=_routes,
    )
    mark_routes: tuple[MarkRoute, ...] = attrs.field(default=(), converter=_mark_routes)

    def __attrs_post_init__(self) -> None:
        for route in self.local:
            if not route.local:
                raise PolicyError("environment.local", expected="routes of the local table", got=str(route.network))
        for route in self.routes:
            if route.local:
                raise PolicyError("environment.routes", expected="routes of the main table", got=str(route.network))
        for field, table in (("environment.local", self.local), ("environment.routes", self.routes)):
            seen: set[IPNetwork] = set()
            for route in table:
                if route.network in seen:
                    raise PolicyError(field, expected="one route per destination network", got=str(route.network))
                seen.add(route.network)

    @classmethod
    def pod(
        cls, *addresses: str | IPAddress, interface: str = "eth0", routes: Iterable[str | Route] = ()
    ) -> Environment:
        """A pod: loopback, its own addresses (local), a default route per family via ``interface``, and
        ``routes`` (``"NETWORK=INTERFACE"`` or :class:`Route`).

        Routes without a source prefer the pod's first address of their family.

        >>> Environment.pod("10.0.0.5", routes=["10.1.0.0/16=eth1"]).routes[-1]
        Route(network=IPv4Network('10.1.0.0/16'), interface='eth1', source=IPv4Address('10.0.0.5'), local=False)
        """
        parsed = [_address(a, field="local_addresses") for a in addresses]
        own = {v: next((a for a in parsed if a.version == v), None) for v in (4, 6)}
        local: list[Route] = []
        for version, loopback in ((4, LOOPBACK_ROUTES[0]), (6, LOOPBACK_ROUTES[1])):
            local.append(loopback)
            local += [
                Route(network=ipaddress.ip_network(a), interface=LOOPBACK_INTERFACE, source=a, local=True)
                for a in parsed
                if a.version == version
            ]
        main = [
            Route(network="0.0.0.0/0", interface=interface, source=own[4]),
            Route(network="::/0", interface=interface, source=own[6]),
        ]
        for item in routes:
            route = item if isinstance(item, Route) else _route(item)
            if route.source is None:
                route = attrs.evolve(route, source=own[route.network.version])
            main = [r for r in main if r.network != route.network] + [route]
        return cls(local=tuple(local), routes=tuple(main))

    @property
    def interfaces(self) -> tuple[str, ...]:
        """Every interface a route names, ``lo`` first: the program numbers them from 1 in this order."""
        names = [LOOPBACK_INTERFACE]
        for route in (*self.local, *self.routes):
            if route.interface not in names:
                names.append(route.interface)
        return tuple(names)

    def interface_id(self, name: str) -> int:
        """The number the program uses for an interface (0 means: no route)."""
        return self.interfaces.index(name) + 1

    def routes_locally(self, mark: int) -> bool:
        """Whether policy routing sends packets with this mark to lo."""
        return any(route.matches(mark) for route in self.mark_routes)

    def route(self, destination: IPAddress) -> Route | None:
        """The route the kernel takes for ``destination``: the local table first, then the longest prefix."""
        for table in (self.local, self.routes):
            best: Route | None = None
            for route in table:
                covers = route.network.version == destination.version and destination in route.network
                if covers and (best is None or route.network.prefixlen > best.network.prefixlen):
                    best = route
            if best is not None:
                return best
        return None
