"""The plugin's seam to the apply layer: load, read back and remove our rules in a pod's namespace.

The namespace is a path (``CNI_NETNS``: ``/var/run/netns/X`` or
``/proc/PID/ns/net``); tools run inside it through ``nsenter --net=PATH``.
Today this drives :class:`meshredirect.apply.iptables.IptablesApplier`; the
apply layer's public ``apply``/``cleanup`` functions take its place when
they land, without changing the plugin.

:func:`differences` is what CHECK compares: our chains and the jumps into
them, as ``iptables-save`` prints them, against what the compiled ruleset
renders to. It compares normalised text (the ``iptables-save`` backend prints
exactly what the kernel's tools print, which the kernel tests prove); a
semantic comparison replaces it when the reader and the semantics engine
are available.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> expected = compile_policy(Policy())
>>> differences(expected, {})
['ipv4: our rules are missing (no ISTIO_ chains in the nat table)']
"""

from __future__ import annotations

import difflib
import itertools
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset

if TYPE_CHECKING:
    from meshredirect.apply.iptables import IptablesApplier

__all__ = ["NsenterRunner", "RuleInstaller", "differences", "owned_lines"]

#: Both families are cleaned on DEL: the policy may have changed since ADD.
ALL_FAMILIES: Final = (Family.IPV4, Family.IPV6)


class NsenterRunner:
    """Runs a command inside the network namespace at ``path`` (``nsenter --net=PATH``)."""

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
                f"{exc.filename} is not installed", remedy="install the Debian packages util-linux and iptables"
            ) from None


def owned_lines(save_text: str, prefix: str) -> dict[str, list[str]]:
    """Per table, the lines of ``iptables-save`` output that are ours: our chains, their rules, jumps into them.

    Counters are dropped, so the result compares across loads.

    >>> text = '''*nat
    ... :OUTPUT ACCEPT [3:180]
    ... :ISTIO_OUTPUT - [0:0]
    ... :KUBE-X - [0:0]
    ... -A OUTPUT -p tcp -j ISTIO_OUTPUT
    ... -A OUTPUT -j KUBE-X
    ... -A ISTIO_OUTPUT -j RETURN
    ... COMMIT
    ... '''
    >>> owned_lines(text, "ISTIO")
    {'nat': [':ISTIO_OUTPUT', '-A OUTPUT -p tcp -j ISTIO_OUTPUT', '-A ISTIO_OUTPUT -j RETURN']}
    """
    mine = prefix + "_"
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line == "COMMIT":
            current = None
        elif current is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(mine):
                current.append(f":{chain}")
        elif line.startswith("-A "):
            tokens = line.split()
            chain = tokens[1]
            targets = [b for a, b in itertools.pairwise(tokens) if a in ("-j", "-g", "--jump", "--goto")]
            if chain.startswith(mine) or any(t.startswith(mine) for t in targets):
                current.append(line)
    return {name: lines for name, lines in tables.items() if lines}


def differences(expected: Ruleset, installed: Mapping[Family, str]) -> list[str]:
    """What differs between the rules ``expected`` renders to and the installed ``iptables-save`` text.

    Empty when our rules are present and unchanged in every family of ``expected``.
    """
    from meshredirect.api import render

    prefix = expected.owner_prefix or ""
    rendering = render(expected, "iptables-save")
    problems: list[str] = []
    for family in expected.families:
        want = owned_lines(rendering.artifact(family).content, prefix)
        got = owned_lines(installed.get(family, ""), prefix)
        if not got:
            tables = ", ".join(sorted(want))
            problems.append(f"{family.value}: our rules are missing (no {prefix}_ chains in the {tables} table)")
            continue
        for table in sorted(set(want) | set(got)):
            a, b = want.get(table, []), got.get(table, [])
            if a != b:
                diff = difflib.unified_diff(a, b, "expected", "installed", lineterm="", n=1)
                problems.append(f"{family.value} {table}: our rules differ:\n" + "\n".join(diff))
    return problems


class RuleInstaller:
    """Our rules in one namespace, through the iptables tools of one variant (or detected)."""

    def __init__(self, netns: str, *, variant: str = "auto") -> None:
        self.netns = netns
        self.runner = NsenterRunner(netns)
        self.requested_variant = variant

    def namespace_exists(self) -> bool:
        return os.path.exists(self.netns)

    def detect_variant(self) -> str:
        """``legacy`` when the legacy tables already hold rules in the namespace, else ``nft`` (as meshes do)."""
        if self.requested_variant != "auto":
            return self.requested_variant
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            result = self.runner([tool])
            if result.returncode == 0 and any(line.startswith("-A ") for line in result.stdout.splitlines()):
                return "legacy"
        return "nft"

    def _applier(self, variant: str) -> IptablesApplier:
        from meshredirect.apply.iptables import IptablesApplier

        return IptablesApplier(self.runner, variant=variant)

    def apply(self, ruleset: Ruleset) -> str:
        """Load ``ruleset`` (replacing ours, one transaction per family); returns the variant used."""
        variant = self.detect_variant()
        self._applier(variant).apply(ruleset)
        return variant

    def saved(self, families: Sequence[Family]) -> dict[Family, str]:
        variant = self.detect_variant()
        applier = self._applier(variant)
        return {family: applier.saved(family) for family in families}

    def remove(self, prefix: str) -> None:
        """Remove our chains and jumps in both families, in every variant that holds some."""
        if self.requested_variant != "auto":
            variants: tuple[str, ...] = (self.requested_variant,)
        else:
            # A node image may ship only one variant's tools; rules cannot exist in a variant without them.
            variants = tuple(v for v in ("nft", "legacy") if shutil.which(f"iptables-{v}-save"))
        for variant in variants:
            self._applier(variant).cleanup(prefix, ALL_FAMILIES)
