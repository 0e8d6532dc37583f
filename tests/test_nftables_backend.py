"""The nftables lowering: every IR node's form or refusal, the layout, and the pure round trip through the reader.

The kernel's agreement with all of this is in tests/kernel/test_nftables_load.py.
"""

from __future__ import annotations

import ipaddress
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshredirect.api import render
from meshredirect.compiler import compile_policy
from meshredirect.errors import PolicyError, UnsupportedError
from meshredirect.ir import (
    Accept,
    AddressMatch,
    Chain,
    CtState,
    CtStateMatch,
    Direction,
    Drop,
    Family,
    FamilyMatch,
    Goto,
    Hook,
    InterfaceMatch,
    Jump,
    Match,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Reject,
    Return,
    Rule,
    Ruleset,
    Snat,
    Table,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
    iptables_base_chain,
)
from meshredirect.policy import Policy
from meshredirect.readers.nftables import read_nft_json
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS, TARGET_PLACES, coverage_gaps
from meshredirect.testing.strategies import policies
from meshredirect.values import AddressSet, IdSet, PortSet
from meshredirect_nftables import PRIORITY_OFFSET, TPROXY_DROP_COMMENT, NftablesJsonBackend, NftLowering
from meshredirect_nftables.lowering import merge_lookups
from meshredirect_nftables.text import statement_text

LOWERING = NftLowering()
MATCHES = [m for items in SAMPLE_MATCHES.values() for m in items]
TARGETS = [t for items in SAMPLE_TARGETS.values() for t in items]

EXPECTED_MATCHES = [
    "meta l4proto tcp", "meta l4proto != udp", "", "ip saddr 127.0.0.6", "ip daddr != 127.0.0.0/8",
    "ip daddr { 10.0.0.0/8, 192.168.1.0/24 }", "tcp dport != 15008", "udp sport 15053",
    "tcp dport { 22, 15020-15021, 15090 }", "tcp dport 8000-9000", 'oifname "lo"', 'iifname != "eth*"',
    "meta skuid 1337",
    "refused: meta skuid/skgid never match a packet without a socket; this match must (socketless=True)",
    "meta skuid 3-4", "meta mark 0x539", "meta mark & 0xff != 0x53a", "ct mark 0x539",
    "ct state { established, related }", "ct state != invalid", "fib daddr type local",
    "refused: nftables cannot see ipsets; use an nft set",
    "refused: xt_statistic's counters and random test have no exact nft form",
    "refused: xt_statistic's counters and random test have no exact nft form",
    "refused: an unknown iptables match has no nftables form",
]  # fmt: skip
EXPECTED_TARGETS = [
    "accept", "drop", "return", "", "jump mangle-MESH_NEXT", "goto mangle-MESH_NEXT",
    "meta l4proto tcp redirect to :15001", "meta l4proto tcp redirect", "meta l4proto tcp redirect to :15001 random",
    "meta l4proto tcp tproxy to :15006 meta mark set 0x539 accept | meta l4proto tcp drop",
    "meta l4proto tcp tproxy to 127.0.0.1:15006 meta mark set meta mark & 0xfffffffe ^ 0x1 accept"
    " | meta l4proto tcp drop",
    "meta mark set 0x53a", "meta mark set meta mark & 0xffffbfff ^ 0x4000", "ct mark set meta mark",
    "meta mark set ct mark", "ct mark set 0x7", "ct zone set 2", "meta l4proto tcp masquerade",
    "meta l4proto tcp masquerade to :1024-2048", "meta l4proto tcp masquerade fully-random", "snat to 10.0.0.1",
    "snat to 10.0.0.1-10.0.0.4 random,fully-random,persistent", "meta l4proto tcp dnat to 10.244.1.5:8080",
    "meta l4proto tcp dnat to 10.244.1.5:8080 random,persistent",
    "reject with icmp type port-unreachable", "meta l4proto tcp reject with tcp reset", 'log prefix "mesh: "',
    "log level info", "refused: an unknown iptables target has no nftables form",
]  # fmt: skip


def sample_table(rule: Rule, place: tuple[str, Hook]) -> Ruleset:
    """One rule in the built-in chain of an iptables-shaped table, plus a chain to jump to."""
    name, hook = place
    chains = (
        Chain(name=hook.value, rules=(rule,), base=iptables_base_chain(name, hook)),
        Chain(name="MESH_NEXT", rules=(Rule(target=Return()),)),
    )
    return Ruleset(tables=(Table(family=Family.IPV4, name=name, chains=chains),))


def lowered(rule: Rule, place: tuple[str, Hook]) -> str:
    """The nft text of the rules one IR rule becomes (``|`` between rules), or the refusal."""
    try:
        commands = LOWERING.commands(sample_table(rule, place))[Family.IPV4]
    except UnsupportedError as exc:
        assert exc.backend == "nftables"
        return f"refused: {exc.reason}"
    chain = f"{place[0]}-{place[1].value}"
    rules = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]
    return " | ".join(" ".join(statement_text(s) for s in r["expr"]) for r in rules)


def match_place(match: Match) -> tuple[str, Hook]:
    incoming = isinstance(match, InterfaceMatch) and match.direction is Direction.SOURCE
    return ("filter", Hook.FORWARD) if incoming else ("filter", Hook.OUTPUT)


def target_rule(target: Target) -> tuple[Rule, tuple[str, Hook]]:
    needs_tcp = isinstance(target, (Redirect, TProxy)) or type(target).__name__ in ("Masquerade", "Dnat")
    extra: tuple[Match, ...] = (ProtocolMatch(protocol=Protocol.TCP),) if needs_tcp else ()
    return Rule(matches=extra, target=target), TARGET_PLACES.get(type(target), ("mangle", Hook.OUTPUT))


def test_every_ir_node_has_samples() -> None:
    assert coverage_gaps() == []
    assert set(SAMPLE_MATCHES) == set(typing.get_args(Match))
    assert set(SAMPLE_TARGETS) == set(typing.get_args(Target))


@pytest.mark.parametrize(("match", "text"), list(zip(MATCHES, EXPECTED_MATCHES, strict=True)), ids=repr)
def test_every_match_lowers_to_its_pinned_form_or_is_refused(match: Match, text: str) -> None:
    got = lowered(Rule(matches=(match,), target=Accept()), match_place(match))
    assert got == (text if text.startswith("refused") else f"{text} accept".strip())


@pytest.mark.parametrize(("target", "text"), list(zip(TARGETS, EXPECTED_TARGETS, strict=True)), ids=repr)
def test_every_target_lowers_to_its_pinned_form_or_is_refused(target: Target, text: str) -> None:
    rule, place = target_rule(target)
    assert lowered(rule, place) == text


def _rule_of(*matches: Match, target: Target | None = None) -> Rule:
    return Rule(matches=matches, target=target or Accept())


NAT_OUTPUT = ("nat", Hook.OUTPUT)
REFUSED = [
    (_rule_of(PortMatch(protocol=Protocol.ICMP, ports=PortSet.of(1))), match_place, "icmp has no ports"),
    (_rule_of(target=Redirect(ports=PortSet.of(15001))), NAT_OUTPUT,
     "nft maps ports only after a tcp, udp or sctp match in the rule"),
    (_rule_of(ProtocolMatch(protocol=Protocol.TCP), target=Redirect(ports=PortSet.of(1, 3))), NAT_OUTPUT,
     "nft NAT statements take one port or one range"),
    (_rule_of(CtStateMatch(states={CtState.SNAT})), match_place,
     "nft's ct state has no SNAT or DNAT state (they are ct status bits)"),
    (_rule_of(InterfaceMatch(direction=Direction.SOURCE, name="eth0")), ("nat", Hook.OUTPUT),
     "packets have no input interface at OUTPUT"),
    (_rule_of(InterfaceMatch(direction=Direction.DESTINATION, name="eth*0")), match_place,
     "nft interface names cannot hold '*', '\\', '\"' or an inner '+'"),
    (_rule_of(ProtocolMatch(protocol=Protocol.TCP), target=Redirect()), ("mangle", Hook.OUTPUT),
     "redirect and dnat run in nat chains at prerouting or output"),
    (_rule_of(ProtocolMatch(protocol=Protocol.TCP), target=TProxy(port=1)), ("mangle", Hook.OUTPUT),
     "tproxy runs in filter chains at prerouting"),
    (_rule_of(UnknownMatch(dialect="iptables", tokens=("-m", "cpu"))), match_place,
     "an unknown iptables match has no nftables form"),
    (_rule_of(target=Reject(with_="icmp6-no-route")), ("filter", Hook.OUTPUT),
     "no nft reject code for 'icmp6-no-route' in an ipv4 table"),
    (_rule_of(target=Snat()), ("nat", Hook.POSTROUTING), "a NAT statement needs an address or a port"),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "place", "reason"), REFUSED, ids=[r for _, _, r in REFUSED])
def test_what_nftables_cannot_express_is_refused_naming_the_node(rule: Rule, place: object, reason: str) -> None:
    where = place(rule.matches[0]) if callable(place) else place
    assert lowered(rule, where) == f"refused: {reason}"  # type: ignore[arg-type]


def test_ct_zone_after_conntrack_is_refused() -> None:
    from meshredirect.ir import CtZone

    assert lowered(_rule_of(target=CtZone(zone=1)), ("mangle", Hook.OUTPUT)) == (
        "refused: ct zone set must run before conntrack (priority below -200), not at -151"
    )


def test_a_jump_into_a_chain_the_table_lacks_is_refused() -> None:
    chain = Chain(
        name="OUTPUT", rules=(_rule_of(target=Jump(chain="NOPE")),), base=iptables_base_chain("nat", Hook.OUTPUT)
    )
    with pytest.raises(UnsupportedError, match="table nat has no chain 'NOPE'"):
        LOWERING.layout(Ruleset(tables=(Table(family=Family.IPV4, name="nat", chains=(chain,)),)))


def test_bad_table_names_are_refused_with_the_expected_form() -> None:
    with pytest.raises(PolicyError) as info:
        NftablesJsonBackend(table="my table")
    assert str(info.value) == (
        "nftables table: expected a name of 1-255 characters: a letter or '_', then letters, digits, '_.-', "
        "got 'my table'"
    )


# ----------------------------------------------------------------------------- layout


def test_layout_merges_the_iptables_tables_of_a_family_into_our_table() -> None:
    ruleset = compile_policy(
        Policy(inbound_mode="TPROXY", drop_invalid=True, dns={"enabled": True, "capture_all": True})
    )
    laid = LOWERING.layout(ruleset)
    assert [(t.family, t.name) for t in laid.tables] == [(Family.IPV4, "istio")]
    bases = {c.name: (c.base.hook, c.base.type.value, c.base.priority) for c in laid.tables[0].chains if c.base}
    assert bases == {
        "raw-PREROUTING": (Hook.PREROUTING, "filter", -301),
        "raw-OUTPUT": (Hook.OUTPUT, "filter", -301),
        "mangle-PREROUTING": (Hook.PREROUTING, "filter", -151),
        "mangle-OUTPUT": (Hook.OUTPUT, "route", -151),
        "nat-OUTPUT": (Hook.OUTPUT, "nat", -101),
    }
    # Each base chain is one step ahead of the iptables table it came from, so it never ties with it.
    for table in ruleset.tables:
        for chain in table.chains:
            if chain.base is not None:
                moved = laid.tables[0].chain(f"{table.name}-{chain.name}").base
                assert moved is not None and moved.priority == chain.base.priority + PRIORITY_OFFSET


def test_a_tproxy_rule_is_followed_by_a_drop_and_a_port_match_implies_its_protocol() -> None:
    laid = LOWERING.layout(compile_policy(Policy(inbound_mode="TPROXY")))
    rules = laid.tables[0].chain("mangle-ISTIO_TPROXY").rules
    assert [type(r.target) for r in rules] == [TProxy, Drop]
    assert rules[1].matches == rules[0].matches and rules[1].comment == TPROXY_DROP_COMMENT
    inbound = laid.tables[0].chain("mangle-ISTIO_INBOUND").rules
    # "-p tcp --dport 15008" is one PortMatch; nft does not print the protocol a port match implies.
    assert not any(
        isinstance(m, ProtocolMatch)
        for r in inbound
        for m in r.matches
        if any(isinstance(x, PortMatch) for x in r.matches)
    )


def test_addresses_of_the_other_family_and_family_matches() -> None:
    v6 = AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("fd00::/8"))
    rules = [
        _rule_of(v6),  # never holds in an ip table: no rule
        _rule_of(
            AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("fd00::/8"), negate=True)
        ),  # nor this
        _rule_of(FamilyMatch(family=Family.IPV6)),  # never holds: no rule
        _rule_of(FamilyMatch(family=Family.IPV4), target=Return()),  # always holds: the match goes
    ]
    laid = LOWERING.layout(Ruleset(tables=(Table(family=Family.IPV4, name="filter", chains=(
        Chain(name="OUTPUT", rules=tuple(rules), base=iptables_base_chain("filter", Hook.OUTPUT)),)),)))  # fmt: skip
    assert laid.tables[0].chains[0].rules == (Rule(target=Return()),)


def test_inet_tables_split_rules_of_both_address_families() -> None:
    both = AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/8", "fd00::/8"))
    chain = Chain(name="c", rules=(_rule_of(both, target=Return()), _rule_of(FamilyMatch(family=Family.IPV6))),
                  base=iptables_base_chain("filter", Hook.OUTPUT))  # fmt: skip
    ruleset = Ruleset(tables=(Table(family=Family.INET, name="mesh", chains=(chain,)),))
    laid = NftLowering(table="mesh").layout(ruleset)
    assert [r.matches for r in laid.tables[0].chains[0].rules] == [
        (AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/8")),),
        (AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("fd00::/8")),),
        (FamilyMatch(family=Family.IPV6),),
    ]
    text = render(ruleset, "nftables", table="mesh").text()
    assert "table inet mesh {" in text and "ip6 daddr fd00::/8 return" in text and "meta nfproto ipv6 accept" in text
    assert read_nft_json(render(ruleset, "nftables-json", table="mesh").text()) == laid


# ----------------------------------------------------------------------------- round trip and families


def _commands(ruleset: Ruleset, backend: NftLowering = LOWERING) -> str:
    commands = [c for cs in backend.commands(ruleset).values() for c in cs]
    return json.dumps({"nftables": commands})


#: Generating a policy costs more than checking it; one property checks all three facts per policy.
POLICY_EXAMPLES = 250


@settings(max_examples=POLICY_EXAMPLES, deadline=None)
@given(policies())
def test_the_json_reads_back_as_the_layout_which_is_idempotent_and_of_the_policys_families_only(
    policy: Policy,
) -> None:
    """Reading the commands gives the layout; laying out again changes nothing; a policy of one family programs
    no table of the other (an ip table only ever sees IPv4 packets, an ip6 table IPv6 ones)."""
    ruleset = compile_policy(policy)
    laid = LOWERING.layout(ruleset)
    text = _commands(ruleset)
    assert read_nft_json(text) == laid
    assert NftLowering(table=LOWERING.table_name(ruleset)).layout(laid) == laid
    every_family = {next(iter(next(iter(c.values())).values()))["family"] for c in json.loads(text)["nftables"]}
    assert every_family == {{Family.IPV4: "ip", Family.IPV6: "ip6"}[f] for f in policy.families}


def test_unknown_nftables_nodes_are_written_back_verbatim() -> None:
    cpu = {"match": {"op": "==", "left": {"meta": {"key": "cpu"}}, "right": 1}}
    notrack = [{"notrack": None}]
    rule = Rule(
        matches=(UnknownMatch(dialect="nftables", tokens=(json.dumps(cpu),)),),
        target=UnknownTarget(dialect="nftables", name="notrack", tokens=(json.dumps(notrack),)),
    )
    expr = LOWERING.rule_expr(Family.IPV4, rule)
    assert expr == [cpu, *notrack]
    with pytest.raises(UnsupportedError, match="no nft text form"):
        render(sample_table(rule, ("raw", Hook.OUTPUT)), "nftables")


def test_counters_option_adds_a_counter_before_the_verdict() -> None:
    text = render(compile_policy(Policy()), "nftables", counters=True).text()
    assert "meta l4proto tcp counter jump nat-ISTIO_OUTPUT" in text


def test_owner_matches_the_compiler_emits_are_exact_in_nft() -> None:
    owner = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337))
    assert owner.socketless is False  # positive: no socket, no match, in iptables and nft alike
    assert lowered(_rule_of(owner), ("filter", Hook.OUTPUT)) == "meta skuid 1337 accept"
    negated = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337), negate=True, socketless=False)
    assert lowered(_rule_of(negated), ("filter", Hook.OUTPUT)) == "meta skuid != 1337 accept"


def test_snat_ranges_and_ipv6_addresses() -> None:
    from meshredirect.ir import AddressRange

    snat = Snat(addresses=AddressRange(first=ipaddress.ip_address("10.0.0.1"), last=ipaddress.ip_address("10.0.0.4")),
                ports=PortSet.of((80, 90)))  # fmt: skip
    rule = _rule_of(ProtocolMatch(protocol=Protocol.TCP), target=snat)
    assert lowered(rule, ("nat", Hook.POSTROUTING)) == "meta l4proto tcp snat to 10.0.0.1-10.0.0.4:80-90"


# ----------------------------------------------------------------------------- one lookup for many rules


def _walk(rules: list[Rule], port: int) -> list[object]:
    """What a run of single-match rules does to a packet: the jumps it makes (each returns) and its verdict."""
    path: list[object] = []
    for rule in rules:
        (match,) = rule.matches
        assert isinstance(match, PortMatch)
        if port in match.ports:
            path.append(rule.target)
            if not isinstance(rule.target, Jump):
                return path
    return [*path, "falls through"]


#: Runs of up to six rules over a small space: a few hundred cover it well.
MERGE_EXAMPLES = 200
_VERDICTS = st.sampled_from([Return(), Accept(), Drop(), Jump(chain="A"), Jump(chain="B"), Goto(chain="C")])
_PORT_RULES = st.lists(
    st.tuples(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 6)), min_size=1, max_size=3), _VERDICTS).map(
        lambda t: Rule(
            matches=(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(*((a, a + w) for a, w in t[0]))),), target=t[1]
        )
    ),
    max_size=6,
)


@settings(max_examples=MERGE_EXAMPLES, deadline=None)
@given(_PORT_RULES)
def test_merging_lookups_keeps_what_every_packet_meets(rules: list[Rule]) -> None:
    merged = merge_lookups(rules)
    for port in range(1, 50):
        assert _walk(merged, port) == _walk(rules, port), port
    # and the renderer writes each run it merged as one rule (a set or a verdict map)
    assert len(merged) <= len(rules)


def test_a_jump_that_a_later_rule_overlaps_cuts_the_lookup() -> None:
    def rule(ports: PortSet, target: Target) -> Rule:
        return Rule(matches=(PortMatch(protocol=Protocol.TCP, ports=ports),), target=target)

    rules = [rule(PortSet.of(80), Jump(chain="A")), rule(PortSet.of(80, 443), Return())]
    assert merge_lookups(rules) == rules  # port 80 comes back from A and must still meet the return
    disjoint = [rule(PortSet.of(80), Jump(chain="A")), rule(PortSet.of(443), Return())]
    assert merge_lookups(disjoint) == [disjoint[1], disjoint[0]]  # one verdict map: returns first


def test_the_compiled_exclusions_share_one_lookup_with_the_loopback_return() -> None:
    policy = Policy(outbound_cidrs="10.0.0.0/8", outbound_cidrs_exclude="10.96.0.0/12,192.168.0.0/16")
    text = render(compile_policy(policy), "nftables").text()
    assert (
        "ip daddr vmap { 10.96.0.0/12 : return, 127.0.0.1 : return, 192.168.0.0/16 : return, "
        "10.0.0.0/10 : jump nat-ISTIO_REDIRECT, 10.64.0.0/11 : jump nat-ISTIO_REDIRECT, "
        "10.112.0.0/12 : jump nat-ISTIO_REDIRECT, 10.128.0.0/9 : jump nat-ISTIO_REDIRECT }"
    ) in text


_NETWORKS = st.builds(
    lambda a, p: str(ipaddress.ip_network((0x0A000000 + a, p), strict=False)), st.integers(0, 63), st.integers(26, 32)
)
_ADDRESS_RULES = st.lists(
    st.tuples(st.lists(_NETWORKS, min_size=1, max_size=3), _VERDICTS).map(
        lambda t: Rule(
            matches=(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of(*t[0])),), target=t[1]
        )
    ),
    max_size=6,
)


def _walk_address(rules: list[Rule], address: ipaddress.IPv4Address) -> list[object]:
    path: list[object] = []
    for rule in rules:
        (match,) = rule.matches
        assert isinstance(match, AddressMatch)
        if address in match.addresses:
            path.append(rule.target)
            if not isinstance(rule.target, Jump):
                return path
    return [*path, "falls through"]


@settings(max_examples=MERGE_EXAMPLES, deadline=None)
@given(_ADDRESS_RULES)
def test_merging_address_lookups_keeps_what_every_packet_meets(rules: list[Rule]) -> None:
    merged = merge_lookups(rules)
    for offset in range(70):
        address = ipaddress.IPv4Address(0x0A000000 + offset)
        assert _walk_address(merged, address) == _walk_address(rules, address), address
