"""The ``nftables-json`` and ``nftables`` backends: one lowering, two renderings.

``nftables-json`` writes, per address family, the libnftables JSON commands
(``nft -j -f FILE``, or the Python bindings' ``json_cmd``) that replace our
table atomically; ``nftables`` writes the same commands as ``nft -f`` text.

>>> from meshredirect.api import render
>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> rendering = render(compile_policy(Policy(families="both")), "nftables-json", table="mesh")
>>> [(a.name, a.kind) for a in rendering.artifacts]
[('rules.ip.json', 'nftables-json'), ('rules.ip6.json', 'nftables-json')]
>>> rendering.artifacts[0].content.splitlines()[1]
'{"add": {"table": {"family": "ip", "name": "mesh"}}},'
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from meshredirect.backend import Artifact, Rendering
from meshredirect.ir import Ruleset
from meshredirect.readers.nftables import FAMILY_NAMES
from meshredirect_nftables.lowering import NftLowering
from meshredirect_nftables.text import table_text

__all__ = ["NftablesJsonBackend", "NftablesTextBackend", "json_document"]


def json_document(commands: list[Any]) -> str:
    """``{"nftables": [...]}`` with one command per line: compact, yet readable and diffable."""
    if not commands:
        return '{"nftables": []}\n'
    return '{"nftables": [\n' + ",\n".join(json.dumps(c) for c in commands) + "\n]}\n"


class NftablesJsonBackend(NftLowering):
    """IR to libnftables JSON, one artifact per family (``rules.ip.json``, ``rules.ip6.json``, ``rules.inet.json``)."""

    name: ClassVar[str] = "nftables-json"
    kind: ClassVar[str] = "nftables-json"

    def render(self, ruleset: Ruleset) -> Rendering:
        artifacts = tuple(
            Artifact(
                name=f"rules.{FAMILY_NAMES[family]}.json",
                content=json_document(commands),
                family=family,
                kind=self.kind,
            )
            for family, commands in self.commands(ruleset).items()
        )
        return Rendering(backend=self.name, artifacts=artifacts)


class NftablesTextBackend(NftLowering):
    """IR to ``nft -f`` text from the same commands, one artifact per family (``rules.ip.nft``...)."""

    name: ClassVar[str] = "nftables"
    kind: ClassVar[str] = "nftables"

    def render(self, ruleset: Ruleset) -> Rendering:
        artifacts = tuple(
            Artifact(
                name=f"rules.{FAMILY_NAMES[family]}.nft",
                content=table_text(commands),
                family=family,
                kind=self.kind,
            )
            for family, commands in self.commands(ruleset).items()
        )
        return Rendering(backend=self.name, artifacts=artifacts)
