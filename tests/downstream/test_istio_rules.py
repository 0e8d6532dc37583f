"""Istio's own rule sets, proven loop-free with meshredirect's toolkit, and each one broken to see the proof fail.

Every Istio rule file (iptables, one per capture configuration and family) and
the seed rules (an Istio 1.4 pod's nat table):

- loop-free: no connection is intercepted again and again, and no chain
  captures more than once outbound then once inbound; except the two TPROXY
  cases, where the proof finds a loop (pinned below: a finding about Istio's
  TPROXY rules, the same the kernel shows for rules of that shape);
- property-tested with generated connections: the proxy's own connections
  never reach its outbound listener, and its inbound passthrough (from
  127.0.0.6 over lo) is never captured;
- broken on purpose (the nat rule that lets the passthrough pass removed):
  the proof then finds a loop, with a readable counterexample.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshredirect.semantics import Redirected, evaluate
from meshredirect.testing import LoopError, Mutation, assert_loop_free, assert_sound, connections, mutate

from .conftest import RuleFile, rule_files

#: Istio's TPROXY cases: the marked passthrough over lo is captured again by nat OUTPUT's lo hairpin.
TPROXY_FINDINGS = {"inbound-ports-tproxy", "inbound-ports-wildcard-tproxy"}


@pytest.mark.parametrize("rule_file", [f for f in rule_files() if f.case not in TPROXY_FINDINGS], ids=lambda f: f.name)
def test_istio_rules_are_loop_free(rule_file: RuleFile) -> None:
    assert_loop_free(rule_file.ruleset(), rule_file.env)


@pytest.mark.parametrize("case", sorted(TPROXY_FINDINGS))
def test_istio_tproxy_rules_loop(case: str) -> None:
    (rule_file,) = [f for f in rule_files() if f.case == case]
    with pytest.raises(LoopError) as caught:
        assert_loop_free(rule_file.ruleset(), rule_file.env)
    lines = str(caught.value).splitlines()
    found = re.search(
        r"traffic loop: tcp 203\.0\.113\.10:43210 -> 10\.0\.0\.5:(\d+) remote in eth0 is intercepted", lines[0]
    )
    assert found is not None, lines[0]
    port = int(found.group(1))
    assert port in ((31000, 32000) if case == "inbound-ports-tproxy" else (8080,))
    assert lines[3:6] == [
        f"  1. tcp 203.0.113.10:43210 -> 10.0.0.5:{port} remote in eth0  captured to the inbound listener",
        f"  2. tcp 203.0.113.10:43210 -> 10.0.0.5:{port} local uid=1337 gid=1337 mark=0x539 out lo  "
        "captured to the inbound listener",
        f"  3. tcp 203.0.113.10:43210 -> 10.0.0.5:{port} local uid=1337 gid=1337 mark=0x539 out lo  "
        "captured to the inbound listener",
    ]
    # the marked passthrough is let through by mangle OUTPUT, not by nat OUTPUT: its lo hairpin takes it again
    step2 = lines.index(
        f"trace of step 2: tcp 203.0.113.10:43210 -> 10.0.0.5:{port} local uid=1337 gid=1337 mark=0x539 out lo"
    )
    assert lines[step2 + 1 : step2 + 7] == [
        "  == OUTPUT (out lo)",
        "    mangle OUTPUT #1: oif lo, proto tcp, mark 0x539 -> RETURN  [matched]",
        "    mangle OUTPUT: RETURN from the base chain: policy ACCEPT",
        "    nat OUTPUT #1: any -> jump ISTIO_OUTPUT  [matched]",
        "    nat ISTIO_OUTPUT #1: src 127.0.0.6/32, oif lo -> RETURN  [no match]",
        "    nat ISTIO_OUTPUT #2: dst != 127.0.0.1/32, oif lo, tcp dport != 15008, uid 1337 "
        "-> jump ISTIO_IN_REDIRECT  [matched]",
    ]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_proxy_never_reaches_its_outbound_port_and_its_passthrough_is_never_captured(data: st.DataObject) -> None:
    rule_file = data.draw(st.sampled_from(rule_files()), label="rule file")
    env = rule_file.env
    connection = data.draw(connections(env, local=True), label="connection")
    verdict = evaluate(rule_file.ruleset(), connection, env).verdict
    proxy = env.proxy
    if proxy.owns(connection.socket) and connection.mark == 0:
        assert not (isinstance(verdict, Redirected) and verdict.port == proxy.outbound_port), rule_file.name
    if connection.oif == "lo" and connection.src == proxy.passthrough_for(connection.family):
        assert not isinstance(verdict, Redirected), rule_file.name


#: The proxy's connection to the app captured again: from the passthrough source (127.0.0.6 / ::6), or in
#: TPROXY mode from the original source with the TPROXY mark, over lo.
RECAPTURED = re.compile(
    r"^  \d\. tcp (?:127\.0\.0\.6|\[::6\]):43210 -> \S+ local uid=\d+ gid=\d+ out lo  captured to the inbound listener$"
    r"|^  \d\. tcp \S+ -> \S+ local uid=1337 gid=1337 mark=0x539 out lo  captured to the inbound listener$",
    re.MULTILINE,
)


def test_each_rule_set_broken_loops(rule_file: RuleFile) -> None:
    """Without the nat rule that lets the inbound passthrough pass, every rule set loops, and the failure shows
    the proxy's connection to the app captured again and again (its layout pinned for every rule set)."""
    env = rule_file.env
    broken = mutate(rule_file.ruleset(), Mutation.DROP_PASSTHROUGH, env.proxy)
    with pytest.raises(LoopError) as caught:
        assert_loop_free(broken, env)
    error = caught.value
    text = str(error)
    assert re.fullmatch(
        r"not loop-free on \d+ class(?:es)? of connections, e\.g\. traffic loop: tcp \S+ -> \S+ "
        r"(?:remote in \S+|local uid=\d+ gid=\d+ out lo) is intercepted again and again \(6 steps and on\)",
        error.headline,
    ), error.headline
    lines = text.splitlines()
    assert lines[2] == "chain:" and lines[3].startswith(f"  1. {error.connection}  captured to the "), lines[2:4]
    assert len(RECAPTURED.findall(text)) >= 4, text
    assert re.search(r"^  \.\.\. connection (\d) is connection (\d) again: a loop$", text, re.MULTILINE), text
    assert f"\ntrace of step 1: {error.connection}\n" in text
    if rule_file.case in TPROXY_FINDINGS:
        with pytest.raises(LoopError) as before:
            assert_loop_free(rule_file.ruleset(), env)
        assert error.counterexamples > before.value.counterexamples


def test_the_seed_rules_are_sound_against_the_policy_they_mean() -> None:
    (seed,) = [f for f in rule_files() if f.path.name == "istio-1.4-nat.rules"]
    assert_sound(seed.ruleset(), seed.policy)  # every property, completeness and exclusions included


def test_the_seed_rules_without_the_proxy_exemption_loop_readably() -> None:
    """The one failure pinned as text (the engine's choice of example included; its class count is not)."""
    (seed,) = [f for f in rule_files() if f.path.name == "istio-1.4-nat.rules"]
    broken = mutate(seed.ruleset(), Mutation.DROP_PROXY_EXEMPTIONS, seed.env.proxy)
    with pytest.raises(LoopError) as caught:
        assert_loop_free(broken, seed.env)
    lines = str(caught.value).splitlines()
    assert re.sub(r" on \d+ classes", " on N classes", lines[0]) == (
        "not loop-free on N classes of connections, e.g. traffic loop: tcp 10.0.0.5:43210 -> 203.0.113.10:8080 "
        "local uid=1000 gid=1000 out eth0 is intercepted again and again (6 steps and on)"
    )
    assert lines[1].startswith("class: ipv4 tcp local; ")
    assert lines[2:5] == [
        "chain:",
        "  1. tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1000 gid=1000 out eth0  captured to the outbound listener",
        "  2. tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1337 gid=1337 out eth0  captured to the outbound listener",
    ]
    step2 = lines.index("trace of step 2: tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1337 gid=1337 out eth0")
    assert lines[step2 + 1 : step2 + 8] == [
        "  == OUTPUT (out eth0)",
        "    nat OUTPUT #1: proto tcp -> jump ISTIO_OUTPUT  [matched]",
        "    nat ISTIO_OUTPUT #1: src 127.0.0.6/32, oif lo -> RETURN  [no match]",
        "    nat ISTIO_OUTPUT #2: dst != 127.0.0.1/32, oif lo -> jump ISTIO_IN_REDIRECT  [no match]",
        "    nat ISTIO_OUTPUT #3: dst 127.0.0.1/32 -> RETURN  [no match]",
        "    nat ISTIO_OUTPUT #4: any -> jump ISTIO_REDIRECT  [matched]",
        "    nat ISTIO_REDIRECT #1: proto tcp -> REDIRECT :15001  [matched] "
        "destination 203.0.113.10:8080 -> 127.0.0.1:15001",
    ]
