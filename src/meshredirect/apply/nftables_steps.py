"""The nftables backend in the apply layer: plan, execute and revert, as the iptables applier does.

Our rules live in tables of our own, one per family (named after the chain
prefix: ``istio``), laid out by the ``nftables-json`` backend. A change is ONE
libnftables JSON document for every family at once (replace our table of
each family the policy programs, delete it in the others): the kernel commits
a netlink batch whole or not at all, so a refused rule leaves everything as it
was, and nothing needs undoing. A revert (after a later step, such as TPROXY
routing, fails) loads our tables back as they were listed before.

The libnftables context is created inside the target namespace
(:meth:`~meshredirect.apply.netns.Target.entered`): it talks netlink in the
namespace it was created in, so no helper process is needed.

Where the pieces come from: the ``nftables-json`` backend through the
registry, and the nftables reader (``meshredirect.readers.nftables``) to
compare what is loaded with what the policy lays out. Without them (a build
without the nftables backend) :func:`nftables_applier` says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, Protocol, cast

from meshredirect.apply.base import FAMILIES, AppliedChange, ApplyFailed, Step, planned
from meshredirect.apply.netns import Target, require_nftables_bindings
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset, Table

__all__ = ["NFT_ARGV", "NftablesSteps", "nftables_applier"]

#: How a step's document would be loaded by hand (the applier loads it in-process, the same way).
NFT_ARGV: Final = ("nft", "-j", "-f", "-")
_NFT_FAMILY: Final = {Family.IPV4: "ip", Family.IPV6: "ip6"}
_OBJECTS: Final = ("table", "chain", "set", "map", "flowtable", "counter", "quota", "ct helper", "limit", "rule")

Json = Any


class _Layout(Protocol):
    """The pure pieces of the nftables backend the applier uses."""

    def table_name(self, ruleset: Ruleset) -> str: ...

    def layout(self, ruleset: Ruleset) -> Ruleset: ...

    def commands(self, ruleset: Ruleset) -> dict[Family, list[Json]]: ...

    def removal(self, family: Family, name: str) -> list[Json]: ...


def nftables_applier(target: Target) -> NftablesSteps:
    """The nftables applier for a namespace, or an error saying what this build or machine lacks."""
    require_nftables_bindings()
    try:
        from meshredirect.backend import create_backend
        from meshredirect.readers.nftables import read_nft_json  # type: ignore[import-not-found,unused-ignore]

        layout = cast(_Layout, create_backend("nftables-json"))
    except (ImportError, LookupError):
        raise EnvironmentProblem(
            "this build of meshredirect has no nftables backend", remedy="use --backend iptables"
        ) from None
    return NftablesSteps(target, layout, read_nft_json)


class NftablesSteps:
    """Our nftables tables in one namespace (see the module docstring)."""

    def __init__(self, target: Target, layout: _Layout, reader: Any) -> None:
        self.target = target
        self.layout = layout
        self.reader = reader

    # -- talking to the kernel -------------------------------------------------------

    def _run(self, document: Json) -> tuple[int, str, str]:
        import nftables  # type: ignore[import-not-found,import-untyped,unused-ignore]

        with self.target.entered():
            nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, output, error = nft.json_cmd(document)
        return int(rc), output if isinstance(output, str) else json.dumps(output), str(error or "")

    def listing(self) -> list[Json]:
        """Every object ``nft -j list ruleset`` shows (metainfo left out)."""
        rc, output, error = self._run({"nftables": [{"list": {"ruleset": None}}]})
        if rc != 0:
            raise EnvironmentProblem(f"listing the nftables ruleset failed: {error.strip()}")
        items = json.loads(output or "{}").get("nftables", [])
        return [item for item in items if "metainfo" not in item]

    @staticmethod
    def ours(items: list[Json], name: str, families: Sequence[Family]) -> list[Json]:
        wanted = {_NFT_FAMILY[f] for f in families if f in _NFT_FAMILY}
        out = []
        for item in items:
            ((kind, body),) = item.items()
            table = body.get("name") if kind == "table" else body.get("table")
            if table == name and body.get("family") in wanted:
                out.append(item)
        return out

    def tables_of(self, items: list[Json]) -> list[Table]:
        ruleset = self.reader(json.dumps({"nftables": items}), path="nft list ruleset")
        return sorted(ruleset.tables, key=lambda t: (t.family.value, t.name))

    # -- planning -----------------------------------------------------------------------

    def plan(self, ruleset: Ruleset, families: Sequence[Family] = FAMILIES) -> list[Step]:
        name = self.layout.table_name(ruleset)
        part = Ruleset(
            tables=tuple(t for t in ruleset.tables if t.family in families), owner_prefix=ruleset.owner_prefix
        )
        before = self.ours(self.listing(), name, families)
        wanted = sorted(self.layout.layout(part).tables, key=lambda t: (t.family.value, t.name))
        if self.tables_of(before) == wanted:
            return [self._step(families, "", before)]
        replaced = self.layout.commands(part) if part.tables else {}
        present = {
            Family.IPV4 if body["family"] == "ip" else Family.IPV6
            for item in before
            for kind, body in item.items()
            if kind == "table"
        }
        commands: list[Json] = []
        for family in families:
            if family in replaced:
                commands += replaced[family]
            elif family in present:
                commands += self.layout.removal(family, name)
        return [self._step(families, json.dumps({"nftables": commands}), before)]

    def plan_cleanup(self, owner_prefix: str, families: Sequence[Family] = FAMILIES) -> list[Step]:
        name = self.layout.table_name(Ruleset(owner_prefix=owner_prefix))
        before = self.ours(self.listing(), name, families)
        commands = [
            {"delete": {"table": {"family": body["family"], "name": name}}}
            for item in before
            for kind, body in item.items()
            if kind == "table"
        ]
        return [self._step(families, json.dumps({"nftables": commands}) if commands else "", before)]

    @staticmethod
    def _step(families: Sequence[Family], document: str, before: list[Json]) -> Step:
        return Step(
            family=families[0] if len(families) == 1 else Family.INET,
            argv=NFT_ARGV,
            document=document,
            before=json.dumps({"nftables": before}),
        )

    # -- doing ----------------------------------------------------------------------------

    def execute(self, steps: Sequence[Step], owner_prefix: str) -> list[AppliedChange]:
        """Load each step's document: one transaction, all or nothing."""
        del owner_prefix
        changes = []
        for step in steps:
            if step.document:
                rc, _, error = self._run(json.loads(step.document))
                if rc != 0:
                    raise ApplyFailed(f"nft refused the rules: {error.strip()}", undone=True)
            changes.append(planned(step))
        return changes

    def revert(self, steps: Sequence[Step], owner_prefix: str) -> bool:
        """Put our tables back as they were listed before each step, in one transaction per step."""
        del owner_prefix
        ok = True
        for step in reversed(steps):
            if not step.document:
                continue
            before: list[Json] = json.loads(step.before)["nftables"]
            commands: list[Json] = []
            for item in json.loads(step.document)["nftables"]:
                for verb, body in item.items():
                    if verb in ("add", "delete") and "table" in body:
                        spec = {"family": body["table"]["family"], "name": body["table"]["name"]}
                        commands += [{"add": {"table": dict(spec)}}, {"delete": {"table": dict(spec)}}]
            for item in before:
                ((kind, body),) = item.items()
                if kind in _OBJECTS:
                    commands.append({"add": {kind: {k: v for k, v in body.items() if k != "handle"}}})
            try:
                rc, _, _ = self._run({"nftables": commands})
            except EnvironmentProblem:
                rc = 1
            ok = ok and rc == 0
        return ok
