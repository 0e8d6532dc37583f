"""Istio's nftables rule sets, loaded into a kernel, read back, proven, and each one broken to see the proof fail.

Istio writes its nftables rules as ``nft -f`` scripts (the goldens next to its
iptables ones). Each is loaded into the test's throwaway namespace (the
plugin's ``netns`` fixture), listed back with ``nft -j list ruleset`` (what a
node would give), and proven loop-free with the same assertions as the
iptables rules; the TPROXY cases loop as their iptables twins do (the marked
passthrough over lo is captured again by the uid 1337 lo hairpin). Removing
the rule that lets the inbound passthrough pass makes every one loop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest

from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.semantics import Environment
from meshredirect.testing import LoopError, Mutation, NetNamespace, as_ruleset, assert_loop_free, mutate

from .conftest import CONFORMANCE, GROUPS, istio_cases

pytestmark = pytest.mark.kernel

NFT_RULES: Final = sorted((CONFORMANCE / "istio" / "nftables").glob("*.golden"))
#: Istio's TPROXY cases: the marked passthrough over lo is captured again by nat output's lo hairpin.
TPROXY_FINDINGS: Final = {"inbound-ports-tproxy", "inbound-ports-wildcard-tproxy", "inbound-ports-empty-tproxy"}
#: The proxy's connection to the app captured again over lo (from 127.0.0.6 / ::6, or marked in TPROXY mode).
RECAPTURED: Final = re.compile(
    r"^  \d\. tcp (?:127\.0\.0\.6|\[::6\]):43210 -> \S+ local uid=\d+ gid=\d+ out lo  captured to the inbound listener$"
    r"|^  \d\. tcp \S+ -> \S+ local uid=1337 gid=1337 mark=0x539 out lo  captured to the inbound listener$",
    re.MULTILINE,
)


def load(netns: NetNamespace, script: Path) -> str:
    """Load an ``nft -f`` script (owner group names resolved as the node would) and list the ruleset as JSON."""
    text = re.sub(r"\bskgid (!= )?(\w+)", lambda m: f"skgid {m[1] or ''}{GROUPS.get(m[2], m[2])}", script.read_text())
    netns.run(["nft", "-f", "-"], input=text)
    return netns.run(["nft", "-j", "list", "ruleset"]).stdout


@pytest.mark.parametrize("script", NFT_RULES, ids=lambda p: p.name.split(".")[0])
def test_istio_nft_rules_read_back_from_the_kernel_are_proven(netns: NetNamespace, script: Path) -> None:
    case = script.name.split(".")[0]
    env = Environment.for_policy(policy_from_istio_config(istio_cases()[case]))
    ruleset = as_ruleset(load(netns, script))
    if case in TPROXY_FINDINGS:
        with pytest.raises(LoopError) as finding:
            assert_loop_free(ruleset, env)
        assert len(RECAPTURED.findall(str(finding.value))) >= 4, str(finding.value)
    else:
        assert_loop_free(ruleset, env)
    with pytest.raises(LoopError) as caught:
        assert_loop_free(mutate(ruleset, Mutation.DROP_PASSTHROUGH, env.proxy), env)
    error = caught.value
    assert re.fullmatch(
        r"not loop-free on \d+ class(?:es)? of connections, e\.g\. traffic loop: tcp \S+ -> \S+ "
        r"(?:remote in \S+|local uid=\d+ gid=\d+ out lo) is intercepted again and again \(6 steps and on\)",
        error.headline,
    ), error.headline
    assert len(RECAPTURED.findall(str(error))) >= 4, str(error)
    if case in TPROXY_FINDINGS:
        assert error.counterexamples > finding.value.counterexamples


def test_every_istio_case_has_its_nft_rules() -> None:
    assert {p.name.split(".")[0] for p in NFT_RULES} == set(istio_cases())
