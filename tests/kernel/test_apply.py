"""The apply layer in real namespaces: dry runs, idempotence, replacement, atomicity, exact cleanup, errors.

Every comparison is of the whole namespace (:func:`meshredirect.testing.state.kernel_state`: both
iptables variants and families, the nftables ruleset, ip rules and routes, counters aside), next to
other tools' rules and routing that must stay exactly as they are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings

from conftest import ROOT, require_kernel
from kernel.test_iptables_load import FOREIGN_V4
from kernel.unprivileged import run_cli_as
from meshredirect.apply.actions import apply, cleanup
from meshredirect.apply.base import FAMILIES, ApplyFailed
from meshredirect.apply.iptables import IptablesApplier, VariantChoice
from meshredirect.apply.netns import Target
from meshredirect.apply.routing import TproxyRoute, routes_for
from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.errors import BackendNotFoundError, EnvironmentProblem, PolicyError
from meshredirect.ir import Family, Jump, Rule, Ruleset, Table
from meshredirect.policy import Policy
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.state import kernel_state, without_empty_tables
from meshredirect.testing.strategies import policies

pytestmark = pytest.mark.kernel

VARIANTS = ("nft", "legacy")
#: (backend, iptables variant): both iptables variants, and nftables.
BACKENDS = [("iptables", "nft"), ("iptables", "legacy"), ("nftables", None)]
BACKEND_IDS = [f"{b}-{v}" if v else b for b, v in BACKENDS]

FOREIGN_V6 = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:96::1/128 -p tcp -m tcp --dport 443 -j DNAT --to-destination [fd00::5]:6443
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-xmark 0x2/0xff
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
COMMIT
"""

#: Both families, TPROXY (mangle, routing), DNS capture (raw), drop-invalid: every table we use.
EVERYTHING = Policy(
    families="both", inbound_mode="TPROXY", drop_invalid=True, dns={"enabled": True, "capture_all": True}
)
PLAIN_V4 = Policy(outbound_port=15101, inbound_ports="80,443")


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


@pytest.fixture
def ns() -> Iterator[Target]:
    with NetNamespace() as namespace:
        yield Target.of(str(namespace.path))


def run(target: Target, argv: Sequence[str], input: str | None = None) -> None:
    result = target.run(argv, input)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"


#: Another tool's native nftables table, with hooks where ours are.
FOREIGN_NFT = """\
table inet firewall {
    set blocked { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }
    chain input { type filter hook input priority filter; policy accept; ip saddr @blocked drop; tcp dport 22 accept; }
    chain output { type nat hook output priority -100; policy accept; ip daddr 198.51.100.1 tcp dport 80 dnat ip to 10.0.0.9; }
}
"""


def load_foreign(target: Target, variant: str, *, native: bool = False) -> None:
    """Other tools' rules in every table we touch, and their policy routing (one rule identical to ours);
    with ``native``, a native nftables table too."""
    run(target, [f"iptables-{variant}-restore"], FOREIGN_V4)
    run(target, [f"ip6tables-{variant}-restore"], FOREIGN_V6)
    if native:
        run(target, ["nft", "-f", "-"], FOREIGN_NFT)
    run(target, ["ip", "-4", "rule", "add", "fwmark", "0x539", "lookup", "133"])
    run(target, ["ip", "-6", "rule", "add", "fwmark", "0x7", "lookup", "200"])
    run(target, ["ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "133"])
    run(target, ["ip", "-6", "route", "add", "local", "default", "dev", "lo", "table", "200"])


# ----------------------------------------------------------------------------- dry run


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=BACKEND_IDS)
def test_dry_run_prints_everything_and_changes_nothing(ns: Target, backend: str, variant: str | None) -> None:
    load_foreign(ns, variant or "nft", native=backend == "nftables")
    before = kernel_state(ns)
    outcome = apply(EVERYTHING, backend=backend, netns=ns, variant=variant, dry_run=True)
    assert kernel_state(ns) == before
    assert outcome.dry_run and outcome.changed
    text = outcome.documents()
    if backend == "iptables":
        assert f"# iptables-{variant}-restore --noflush\n*raw\n" in text
        assert f"# ip6tables-{variant}-restore --noflush\n*raw\n" in text
    else:
        assert text.startswith('# nft -j -f -\n{"nftables": [{"add": {"table": {"family": "ip", "name": "istio"}}}')
    # Another tool's local route in table 133 is there already (not ours: left alone); ours go next to it.
    assert text.endswith(
        "ip -4 rule add fwmark 0x539 lookup 133 protocol 157\n"
        "ip -6 route add local default dev lo table 133 proto 157\n"
        "ip -6 rule add fwmark 0x539 lookup 133 protocol 157\n"
    )
    assert "would change" in outcome.report() and "routing: would run ip -4 rule add" in outcome.report()

    apply(EVERYTHING, backend=backend, netns=ns, variant=variant)
    applied = kernel_state(ns)
    assert applied != before
    dry_cleanup = cleanup(EVERYTHING, backend=backend, netns=ns, dry_run=True)
    assert dry_cleanup.changed and kernel_state(ns) == applied
    assert not apply(EVERYTHING, backend=backend, netns=ns, variant=variant, dry_run=True).changed


# ----------------------------------------------------------------------------- idempotence, replacement


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=BACKEND_IDS)
def test_applying_again_changes_nothing_and_says_so(ns: Target, backend: str, variant: str | None) -> None:
    load_foreign(ns, variant or "nft", native=backend == "nftables")
    first = apply(EVERYTHING, backend=backend, netns=ns, variant=variant)
    state = kernel_state(ns)
    second = apply(EVERYTHING, backend=backend, netns=ns, variant=variant)
    assert first.changed and not second.changed
    # Nothing was even loaded: no document, no routing command.
    assert {change.document for change in second.changes} == {""} and second.routing == ()
    if backend == "iptables":
        expected = [
            f"ipv4 (iptables-{variant}-restore): already up to date",
            f"ipv6 (ip6tables-{variant}-restore): already up to date",
        ]
    else:
        expected = ["ipv4+ipv6 (nft): already up to date"]
    assert second.report().splitlines()[-len(expected) - 1 :] == [*expected, "nothing changed: already up to date"]
    assert kernel_state(ns) == state


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=BACKEND_IDS)
def test_a_different_policy_replaces_ours_as_if_it_had_been_the_only_one(backend: str, variant: str | None) -> None:
    with NetNamespace() as a, NetNamespace() as b:
        replaced, fresh = Target.of(str(a.path)), Target.of(str(b.path))
        for target in (replaced, fresh):
            load_foreign(target, variant or "nft", native=backend == "nftables")
        apply(EVERYTHING, backend=backend, netns=replaced, variant=variant)
        outcome = apply(PLAIN_V4, backend=backend, netns=replaced, variant=variant)
        apply(PLAIN_V4, backend=backend, netns=fresh, variant=variant)
        assert kernel_state(replaced) == kernel_state(fresh)
    # The TPROXY routing went with the old policy; IPv6 (not in the new policy) lost our rules.
    assert [str(command) for command in outcome.routing] == [
        "ip -4 rule del fwmark 0x539 lookup 133 protocol 157",
        "ip -6 rule del fwmark 0x539 lookup 133 protocol 157",
        "ip -6 route del local default dev lo table 133 proto 157",
    ]
    assert all(change.changed for change in outcome.changes)


# ----------------------------------------------------------------------------- atomicity


def with_rejected_rule(ruleset: Ruleset, family: Family) -> Ruleset:
    """The ruleset plus a rule only the kernel refuses, in the last table it loads for ``family``: a jump
    from the outbound redirect chain back to the chain that called it makes a loop (ELOOP)."""
    tables = list(ruleset.tables)
    index = max(i for i, t in enumerate(tables) if t.family is family and t.name == "nat")
    nat = tables[index]
    chains = [
        attrs.evolve(c, rules=(*c.rules, Rule(target=Jump(chain="ISTIO_OUTPUT")))) if c.name == "ISTIO_REDIRECT" else c
        for c in nat.chains
    ]
    tables[index] = Table(family=nat.family, name=nat.name, chains=tuple(chains))
    return attrs.evolve(ruleset, tables=tuple(tables))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_iptables_tools_commit_table_by_table_and_revert_undoes_it(ns: Target, variant: str) -> None:
    """Why the applier keeps the state before: run alone, a document changes raw and mangle before nat fails."""
    load_foreign(ns, variant)
    apply(Policy(families="both", outbound_ports_exclude="22"), netns=ns, variant=variant)
    before = kernel_state(ns)
    applier = IptablesApplier(ns.run, variant=variant)
    steps = applier.plan(with_rejected_rule(compile_policy(EVERYTHING), Family.IPV6))
    result = ns.run(list(steps[1].argv), steps[1].document)
    assert result.returncode != 0
    assert kernel_state(ns) != before
    assert applier.revert(steps[1:], "ISTIO")
    assert kernel_state(ns) == before


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=BACKEND_IDS)
def test_a_rule_the_kernel_rejects_leaves_everything_as_it_was(ns: Target, backend: str, variant: str | None) -> None:
    load_foreign(ns, variant or "nft", native=backend == "nftables")
    apply(Policy(families="both", outbound_ports_exclude="22"), backend=backend, netns=ns, variant=variant)
    before = kernel_state(ns)
    broken = with_rejected_rule(compile_policy(EVERYTHING), Family.IPV6)
    # iptables: IPv4 commits, then IPv6 fails half way, and all of it is undone; nftables: one batch.
    with pytest.raises(ApplyFailed) as failure:
        apply(broken, backend=backend, netns=ns, variant=variant, routing=routes_for(EVERYTHING))
    message = str(failure.value)
    if backend == "iptables":
        assert message.startswith(f"ip6tables-{variant}-restore --noflush refused the ipv6 rules: ")
    else:
        assert message.startswith("nft refused the rules: ") and "Too many links" in message
    assert message.endswith("(the previous rules were restored)")
    assert failure.value.undone
    assert kernel_state(ns) == before


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=BACKEND_IDS)
def test_a_routing_command_the_kernel_rejects_undoes_rules_and_routing(
    ns: Target, backend: str, variant: str | None
) -> None:
    # nftables: the rules' transaction committed, so the revert loads our tables back as they were listed.
    load_foreign(ns, variant or "nft", native=backend == "nftables")
    apply(PLAIN_V4, backend=backend, netns=ns, variant=variant)
    before = kernel_state(ns)
    routing = (
        TproxyRoute(family=Family.IPV4, mark=0x539, table=134),
        TproxyRoute(family=Family.IPV6, mark=0x539, table=0),  # table 0 is refused for a rule
    )
    with pytest.raises(ApplyFailed, match=r"^ip -6 rule add fwmark 0x539 lookup 0 protocol 157 failed: "):
        apply(EVERYTHING, backend=backend, netns=ns, variant=variant, routing=routing)
    assert kernel_state(ns) == before


# ----------------------------------------------------------------------------- cleanup


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=BACKEND_IDS)
def test_cleanup_removes_exactly_our_chains_jumps_and_routing(ns: Target, backend: str, variant: str | None) -> None:
    load_foreign(ns, variant or "nft", native=backend == "nftables")
    before = kernel_state(ns)
    apply(EVERYTHING, backend=backend, netns=ns, variant=variant)
    assert kernel_state(ns) != before
    outcome = cleanup(backend=backend, netns=ns)  # the default prefix; iptables: both variants looked at
    assert kernel_state(ns) == before
    if backend == "iptables":
        assert outcome.variant == VariantChoice(variant="nft,legacy", reason="cleanup looks at every installed variant")
        changed = [True, True, False, False] if variant == "nft" else [False, False, True, True]
        assert [c.changed for c in outcome.changes] == changed
    again = cleanup(EVERYTHING, backend=backend, netns=ns)
    assert not again.changed and again.report().endswith("nothing of ours found")


def test_cleanup_of_one_family_leaves_the_other(ns: Target) -> None:
    apply(EVERYTHING, netns=ns)
    cleanup(netns=ns, families="ipv6")
    state = kernel_state(ns)
    assert "ISTIO_OUTPUT" in state["iptables-nft-save"] and "ISTIO" not in state["ip6tables-nft-save"]
    assert "lookup 133 proto 157" in state["ip -4 rule"] and "133" not in state["ip -6 rule"]


# ----------------------------------------------------------------------------- variants


def test_the_variant_is_legacy_only_when_legacy_tables_hold_rules(ns: Target) -> None:
    assert apply(Policy(), netns=ns, dry_run=True).variant == VariantChoice(
        variant="nft", reason="the legacy tables hold no rules"
    )
    run(ns, ["iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "icmp", "-j", "ACCEPT"])
    outcome = apply(Policy(), netns=ns)
    assert outcome.variant == VariantChoice(
        variant="legacy", reason="the legacy tables already hold rules (1 in ipv4 filter)"
    )
    state = kernel_state(ns)
    assert "-j ISTIO_OUTPUT" in state["iptables-legacy-save"] and "ISTIO" not in state["iptables-nft-save"]
    assert apply(Policy(), netns=ns, variant="nft", dry_run=True).variant == VariantChoice(
        variant="nft", reason="as asked"
    )


# ----------------------------------------------------------------------------- the proof that revert works


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(first=policies(chain_prefix="ISTIO"), second=policies(chain_prefix="ISTIO"))
def test_revert_puts_any_policy_back_after_any_other(first: Policy, second: Policy) -> None:
    with NetNamespace() as namespace:
        target = Target.of(str(namespace.path))
        run(target, ["iptables-nft-restore"], FOREIGN_V4)
        applier = IptablesApplier(target.run)
        applier.execute(applier.plan(compile_policy(first)), "ISTIO")
        before = [without_empty_tables(applier.saved(family)) for family in FAMILIES]
        steps = applier.plan(compile_policy(second))
        applier.execute(steps, "ISTIO")
        assert applier.revert(steps, "ISTIO")
        assert [without_empty_tables(applier.saved(family)) for family in FAMILIES] == before


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_namespace_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem) as missing:
        apply(Policy(), netns="/var/run/netns/mr-no-such-namespace")
    assert str(missing.value) == (
        "network namespace /var/run/netns/mr-no-such-namespace does not exist "
        "(create it (ip netns add NAME) or give /proc/PID/ns/net of a running process)"
    )
    regular = tmp_path / "not-a-namespace"
    regular.write_text("")
    for path in (str(regular), "/proc/self/ns/uts"):
        with pytest.raises(EnvironmentProblem, match=f"^{path} is not a network namespace$"):
            cleanup(netns=path)
    with pytest.raises(BackendNotFoundError, match=r"did you mean 'nftables'\? \(available: iptables, nftables\)"):
        apply(Policy(), backend="nftable")
    with pytest.raises(PolicyError, match=r"^iptables variant: expected nft or legacy"):
        apply(Policy(), variant="nf")
    with pytest.raises(PolicyError, match=r"^owner_prefix: expected the prefix of our chain names"):
        apply(Ruleset(tables=compile_policy(Policy()).tables))
    with pytest.raises(PolicyError, match=r"^routing: expected the TPROXY policy routing"):
        apply(compile_policy(EVERYTHING))


def test_missing_tools_are_named_with_their_package(
    ns: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem) as problem:
        apply(Policy(), netns=ns)
    assert str(problem.value) == "iptables-nft-save is not installed (install the Debian package iptables)"


def cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_apply_cleanup_and_their_reports(ns: Target, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(ns.path)
    status, out, err = cli(["apply", "--netns", where, "--iptables-variant", "nft", "--dry-run"], capsys)
    assert status == 0 and out.startswith("# iptables-nft-restore --noflush\n*nat\n:ISTIO_INBOUND - [0:0]\n")
    assert err.splitlines()[0] == f"apply (dry run): network namespace {where}, backend iptables"
    assert kernel_state(ns)["iptables-nft-save"] == ""
    status, out, _ = cli(["apply", "--netns", where, "--iptables-variant", "nft"], capsys)
    assert (status, out) == (
        0,
        f"apply: network namespace {where}, backend iptables\n"
        "iptables variant: nft (as asked)\n"
        "ipv4 (iptables-nft-restore): changed\n"
        "ipv6 (ip6tables-nft-restore): already up to date\n",
    )
    status, out, _ = cli(["apply", "--netns", where], capsys)
    assert status == 0 and out.endswith("nothing changed: already up to date\n")
    status, out, _ = cli(["cleanup", "--netns", where, "--family", "ipv4", "--iptables-variant", "nft"], capsys)
    assert (status, out) == (
        0,
        f"cleanup: network namespace {where}, backend iptables\n"
        "iptables variant: nft (as asked)\n"
        "ipv4 (iptables-nft-restore): changed\n",
    )
    assert "ISTIO" not in kernel_state(ns)["iptables-nft-save"]


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["apply", "--iptables-variant", "foo"], 2, "--iptables-variant: expected nft, legacy or auto, got 'foo'"),
        (["apply", "--backend", "iptable"], 2, "unknown backend 'iptable'; did you mean 'iptables'?"),
        (
            ["cleanup", "--netns", "mr-no-such-namespace"],
            3,
            "network namespace /var/run/netns/mr-no-such-namespace does not exist",
        ),
        (["apply", "--netns", "mr-x", "-p", "0"], 2, "outbound_port: expected a port number 1-65535, got '0'"),
    ],
)
def test_cli_errors_exit_with_a_message_and_change_nothing(
    ns: Target, argv: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = kernel_state(ns)
    got, out, err = cli(argv, capsys)
    assert (got, out) == (status, "")
    assert err.startswith(f"meshredirect {argv[0]}: error: ") and message in err, err
    assert "Traceback" not in err
    assert kernel_state(ns) == before


def test_cli_refuses_without_privilege(ns: Target) -> None:
    """As an unprivileged user (uid 65534) apply exits 3 naming what is missing."""
    import meshredirect.apply.actions
    import meshredirect.commands._apply_args
    import meshredirect.commands._policy_args
    import meshredirect.commands.apply  # noqa: F401 (imported before the child drops privileges)

    status, output = run_cli_as(65534, ["apply", "--netns", str(ns.path)])
    assert (status, output) == (
        3,
        "meshredirect apply: error: apply needs root: netfilter rules and routing can only be read and changed "
        "with CAP_NET_ADMIN (running as uid 65534) (run as root, e.g. with sudo, or in a privileged init container)\n",
    )


def test_missing_nftables_bindings_are_named_with_their_package(tmp_path: Path) -> None:
    """An interpreter without site processing cannot see the bindings (they come through a .pth file)."""
    import attrs as attrs_module

    paths = [str(ROOT / "src"), str(ROOT / "backends"), str(Path(attrs_module.__file__).parent.parent)]
    script = "from meshredirect.apply.netns import require_nftables_bindings as r; r()"
    result = subprocess.run(
        [sys.executable, "-S", "-c", script],
        env={"PYTHONPATH": ":".join(paths), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "meshredirect.errors.EnvironmentProblem: the libnftables Python bindings (module nftables) are not "
        "installed (install the Debian package python3-nftables (it is not on PyPI); a virtual environment "
        "reaches it through a .pth file, as ./dev setup writes one)"
    )


def test_a_process_namespace_path_is_a_target() -> None:
    """/proc/PID/ns/net of a process running in a namespace names that namespace."""
    require_kernel()
    with NetNamespace() as namespace:
        sleeper = namespace.popen(["sleep", "60"])
        try:
            outcome = apply(Policy(), netns=f"/proc/{sleeper.pid}/ns/net", variant="nft")
            assert outcome.namespace == f"network namespace /proc/{sleeper.pid}/ns/net" and outcome.changed
            assert "-j ISTIO_OUTPUT" in namespace.run(["iptables-nft-save"]).stdout
        finally:
            sleeper.kill()
            sleeper.wait()
