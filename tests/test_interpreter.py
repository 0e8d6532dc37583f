"""The interpreter's kernel facts, each on a small hand-built ruleset.

Every test would fail if its fact were modelled differently (the alternative
outcome is named in a comment where it is not obvious).
"""

from __future__ import annotations

import ipaddress

import attrs
import pytest

from meshredirect.ir import (
    Accept,
    AddressMatch,
    AddressRange,
    BaseChain,
    Chain,
    ChainPolicy,
    ChainType,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    CtState,
    CtStateMatch,
    CtZone,
    Direction,
    Dnat,
    Drop,
    Family,
    FamilyMatch,
    Goto,
    Hook,
    InterfaceMatch,
    IpSetMatch,
    Jump,
    Log,
    MarkMatch,
    Masquerade,
    NatFlag,
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
    SetMark,
    StatisticMatch,
    Table,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
    iptables_base_chain,
)
from meshredirect.semantics.interpreter import (
    ChainEnd,
    Dropped,
    Event,
    Interpreter,
    MatchResult,
    Passed,
    Redirected,
    RuleVisit,
    TProxied,
    Unknown,
    evaluate,
)
from meshredirect.semantics.model import Connection, Environment, MarkRoute
from meshredirect.values import AddressSet, IdSet, PortSet

V4 = Family.IPV4
ENV = Environment.default().with_interfaces(["eth1"])
TCP = ProtocolMatch(protocol=Protocol.TCP)


def rule(target: Target, *matches: object) -> Rule:
    return Rule(matches=tuple(matches), target=target)  # type: ignore[arg-type]


def ipt(
    table: str, *chains: tuple[Hook | str, list[Rule]], family: Family = V4, policy: ChainPolicy = ChainPolicy.ACCEPT
) -> Table:
    """An iptables-style table: built-in chains named by their hook, user chains by name."""
    built = []
    for name, rules in chains:
        if isinstance(name, Hook):
            built.append(Chain(name=name.value, rules=tuple(rules), base=iptables_base_chain(table, name, policy)))
        else:
            built.append(Chain(name=name, rules=tuple(rules)))
    return Table(family=family, name=table, chains=tuple(built))


def nft(name: str, *chains: Chain, family: Family = V4) -> Table:
    return Table(family=family, name=name, chains=chains)


def base(name: str, hook: Hook, rules: list[Rule], *, type: ChainType = ChainType.FILTER, priority: int = 0,
         policy: ChainPolicy = ChainPolicy.ACCEPT) -> Chain:  # fmt: skip
    return Chain(name=name, rules=tuple(rules), base=BaseChain(hook=hook, type=type, priority=priority, policy=policy))


def rs(*tables: Table) -> Ruleset:
    return Ruleset(tables=tables)


def app(dst: str = "93.184.216.34", dport: int = 80, **kw: object) -> Connection:
    return Connection.local(ENV, dst=dst, dport=dport, **kw)  # type: ignore[arg-type]


def remote(dst: str = "10.0.0.5", dport: int = 8080, iif: str = "eth0", src: str = "10.0.0.1") -> Connection:
    return Connection.remote(src=src, dst=dst, dport=dport, iif=iif)


def dst(*cidrs: str, negate: bool = False) -> AddressMatch:
    return AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of(*cidrs), negate=negate)


def v(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address)


REDIRECT_15001 = Redirect(ports=PortSet.of(15001))

# ----------------------------------------------------------------------------- 1. NAT once, first binding wins


def test_nat_prerouting_is_not_run_again_for_traffic_looped_back_over_lo() -> None:
    rules = rs(
        ipt("nat", (Hook.OUTPUT, [rule(Accept())]), (Hook.PREROUTING, [rule(REDIRECT_15001, TCP)])),
        ipt("mangle", (Hook.PREROUTING, [rule(SetMark(value=7))])),
    )
    evaluation = evaluate(rules, app(dst="10.0.0.5", dport=8080), ENV)
    # Redirected to 15001 if nat PREROUTING ran for the looped-back packet.
    assert evaluation.verdict == Passed(address=v("10.0.0.5"), port=8080, local=True)
    assert evaluation.connection.mark == 7  # mangle PREROUTING did see it
    skipped = [e for e in evaluation.trace if isinstance(e, Event) and "skipped nat PREROUTING" in e.text]
    assert len(skipped) == 1


def test_without_a_nat_chain_in_output_the_looped_back_packet_meets_nat_prerouting() -> None:
    # No nat hook at OUTPUT: the destination mapping is still undecided when the packet comes back over lo.
    rules = rs(nft("t", base("pre", Hook.PREROUTING, [rule(REDIRECT_15001, TCP)], type=ChainType.NAT, priority=-100)))
    assert evaluate(rules, app(dst="10.0.0.5", dport=8080), ENV).verdict == Redirected(
        address=v("127.0.0.1"), port=15001
    )


def test_remote_connection_meets_nat_prerouting() -> None:
    rules = rs(ipt("nat", (Hook.PREROUTING, [rule(Redirect(ports=PortSet.of(15006)), TCP)])))
    assert evaluate(rules, remote(), ENV).verdict == Redirected(address=v("10.0.0.5"), port=15006)


def test_first_nat_binding_wins_and_ends_the_other_nat_chains_of_the_hook() -> None:
    first = base("a", Hook.OUTPUT, [rule(REDIRECT_15001, TCP)], type=ChainType.NAT, priority=-100)
    second = base("b", Hook.OUTPUT, [rule(Redirect(ports=PortSet.of(15002)), TCP)], type=ChainType.NAT, priority=-50)
    assert evaluate(rs(nft("t", second, first)), app(), ENV).verdict == Redirected(address=v("127.0.0.1"), port=15001)
    # When the first does not bind, the second does.
    idle = attrs.evolve(first, rules=(rule(Accept()),))
    assert evaluate(rs(nft("t", idle, second)), app(), ENV).verdict == Redirected(address=v("127.0.0.1"), port=15002)


def test_nat_chains_run_at_the_nat_core_priority_whatever_their_own() -> None:
    # A filter chain at -150 marks; a nat chain of priority -300 still runs after it (at -100) and sees the mark.
    marker = base("mark", Hook.OUTPUT, [rule(SetMark(value=1))], priority=-150)
    natter = base("nat", Hook.OUTPUT, [rule(REDIRECT_15001, MarkMatch(value=1))], type=ChainType.NAT, priority=-300)
    assert evaluate(rs(nft("t", natter, marker)), app(), ENV).verdict == Redirected(address=v("127.0.0.1"), port=15001)


# ----------------------------------------------------------------------------- 2. REDIRECT addresses and ports


def test_redirect_in_output_goes_to_the_loopback_address_of_the_family() -> None:
    for family, target in ((V4, "127.0.0.1"), (Family.IPV6, "::1")):
        rules = rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, TCP)]), family=family))
        to = "93.184.216.34" if family is V4 else "2001:db8::1"
        assert evaluate(rules, app(dst=to), ENV).verdict == Redirected(address=v(target), port=15001)


@pytest.mark.parametrize(("iif", "address"), [("eth0", "10.0.0.5"), ("eth1", "10.1.0.5")])
def test_redirect_in_prerouting_goes_to_the_incoming_interface_first_address(iif: str, address: str) -> None:
    rules = rs(ipt("nat", (Hook.PREROUTING, [rule(Redirect(ports=PortSet.of(15006)), TCP)])))
    assert evaluate(rules, remote(dst=address, iif=iif), ENV).verdict == Redirected(address=v(address), port=15006)


def test_redirect_in_prerouting_on_an_interface_without_address_drops() -> None:
    env = attrs.evolve(ENV, interfaces=(*ENV.interfaces[:2], attrs.evolve(ENV.interfaces[2], addresses=())))
    rules = rs(ipt("nat", (Hook.PREROUTING, [rule(Redirect(ports=PortSet.of(15006)), TCP)])))
    assert isinstance(evaluate(rules, remote(iif="eth1"), env).verdict, Dropped)


def test_redirect_port_range_keeps_a_port_inside_and_takes_the_lowest_otherwise() -> None:
    rules = rs(ipt("nat", (Hook.OUTPUT, [rule(Redirect(ports=PortSet.of((8000, 8100))), TCP)])))
    assert evaluate(rules, app(dport=8050), ENV).verdict == Redirected(address=v("127.0.0.1"), port=8050)
    assert evaluate(rules, app(dport=80), ENV).verdict == Redirected(address=v("127.0.0.1"), port=8000)


def test_dnat_to_one_address_and_port() -> None:
    from meshredirect.ir import AddressRange

    target = Dnat(addresses=AddressRange(first=v("10.0.0.9"), last=v("10.0.0.9")), ports=PortSet.of(9000))
    rules = rs(ipt("nat", (Hook.OUTPUT, [rule(target, TCP)])))
    assert evaluate(rules, app(), ENV).verdict == Redirected(address=v("10.0.0.9"), port=9000)


# ----------------------------------------------------------------------------- 3. ACCEPT ends a base chain only


def test_accept_ends_only_its_table_at_the_hook() -> None:
    rules = rs(
        ipt("mangle", (Hook.OUTPUT, [rule(Accept()), rule(SetMark(value=1))])),
        ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, TCP)])),
    )
    evaluation = evaluate(rules, app(), ENV)
    assert evaluation.verdict == Redirected(address=v("127.0.0.1"), port=15001)  # nat still ran
    assert evaluation.connection.mark == 0  # the rule after ACCEPT did not


def test_accept_in_an_nft_base_chain_does_not_stop_the_next_base_chain() -> None:
    first = base("a", Hook.OUTPUT, [rule(Accept())], priority=0)
    second = base("b", Hook.OUTPUT, [rule(Drop())], priority=10)
    assert isinstance(evaluate(rs(nft("t", first, second)), app(), ENV).verdict, Dropped)


def test_drop_and_reject_end_everything() -> None:
    for target, reject in ((Drop(), False), (Reject(with_="tcp-reset"), True)):
        rules = rs(ipt("filter", (Hook.OUTPUT, [rule(target)])), ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001)])))
        verdict = evaluate(rules, app(), ENV).verdict
        assert isinstance(verdict, Dropped)
        assert verdict.reject is reject


def test_base_chains_of_equal_priority_run_in_ruleset_order() -> None:
    first = base("a", Hook.OUTPUT, [rule(SetMark(value=1))], priority=0)
    second = base("b", Hook.OUTPUT, [rule(SetMark(value=2))], priority=0)
    assert evaluate(rs(nft("t", first, second)), app(), ENV).connection.mark == 2
    assert evaluate(rs(nft("t", second, first)), app(), ENV).connection.mark == 1


# ----------------------------------------------------------------------------- 4. jump, goto, return, policy


def test_jump_returns_after_the_jump_rule() -> None:
    rules = rs(
        ipt(
            "mangle",
            (Hook.OUTPUT, [rule(Jump(chain="SUB")), rule(SetMark(value=2, mask=0x2))]),
            ("SUB", [rule(SetMark(value=1, mask=0x1)), rule(Return()), rule(SetMark(value=4, mask=0x4))]),
        )
    )
    assert evaluate(rules, app(), ENV).connection.mark == 3


def test_goto_does_not_come_back_and_the_end_of_the_chain_applies_the_base_policy() -> None:
    chains = ((Hook.OUTPUT, [rule(Goto(chain="SUB")), rule(Accept())]), ("SUB", [rule(SetMark(value=1))]))
    evaluation = evaluate(rs(ipt("filter", *chains, policy=ChainPolicy.DROP)), app(), ENV)
    # A jump would have come back to the ACCEPT rule.
    assert isinstance(evaluation.verdict, Dropped)
    jumped = rs(
        ipt(
            "filter",
            (Hook.OUTPUT, [rule(Jump(chain="SUB")), rule(Accept())]),
            ("SUB", [rule(SetMark(value=1))]),
            policy=ChainPolicy.DROP,
        )
    )
    assert isinstance(evaluate(jumped, app(), ENV).verdict, Passed)


def test_return_in_a_base_chain_applies_its_policy() -> None:
    rules = rs(ipt("filter", (Hook.OUTPUT, [rule(Return()), rule(Accept())]), policy=ChainPolicy.DROP))
    evaluation = evaluate(rules, app(), ENV)
    assert isinstance(evaluation.verdict, Dropped)
    ends = [e for e in evaluation.trace if isinstance(e, ChainEnd)]
    assert ends[-1].outcome == "RETURN from the base chain: policy DROP"


def test_a_jump_to_a_missing_chain_is_unknown() -> None:
    rules = rs(ipt("filter", (Hook.OUTPUT, [rule(Jump(chain="NOPE"))])))
    assert isinstance(evaluate(rules, app(), ENV).verdict, Unknown)


# ----------------------------------------------------------------------------- 5. owner matches


def test_negated_owner_match_matches_a_socketless_packet_as_xt_owner_does() -> None:
    xt = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337), negate=True)
    nft_style = attrs.evolve(xt, socketless=False)
    socketless = app(uid=None)
    for match, verdict in ((xt, Redirected(address=v("127.0.0.1"), port=15001)), (nft_style, None)):
        rules = rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, match)])))
        got = evaluate(rules, socketless, ENV).verdict
        assert got == verdict if verdict is not None else isinstance(got, Passed)


def test_owner_match_uses_uid_and_gid_of_the_socket() -> None:
    uid = rs(
        ipt(
            "nat",
            (Hook.OUTPUT, [rule(Return(), OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337))), rule(REDIRECT_15001)]),
        )
    )
    gid = rs(
        ipt(
            "nat",
            (Hook.OUTPUT, [rule(Return(), OwnerMatch(kind=OwnerKind.GID, ids=IdSet.of(1337))), rule(REDIRECT_15001)]),
        )
    )
    assert isinstance(evaluate(uid, app(uid=1337, gid=5), ENV).verdict, Passed)
    assert isinstance(evaluate(uid, app(uid=5, gid=1337), ENV).verdict, Redirected)
    assert isinstance(evaluate(gid, app(uid=5, gid=1337), ENV).verdict, Passed)


def test_the_socket_is_gone_after_the_loop_over_lo() -> None:
    # An owner match in PREROUTING (nft allows it) sees no socket: the packet was orphaned on lo.
    match = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1000), socketless=False)
    rules = rs(nft("t", base("pre", Hook.PREROUTING, [rule(SetMark(value=1), match)], priority=-150)))
    assert evaluate(rules, app(dst="10.0.0.5", uid=1000), ENV).connection.mark == 0


# ----------------------------------------------------------------------------- 6. TPROXY


def test_tproxy_marks_and_assigns_the_transparent_listener() -> None:
    target = TProxy(port=15006, mark=1337)
    rules = rs(ipt("mangle", (Hook.PREROUTING, [rule(target, TCP), rule(SetMark(value=9))])))
    evaluation = evaluate(rules, remote(), ENV)
    assert evaluation.verdict == TProxied(port=15006, address=v("10.0.0.5"), mark=1337)
    assert evaluation.connection.mark == 1337  # terminal in the table: the MARK after it did not run


def test_tproxy_of_a_foreign_destination_needs_the_mark_route() -> None:
    rules = rs(ipt("mangle", (Hook.PREROUTING, [rule(TProxy(port=15006, mark=1337), TCP)])))
    foreign = remote(dst="93.184.216.34")
    assert isinstance(evaluate(rules, foreign, ENV).verdict, Dropped)
    routed = attrs.evolve(ENV, local_marks=(MarkRoute(value=1337),))
    assert evaluate(rules, foreign, routed).verdict == TProxied(port=15006, address=v("10.0.0.5"), mark=1337)


# ----------------------------------------------------------------------------- 7. marks and connmarks


def test_mark_arithmetic_is_xor_and_mask() -> None:
    rules = rs(ipt("mangle", (Hook.OUTPUT, [rule(SetMark(value=0x10, mask=0xF0))])))
    assert evaluate(rules, app(mark=0xFF), ENV).connection.mark == 0x1F


def test_connmark_save_and_restore_with_masks() -> None:
    chains = [
        rule(SetMark(value=0x1234)),
        rule(ConnmarkSave(nfmask=0xFF00, ctmask=0xFF00)),
        rule(SetMark(value=0)),
        rule(ConnmarkRestore(nfmask=0x0F00, ctmask=0x0F00)),
    ]
    evaluation = evaluate(rs(ipt("mangle", (Hook.OUTPUT, chains))), app(), ENV)
    assert evaluation.connection.ctmark == 0x1200
    assert evaluation.connection.mark == 0x0200


def test_the_mark_survives_the_loop_over_lo() -> None:
    rules = rs(
        ipt(
            "mangle",
            (Hook.OUTPUT, [rule(SetMark(value=5))]),
            (Hook.PREROUTING, [rule(SetMark(value=6), MarkMatch(value=5))]),
        )
    )
    assert evaluate(rules, app(dst="10.0.0.5"), ENV).connection.mark == 6


def test_connmark_match_reads_the_connection_mark() -> None:
    rules = rs(
        ipt(
            "mangle",
            (Hook.OUTPUT, [rule(SetMark(value=3)), rule(ConnmarkSave()), rule(Drop(), ConnmarkMatch(value=3))]),
        )
    )
    assert isinstance(evaluate(rules, app(), ENV).verdict, Dropped)


def test_a_route_chain_reroutes_on_a_new_mark_and_a_filter_chain_does_not() -> None:
    env = attrs.evolve(ENV, local_marks=(MarkRoute(value=1),))
    nat = base(
        "nat",
        Hook.OUTPUT,
        [rule(REDIRECT_15001, InterfaceMatch(direction=Direction.DESTINATION, name="lo"))],
        type=ChainType.NAT,
        priority=-100,
    )
    for chain_type, rerouted in ((ChainType.ROUTE, True), (ChainType.FILTER, False)):
        marker = base("m", Hook.OUTPUT, [rule(SetMark(value=1))], type=chain_type, priority=-150)
        verdict = evaluate(rs(nft("t", marker, nat)), app(), env).verdict
        assert isinstance(verdict, Redirected) is rerouted


# ----------------------------------------------------------------------------- 8. conntrack zones and states


def test_the_first_ct_zone_wins() -> None:
    rules = rs(ipt("raw", (Hook.OUTPUT, [rule(CtZone(zone=1)), rule(CtZone(zone=2))])))
    assert evaluate(rules, app(), ENV).zone == 1


def test_a_looped_back_connection_cannot_get_a_zone() -> None:
    rules = rs(ipt("raw", (Hook.PREROUTING, [rule(CtZone(zone=2))])))
    assert evaluate(rules, app(dst="10.0.0.5"), ENV).zone is None
    assert evaluate(rules, remote(), ENV).zone == 2


def test_conntrack_state_is_invalid_in_raw_then_new_then_dnat() -> None:
    def drop_if(state: CtState) -> Rule:
        return rule(Drop(), CtStateMatch(states={state}))

    assert isinstance(evaluate(rs(ipt("raw", (Hook.OUTPUT, [drop_if(CtState.INVALID)]))), app(), ENV).verdict, Dropped)
    assert isinstance(evaluate(rs(ipt("mangle", (Hook.OUTPUT, [drop_if(CtState.NEW)]))), app(), ENV).verdict, Dropped)
    dnat = rs(
        ipt("nat", (Hook.PREROUTING, [rule(Redirect(ports=PortSet.of(15006)))])),
        ipt("filter", (Hook.INPUT, [drop_if(CtState.DNAT)])),
    )
    assert isinstance(evaluate(dnat, remote(), ENV).verdict, Dropped)


# ----------------------------------------------------------------------------- 9. unknowns


@pytest.mark.parametrize(
    "match",
    [
        IpSetMatch(name="mesh", flags=(Direction.DESTINATION,)),
        UnknownMatch(dialect="iptables", tokens=("-m", "bpf")),
    ],
)
def test_an_undecidable_match_gives_unknown_never_a_silent_match(match: object) -> None:
    rules = rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, match)])))
    evaluation = evaluate(rules, app(), ENV)
    assert isinstance(evaluation.verdict, Unknown)
    assert evaluation.visits()[0].result is MatchResult.UNKNOWN
    # A rule whose other match fails does not match, unknown or not; a LOG rule changes nothing.
    assert isinstance(
        evaluate(rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, match, dst("1.2.3.4/32"))]))), app(), ENV).verdict,
        Passed,
    )
    assert isinstance(evaluate(rs(ipt("nat", (Hook.OUTPUT, [rule(Log(), match)]))), app(), ENV).verdict, Passed)


def _service(*probabilities: float) -> Ruleset:
    """kube-proxy's shape: a service chain spreading over endpoint chains with random matches."""
    spread = [rule(Jump(chain=f"SEP{i}"), StatisticMatch(probability=p)) for i, p in enumerate(probabilities, 1)]
    spread.append(rule(Jump(chain=f"SEP{len(probabilities) + 1}")))
    endpoints = [
        (f"SEP{i}", [rule(Dnat(addresses=AddressRange(first=v(f"10.244.0.{i}"), last=v(f"10.244.0.{i}"))), TCP)])
        for i in range(1, len(probabilities) + 2)
    ]
    return rs(ipt("nat", (Hook.OUTPUT, [rule(Jump(chain="SVC"), dst("10.96.0.10/32"))]), ("SVC", spread), *endpoints))


def test_a_random_match_is_a_choice_point_every_outcome_of_which_is_possible() -> None:
    interpreter = Interpreter(_service(1 / 3, 1 / 2), ENV)
    connection = app(dst="10.96.0.10")
    outcomes = interpreter.evaluate_all(connection)
    assert [(e.choices, str(e.verdict)) for e in outcomes] == [
        ((True,), "redirected to 10.244.0.1:80"),
        ((False, True), "redirected to 10.244.0.2:80"),
        ((False, False), "redirected to 10.244.0.3:80"),
    ]
    # One evaluation takes the default (matched) and says so on the rule it chose at.
    default = interpreter.evaluate(connection)
    assert default.choices == (True,) and default.verdict == outcomes[0].verdict
    (chosen,) = [visit for visit in default.visits() if visit.chain == "SVC"]
    assert chosen.result is MatchResult.MATCHED
    assert chosen.note is not None and "random choice" in chosen.note and "other outcome is possible" in chosen.note
    # Forced choices replay a path; a connection whose rule's other matches fail meets no choice point.
    assert interpreter.evaluate(connection, choices=(False, False)).verdict == outcomes[2].verdict
    assert interpreter.evaluate(app(dst="10.96.0.11")).choices == ()
    # The evaluation's text lists the outcomes taken; one without a choice point says nothing of them.
    assert (
        outcomes[1].explain().splitlines()[-1]
        == "random choices taken: no match, matched (the other outcomes are possible too)"
    )
    assert "random choices" not in interpreter.evaluate(app(dst="10.96.0.11")).explain()


@pytest.mark.parametrize(
    ("match", "matched"),
    [
        (StatisticMatch(probability=1.0), True),
        (StatisticMatch(probability=0.0), False),
        (StatisticMatch(probability=1.0, negate=True), False),
        (StatisticMatch(every=1), True),
        (StatisticMatch(every=1, negate=True), False),
    ],
)
def test_a_statistic_match_that_cannot_go_both_ways_is_no_choice(match: StatisticMatch, matched: bool) -> None:
    evaluation = evaluate(rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, match)]))), app(), ENV)
    assert evaluation.choices == ()
    assert isinstance(evaluation.verdict, Redirected if matched else Passed)


@pytest.mark.parametrize("match", [StatisticMatch(probability=0.5), StatisticMatch(every=2, negate=True)])
def test_both_outcomes_of_a_choice_point_are_explored(match: StatisticMatch) -> None:
    interpreter = Interpreter(rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, match)]))), ENV)
    verdicts = {str(e.verdict) for e in interpreter.evaluate_all(app())}
    assert verdicts == {"redirected to 127.0.0.1:15001", "passed to 93.184.216.34:80 (sent out)"}


def test_nat_that_picks_ports_at_random_changes_where_nothing_goes_but_the_source_port_is_unknown() -> None:
    masquerade = rule(Masquerade(flags={NatFlag.RANDOM_FULLY}))  # kube-proxy's
    sport_test = rule(Drop(), PortMatch(protocol=Protocol.TCP, ports=PortSet.of(43210), direction=Direction.SOURCE))
    known = evaluate(rs(ipt("nat", (Hook.POSTROUTING, [masquerade]))), app(), ENV)
    assert known.verdict == Passed(address=v("93.184.216.34"), port=80, local=False)
    assert known.connection.src == v("10.0.0.5")
    # Over lo the packet meets INPUT after POSTROUTING: a test of its (random) source port cannot be decided.
    looped = rs(ipt("nat", (Hook.POSTROUTING, [masquerade])), ipt("filter", (Hook.INPUT, [sport_test])))
    unknown = evaluate(looped, app(dst="10.0.0.5", dport=8080), ENV)
    assert isinstance(unknown.verdict, Unknown) and "picked at random" in unknown.verdict.reason
    # Without the flag the port is kept (a free tuple is assumed) and the test is decided.
    plain = rs(ipt("nat", (Hook.POSTROUTING, [rule(Masquerade())])), ipt("filter", (Hook.INPUT, [sport_test])))
    assert isinstance(evaluate(plain, app(dst="10.0.0.5", dport=8080), ENV).verdict, Dropped)
    # A destination NAT to one port with --random goes to that port; to a range, the port is random.
    one = Redirect(ports=PortSet.of(15001), flags={NatFlag.RANDOM})
    assert evaluate(rs(ipt("nat", (Hook.OUTPUT, [rule(one)]))), app(), ENV).verdict == Redirected(
        address=v("127.0.0.1"), port=15001
    )
    many = Redirect(ports=PortSet.of((15001, 15002)), flags={NatFlag.RANDOM})
    assert isinstance(evaluate(rs(ipt("nat", (Hook.OUTPUT, [rule(many)]))), app(), ENV).verdict, Unknown)


def test_an_unknown_target_gives_unknown() -> None:
    rules = rs(ipt("nat", (Hook.OUTPUT, [rule(UnknownTarget(dialect="iptables", name="NFQUEUE"))])))
    assert isinstance(evaluate(rules, app(), ENV).verdict, Unknown)


# ----------------------------------------------------------------------------- 10. families, paths, trace


def test_inet_tables_see_both_families_and_family_match_tells_them_apart() -> None:
    chain = base("out", Hook.OUTPUT, [rule(Drop(), FamilyMatch(family=Family.IPV6))])
    rules = rs(nft("t", chain, family=Family.INET))
    assert isinstance(evaluate(rules, app(dst="2001:db8::1"), ENV).verdict, Dropped)
    assert isinstance(evaluate(rules, app(), ENV).verdict, Passed)
    # A table of the other family is not consulted.
    assert isinstance(evaluate(rs(nft("t", chain, family=Family.IPV6)), app(), ENV).verdict, Passed)


def test_martians_and_forwarding() -> None:
    empty = rs()
    assert isinstance(evaluate(empty, remote(src="127.0.0.1"), ENV).verdict, Dropped)
    assert isinstance(evaluate(empty, remote(src="10.0.0.5"), ENV).verdict, Dropped)  # our own address from outside
    assert isinstance(evaluate(empty, remote(dst="127.0.0.1"), ENV).verdict, Dropped)
    assert isinstance(evaluate(empty, remote(dst="93.184.216.34"), ENV).verdict, Dropped)  # a pod does not forward
    forwarding = attrs.evolve(ENV, forwarding=True)
    rules = rs(ipt("filter", (Hook.FORWARD, [rule(SetMark(value=1))])))
    evaluation = evaluate(rules, remote(dst="93.184.216.34"), forwarding)
    assert evaluation.verdict == Passed(address=v("93.184.216.34"), port=8080, local=False)
    assert evaluation.connection.mark == 1


def test_the_trace_lists_every_rule_visited_in_order_with_its_result() -> None:
    rules = rs(
        ipt(
            "nat",
            (Hook.OUTPUT, [rule(Return(), dst("1.2.3.4/32")), rule(Jump(chain="X"))]),
            ("X", [rule(Log()), rule(REDIRECT_15001, TCP)]),
        )
    )
    visits = evaluate(rules, app(), ENV).visits()
    assert [(r.chain, r.index, r.result) for r in visits] == [
        ("OUTPUT", 1, MatchResult.NOT_MATCHED),
        ("OUTPUT", 2, MatchResult.MATCHED),
        ("X", 1, MatchResult.MATCHED),
        ("X", 2, MatchResult.MATCHED),
    ]
    assert visits[-1].note == "destination 93.184.216.34:80 -> 127.0.0.1:15001"
    assert all(isinstance(r, RuleVisit) and r.table == "nat" and r.hook is Hook.OUTPUT for r in visits)


def test_explain_prints_the_path_and_the_verdict() -> None:
    rules = rs(ipt("nat", (Hook.OUTPUT, [rule(REDIRECT_15001, TCP)])))
    text = evaluate(rules, app(), ENV).explain()
    assert text.splitlines()[0] == "== OUTPUT (out eth0)"
    assert (
        "  nat OUTPUT #1: proto tcp -> REDIRECT :15001  [matched] destination 93.184.216.34:80 -> 127.0.0.1:15001"
        in text
    )
    assert text.splitlines()[-1] == "verdict: redirected to 127.0.0.1:15001"


# ----------------------------------------------------------------------------- traces of long chains


@pytest.mark.parametrize("misses", [0, 1, 12, 13, 40])
def test_explain_shortens_long_runs_of_rules_that_do_not_match_and_keeps_every_rule_on_request(misses: int) -> None:
    """kube-proxy's KUBE-SERVICES holds a rule per service: a trace shows the first two and the last of a
    run of more than ELIDE_AFTER (12) rules that do not match, and one line for the rest."""
    from meshredirect.semantics.interpreter import ELIDE_AFTER

    services = [rule(Jump(chain="SVC"), dst(f"10.96.0.{i}/32"), TCP) for i in range(1, misses + 1)]
    nat = ipt(
        "nat",
        (Hook.OUTPUT, [*services, rule(REDIRECT_15001, TCP)]),
        (
            "SVC",
            [rule(Dnat(addresses=AddressRange(first=v("10.244.0.9"), last=v("10.244.0.9")), ports=PortSet.of(80)))],
        ),
    )
    evaluation = Interpreter(rs(nat), ENV).evaluate(app(dst="93.184.216.34"))
    full = evaluation.explain(elide=None).splitlines()
    short = evaluation.explain().splitlines()
    assert len([line for line in full if "[no match]" in line]) == misses
    assert full[-1] == short[-1] == "verdict: redirected to 127.0.0.1:15001"
    if misses <= ELIDE_AFTER:
        assert short == full
        return
    assert len(short) == len(full) - misses + 4
    assert short[1:5] == [
        "  nat OUTPUT #1: dst 10.96.0.1/32, proto tcp -> jump SVC  [no match]",
        "  nat OUTPUT #2: dst 10.96.0.2/32, proto tcp -> jump SVC  [no match]",
        f"  nat OUTPUT #3-#{misses - 1}: {misses - 3} more rules  [no match]",
        f"  nat OUTPUT #{misses}: dst 10.96.0.{misses}/32, proto tcp -> jump SVC  [no match]",
    ]
