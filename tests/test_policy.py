"""The policy model: defaults, conversions, and every refusal with its pinned message."""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from hypothesis import given

from meshredirect.errors import PolicyError, UnsafePolicyError
from meshredirect.ir import Family
from meshredirect.policy import DnsCapture, InterceptionMode, Policy
from meshredirect.presets import preset
from meshredirect.testing.strategies import policies
from meshredirect.values import ALL, AddressSet, IdSet, PortSet


def test_default_is_istio_production() -> None:
    p = Policy()
    assert (p.outbound_port, p.inbound_port, p.inbound_tunnel_port) == (15001, 15006, 15008)
    assert p.proxy_uids == IdSet.of(1337) and p.proxy_gids == IdSet.of(1337)
    assert p.inbound_mode is InterceptionMode.REDIRECT
    assert p.inbound_ports is ALL and p.outbound_cidrs is ALL
    assert p.inbound_ports_exclude == PortSet.of(15090, 15021, 15020)
    assert p.outbound_cidrs_exclude == AddressSet(())
    assert p.families == frozenset({Family.IPV4})


def test_conversions() -> None:
    p = Policy(
        inbound_ports="80, 443,,8000-8002",
        proxy_uids="1337,1338",
        outbound_cidrs_exclude="10.0.0.0/8,10.1.0.0/16,",
        families="both",
        inbound_mode="tproxy",
        exclude_interfaces="eth1,eth1",
    )
    assert p.inbound_ports == PortSet.of(80, 443, (8000, 8002))
    assert p.proxy_uids == IdSet.of((1337, 1338))
    assert p.outbound_cidrs_exclude == AddressSet.of("10.0.0.0/8")
    assert p.families == frozenset({Family.IPV4, Family.IPV6})
    assert p.inbound_mode is InterceptionMode.TPROXY
    assert p.exclude_interfaces == ("eth1",)
    assert Policy(inbound_ports="").inbound_ports == PortSet(())
    assert Policy(inbound_ports_exclude=[22, (100, 200)]).inbound_ports_exclude == PortSet.of(22, (100, 200))


INVALID = [
    ({"outbound_port": 0}, "outbound_port: expected a port number 1-65535, got 0"),
    ({"inbound_port": 70000}, "inbound_port: expected a port number 1-65535, got 70000"),
    ({"inbound_port": "http"}, "inbound_port: expected a port number 1-65535, got 'http'"),
    ({"inbound_tunnel_port": True}, "inbound_tunnel_port: expected a port number 1-65535, got True"),
    ({"inbound_ports": "80,abc"}, "inbound_ports: expected a port number 1-65535, got 'abc'"),
    (
        {"inbound_ports_exclude": "90-80"},
        "inbound_ports_exclude: expected a range low-high with low <= high, got '90-80'",
    ),
    ({"outbound_ports": "65536"}, "outbound_ports: expected a port number 1-65535, got '65536'"),
    ({"proxy_uids": "x"}, "proxy_uids: expected a numeric id 0-4294967294, got 'x'"),
    ({"proxy_gids": [-1]}, "proxy_gids: expected a numeric id 0-4294967294, got -1"),
    ({"inbound_mode": "MASQUERADE"}, "inbound_mode: expected REDIRECT or TPROXY, got 'MASQUERADE'"),
    ({"tproxy_mark": 0}, "tproxy_mark: expected a mark 1-4294967294, got 0"),
    ({"tproxy_route_table": "main"}, "tproxy_route_table: expected a route table number 1-4294967295, got 'main'"),
    (
        {"tproxy_route_table": 254},
        "tproxy_route_table: expected a route table number other than 0, 253 (default), 254 (main), 255 (local), got 254",
    ),
    (
        {"outbound_cidrs_exclude": "10.0.0.300/8"},
        "outbound_cidrs_exclude: expected an IPv4 or IPv6 address or CIDR, got '10.0.0.300/8'",
    ),
    ({"outbound_cidrs": "10.0.0.0/33"}, "outbound_cidrs: expected an IPv4 or IPv6 address or CIDR, got '10.0.0.0/33'"),
    (
        {"exclude_interfaces": "eth 0"},
        "exclude_interfaces: expected an interface name of 1-15 characters (letters, digits, '_.@:-', optional trailing '+'), got 'eth 0'",
    ),
    (
        {"reroute_interfaces": "a-very-long-interface"},
        "reroute_interfaces: expected an interface name of 1-15 characters (letters, digits, '_.@:-', optional trailing '+'), got 'a-very-long-interface'",
    ),
    ({"families": "ipv5"}, "families: expected ipv4, ipv6 or both, got 'ipv5'"),
    ({"families": ""}, "families: expected at least one of ipv4, ipv6, got 'none'"),
    (
        {"owner_groups_include": "bad group"},
        "owner_groups_include: expected a group name or a numeric gid, got 'bad group'",
    ),
    ({"owner_groups_include": []}, "owner_groups_include: expected '*' or at least one group, got 'an empty list'"),
    (
        {"loopback_cidr": "10.0.0.0/8"},
        "loopback_cidr: expected an IPv4 CIDR inside 127.0.0.0/8 that holds 127.0.0.1, got '10.0.0.0/8'",
    ),
    (
        {"loopback_cidr": "127.0.0.2/32"},
        "loopback_cidr: expected an IPv4 CIDR inside 127.0.0.0/8 that holds 127.0.0.1, got '127.0.0.2/32'",
    ),
    ({"loopback_capture": "some"}, "loopback_capture: expected proxy or all or none, got 'some'"),
    ({"passthrough_ipv4": "::6"}, "passthrough_ipv4: expected an IPv4 address, got '::6'"),
    (
        {"chain_prefix": "1ISTIO"},
        "chain_prefix: expected a name of 1-16 characters: a letter, then letters, digits, '_' or '-', got '1ISTIO'",
    ),
    (
        {"chain_prefix": "A" * 17},
        "chain_prefix: expected a name of 1-16 characters: a letter, then letters, digits, '_' or '-', got 'AAAAAAAAAAAAAAAAA'",
    ),
    ({"drop_invalid": "maybe"}, "drop_invalid: expected true or false, got 'maybe'"),
    ({"dns": True}, "dns: expected a DnsCapture (or a mapping of its fields), got True"),
]


@pytest.mark.parametrize(
    ("fields", "message"), INVALID, ids=[next(iter(f)) + str(i) for i, (f, _) in enumerate(INVALID)]
)
def test_invalid_values_name_field_expected_and_given(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy(**fields)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert info.value.field.split(".")[0] in message


REFUSED = [
    (
        {"proxy_uids": "0"},
        "proxy_uids: refused: uid 0 (root) would exempt every root process from capture, a mesh bypass (given: 0)",
    ),
    (
        {"proxy_gids": [0, 1337]},
        "proxy_gids: refused: gid 0 (root) would exempt every root-group process from capture, a mesh bypass (given: 0)",
    ),
    (
        {"proxy_uids": "", "proxy_gids": ""},
        "proxy_uids: refused: with no proxy uid and no proxy gid the proxy's own connections are captured again: a loop (given: 'none')",
    ),
    (
        {"inbound_port": 15001},
        "inbound_port: refused: the proxy's listeners need distinct ports; outbound_port is 15001 too (given: 15001)",
    ),
    (
        {"inbound_tunnel_port": 15006},
        "inbound_tunnel_port: refused: the proxy's listeners need distinct ports; inbound_port is 15006 too (given: 15006)",
    ),
    (
        {"inbound_ports": "8080", "inbound_ports_exclude": "8000-9000"},
        "inbound_ports: refused: captured ports inside the excluded ports 8000-9000 (the exclusion would win and nothing would be captured for them) (given: '8080')",
    ),
    (
        {"inbound_ports": "15008"},
        "inbound_ports: refused: the tunnel port is never captured inbound, it cannot be listed for capture (given: 15008)",
    ),
    (
        {"outbound_ports": "443", "outbound_ports_exclude": "400-500"},
        "outbound_ports: refused: captured ports inside the excluded ports 400-500 (given: '443')",
    ),
    (
        {"inbound_ports_exclude": "*"},
        "inbound_ports_exclude: refused: '*' in an exclude list would exclude everything (given: '*')",
    ),
    (
        {"outbound_cidrs_exclude": "*"},
        "outbound_cidrs_exclude: refused: '*' in an exclude list would exclude everything (given: '*')",
    ),
    (
        {"outbound_ports_exclude": "*"},
        "outbound_ports_exclude: refused: '*' in an exclude list would exclude everything (given: '*')",
    ),
    (
        {"owner_groups_exclude": "*"},
        "owner_groups_exclude: refused: '*' in an exclude list would exclude everything (given: '*')",
    ),
    (
        {"outbound_cidrs": "10.0.0.0/8,*"},
        "outbound_cidrs: refused: '*' must stand alone, not inside a list (given: '10.0.0.0/8,*')",
    ),
    (
        {"outbound_cidrs": "127.0.0.0/8"},
        "outbound_cidrs: refused: a loopback range included for outbound capture sends the proxy's local connections back to itself: a known loop (given: '127.0.0.0/8')",
    ),
    (
        {"outbound_cidrs": "0.0.0.0/0"},
        "outbound_cidrs: refused: a loopback range included for outbound capture sends the proxy's local connections back to itself: a known loop (given: '0.0.0.0/0')",
    ),
    (
        {"outbound_cidrs": "::/0"},
        "outbound_cidrs: refused: a loopback range included for outbound capture sends the proxy's local connections back to itself: a known loop (given: '::/0')",
    ),
    (
        {"owner_groups_include": "101", "owner_groups_exclude": "102"},
        "owner_groups_exclude: refused: owner groups can be included or excluded, not both (given: '102')",
    ),
    (
        {"exclude_interfaces": "eth1", "reroute_interfaces": "eth1"},
        "reroute_interfaces: refused: an interface cannot be both excluded and rerouted (given: 'eth1')",
    ),
]


@pytest.mark.parametrize(("fields", "message"), REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_dangerous_combinations_are_refused_with_the_reason(fields: dict[str, object], message: str) -> None:
    with pytest.raises(UnsafePolicyError) as info:
        Policy(**fields)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_dns_without_servers_is_refused() -> None:
    with pytest.raises(UnsafePolicyError) as info:
        DnsCapture(enabled=True)
    assert str(info.value) == (
        "dns.servers: refused: DNS capture is enabled but names no server and capture_all is off, "
        "so it would capture nothing (given: 'no servers')"
    )
    with pytest.raises(UnsafePolicyError, match="listeners need distinct ports; outbound_port"):
        Policy(dns=DnsCapture(enabled=True, capture_all=True, port=15001))


def test_evolve_validates_again() -> None:
    with pytest.raises(UnsafePolicyError):
        attrs.evolve(Policy(), proxy_uids=[0])


def test_presets() -> None:
    old = preset("istio-1.4")
    assert old.inbound_tunnel_port is None and old.inbound_ports_exclude == PortSet.of(22, 15020)
    with pytest.raises(PolicyError, match="did you mean 'istio'"):
        preset("itsio")


@given(policies())
def test_generated_policies_are_valid_and_stable_under_evolve(policy: Policy) -> None:
    assert attrs.evolve(policy) == policy
    assert policy.proxy_uids or policy.proxy_gids
    assert ipaddress.ip_address("127.0.0.1") in policy.loopback_cidr
