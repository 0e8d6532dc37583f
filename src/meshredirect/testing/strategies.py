"""Hypothesis strategies for meshredirect values, biased toward the cases that break redirect rules.

Every strategy yields valid values by construction (no filtering): port
lists that must not overlap are drawn disjoint, listener ports distinct,
and so on. Keyword arguments of :func:`policies` fix fields.

>>> from hypothesis import given, settings
>>> @settings(max_examples=5, database=None)
... @given(policies())
... def test(policy):
...     assert policy.proxy_uids or policy.proxy_gids
>>> test()
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from hypothesis import strategies as st

from meshredirect.ir import Family
from meshredirect.policy import DNS_QUERY_PORT, DnsCapture, InterceptionMode, LoopbackCapture, Policy
from meshredirect.values import ALL, AddressSet, IdSet, PortSet

__all__ = [
    "SPECIAL_ADDRESSES",
    "SPECIAL_PORTS",
    "address_sets",
    "connections",
    "id_sets",
    "interface_names",
    "policies",
    "port_sets",
]

#: Ports that matter to a mesh: its listeners, DNS, health and metrics, ssh, common app ports.
SPECIAL_PORTS: Final = (15001, 15006, 15008, 15020, 15021, 15053, 15090, 53, 22, 80, 443, 8080)
SPECIAL_IDS: Final = (1337, 1000, 101, 2102, 5678, 65534)
INTERFACES: Final = ("eth0", "eth1", "eth2", "net1", "veth+", "tap0", "kubevirt0")

_v4_networks = st.one_of(
    st.sampled_from(
        ["10.0.0.0/8", "10.96.0.0/12", "192.168.0.0/16", "172.16.0.0/12", "169.254.169.254/32", "0.0.0.0/1"]
    ),
    st.builds(
        lambda a, p: str(ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{p}", strict=False)),
        st.integers(0x01000000, 0x7EFFFFFF) | st.integers(0x80000000, 0xDFFFFFFF),
        st.integers(8, 32),
    ),
)
_v6_networks = st.one_of(
    st.sampled_from(["2001:db8::/32", "fd00::/8", "fd00:10:96::/112", "2001:db8::1/128"]),
    st.builds(
        lambda a, p: str(ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{p}", strict=False)),
        st.integers(0x2000 << 112, (0x3FFF << 112) - 1),
        st.integers(16, 128),
    ),
)


#: Addresses that matter to a mesh: loopback, the passthrough sources, the default pod, a peer, DNS.
SPECIAL_ADDRESSES: Final = {
    4: ("127.0.0.1", "127.0.0.6", "10.0.0.5", "10.0.0.1", "127.0.0.53", "10.96.0.10", "169.254.169.254"),
    6: ("::1", "::6", "fd00::5", "fd00::1", "fd00:10:96::a", "2001:db8::1"),
}


def ports() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(SPECIAL_PORTS), st.integers(1, 65535))


def port_sets(*, min_size: int = 0, max_size: int = 5, ranges: bool = True) -> st.SearchStrategy[PortSet]:
    """Port sets of a few ports and (optionally) ranges."""
    member = st.one_of(
        ports(), st.tuples(st.integers(1, 65000), st.integers(0, 500)).map(lambda t: (t[0], t[0] + t[1]))
    )
    return st.lists(member if ranges else ports(), min_size=min_size, max_size=max_size).map(lambda m: PortSet.of(*m))


def id_sets(*, min_size: int = 0, max_size: int = 3) -> st.SearchStrategy[IdSet]:
    ids = st.one_of(st.sampled_from(SPECIAL_IDS), st.integers(1, 2**31))
    return st.lists(ids, min_size=min_size, max_size=max_size).map(lambda m: IdSet.of(*m))


def address_sets(
    *, families: frozenset[Family] = frozenset({Family.IPV4, Family.IPV6}), max_size: int = 4
) -> st.SearchStrategy[AddressSet]:
    """Address sets that never touch loopback."""
    choices = []
    if Family.IPV4 in families:
        choices.append(_v4_networks)
    if Family.IPV6 in families:
        choices.append(_v6_networks)
    networks = st.one_of(*choices).filter(_not_loopback)
    return st.lists(networks, max_size=max_size).map(lambda m: AddressSet.of(*m))


def _not_loopback(text: str) -> bool:
    network = ipaddress.ip_network(text)
    loopback = ipaddress.ip_network("127.0.0.0/8") if network.version == 4 else ipaddress.ip_network("::1/128")
    return not network.overlaps(loopback)  # type: ignore[arg-type]


def interface_names() -> st.SearchStrategy[str]:
    return st.sampled_from(INTERFACES)


@st.composite
def policies(draw: st.DrawFn, /, **fixed: Any) -> Policy:
    """Valid policies; keyword arguments fix fields (e.g. ``policies(inbound_mode="TPROXY")``)."""
    listeners = draw(st.lists(ports(), min_size=4, max_size=4, unique=True))
    outbound_port, inbound_port, tunnel, dns_port = listeners
    tunnel_port = draw(st.sampled_from([tunnel, None]))
    uids = draw(id_sets(max_size=2))
    gids = draw(id_sets(min_size=0 if uids else 1, max_size=2))
    families = draw(
        st.sampled_from([frozenset({Family.IPV4}), frozenset({Family.IPV6}), frozenset({Family.IPV4, Family.IPV6})])
    )

    inbound_exclude = draw(port_sets(max_size=4))
    inbound = draw(st.one_of(st.just(ALL), port_sets(max_size=4)))
    if isinstance(inbound, PortSet):
        inbound = inbound.difference(inbound_exclude)
        if tunnel_port is not None:
            inbound = inbound.difference(PortSet.of(tunnel_port))
    outbound_exclude = draw(port_sets(max_size=3))
    outbound = draw(port_sets(max_size=3)).difference(outbound_exclude)

    ifaces = draw(st.lists(interface_names(), max_size=3, unique=True))
    split = draw(st.integers(0, len(ifaces)))
    dns_mode = draw(st.sampled_from(["off", "all", "servers"]))
    if DNS_QUERY_PORT in (outbound_port, inbound_port, tunnel_port):
        dns_mode = "off"  # DNS capture takes port 53: the policy refuses a listener there
    if dns_mode == "off":
        dns = DnsCapture()
    elif dns_mode == "all":
        dns = DnsCapture(enabled=True, capture_all=True, port=dns_port)
    else:
        servers = draw(
            st.lists(
                st.sampled_from(["10.96.0.10", "127.0.0.53", "169.254.20.10", "fd00:10:96::a", "::127.0.0.53"]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        )
        dns = DnsCapture(enabled=True, servers=servers, port=dns_port)
    groups_mode = draw(st.sampled_from(["all", "include", "exclude"]))
    group_ids = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=2, unique=True))

    fields: dict[str, Any] = {
        "outbound_port": outbound_port,
        "inbound_port": inbound_port,
        "inbound_tunnel_port": tunnel_port,
        "proxy_uids": uids,
        "proxy_gids": gids,
        "inbound_mode": draw(st.sampled_from(InterceptionMode)),
        "tproxy_mark": draw(st.sampled_from([1337, 1, 0x100, 0xFFFF])),
        "tproxy_route_table": draw(st.sampled_from([133, 100, 1000])),
        "inbound_ports": inbound,
        "inbound_ports_exclude": inbound_exclude,
        "outbound_cidrs": draw(st.one_of(st.just(ALL), address_sets())),
        "outbound_cidrs_exclude": draw(address_sets()),
        "outbound_ports": outbound,
        "outbound_ports_exclude": outbound_exclude,
        "exclude_interfaces": ifaces[:split],
        "reroute_interfaces": ifaces[split:],
        "dns": dns,
        "drop_invalid": draw(st.booleans()),
        "families": families,
        "owner_groups_include": group_ids if groups_mode == "include" else ALL,
        "owner_groups_exclude": group_ids if groups_mode == "exclude" else (),
        "loopback_cidr": draw(st.sampled_from(["127.0.0.1/32", "127.0.0.0/8", "127.0.0.0/30"])),
        "loopback_capture": draw(st.sampled_from(LoopbackCapture)),
        "chain_prefix": draw(st.sampled_from(["ISTIO", "MESH", "PROXY_INIT", "mr"])),
        "one_rule_per_port": draw(st.booleans()),
    }
    fields.update(fixed)
    return Policy(**fields)


def _addresses(version: int, env: Any) -> st.SearchStrategy[Any]:
    own = [str(a.ip) for i in env.interfaces for a in i.addresses if a.version == version]
    special = st.sampled_from(sorted({*SPECIAL_ADDRESSES[version], *own}))
    anything: st.SearchStrategy[Any]
    if version == 4:
        anything = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
    else:
        anything = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
    return st.one_of(special.map(ipaddress.ip_address), _v4_networks if version == 4 else _v6_networks, anything).map(
        lambda a: ipaddress.ip_network(a, strict=False).network_address + 1 if "/" in str(a) else a
    )


@st.composite
def connections(draw: st.DrawFn, env: Any, /) -> Any:
    """Connections in the pod ``env`` (a :class:`meshredirect.semantics.model.Environment`), local and
    remote, biased toward the addresses, ports, uids and marks that matter to a mesh."""
    from meshredirect.ir import Protocol
    from meshredirect.semantics.model import Connection, Origin, Socket

    version = draw(st.sampled_from([4, 6]))
    family = Family.IPV4 if version == 4 else Family.IPV6
    protocol = draw(
        st.sampled_from([Protocol.TCP, Protocol.TCP, Protocol.UDP, Protocol.ICMP if version == 4 else Protocol.ICMPV6])
    )
    ported = protocol in (Protocol.TCP, Protocol.UDP)
    proxy = env.proxy
    listener = st.sampled_from([p for p in (*proxy.listener_ports, 53) if p])
    dport = draw(st.one_of(listener, ports())) if ported else 0
    sport = draw(st.one_of(st.just(43210), ports())) if ported else 0
    dst = draw(_addresses(version, env))
    if draw(st.booleans()):
        iif = draw(st.sampled_from([n for n in env.interface_names if n != "lo"]))
        src = draw(_addresses(version, env).filter(lambda a: not env.is_local(a) and not env.is_loopback(a)))
        return Connection(
            family=family, protocol=protocol, src=src, sport=sport, dst=dst, dport=dport, origin=Origin.REMOTE, iif=iif
        )
    ids = st.one_of(st.sampled_from([proxy.uid, proxy.gid, 1000, 0, 65534]), st.integers(0, 2**31))
    socket = draw(st.one_of(st.none(), st.builds(Socket, uid=ids, gid=ids)))
    marks = sorted({0, proxy.tproxy_mark, proxy.tproxy_mark + 1, *(r.value for r in env.local_marks)})
    mark = draw(st.one_of(st.just(0), st.sampled_from(marks), st.integers(0, 2**32 - 1)))
    src = draw(st.one_of(st.just(env.source_for(dst, mark)), _addresses(version, env)))
    return Connection(
        family=family,
        protocol=protocol,
        src=src,
        sport=sport,
        dst=dst,
        dport=dport,
        origin=Origin.LOCAL,
        oif=env.route(dst, mark),
        socket=socket,
        mark=mark,
    )
