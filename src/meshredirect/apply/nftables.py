"""Apply and remove our nftables tables through libnftables' Python bindings, one transaction each time.

The bindings are Debian's ``python3-nftables`` (module ``nftables``; not on
PyPI): pure Python over ``libnftables.so.1``, installed for Debian's python3
under ``/usr/lib/python3/dist-packages``. ``./dev setup`` exposes only that
package to the project's virtual environment through a ``.pth`` file.

**Namespaces.** A ``nftables.Nftables()`` context talks netlink in the
network namespace of the thread that creates it. So the context is created
inside :meth:`Target.entered() <meshredirect.apply.netns.Target.entered>`,
which moves only the calling thread into the target namespace (``setns(2)``
on ``/var/run/netns/NAME`` or ``/proc/PID/ns/net``) and back: no helper
process, and nothing else in the process moves.

**Atomicity.** :meth:`NftablesApplier.apply` sends one JSON document: for
each family of the ruleset ``add table; delete table; add table, chains,
rules`` of our table, and for each other family where our table exists ``add
table; delete table``. libnftables sends it as one netlink batch, which the
kernel commits whole or not at all: a failed load leaves the previous table
exactly as it was. :meth:`NftablesApplier.cleanup` deletes only our tables.

This is the library interface to our nftables tables; the ``meshredirect
apply`` command and :mod:`meshredirect.apply.actions` reach the same backend
and reader through :mod:`meshredirect.apply.nftables_steps`.

>>> applier = NftablesApplier("mr-example", table="mesh")
>>> str(applier.target.path)
'/var/run/netns/mr-example'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from meshredirect.apply.netns import Target, require_nftables_bindings
from meshredirect.backend import create_backend
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset
from meshredirect.readers.nftables import FAMILY_NAMES, read_nft_json

__all__ = ["NftablesApplier", "NftablesChange", "NftablesRequestFailed", "run_requests"]


Json = Any


class NftablesRequestFailed(EnvironmentProblem):
    """libnftables refused a request (the kernel or nft's evaluation rejected it); nothing was changed."""

    def __init__(self, message: str, *, error: str) -> None:
        self.error = error
        super().__init__(message)


def run_requests(requests: Sequence[Json], target: Target | None = None) -> list[dict[str, Json]]:
    """Run requests in a namespace (default: this thread's): ``{"json": DOCUMENT}`` or ``{"cmd": TEXT}``,
    with ``"dry_run": True`` to have the kernel check a transaction without committing it.

    JSON output; stops after the first failure; each result holds ``rc``, ``output`` and ``error``.
    """
    require_nftables_bindings()
    import nftables  # type: ignore[import-not-found,import-untyped,unused-ignore]

    with (target or Target.of(None)).entered():
        nft = nftables.Nftables()
    nft.set_json_output(True)
    results: list[dict[str, Json]] = []
    for request in requests:
        nft.set_dry_run(bool(request.get("dry_run", False)))
        if "json" in request:
            rc, output, error = nft.json_cmd(request["json"])
            output = output if isinstance(output, str) else json.dumps(output)
        else:
            rc, output, error = nft.cmd(request["cmd"])
        results.append({"rc": rc, "output": output, "error": error})
        if rc != 0:
            break
    return results


@attrs.frozen(kw_only=True)
class NftablesChange:
    """What :meth:`NftablesApplier.apply` or :meth:`~NftablesApplier.cleanup` did."""

    #: The JSON document sent (empty when nothing had to change).
    document: str
    changed: bool
    #: Our tables (family, name) before and after, as nft listed them (JSON of the table's objects).
    families: tuple[Family, ...] = ()


class NftablesApplier:
    """Applies rulesets as our nftables tables in one network namespace (by name, by path, or the current one).

    ``table`` names our table (default: the ruleset's owner prefix, lower case);
    ``counters`` adds counters to every rule.
    """

    def __init__(
        self, netns: str | os.PathLike[str] | None = None, *, table: str | None = None, counters: bool = False
    ) -> None:
        self.target = Target.of(netns)
        self.table = table
        self.counters = counters

    # -- running requests ---------------------------------------------------

    def run(self, requests: Sequence[Json]) -> list[dict[str, Json]]:
        """Run requests in the target namespace (see :func:`run_requests`)."""
        return run_requests(requests, self.target)

    def _checked(self, requests: Sequence[Json], what: str) -> list[dict[str, Json]]:
        results = self.run(requests)
        failed = [r for r in results if r["rc"] != 0]
        if failed:
            error = str(failed[0]["error"]).strip()
            raise NftablesRequestFailed(f"{what} failed, nothing was changed: {error}", error=error)
        return results

    # -- reading ------------------------------------------------------------

    def listing(self) -> str:
        """``nft -j list ruleset`` of the namespace."""
        return str(self._checked([{"cmd": "list ruleset"}], "listing the ruleset")[0]["output"])

    def read(self) -> Ruleset:
        """Every table of the namespace as IR."""
        return read_nft_json(self.listing(), path=f"nft list ruleset ({self.target.describe()})")

    def our_tables(self, name: str) -> Ruleset:
        """Our tables only (every family)."""
        ruleset = self.read()
        return Ruleset(tables=tuple(t for t in ruleset.tables if t.name == name))

    # -- changing -----------------------------------------------------------

    def backend(self) -> Any:
        return create_backend("nftables-json", {"table": self.table, "counters": self.counters})

    def apply(self, ruleset: Ruleset, *, dry_run: bool = False) -> NftablesChange:
        """Replace our tables by ``ruleset`` in one transaction; nothing is sent when they already hold it.

        With ``dry_run`` the kernel checks the transaction (nft's ``--check``: the batch is
        validated, then aborted) and nothing changes; a rejection raises as a real load would.
        """
        backend = self.backend()
        name = backend.table_name(ruleset)
        wanted = backend.layout(ruleset)
        current = self.our_tables(name)
        if _same_tables(current, wanted):
            return NftablesChange(document="", changed=False, families=wanted.families)
        commands: list[Json] = []
        replaced = backend.commands(ruleset)
        for family in (Family.IPV4, Family.IPV6, Family.INET):
            if family in replaced:
                commands += replaced[family]
            elif current.table(family, name) is not None:
                commands += backend.removal(family, name)
        document = {"nftables": commands}
        what = f"{'checking' if dry_run else 'loading'} table {name}"
        self._checked([{"json": document, "dry_run": dry_run}], what)
        return NftablesChange(document=json.dumps(document), changed=not dry_run, families=wanted.families)

    def cleanup(
        self, name: str, families: Iterable[Family] = (Family.IPV4, Family.IPV6, Family.INET)
    ) -> NftablesChange:
        """Delete our table ``name`` of each family where it exists; other tables stay as they are."""
        current = self.our_tables(name)
        commands: list[Json] = []
        present = []
        for family in families:
            if current.table(family, name) is not None:
                spec = {"family": FAMILY_NAMES[family], "name": name}
                commands.append({"delete": {"table": spec}})
                present.append(family)
        if not commands:
            return NftablesChange(document="", changed=False)
        document = {"nftables": commands}
        self._checked([{"json": document}], f"deleting table {name}")
        return NftablesChange(document=json.dumps(document), changed=True, families=tuple(present))


def _same_tables(current: Ruleset, wanted: Ruleset) -> bool:
    key = lambda table: (table.family.value, table.name)  # noqa: E731
    return sorted(current.tables, key=key) == sorted(wanted.tables, key=key)
