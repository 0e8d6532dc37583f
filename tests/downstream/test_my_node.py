"""Property-testing your own rules: an ``iptables-save`` dump from a node (``data/node.rules``).

The proofs (``assert_*``) cover every connection; the hypothesis property
shows how to state a rule of your own over generated connections.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given

from meshredirect import preset
from meshredirect.semantics import Connection, Environment, Redirected, evaluate
from meshredirect.testing import (
    NotEquivalentError,
    as_ruleset,
    assert_equivalent,
    assert_loop_free,
    assert_no_bypass,
    connections,
)

# docs-start: node
NODE_RULES = Path(__file__).parent / "data" / "node.rules"  # iptables-save output from a pod
ENV = Environment.default()  # Istio's proxy: uid/gid 1337, ports 15001 and 15006


def test_no_connection_loops() -> None:
    assert_loop_free(NODE_RULES, ENV)


def test_every_connection_the_policy_captures_reaches_the_proxy() -> None:
    assert_no_bypass(NODE_RULES, {"inbound_ports_exclude": "22,15020"}, ENV)


def test_the_rules_mean_what_the_istio_1_4_preset_means() -> None:
    assert_equivalent(NODE_RULES, preset("istio-1.4"), ENV)


RULES = as_ruleset(NODE_RULES)  # read once: the IR the engine evaluates


@given(connections(ENV, local=True))
def test_the_proxy_never_reaches_its_own_outbound_port(connection: Connection) -> None:
    verdict = evaluate(RULES, connection, ENV).verdict
    if ENV.proxy.owns(connection.socket):
        assert not (isinstance(verdict, Redirected) and verdict.port == 15001)


# docs-end: node


def test_a_difference_from_the_policy_is_shown_on_a_connection() -> None:
    with pytest.raises(NotEquivalentError) as caught:
        assert_equivalent(NODE_RULES, preset("istio"), ENV)
    assert caught.value.headline.startswith("the rulesets differ on ")
    assert caught.value.connection is not None
