"""Proofs, with the semantics engine, that our nft rules mean what the IR means.

For every equivalence class of connections (both families, local and remote,
with and without a socket), the IR the compiler emits and the IR read back
from the nftables JSON give the same verdict, conntrack mark and zone. The
kernel's read-back equals the JSON read-back (tests/kernel/test_nftables_load.py),
so this holds for what the kernel runs.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings

from meshredirect.compiler import compile_policy
from meshredirect.errors import UnsupportedError
from meshredirect.ir import (
    Chain,
    Direction,
    Family,
    Hook,
    InterfaceMatch,
    OwnerKind,
    OwnerMatch,
    Return,
    Rule,
    Ruleset,
    Table,
    iptables_base_chain,
)
from meshredirect.policy import Policy
from meshredirect.readers.nftables import read_nft_json
from meshredirect.semantics.equivalence import equivalence_report
from meshredirect.semantics.model import Environment
from meshredirect.testing.strategies import policies
from meshredirect.values import IdSet
from meshredirect_nftables import NftLowering

LOWERING = NftLowering()
#: Each example runs the class enumeration of two rulesets: keep CI well under its budget.
EQUIVALENCE_EXAMPLES = 30


def read_back(ruleset: Ruleset) -> Ruleset:
    """The IR a reader makes of the JSON the backend writes."""
    commands = [c for cs in LOWERING.commands(ruleset).values() for c in cs]
    return read_nft_json(json.dumps({"nftables": commands}))


@settings(max_examples=EQUIVALENCE_EXAMPLES, deadline=None)
@given(policies())
@example(Policy(inbound_mode="REDIRECT", families="ipv4"))
@example(Policy(inbound_mode="REDIRECT", families="ipv6"))
@example(Policy(inbound_mode="TPROXY", families="ipv4", drop_invalid=True))
@example(Policy(inbound_mode="TPROXY", families="ipv6", dns={"enabled": True, "capture_all": True}))
@example(Policy(families="both", outbound_cidrs="10.0.0.0/8,fd00::/8", outbound_cidrs_exclude="10.96.0.0/12"))
def test_the_nft_rules_read_back_mean_what_the_ir_means_for_every_class(policy: Policy) -> None:
    ruleset = compile_policy(policy)
    report = equivalence_report(ruleset, read_back(ruleset), Environment.for_policy(policy))
    assert report.classes > 0
    assert report.equivalent, "\n".join(str(d) for d in report.differences[:3])


def _owner_exemption(owner: OwnerMatch) -> Ruleset:
    """nat OUTPUT: ``-o lo ! --uid-owner 1337 -j RETURN``, then everything to the proxy (a REDIRECT)."""
    from meshredirect.ir import Protocol, ProtocolMatch, Redirect
    from meshredirect.values import PortSet

    rules = (
        Rule(matches=(InterfaceMatch(direction=Direction.DESTINATION, name="lo"), owner), target=Return()),
        Rule(matches=(ProtocolMatch(protocol=Protocol.TCP),), target=Redirect(ports=PortSet.of(15001))),
    )
    chain = Chain(name="OUTPUT", rules=rules, base=iptables_base_chain("nat", Hook.OUTPUT))
    return Ruleset(tables=(Table(family=Family.IPV4, name="nat", chains=(chain,)),))


def test_where_nft_truly_differs_owner_matches_on_packets_without_a_socket() -> None:
    """``-m owner ! --uid-owner 1337`` matches a packet without a socket; ``meta skuid != 1337`` does not.

    The IR keeps the difference (OwnerMatch.socketless); the backend refuses the iptables form, and the
    nft form differs from it exactly on the connections that have no socket, which the proof names.
    """
    xt_owner = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337), negate=True)  # socketless=True, as iptables
    nft_owner = OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337), negate=True, socketless=False)
    with pytest.raises(UnsupportedError, match="never match a packet without a socket"):
        LOWERING.commands(_owner_exemption(xt_owner))
    iptables_meaning, nft_meaning = _owner_exemption(xt_owner), read_back(_owner_exemption(nft_owner))
    report = equivalence_report(iptables_meaning, nft_meaning)
    assert report.differences
    for difference in report.differences:
        assert difference.example.socket is None and difference.example.oif == "lo"
        assert str(difference.first.verdict).startswith("passed")  # iptables: returns, goes on uncaptured
        assert str(difference.second.verdict).startswith("redirected to 127.0.0.1:15001")  # nft: captured
    assert "socket none" in report.differences[0].description
