"""The public testing toolkit: each assertion seen to pass on sound rules and fail on broken ones, the
strategies' values valid, every mutation changing what it says, and every bad input refused with its message.

The assertions' proofs are exact for a ruleset, so these are fixed cases plus
properties over generated policies with explicit example counts (a proof of a
generated policy costs tens of milliseconds).
"""

from __future__ import annotations

import ipaddress
import re

import attrs
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meshredirect.compiler import compile_policy
from meshredirect.ir import Chain, Family, Hook, Protocol, Return, Ruleset
from meshredirect.policy import Policy
from meshredirect.semantics import Connection, Dropped, Environment, Passed, Redirected, Unknown, evaluate
from meshredirect.testing import (
    BypassError,
    LoopError,
    Mutation,
    NotApplicable,
    NotEquivalentError,
    RedirectAssertionError,
    UnsoundError,
    VerdictError,
    applicable,
    as_ruleset,
    assert_equivalent,
    assert_loop_free,
    assert_no_bypass,
    assert_sound,
    assert_verdict,
    connections,
    environments,
    mutate,
    policies,
    rulesets,
)
from meshredirect.testing.pytest_plugin import load_into
from meshredirect.testing.strategies import SPECIAL_ADDRESSES

DEFAULT = compile_policy(Policy())
#: The mutations that make the default (REDIRECT) rules loop.
LOOPING = (Mutation.DROP_PROXY_EXEMPTIONS, Mutation.DROP_PASSTHROUGH, Mutation.SWAP_LISTENERS, Mutation.REDIRECT_ALL)
#: The fields a cheaper policy strategy varies (a proof of a fully random policy can take seconds).
VARIED = [
    "inbound_mode",
    "families",
    "outbound_ports_exclude",
    "inbound_ports_exclude",
    "outbound_cidrs_exclude",
    "dns",
]
SLOW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- assertions on sound rules


def test_the_default_rules_pass_every_assertion() -> None:
    assert_loop_free(DEFAULT)
    assert_loop_free(Policy())
    assert_no_bypass(DEFAULT, Policy())
    assert_no_bypass(Policy(outbound_cidrs_exclude="10.96.0.0/12"), {"outbound_cidrs_exclude": "10.96.0.0/12"})
    assert_equivalent(DEFAULT, Policy())
    env = Environment.default()
    assert_verdict(DEFAULT, Connection.local(env, dst="93.184.216.34", dport=80, uid=1337, gid=1337), Passed)
    assert_verdict(
        DEFAULT,
        Connection.local(env, dst="93.184.216.34", dport=80),
        Redirected(address=ipaddress.ip_address("127.0.0.1"), port=15001),
    )


# ----------------------------------------------------------------------------- each checker fails on broken input


@pytest.mark.parametrize("mutation", LOOPING, ids=lambda m: m.name)
def test_each_looping_mutation_is_caught_with_a_connection_that_loops(mutation: Mutation) -> None:
    with pytest.raises(LoopError) as caught:
        assert_loop_free(mutate(DEFAULT, mutation))
    error = caught.value
    assert error.connection is not None and error.counterexamples >= 1
    assert error.headline.startswith("not loop-free on ")
    assert "traffic loop: " in error.headline and "is intercepted again and again (6 steps and on)" in error.headline
    assert "chain:\n  1. " in error.explanation
    assert "  ... and so on: the chain does not end within 6 steps" in error.explanation or (
        re.search(r"\n  \.\.\. connection \d is connection \d again: a loop\n", error.explanation)
    )
    assert f"trace of step 1: {error.connection}\n  == OUTPUT" in error.explanation or (
        f"trace of step 1: {error.connection}\n  == PREROUTING" in error.explanation
    )


def test_a_loop_failure_reads_as_the_chain_and_its_traces() -> None:
    """The failure's layout and the chain's meaning are pinned; which representative the engine picks is not."""
    with pytest.raises(LoopError) as caught:
        assert_loop_free(mutate(DEFAULT, Mutation.DROP_PASSTHROUGH))
    text = str(caught.value)
    lines = text.splitlines()
    assert re.fullmatch(
        r"not loop-free on \d+ classes of connections, e\.g\. traffic loop: tcp (\S+) -> (\S+) (remote in|local) .+ "
        r"is intercepted again and again \(6 steps and on\)",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("class: ipv4 tcp ")
    assert lines[2] == "chain:"
    assert re.fullmatch(r"  1\. tcp .+  captured to the inbound listener", lines[3]), lines[3]
    # the proxy's connection to the app, from the passthrough source over lo, captured again and again
    passthrough = r"tcp 127\.0\.0\.6:43210 -> (\S+) local uid=1337 gid=1337 out lo  captured to the inbound listener"
    assert re.fullmatch(rf"  2\. {passthrough}", lines[4]), lines[4]
    assert re.fullmatch(rf"  3\. {passthrough}", lines[5]), lines[5]
    assert "  ... connection 3 is connection 2 again: a loop" in lines
    assert "trace of step 1: " in text and "trace of step 3: " in text and "trace of step 4: " not in text
    assert "    nat ISTIO_OUTPUT #1: -s 127.0.0.6/32 -o lo -j RETURN  [no match]" not in text  # the rule is gone
    assert (
        "    nat ISTIO_OUTPUT #1: ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT  [matched]" in lines
    )
    assert "(the traces of steps 4 to 6 are left out)" in lines
    others = lines[lines.index("other counterexamples:") + 1 :]
    assert 1 <= len(others) <= 5
    assert all(line.startswith("  traffic loop: tcp ") for line in others[:4])
    assert re.fullmatch(r"  \.\.\. and \d+ more", others[-1]) or len(others) < 5


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
@pytest.mark.parametrize("mutation", list(Mutation), ids=lambda m: m.name)
def test_every_mutation_makes_the_full_check_fail(mutation: Mutation, mode: str) -> None:
    policy = Policy(inbound_mode=mode, families={Family.IPV4, Family.IPV6})
    assert_sound(policy)
    broken = mutate(compile_policy(policy), mutation, Environment.for_policy(policy).proxy)
    with pytest.raises(UnsoundError) as caught:
        assert_sound(broken, policy)
    expected = {
        Mutation.DROP_PROXY_EXEMPTIONS: {"LOOP", "PROXY_TO_OUTBOUND"},
        Mutation.DROP_PASSTHROUGH: {"LOOP", "PASSTHROUGH"},
        Mutation.CAPTURE_LOOPBACK: {"PROXY_PORTS"},
        Mutation.SWAP_LISTENERS: {"LOOP", "PROXY_TO_OUTBOUND", "OUTBOUND_COMPLETE", "INBOUND_COMPLETE"},
        Mutation.REDIRECT_ALL: {"LOOP", "PROXY_TO_OUTBOUND", "PASSTHROUGH", "PROXY_PORTS", "EXCLUSIONS"},
    }[mutation]
    assert set(caught.value.properties) == expected
    if len(expected) > 1:
        assert "\nalso failing:\n  " in str(caught.value)


#: What the full check reports first for each mutation of the default (REDIRECT) rules, and the rest.
SOUND_FAILURES = {
    Mutation.DROP_PROXY_EXEMPTIONS: ("LOOP", ("PROXY_TO_OUTBOUND",)),
    Mutation.DROP_PASSTHROUGH: ("LOOP", ("PASSTHROUGH",)),
    Mutation.CAPTURE_LOOPBACK: ("PROXY_PORTS", ()),
    Mutation.SWAP_LISTENERS: ("LOOP", ("PROXY_TO_OUTBOUND", "OUTBOUND_COMPLETE", "INBOUND_COMPLETE")),
    Mutation.REDIRECT_ALL: ("LOOP", ("PROXY_TO_OUTBOUND", "PASSTHROUGH", "PROXY_PORTS", "EXCLUSIONS")),
}


def test_assert_sound_passes_on_sound_rules_in_every_form() -> None:
    """A policy, its compiled rules, their iptables text and the rules of both modes and families pass."""
    from meshredirect.api import render

    text = render(DEFAULT, "iptables-save").text()
    assert_sound(Policy())
    assert_sound(DEFAULT)
    assert_sound(DEFAULT, Policy())
    assert_sound(text, Policy())
    for mode in ("REDIRECT", "TPROXY"):
        policy = Policy(inbound_mode=mode, families={Family.IPV4, Family.IPV6}, outbound_ports_exclude="22")
        assert_sound(policy)
        assert_sound(compile_policy(policy), policy)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(base=Policy(), vary=VARIED))
def test_assert_sound_passes_on_the_rules_of_istio_like_policies(policy: Policy) -> None:
    assert_sound(compile_policy(policy), policy)


@pytest.mark.parametrize("mutation", list(Mutation), ids=lambda m: m.name)
def test_assert_sound_fails_on_each_mutation_with_a_readable_counterexample(mutation: Mutation) -> None:
    """The failure names the first failing property, a concrete connection, its class, its chain of
    interceptions and its trace (ending in the verdict), then every other failing property with its count."""
    from meshredirect.semantics.check import Property

    first, others = SOUND_FAILURES[mutation]
    with pytest.raises(UnsoundError) as caught:
        assert_sound(mutate(DEFAULT, mutation), Policy())
    error = caught.value
    assert error.properties == (first, *others)
    assert isinstance(error, AssertionError) and error.connection is not None and error.counterexamples >= 1
    lines = str(error).splitlines()
    assert lines[0] == error.headline
    count = "1 class" if error.counterexamples == 1 else f"{error.counterexamples} classes"
    assert error.headline.startswith(f"{Property[first].value}: fails on {count} of connections, e.g. ")
    assert str(error.connection) in error.headline
    assert lines[1].startswith("class: ipv4 tcp ")
    assert lines[2] == "chain:" and lines[3].startswith(f"  1. {error.connection}  ")
    step1 = lines.index(f"trace of step 1: {error.connection}")
    assert lines[step1 + 1] in ("  == OUTPUT (out eth0)", "  == OUTPUT (out lo)", "  == PREROUTING (in eth0)")
    assert any(line.startswith("  verdict: ") for line in lines[step1:])
    if others:
        also = lines[lines.index("also failing:") + 1 :]
        assert [re.sub(r" \(\d+ class(?:es)?\)$", "", line) for line in also] == [
            f"  {Property[name].value}" for name in others
        ]
    else:
        assert "also failing:" not in lines


def test_an_unsound_failure_reads_as_the_connection_its_chain_and_its_trace() -> None:
    """One failure pinned as text (the class count and the class's description aside: they are how the engine
    partitions): including 127.0.0.0/8 for capture sends the proxy's connection to its own listener to the
    inbound listener."""
    with pytest.raises(UnsoundError) as caught:
        assert_sound(mutate(DEFAULT, Mutation.CAPTURE_LOOPBACK), Policy())
    lines = re.sub(r" on \d+ class(?:es)? of", " on N classes of", str(caught.value)).splitlines()
    proxy = "tcp 10.0.0.5:43210 -> 127.0.0.1:15001 local uid=1337 gid=1000 out lo"
    assert lines[0] == (
        "the proxy's own ports and its DNS queries are never captured: fails on N classes of connections, "
        f"e.g. {proxy} to the proxy's own listener is captured (redirected to 127.0.0.1:15006)"
    )
    assert lines[1].startswith("class: ipv4 tcp local; ") and "dst 127.0.0.1; dport 15001; " in lines[1]
    assert lines[2:6] == [
        "chain:",
        f"  1. {proxy}  captured to the inbound listener "
        "(the proxy refuses it: its original destination is the proxy's own listener)",
        f"trace of step 1: {proxy}",
        "  == OUTPUT (out lo)",
    ]
    assert lines[lines.index("  verdict: redirected to 127.0.0.1:15006") + 1 :] == [
        "other counterexamples:",
        "  tcp 10.0.0.5:43210 -> 127.0.0.1:15001 local uid=1000 gid=1337 out lo to the proxy's own listener "
        "is captured (redirected to 127.0.0.1:15006)",
    ]


def test_assert_sound_without_a_policy_proves_no_completeness() -> None:
    """Rules that capture nothing are sound on their own, and fail once the policy says what to capture."""
    nothing = Ruleset()
    assert_sound(nothing)
    with pytest.raises(UnsoundError) as caught:
        assert_sound(nothing, Policy())
    assert caught.value.properties == ("OUTBOUND_COMPLETE", "INBOUND_COMPLETE")
    with pytest.raises(ValueError, match=r"^expected a policy with numeric owner groups, got group names java: "):
        assert_sound(DEFAULT, Policy(owner_groups_exclude="java"))


def test_capturing_loopback_captures_the_proxys_own_connections_to_localhost() -> None:
    broken = mutate(DEFAULT, Mutation.CAPTURE_LOOPBACK)
    env = Environment.default()
    proxy_to_localhost = Connection.local(env, dst="127.0.0.1", dport=8080, uid=1337, gid=1337)
    assert_verdict(DEFAULT, proxy_to_localhost, Passed)
    with pytest.raises(VerdictError) as caught:
        assert_verdict(broken, proxy_to_localhost, Passed)
    assert caught.value.headline == (
        "tcp 127.0.0.1:43210 -> 127.0.0.1:8080 local uid=1337 gid=1337 out lo: expected passed, "
        "got redirected to 127.0.0.1:15006"
    )
    with pytest.raises(NotEquivalentError):
        assert_equivalent(DEFAULT, broken)


def test_the_bypass_check_catches_rules_that_capture_nothing_outbound() -> None:
    no_outbound = attrs.evolve(
        DEFAULT,
        tables=tuple(
            attrs.evolve(
                t,
                chains=tuple(
                    attrs.evolve(c, rules=tuple(r for r in c.rules if r.target != Return() or r.matches))
                    if c.name != "ISTIO_REDIRECT"
                    else attrs.evolve(c, rules=())
                    for c in t.chains
                ),
            )
            for t in DEFAULT.tables
        ),
    )
    assert_loop_free(no_outbound)
    with pytest.raises(BypassError) as caught:
        assert_no_bypass(no_outbound, Policy())
    assert re.fullmatch(
        r"the proxy is bypassed on \d+ class(?:es)? of connections, e\.g\. mesh bypass: tcp 10\.0\.0\.5:\d+ -> "
        r"(\S+):(\d+) local uid=1000 gid=1000 out eth0 should reach the proxy's outbound listener "
        r"\(outbound_cidrs is '\*'\), but: passed to \1:\2 \(sent out\)",
        caught.value.headline,
    ), caught.value.headline


def test_the_bypass_check_catches_swapped_listeners_inbound() -> None:
    with pytest.raises(BypassError) as caught:
        assert_no_bypass(mutate(DEFAULT, Mutation.SWAP_LISTENERS), Policy())
    assert "should reach the proxy's outbound listener" in caught.value.headline
    assert "redirected to 127.0.0.1:15006" in caught.value.headline


def test_equivalence_failures_show_both_traces() -> None:
    with pytest.raises(NotEquivalentError) as caught:
        assert_equivalent(Policy(), Policy(outbound_ports_exclude="5432"))
    error = caught.value
    assert error.counterexamples >= 1 and error.connection is not None
    lines = str(error).splitlines()
    assert lines[1] == "  first:  redirected to 127.0.0.1:15001"
    assert lines[2] == f"  second: passed to {error.connection.dst}:5432 (sent out)"
    assert lines[3] == "  differs in: verdict"
    assert "trace in the first:" in lines and "trace in the second:" in lines
    assert "    nat ISTIO_OUTPUT #1: -p tcp --dport 5432 -j RETURN  [matched]" in lines


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_equivalence_takes_any_mix_of_ir_iptables_text_nft_json_policies_and_files(mode: str, tmp_path: object) -> None:
    from pathlib import Path

    from meshredirect.api import render

    assert isinstance(tmp_path, Path)
    policy = Policy(inbound_mode=mode, outbound_ports_exclude="22")
    ruleset = compile_policy(policy)
    saved = render(ruleset, "iptables-save").text()
    nft = render(ruleset, "nftables-json").text()
    (tmp_path / "rules.json").write_text(nft)
    forms = [policy, ruleset, saved, nft, tmp_path / "rules.json"]
    for first, second in zip(forms, forms[1:] + forms[:1], strict=True):
        assert_equivalent(first, second)
    broken = mutate(ruleset, Mutation.DROP_PASSTHROUGH, Environment.for_policy(policy).proxy)
    with pytest.raises(NotEquivalentError) as caught:
        assert_equivalent(nft, broken)
    assert caught.value.connection is not None and "  differs in: " in str(caught.value)


def test_verdict_failures_name_the_connection_both_verdicts_and_the_trace() -> None:
    env = Environment.default()
    app = Connection.local(env, dst="93.184.216.34", dport=80)
    with pytest.raises(VerdictError) as caught:
        assert_verdict(DEFAULT, app, Dropped)
    assert str(caught.value).splitlines() == [
        "tcp 10.0.0.5:43210 -> 93.184.216.34:80 local uid=1000 gid=1000 out eth0: expected dropped, "
        "got redirected to 127.0.0.1:15001",
        "  == OUTPUT (out eth0)",
        "    nat OUTPUT #1: -p tcp -j ISTIO_OUTPUT  [matched]",
        "    nat ISTIO_OUTPUT #1: -s 127.0.0.6/32 -o lo -j RETURN  [no match]",
        "    nat ISTIO_OUTPUT #2: ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT  [no match]",
        "    nat ISTIO_OUTPUT #3: ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --gid-owner 1337 "
        "-j ISTIO_IN_REDIRECT  [no match]",
        "    nat ISTIO_OUTPUT #4: -m owner --uid-owner 1337 -j RETURN  [no match]",
        "    nat ISTIO_OUTPUT #5: -m owner --gid-owner 1337 -j RETURN  [no match]",
        "    nat ISTIO_OUTPUT #6: -o lo -j RETURN  [no match]",
        "    nat ISTIO_OUTPUT #7: -d 127.0.0.1/32 -j RETURN  [no match]",
        "    nat ISTIO_OUTPUT #8: -j ISTIO_REDIRECT  [matched]",
        "    nat ISTIO_REDIRECT #1: -p tcp -j REDIRECT --to-ports 15001  [matched] destination 93.184.216.34:80 "
        "-> 127.0.0.1:15001",
        "    rerouted: out lo (was eth0)",
        "  == POSTROUTING (out lo)",
        "    loops back over lo",
        "  == PREROUTING (in lo)",
        "    skipped nat PREROUTING: the destination NAT of this connection was decided on an earlier hook",
        "  == INPUT (in lo)",
        "  verdict: redirected to 127.0.0.1:15001",
    ]
    assert isinstance(caught.value, AssertionError) and isinstance(caught.value, RedirectAssertionError)


def test_an_undecidable_rule_fails_the_loop_proof() -> None:
    from meshredirect.ir import UnknownMatch

    output = DEFAULT.tables[0].chain("ISTIO_OUTPUT")
    unknown = attrs.evolve(output.rules[0], matches=(UnknownMatch(dialect="iptables", tokens=("-m", "bpf")),))
    ruleset = _replace_chain(DEFAULT, attrs.evolve(output, rules=(unknown, *output.rules)))
    with pytest.raises(LoopError) as caught:
        assert_loop_free(ruleset)
    assert "cannot be decided: nat ISTIO_OUTPUT #1: match [iptables: -m bpf] is not modelled" in caught.value.headline


def _replace_chain(ruleset: Ruleset, chain: Chain) -> Ruleset:
    table = ruleset.tables[0]
    chains = tuple(chain if c.name == chain.name else c for c in table.chains)
    return attrs.evolve(ruleset, tables=(attrs.evolve(table, chains=chains), *ruleset.tables[1:]))


# ----------------------------------------------------------------------------- mutations


def test_every_mutation_applies_to_the_default_rules_and_changes_them() -> None:
    assert applicable(DEFAULT) == tuple(Mutation)
    for mutation in Mutation:
        assert mutate(DEFAULT, mutation) != DEFAULT


def test_redirect_all_creates_the_nat_output_chain_where_there_is_none() -> None:
    broken = mutate(Ruleset(), Mutation.REDIRECT_ALL)
    (table,) = broken.tables
    assert (table.family, table.name) == (Family.IPV4, "nat")
    assert table.base_chains(Hook.OUTPUT)[0].rules[0].target.ports is not None  # type: ignore[union-attr]
    with pytest.raises(LoopError):
        assert_loop_free(broken)


@SLOW
@given(rulesets(policies(base=Policy(), vary=["outbound_ports_exclude", "inbound_ports_exclude"]), mutations=LOOPING))
def test_looping_mutations_of_istio_like_policies_are_always_caught(case: object) -> None:
    from meshredirect.testing import RulesetCase

    assert isinstance(case, RulesetCase) and case.mutation in LOOPING
    with pytest.raises(LoopError):
        assert_loop_free(case.ruleset, case.env)


@settings(max_examples=4, deadline=None)  # a full proof of a broken TPROXY dual-stack policy takes ~2 s
@given(rulesets(policies(base=Policy(), vary=VARIED), mutations=[Mutation.REDIRECT_ALL]))
def test_redirecting_everything_loops_whatever_the_policy(case: object) -> None:
    from meshredirect.testing import RulesetCase

    assert isinstance(case, RulesetCase)
    with pytest.raises(LoopError):
        assert_loop_free(case.ruleset, case.env)


@settings(max_examples=40, deadline=None)
@given(rulesets(mutations=tuple(Mutation)))
def test_a_drawn_mutation_changes_the_compiled_rules(case: object) -> None:
    from meshredirect.testing import RulesetCase

    assert isinstance(case, RulesetCase) and case.mutation is not None
    compiled = compile_policy(case.policy)
    assert case.ruleset != compiled
    assert case.mutation in applicable(compiled, case.env.proxy) or case.mutation is Mutation.REDIRECT_ALL


# ----------------------------------------------------------------------------- strategies


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_drawn_connections_are_valid_and_the_compiled_rules_decide_them(data: st.DataObject) -> None:
    policy = data.draw(policies(inbound_mode="REDIRECT"))
    env = data.draw(environments(st.just(policy)))
    connection = data.draw(connections(env))
    assert connection.family in (Family.IPV4, Family.IPV6)
    if connection.socket is None and connection.iif is None:
        assert connection.oif is not None  # a socketless local packet
    if connection.iif is not None:
        assert connection.iif != "lo" and not env.is_local(connection.src) and not env.is_loopback(connection.src)
    verdict = evaluate(compile_policy(policy), connection, env).verdict
    assert not isinstance(verdict, Unknown)


def test_connections_reach_the_special_addresses_and_ports() -> None:
    """Each special case is drawn, and soon (a search per case, not a sample that may miss one)."""
    from hypothesis import find

    search = settings(max_examples=2000, database=None, deadline=None, derandomize=True, phases=[Phase.generate])
    tcp = connections(protocols=[Protocol.TCP])
    for address in ("127.0.0.1", "127.0.0.6", "::1", "::6", "10.0.0.5", "fd00::5"):
        find(tcp, lambda c, a=address: str(c.dst) == a, settings=search)  # type: ignore[misc]
    for passthrough in ("127.0.0.6", "::6"):
        find(tcp, lambda c, a=passthrough: str(c.src) == a and c.oif == "lo", settings=search)  # type: ignore[misc]
    for port in (15001, 15006, 15008, 15020, 15090, 53):
        find(tcp, lambda c, p=port: c.dport == p, settings=search)  # type: ignore[misc]
    find(tcp, lambda c: c.socket is None and c.iif is None, settings=search)  # local without a socket
    find(tcp, lambda c: c.socket is not None and c.socket.uid == 1337, settings=search)  # as the proxy
    find(tcp, lambda c: c.iif is not None, settings=search)  # from a peer
    assert set(SPECIAL_ADDRESSES) == {4, 6}


@settings(max_examples=20, deadline=None)
@given(policies(base=Policy(), vary=["outbound_cidrs_exclude"]), policies(families=st.just({Family.IPV6})))
def test_policies_keep_the_base_and_honour_biases(varied: Policy, ipv6: Policy) -> None:
    assert attrs.evolve(varied, outbound_cidrs_exclude=Policy().outbound_cidrs_exclude) == Policy()
    assert ipv6.families == {Family.IPV6}


# ----------------------------------------------------------------------------- bad input, pinned


def test_bad_input_is_refused_with_what_was_expected() -> None:
    with pytest.raises(TypeError, match=r"^expected fields of Policy \(.*\), got 'bogus'$"):
        policies(bogus=1)
    with pytest.raises(TypeError, match=r"^vary names the fields drawn at random; it needs a base policy for the"):
        policies(vary=["outbound_port"])
    with pytest.raises(ValueError, match=r"^expected at least one family and one protocol$"):
        connections(families=[])
    with pytest.raises(ValueError, match=r"^expected policy fields \(.*\), got 'outbound_port_exclude'$"):
        assert_no_bypass(Policy(), {"outbound_port_exclude": "22"})
    with pytest.raises(TypeError, match=r"^expected a Policy or a mapping of policy fields, got int$"):
        assert_no_bypass(Policy(), 22)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^expected a policy with numeric owner groups, got group names java: resolve"
    ):
        assert_no_bypass(Policy(), Policy(owner_groups_exclude="java"))
    with pytest.raises(TypeError, match=r"^expected a verdict or a verdict class \(Passed, Redirected, TProxied, "):
        assert_verdict(Policy(), Connection.remote(src="203.0.113.1", dst="10.0.0.5", dport=80), "redirected")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^expected rules \(a Ruleset, a Policy, .*\), got list \[\]$"):
        assert_loop_free([])  # type: ignore[arg-type]
    with pytest.raises(NotApplicable, match=r"^CAPTURE_LOOPBACK changes nothing in this ruleset: it has no rule that"):
        mutate(Ruleset(), Mutation.CAPTURE_LOOPBACK)
    with pytest.raises(ValueError, match=r"^expected an iptables variant, one of nft, legacy; got 'xtables'$"):
        load_into(None, Policy(), variant="xtables")  # type: ignore[arg-type]


def test_as_ruleset_compiles_policies_and_keeps_rulesets() -> None:
    assert as_ruleset(DEFAULT) is DEFAULT
    assert as_ruleset(Policy()) == DEFAULT


# ----------------------------------------------------------------------------- the downstream package


def test_the_downstream_tests_use_only_the_public_api() -> None:
    """``tests/downstream`` stands for another project: it imports meshredirect's public names only."""
    import ast
    import sys
    from pathlib import Path

    allowed_roots = {"pytest", "hypothesis", "attrs", "meshredirect", *sys.stdlib_module_names}
    downstream = Path(__file__).parent / "downstream"
    files = sorted(downstream.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module == "conftest", f"{path.name}: relative import of {node.module}"
                    continue
                modules = [(node.module or "", [alias.name for alias in node.names])]
            else:
                continue
            for module, names in modules:
                if module == "__future__":
                    continue
                assert module.split(".")[0] in allowed_roots, f"{path.name}: imports {module}"
                assert not any(part.startswith("_") for part in module.split(".")), f"{path.name}: {module}"
                assert not any(name.startswith("_") for name in names), f"{path.name}: {module} {names}"


def test_the_failure_shown_in_the_docs_is_the_real_one() -> None:
    """docs/testing.md shows a real failure (the class count aside: it is how the engine partitions)."""
    from pathlib import Path

    def counted(text: str) -> str:
        return re.sub(r" on \d+ class(?:es)? of connections", " on N classes of connections", text)

    page = counted((Path(__file__).parent.parent / "docs" / "testing.md").read_text())
    with pytest.raises(LoopError) as caught:
        assert_loop_free(mutate(DEFAULT, Mutation.DROP_PASSTHROUGH))
    lines = counted(str(caught.value)).splitlines()
    step2 = next(i for i, line in enumerate(lines) if line.startswith("trace of step 2: "))
    for line in [*lines[:6], *lines[step2 : step2 + 5]]:
        assert f"\n{line}\n" in page, line


def test_rules_text_that_cannot_be_read_fails_with_the_readers_message(tmp_path: object) -> None:
    from pathlib import Path

    from meshredirect.errors import SourceError

    assert isinstance(tmp_path, Path)
    bad = tmp_path / "node.rules"
    bad.write_text("*nat\n-A OUTPUT -p tcp -j REDIRECT --to-ports 15001\n")
    with pytest.raises(SourceError) as caught:
        assert_loop_free(bad)
    assert str(caught.value).startswith(f"{bad}:2:")
    assert "expected COMMIT before the end of the input (table nat opened at line 1)" in str(caught.value)
    dump = tmp_path / "dump.json"
    dump.write_text('{"nftables": [{"rule": {"family": "ip", "table": "t", "chain": "c", "expr": []}}]}\n')
    with pytest.raises(SourceError) as caught:
        assert_equivalent(dump, Policy())
    assert str(caught.value).startswith(f"{dump}:1:")
    with pytest.raises(SourceError) as caught:
        as_ruleset("*nat\n-A OUTPUT -j\n")
    assert str(caught.value).startswith("<rules>:2:")


# ----------------------------------------------------------------------------- documentation

#: The toolkit's modules: every name they export is in the API reference with a runnable example.
TOOLKIT_MODULES = ("assertions", "strategies", "mutations", "pytest_plugin", "netns")


def test_every_public_name_of_the_toolkit_is_in_the_api_reference_with_an_example() -> None:
    """Functions, classes and fixtures teach with a doctest (run by --doctest-modules); constants carry a ``#:``
    comment (what autodoc shows); every module is in the API reference, and every name of the package is one
    of theirs."""
    import importlib
    import sys
    from pathlib import Path

    pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')")
    from sphinx.pycode import ModuleAnalyzer

    import meshredirect.testing as package

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "_ext"))
    import meshredirect_docs

    reference = meshredirect_docs.api_modules()
    exported: set[str] = set()
    for short in TOOLKIT_MODULES:
        name = f"meshredirect.testing.{short}"
        module = importlib.import_module(name)
        assert f"\n.. automodule:: {name}\n" in reference, name
        assert ">>>" in (module.__doc__ or ""), name
        documented = ModuleAnalyzer.for_module(name).find_attr_docs()
        for public in module.__all__:
            value = getattr(module, public)
            exported.add(public)
            if isinstance(value, type) or callable(value):
                doc = vars(value).get("__doc__") if isinstance(value, type) else value.__doc__
                assert doc and ">>>" in doc, f"{name}.{public} has no example"
            else:
                assert ("", public) in documented, f"{name}.{public} is not documented (a #: comment)"
    assert set(package._EXPORTS) <= exported
    assert all(package._EXPORTS[n] in {f"meshredirect.testing.{m}" for m in TOOLKIT_MODULES} for n in package._EXPORTS)


def test_the_code_on_the_testing_page_runs() -> None:
    """The page's inline examples run (the longer ones are included from tests/downstream, which run as tests)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/testing.md", "exec"), {})
    included = re.findall(r"```\{literalinclude\} \.\./(\S+)\n", page)
    assert sorted(set(included)) == [
        "tests/downstream/test_my_kernel.py",
        "tests/downstream/test_my_nft_rules.py",
        "tests/downstream/test_my_node.py",
    ]
    for path in set(included):
        assert (Path(__file__).resolve().parent.parent / path).is_file()
