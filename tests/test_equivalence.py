"""``equivalent``: empty exactly when two rulesets treat every connection alike."""

from __future__ import annotations

import attrs
import pytest

from meshredirect.compiler import compile_policy
from meshredirect.ir import (
    Chain,
    ConnmarkSet,
    Direction,
    Family,
    Hook,
    IpSetMatch,
    OwnerKind,
    OwnerMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Rule,
    Ruleset,
    Table,
    iptables_base_chain,
)
from meshredirect.policy import Policy
from meshredirect.semantics.classes import connection_classes
from meshredirect.semantics.equivalence import compare_evaluations, equivalence_report, equivalent
from meshredirect.semantics.interpreter import Interpreter
from meshredirect.semantics.model import Environment
from meshredirect.values import IdSet, PortSet

ENV = Environment.default()


def nat_output(*rules: Rule) -> Ruleset:
    chain = Chain(name="OUTPUT", rules=rules, base=iptables_base_chain("nat", Hook.OUTPUT))
    return Ruleset(tables=(Table(family=Family.IPV4, name="nat", chains=(chain,)),))


def capture_unless_proxy(socketless: bool) -> Ruleset:
    owner = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337), negate=True, socketless=socketless)
    return nat_output(
        Rule(matches=(ProtocolMatch(protocol=Protocol.TCP), owner), target=Redirect(ports=PortSet.of(15001)))
    )


def test_a_ruleset_is_equivalent_to_itself_and_to_a_different_layout_of_the_same_policy() -> None:
    ruleset = compile_policy(Policy(families="dual", inbound_mode="TPROXY"))
    assert equivalent(ruleset, ruleset) == ()
    report = equivalence_report(compile_policy(Policy()), compile_policy(Policy(one_rule_per_port=True)))
    assert report.equivalent and report.paths < report.classes


def test_xt_owner_and_nft_skuid_differ_on_socketless_packets() -> None:
    differences = equivalent(capture_unless_proxy(socketless=True), capture_unless_proxy(socketless=False), ENV)
    assert differences
    assert all(d.example.socket is None and d.example.protocol is Protocol.TCP for d in differences)
    first = differences[0]
    assert first.aspect == "verdict"
    assert "socket none" in first.description
    assert str(first.first.verdict) == "redirected to 127.0.0.1:15001"
    assert str(first.second.verdict).startswith("passed to ")


def test_a_verdict_that_cannot_be_decided_is_a_difference() -> None:
    unknown = nat_output(Rule(matches=(IpSetMatch(name="mesh", flags=(Direction.DESTINATION,)),), target=Redirect()))
    differences = equivalent(unknown, unknown, ENV)
    assert differences and {d.aspect for d in differences} == {"unknown"}


def test_a_different_connection_mark_is_a_difference() -> None:
    plain = nat_output()
    marked = nat_output(Rule(matches=(ProtocolMatch(protocol=Protocol.UDP),), target=ConnmarkSet(value=7)))
    differences = equivalent(plain, marked, ENV)
    assert differences and {d.aspect for d in differences} == {"ctmark"}
    assert all(d.example.protocol is Protocol.UDP for d in differences)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Policy(), Policy(inbound_ports_exclude="22")),
        (Policy(), Policy(outbound_cidrs_exclude="10.96.0.0/12")),
        (Policy(inbound_mode="TPROXY"), Policy()),
        (Policy(), Policy(one_rule_per_port=True)),
    ],
)
def test_equivalence_agrees_with_comparing_every_class_one_by_one(a: Policy, b: Policy) -> None:
    first, second = compile_policy(a), compile_policy(b)
    env = Environment.for_policy(a).covering(first, second)
    env = attrs.evolve(env, local_marks=Environment.for_policy(b).local_marks or env.local_marks)
    one, two = Interpreter(first, env), Interpreter(second, env)
    differing = sum(
        compare_evaluations(one.evaluate(c, trace=False), two.evaluate(c, trace=False)) is not None
        for c in connection_classes([first, second], env)
    )
    assert (differing > 0) == bool(equivalent(first, second, env))
