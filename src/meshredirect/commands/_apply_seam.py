"""Where ``meshredirect istio-iptables`` touches the kernel: a thin seam over :mod:`meshredirect.apply`.

The apply layer loads, removes and validates rules (one transaction per table
and family, TPROXY routing included, everything undone on failure). This module
adds what ``istio-iptables`` users expect on top: drift detection for
``--reconcile`` (rules of ours that differ from the wanted ones are an error
unless asked to replace them) and ``--force-apply``.

Drift is judged on our part of the rules only, as the ``iptables-restore``
backend's ``owned`` sees it: our chains and the jumps into them, counters and
other tools' rules aside.
"""

from __future__ import annotations

import enum
from typing import Any

from meshredirect.ir import Family, Ruleset
from meshredirect.policy import Policy

__all__ = ["Drift", "apply_policy", "cleanup_policy", "drift", "validate_policy"]


class Drift(enum.Enum):
    """How the rules of ours in the kernel compare with the wanted ones."""

    ABSENT = "absent"
    CURRENT = "current"
    DIFFERENT = "different"


def drift(ruleset: Ruleset, policy: Policy, *, netns: str | None, variant: str | None) -> Drift:
    """Whether our iptables rules in the namespace are absent, as wanted, or different (both families)."""
    from meshredirect.api import render
    from meshredirect.apply.iptables import IptablesApplier, detect_variant
    from meshredirect.apply.netns import Target, require_root
    from meshredirect.backend import get_backend

    require_root("istio-iptables")
    target = Target.of(netns)
    target.check()
    families = (Family.IPV4, Family.IPV6)
    chosen = variant or detect_variant(target.run, families, target=target).variant
    applier = IptablesApplier(target.run, variant=chosen)
    documents: Any = get_backend("iptables-restore")()
    wanted = render(ruleset, "iptables-save")
    prefix = policy.chain_prefix
    have = {f: documents.owned(applier.saved(f), prefix) for f in families}
    want = {f: documents.owned(wanted.artifact(f).content, prefix) if f in ruleset.families else "" for f in families}
    if not any(have.values()):
        return Drift.ABSENT
    return Drift.CURRENT if have == want else Drift.DIFFERENT


def apply_policy(
    policy: Policy,
    ruleset: Ruleset,
    *,
    netns: str | None,
    backend: str,
    variant: str | None,
    reconcile: bool,
    force: bool,
) -> tuple[int, str]:
    """Apply; returns the exit status (1: drift without ``reconcile``) and the report."""
    from meshredirect.apply.actions import apply

    if backend == "iptables" and not force:
        state = drift(ruleset, policy, netns=netns, variant=variant)
        if state is Drift.DIFFERENT and not reconcile:
            return 1, (
                f"rules of ours (chains {policy.chain_prefix}_*) are already installed and differ from the wanted "
                "ones; nothing changed (pass --reconcile to replace them)"
            )
    outcome = apply(policy, backend=backend, netns=netns, variant=variant)
    return 0, outcome.report()


def cleanup_policy(policy: Policy, *, netns: str | None, backend: str, variant: str | None, dry_run: bool) -> str:
    """Remove our rules and TPROXY routing; the report, or (dry run) what would run."""
    from meshredirect.apply.actions import cleanup

    outcome = cleanup(policy, backend=backend, netns=netns, variant=variant, dry_run=dry_run)
    return outcome.documents() if dry_run else outcome.report()


def validate_policy(
    policy: Policy, *, netns: str | None, backend: str, variant: str | None, timeout: float, probe_port: int
) -> tuple[bool, str]:
    """Check with real connections that capture works (Istio's ``--run-validation``)."""
    from meshredirect.apply import validate

    result = validate(policy, netns=netns, timeout=timeout, probe_port=probe_port, variant=variant, backend=backend)
    return result.ok, result.report()
