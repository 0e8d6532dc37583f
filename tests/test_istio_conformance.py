"""Istio conformance by proof: Istio's own rules (read from its restore files) against meshredirect's, per case.

For every case of ``tests/data/conformance/istio/cases.json`` with iptables output, and each family it
programs, the semantics engine enumerates every class of connections and compares the two rulesets.
Two things are proven and pinned:

1. every class of connections on which they differ is one of the Istio defects explained in
   ``docs/istio-differences.md`` (each difference is named, and the count per case is pinned);
2. repairing exactly those defects in Istio's own text makes it equivalent to meshredirect's output:
   no other difference exists.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from conformance import ROOT, istio_cases, istio_restore
from meshredirect.api import resolve_groups
from meshredirect.compiler import compile_policy
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.ir import Family
from meshredirect.policy import InterceptionMode, Policy
from meshredirect.readers.iptables import read_iptables
from meshredirect.semantics.equivalence import Difference, equivalence_report
from meshredirect.semantics.interpreter import Passed, Redirected, TProxied
from meshredirect.semantics.model import LOOPBACK_INTERFACE, Environment, Origin

GROUPS = {"java": 1001, "ftp": 1002}
DNS_PORT = 53

#: The named differences (see docs/istio-differences.md), keyed by their heading there.
GID_HAIRPIN = "dead-gid-hairpin"
FIRST_UID = "only-the-first-uid-hairpins"
GID_DNS = "gid-hairpin-captures-dns"
TUNNEL = "tproxy-captures-the-tunnel-port"
REROUTE = "rerouted-interfaces-ignore-exclusions"
MARKED_LOOP = "tproxy-recaptures-the-proxys-marked-connections"

#: (case, family) -> the named differences found (how many classes each spans depends on how the engine
#: partitions connections, so it is not pinned).
PINNED: dict[tuple[str, int], set[str]] = {
    ("basic-exclude-nic", 4): {GID_HAIRPIN},
    ("dns-uid-gid", 4): {GID_HAIRPIN, FIRST_UID, GID_DNS},
    ("dns-uid-gid", 6): {GID_HAIRPIN, FIRST_UID, GID_DNS},
    ("drop-invalid", 4): {GID_HAIRPIN},
    ("empty", 4): {GID_HAIRPIN},
    ("host-ipv4-loopback-cidr", 4): {GID_HAIRPIN},
    ("inbound-ports-include", 4): {GID_HAIRPIN},
    ("inbound-ports-tproxy", 4): {GID_HAIRPIN, MARKED_LOOP},
    ("inbound-ports-wildcard", 4): {GID_HAIRPIN},
    ("inbound-ports-wildcard-tproxy", 4): {GID_HAIRPIN, TUNNEL, MARKED_LOOP},
    ("ipnets", 4): {GID_HAIRPIN},
    ("ipv6-dns-outbound-owner-groups", 4): {GID_HAIRPIN},
    ("ipv6-dns-outbound-owner-groups", 6): {GID_HAIRPIN},
    ("ipv6-dns-outbound-owner-groups-exclude", 4): {GID_HAIRPIN},
    ("ipv6-dns-outbound-owner-groups-exclude", 6): {GID_HAIRPIN},
    ("ipv6-dns-uid-gid", 4): {GID_HAIRPIN, FIRST_UID},
    ("ipv6-dns-uid-gid", 6): {GID_HAIRPIN, FIRST_UID},
    ("ipv6-empty-inbound-ports", 4): {GID_HAIRPIN},
    ("ipv6-empty-inbound-ports", 6): {GID_HAIRPIN},
    ("ipv6-inbound-ports", 4): {GID_HAIRPIN},
    ("ipv6-inbound-ports", 6): {GID_HAIRPIN},
    ("ipv6-ipnets", 4): {GID_HAIRPIN},
    ("ipv6-ipnets", 6): {GID_HAIRPIN, REROUTE},
    ("ipv6-outbound-ports", 4): {GID_HAIRPIN},
    ("ipv6-outbound-ports", 6): {GID_HAIRPIN},
    ("ipv6-virt-interfaces", 4): {GID_HAIRPIN},
    ("ipv6-virt-interfaces", 6): {GID_HAIRPIN},
    ("kube-virt-interfaces", 4): {GID_HAIRPIN},
    ("outbound-owner-groups", 4): {GID_HAIRPIN},
    ("outbound-ports-include", 4): {GID_HAIRPIN},
}


def _comparisons() -> list[tuple[str, int]]:
    return [(name, v) for name in istio_cases() for v in (4, 6) if istio_restore(name, v) is not None]


COMPARISONS = _comparisons()


def test_every_iptables_case_is_compared() -> None:
    """21 cases have iptables output (inbound-ports-empty-tproxy exists only for nftables); 30 comparisons."""
    assert len({name for name, _ in COMPARISONS}) == 21
    assert set(COMPARISONS) == set(PINNED)
    for name, _ in COMPARISONS:
        policy = _policy(name)
        assert (Family.IPV6 in policy.families) == (istio_restore(name, 6) is not None), name


def _policy(name: str) -> Policy:
    return resolve_groups(policy_from_istio_config(istio_cases()[name]), GROUPS.get)


def _config(name: str) -> dict[str, Any]:
    return {"proxy_uid": "1337", "owner_groups_exclude": "", **istio_cases()[name]}


def prove(name: str, v: int, istio_text: str) -> tuple[Difference, ...]:
    """Every class of connections on which Istio's rules (this text) and meshredirect's differ."""
    family = Family.IPV4 if v == 4 else Family.IPV6
    policy = _policy(name)
    ours = compile_policy(policy).for_family(family)
    theirs = read_iptables(istio_text, family=family, groups=GROUPS, path=f"{name}.v{v}.restore")
    env = Environment.for_policy(policy, theirs, ours)
    return equivalence_report(theirs, ours, env, families=[family]).differences


def classify(name: str, difference: Difference) -> str | None:
    """Which documented Istio defect a difference is (None: not one of them)."""
    policy, config = _policy(name), _config(name)
    c, istio, ours = difference.example, difference.first.verdict, difference.second.verdict
    uids = [int(u) for u in str(config["proxy_uid"]).split(",") if u.strip()]
    gids = set(policy.proxy_gids)
    tunnel = policy.inbound_tunnel_port
    ours_to_inbound = isinstance(ours, Redirected) and ours.port == policy.inbound_port
    istio_leaves_it = isinstance(istio, (Passed, TProxied))
    if c.dport == tunnel and isinstance(istio, TProxied) and not isinstance(ours, TProxied):
        return TUNNEL
    transparent = policy.inbound_mode is InterceptionMode.TPROXY
    if transparent and c.origin is Origin.LOCAL and c.oif == LOOPBACK_INTERFACE and c.mark == policy.tproxy_mark:
        istio_to_inbound = isinstance(istio, Redirected) and istio.port == policy.inbound_port
        if istio_to_inbound and isinstance(ours, Passed):
            return MARKED_LOOP
    if c.origin is Origin.LOCAL and c.oif == LOOPBACK_INTERFACE and c.socket is not None:
        proxy_gid_only = c.socket.uid not in uids and c.socket.gid in gids
        istio_to_inbound = isinstance(istio, Redirected) and istio.port == policy.inbound_port
        if proxy_gid_only and c.dport == DNS_PORT and isinstance(ours, Passed) and istio_to_inbound:
            return GID_DNS
        if proxy_gid_only and ours_to_inbound and istio_leaves_it:
            return GID_HAIRPIN
        if c.socket.uid in uids[1:] and ours_to_inbound and istio_leaves_it:
            return FIRST_UID
    rerouted = c.origin is Origin.REMOTE and c.iif in policy.reroute_interfaces
    istio_to_outbound = isinstance(istio, Redirected) and istio.port == policy.outbound_port
    if rerouted and c.dst in policy.outbound_cidrs_exclude and istio_to_outbound and not isinstance(ours, Redirected):
        return REROUTE
    return None


@pytest.mark.parametrize(("name", "v"), COMPARISONS, ids=[f"{n}.v{v}" for n, v in COMPARISONS])
def test_istio_differs_only_by_documented_defects(name: str, v: int) -> None:
    text = istio_restore(name, v)
    assert text is not None
    differences = prove(name, v, text)
    unexplained = [d for d in differences if classify(name, d) is None]
    assert not unexplained, "\n\n".join(str(d) for d in unexplained)
    assert {classify(name, d) for d in differences} == PINNED[(name, v)]


# ----------------------------------------------------------------------------- repairs


def repair_owner_returns(text: str, config: dict[str, Any]) -> str:
    """Dead gid hairpin, first uid only, DNS over the gid hairpin: Istio returns non-proxy traffic over lo
    once per owner (``-o lo -m owner ! --uid-owner U -j RETURN`` before the next owner's hairpin). Repaired:
    those RETURNs go, one ``-o lo -j RETURN`` (with DNS capture: TCP not to port 53) follows every owner's
    hairpin and RETURN, and the gid hairpin skips port 53 as the uid hairpin does."""
    lines = text.splitlines()
    early = re.compile(r"-A ISTIO_OUTPUT -o lo (-p tcp ! --dport 53 )?-m owner ! --(uid|gid)-owner \S+ -j RETURN$")
    dns = any(early.match(line) and "--dport 53" in line for line in lines)
    lines = [line for line in lines if not early.match(line)]
    proxy_return = re.compile(r"-A ISTIO_OUTPUT -m owner --(uid|gid)-owner \S+ -j RETURN$")
    excluded_groups = {g.strip() for g in str(config["owner_groups_exclude"]).split(",") if g.strip()}
    last = max(
        i for i, line in enumerate(lines) if proxy_return.match(line) and line.split()[-3] not in excluded_groups
    )
    lines.insert(
        last + 1, "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -j RETURN" if dns else "-A ISTIO_OUTPUT -o lo -j RETURN"
    )
    if dns:
        old = "-p tcp ! --dport 15008 -m owner --gid-owner"
        lines = [line.replace(old, "-p tcp -m multiport ! --dports 53,15008 -m owner --gid-owner") for line in lines]
    return "\n".join(lines) + "\n"


def repair_tunnel_port(text: str) -> str:
    """TPROXY mode: mangle ISTIO_INBOUND gets the tunnel port exclusion nat ISTIO_INBOUND has."""
    anchor = "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN\n"
    if anchor not in text or "-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY" not in text:
        return text
    return text.replace(anchor, anchor + "-I ISTIO_INBOUND 1 -p tcp --dport 15008 -j RETURN\n", 1)


def repair_marked_passthrough(text: str) -> str:
    """TPROXY mode: nat ISTIO_OUTPUT returns the proxy's marked (transparent) connections over lo."""
    mark = re.search(r"-j TPROXY --tproxy-mark (\S+?)/", text)
    passthrough = re.search(r"-A ISTIO_OUTPUT -o lo -s \S+ -j RETURN\n", text)
    if mark is None or passthrough is None:
        return text
    rule = f"-A ISTIO_OUTPUT -o lo -m mark --mark {mark.group(1)} -j RETURN\n"
    return text[: passthrough.end()] + rule + text[passthrough.end() :]


def repair_reroute(text: str, config: dict[str, Any]) -> str:
    """Rerouted interfaces: the outbound exclusions apply before the includes, as in OUTPUT."""
    excluded = [c for c in str(config.get("outbound_ip_ranges_exclude", "")).split(",") if c.strip()]
    out = []
    for line in text.splitlines():
        out.append(line)
        match = re.match(r"-I PREROUTING 1 -i (\S+) -d \S+ -j ISTIO_REDIRECT$", line)
        if match:
            out += [f"-I PREROUTING 1 -i {match.group(1)} -d {cidr} -j RETURN" for cidr in excluded]
    return "\n".join(out) + "\n"


def repaired(name: str, text: str) -> str:
    config = _config(name)
    fixed = repair_marked_passthrough(repair_tunnel_port(repair_owner_returns(text, config)))
    return repair_reroute(fixed, config)


@pytest.mark.parametrize(("name", "v"), COMPARISONS, ids=[f"{n}.v{v}" for n, v in COMPARISONS])
def test_repairing_the_documented_defects_makes_istio_equivalent(name: str, v: int) -> None:
    text = istio_restore(name, v)
    assert text is not None
    fixed = repaired(name, text)
    assert fixed != text
    differences = prove(name, v, fixed)
    assert not differences, "\n\n".join(str(d) for d in differences)


def test_the_proof_names_a_difference_with_a_concrete_connection() -> None:
    """The checker must see a difference: Istio's default rules differ on the proxy-gid hairpin."""
    text = istio_restore("empty", 4)
    assert text is not None
    differences = prove("empty", 4, text)
    hairpin = [d for d in differences if classify("empty", d) == GID_HAIRPIN]
    assert hairpin and len(hairpin) == len(differences)
    for d in hairpin:
        assert d.example.socket is not None and d.example.socket.gid == 1337 and d.example.socket.uid != 1337
        assert str(d.second.verdict) == "redirected to 127.0.0.1:15006"
    # And a single broken line in otherwise repaired rules is found again.
    fixed = repaired("empty", text)
    assert not prove("empty", 4, fixed)
    broken = fixed.replace("-j REDIRECT --to-ports 15006", "-j REDIRECT --to-ports 15007")
    found = prove("empty", 4, broken)
    assert found
    assert {str(d.first.verdict) for d in found} == {"redirected to 127.0.0.1:15007"}
    assert {str(d.second.verdict) for d in found} == {"redirected to 127.0.0.1:15006"}


#: The connections docs/istio-differences.md shows, and the comparison each comes from.
DOC_EXAMPLES: dict[str, tuple[str, int, str, dict[str, Any]]] = {
    GID_HAIRPIN: ("empty", 4, "local", {"dst": "10.0.0.5", "dport": 8080, "uid": 1000, "gid": 1337}),
    FIRST_UID: ("dns-uid-gid", 4, "local", {"dst": "10.0.0.5", "dport": 8080, "uid": 4, "gid": 1000}),
    GID_DNS: ("dns-uid-gid", 4, "local", {"dst": "10.0.0.5", "dport": 53, "uid": 1000, "gid": 2}),
    TUNNEL: ("inbound-ports-wildcard-tproxy", 4, "remote", {"src": "203.0.113.10", "dst": "10.0.0.5", "dport": 15008}),
    REROUTE: ("ipv6-ipnets", 6, "remote", {"src": "2001:db8:ffff::10", "dst": "2001:db8:ffff::10", "dport": 8080}),
    MARKED_LOOP: (
        "inbound-ports-tproxy", 4, "local",
        {"src": "203.0.113.10", "dst": "10.0.0.5", "dport": 8080, "uid": 1337, "gid": 1337, "mark": 1337},
    ),
}  # fmt: skip


def test_the_examples_in_the_documentation_are_what_the_rules_do() -> None:
    """Each example in docs/istio-differences.md, evaluated through both rulesets, gives the verdicts shown and
    is the difference its section names."""
    from meshredirect.semantics.interpreter import evaluate
    from meshredirect.semantics.model import Connection

    page = (ROOT / "docs" / "istio-differences.md").read_text()
    sections = re.split(r"\n\((\S+)\)=\n", page)
    shown = {
        name: re.findall(r"```text\n(.+)\n  Istio: +(.+)\n  meshredirect: (.+)\n```", body)
        for name, body in zip(sections[1::2], sections[2::2], strict=True)
    }
    assert set(shown) == set(DOC_EXAMPLES)
    for name, (case, v, origin, fields) in DOC_EXAMPLES.items():
        assert len(shown[name]) == 1, name
        (text, istio_verdict, our_verdict) = shown[name][0]
        family = Family.IPV4 if v == 4 else Family.IPV6
        policy = _policy(case)
        ours = compile_policy(policy).for_family(family)
        istio = istio_restore(case, v)
        assert istio is not None
        theirs = read_iptables(istio, family=family, groups=GROUPS)
        env = Environment.for_policy(policy, theirs, ours)
        connection = Connection.local(env, **fields) if origin == "local" else Connection.remote(**fields)
        first, second = evaluate(theirs, connection, env), evaluate(ours, connection, env)
        assert (str(connection), str(first.verdict), str(second.verdict)) == (text, istio_verdict, our_verdict)
        difference = Difference(example=connection, first=first, second=second, description="", aspect="verdict")
        assert classify(case, difference) == name
