"""Proofs across dialects, through the iptables reader (meshredirect.readers.iptables) and the nft JSON reader.

- Ours: for every Istio case, the IR read from our iptables-save rendering and the IR read from our nft JSON
  treat every class of connections alike (each rendering is what the kernel holds: see
  tests/kernel/test_iptables_load.py and tests/kernel/test_nftables_load.py).
- Istio's: for every case, Istio's nft golden (loaded with ``nft -f`` and listed as JSON) against Istio's
  iptables rules for the same case (NAME.v4.restore and .v6.restore), class by class. The differences are
  pinned per case, grouped by kind, and explained in docs/nftables.md.
"""

from __future__ import annotations

import collections
import json

import pytest

import meshredirect.readers.iptables as iptables_reader
from conformance import ISTIO, istio_cases
from conftest import require_kernel
from meshredirect.api import render, resolve_groups
from meshredirect.compiler import compile_policy
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.ir import Family, Ruleset
from meshredirect.readers.nftables import read_nft_json
from meshredirect.semantics.equivalence import Difference, equivalence_report
from meshredirect.semantics.model import Environment
from meshredirect.testing.netns import NetNamespace

CASES = istio_cases()
GROUPS = {"java": 1001, "ftp": 1002}
#: Istio's nft goldens hold this case; its iptables goldens do not.
NFT_ONLY = {"inbound-ports-empty-tproxy"}


def _policy(case: str) -> object:
    return resolve_groups(policy_from_istio_config(CASES[case]), GROUPS.get)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_nft_rules_mean_what_our_iptables_rules_mean(case: str) -> None:
    policy = _policy(case)
    ruleset = compile_policy(policy)  # type: ignore[arg-type]
    tables = []
    for artifact in render(ruleset, "iptables-save").artifacts:
        assert artifact.family is not None
        tables += iptables_reader.read_iptables(artifact.content, family=artifact.family).tables
    iptables = Ruleset(tables=tuple(tables))
    nft = read_nft_json(_joined(ruleset))
    report = equivalence_report(iptables, nft, Environment.for_policy(policy))
    assert report.equivalent, "\n".join(str(d) for d in report.differences[:3])


def _joined(ruleset: Ruleset) -> str:
    """The nftables-json artifacts of every family as one document."""
    documents = [json.loads(a.content)["nftables"] for a in render(ruleset, "nftables-json").artifacts]
    return json.dumps({"nftables": [c for d in documents for c in d]})


def kind(difference: Difference) -> str:
    """A difference in words: which connections, what differs, what each side does."""
    c = difference.example
    socket = "socket" if c.socket is not None else "no socket"

    def verdict(text: str) -> str:
        return text.split(" to ", maxsplit=1)[0].split(" (", maxsplit=1)[0]

    first, second = verdict(str(difference.first.verdict)), verdict(str(difference.second.verdict))
    return f"{c.family.value} {c.origin.value.lower()} {socket}: {difference.aspect}: nft {first}, iptables {second}"


#: Per case, the kinds of differences between Istio's nft and iptables rules (cases not listed: none).
ISTIO_DIFFERENCES: dict[str, set[str]] = {
    # IPv6 is off: Istio's iptables rules program nothing for it, its inet nft rules capture IPv6 too.
    "inbound-ports-include": {"ipv6 remote no socket: verdict: nft redirected, iptables dropped",
                              "ipv6 remote no socket: verdict: nft redirected, iptables passed"},
    "inbound-ports-wildcard": {"ipv6 remote no socket: verdict: nft redirected, iptables dropped",
                               "ipv6 remote no socket: verdict: nft redirected, iptables passed"},
    "inbound-ports-tproxy": {"ipv6 local socket: ctmark: nft passed, iptables passed",
                             "ipv6 local no socket: ctmark: nft passed, iptables passed"},
    "inbound-ports-wildcard-tproxy": {"ipv6 local socket: ctmark: nft passed, iptables passed",
                                      "ipv6 local no socket: ctmark: nft passed, iptables passed"},
    # 'oifname lo skuid != 1337 return' does not match a packet without a socket; '-o lo ! --uid-owner' does.
    "ipnets": {"ipv4 local no socket: verdict: nft redirected, iptables passed"},
    "ipv6-outbound-ports": {"ipv4 local no socket: verdict: nft redirected, iptables passed",
                            "ipv6 local no socket: verdict: nft redirected, iptables passed"},
    # Both at once.
    "kube-virt-interfaces": {"ipv4 local no socket: verdict: nft redirected, iptables passed",
                             "ipv6 local socket: verdict: nft redirected, iptables passed",
                             "ipv6 local no socket: verdict: nft redirected, iptables passed",
                             "ipv6 remote no socket: verdict: nft redirected, iptables dropped",
                             "ipv6 remote no socket: verdict: nft redirected, iptables passed"},
    "outbound-ports-include": {"ipv4 local no socket: verdict: nft redirected, iptables passed",
                               "ipv6 local socket: verdict: nft redirected, iptables passed",
                               "ipv6 local no socket: verdict: nft redirected, iptables passed"},
}  # fmt: skip


def istio_rulesets(case: str) -> tuple[Ruleset, Ruleset]:
    """Istio's nft golden as the kernel lists it, and Istio's iptables rules, as IR."""
    text = (ISTIO / "nftables" / f"{case}.golden").read_text()
    for name, gid in GROUPS.items():
        text = text.replace(f"skgid {name} ", f"skgid {gid} ").replace(f"skgid != {name} ", f"skgid != {gid} ")
    with NetNamespace() as ns:
        ns.run(["nft", "-f", "-"], input=text)
        nft = read_nft_json(ns.run(["nft", "-j", "list", "ruleset"]).stdout, path=f"{case}.golden")
    tables = []
    for version, family in ((4, Family.IPV4), (6, Family.IPV6)):
        path = ISTIO / "iptables" / f"{case}.v{version}.restore"
        if path.exists():
            read = iptables_reader.read_iptables(path.read_text(), family=family, groups=GROUPS, path=path.name)
            tables += read.tables
    return nft, Ruleset(tables=tuple(tables))


@pytest.mark.kernel
@pytest.mark.parametrize("case", sorted(set(CASES) - NFT_ONLY))
def test_istio_nft_rules_against_istio_iptables_rules_by_proof(case: str) -> None:
    require_kernel()
    nft, iptables = istio_rulesets(case)
    report = equivalence_report(nft, iptables, Environment.for_policy(_policy(case)))
    kinds = collections.Counter(kind(d) for d in report.differences)
    assert set(kinds) == ISTIO_DIFFERENCES.get(case, set()), "\n".join(str(d) for d in report.differences[:4])
