"""The one rule notation (meshredirect.notation): what trace, check, graph and the docs print.

Every IR node sample has a description of its own (no two alike), the texts
are pinned, they are ASCII, and the commands really print rules in it.
"""

from __future__ import annotations

import html

import attrs
import pytest
from hypothesis import given, settings

from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.graph import to_dot
from meshredirect.ir import AddressMatch, Direction, Return, Rule
from meshredirect.notation import MAX_SET_MEMBERS, describe_match, describe_rule, describe_target
from meshredirect.policy import Policy
from meshredirect.semantics.interpreter import RuleVisit, evaluate
from meshredirect.semantics.model import Connection, Environment
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS
from meshredirect.testing.strategies import policies
from meshredirect.values import AddressSet


def test_every_sample_node_has_its_own_description() -> None:
    for samples, describe in ((SAMPLE_MATCHES, describe_match), (SAMPLE_TARGETS, describe_target)):
        texts = [describe(node) for nodes in samples.values() for node in nodes]  # type: ignore[operator]
        assert all(texts), texts
        assert len(set(texts)) == len(texts), sorted(texts)


def test_descriptions_are_pinned() -> None:
    texts = {describe_match(node) for nodes in SAMPLE_MATCHES.values() for node in nodes}
    assert {
        "src 127.0.0.6/32",
        "dst != 127.0.0.0/8",
        "tcp dport != 15008",
        "udp sport 15053",
        "oif lo",
        "iif != eth+",
        "uid 1337",
        "gid != {101, 202}",
        "mark & 0xff != 0x53a",
        "ctstate RELATED,ESTABLISHED",
        "ctstate != INVALID",
        "dst type LOCAL",
        "dst in ipset mesh-excluded",
        "random 0.5",
        "every 3 from 1",
        "unknown iptables match: -m pkttype --pkt-type unicast",
    } <= texts
    targets = {describe_target(node) for nodes in SAMPLE_TARGETS.values() for node in nodes}
    assert {
        "REDIRECT :15001",
        "TPROXY :15006 mark 0x539",
        "TPROXY 127.0.0.1:15006 mark 0x1/0x1",
        "MARK set 0x53a",
        "CONNMARK save",
        "CT zone 2",
        "MASQUERADE :1024-2048",
        "SNAT to 10.0.0.1",
        "DNAT to 10.244.1.5 :8080",
        "REJECT with tcp-reset",
        "LOG 'mesh: '",
        "LOG level 6",
        "unknown iptables target: NOTRACK",
    } <= targets


def test_large_sets_show_their_first_members_and_how_many_more() -> None:
    networks = [f"10.{i}.0.0/16" for i in range(0, 40, 2)]
    text = describe_match(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of(*networks)))
    shown = ", ".join(networks[:MAX_SET_MEMBERS])
    assert text == f"dst {{{shown}, ... {len(networks) - MAX_SET_MEMBERS} more}}"
    assert describe_rule(Rule(target=Return())) == "any -> RETURN"


@settings(max_examples=50, deadline=None)
@given(policies())
def test_every_compiled_rule_is_described_in_ascii(policy: Policy) -> None:
    for _table, _chain, rule in compile_policy(policy).rules():
        text = describe_rule(rule)
        assert text.isascii() and "\n" not in text, text


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_trace_and_graph_print_the_same_notation(capsys: pytest.CaptureFixture[str]) -> None:
    """Each rule a trace visits is printed as describe_rule, and the diagram's row of that rule says the same."""
    policy = Policy()
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    evaluation = evaluate(ruleset, Connection.local(env, dst="93.184.216.34", dport=443), env)
    visits = [entry for entry in evaluation.trace if isinstance(entry, RuleVisit)]
    assert len(visits) == 10
    trace = _run(capsys, "trace", "--dst", "93.184.216.34", "--dport", "443", "--no-follow")
    dot = to_dot(ruleset)
    for visit in visits:
        text = describe_rule(visit.rule)
        assert f"{visit.table} {visit.chain} #{visit.index}: {text}  [{visit.result.value}]" in trace
        assert f">{visit.index}. {html.escape(text)}</TD>" in dot
    assert "-> jump ISTIO_REDIRECT  [matched]" in trace


def test_check_counterexamples_print_the_same_notation() -> None:
    """A counterexample's traces print the rules it visited as describe_rule does."""
    from meshredirect.semantics.check import check

    ruleset = compile_policy(Policy())
    nat = ruleset.tables[0]
    without_uid_exemption = attrs.evolve(
        nat,
        chains=tuple(
            attrs.evolve(chain, rules=tuple(r for r in chain.rules if describe_rule(r) not in _EXEMPTIONS))
            for chain in nat.chains
        ),
    )
    report = check(attrs.evolve(ruleset, tables=(without_uid_exemption,)), Environment.for_policy(Policy()))
    assert not report.ok
    text = report.summary(examples=1)
    assert "nat ISTIO_OUTPUT #6: any -> jump ISTIO_REDIRECT  [matched]" in text
    assert "-j " not in text and "--dport" not in text


_EXEMPTIONS = {"uid 1337 -> RETURN", "gid 1337 -> RETURN"}
