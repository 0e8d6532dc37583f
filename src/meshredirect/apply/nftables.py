"""Our nftables tables in one network namespace, through libnftables' Python bindings: plan, load, undo, remove.

This is the one nftables applier: the apply layer (:func:`meshredirect.apply.apply`
/ :func:`~meshredirect.apply.cleanup`, the ``meshredirect apply`` command, the
CNI plugin), the validation's diagnosis, the tests and the benchmarks all go
through :class:`NftablesApplier`.

**Layout.** Our rules live in tables of our own, one per family (named after
the chain prefix in lower case, ``istio``, unless ``table`` says otherwise),
laid out by the ``nftables-json`` backend (found through the registry). What is
loaded is compared, read back by the nftables reader
(:func:`meshredirect.readers.nftables.read_nft_json`), with that layout.

**The bindings.** Debian's ``python3-nftables`` (module ``nftables``; not on
PyPI): pure Python over ``libnftables.so.1``, installed for Debian's python3
under ``/usr/lib/python3/dist-packages``. ``./dev setup`` exposes only that
package to the project's virtual environment through a ``.pth`` file.

**Namespaces.** A ``nftables.Nftables()`` context talks netlink in the
network namespace of the thread that creates it. So the context is created,
and used, inside :meth:`Target.entered() <meshredirect.apply.netns.Target.entered>`,
which moves only the calling thread into the target namespace (``setns(2)``)
and back: no helper process, and nothing else in the process moves.

**Two phases** (the :class:`~meshredirect.apply.base.Applier` protocol), so the
apply layer can combine a change with TPROXY's policy routing and undo both:

1. :meth:`~NftablesApplier.plan` / :meth:`~NftablesApplier.plan_cleanup` read our
   tables and return one :class:`~meshredirect.apply.base.Step`: ONE JSON
   document for every family in scope (replace our table of each family the
   ruleset programs, delete it in the others), or an empty document when the
   kernel already holds exactly the layout ("already up to date").
2. :meth:`~NftablesApplier.execute` loads it: libnftables sends it as one
   netlink batch, which the kernel commits whole or not at all, so a refused
   rule leaves every table as it was. :meth:`~NftablesApplier.revert` (after a
   later failure, such as a routing command) loads our tables back as they
   were listed before, in one transaction.

:meth:`~NftablesApplier.apply` and :meth:`~NftablesApplier.cleanup` do both
phases; with ``dry_run`` the kernel still checks the transaction (nft's
``--check``: the batch is validated, then aborted) and nothing changes.

**Families in scope.** ``families`` names IPv4 and IPv6; our ``inet`` table (a
ruleset may program one) is in scope when both are (the default), or when
``Family.INET`` is named.

>>> applier = NftablesApplier("mr-example", table="mesh")
>>> str(applier.target.path)
'/var/run/netns/mr-example'
>>> sorted(scope([Family.IPV4, Family.IPV6])), sorted(scope([Family.IPV6]))
(['inet', 'ip', 'ip6'], ['ip6'])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol, cast

from meshredirect.apply.base import FAMILIES, AppliedChange, ApplyFailed, Step, planned
from meshredirect.apply.netns import Target, require_nftables_bindings
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset, Table

__all__ = ["NFT_ARGV", "NftablesApplier", "NftablesRequestFailed", "scope"]

#: How a step's document would be loaded by hand (the applier loads it in-process, the same way).
NFT_ARGV: Final = ("nft", "-j", "-f", "-")
_NFT_FAMILY: Final = {Family.IPV4: "ip", Family.IPV6: "ip6", Family.INET: "inet"}
_FAMILY_OF: Final = {name: family for family, name in _NFT_FAMILY.items()}
#: The objects of a table ``nft -j list ruleset`` prints, in an order that loads (sets before the rules using them).
_OBJECTS: Final = (
    "table",
    "chain",
    "set",
    "map",
    "flowtable",
    "counter",
    "quota",
    "ct helper",
    "ct timeout",
    "ct expectation",
    "limit",
    "secmark",
    "synproxy",
    "rule",
)

Json = Any


class NftablesRequestFailed(ApplyFailed):
    """libnftables refused a transaction (nft's evaluation or the kernel); the kernel committed none of it.

    ``error`` holds what libnftables said.
    """

    def __init__(self, message: str, *, error: str, undone: bool = True) -> None:
        self.error = error
        super().__init__(message, undone=undone)


class _Layout(Protocol):
    """The pure pieces of the ``nftables-json`` backend the applier uses."""

    def table_name(self, ruleset: Ruleset) -> str: ...

    def layout(self, ruleset: Ruleset) -> Ruleset: ...

    def commands(self, ruleset: Ruleset) -> dict[Family, list[Json]]: ...

    def removal(self, family: Family, name: str) -> list[Json]: ...


def scope(families: Iterable[Family]) -> frozenset[str]:
    """The nft families of our tables that ``families`` covers (see the module docstring)."""
    chosen = set(families)
    names = {_NFT_FAMILY[f] for f in chosen}
    if {Family.IPV4, Family.IPV6} <= chosen:
        names.add("inet")
    return frozenset(names)


def _sorted(tables: Iterable[Table]) -> tuple[Table, ...]:
    return tuple(sorted(tables, key=lambda t: (t.family.value, t.name)))


class NftablesApplier:
    """Our nftables tables in one network namespace: a name (under /var/run/netns), a path, a
    :class:`~meshredirect.apply.netns.Target`, or None for the current one. See the module docstring.

    ``table`` names our table (default: the ruleset's owner prefix in lower case);
    ``counters`` adds a counter to every rule.
    """

    def __init__(
        self,
        netns: str | os.PathLike[str] | Target | None = None,
        *,
        table: str | None = None,
        counters: bool = False,
    ) -> None:
        self.target = Target.of(netns)
        self.table = table
        self.counters = counters
        self._layout: _Layout | None = None

    @property
    def layout(self) -> _Layout:
        """The ``nftables-json`` backend (with this applier's table and counters), or what this build lacks."""
        if self._layout is None:
            from meshredirect.backend import create_backend

            try:
                backend = create_backend("nftables-json", {"table": self.table, "counters": self.counters})
            except (ImportError, LookupError):
                raise EnvironmentProblem(
                    "this build of meshredirect has no nftables backend", remedy="use --backend iptables"
                ) from None
            self._layout = cast(_Layout, backend)
        return self._layout

    def table_name(self, what: Ruleset | str) -> str:
        """The name of our table for a ruleset, or for an owner prefix (``ISTIO`` -> ``istio``)."""
        if isinstance(what, str):
            return self.table or what.lower()
        return self.layout.table_name(what)

    def laid_out(self, ruleset: Ruleset) -> Ruleset:
        """The tables the kernel holds once ``ruleset`` is loaded (sorted, as :meth:`ours` returns them)."""
        return Ruleset(tables=_sorted(self.layout.layout(ruleset).tables))

    # -- talking to the kernel -----------------------------------------------------------

    def run(self, document: Json, *, check_only: bool = False) -> tuple[int, str, str]:
        """Send one JSON document (``{"nftables": [...]}``) in the target namespace; ``(rc, output, error)``.

        With ``check_only`` the kernel validates the transaction and aborts it (nft's ``--check``).
        """
        require_nftables_bindings()
        import nftables  # type: ignore[import-not-found,import-untyped,unused-ignore]

        with self.target.entered():
            nft = nftables.Nftables()
            nft.set_json_output(True)
            nft.set_dry_run(check_only)
            rc, output, error = nft.json_cmd(document)
        return int(rc), output if isinstance(output, str) else json.dumps(output), str(error or "")

    def load(self, document: Json, *, check_only: bool = False) -> None:
        """Load one document as one transaction, or raise :class:`NftablesRequestFailed` (nothing committed)."""
        rc, _, error = self.run(document, check_only=check_only)
        if rc != 0:
            raise NftablesRequestFailed(f"nft refused the rules: {error.strip()}", error=error.strip())

    def listing(self) -> list[Json]:
        """Every object ``nft -j list ruleset`` shows in the namespace (metainfo left out)."""
        rc, output, error = self.run({"nftables": [{"list": {"ruleset": None}}]})
        if rc != 0:
            raise EnvironmentProblem(
                f"listing the nftables ruleset in {self.target.describe()} failed: {error.strip()}"
            )
        items: list[Json] = json.loads(output or "{}").get("nftables", [])
        return [item for item in items if "metainfo" not in item]

    def _read(self, items: list[Json]) -> Ruleset:
        from meshredirect.readers.nftables import read_nft_json

        ruleset = read_nft_json({"nftables": items}, path=f"nft list ruleset ({self.target.describe()})")
        return Ruleset(tables=_sorted(ruleset.tables))

    def read(self) -> Ruleset:
        """Every table of the namespace as IR."""
        return self._read(self.listing())

    @staticmethod
    def _ours(items: list[Json], name: str, families: Iterable[str]) -> list[Json]:
        wanted = set(families)
        out = []
        for item in items:
            ((kind, body),) = item.items()
            table = body.get("name") if kind == "table" else body.get("table")
            if table == name and body.get("family") in wanted:
                out.append(item)
        return out

    def ours(self, name: str, families: Iterable[Family] = FAMILIES) -> Ruleset:
        """Our tables named ``name`` in the families' scope, as IR (sorted by family)."""
        return self._read(self._ours(self.listing(), name, scope(families)))

    # -- planning (reads the kernel, changes nothing) --------------------------------------

    def plan(self, ruleset: Ruleset, families: Sequence[Family] = FAMILIES) -> list[Step]:
        """The transaction that makes our tables in ``families`` what ``ruleset`` says (empty when they are).

        A family in scope the ruleset has no table for gets our table there deleted.
        """
        names = scope(families)
        name = self.table_name(ruleset)
        part = Ruleset(
            tables=tuple(t for t in ruleset.tables if _NFT_FAMILY[t.family] in names), owner_prefix=ruleset.owner_prefix
        )
        before = self._ours(self.listing(), name, names)
        if self._read(before) == self.laid_out(part):
            return [self._step(families, "", before)]
        replaced = self.layout.commands(part) if part.tables else {}
        present = {body["family"] for item in before for kind, body in item.items() if kind == "table"}
        commands: list[Json] = []
        for family in (Family.IPV4, Family.IPV6, Family.INET):
            if family in replaced:
                commands += replaced[family]
            elif _NFT_FAMILY[family] in present:
                commands += self.layout.removal(family, name)
        return [self._step(families, json.dumps({"nftables": commands}), before)]

    def plan_cleanup(self, owner_prefix: str, families: Sequence[Family] = FAMILIES) -> list[Step]:
        """The transaction that deletes our table (named after ``owner_prefix``) in each family where it exists."""
        name = self.table_name(owner_prefix)
        before = self._ours(self.listing(), name, scope(families))
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

    def check(self, steps: Sequence[Step]) -> None:
        """Have the kernel check each step's transaction without committing it; raises as a load would."""
        for step in steps:
            if step.document:
                self.load(json.loads(step.document), check_only=True)

    def execute(self, steps: Sequence[Step], owner_prefix: str) -> list[AppliedChange]:
        """Load each step's document: one transaction each, all or nothing; a failure undoes earlier steps."""
        changes = []
        for index, step in enumerate(steps):
            if step.document:
                try:
                    self.load(json.loads(step.document))
                except NftablesRequestFailed as exc:
                    undone = self.revert(steps[:index], owner_prefix)
                    raise NftablesRequestFailed(exc.message, error=exc.error, undone=undone) from None
            changes.append(planned(step))
        return changes

    def revert(self, steps: Sequence[Step], owner_prefix: str) -> bool:
        """Put our tables back as they were listed before each step, one transaction per step; True when done."""
        del owner_prefix  # the steps name the tables they touched
        ok = True
        for step in reversed(steps):
            if not step.document:
                continue
            commands: list[Json] = []
            for item in json.loads(step.document)["nftables"]:
                for verb, body in item.items():
                    if verb in ("add", "delete") and "table" in body:
                        spec = {"family": body["table"]["family"], "name": body["table"]["name"]}
                        commands += [{"add": {"table": dict(spec)}}, {"delete": {"table": dict(spec)}}]
            before: list[Json] = json.loads(step.before)["nftables"]
            for kind in _OBJECTS:
                for item in before:
                    if kind in item:
                        commands.append({"add": {kind: {k: v for k, v in item[kind].items() if k != "handle"}}})
            try:
                rc, _, _ = self.run({"nftables": commands})
            except EnvironmentProblem:
                rc = 1
            ok = ok and rc == 0
        return ok

    # -- both phases ------------------------------------------------------------------------

    def apply(self, ruleset: Ruleset, families: Sequence[Family] = FAMILIES, *, dry_run: bool = False) -> AppliedChange:
        """Replace our tables in ``families`` (default: all) by ``ruleset``, in one transaction.

        Nothing is sent when the kernel already holds the layout (``changed`` False). With
        ``dry_run`` the kernel checks the transaction and nothing changes (``changed``: would change).
        """
        steps = self.plan(ruleset, families)
        if dry_run:
            self.check(steps)
            return planned(steps[0])
        return self.execute(steps, ruleset.owner_prefix or "")[0]

    def cleanup(
        self, owner_prefix: str, families: Sequence[Family] = FAMILIES, *, dry_run: bool = False
    ) -> AppliedChange:
        """Delete our table (named after ``owner_prefix``: ``ISTIO`` or ``istio``) where it exists; nothing else."""
        steps = self.plan_cleanup(owner_prefix, families)
        if dry_run:
            self.check(steps)
            return planned(steps[0])
        return self.execute(steps, owner_prefix)[0]
