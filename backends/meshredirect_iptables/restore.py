"""The ``iptables-restore`` backend: input for ``iptables-restore --noflush`` that replaces only our rules.

Each family gets one document, applied as one transaction per table. It
declares our chains (which creates them, or flushes them if they exist),
puts our jump rules into the built-in chains, fills our chains, and leaves
every other rule alone.

Jump rules in built-in chains cannot be made idempotent by a fixed text:
``-A`` adds a copy each time and ``-D`` fails when there is none. So the
backend takes what is installed now (the ``iptables-save`` output of the
target, per family) and writes a document that moves from that state to
ours: it keeps our jumps where they are when they are already right, deletes
them (and our stale chains) otherwise, and re-adds them. Without an
installed state it writes the document for a namespace that holds none of
our rules. :meth:`IptablesRestoreBackend.cleanup` writes the document that
removes exactly our chains and the jumps into them.

Two more pure helpers serve the apply layer: :meth:`~IptablesRestoreBackend.owned`
extracts our part of a dump (to tell "already up to date" without touching
the kernel), and :meth:`~IptablesRestoreBackend.transition` writes the
document that puts our part of one dump back to what it is in another (the
tools commit table by table, so a failed apply is undone with it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from meshredirect.backend import Artifact, Rendering
from meshredirect.ir import IPTABLES_BUILTIN_HOOKS, Family, Ruleset, Table
from meshredirect_iptables.save import FAMILY_SUFFIX, TABLE_ORDER, IptablesSaveBackend
from meshredirect_iptables.state import BUILTIN_CHAINS, SaveState, SaveTable, parse_save

__all__ = ["IptablesRestoreBackend"]


def _family(value: Family | str) -> Family:
    return value if isinstance(value, Family) else Family(str(value).lower())


class IptablesRestoreBackend(IptablesSaveBackend):
    """IR to ``iptables-restore --noflush`` input, one document per family.

    ``installed`` maps a family to the current ``iptables-save`` text of the
    target namespace (see the module docstring).
    """

    name: ClassVar[str] = "iptables-restore"
    kind: ClassVar[str] = "iptables-restore"

    def __init__(self, installed: Mapping[Family | str, str] | None = None) -> None:
        self.installed: dict[Family, SaveState] = {
            _family(family): parse_save(text) for family, text in (installed or {}).items()
        }

    def render(self, ruleset: Ruleset) -> Rendering:
        artifacts = []
        for family in self.families(ruleset):
            content = self.restore_document(family, self.tables(ruleset, family), ruleset)
            artifacts.append(
                Artifact(name=f"restore.{FAMILY_SUFFIX[family]}", content=content, family=family, kind=self.kind)
            )
        return Rendering(backend=self.name, artifacts=tuple(artifacts))

    def restore_document(self, family: Family, tables: dict[str, Table], ruleset: Ruleset) -> str:
        state = self.installed.get(family, SaveState())
        lines: list[str] = []
        for name in TABLE_ORDER:
            table = tables.get(name)
            current = state.table(name)
            ours = {c.name for c in table.chains if c.base is None} if table else set()

            def owned(chain: str, ours: set[str] = ours) -> bool:
                return chain in ours or (chain not in BUILTIN_CHAINS and ruleset.owns(chain))

            stale = [c for c in current.chains if owned(c) and c not in ours] if current else []
            if table is None and not stale:
                continue
            lines.append(f"*{name}")
            lines += [f":{chain} - [0:0]" for chain in sorted(ours)]
            if current is not None:
                lines += self._remove_foreign_references(current, owned, keep=ours)
            lines += self._hook_rules(name, table, current, owned)
            lines += [f"-F {chain}" for chain in stale]
            lines += [f"-X {chain}" for chain in stale]
            if table is not None:
                for chain in sorted((c for c in table.chains if c.base is None), key=lambda c: c.name):
                    lines += self.chain_lines(table, chain)
            lines.append("COMMIT")
        return "".join(line + "\n" for line in lines)

    def _hook_rules(self, name: str, table: Table | None, current: SaveTable | None, owned) -> list[str]:  # type: ignore[no-untyped-def]
        """Our jump rules in built-in chains: kept when already exactly right, else replaced."""
        lines: list[str] = []
        for hook in IPTABLES_BUILTIN_HOOKS[name]:
            desired: list[str] = []
            if table is not None:
                for chain in table.base_chains(hook):
                    for rule in chain.rules:
                        desired += [" ".join(tokens) for tokens in self.rule_tokens(table.family, rule)]
            present = [r.spec for r in current.rules_in(hook.value) if r.target and owned(r.target)] if current else []
            if present == desired:
                continue
            lines += [f"-D {hook.value} {spec}" for spec in present]
            lines += [f"-A {hook.value} {spec}" for spec in desired]
        return lines

    def _remove_foreign_references(self, current: SaveTable, owned, keep: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
        """Rules in other tools' user chains that jump to our stale chains would block their deletion."""
        lines = []
        for rule in current.rules:
            if rule.chain in BUILTIN_CHAINS or owned(rule.chain):
                continue
            if rule.target and owned(rule.target) and rule.target not in keep:
                lines.append(f"-D {rule.chain} {rule.spec}")
        return lines

    def cleanup(self, family: Family, installed: str, owner_prefix: str) -> str:
        """The document removing our chains (``owner_prefix + '_'``) and every jump into them; empty if none."""
        state = parse_save(installed)
        ruleset = Ruleset(owner_prefix=owner_prefix)
        lines: list[str] = []
        for current in state.tables:
            mine = [c for c in current.chains if c not in BUILTIN_CHAINS and ruleset.owns(c)]
            if not mine:
                continue
            lines.append(f"*{current.name}")
            for rule in current.rules:
                if not ruleset.owns(rule.chain) and rule.target in mine:
                    lines.append(f"-D {rule.chain} {rule.spec}")
            lines += [f"-F {chain}" for chain in mine]
            lines += [f"-X {chain}" for chain in mine]
            lines.append("COMMIT")
        return "".join(line + "\n" for line in lines)

    def owned(self, installed: str, owner_prefix: str) -> str:
        r"""Our part of an ``iptables-save`` dump, in a canonical text: two dumps hold the same rules of ours
        exactly when their parts are equal (counters, comments, table order and other tools' rules aside).

        Per table: our chains (sorted), then, in order, every rule in one of our chains or jumping into one.
        Where our jumps stand among other tools' rules does not count (another tool may insert rules
        before ours at any time; the jumps are still ours and still right).

        >>> dump = "*nat\n:OUTPUT ACCEPT [3:180]\n:MR_OUT - [0:0]\n-A OUTPUT -j KUBE\n-A OUTPUT -p tcp -j MR_OUT\n"
        >>> print(IptablesRestoreBackend().owned(dump + "-A MR_OUT -j RETURN\nCOMMIT\n", "MR"), end="")
        *nat
        :MR_OUT
        -A OUTPUT -p tcp -j MR_OUT
        -A MR_OUT -j RETURN
        """
        tables = {table.name: table for table in parse_save(installed).tables}
        lines: list[str] = []
        for name in _table_names(tables):
            part = _Part(tables[name], Ruleset(owner_prefix=owner_prefix))
            if not part.chains and not part.jumps:
                continue
            lines.append(f"*{name}")
            lines += [f":{chain}" for chain in sorted(part.chains)]
            for rule in tables[name].rules:
                if rule.chain in part.chains or id(rule) in part.jump_ids:
                    lines.append(f"-A {rule.chain} {rule.spec}".rstrip())
        return "".join(line + "\n" for line in lines)

    def transition(self, current: str, wanted: str, owner_prefix: str) -> str:
        r"""The document that makes our part of ``current`` what it is in ``wanted`` (two ``iptables-save``
        dumps of one family), leaving other tools' rules alone; empty when our parts are already equal.

        Our jumps go back among the other rules of their chain where they stand in ``wanted``.
        With an empty ``wanted`` this is :meth:`cleanup`.

        >>> before = "*nat\n:OUTPUT ACCEPT [0:0]\n:MR_OUT - [0:0]\n-A OUTPUT -j MR_OUT\n-A OUTPUT -j KUBE\n-A MR_OUT -j RETURN\nCOMMIT\n"
        >>> after = "*nat\n:OUTPUT ACCEPT [0:0]\n:MR_NEW - [0:0]\n-A OUTPUT -j KUBE\n-A OUTPUT -j MR_NEW\nCOMMIT\n"
        >>> print(IptablesRestoreBackend().transition(after, before, "MR"), end="")
        *nat
        :MR_OUT - [0:0]
        -D OUTPUT -j MR_NEW
        -F MR_NEW
        -X MR_NEW
        -I OUTPUT 1 -j MR_OUT
        -A MR_OUT -j RETURN
        COMMIT
        >>> IptablesRestoreBackend().transition(before, before, "MR")
        ''
        """
        ruleset = Ruleset(owner_prefix=owner_prefix)
        now = {table.name: table for table in parse_save(current).tables}
        then = {table.name: table for table in parse_save(wanted).tables}
        lines: list[str] = []
        for name in _table_names({**now, **then}):
            empty = SaveTable(name=name, chains=(), rules=())
            lines += _table_transition(now.get(name, empty), then.get(name, empty), ruleset)
        return "".join(line + "\n" for line in lines)


def _table_names(tables: Mapping[str, object]) -> list[str]:
    return [name for name in TABLE_ORDER if name in tables] + sorted(set(tables) - set(TABLE_ORDER))


class _Part:
    """Our chains in one table, and the rules of other chains that jump into them."""

    def __init__(self, table: SaveTable, ruleset: Ruleset) -> None:
        self.chains = {c for c in table.chains if c not in BUILTIN_CHAINS and ruleset.owns(c)}
        self.fills = [r for r in table.rules if r.chain in self.chains]
        self.jumps = [
            r for r in table.rules if r.chain not in self.chains and r.target is not None and r.target in self.chains
        ]
        self.jump_ids = {id(r) for r in self.jumps}
        #: For each jump: how many rules that are not our jumps come before it in its chain.
        self.before: dict[int, int] = {}
        others: dict[str, int] = {}
        for rule in table.rules:
            if id(rule) in self.jump_ids:
                self.before[id(rule)] = others.get(rule.chain, 0)
            else:
                others[rule.chain] = others.get(rule.chain, 0) + 1
        self.others = others

    def signature(self) -> tuple[object, ...]:
        return (
            sorted(self.chains),
            [(r.chain, r.spec) for r in self.fills],
            [(r.chain, r.spec, self.before[id(r)]) for r in self.jumps],
        )


def _table_transition(now: SaveTable, then: SaveTable, ruleset: Ruleset) -> list[str]:
    current, wanted = _Part(now, ruleset), _Part(then, ruleset)
    if current.signature() == wanted.signature():
        return []
    stale = sorted(current.chains - wanted.chains)
    lines = [f"*{now.name or then.name}"]
    lines += [f":{chain} - [0:0]" for chain in sorted(wanted.chains)]
    lines += [f"-D {rule.chain} {rule.spec}" for rule in current.jumps]
    lines += [f"-F {chain}" for chain in stale]
    lines += [f"-X {chain}" for chain in stale]
    inserted: dict[str, int] = {}
    for rule in wanted.jumps:
        if rule.chain not in BUILTIN_CHAINS and rule.chain not in now.chains:
            continue  # another tool's chain that is gone: there is nothing left to jump from
        count = current.others.get(rule.chain, 0) + inserted.get(rule.chain, 0)
        index = wanted.before[id(rule)] + inserted.get(rule.chain, 0) + 1
        lines.append(f"-I {rule.chain} {index} {rule.spec}" if index <= count else f"-A {rule.chain} {rule.spec}")
        inserted[rule.chain] = inserted.get(rule.chain, 0) + 1
    lines += [f"-A {rule.chain} {rule.spec}" for rule in wanted.fills]
    lines.append("COMMIT")
    return lines
