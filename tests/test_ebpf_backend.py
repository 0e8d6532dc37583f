"""The eBPF backend without a kernel: what it lowers and refuses, the limits, the maps, the model, the C.

Goldens pin the C source and the maps document of a few policies (``pytest --update-goldens``);
the meaning is proven by the model tests here, the kernel tests in ``tests/kernel/test_ebpf.py``
(the kernel does what the model says) and the equivalence property with the semantics engine.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

import attrs
import pytest
from hypothesis import HealthCheck, given, settings

from meshredirect.api import render
from meshredirect.compiler import compile_policy
from meshredirect.errors import PolicyError, UnsupportedError
from meshredirect.ir import (
    Accept,
    AddressMatch,
    BaseChain,
    Chain,
    ChainPolicy,
    ChainType,
    Direction,
    Drop,
    Family,
    Goto,
    Hook,
    Jump,
    Match,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Table,
    Target,
    iptables_base_chain,
)
from meshredirect.policy import DnsCapture, Policy
from meshredirect.presets import preset
from meshredirect.testing.pytest_plugin import require
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS
from meshredirect.testing.strategies import policies
from meshredirect.values import AddressSet, IdSet, PortSet
from meshredirect_ebpf import ConnectCall, EbpfBackend, Environment, Refused, Rewritten, Route, Unchanged, decide
from meshredirect_ebpf.environment import MarkRoute
from meshredirect_ebpf.limits import HASH_ENTRIES_MAX, MAPS_PER_PROGRAM_MAX, OBJECT_NAME_MAX
from meshredirect_ebpf.lowering import lower
from meshredirect_ebpf.maps import lpm_key, map_definitions, maps_document, read_entries

GOLDEN: Final = Path(__file__).parent / "golden" / "ebpf"
ENV: Final = Environment.pod("10.0.0.5", "fd00::5")
V4: Final = Family.IPV4


def nat_output(*rules: Rule, family: Family = V4, extra: tuple[Chain, ...] = ()) -> Ruleset:
    chain = Chain(name="OUTPUT", rules=rules, base=iptables_base_chain("nat", Hook.OUTPUT))
    next_chain = Chain(name="MESH_NEXT", rules=(Rule(target=Return()),))
    return Ruleset(tables=(Table(family=family, name="nat", chains=(chain, next_chain, *extra)),))


def call(destination: str, port: int = 80, uid: int = 1000, gid: int = 1000, **extra: object) -> ConnectCall:
    address = ipaddress.ip_address(destination)
    family = Family.IPV6 if address.version == 6 else V4
    return ConnectCall(family=family, destination=address, port=port, uid=uid, gid=gid, **extra)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- support matrix

REFUSED_MATCHES: Final = {
    "PortMatch(protocol=<Protocol.UDP: 'udp'>, ports=PortSet('15053'), direction=<Direction.SOURCE: 'source'>, "
    "negate=False)": "the source port of a connection is chosen by the kernel after connect() runs",
    "InterfaceMatch(direction=<Direction.SOURCE: 'source'>, name='eth+', negate=True)": (
        "a connection opened by a local process has no input interface"
    ),
    "IpSetMatch": "an ipset's members live outside the ruleset",
    "StatisticMatch": "a random or every-nth match has no deterministic equivalent to check",
    "UnknownMatch": "an unknown iptables match",
}
REFUSED_TARGETS: Final = {
    "Redirect(ports=PortSet('15001'), flags=frozenset({<NatFlag.RANDOM: 'random'>}))": (
        "--random: connect() rewrites to one fixed port; it has no NAT port selection to flag"
    ),
    "TProxy": "TPROXY hands packets arriving from outside to a transparent socket; connect() sees none",
    "SetMark": "marks belong to packets and conntrack, which do not exist at connect()",
    "ConnmarkSave": "marks belong to packets and conntrack, which do not exist at connect()",
    "ConnmarkRestore": "marks belong to packets and conntrack, which do not exist at connect()",
    "ConnmarkSet": "marks belong to packets and conntrack, which do not exist at connect()",
    "CtZone": "conntrack zones are chosen in the raw table, not at connect()",
    "Masquerade": "source NAT happens in POSTROUTING, after routing",
    "Snat": "source NAT happens in POSTROUTING, after routing",
    "Dnat": "DNAT to another host is not implemented (only REDIRECT)",
    "Reject": "a rejection's error differs from a refused connect(); not implemented",
    "Log": "logging from the connect hook is not implemented",
    "UnknownTarget": "an unknown iptables target",
}
MATCHES: Final = [m for items in SAMPLE_MATCHES.values() for m in items]
TARGETS: Final = [t for items in SAMPLE_TARGETS.values() for t in items]


def _refusal(node: object, table: dict[str, str]) -> str | None:
    return table.get(repr(node), table.get(type(node).__name__))


@pytest.mark.parametrize("match", MATCHES, ids=repr)
def test_every_match_lowers_or_is_refused_with_its_reason(match: Match) -> None:
    ruleset = nat_output(Rule(matches=(match,), target=Return()))
    reason = _refusal(match, REFUSED_MATCHES)
    if reason is None:
        lower(ruleset, ENV)
        return
    with pytest.raises(UnsupportedError) as info:
        lower(ruleset, ENV)
    assert (info.value.backend, info.value.node, info.value.reason) == ("ebpf", match, reason)


@pytest.mark.parametrize("target", TARGETS, ids=repr)
def test_every_target_lowers_or_is_refused_with_its_reason(target: Target) -> None:
    ruleset = nat_output(Rule(matches=(ProtocolMatch(protocol=Protocol.TCP),), target=target))
    reason = _refusal(target, REFUSED_TARGETS)
    if reason is None:
        lower(ruleset, ENV)
        return
    with pytest.raises(UnsupportedError) as info:
        lower(ruleset, ENV)
    assert (info.value.node, info.value.reason) == (target, reason)


def test_chains_a_connect_hook_cannot_implement_are_refused_or_left_out_and_listed() -> None:
    ruleset = compile_policy(Policy(inbound_mode="TPROXY"))
    with pytest.raises(UnsupportedError) as info:
        EbpfBackend().render(ruleset)
    assert str(info.value) == (
        "backend 'ebpf' cannot express Chain: ipv4 mangle PREROUTING decides for connections arriving from other "
        "hosts; a cgroup connect hook sees only connections that local processes open, so capturing remote inbound "
        "connections needs another mechanism (render with local_only, --local-only on the command line, and install "
        "these chains with an iptables or nftables backend, or send mesh traffic to the peer's inbound port at the "
        "client's connect) (node: Chain(name='PREROUTING', rules=(), base=BaseChain(hook=<Hook.PREROUTING: "
        "'PREROUTING'>, type=<ChainType.FILTER: 'filter'>, priority=-150, policy=<ChainPolicy.ACCEPT: 'ACCEPT'>)))"
    )
    program = EbpfBackend(local_only=True).plan(ruleset)
    assert program.left_out == (
        "ipv4 mangle PREROUTING (filter chain of PREROUTING)",
        "ipv4 mangle OUTPUT (route chain of OUTPUT)",
    )
    readme = EbpfBackend(local_only=True).render(ruleset).artifact(kind="readme").content
    assert "- ipv4 mangle OUTPUT (route chain of OUTPUT)\n" in readme


def test_a_redirect_other_protocols_can_reach_is_refused_naming_the_rule() -> None:
    # DNS capture redirects UDP: connect() and sendmsg() hooks do that.
    lower(compile_policy(Policy(dns={"enabled": True, "capture_all": True})), ENV, local_only=True)
    # A redirect without a protocol match can be reached by anything.
    rule = Rule(target=Redirect(ports=PortSet.of(15001)))
    with pytest.raises(UnsupportedError) as info:
        lower(nat_output(rule), ENV)
    assert info.value.node == rule
    assert info.value.reason == (
        "this REDIRECT can be reached by icmp, ipv6-icmp, other, sctp connections; the program redirects TCP and UDP "
        "only (the protocols whose sockets connect() and sendmsg() hooks rewrite)"
    )
    udp = Rule(matches=(ProtocolMatch(protocol=Protocol.UDP),), target=Redirect(ports=PortSet.of(15053)))
    assert decide(lower(nat_output(udp), ENV), call("1.1.1.1", 53, protocol=Protocol.UDP)) == Rewritten(
        address=ipaddress.ip_address("127.0.0.1"), port=15053
    )


def test_cycles_and_missing_chains_are_refused() -> None:
    loop = Chain(name="A", rules=(Rule(target=Jump(chain="B")),))
    back = Chain(name="B", rules=(Rule(target=Goto(chain="A")),))
    with pytest.raises(UnsupportedError, match=r"the chains call each other in a cycle \(A -> B -> A\)"):
        lower(nat_output(Rule(target=Jump(chain="A")), extra=(loop, back)), ENV)
    with pytest.raises(UnsupportedError, match="table nat has no chain 'NOWHERE'"):
        lower(nat_output(Rule(target=Jump(chain="NOWHERE"))), ENV)


def test_a_redirect_to_several_ports_is_refused() -> None:
    rule = Rule(matches=(ProtocolMatch(protocol=Protocol.TCP),), target=Redirect(ports=PortSet.of((15001, 15002))))
    with pytest.raises(UnsupportedError, match=r"a redirect to a range of ports \(connect\(\) rewrites to one port\)"):
        lower(nat_output(rule), ENV)


# ----------------------------------------------------------------------------- kernel limits


def test_sets_larger_than_a_hash_map_can_hold_are_refused() -> None:
    huge = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of((1, HASH_ENTRIES_MAX + 1)))
    with pytest.raises(UnsupportedError) as info:
        lower(nat_output(Rule(matches=(huge,), target=Return())), ENV)
    assert info.value.node == huge
    assert info.value.reason == (
        "the policy's uid and gid sets hold 134217729 values together with this one; their hash map holds at most "
        "134217728 (kernel/bpf/hashtab.c: U32_MAX / sizeof(struct bucket) buckets)"
    )
    # One value fewer fits (counted from the intervals: nothing is expanded before the check)...
    fits = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of((1, HASH_ENTRIES_MAX)))
    assert lower(nat_output(Rule(matches=(fits,), target=Return())), ENV).sets[0].size == HASH_ENTRIES_MAX
    # ... but the sets of a kind share their map: together they must fit.
    second = OwnerMatch(kind=OwnerKind.GID, ids=IdSet.of(1, 2))
    with pytest.raises(UnsupportedError, match="hold 134217730 values together with this one") as info:
        lower(nat_output(Rule(matches=(fits,), target=Return()), Rule(matches=(second,), target=Return())), ENV)
    assert info.value.node == second


def test_many_sets_share_one_map_per_kind() -> None:
    rules = [
        Rule(matches=(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(1000 + n, 3000 + n)),), target=Return())
        for n in range(MAPS_PER_PROGRAM_MAX * 2)
    ]
    program = lower(nat_output(*rules), ENV)
    assert len(program.sets) == 128
    maps = {m.name: m for m in map_definitions(program)}
    assert len(maps) == 11 <= MAPS_PER_PROGRAM_MAX
    assert len(maps["mr_ports"].entries) == 256
    # Equal sets share one set.
    same = [Rule(matches=(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(7)),), target=Return())] * 100
    assert len(lower(nat_output(*same), ENV).sets) == 1


def test_generated_names_fit_the_kernels_object_names() -> None:
    rendering = EbpfBackend(environment=ENV, local_only=True).render(compile_policy(preset("istio-1.4")))
    document = json.loads(rendering.artifact(kind="ebpf-maps").content)
    names = [m["name"] for m in document["maps"]] + [p["name"] for p in document["programs"]]
    assert max(map(len, names)) <= OBJECT_NAME_MAX


def test_routes_beyond_a_maps_capacity_are_refused() -> None:
    many = [Route(network=f"10.{n // 256}.{n % 256}.0/24", interface="eth1") for n in range(4097)]
    env = Environment(routes=tuple(many))
    with pytest.raises(PolicyError, match=r"environment.routes: expected at most 4096 IPv4 routes"):
        maps_document(lower(Ruleset(), env))


# ----------------------------------------------------------------------------- maps as data


def test_keys_and_values_are_laid_out_as_the_c_structs() -> None:
    assert lpm_key(ipaddress.ip_network("10.96.0.0/12")).hex(" ") == "0c 00 00 00 0a 60 00 00"
    assert lpm_key(ipaddress.ip_network("fd00::/8")).hex(" ") == "08 00 00 00 fd" + " 00" * 15
    program = lower(compile_policy(Policy(families="both")), ENV, local_only=True)
    entries = {m.name: m for m in map_definitions(program)}
    # struct mr_port_key {u16 set; u16 port}: set 0, port 15008, little-endian.
    assert [(e.label, e.key.hex(" ")) for e in entries["mr_ports"].entries] == [("p_0: 15008", "00 00 a0 3a")]
    assert [(e.label, e.key.hex(" ")) for e in entries["mr_ids"].entries] == [("id_0: 1337", "00 00 00 00 39 05 00 00")]
    # struct mr_set4_key: prefix length 32 + 32 (the set number counts), set 1 in network order, address.
    assert [(e.label, e.key.hex(" ")) for e in entries["mr_sets4"].entries] == [
        ("a4_0: 127.0.0.6/32", "40 00 00 00 00 00 00 00 7f 00 00 06"),
        ("a4_1: 127.0.0.1/32", "40 00 00 00 00 00 00 01 7f 00 00 01"),
    ]
    assert [e.label for e in entries["mr_local6"].entries] == [
        "::1/128 -> lo, source ::1",
        "fd00::5/128 -> lo, source fd00::5",
    ]
    assert entries["mr_route6"].entries[0].value.hex(" ") == "02 00 00 00 fd" + " 00" * 14 + " 05"


def test_the_maps_document_holds_every_map_the_c_declares_with_its_entries() -> None:
    rendering = EbpfBackend(environment=ENV, local_only=True).render(compile_policy(Policy(families="both")))
    source = rendering.artifact(kind="c").content
    declared = re.findall(r'^\} (\w+) SEC\("\.maps"\);$', source, flags=re.MULTILINE)
    document = rendering.artifact(kind="ebpf-maps").content
    assert [m["name"] for m in json.loads(document)["maps"]] == declared
    program = EbpfBackend(environment=ENV, local_only=True).plan(compile_policy(Policy(families="both")))
    assert read_entries(document) == {m.name: m.entries for m in map_definitions(program)}
    sections = re.findall(r'^SEC\("([\w/]+)"\)$', source, flags=re.MULTILINE)
    assert sections == [p["section"] for p in json.loads(document)["programs"]]


def test_port_and_id_ranges_are_expanded_into_their_hash_maps() -> None:
    program = lower(compile_policy(Policy(outbound_ports_exclude="8000-8002,9000", inbound_ports="")), ENV)
    ports = next(m for m in map_definitions(program) if m.name == "mr_ports")
    assert [e.label for e in ports.entries] == ["p_0: 8000", "p_0: 8001", "p_0: 8002", "p_0: 9000", "p_1: 15008"]
    assert ports.max_entries == 5


# ----------------------------------------------------------------------------- the reference model


DEFAULT: Final = lower(compile_policy(Policy(families="both")), ENV, local_only=True)
TO_OUTBOUND: Final = {4: Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=15001)}

MODEL_CASES: Final = [
    # (call, outcome, why)
    (call("93.184.216.34"), Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=15001), "app: outbound"),
    (call("2001:db8::1"), Rewritten(address=ipaddress.ip_address("::1"), port=15001), "app over IPv6"),
    (call("::ffff:93.184.216.34"), Rewritten(address=ipaddress.ip_address("::ffff:127.0.0.1"), port=15001), "mapped: IPv4 decision"),
    (call("93.184.216.34", uid=1337), Unchanged(), "proxy uid exempt"),
    (call("93.184.216.34", gid=1337), Unchanged(), "proxy gid exempt"),
    (call("10.0.0.5", uid=1337), Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=15006), "proxy to the pod over lo: inbound"),
    (call("fd00::5", gid=1337), Rewritten(address=ipaddress.ip_address("::1"), port=15006), "same over IPv6"),
    (call("10.0.0.5", 15008, uid=1337), Unchanged(), "the tunnel port is never captured inbound"),
    (call("10.0.0.5", uid=1337, bound=ipaddress.ip_address("127.0.0.6")), Unchanged(), "passthrough from 127.0.0.6"),
    (call("fd00::5", uid=1337, bound=ipaddress.ip_address("::6")), Unchanged(), "passthrough from ::6"),
    (call("10.0.0.5"), Unchanged(), "the app calling its own pod address stays direct"),
    (call("127.0.0.1"), Unchanged(), "loopback destination"),
    (call("127.0.0.1", uid=1337), Unchanged(), "the proxy to loopback"),
    (call("127.0.0.53"), Unchanged(), "127/8 is local: leaves on lo"),
    (call("93.184.216.34", protocol=Protocol.UDP), Unchanged(), "UDP without DNS capture is not redirected"),
]  # fmt: skip


@pytest.mark.parametrize(("connect", "outcome", "why"), MODEL_CASES, ids=[c[2] for c in MODEL_CASES])
def test_the_model_on_the_default_policy(connect: ConnectCall, outcome: object, why: str) -> None:
    assert decide(DEFAULT, connect) == outcome, why


def test_the_model_on_policy_variants() -> None:
    excluded = lower(
        compile_policy(Policy(outbound_cidrs_exclude="10.96.0.0/12", outbound_ports_exclude="5432")),
        ENV,
        local_only=True,
    )
    assert decide(excluded, call("10.96.0.1")) == Unchanged()
    assert decide(excluded, call("10.112.0.1")) == TO_OUTBOUND[4]
    assert decide(excluded, call("1.1.1.1", 5432)) == Unchanged()
    only = lower(compile_policy(Policy(outbound_cidrs="10.0.0.0/8")), ENV, local_only=True)
    assert decide(only, call("10.1.1.1")) == TO_OUTBOUND[4]
    assert decide(only, call("11.1.1.1")) == Unchanged()
    groups = lower(compile_policy(Policy(owner_groups_include="4000")), ENV, local_only=True)
    assert decide(groups, call("1.1.1.1", gid=4000)) == TO_OUTBOUND[4]
    assert decide(groups, call("1.1.1.1", gid=4001)) == Unchanged()
    interfaces = lower(
        compile_policy(Policy(exclude_interfaces="eth1")),
        Environment.pod("10.0.0.5", routes=["10.1.0.0/16=eth1"]),
        local_only=True,
    )
    assert decide(interfaces, call("10.1.2.3")) == Unchanged()
    assert decide(interfaces, call("10.2.2.3")) == TO_OUTBOUND[4]
    everything = lower(compile_policy(preset("istio-1.4")), ENV, local_only=True)
    assert decide(everything, call("10.0.0.5")) == Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=15006)
    ipv4_only = lower(compile_policy(Policy()), ENV, local_only=True)
    assert decide(ipv4_only, call("2001:db8::1")) == Unchanged()


def test_the_model_follows_jump_goto_return_accept_and_policies() -> None:
    tcp = ProtocolMatch(protocol=Protocol.TCP)
    to_port = Rule(matches=(tcp,), target=Redirect(ports=PortSet.of(15001)))
    port = PortMatch(protocol=Protocol.TCP, ports=PortSet.of(22))
    # goto B; B returns for port 22: the return leaves A too, so OUTPUT's next rule runs.
    chain_a = Chain(name="A", rules=(Rule(target=Goto(chain="B")), Rule(target=Drop())))
    chain_b = Chain(name="B", rules=(Rule(matches=(port,), target=Return()), Rule(target=Accept())))
    ruleset = nat_output(Rule(target=Jump(chain="A")), to_port, extra=(chain_a, chain_b))
    program = lower(ruleset, ENV)
    assert decide(program, call("1.1.1.1", 22)) == TO_OUTBOUND[4]
    assert decide(program, call("1.1.1.1", 80)) == Unchanged()  # accepted in B: no NAT
    # Two nat OUTPUT base chains: the lower priority first; ACCEPT ends only one; a DROP policy refuses.
    first = Chain(
        name="first",
        rules=(Rule(matches=(port,), target=Accept()),),
        base=BaseChain(hook=Hook.OUTPUT, type=ChainType.NAT, priority=-200),
    )
    second = Chain(
        name="second",
        rules=(
            Rule(
                matches=(tcp, AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("9.9.9.9"))),
                target=Redirect(ports=PortSet.of(15001)),
            ),
        ),
        base=BaseChain(hook=Hook.OUTPUT, type=ChainType.NAT, priority=100, policy=ChainPolicy.DROP),
    )
    nft = Ruleset(tables=(Table(family=Family.INET, name="mesh", chains=(second, first)),))
    program = lower(nft, ENV)
    assert [e.function for e in program.decisions[0].entries] == ["mr4_first", "mr4_second"]
    assert decide(program, call("9.9.9.9", 22)) == TO_OUTBOUND[4]
    assert decide(program, call("8.8.8.8", 22)) == Refused()
    assert decide(program, call("2001:db8::9", 22)) == Refused()  # inet: both families


def test_addresses_of_the_other_family_never_match_negated_or_not() -> None:
    v6 = AddressSet.of("fd00::/8")
    rules = (
        Rule(matches=(AddressMatch(direction=Direction.DESTINATION, addresses=v6, negate=True),), target=Accept()),
        Rule(matches=(ProtocolMatch(protocol=Protocol.TCP),), target=Redirect()),
    )
    assert decide(lower(nat_output(*rules), ENV), call("1.1.1.1", 443)) == Rewritten(
        address=ipaddress.ip_address("127.0.0.1"), port=443
    )


def test_marks_are_the_sockets_and_a_mark_routed_locally_leaves_on_lo() -> None:
    from meshredirect.ir import InterfaceMatch, MarkMatch

    tcp = ProtocolMatch(protocol=Protocol.TCP)
    marked = Rule(
        matches=(MarkMatch(value=0x539), InterfaceMatch(direction=Direction.DESTINATION, name="lo")), target=Return()
    )
    ruleset = nat_output(marked, Rule(matches=(tcp,), target=Redirect()))
    plain = lower(ruleset, ENV)
    assert decide(plain, call("10.0.0.5", mark=0x539)) == Unchanged()  # to the pod over lo, marked
    assert decide(plain, call("10.0.0.5", mark=0x53A)) == Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=80)
    assert decide(plain, call("1.1.1.1", mark=0x539)) == Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=80)
    routed = lower(ruleset, attrs.evolve(ENV, mark_routes=(MarkRoute(value=0x539),)))
    assert decide(routed, call("1.1.1.1", mark=0x539)) == Unchanged()  # TPROXY's fwmark rule: leaves on lo
    source = EbpfBackend(environment=attrs.evolve(ENV, mark_routes=(MarkRoute(value=0x539),))).render(ruleset)
    entries = json.loads(source.artifact(kind="ebpf-maps").content)["maps"]
    (mark_routes,) = [m for m in entries if m["name"] == "mr_mark_routes"]
    assert mark_routes["entries"] == [
        {
            "member": "mark & 0xffffffff == 0x539 -> lo",
            "key": "00 00 00 00",
            "value": "39 05 00 00 ff ff ff ff 01 00 00 00",
        }
    ]


def test_an_unbound_socket_takes_the_routes_preferred_source() -> None:
    passthrough = AddressMatch(direction=Direction.SOURCE, addresses=AddressSet.of("10.0.0.5"))
    ruleset = nat_output(Rule(matches=(passthrough, ProtocolMatch(protocol=Protocol.TCP)), target=Redirect()))
    program = lower(ruleset, ENV)
    assert decide(program, call("1.1.1.1")) == Rewritten(address=ipaddress.ip_address("127.0.0.1"), port=80)
    assert decide(program, call("1.1.1.1", bound=ipaddress.ip_address("10.0.0.6"))) == Unchanged()
    assert decide(program, call("127.0.0.9")) == Unchanged()  # 127/8 prefers 127.0.0.1
    nowhere = lower(ruleset, Environment(routes=()))
    assert decide(nowhere, call("1.1.1.1")) == Unchanged()  # no route: no source


# ----------------------------------------------------------------------------- goldens and the C compiler

GOLDEN_CASES: Final = {
    "istio-default-local": (Policy(families="both"), True),
    "istio-1.4-local": (preset("istio-1.4"), True),
    "outbound-only": (
        Policy(
            inbound_ports="",
            outbound_cidrs_exclude="10.96.0.0/12,169.254.169.254",
            outbound_ports_exclude="5432,6379",
            exclude_interfaces="eth1",
            owner_groups_exclude="2000",
        ),
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendering_matches_golden(name: str, update_goldens: bool) -> None:
    policy, local_only = GOLDEN_CASES[name]
    env = Environment.pod("10.0.0.5", "fd00::5", routes=["10.1.0.0/16=eth1"])
    rendering = render(compile_policy(policy), "ebpf", environment=env, local_only=local_only)
    for artifact in rendering.artifacts:
        path = GOLDEN / name / artifact.name
        if update_goldens:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(artifact.content)
        assert path.exists(), f"no golden for {name}: run pytest --update-goldens"
        assert artifact.content == path.read_text(), artifact.name


def _clang() -> str:
    found = shutil.which("clang")
    require(None if found is not None else "clang is not installed (Debian package clang)")
    assert found is not None
    return found


def _compiles(source: str, tmp_path: Path) -> None:
    from meshredirect.apply.ebpf import multiarch_include

    clang = _clang()
    c_file = tmp_path / "redirect.bpf.c"
    c_file.write_text(source)
    result = subprocess.run(
        [clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I{multiarch_include()}", "-c", str(c_file),
         "-o", str(tmp_path / "redirect.bpf.o")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_hostile_names_and_comments_stay_inside_c_comments(tmp_path: Path) -> None:
    odd = Chain(name="weird*/name-1", rules=(Rule(target=Return(), comment="*/ int oops; /* \u00e9"),))
    ruleset = nat_output(Rule(target=Jump(chain="weird*/name-1")), extra=(odd,))
    source = EbpfBackend(environment=ENV).render(ruleset).artifact(kind="c").content
    assert "mr4_weird__name_1" in source
    assert "/* nat weird*/name-1" not in source and "(? int oops; ? ?) */" in source
    _compiles(source, tmp_path)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(policies(dns=DnsCapture()))
def test_generated_policies_compile_without_warnings(tmp_path: Path, policy: Policy) -> None:
    env = Environment.pod("10.0.0.5", "fd00::5", routes=["10.1.0.0/16=eth1", "10.2.0.0/16=net1"])
    _compiles(
        EbpfBackend(environment=env, local_only=True).render(compile_policy(policy)).artifact(kind="c").content,
        tmp_path,
    )


def test_every_golden_compiles(tmp_path: Path) -> None:
    for path in sorted(GOLDEN.glob("*/redirect.bpf.c")):
        _compiles(path.read_text(), tmp_path)


def test_the_backend_takes_plain_options() -> None:
    backend = EbpfBackend(local_addresses=["10.0.0.5"], routes=["10.1.0.0/16=eth1"], local_only=True)
    assert backend.environment == Environment.pod("10.0.0.5", routes=["10.1.0.0/16=eth1"])
    with pytest.raises(
        PolicyError, match=re.escape("routes: expected NETWORK=INTERFACE, e.g. 10.1.0.0/16=eth1, got 'eth1'")
    ):
        EbpfBackend(routes=["eth1"])
    assert attrs.evolve(Environment(), routes=()).route(ipaddress.ip_address("1.1.1.1")) is None
