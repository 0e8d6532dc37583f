"""Hypothesis strategies for meshredirect values, biased toward the cases that break redirect rules.

- :func:`policies`: valid policies; keyword arguments fix fields (a value) or
  bias them (a strategy), ``base`` and ``vary`` keep all but a few fields;
- :func:`environments`: the pod a policy runs in (its proxy, interfaces, TPROXY routing);
- :func:`connections`: new connections in an environment, biased toward the
  addresses and ports that matter (127.0.0.1, 127.0.0.6, ::1, ::6, the pod's
  address, the proxy's listeners, 15020, 15090, 53), both families, local
  (with and without a socket, as the proxy or an app) and remote;
- :func:`rulesets`: rulesets compiled from policies, or broken on purpose by a
  :class:`~meshredirect.testing.mutations.Mutation`, with their policy and
  environment (:class:`RulesetCase`), for testing checkers;
- building blocks: :func:`port_sets`, :func:`id_sets`, :func:`address_sets`,
  :func:`interface_names`, :func:`ports`.

Every strategy yields valid values by construction (no filtering): port
lists that must not overlap are drawn disjoint, listener ports distinct,
and so on. Only fixing fields by hand can ask for an invalid policy; such
draws are rejected (too many, and hypothesis says the strategy is unsatisfiable).

>>> from hypothesis import given, settings
>>> @settings(max_examples=5, database=None)
... @given(policies(inbound_mode="TPROXY"), connections())
... def test(policy, connection):
...     assert policy.proxy_uids or policy.proxy_gids
...     assert connection.family in (Family.IPV4, Family.IPV6)
>>> test()
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Final

import attrs
from hypothesis import reject
from hypothesis import strategies as st

from meshredirect.compiler import compile_policy
from meshredirect.errors import PolicyError
from meshredirect.ir import Family, Protocol, Ruleset
from meshredirect.policy import DNS_QUERY_PORT, DnsCapture, InterceptionMode, LoopbackCapture, Policy
from meshredirect.semantics.model import DEFAULT_APP_GID, DEFAULT_APP_UID, LOOPBACK_INTERFACE, Connection, Environment
from meshredirect.testing.mutations import Mutation, applicable, mutate
from meshredirect.values import ALL, AddressSet, IdSet, IPAddress, PortSet

__all__ = [
    "SPECIAL_ADDRESSES",
    "SPECIAL_PORTS",
    "RulesetCase",
    "address_sets",
    "connections",
    "environments",
    "id_sets",
    "interface_names",
    "policies",
    "port_sets",
    "ports",
    "rulesets",
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


def ports() -> st.SearchStrategy[int]:
    """Ports 1-65535, often one of :data:`SPECIAL_PORTS`.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20, database=None)
    ... @given(ports())
    ... def test(port):
    ...     assert 1 <= port <= 65535
    >>> test()
    """
    return st.one_of(st.sampled_from(SPECIAL_PORTS), st.integers(1, 65535))


def port_sets(*, min_size: int = 0, max_size: int = 5, ranges: bool = True) -> st.SearchStrategy[PortSet]:
    """Port sets of a few ports and (optionally) ranges.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20, database=None)
    ... @given(port_sets(min_size=1, ranges=False))
    ... def test(ports):
    ...     assert 1 <= len(tuple(ports)) <= 5
    >>> test()
    """
    member = st.one_of(
        ports(), st.tuples(st.integers(1, 65000), st.integers(0, 500)).map(lambda t: (t[0], t[0] + t[1]))
    )
    return st.lists(member if ranges else ports(), min_size=min_size, max_size=max_size).map(lambda m: PortSet.of(*m))


def id_sets(*, min_size: int = 0, max_size: int = 3) -> st.SearchStrategy[IdSet]:
    """Sets of uids or gids, often the proxy's (1337) or other well-known ones.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20, database=None)
    ... @given(id_sets(min_size=1))
    ... def test(ids):
    ...     assert ids and all(0 < i <= 2**31 for i in ids)
    >>> test()
    """
    ids = st.one_of(st.sampled_from(SPECIAL_IDS), st.integers(1, 2**31))
    return st.lists(ids, min_size=min_size, max_size=max_size).map(lambda m: IdSet.of(*m))


def address_sets(
    *, families: frozenset[Family] = frozenset({Family.IPV4, Family.IPV6}), max_size: int = 4
) -> st.SearchStrategy[AddressSet]:
    """Address sets that never touch loopback (of the given families).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20, database=None)
    ... @given(address_sets(families=frozenset({Family.IPV4})))
    ... def test(addresses):
    ...     assert not addresses.overlaps(ipaddress.ip_network("127.0.0.0/8"))
    ...     assert all(network.version == 4 for network in addresses)
    >>> test()
    """
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
    """Interface names, some with a trailing ``+`` (a prefix), never ``lo``.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, database=None)
    ... @given(interface_names())
    ... def test(name):
    ...     assert name != "lo" and len(name) <= 15
    >>> test()
    """
    return st.sampled_from(INTERFACES)


def policies(
    *, base: Policy | None = None, vary: Iterable[str] | None = None, **fixed: Any
) -> st.SearchStrategy[Policy]:
    """Valid policies.

    - ``field=value`` fixes a field (``policies(inbound_mode="TPROXY")``);
    - ``field=strategy`` biases it: the value is drawn from the strategy
      (``policies(families=st.just({Family.IPV4}))``);
    - ``base`` with ``vary``: every field but those named in ``vary`` comes
      from ``base`` (``policies(base=Policy(), vary=["outbound_cidrs_exclude"])``
      draws Istio's default with random excluded CIDRs).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, database=None)
    ... @given(policies(base=Policy(), vary=["inbound_ports_exclude"]))
    ... def test(policy):
    ...     assert policy.outbound_port == 15001 and policy.inbound_port == 15006
    >>> test()
    """
    names = {f.name for f in attrs.fields(Policy)}
    unknown = sorted((set(fixed) | set(vary or ())) - names)
    if unknown:
        raise TypeError(f"expected fields of Policy ({', '.join(sorted(names))}), got {unknown[0]!r}")
    if vary is not None and base is None:
        raise TypeError("vary names the fields drawn at random; it needs a base policy for the others")
    return _policies(base, frozenset(vary) if vary is not None else None, fixed)


@st.composite
def _policies(draw: st.DrawFn, base: Policy | None, vary: frozenset[str] | None, fixed: dict[str, Any]) -> Policy:
    fields = _policy_fields(draw)
    if base is not None:
        for field in attrs.fields(Policy):
            if vary is None or field.name not in vary:
                fields[field.name] = getattr(base, field.name)
    for name, value in fixed.items():
        fields[name] = draw(value) if isinstance(value, st.SearchStrategy) else value
    if not fixed and base is None:
        return Policy(**fields)  # valid by construction
    try:
        return Policy(**fields)
    except PolicyError:
        reject()


def _policy_fields(draw: st.DrawFn) -> dict[str, Any]:
    """The fields of a valid policy."""
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
    return fields


# ----------------------------------------------------------------------------- environments and connections


def environments(policies: st.SearchStrategy[Policy] | None = None) -> st.SearchStrategy[Environment]:
    """The pods drawn policies run in (:meth:`Environment.for_policy <meshredirect.semantics.model.Environment.for_policy>`),
    sometimes with an extra interface.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None)
    ... @given(environments(policies(proxy_uids="1337", proxy_gids="1337")))
    ... def test(env):
    ...     assert env.proxy.uid == 1337 and "lo" in env.interface_names
    >>> test()
    """
    source = policies if policies is not None else _policies(None, None, {})
    extra = st.lists(st.sampled_from(("eth1", "net1", "tap0")), max_size=1)
    return st.builds(lambda p, names: Environment.for_policy(p).with_interfaces(names), source, extra)


#: Addresses that matter to redirect rules, per IP version: loopback, the passthrough sources,
#: the default environment's pod address and a neighbour, cluster DNS, metadata, the outside world.
SPECIAL_ADDRESSES: Final[dict[int, tuple[str, ...]]] = {
    4: (
        "127.0.0.1",
        "127.0.0.6",
        "127.0.0.53",
        "10.0.0.5",
        "10.0.0.1",
        "10.96.0.10",
        "169.254.169.254",
        "203.0.113.10",
    ),
    6: ("::1", "::6", "fd00::5", "fd00::1", "fd00:10:96::a", "2001:db8::1", "2001:db8::10"),
}
_APP_IDS: Final = (DEFAULT_APP_UID, 0, 65534)


def _addresses(env: Environment, family: Family) -> st.SearchStrategy[IPAddress]:
    """The pod's own addresses, the special ones, addresses inside typical networks, or any."""
    version = family.version
    own = [a.ip for i in env.interfaces for a in i.addresses if a.version == version]
    passthrough = env.proxy.passthrough_for(family)
    special = [ipaddress.ip_address(a) for a in SPECIAL_ADDRESSES[version]]
    top = 2**32 - 1 if version == 4 else 2**128 - 1
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    inside = (_v4_networks if version == 4 else _v6_networks).map(
        lambda text: ipaddress.ip_network(text, strict=False).network_address + 1
    )
    chosen = st.sampled_from(list(dict.fromkeys([*own, passthrough, *special])))
    return st.one_of(chosen, chosen, inside, st.integers(1, top).map(make))  # the chosen ones half the time


def _ports(env: Environment) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(list(dict.fromkeys((*env.proxy.listener_ports, *SPECIAL_PORTS)))), ports())


def connections(
    env: Environment | None = None,
    *,
    families: Iterable[Family] = (Family.IPV4, Family.IPV6),
    local: bool | None = None,
    protocols: Iterable[Protocol] = (Protocol.TCP, Protocol.UDP, Protocol.ICMP),
) -> st.SearchStrategy[Connection]:
    """New connections in ``env`` (default: :meth:`Environment.default <meshredirect.semantics.model.Environment.default>`).

    Biased toward the special addresses (:data:`SPECIAL_ADDRESSES`, the pod's
    own, the proxy's passthrough source) and ports (the proxy's listeners,
    :data:`SPECIAL_PORTS`), mostly TCP. ``local`` True gives only
    connections opened by a socket of the pod (as an app, as the proxy, or
    without a socket; with or without a mark; sometimes from the passthrough
    source), False only connections from a peer (never from a local or
    loopback source, which the kernel drops as martians), None both.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20, database=None)
    ... @given(connections(local=False, families=[Family.IPV6]))
    ... def test(connection):
    ...     assert connection.family is Family.IPV6 and connection.socket is None and connection.iif != "lo"
    >>> test()
    """
    environment = env if env is not None else Environment.default()
    chosen_families = [f for f in families if f is not Family.INET]
    chosen_protocols = list(protocols)
    if not chosen_families or not chosen_protocols:
        raise ValueError("expected at least one family and one protocol")
    origins = [True, False] if local is None else [local]
    return _connections(environment, tuple(chosen_families), tuple(origins), tuple(chosen_protocols))


@st.composite
def _connections(
    draw: st.DrawFn,
    env: Environment,
    families: tuple[Family, ...],
    origins: tuple[bool, ...],
    protocols: tuple[Protocol, ...],
) -> Connection:
    family = draw(st.sampled_from(families))
    protocol = draw(st.sampled_from(protocols)) if Protocol.TCP not in protocols else _tcp_mostly(draw, protocols)
    if protocol is Protocol.ICMP and family is Family.IPV6:
        protocol = Protocol.ICMPV6
    ported = protocol in (Protocol.TCP, Protocol.UDP, Protocol.SCTP)
    sport = draw(st.one_of(st.just(43210), ports())) if ported else 0
    dport = draw(_ports(env)) if ported else 0
    dst = draw(_addresses(env, family))
    if draw(st.sampled_from(origins)):
        return _local(draw, env, family=family, protocol=protocol, dst=dst, sport=sport, dport=dport)
    names = [n for n in env.interface_names if n != LOOPBACK_INTERFACE]
    src = draw(_addresses(env, family).filter(lambda a: not (env.is_local(a) or env.is_loopback(a))))
    return Connection.remote(
        src=src, dst=dst, dport=dport, sport=sport, iif=draw(st.sampled_from(names)), protocol=protocol
    )


def _tcp_mostly(draw: st.DrawFn, protocols: tuple[Protocol, ...]) -> Protocol:
    if len(protocols) == 1 or draw(st.integers(0, 3)) > 0:
        return Protocol.TCP
    return draw(st.sampled_from(protocols))


def _local(
    draw: st.DrawFn, env: Environment, *, family: Family, protocol: Protocol, dst: IPAddress, sport: int, dport: int
) -> Connection:
    proxy = env.proxy
    who = draw(st.sampled_from(["app", "app", "proxy", "proxy-uid", "proxy-gid", "no socket", "other"]))
    uid: int | None
    gid: int | None
    if who == "app":
        uid, gid = DEFAULT_APP_UID, DEFAULT_APP_GID
    elif who == "proxy":
        uid, gid = proxy.uid, proxy.gid
    elif who == "proxy-uid":
        uid, gid = proxy.uid, DEFAULT_APP_GID
    elif who == "proxy-gid":
        uid, gid = DEFAULT_APP_UID, proxy.gid
    elif who == "no socket":
        uid = gid = None
    else:
        ids = st.one_of(st.sampled_from((proxy.uid, proxy.gid, *_APP_IDS)), st.integers(0, 2**31))
        uid, gid = draw(ids), draw(ids)
    # the TPROXY mark, the lo hairpin's mark after it, and the marks the routes send to lo
    marks = [0, 0, 0, proxy.tproxy_mark, proxy.tproxy_mark + 1, *(route.value for route in env.local_marks)]
    mark = draw(st.one_of(st.sampled_from(marks), st.integers(0, 2**32 - 1)))
    src: IPAddress | None = None
    if draw(st.integers(0, 4)) == 0:
        src = proxy.passthrough_for(family) if draw(st.booleans()) else draw(_addresses(env, family))
        own = [
            a.ip for i in env.interfaces for a in i.addresses if a.version == family.version and not a.ip.is_loopback
        ]
        if src == proxy.passthrough_for(family) and own and draw(st.booleans()):
            dst = draw(st.sampled_from(own))  # the proxy's inbound passthrough to the app, over lo
    return Connection.local(
        env, dst=dst, dport=dport, src=src, sport=sport, uid=uid, gid=gid, protocol=protocol, mark=mark
    )


# ----------------------------------------------------------------------------- rulesets


@attrs.frozen(kw_only=True)
class RulesetCase:
    """A drawn ruleset, the policy it was compiled from, the pod it runs in, and how it was broken (if it was).

    What :func:`rulesets` yields:

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None)
    ... @given(rulesets(policies(base=Policy(), vary=["inbound_mode"])))
    ... def test(case):
    ...     assert case.mutation is None and case.ruleset == compile_policy(case.policy)
    ...     assert case.env.proxy.outbound_port == case.policy.outbound_port
    >>> test()
    """

    policy: Policy
    ruleset: Ruleset
    env: Environment
    #: None for the compiled ruleset as it is.
    mutation: Mutation | None = None


def rulesets(
    policies: st.SearchStrategy[Policy] | None = None, *, mutations: Iterable[Mutation] | None = None
) -> st.SearchStrategy[RulesetCase]:
    """Rulesets compiled from drawn policies; with ``mutations``, broken by one of those that applies.

    A mutation is drawn among the given ones that change the compiled ruleset;
    when none does, :attr:`Mutation.REDIRECT_ALL <meshredirect.testing.mutations.Mutation.REDIRECT_ALL>`
    (which always does) is used. Whether the damage shows depends on the policy
    (see :mod:`meshredirect.testing.mutations`).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None)
    ... @given(rulesets(policies(base=Policy(), vary=["outbound_ports_exclude"]), mutations=[Mutation.SWAP_LISTENERS]))
    ... def test(case):
    ...     assert case.mutation is Mutation.SWAP_LISTENERS and case.ruleset != compile_policy(case.policy)
    >>> test()

    Feed such cases to a checker: it must fail on each (a checker that does not is broken).
    """
    source = policies if policies is not None else _policies(None, None, {})
    wanted = tuple(mutations) if mutations is not None else None
    return _rulesets(source, wanted)


@st.composite
def _rulesets(
    draw: st.DrawFn, source: st.SearchStrategy[Policy], mutations: tuple[Mutation, ...] | None
) -> RulesetCase:
    policy = draw(source)
    env = Environment.for_policy(policy)
    ruleset = compile_policy(policy)
    if mutations is None:
        return RulesetCase(policy=policy, ruleset=ruleset, env=env.covering(ruleset))
    possible = [m for m in applicable(ruleset, env.proxy) if m in mutations] or [Mutation.REDIRECT_ALL]
    mutation = draw(st.sampled_from(possible))
    broken = mutate(ruleset, mutation, env.proxy)
    return RulesetCase(policy=policy, ruleset=broken, env=env.covering(broken), mutation=mutation)
