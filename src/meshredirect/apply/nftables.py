"""Apply and remove our nftables tables through libnftables' Python bindings, one transaction each time.

The bindings are Debian's ``python3-nftables`` (module ``nftables``; not on
PyPI): pure Python over ``libnftables.so.1``, installed for Debian's python3
under ``/usr/lib/python3/dist-packages``. ``./dev setup`` exposes only that
package to the project's virtual environment through a ``.pth`` file.

**Namespaces.** A ``nftables.Nftables()`` context talks netlink in the network
namespace its process is in when it is created. So for a target namespace
this module starts a small agent, ``python -m
meshredirect.apply._nftables_agent``, under ``nsenter --net=PATH`` (PATH is ``/var/run/netns/NAME`` for
a name given by ``ip netns add``, or any ``/proc/PID/ns/net``): the agent
creates the context there, runs the requests it reads as JSON on standard
input, and writes the results as JSON. Without a namespace the context is
created in this process (the current namespace).

**Atomicity.** :meth:`NftablesApplier.apply` sends one JSON document: for
each family of the ruleset ``add table; delete table; add table, chains,
rules`` of our table, and for each other family ``add table; delete table``
(which removes a table left from an earlier policy). libnftables sends it as
one netlink batch, which the kernel commits whole or not at all: a failed
load leaves the previous table exactly as it was. :meth:`NftablesApplier.cleanup` deletes
only our tables.

>>> applier = NftablesApplier("mr-example", table="mesh")
>>> str(applier.netns_path)
'/var/run/netns/mr-example'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from meshredirect.apply import _nftables_agent
from meshredirect.backend import create_backend
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family, Ruleset
from meshredirect.readers.nftables import FAMILY_NAMES, read_nft_json

__all__ = ["NETNS_DIR", "NftablesApplier", "NftablesChange", "NftablesRequestFailed", "run_requests"]

NETNS_DIR: Final = Path("/var/run/netns")
BINDINGS_REMEDY: Final = (
    "install the Debian package python3-nftables; a virtual environment reaches it through a .pth file "
    "naming a folder that holds it (./dev setup does this)"
)
_AGENT_TIMEOUT: Final = 120

Json = Any


class NftablesRequestFailed(EnvironmentProblem):
    """libnftables refused a request (the kernel or nft's evaluation rejected it); nothing was changed."""

    def __init__(self, message: str, *, error: str) -> None:
        self.error = error
        super().__init__(message)


def run_requests(requests: Sequence[Json]) -> list[dict[str, Json]]:
    """Run requests in this process's namespace: ``{"json": DOCUMENT}`` or ``{"cmd": TEXT}`` (JSON output).

    Stops after the first failure; each result holds ``rc``, ``output`` and ``error``.
    """
    try:
        import nftables  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        raise EnvironmentProblem("the nftables Python bindings are not importable", remedy=BINDINGS_REMEDY) from None
    return _nftables_agent.run_requests(list(requests))


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
        self.netns_path: Path | None
        if netns is None:
            self.netns_path = None
        elif isinstance(netns, str) and "/" not in netns:
            self.netns_path = NETNS_DIR / netns
        else:
            self.netns_path = Path(netns)
        self.table = table
        self.counters = counters

    # -- running requests ---------------------------------------------------

    def run(self, requests: Sequence[Json]) -> list[dict[str, Json]]:
        """Run requests in the target namespace (see :func:`run_requests`)."""
        if self.netns_path is None:
            return run_requests(requests)
        if not self.netns_path.exists():
            raise EnvironmentProblem(
                f"network namespace {self.netns_path} does not exist", remedy="create it first (ip netns add NAME)"
            )
        argv = ["nsenter", f"--net={self.netns_path}", "--", sys.executable, "-m", _nftables_agent.__name__]
        try:
            result = subprocess.run(
                argv,
                check=False,
                input=json.dumps(list(requests)),
                capture_output=True,
                text=True,
                timeout=_AGENT_TIMEOUT,
            )
        except FileNotFoundError:
            raise EnvironmentProblem(
                "nsenter is not installed", remedy="install the Debian package util-linux"
            ) from None
        if result.returncode == _nftables_agent.NO_BINDINGS:
            raise EnvironmentProblem(result.stderr.strip(), remedy=BINDINGS_REMEDY)
        if result.returncode != 0:
            raise EnvironmentProblem(
                f"cannot enter network namespace {self.netns_path}: {result.stderr.strip()}",
                remedy="run as root (CAP_SYS_ADMIN and CAP_NET_ADMIN)",
            )
        results: list[dict[str, Json]] = json.loads(result.stdout)
        return results

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
        return read_nft_json(self.listing(), path=f"nft list ruleset ({self.netns_path or 'this namespace'})")

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
