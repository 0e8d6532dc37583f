"""Apply and remove compiled rules with ``iptables-restore --noflush``, one transaction per family.

A :class:`Runner` runs a command in the target namespace (see
:class:`NamespaceRunner`); tests and callers can supply their own.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from typing import Final, Protocol

import attrs

from meshredirect.backend import get_backend
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset

__all__ = ["AppliedChange", "IptablesApplier", "NamespaceRunner", "Runner", "normalise_save"]

VARIANTS: Final = ("nft", "legacy")
_COUNTERS = re.compile(r"\[\d+:\d+\]")


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]: ...


class NamespaceRunner:
    """Runs commands through ``ip netns exec NAME`` (or directly when ``name`` is None)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def __call__(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self.name] if self.name else []
        try:
            return subprocess.run(
                [*prefix, *argv], input=input, capture_output=True, text=True, check=False, timeout=60
            )
        except FileNotFoundError as exc:
            raise EnvironmentProblem(
                f"{exc.filename} is not installed", remedy="install the Debian packages iptables and iproute2"
            ) from None


def normalise_save(text: str) -> str:
    """``iptables-save`` output without comment lines and with zero counters, for comparisons."""
    lines = [_COUNTERS.sub("[0:0]", line) for line in text.splitlines() if line and not line.startswith("#")]
    return "".join(line + "\n" for line in lines)


@attrs.frozen(kw_only=True)
class AppliedChange:
    family: Family
    document: str
    changed: bool


class IptablesApplier:
    """Applies rulesets with the iptables tools of one variant (``nft`` or ``legacy``)."""

    def __init__(self, runner: Runner, *, variant: str = "nft") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        self.runner = runner
        self.variant = variant

    def tool(self, family: Family, tool: str) -> str:
        base = "ip6tables" if family is Family.IPV6 else "iptables"
        return f"{base}-{self.variant}-{tool}"

    def _run(self, argv: Sequence[str], input: str | None = None) -> str:
        result = self.runner(argv, input)
        if result.returncode != 0:
            raise EnvironmentProblem(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def saved(self, family: Family) -> str:
        """The current rules of one family, as ``iptables-save`` prints them."""
        return self._run([self.tool(family, "save")])

    def apply(self, ruleset: Ruleset) -> list[AppliedChange]:
        """Replace our rules by ``ruleset``: one ``iptables-restore --noflush`` transaction per family."""
        backend = get_backend("iptables-restore")
        changes = []
        for family in ruleset.families:
            before = self.saved(family)
            document = backend(installed={family: before}).render(ruleset.for_family(family)).artifact(family).content  # type: ignore[call-arg]
            self._run([self.tool(family, "restore"), "--noflush"], document)
            after = self.saved(family)
            changes.append(
                AppliedChange(family=family, document=document, changed=normalise_save(before) != normalise_save(after))
            )
        return changes

    def cleanup(
        self, owner_prefix: str, families: Sequence[Family] = (Family.IPV4, Family.IPV6)
    ) -> list[AppliedChange]:
        """Remove our chains (named ``owner_prefix + '_'...``) and every jump into them."""
        backend = get_backend("iptables-restore")()
        changes = []
        for family in families:
            document = backend.cleanup(family, self.saved(family), owner_prefix)  # type: ignore[attr-defined]
            if document:
                self._run([self.tool(family, "restore"), "--noflush"], document)
            changes.append(AppliedChange(family=family, document=document, changed=bool(document)))
        return changes
