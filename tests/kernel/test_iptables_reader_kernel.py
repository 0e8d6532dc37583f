"""The reader against the real kernel: what it reads from rule text equals what it reads from ``iptables-save``
after that text is loaded into a throwaway namespace (both variants, both families).

This checks the reader's model of iptables (restore commands, implicit modules, option order, normal form)
against iptables itself, and the round trip IR -> restore backend -> kernel -> iptables-save -> reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conformance import ISTIO, istio_cases
from conftest import require_kernel
from iptables_canonical import canonical
from iptables_strategies import iptables_rulesets
from kernel.test_iptables_load import FOREIGN_V4
from meshredirect.api import render, resolve_groups
from meshredirect.compiler import compile_policy
from meshredirect.errors import UnsupportedError
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.ir import Family, Ruleset
from meshredirect.policy import Policy
from meshredirect.readers.iptables import read_iptables
from meshredirect.testing.netns import NetNamespace
from test_iptables_reader import GROUPS, MATCH_CASES, RENAME, RESTORE, TARGET_CASES

pytestmark = pytest.mark.kernel

VARIANTS = ("nft", "legacy")
#: Cases whose text the kernel's tools rewrite into something the reader does not model either way.
KERNEL_REWRITES = {
    "-p tcp --dport http": "iptables looks the service name up in /etc/services (a reader does no I/O)",
    "-m recent --set --name x": "xt_recent prints its defaults (--mask, --rsource)",
    "-j CONNMARK --save-mark --left-shift-mark 2": "libxt_CONNMARK prints its default masks",
    "-j CLASSIFY --set-class 1:1": "libxt_CLASSIFY prints the class as 0001:0001",
}


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def _tool(variant: str, family: Family, tool: str) -> str:
    return f"{'ip6tables' if family is Family.IPV6 else 'iptables'}-{variant}-{tool}"


def loaded(text: str, variant: str, family: Family, *, setup: tuple[list[str], ...] = (), noflush: bool = False) -> str:
    """Load restore input into a fresh namespace; what iptables-save prints then."""
    with NetNamespace() as ns:
        for argv in setup:
            ns.run(argv)
        ns.run([_tool(variant, family, "restore"), *(["--noflush"] if noflush else [])], input=text)
        return ns.run([_tool(variant, family, "save")]).stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_match_and_target_case_reads_as_the_kernel_prints_it(variant: str) -> None:
    """Each case in its own unreferenced chain (no hook restrictions apply), one load per table."""
    by_table: dict[str, list[str]] = {"filter": [spec for spec, _ in MATCH_CASES]}
    for table, spec, _ in TARGET_CASES:
        by_table.setdefault(table, []).append(spec)
    ipsets = (["ipset", "create", "mesh-excluded", "hash:net"], ["ipset", "create", "KUBE", "hash:net"])
    compared = 0
    for table, specs in by_table.items():
        lines = [f"*{table}", ":MESH - [0:0]"] + [f":T{i} - [0:0]" for i in range(len(specs))]
        lines += [f"-A T{i} {spec}" for i, spec in enumerate(specs)] + ["COMMIT", ""]
        text = "\n".join(lines)
        mine = read_iptables(text, family="ipv4").tables[0]
        theirs = read_iptables(loaded(text, variant, Family.IPV4, setup=ipsets), family="ipv4").tables[0]
        for i, spec in enumerate(specs):
            if spec in KERNEL_REWRITES:
                assert mine.chain(f"T{i}").rules != theirs.chain(f"T{i}").rules  # still true, or drop it from the list
                continue
            assert mine.chain(f"T{i}").rules == theirs.chain(f"T{i}").rules, spec
            compared += 1
    assert compared == len(MATCH_CASES) + len(TARGET_CASES) - len(KERNEL_REWRITES)


def _istio_case_rulesets() -> Iterator[tuple[str, Ruleset]]:
    for name, config in istio_cases().items():
        yield name, compile_policy(resolve_groups(policy_from_istio_config(config), GROUPS.get))


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_istio_cases_read_back_from_the_kernel_as_loaded(variant: str) -> None:
    for name, ruleset in _istio_case_rulesets():
        restore = render(ruleset, "iptables-restore")
        for family in ruleset.families:
            saved = loaded(restore.artifact(family).content, variant, family)
            assert read_iptables(saved) == canonical(ruleset.for_family(family)), (name, family)


def _restore_files() -> list[tuple[str, Family]]:
    return [
        (path.name, Family.IPV6 if path.name.endswith(".v6.restore") else Family.IPV4)
        for path in sorted((ISTIO / "iptables").glob("*.restore"))
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_istio_restore_files_mean_what_the_kernel_holds_after_loading_them(variant: str) -> None:
    """Istio's own restore input (-N, -I CHAIN N, implicit -m tcp, --to-port, decimal marks...) read directly
    equals it read back from the kernel. Group names are given numbers first (they must exist to load)."""
    for name, family in _restore_files():
        text = (ISTIO / "iptables" / name).read_text()
        numeric = re.sub(r"--gid-owner (java|ftp)\b", lambda m: f"--gid-owner {GROUPS[m.group(1)]}", text)
        direct = read_iptables(text, family=family, groups=GROUPS)
        assert direct == read_iptables(loaded(numeric, variant, family)), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_foreign_node_rules_read_as_the_kernel_holds_them(variant: str) -> None:
    """kube-proxy and Docker style rules: comments, addrtype, statistic, DNAT, MARK, MASQUERADE, conntrack."""
    assert read_iptables(FOREIGN_V4) == read_iptables(loaded(FOREIGN_V4, variant, Family.IPV4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_restore_commands_mean_what_the_kernel_does(variant: str) -> None:
    """-I positions (a list of addresses inserted in reverse), -D by number and by spec, -R, -F, -X, -Z.
    (iptables-nft-restore 1.8.9 crashes on -R of a rule added in the same transaction: not given to it.)"""
    text = RESTORE if variant == "legacy" else RESTORE.replace("-R MESH_IN 3 -p tcp --dport 4 -j RETURN\n", "")
    assert text != RESTORE or variant == "legacy"
    assert read_iptables(text) == read_iptables(loaded(text, variant, Family.IPV4))


def test_renaming_a_chain_means_what_iptables_legacy_does() -> None:
    """-E renames a chain and every jump to it; redeclaring a chain flushes it. (iptables-nft-restore 1.8.9
    refuses to rename a chain inside a transaction once a rule refers to it; the reader follows legacy.)"""
    assert read_iptables(RENAME) == read_iptables(loaded(RENAME, "legacy", Family.IPV4, noflush=True))
    with NetNamespace() as ns:
        assert ns.run(["iptables-nft-restore", "--noflush"], input=RENAME, check=False).returncode != 0


CLEAR = "*raw\nCOMMIT\n*mangle\nCOMMIT\n*nat\nCOMMIT\n*filter\nCOMMIT\n"


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_generated_rulesets_read_back_from_the_kernel_as_loaded(family: Family) -> None:
    """Rulesets of every node kind, their save text loaded with iptables-nft-restore into one namespace (cleared
    each time: the restore backend leaves built-in chain policies alone, the save text sets them);
    rulesets the kernel refuses (hook restrictions, loops) are discarded, and they must stay a minority."""
    stats = {"loaded": 0, "refused": 0}
    with NetNamespace() as ns:
        for name in ("mesh-excluded", "KUBE-LB"):
            ns.run(["ipset", "create", name, "hash:net", "family", "inet" if family is Family.IPV4 else "inet6"])

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(iptables_rulesets(family=family), st.just(None))
        def check(ruleset: Ruleset, _: None) -> None:
            try:
                text = render(ruleset, "iptables-save").artifact(family).content
            except (UnsupportedError, KeyError):
                assume(False)
                return
            # Without --noflush each section replaces its table: clearing all four first, in the same call.
            result = ns.run([_tool("nft", family, "restore")], input=CLEAR + text, check=False)
            if result.returncode != 0:
                stats["refused"] += 1
                assume(False)
            stats["loaded"] += 1
            saved = ns.run([_tool("nft", family, "save")]).stdout
            assert read_iptables(saved, family=family) == canonical(ruleset)

        check()
    assert stats["loaded"] >= 20, stats


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_policies_read_back_from_the_kernel_as_loaded(variant: str) -> None:
    """Compiled generated policies, loaded with the restore backend's input, read back as the oracle says."""
    from meshredirect.testing.strategies import policies

    with NetNamespace() as ns:

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(policies())
        def check(policy: Policy) -> None:
            ruleset = compile_policy(policy)
            restore = render(ruleset, "iptables-restore")
            for family in ruleset.families:
                ns.run([_tool(variant, family, "restore")], input=CLEAR)
                ns.run([_tool(variant, family, "restore"), "--noflush"], input=restore.artifact(family).content)
                saved = ns.run([_tool(variant, family, "save")]).stdout
                assert read_iptables(saved, family=family) == canonical(ruleset.for_family(family))

        check()
