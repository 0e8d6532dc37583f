"""Where ``meshredirect istio-iptables`` touches the kernel: one small seam over the apply layer.

Today it drives :class:`meshredirect.apply.iptables.IptablesApplier`; when the
apply layer's ``apply``/``cleanup``/``validate`` API lands, only this module
changes. It adds what the command needs on top: a target namespace given as a
name or a path, the iptables variant (forced or detected), drift detection for
``--reconcile``, and TPROXY's policy routing.

Drift is judged on our lines only: the chains named with the policy's prefix and
the jumps into them, as ``iptables-save`` prints them, against what the
``iptables-save`` backend prints for the wanted ruleset (the kernel tests prove
the two print alike).

>>> owned_lines("*nat\\n:OUTPUT ACCEPT [5:300]\\n:ISTIO_OUTPUT - [0:0]\\n-A OUTPUT -j KUBE\\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\\nCOMMIT\\n", "ISTIO")
{'nat': (':ISTIO_OUTPUT', '-A OUTPUT -p tcp -j ISTIO_OUTPUT')}
"""

from __future__ import annotations

import enum
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner, Runner
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset
from meshredirect.policy import InterceptionMode, Policy

__all__ = ["Drift", "PathRunner", "apply_ruleset", "choose_variant", "cleanup_rules", "owned_lines", "runner_for"]

_JUMP = re.compile(r"\s-[jg]\s+(\S+)")
_NETNS_DIR: Final = Path("/var/run/netns")


class PathRunner:
    """Runs commands inside the network namespace at a path (``/proc/PID/ns/net``) with ``nsenter``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["nsenter", f"--net={self.path}", "--", *argv],
                input=input,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        except FileNotFoundError as exc:
            raise EnvironmentProblem(
                f"{exc.filename} is not installed", remedy="install the Debian packages util-linux, iptables, iproute2"
            ) from None


def runner_for(netns: str | None) -> Runner:
    """A runner for the namespace named (``/var/run/netns/NAME``) or at a path; the current one for None."""
    if not netns:
        return NamespaceRunner(None)
    if "/" not in netns:
        if not (_NETNS_DIR / netns).exists():
            raise EnvironmentProblem(f"network namespace {netns!r} does not exist (no {_NETNS_DIR / netns})")
        return NamespaceRunner(netns)
    if not os.path.exists(netns):
        raise EnvironmentProblem(f"network namespace {netns!r} does not exist")
    return PathRunner(netns)


def choose_variant(runner: Runner, forced: str) -> tuple[str, str]:
    """The iptables variant to use and why: the forced one, else legacy when its tables hold rules, else nft."""
    if forced:
        return forced, f"forced with --force-iptables-binary={forced}"
    try:
        result = runner(["iptables-legacy-save"])
    except EnvironmentProblem:
        return "nft", "iptables-legacy is not installed"
    if result.returncode == 0 and any(line.startswith("-A ") for line in result.stdout.splitlines()):
        return "legacy", "the legacy tables already hold rules"
    return "nft", "the legacy tables hold no rules"


def owned_lines(save_text: str, prefix: str) -> dict[str, tuple[str, ...]]:
    """Per table, our chain declarations (counters dropped) and rules, in order, from ``iptables-save`` text."""
    ours = prefix + "_"
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), [])
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(ours):
                current.append(":" + name)
        elif line.startswith("-A "):
            chain = line.split()[1]
            jump = _JUMP.search(line)
            if chain.startswith(ours) or (jump is not None and jump.group(1).startswith(ours)):
                current.append(line)
    return {table: tuple(lines) for table, lines in tables.items() if lines}


class Drift(enum.Enum):
    """How the rules of ours in the kernel compare with the wanted ones."""

    ABSENT = "absent"
    CURRENT = "current"
    DIFFERENT = "different"


def _drift(applier: IptablesApplier, ruleset: Ruleset, prefix: str, families: Sequence[Family]) -> Drift:
    from meshredirect.api import render

    wanted = render(ruleset, "iptables-save")
    have = {f: owned_lines(applier.saved(f), prefix) for f in families}
    want = {f: owned_lines(wanted.artifact(f).content, prefix) if f in ruleset.families else {} for f in families}
    if not any(have.values()):
        return Drift.ABSENT
    return Drift.CURRENT if have == want else Drift.DIFFERENT


def _routing(runner: Runner, policy: Policy, families: Sequence[Family], *, add: bool) -> list[str]:
    """TPROXY's policy routing: marked packets are delivered locally (``ip rule`` + a local default route)."""
    done: list[str] = []
    mark, table = str(policy.tproxy_mark), str(policy.tproxy_route_table)
    for family in families:
        v = f"-{family.version}"
        rules = runner(["ip", v, "rule", "show"]).stdout
        present = any(
            f"lookup {table}" in line and re.search(rf"fwmark (0x)?{policy.tproxy_mark:x}\b|fwmark {mark}\b", line)
            for line in rules.splitlines()
        )
        if add:
            commands = [] if present else [["ip", v, "rule", "add", "fwmark", mark, "lookup", table]]
            commands.append(["ip", v, "route", "replace", "local", "default", "dev", "lo", "table", table])
        else:
            commands = [["ip", v, "rule", "del", "fwmark", mark, "lookup", table]] if present else []
            commands.append(["ip", v, "route", "flush", "table", table])
        for argv in commands:
            result = runner(argv)
            if result.returncode != 0 and add:
                raise EnvironmentProblem(f"{' '.join(argv)} failed: {result.stderr.strip()}")
            done.append(" ".join(argv))
    return done


def apply_ruleset(
    ruleset: Ruleset,
    policy: Policy,
    *,
    runner: Runner,
    variant: str,
    reconcile: bool,
    force: bool,
) -> tuple[int, list[str]]:
    """Apply our rules; returns an exit status (0, or 1 for drift without ``reconcile``) and what was done."""
    applier = IptablesApplier(runner, variant=variant)
    families = (Family.IPV4, Family.IPV6)
    notes: list[str] = []
    if not force:
        drift = _drift(applier, ruleset, policy.chain_prefix, families)
        if drift is Drift.CURRENT:
            notes.append("the rules are already in place; nothing changed")
            return 0, notes
        if drift is Drift.DIFFERENT and not reconcile:
            notes.append(
                f"rules of ours (chains {policy.chain_prefix}_*) are already installed and differ from the wanted "
                "ones; nothing changed (pass --reconcile to replace them)"
            )
            return 1, notes
    for family in families:
        if family not in ruleset.families:
            cleaned = applier.cleanup(policy.chain_prefix, (family,))
            notes += [f"{c.family.value}: removed our rules" for c in cleaned if c.changed]
    for change in applier.apply(ruleset):
        notes.append(f"{change.family.value}: {'applied' if change.changed else 'unchanged'}")
    if policy.inbound_mode is InterceptionMode.TPROXY and policy.captures_inbound:
        notes += _routing(runner, policy, ruleset.families, add=True)
    return 0, notes


def cleanup_rules(policy: Policy, *, runner: Runner, variant: str) -> list[str]:
    """Remove every rule of ours (both families) and, in TPROXY mode, the policy routing."""
    applier = IptablesApplier(runner, variant=variant)
    notes = [
        f"{c.family.value}: removed our rules" if c.changed else f"{c.family.value}: nothing to remove"
        for c in applier.cleanup(policy.chain_prefix, (Family.IPV4, Family.IPV6))
    ]
    if policy.inbound_mode is InterceptionMode.TPROXY:
        notes += _routing(runner, policy, (Family.IPV4, Family.IPV6), add=False)
    return notes


def cleanup_document(policy: Policy, *, runner: Runner, variant: str) -> str:
    """What :func:`cleanup_rules` would feed ``iptables-restore``, for ``--dry-run``."""
    from meshredirect.backend import get_backend

    applier = IptablesApplier(runner, variant=variant)
    backend = get_backend("iptables-restore")()
    parts = []
    for family in (Family.IPV4, Family.IPV6):
        document = backend.cleanup(family, applier.saved(family), policy.chain_prefix)  # type: ignore[attr-defined]
        if document:
            parts.append(f"# {family.value}\n{document}")
    return "".join(parts)
