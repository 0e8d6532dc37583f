"""Compiled rules loaded into a real kernel, in throwaway namespaces, and read back.

Checks that the ``iptables-save`` backend prints exactly what the kernel's
tools print for what the ``iptables-restore`` backend loads (both variants,
both families), that the seed's 21 lines come back, that applying is
idempotent, and that cleanup leaves other tools' rules as they were.
"""

from __future__ import annotations

import grp

import attrs
import pytest
from hypothesis import HealthCheck, given, settings

from conformance import SEED, istio_cases
from conftest import require_kernel
from meshredirect.api import render, resolve_groups
from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner, normalise_save
from meshredirect.compiler import compile_policy
from meshredirect.errors import UnsafePolicyError
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.ir import Family, Ruleset
from meshredirect.policy import Policy
from meshredirect.presets import preset
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.strategies import policies

pytestmark = pytest.mark.kernel

VARIANTS = ("nft", "legacy")


def _system_group(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def tables_of(save_text: str) -> dict[str, str]:
    """Split normalised save output into its table sections (their order varies by variant)."""
    tables: dict[str, str] = {}
    current: list[str] = []
    for line in normalise_save(save_text).splitlines():
        current.append(line)
        if line == "COMMIT":
            tables[current[0]] = "\n".join(current)
            current = []
    return tables


def load_and_save(ns: NetNamespace, text: str, family: Family, variant: str, *, noflush: bool = False) -> str:
    v = 6 if family is Family.IPV6 else 4
    base = "ip6tables" if v == 6 else "iptables"
    ns.run([f"{base}-{variant}-restore", *(["--noflush"] if noflush else [])], input=text)
    return ns.run([f"{base}-{variant}-save"]).stdout


def assert_round_trip(ruleset: Ruleset, variant: str) -> None:
    """Both backends' output loads, and the kernel's save equals the save backend, table by table."""
    expected = render(ruleset, "iptables-save")
    restore = render(ruleset, "iptables-restore")
    for family in ruleset.families:
        want = tables_of(expected.artifact(family).content)
        for source in (restore.artifact(family).content, expected.artifact(family).content):
            with NetNamespace() as ns:
                got = tables_of(
                    load_and_save(ns, source, family, variant, noflush=source is restore.artifact(family).content)
                )
            assert got == want, f"{family.value} {variant}: kernel save differs from the iptables-save backend"


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


@pytest.mark.parametrize("variant", VARIANTS)
def test_seed_rules_come_back_exactly(variant: str) -> None:
    """The istio-1.4 preset loaded with iptables-restore reads back as the seed's 21 lines."""
    ruleset = compile_policy(preset("istio-1.4"))
    document = render(ruleset, "iptables-restore").artifact(Family.IPV4).content
    with NetNamespace() as ns:
        ns.run([f"iptables-{variant}-restore", "--noflush"], input=document)
        listing = ns.run([f"iptables-{variant}", "-t", "nat", "-S"]).stdout
    seed = SEED.read_text()
    assert listing.splitlines() == seed.splitlines()
    assert len(seed.splitlines()) == 21


CASES = istio_cases()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_istio_case_loads_and_reads_back_as_the_save_backend_prints(case: str, variant: str) -> None:
    policy = policy_from_istio_config(CASES[case])
    if policy.unresolved_groups():
        missing = [g for g in policy.unresolved_groups() if _system_group(g) is None]
        if missing:
            with pytest.raises(UnsafePolicyError, match=f"group '{missing[0]}' does not exist on this machine"):
                resolve_groups(policy, _system_group)
            return
        policy = resolve_groups(policy, _system_group)
    assert_round_trip(compile_policy(policy), variant)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_generated_policies_round_trip_through_the_kernel(policy: Policy) -> None:
    assert_round_trip(compile_policy(policy), "nft")


@pytest.mark.parametrize("variant", VARIANTS)
def test_applying_twice_equals_applying_once(variant: str) -> None:
    ruleset = compile_policy(Policy(families="both", drop_invalid=True, inbound_mode="TPROXY"))
    with NetNamespace() as ns:
        applier = IptablesApplier(NamespaceRunner(ns.name), variant=variant)
        first = applier.apply(ruleset)
        once = {f: applier.saved(f) for f in ruleset.families}
        second = applier.apply(ruleset)
        twice = {f: applier.saved(f) for f in ruleset.families}
    assert all(change.changed for change in first)
    assert not any(change.changed for change in second)
    assert {f: normalise_save(t) for f, t in once.items()} == {f: normalise_save(t) for f, t in twice.items()}


FOREIGN_V4 = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-QRSTUVWXYZ012345 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-ABCDEFGHIJKLMNOP -s 10.244.1.5/32 -m comment --comment "default/web" -j KUBE-MARK-MASQ
-A KUBE-SEP-ABCDEFGHIJKLMNOP -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SERVICES -d 10.96.12.34/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-SVC-QRSTUVWXYZ012345
-A KUBE-SVC-QRSTUVWXYZ012345 -m comment --comment "default/web -> 10.244.1.5:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ABCDEFGHIJKLMNOP
-A KUBE-SVC-QRSTUVWXYZ012345 -m comment --comment "default/web -> 10.244.1.6:8080" -j KUBE-SEP-ABCDEFGHIJKLMNOP
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-USER - [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A OUTPUT -j KUBE-FIREWALL
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-USER -j RETURN
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -j MARK --set-xmark 0x1/0xff
COMMIT
"""


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_cleanup_keeps_other_tools_rules_exactly(variant: str, mode: str) -> None:
    ruleset = compile_policy(Policy(inbound_mode=mode, drop_invalid=True))
    with NetNamespace() as ns:
        ns.run([f"iptables-{variant}-restore"], input=FOREIGN_V4)
        before = tables_of(ns.run([f"iptables-{variant}-save"]).stdout)
        applier = IptablesApplier(NamespaceRunner(ns.name), variant=variant)
        applier.apply(ruleset)
        during = tables_of(applier.saved(Family.IPV4))
        # Our rules are there, next to theirs.
        assert ":ISTIO_OUTPUT - [0:0]" in during["*nat"] and "KUBE-SERVICES" in during["*nat"]
        applier.apply(attrs.evolve(ruleset))  # idempotent beside foreign rules too
        assert tables_of(applier.saved(Family.IPV4)) == during
        applier.cleanup("ISTIO")
        after = tables_of(applier.saved(Family.IPV4))
        assert not applier.cleanup("ISTIO")[0].changed  # cleaning up again is a no-op
    assert after == before


def test_replacing_a_policy_removes_stale_chains_atomically() -> None:
    tproxy = compile_policy(
        Policy(inbound_mode="TPROXY", drop_invalid=True, dns={"enabled": True, "capture_all": True})
    )
    plain = compile_policy(Policy(inbound_ports=""))
    with NetNamespace() as ns:
        ns.run(["iptables-nft-restore"], input=FOREIGN_V4)
        applier = IptablesApplier(NamespaceRunner(ns.name))
        applier.apply(tproxy)
        applier.apply(plain)
        got = tables_of(applier.saved(Family.IPV4))
        with NetNamespace() as fresh:
            fresh.run(["iptables-nft-restore"], input=FOREIGN_V4)
            fresh_applier = IptablesApplier(NamespaceRunner(fresh.name))
            fresh_applier.apply(plain)
            want = tables_of(fresh_applier.saved(Family.IPV4))
    # iptables-nft keeps a table it once created, empty (here raw, from the DNS zones): no rules, no chains.
    assert {name: text for name, text in got.items() if name not in want} == {
        "*raw": "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT"
    }
    assert {name: text for name, text in got.items() if name in want} == want


def test_a_rejected_document_leaves_the_previous_rules_intact() -> None:
    ruleset = compile_policy(Policy())
    with NetNamespace() as ns:
        applier = IptablesApplier(NamespaceRunner(ns.name))
        applier.apply(ruleset)
        before = applier.saved(Family.IPV4)
        document = render(compile_policy(Policy(inbound_ports="")), "iptables-restore", installed={"ipv4": before})
        broken = document.artifact(Family.IPV4).content.replace("COMMIT", "-A ISTIO_OUTPUT -j NO_SUCH_CHAIN\nCOMMIT", 1)
        result = ns.run(["iptables-nft-restore", "--noflush"], input=broken, check=False)
        assert result.returncode != 0
        assert normalise_save(applier.saved(Family.IPV4)) == normalise_save(before)
