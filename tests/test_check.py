"""``check``: every generated policy's rules are proven sound; broken rules or proxies are caught.

The mutations are the classic ways transparent redirection loops or leaks;
each test asserts the concrete connection and the cycle the checker reports.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshredirect.compiler import compile_policy
from meshredirect.ir import AddressMatch, Direction, Jump, OwnerMatch, PortMatch, Rule, Ruleset, SetMark
from meshredirect.policy import Policy
from meshredirect.semantics.check import Property, check, checker
from meshredirect.semantics.interpreter import Interpreter
from meshredirect.semantics.model import Connection, Environment, Origin, Socket
from meshredirect.semantics.proxy import Arrival, ProxyModel, follow
from meshredirect.testing.strategies import connections, policies
from meshredirect.values import AddressSet

DEFAULT = Policy()
ENV = Environment.for_policy(DEFAULT)
APP = Socket(uid=1000, gid=1000)
PROXY = Socket(uid=1337, gid=1337)


def mutate(ruleset: Ruleset, chain: str, edit: object) -> Ruleset:
    """The ruleset with ``edit(rules) -> rules`` applied to every chain called ``chain``."""
    tables = []
    for table in ruleset.tables:
        chains = tuple(
            attrs.evolve(c, rules=tuple(edit(list(c.rules)))) if c.name == chain else c  # type: ignore[operator]
            for c in table.chains
        )
        tables.append(attrs.evolve(table, chains=chains))
    return attrs.evolve(ruleset, tables=tuple(tables))


def without(predicate: object) -> object:
    return lambda rules: [r for r in rules if not predicate(r)]  # type: ignore[operator]


def is_owner_return(rule: Rule) -> bool:
    return (
        len(rule.matches) == 1
        and isinstance(rule.matches[0], OwnerMatch)
        and rule.target.__class__.__name__ == "Return"
    )


def is_passthrough_return(rule: Rule) -> bool:
    return any(isinstance(m, AddressMatch) and m.direction is Direction.SOURCE for m in rule.matches)


# ----------------------------------------------------------------------------- every generated policy


@example(DEFAULT)
@example(Policy(inbound_mode="TPROXY"))  # the proxy's transparent connection to the app was hairpinned: a loop
@example(Policy(inbound_mode="TPROXY", inbound_ports=""))  # the same without inbound capture
@example(Policy(inbound_mode="TPROXY", dns={"enabled": True, "servers": ["127.0.0.53"]}))  # the proxy's DNS TPROXY'd
@example(Policy(inbound_mode="TPROXY", reroute_interfaces="eth1"))  # a VM's outbound traffic TPROXY'd inbound
@example(Policy(loopback_capture="all"))  # an app's connection to the tunnel port over lo sent outbound
@example(Policy(reroute_interfaces="eth1", outbound_ports_exclude="3306"))  # a VM's excluded port captured
@example(Policy(families="dual", dns={"enabled": True, "capture_all": True}, loopback_capture="all"))
@given(policies())
def test_every_generated_policy_is_proven_sound_and_complete(policy: Policy) -> None:
    report = check(policy)
    assert report.ok, report.summary(examples=1)


@settings(max_examples=100)
@given(st.data())
def test_no_connection_of_a_generated_policy_violates_anything(data: st.DataObject) -> None:
    # The proof above covers every class; here arbitrary connections (not class representatives)
    # are checked one by one: a class that wrongly merged two behaviours would show up.
    policy = data.draw(policies(), label="policy")
    checking = checker(policy)
    for _ in range(8):
        connection = data.draw(connections(checking.env), label="connection")
        assert checking.violations_of(connection) == (), str(connection)


def test_the_report_counts_the_proof() -> None:
    report = check(DEFAULT)
    assert report.ok
    assert report.paths < report.classes
    assert report.properties == tuple(Property)
    assert (
        report.summary().splitlines()[0]
        == f"checked {report.classes} classes of connections along {report.paths} paths"
    )


def test_a_ruleset_alone_is_checked_for_the_properties_that_need_no_policy() -> None:
    report = check(compile_policy(DEFAULT))
    assert report.ok
    assert Property.OUTBOUND_COMPLETE not in report.properties
    with pytest.raises(TypeError, match="Policy or a Ruleset"):
        check("rules")


# ----------------------------------------------------------------------------- mutations: loops


def test_without_the_proxy_uid_and_gid_exemptions_the_proxy_loops_on_its_own_traffic() -> None:
    broken = mutate(compile_policy(DEFAULT), "ISTIO_OUTPUT", without(is_owner_return))
    report = check(broken, ENV)
    assert report.of(Property.LOOP) and report.of(Property.PROXY_TO_OUTBOUND)
    app = Connection.local(ENV, dst="93.184.216.34", dport=80, uid=1000, gid=1000)
    chain = follow(Interpreter(broken, ENV), app)
    assert chain.looped and chain.cycle() == (2, 3)
    upstream = chain.steps[1].connection
    assert (upstream.socket, upstream.dst, upstream.dport, upstream.oif) == (PROXY, app.dst, 80, "eth0")
    assert [s.arrival for s in chain.steps[:3]] == [Arrival.OUTBOUND] * 3
    assert all(s.captured for s in chain.steps)


def test_without_the_passthrough_rule_inbound_traffic_loops() -> None:
    broken = mutate(compile_policy(DEFAULT), "ISTIO_OUTPUT", without(is_passthrough_return))
    report = check(broken, ENV)
    assert report.of(Property.LOOP) and report.of(Property.PASSTHROUGH)
    inbound = Connection.remote(src="10.0.0.1", dst="10.0.0.5", dport=8080)
    chain = follow(Interpreter(broken, ENV), inbound)
    assert chain.looped and chain.cycle() == (2, 3)
    passthrough = chain.steps[1].connection
    assert (str(passthrough.src), passthrough.socket, str(passthrough.dst), passthrough.oif) == (
        "127.0.0.6",
        PROXY,
        "10.0.0.5",
        "lo",
    )
    assert [s.arrival for s in chain.steps[:3]] == [Arrival.INBOUND] * 3


def test_capturing_127_0_0_0_8_for_outbound_loops() -> None:
    # The policy refuses it, so the rule is written into the compiled IR by hand: what a generator
    # that puts CIDR inclusion first would emit.
    capture = Rule(
        matches=(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("127.0.0.0/8")),),
        target=Jump(chain="ISTIO_REDIRECT"),
    )
    broken = mutate(compile_policy(DEFAULT), "ISTIO_OUTPUT", lambda rules: [capture, *rules])
    assert check(broken, ENV).of(Property.LOOP)
    app = Connection.local(ENV, dst="127.0.0.5", dport=8080, uid=1000, gid=1000)
    chain = follow(Interpreter(broken, ENV), app)
    assert chain.looped and chain.cycle() == (2, 3)
    assert chain.steps[1].connection == Connection.local(
        ENV, dst="127.0.0.5", dport=8080, src="127.0.0.1", uid=1337, gid=1337
    )
    assert [s.arrival for s in chain.steps[:3]] == [Arrival.OUTBOUND] * 3


def test_an_inbound_proxy_that_forwards_through_the_outbound_port_loops() -> None:
    broken_proxy = ProxyModel(inbound_via_outbound=True)
    report = check(DEFAULT, model=broken_proxy)
    assert report.of(Property.LOOP)
    inbound = Connection.remote(src="10.0.0.1", dst="10.0.0.5", dport=8080)
    chain = follow(Interpreter(compile_policy(DEFAULT), ENV), inbound, model=broken_proxy)
    assert chain.looped and chain.cycle() == (2, 3)
    upstream = chain.steps[1].connection
    assert (str(upstream.src), upstream.socket, str(upstream.dst), upstream.dport, upstream.oif) == (
        "10.0.0.5",
        PROXY,
        "10.0.0.5",
        8080,
        "lo",
    )
    assert [s.arrival for s in chain.steps[:3]] == [Arrival.INBOUND] * 3


def test_the_stronger_bound_catches_a_chain_that_ends_after_two_captures() -> None:
    # Before its fix, the compiler's TPROXY hairpin marked the proxy's DNS queries too.
    policy = Policy(inbound_mode="TPROXY", dns={"enabled": True, "servers": ["127.0.0.53"]})

    def unskip(rules: list[Rule]) -> list[Rule]:
        return [
            attrs.evolve(r, matches=tuple(m for m in r.matches if not isinstance(m, PortMatch)))
            if isinstance(r.target, SetMark)
            else r
            for r in rules
        ]

    broken = mutate(compile_policy(policy), "ISTIO_OUTPUT", unskip)
    report = check(policy, ruleset=broken)
    assert report.of(Property.CAPTURE_BOUND) and report.of(Property.PROXY_PORTS) and not report.of(Property.LOOP)
    env = Environment.for_policy(policy)
    query = Connection.local(env, dst="127.0.0.53", dport=53, uid=1000, gid=1000)
    chain = follow(Interpreter(broken, env), query)
    assert not chain.looped
    assert chain.captures == (Arrival.DNS, Arrival.INBOUND)


# ----------------------------------------------------------------------------- completeness against a policy


def test_a_ruleset_that_captures_nothing_outbound_is_a_mesh_bypass() -> None:
    report = check(DEFAULT, ruleset=compile_policy(Policy(outbound_cidrs="")))
    bypass = report.of(Property.OUTBOUND_COMPLETE)
    assert bypass
    first = bypass[0]
    assert first.connection.origin is Origin.LOCAL and first.connection.socket is not None
    assert first.message.startswith(f"mesh bypass: {first.connection} should reach the proxy's outbound listener")


def test_an_exclusion_the_rules_ignore_is_reported() -> None:
    report = check(Policy(outbound_ports_exclude="22"), ruleset=compile_policy(DEFAULT))
    found = report.of(Property.EXCLUSIONS)
    assert found and all(v.connection.dport == 22 for v in found)
    assert (
        "(port 22 is in outbound_ports_exclude), but the rules intercept it: redirected to 127.0.0.1:15001"
        in found[0].message
    )


def test_inbound_connections_that_miss_the_inbound_port_are_reported() -> None:
    report = check(DEFAULT, ruleset=compile_policy(Policy(inbound_ports="")))
    found = report.of(Property.INBOUND_COMPLETE)
    assert found
    connection = found[0].connection
    assert connection.origin is Origin.REMOTE and str(connection.dst) == "10.0.0.5"


def test_a_violation_explains_itself_for_an_operator() -> None:
    broken = mutate(compile_policy(DEFAULT), "ISTIO_OUTPUT", without(is_passthrough_return))
    violation = check(broken, ENV).of(Property.PASSTHROUGH)[0]
    text = violation.explain()
    lines = text.splitlines()
    assert lines[0] == "VIOLATED: the inbound passthrough (127.0.0.6 / ::6 over lo) always passes"
    assert (
        "from 127.0.0.6 over lo does not pass (redirected to 127.0.0.1:15006): inbound traffic cannot reach the app"
        in lines[1]
    )
    assert "  chain:" in lines
    assert "  trace of step 1: " + str(violation.connection) in lines
    assert any(
        "nat ISTIO_OUTPUT #1: ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --uid-owner 1337" in line
        for line in lines
    )
