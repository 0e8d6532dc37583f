"""``meshredirect istio-iptables`` programming real namespaces: apply, idempotence, drift, cleanup, TPROXY
routing, validation."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest

from conftest import require_kernel
from meshredirect.api import render
from meshredirect.apply.iptables import normalise_save
from meshredirect.backend import get_backend
from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.ir import Family
from meshredirect.policy import Policy
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.pod import PodNetwork

pytestmark = pytest.mark.kernel

PRODUCTION = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
PRODUCTION += ["-d", "15090,15021,15020"]
FOREIGN = "*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n"


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["istio-iptables", *argv])
    return status, out.getvalue(), err.getvalue()


DOCUMENTS = get_backend("iptables-restore")()


def ours(ns: NetNamespace, family: int = 4, variant: str = "nft") -> str:
    """Our part of the namespace's rules (empty when none), as the restore backend sees it."""
    tool = "ip6tables" if family == 6 else "iptables"
    return DOCUMENTS.owned(ns.run([f"{tool}-{variant}-save"]).stdout, "ISTIO")  # type: ignore[attr-defined,no-any-return]


def wanted(policy: Policy, family: Family = Family.IPV4) -> str:
    return DOCUMENTS.owned(render(compile_policy(policy), "iptables-save").artifact(family).content, "ISTIO")  # type: ignore[attr-defined,no-any-return]


def test_apply_is_idempotent_and_keeps_foreign_rules() -> None:
    with NetNamespace() as ns:
        ns.run(["iptables-nft-restore"], input=FOREIGN)
        status, out, err = run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)
        assert (status, err) == (0, "")
        assert out == (
            f"apply: network namespace /var/run/netns/{ns.name}, backend iptables\n"
            "iptables variant: nft (the legacy tables hold no rules)\n"
            "ipv4 (iptables-nft-restore): changed\nipv6 (ip6tables-nft-restore): already up to date\n"
        )
        assert ours(ns) == wanted(Policy())
        assert "-A OUTPUT -j KUBE-SERVICES" in ns.run(["iptables-nft-save"]).stdout
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)
        assert status == 0 and out.endswith("nothing changed: already up to date\n")
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", "--force-apply", *PRODUCTION)
        assert status == 0 and out.endswith("nothing changed: already up to date\n")


def test_drift_fails_without_reconcile_and_is_replaced_with_it() -> None:
    with NetNamespace() as ns:
        assert run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)[0] == 0
        ns.run(["iptables-nft", "-t", "nat", "-I", "ISTIO_OUTPUT", "-d", "10.0.0.1", "-j", "RETURN"])
        before = ns.run(["iptables-nft-save"]).stdout
        status, _out, err = run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)
        assert status == 1
        assert err == (
            "rules of ours (chains ISTIO_*) are already installed and differ from the wanted ones; nothing changed "
            "(pass --reconcile to replace them)\n"
        )
        assert normalise_save(ns.run(["iptables-nft-save"]).stdout) == normalise_save(before)
        status, _out, _err = run("--network-namespace", ns.name, "--enable-ipv6=false", "--reconcile", *PRODUCTION)
        assert status == 0 and ours(ns) == wanted(Policy())


def test_a_changed_policy_is_drift_too() -> None:
    with NetNamespace() as ns:
        assert run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)[0] == 0
        assert run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION, "-o", "5432")[0] == 1
        assert (
            run("--network-namespace", ns.name, "--enable-ipv6=false", "--reconcile", *PRODUCTION, "-o", "5432")[0] == 0
        )
        assert ours(ns) == wanted(Policy(outbound_ports_exclude="5432"))


def test_dry_run_and_skip_rule_apply_touch_nothing() -> None:
    with NetNamespace() as ns:
        ns.run(["iptables-nft-restore"], input=FOREIGN)
        before = ns.run(["iptables-nft-save"]).stdout
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", "-n", *PRODUCTION)
        assert status == 0 and out == render(compile_policy(Policy()), "iptables-save").text()
        status, out, err = run("--network-namespace", ns.name, "--enable-ipv6=false", "--skip-rule-apply", *PRODUCTION)
        assert (status, out) == (0, "") and "nothing applied" in err
        assert normalise_save(ns.run(["iptables-nft-save"]).stdout) == normalise_save(before)


def test_cleanup_only_removes_ours_and_nothing_else() -> None:
    with NetNamespace() as ns:
        ns.run(["iptables-nft-restore"], input=FOREIGN)
        before = ns.run(["iptables-nft-save"]).stdout
        assert run("--network-namespace", ns.name, "--enable-ipv6=true", *PRODUCTION)[0] == 0
        assert ours(ns, 6)
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", "--cleanup-only", "-n")
        assert status == 0 and "-X ISTIO_OUTPUT" in out and ours(ns)
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", "--cleanup-only")
        assert status == 0
        assert "ipv4 (iptables-nft-restore): changed\nipv6 (ip6tables-nft-restore): changed\n" in out
        assert ours(ns) == "" and ours(ns, 6) == ""
        assert normalise_save(ns.run(["iptables-nft-save"]).stdout) == normalise_save(before)


def test_native_nftables_applies_our_table_alone_and_cleanup_removes_only_it() -> None:
    with NetNamespace() as ns:
        ns.run(["nft", "add table inet other"])
        ns.run(["nft", "add chain inet other out { type nat hook output priority -100; }"])
        before = ns.run(["nft", "list", "ruleset"]).stdout
        status, out, err = run("--network-namespace", ns.name, "--enable-ipv6=false", "--native-nftables", *PRODUCTION)
        assert (status, err) == (0, "")
        assert out.startswith(f"apply: network namespace /var/run/netns/{ns.name}, backend nftables\n")
        listed = ns.run(["nft", "list", "ruleset"]).stdout
        assert "table ip istio {" in listed and "table ip6 istio" not in listed and "table inet other {" in listed
        assert ours(ns) == ""  # no iptables rules of ours: nftables alone
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", "--native-nftables", *PRODUCTION)
        assert status == 0 and out.endswith("nothing changed: already up to date\n")
        status, _, _ = run("--network-namespace", ns.name, "--native-nftables", "--cleanup-only")
        assert status == 0
        assert ns.run(["nft", "list", "ruleset"]).stdout == before


def test_tproxy_sets_up_and_cleanup_removes_policy_routing() -> None:
    tproxy = [*PRODUCTION, "-m", "TPROXY", "--enable-ipv6=true"]
    with NetNamespace() as ns:
        assert run("--network-namespace", ns.name, *tproxy)[0] == 0
        for v in ("-4", "-6"):
            assert "fwmark 0x539 lookup 133" in ns.run(["ip", v, "rule", "show"]).stdout
            assert "local default dev lo" in ns.run(["ip", v, "route", "show", "table", "133"]).stdout
        assert run("--network-namespace", ns.name, "--force-apply", *tproxy)[0] == 0
        assert ns.run(["ip", "-4", "rule", "show"]).stdout.count("lookup 133") == 1
        assert run("--network-namespace", ns.name, "--cleanup-only", "--skip-rule-apply", *tproxy)[0] == 0
        assert "lookup 133" in ns.run(["ip", "-4", "rule", "show"]).stdout and ours(ns)
        assert run("--network-namespace", ns.name, "--cleanup-only", *tproxy)[0] == 0
        for v in ("-4", "-6"):
            assert "lookup 133" not in ns.run(["ip", v, "rule", "show"]).stdout
        assert ours(ns) == "" and ours(ns, 6) == ""


def test_forced_legacy_variant_and_namespace_by_path() -> None:
    with NetNamespace() as ns:
        status, out, _ = run(
            "--network-namespace", str(ns.path), "--enable-ipv6=false", "--force-iptables-binary=legacy", *PRODUCTION
        )
        assert status == 0 and "iptables variant: legacy (as asked)\n" in out
        assert ours(ns, variant="legacy") == wanted(Policy()) and ours(ns) == ""
        status, out, _ = run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)
        assert status == 0 and "iptables variant: legacy (the legacy tables already hold rules" in out


def address(ns: NetNamespace, *addresses: str) -> None:
    ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"])
    for item in addresses:
        ns.run(["ip", "addr", "add", item, "dev", "eth0", *(["nodad"] if ":" in item else [])])
    ns.run(["ip", "link", "set", "eth0", "up"])


@pytest.mark.parametrize(
    ("addresses", "dual_stack", "ipv6"),
    [
        (["10.1.0.5/24"], False, False),
        (["fd00::5/64"], False, True),
        (["10.1.0.5/24", "fd00::5/64"], False, False),
        (["10.1.0.5/24", "fd00::5/64"], True, True),
    ],
)
def test_ipv6_is_decided_from_the_pod_addresses(addresses: list[str], dual_stack: bool, ipv6: bool) -> None:
    with NetNamespace() as ns:
        address(ns, *addresses)
        extra = ["--dual-stack"] if dual_stack else []
        assert run("--network-namespace", ns.name, *extra, *PRODUCTION)[0] == 0
        assert bool(ours(ns, 6)) is ipv6 and ours(ns, 4)


def test_cleanup_needs_no_address() -> None:
    with NetNamespace() as ns:
        assert run("--network-namespace", ns.name, "--enable-ipv6=false", *PRODUCTION)[0] == 0
        status, out, err = run("--network-namespace", ns.name, "--cleanup-only")
        assert (status, err) == (0, "") and "ipv4 (iptables-nft-restore): changed" in out and ours(ns) == ""


def test_no_usable_address_and_missing_namespace_are_clear_errors() -> None:
    with NetNamespace() as ns:
        status, out, err = run("--network-namespace", ns.name, "-n", *PRODUCTION)
    assert (status, out) == (3, "")
    assert err == (
        "meshredirect istio-iptables: error: the network namespace has no address but loopback and link-local "
        "ones, so whether to program IPv6 cannot be decided (istio-iptables fails here too) (pass "
        "--enable-ipv6=true or --enable-ipv6=false)\n"
    )
    status, out, err = run("--network-namespace", "mr-no-such-namespace", "--enable-ipv6=false", *PRODUCTION)
    assert (status, out) == (3, "")
    assert err == (
        "meshredirect istio-iptables: error: network namespace /var/run/netns/mr-no-such-namespace does not exist "
        "(create it (ip netns add NAME) or give /proc/PID/ns/net of a running process)\n"
    )


def test_run_validation_passes_after_apply_and_fails_with_istio_s_code_without_rules() -> None:
    with PodNetwork() as net:
        where = str(net.pod_target.path)
        status, _out, err = run(
            "--network-namespace", where, "--skip-rule-apply", "--run-validation", "--probe-timeout=500ms", *PRODUCTION
        )
        assert status == 126
        assert "likely cause: rules absent" in err and err.rstrip().endswith("capture does NOT work as the policy says")
        status, out, err = run("--network-namespace", where, "--run-validation", "--probe-timeout=2s", *PRODUCTION)
        assert status == 0, err
        assert out.rstrip().endswith("capture works")
        assert "ipv4 outbound: ok: the connection to 192.0.2.1:15002 arrived at port 15001" in out
