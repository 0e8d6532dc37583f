"""The policy file language: every statement and clause, pinned errors, print/parse round trip, fuzzing."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

from meshredirect.errors import MeshRedirectError, SourceError
from meshredirect.frontends.policy_file import _parser, format_file, format_policy, parse_policy, parse_statements
from meshredirect.ir import Family
from meshredirect.policy import DnsCapture, InterceptionMode, LoopbackCapture, Policy
from meshredirect.presets import PRESETS, preset
from meshredirect.testing.strategies import policies
from meshredirect.values import ALL, AddressSet, IdSet, PortSet

# ----------------------------------------------------------------------------- every statement and clause

CLAUSES: list[tuple[str, Callable[[Policy], bool]]] = [
    ("preset linkerd", lambda p: p == preset("linkerd")),
    ("proxy uid 1400, 2000-2010", lambda p: p.proxy_uids == IdSet.of(1400, (2000, 2010))),
    ("proxy gid none uid 5", lambda p: p.proxy_gids == IdSet(()) and p.proxy_uids == IdSet.of(5)),
    ("inbound capture 16006", lambda p: p.inbound_port == 16006),
    ("inbound ports 80, 443, 8000-8080", lambda p: p.inbound_ports == PortSet.of(80, 443, (8000, 8080))),
    ("inbound ports *", lambda p: p.inbound_ports is ALL),
    ("inbound ports none", lambda p: p.inbound_ports == PortSet(())),
    ("inbound except ports 22", lambda p: p.inbound_ports_exclude == PortSet.of(22)),
    ("inbound except ports none", lambda p: p.inbound_ports_exclude == PortSet(())),
    ("inbound tunnel none", lambda p: p.inbound_tunnel_port is None),
    ("inbound tunnel 15009", lambda p: p.inbound_tunnel_port == 15009),
    (
        "inbound mode tproxy mark 0x100 table 200",
        lambda p: (p.inbound_mode, p.tproxy_mark, p.tproxy_route_table) == (InterceptionMode.TPROXY, 256, 200),
    ),
    ("inbound mode redirect", lambda p: p.inbound_mode is InterceptionMode.REDIRECT),
    ("outbound capture 16001", lambda p: p.outbound_port == 16001),
    ("outbound cidr 10.0.0.0/8, fd00::/8", lambda p: p.outbound_cidrs == AddressSet.of("10.0.0.0/8", "fd00::/8")),
    ("outbound cidr none", lambda p: p.outbound_cidrs == AddressSet(())),
    ("outbound cidr *", lambda p: p.outbound_cidrs is ALL),
    ("outbound also ports 3306", lambda p: p.outbound_ports == PortSet.of(3306)),
    (
        "outbound except cidr 10.96.0.0/12, 169.254.169.254",
        lambda p: p.outbound_cidrs_exclude == AddressSet.of("10.96.0.0/12", "169.254.169.254/32"),
    ),
    ("outbound except ports 5432, 6379", lambda p: p.outbound_ports_exclude == PortSet.of(5432, 6379)),
    (
        "dns capture 15053 servers 10.96.0.10, fd00::a",
        lambda p: p.dns == DnsCapture(enabled=True, servers=["10.96.0.10", "fd00::a"]),
    ),
    ("dns capture 15054 all", lambda p: p.dns == DnsCapture(enabled=True, capture_all=True, port=15054)),
    ("dns off", lambda p: p.dns == DnsCapture()),
    (
        "dns off port 15055 all servers 10.0.0.1",
        lambda p: p.dns == DnsCapture(port=15055, capture_all=True, servers=["10.0.0.1"]),
    ),
    (
        "interfaces exclude eth1, veth+ reroute net1",
        lambda p: (p.exclude_interfaces, p.reroute_interfaces) == (("eth1", "veth+"), ("net1",)),
    ),
    ('interfaces exclude "none"', lambda p: p.exclude_interfaces == ("none",)),
    ("interfaces exclude none", lambda p: p.exclude_interfaces == ()),
    ("groups include java, 202", lambda p: p.owner_groups_include == ("java", 202)),
    ("groups include *", lambda p: p.owner_groups_include is ALL),
    ("groups exclude 888, ftp", lambda p: p.owner_groups_exclude == (888, "ftp")),
    (
        "loopback cidr 127.0.0.0/8 capture all",
        lambda p: str(p.loopback_cidr) == "127.0.0.0/8" and p.loopback_capture is LoopbackCapture.ALL,
    ),
    ("loopback capture none", lambda p: p.loopback_capture is LoopbackCapture.NONE),
    ("loopback capture proxy", lambda p: p.loopback_capture is LoopbackCapture.PROXY),
    (
        "passthrough 127.0.0.7, ::7",
        lambda p: (str(p.passthrough_ipv4), str(p.passthrough_ipv6)) == ("127.0.0.7", "::7"),
    ),
    ("passthrough ::8", lambda p: str(p.passthrough_ipv6) == "::8" and str(p.passthrough_ipv4) == "127.0.0.6"),
    ("families ipv4, ipv6", lambda p: p.families == frozenset({Family.IPV4, Family.IPV6})),
    ("families ipv6", lambda p: p.families == frozenset({Family.IPV6})),
    ("drop invalid", lambda p: p.drop_invalid),
    ("drop invalid off", lambda p: not p.drop_invalid),
    ("chains prefix MESH", lambda p: p.chain_prefix == "MESH"),
    ("layout one-rule-per-port", lambda p: p.one_rule_per_port),
    ("layout multiport", lambda p: not p.one_rule_per_port),
]


@pytest.mark.parametrize(("text", "check"), CLAUSES, ids=[t for t, _ in CLAUSES])
def test_every_statement_and_clause(text: str, check: Callable[[Policy], bool]) -> None:
    policy = parse_policy(text + "  # a comment\n")
    assert check(policy)
    assert parse_policy(format_policy(policy)) == policy
    assert parse_policy(format_file(text)) == policy


def test_every_clause_of_the_grammar_is_exercised() -> None:
    exercised = {clause for text, _ in CLAUSES for clause in _clauses_of(text)}
    grammar_rules = {r.origin.name for r in _parser().rules}
    clause_rules = {str(name) for name in grammar_rules if "_" in str(name) and not str(name).startswith("_")}
    clause_rules -= {"ports_or_all", "addresses_or_all"}
    assert clause_rules <= exercised, clause_rules - exercised


def _clauses_of(text: str) -> set[str]:
    tree = _parser().parse(text + "\n")
    return {str(sub.data) for sub in tree.iter_subtrees()}


def test_empty_file_and_comments_are_the_default_policy() -> None:
    assert parse_policy("") == Policy()
    assert parse_policy("# nothing here\n\n   # at all\n") == Policy()


def test_a_statement_may_be_split_and_implications_give_way() -> None:
    assert parse_policy("dns all\ndns capture 15053 servers 10.0.0.1\n").dns.capture_all
    assert not parse_policy("dns capture 15053\ndns servers 10.0.0.1\n").dns.capture_all
    with pytest.raises(SourceError, match="dns all is already set on line 1"):
        parse_policy("dns all\ndns all capture 15053\n")


def test_preset_is_the_base_and_later_statements_change_it() -> None:
    policy = parse_policy("preset linkerd\noutbound except cidr 10.96.0.0/12\n")
    assert policy == attrs.evolve(preset("linkerd"), outbound_cidrs_exclude="10.96.0.0/12")


# ----------------------------------------------------------------------------- errors, pinned

ERRORS = [
    (
        "outbund capture 15001\n",
        "p.policy:1:1: unexpected 'outbund': expected a statement: chains, dns, drop, families, groups, inbound, "
        "interfaces, layout, loopback, outbound, passthrough, preset, proxy (did you mean 'outbound'?)\n"
        "    outbund capture 15001\n    ^",
    ),
    (
        "inbound mode tproxi\n",
        "p.policy:1:14: unexpected 'tproxi': expected one of: redirect, tproxy (did you mean 'tproxy'?)\n"
        "    inbound mode tproxi\n                 ^",
    ),
    (
        "proxy uid 1337 gdi 5\n",
        "p.policy:1:16: unexpected 'gdi': expected one of: ',', gid, uid, the end of the line (did you mean 'gid'?)\n"
        "    proxy uid 1337 gdi 5\n                   ^",
    ),
    (
        "outbound except cidr\n",
        "p.policy:1:21: unexpected the end of the line: expected one of: none, an IP address or CIDR\n"
        "    outbound except cidr\n                        ^",
    ),
    (
        "inbound capture 70000\n",
        "p.policy:1:17: inbound capture: expected a port number 1-65535, got 70000\n"
        "    inbound capture 70000\n                    ^",
    ),
    (
        "outbound except ports 5432, 6379-6000\n",
        "p.policy:1:29: outbound except ports: expected a range low-high with low <= high, got '6379-6000'\n"
        "    outbound except ports 5432, 6379-6000\n                                ^",
    ),
    (
        "outbound cidr 10.0.0.0/33\n",
        "p.policy:1:15: outbound cidr: expected an IPv4 or IPv6 address or CIDR, got '10.0.0.0/33'\n"
        "    outbound cidr 10.0.0.0/33\n                  ^",
    ),
    (
        "# root\nproxy uid 0\n",
        "p.policy:2:7: proxy uid: refused: uid 0 (root) would exempt every root process from capture, a mesh bypass "
        "(given: 0)\n    proxy uid 0\n          ^",
    ),
    (
        "inbound capture 15006\ninbound capture 15007\n",
        "p.policy:2:9: inbound capture is already set on line 1\n    inbound capture 15007\n            ^",
    ),
    (
        "inbound capture 15006 capture 15007\n",
        "p.policy:1:23: inbound capture is already set in this statement (column 9)\n"
        "    inbound capture 15006 capture 15007\n                          ^",
    ),
    (
        "drop invalid\npreset kuma\n",
        "p.policy:2:8: preset: expected the preset as the first statement (what follows changes it)\n"
        "    preset kuma\n           ^",
    ),
    (
        "preset linkred\n",
        "p.policy:1:8: preset: expected one of istio, istio-1.4, kuma, linkerd (did you mean 'linkerd'?), got "
        "'linkred'\n    preset linkred\n           ^",
    ),
    (
        "dns capture 15053\n",
        "p.policy:1:5: dns servers: refused: DNS capture is enabled but names no server and capture_all is off, so "
        "it would capture nothing (given: 'no servers')\n    dns capture 15053\n        ^",
    ),
    (
        "preset linkerd\ninbound capture 4140\n",
        "p.policy:2:9: inbound capture: refused: the proxy's listeners need distinct ports; outbound_port is 4140 "
        "too (given: 4140)\n    inbound capture 4140\n            ^",
    ),
    (
        "preset kuma\ninbound ports 80\nproxy uid none\n",
        "p.policy:3:7: proxy uid: refused: with no proxy uid and no proxy gid the proxy's own connections are "
        "captured again: a loop (given: 'none')\n    proxy uid none\n          ^",
    ),
    (
        "passthrough 127.0.0.6, 127.0.0.7\n",
        "p.policy:1:24: passthrough: expected one IPv4 address, got a second\n"
        "    passthrough 127.0.0.6, 127.0.0.7\n                           ^",
    ),
    (
        "families ipv4, ipv4\n",
        "p.policy:1:16: families: ipv4 is listed twice\n    families ipv4, ipv4\n                   ^",
    ),
    (
        "chains prefix 1abc\n",
        "p.policy:1:15: chains prefix: expected a name of 1-16 characters: a letter, then letters, digits, '_' or "
        "'-', got '1abc'\n    chains prefix 1abc\n                  ^",
    ),
    (
        "outbound $\n",
        "p.policy:1:10: unexpected '$': expected one of: also, capture, cidr, except\n    outbound $\n             ^",
    ),
    (
        "interfaces exclude eth0 reroute eth0\n",
        "p.policy:1:25: interfaces reroute: refused: an interface cannot be both excluded and rerouted (given: "
        "'eth0')\n    interfaces exclude eth0 reroute eth0\n                            ^",
    ),
    (
        "interfaces exclude eth0/1\n",
        "p.policy:1:24: unexpected '/1': expected one of: ',', exclude, reroute, the end of the line\n"
        "    interfaces exclude eth0/1\n                           ^",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_say_where_what_and_what_was_meant(text: str, message: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_policy(text, path="p.policy")
    assert str(info.value) == message


def test_inherited_values_are_named_as_such() -> None:
    with pytest.raises(SourceError) as info:
        parse_policy("preset linkerd\nproxy uid none\n", path="p.policy")
    assert str(info.value).startswith("p.policy:2:7: proxy uid: refused: with no proxy uid and no proxy gid")
    with pytest.raises(SourceError) as info:
        parse_policy("preset istio\ninbound ports 15020\n", path="p.policy")
    assert str(info.value).startswith("p.policy:2:9: inbound ports: refused: captured ports inside the excluded ports")


# ----------------------------------------------------------------------------- print / parse


def round_trips(policy: Policy, printer: Callable[[Policy], str] = format_policy) -> bool:
    return parse_policy(printer(policy)) == policy


@settings(max_examples=100)
@given(policies())
def test_print_then_parse_gives_the_same_policy(policy: Policy) -> None:
    assert round_trips(policy)


def test_the_round_trip_check_catches_a_printer_that_drops_a_clause() -> None:
    policy = Policy(outbound_cidrs_exclude="10.96.0.0/12", drop_invalid=True)
    assert round_trips(policy)
    broken = lambda p: "\n".join(line for line in format_policy(p).splitlines() if not line.startswith("drop"))  # noqa: E731
    assert not round_trips(policy, broken)


def test_presets_print_as_themselves() -> None:
    for name in PRESETS:
        assert format_policy(preset(name)) == f"preset {name}\n"
    assert format_policy(Policy(drop_invalid=True), base="kuma").startswith("preset kuma\n")


@settings(max_examples=40)
@given(policies())
def test_formatting_a_printed_file_changes_nothing(policy: Policy) -> None:
    text = format_policy(policy)
    assert format_file(text) == text


def test_format_file_keeps_comments_and_normalises() -> None:
    text = (
        "\n\n# the mesh\npreset istio   # base\n\n\n\noutbound except ports 6379,5432 capture 15001\n"
        'interfaces exclude "none", eth2 # two\n  # trailing\n\n'
    )
    formatted = format_file(text)
    assert formatted == (
        "# the mesh\npreset istio  # base\n\noutbound capture 15001 except ports 5432, 6379\n"
        'interfaces exclude "none", eth2  # two\n# trailing\n'
    )
    assert parse_policy(formatted) == parse_policy(text)
    assert format_file(formatted) == formatted


def test_comments_are_found_outside_quoted_names() -> None:
    from meshredirect.frontends.policy_file import _comment_of

    assert _comment_of('groups include "a#b", c  # real ') == "# real"
    assert _comment_of("drop invalid") == ""


def test_format_file_reports_errors_like_the_parser() -> None:
    with pytest.raises(SourceError, match=r"^f:1:9: inbound capture: refused"):
        format_file("inbound capture 15001\n", path="f")


# ----------------------------------------------------------------------------- fuzzing


def _explicit() -> dict[str, st.SearchStrategy[str]]:
    """Generated terminals, padded with spaces so neighbouring tokens stay apart; some values are invalid."""
    ports = st.integers(0, 70000).map(str)
    names = st.sampled_from(["eth0", "veth+", "net1", "java", "202", "none", "a.b-c", "x$", "1337"])
    explicit: dict[str, st.SearchStrategy[str]] = {
        "FAMILY": st.sampled_from(["ipv4", "ipv6"]),
        "PORTS": st.one_of(ports, st.tuples(ports, ports).map("-".join)),
        "PORT": ports,
        "NUMBER": st.one_of(st.integers(0, 2**33).map(str), st.integers(0, 2**33).map(hex), st.just("0123")),
        "ADDRESS": st.sampled_from(
            ["10.0.0.0/8", "127.0.0.1/32", "127.0.0.6", "::6", "fd00::/8", "10.0.0.300", "1.2.3.4/40", "::", "a:"]
        ),
        "NAME": st.sampled_from(["istio", "istio-1.4", "linkerd", "kuma", "MESH", "1abc", "ISTIO"]),
        "WORD": names,
        "STRING": names.map(lambda n: f'"{n}"'),
        # from_lark puts ignored tokens anywhere, mid-line too, where a comment would swallow the rest of the
        # statement; comments are tested on their own above.
        "COMMENT": st.just(" "),
        "_NL": st.just("\n"),
    }
    for term in _parser().terminals:
        if term.pattern.type == "str":
            explicit[term.name] = st.just(f" {term.pattern.value} ")
        else:
            explicit[term.name] = explicit.get(term.name, st.just(" ")).map(lambda s: f" {s} ")
    return explicit


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(from_lark(_parser(), explicit=_explicit()))
def test_generated_files_give_a_policy_or_a_typed_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except SourceError:
        return
    assert isinstance(policy, Policy)
    assert parse_policy(format_policy(policy)) == policy
    assert parse_policy(format_file(text)) == policy


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list('inbound outcapture15006,*#\n"-:./ab$')), max_size=60) | st.text())
def test_random_text_gives_a_policy_or_a_typed_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except MeshRedirectError:
        return
    assert isinstance(policy, Policy)


def test_statements_keep_their_positions() -> None:
    statements = parse_statements("# c\n\ninbound capture 15006 ports 80\n")
    assert [(s.keyword, s.line, s.column) for s in statements] == [("inbound", 3, 1)]
    assert [(x.field, x.column) for x in statements[0].settings] == [("inbound_port", 9), ("inbound_ports", 23)]
