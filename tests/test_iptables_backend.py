"""The iptables lowering: every IR node, its exact text, what it refuses, and the kernel's agreement."""

from __future__ import annotations

import ipaddress
import typing

import pytest

from conftest import require_kernel
from meshredirect.errors import UnsupportedError
from meshredirect.ir import (
    IPTABLES_BUILTIN_HOOKS,
    Accept,
    AddressMatch,
    Chain,
    Direction,
    Family,
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
    Table,
    Target,
    UnknownMatch,
    iptables_base_chain,
)
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS, TARGET_PLACES, coverage_gaps
from meshredirect.values import AddressSet, IdSet, PortSet
from meshredirect_iptables import IptablesRestoreBackend, IptablesSaveBackend
from meshredirect_iptables.lowering import ntop

BACKEND = IptablesSaveBackend()

EXPECTED_MATCHES = [
    "-p tcp", "! -p udp", "", "-s 127.0.0.6/32", "! -d 127.0.0.0/8", "-d 10.0.0.0/8 | -d 192.168.1.0/24",
    "-p tcp -m tcp ! --dport 15008", "-p udp -m udp --sport 15053", "-p tcp -m multiport --dports 22,15020:15021,15090",
    "-p tcp -m tcp --dport 8000:9000", "-o lo", "! -i eth+", "-m owner --uid-owner 1337",
    "-m owner ! --gid-owner 101 -m owner ! --gid-owner 202", "-m owner --uid-owner 3-4", "-m mark --mark 0x539",
    "-m mark ! --mark 0x53a/0xff", "-m connmark --mark 0x539", "-m conntrack --ctstate RELATED,ESTABLISHED",
    "-m conntrack ! --ctstate INVALID", "-m addrtype --dst-type LOCAL", "-m set --match-set mesh-excluded dst",
    "-m statistic --mode random --probability 0.50000000000", "-m statistic --mode nth --every 3 --packet 1",
    "-m pkttype --pkt-type unicast",
]  # fmt: skip
EXPECTED_TARGETS = [
    "-j ACCEPT", "-j DROP", "-j RETURN", "", "-j MESH_NEXT", "-g MESH_NEXT", "-j REDIRECT --to-ports 15001",
    "-j REDIRECT", "-j REDIRECT --to-ports 15001 --random", "-j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff",
    "-j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1", "-j MARK --set-xmark 0x53a/0xffffffff",
    "-j MARK --set-xmark 0x4000/0x4000", "-j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff", "-j CONNMARK --set-xmark 0x7/0xffffffff",
    "-j CT --zone 2", "-j MASQUERADE", "-j MASQUERADE --to-ports 1024-2048", "-j MASQUERADE --random-fully",
    "-j SNAT --to-source 10.0.0.1", "-j SNAT --to-source 10.0.0.1-10.0.0.4 --random --random-fully --persistent",
    "-j DNAT --to-destination 10.244.1.5:8080", "-j DNAT --to-destination 10.244.1.5:8080 --random --persistent",
    "-j REJECT --reject-with icmp-port-unreachable",
    "-j REJECT --reject-with tcp-reset", '-j LOG --log-prefix "mesh: "', "-j LOG --log-level 6", "-j NOTRACK",
]  # fmt: skip

MATCHES = [m for items in SAMPLE_MATCHES.values() for m in items]
TARGETS = [t for items in SAMPLE_TARGETS.values() for t in items]


def test_every_ir_node_has_samples() -> None:
    assert coverage_gaps() == []
    assert set(SAMPLE_MATCHES) == set(typing.get_args(Match))
    assert set(SAMPLE_TARGETS) == set(typing.get_args(Target))


@pytest.mark.parametrize(("match", "text"), list(zip(MATCHES, EXPECTED_MATCHES, strict=True)), ids=repr)
def test_every_match_lowers_to_its_pinned_text(match: Match, text: str) -> None:
    lines = [
        " ".join(tokens[:-2]) for tokens in BACKEND.rule_tokens(Family.IPV4, Rule(matches=(match,), target=Accept()))
    ]
    assert " | ".join(lines) == text


@pytest.mark.parametrize(("target", "text"), list(zip(TARGETS, EXPECTED_TARGETS, strict=True)), ids=repr)
def test_every_target_lowers_to_its_pinned_text(target: Target, text: str) -> None:
    assert " ".join(BACKEND.target_tokens(Family.IPV4, target)) == text


def _rule_of(*matches: Match, target: Target | None = None) -> Rule:
    return Rule(matches=matches, target=target or Accept())


REFUSED = [
    (_rule_of(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/8", "12.0.0.0/8"), negate=True)),
     "iptables cannot negate a set of several addresses in one rule"),
    (_rule_of(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(*range(1, 40, 2)), negate=True)),
     "a negated port set of more than 15 multiport slots"),
    (_rule_of(OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1), socketless=True)),
     "xt_owner cannot match socketless packets positively"),
    (_rule_of(ProtocolMatch(protocol=Protocol.UDP), PortMatch(protocol=Protocol.TCP, ports=PortSet.of(1))),
     "conflicting protocols in one rule"),
    (_rule_of(ProtocolMatch(protocol=Protocol.TCP, negate=True), ProtocolMatch(protocol=Protocol.TCP)),
     "conflicting protocols in one rule"),
    (_rule_of(ProtocolMatch(protocol=Protocol.TCP), ProtocolMatch(protocol=Protocol.TCP, negate=True)),
     "conflicting protocols in one rule"),
    (_rule_of(UnknownMatch(dialect="nftables", tokens=("meta", "cpu", "1"))), "an unknown nftables match has no iptables form"),
    (_rule_of(target=Redirect(ports=PortSet.of(1, 3))), "iptables NAT targets take one port or one range"),
    (_rule_of(AddressMatch(direction=Direction.SOURCE, addresses=AddressSet.of("1.1.1.1")),
              AddressMatch(direction=Direction.SOURCE, addresses=AddressSet.of("2.2.2.2"))),
     "iptables takes one -s option per rule"),
]  # fmt: skip


def test_tcp_reset_takes_any_tcp_port_match_negated_or_not() -> None:
    for negate in (False, True):
        rule = _rule_of(
            PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15001), direction=Direction.SOURCE, negate=negate),
            target=Reject(with_="tcp-reset"),
        )
        (tokens,) = BACKEND.rule_tokens(Family.IPV4, rule)
        assert " ".join(tokens) == (
            f"-p tcp -m tcp {'! ' if negate else ''}--sport 15001 -j REJECT --reject-with tcp-reset"
        )
    refused = _rule_of(ProtocolMatch(protocol=Protocol.TCP, negate=True), target=Reject(with_="tcp-reset"))
    with pytest.raises(UnsupportedError, match="needs a TCP match"):
        BACKEND.rule_tokens(Family.IPV4, refused)


def test_the_same_protocol_test_twice_is_one_test() -> None:
    for negate in (False, True):
        twice = _rule_of(
            ProtocolMatch(protocol=Protocol.TCP, negate=negate), ProtocolMatch(protocol=Protocol.TCP, negate=negate)
        )
        once = _rule_of(ProtocolMatch(protocol=Protocol.TCP, negate=negate))
        assert BACKEND.rule_tokens(Family.IPV4, twice) == BACKEND.rule_tokens(Family.IPV4, once)


@pytest.mark.parametrize(("rule", "reason"), REFUSED, ids=[f"{i}-{r}" for i, (_, r) in enumerate(REFUSED)])
def test_what_iptables_cannot_express_is_refused_naming_the_node(rule: Rule, reason: str) -> None:
    with pytest.raises(UnsupportedError) as info:
        BACKEND.rule_tokens(Family.IPV4, rule)
    assert info.value.reason == reason
    assert info.value.backend == BACKEND.name


def test_inet_tables_and_foreign_tables_are_refused() -> None:
    for table in (Table(family=Family.INET, name="nat"), Table(family=Family.IPV4, name="mesh")):
        with pytest.raises(UnsupportedError):
            IptablesSaveBackend().render(Ruleset(tables=(table,)))


def test_interfaces_the_hook_cannot_have_are_refused() -> None:
    inbound = InterfaceMatch(direction=Direction.SOURCE, name="eth0")
    chain = Chain(name="OUTPUT", rules=(_rule_of(inbound),), base=iptables_base_chain("nat", Hook.OUTPUT))
    with pytest.raises(UnsupportedError, match="cannot match the input interface in OUTPUT"):
        IptablesSaveBackend().render(Ruleset(tables=(Table(family=Family.IPV4, name="nat", chains=(chain,)),)))


def test_negated_owner_without_socketless_match_uses_socket_exists() -> None:
    match = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337), negate=True, socketless=False)
    assert BACKEND.rule_tokens(Family.IPV4, _rule_of(match))[0][:5] == [
        "-m",
        "owner",
        "--socket-exists",
        "!",
        "--uid-owner",
    ]


def test_large_positive_port_sets_split_into_exact_multiport_rules() -> None:
    ports = PortSet.of(*range(1, 60, 2))
    rules = BACKEND.rule_tokens(Family.IPV4, _rule_of(PortMatch(protocol=Protocol.TCP, ports=ports), target=Return()))
    assert len(rules) == 2
    listed = [p for tokens in rules for p in tokens[tokens.index("--dports") + 1].split(",")]
    assert [int(p) for p in listed] == list(ports)


def test_address_of_the_other_family() -> None:
    v6only = AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("fd00::/8"))
    assert BACKEND.rule_tokens(Family.IPV4, _rule_of(v6only)) == []  # never matches: no rule
    negated = AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("fd00::/8"), negate=True)
    assert BACKEND.rule_tokens(Family.IPV4, _rule_of(negated)) == []  # never matches either (the IR's meaning)


@pytest.mark.parametrize(
    ("address", "text"),
    [("::7f00:35", "::127.0.0.53"), ("::ffff:a00:1", "::ffff:10.0.0.1"), ("::6", "::6"), ("::1", "::1"),
     ("2001:db8::1", "2001:db8::1"), ("::", "::"), ("::1:0", "::0.1.0.0"), ("1::", "1::"), ("10.0.0.1", "10.0.0.1")],
)  # fmt: skip
def test_addresses_are_printed_as_inet_ntop_does(address: str, text: str) -> None:
    assert ntop(ipaddress.ip_address(address)) == text


# ----------------------------------------------------------------------------- kernel agreement


def _sample_ruleset(family: Family) -> Ruleset:
    """Every sample node in a rule of a table where the kernel accepts it."""
    rules: dict[tuple[str, Hook], list[Rule]] = {}
    for match in MATCHES:
        if isinstance(match, AddressMatch) and family is Family.IPV6:
            continue
        # xt_owner only works where packets have a local socket; -i only where they have an input interface.
        incoming = isinstance(match, InterfaceMatch) and match.direction is Direction.SOURCE
        place = ("filter", Hook.FORWARD) if incoming else ("filter", Hook.OUTPUT)
        rules.setdefault(place, []).append(Rule(matches=(match,), target=Accept()))
    for target in TARGETS:
        if family is Family.IPV6 and type(target).__name__ in ("Snat", "Dnat", "TProxy") and "address" in repr(target):
            continue
        place = TARGET_PLACES.get(type(target), ("mangle", Hook.OUTPUT))
        needs_tcp = type(target).__name__ in ("Redirect", "TProxy", "Masquerade", "Dnat") or "tcp-reset" in repr(target)
        extra: tuple[Match, ...] = (ProtocolMatch(protocol=Protocol.TCP),) if needs_tcp else ()
        rules.setdefault(place, []).append(Rule(matches=extra, target=target))
    tables = []
    for name in ("raw", "mangle", "nat", "filter"):
        chains = [
            Chain(name=hook.value, rules=tuple(rules[(name, hook)]), base=iptables_base_chain(name, hook))
            for hook in IPTABLES_BUILTIN_HOOKS[name]
            if (name, hook) in rules
        ]
        uses_next = any(
            isinstance(r.target, Jump) or type(r.target).__name__ == "Goto" for c in chains for r in c.rules
        )
        if uses_next:
            chains.append(Chain(name="MESH_NEXT", rules=(Rule(target=Return()),)))
        tables.append(Table(family=family, name=name, chains=tuple(chains)))
    return Ruleset(tables=tuple(tables))


@pytest.mark.kernel
@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_the_kernel_prints_every_sample_exactly_as_the_backend(variant: str) -> None:
    require_kernel()
    from kernel.test_iptables_load import tables_of
    from meshredirect.testing.netns import NetNamespace

    ruleset = _sample_ruleset(Family.IPV4)
    restore = IptablesRestoreBackend().render(ruleset).artifact(Family.IPV4).content
    expected = IptablesSaveBackend().render(ruleset).artifact(Family.IPV4).content
    with NetNamespace() as ns:
        ns.run(["ipset", "create", "mesh-excluded", "hash:net"])
        ns.run([f"iptables-{variant}-restore", "--noflush"], input=restore)
        got = ns.run([f"iptables-{variant}-save"]).stdout
    assert tables_of(got) == tables_of(expected)
