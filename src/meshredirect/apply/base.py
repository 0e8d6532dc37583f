"""What every applier shares: the runner it acts through, its plan steps, its results, its failure.

An applier (one per backend: iptables, nftables) works in two phases, so the
caller can combine it with other changes (TPROXY's policy routing) and undo
everything when any part fails:

1. ``plan(ruleset, families)`` / ``plan_cleanup(owner_prefix, families)`` read the
   target's current state and return the :class:`Step` objects (transactions)
   that would bring our part of it where it should be; nothing changes yet.
   A step with an empty document means "already up to date".
2. ``execute(steps, owner_prefix)`` runs them in order; when one fails it puts
   every family back as it was and raises :class:`ApplyFailed`.
   ``revert(steps, owner_prefix)`` does the same after a later failure.

>>> step = Step(family=Family.IPV4, argv=("iptables-nft-restore", "--noflush"), document="", before="")
>>> planned(step)
AppliedChange(family=<Family.IPV4: 'ipv4'>, document='', changed=False, tool='iptables-nft-restore --noflush')
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Final, Protocol

import attrs

from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset

__all__ = ["FAMILIES", "AppliedChange", "Applier", "ApplyFailed", "Runner", "Step", "planned"]

#: The families an applier touches unless told otherwise (a family a policy leaves out loses our rules).
FAMILIES: Final = (Family.IPV4, Family.IPV6)


class Runner(Protocol):
    """Runs one command in the target namespace and returns its result (never raises for a nonzero exit)."""

    def __call__(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]: ...


class ApplyFailed(EnvironmentProblem):
    """The kernel refused a change. Everything changed before it was put back as it was."""

    def __init__(self, message: str, *, undone: bool) -> None:
        super().__init__(
            message,
            remedy="the previous rules were restored" if undone else "RESTORING THE PREVIOUS RULES FAILED TOO",
        )
        self.undone = undone


@attrs.frozen(kw_only=True)
class AppliedChange:
    """What happened (or, in a dry run, would happen) to one family's rules."""

    family: Family
    #: The document the tool loads; empty when nothing had to run.
    document: str
    #: Whether our rules changed (in a dry run: would change).
    changed: bool
    #: The command that loads ``document``.
    tool: str = ""


@attrs.frozen(kw_only=True)
class Step:
    """One planned transaction: a document for one family (INET: an nftables inet table), and the state before."""

    family: Family
    argv: tuple[str, ...]
    document: str
    #: The family's rules before the step, as the tool prints them (what ``Applier.revert`` goes back to).
    before: str


def planned(step: Step) -> AppliedChange:
    """What a step would do, for dry runs."""
    return AppliedChange(
        family=step.family, document=step.document, changed=bool(step.document), tool=" ".join(step.argv)
    )


class Applier(Protocol):
    """What the apply layer needs from a backend's applier (see the module docstring)."""

    def plan(self, ruleset: Ruleset, families: Sequence[Family] = FAMILIES) -> list[Step]: ...

    def plan_cleanup(self, owner_prefix: str, families: Sequence[Family] = FAMILIES) -> list[Step]: ...

    def execute(self, steps: Sequence[Step], owner_prefix: str) -> list[AppliedChange]: ...

    def revert(self, steps: Sequence[Step], owner_prefix: str) -> bool: ...
