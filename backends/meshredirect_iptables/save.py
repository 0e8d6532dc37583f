"""The ``iptables-save`` backend: the text the kernel's tools print for the ruleset.

Loading the :mod:`restore <meshredirect_iptables.restore>` output into an
empty namespace and running ``iptables-save`` gives these lines exactly,
minus the timestamp comments and with zero counters. Tables come in the
order raw, mangle, nat, filter, security (the kernel tools' own table order
varies with the variant and with load order; compare tables, not files).
"""

from __future__ import annotations

from typing import ClassVar, Final

from meshredirect.backend import Artifact, Rendering
from meshredirect.errors import UnsupportedError
from meshredirect.ir import IPTABLES_BUILTIN_HOOKS, Chain, ChainPolicy, Family, Ruleset, Table, iptables_base_chain
from meshredirect_iptables.lowering import IptablesLowering

__all__ = ["TABLE_ORDER", "IptablesSaveBackend"]

TABLE_ORDER: Final = ("raw", "mangle", "nat", "filter", "security")
FAMILY_SUFFIX: Final = {Family.IPV4: "v4", Family.IPV6: "v6"}


class IptablesSaveBackend(IptablesLowering):
    """IR to ``iptables-save`` / ``ip6tables-save`` text, one artifact per family."""

    name: ClassVar[str] = "iptables-save"
    kind: ClassVar[str] = "iptables-save"

    def render(self, ruleset: Ruleset) -> Rendering:
        artifacts = []
        for family in self.families(ruleset):
            content = self.document(family, self.tables(ruleset, family))
            artifacts.append(
                Artifact(name=f"rules.{FAMILY_SUFFIX[family]}", content=content, family=family, kind=self.kind)
            )
        return Rendering(backend=self.name, artifacts=tuple(artifacts))

    def families(self, ruleset: Ruleset) -> list[Family]:
        for table in ruleset.tables:
            if table.family is Family.INET:
                raise UnsupportedError(self.name, table, "iptables has no inet family; use one table per IP version")
        return [f for f in (Family.IPV4, Family.IPV6) if f in ruleset.families]

    def tables(self, ruleset: Ruleset, family: Family) -> dict[str, Table]:
        tables: dict[str, Table] = {}
        for table in ruleset.tables:
            if table.family is not family:
                continue
            if table.name not in IPTABLES_BUILTIN_HOOKS:
                raise UnsupportedError(self.name, table, f"iptables has no table {table.name!r}")
            if table.name in tables:
                raise UnsupportedError(self.name, table, f"two {table.name} tables for one family")
            for chain in table.chains:
                self.check_chain(table, chain)
            tables[table.name] = table
        return {name: tables[name] for name in TABLE_ORDER if name in tables}

    def check_chain(self, table: Table, chain: Chain) -> None:
        if chain.base is None:
            if chain.name in {h.value for h in IPTABLES_BUILTIN_HOOKS[table.name]}:
                raise UnsupportedError(self.name, chain, f"a user chain cannot be called {chain.name}")
            return
        hooks = IPTABLES_BUILTIN_HOOKS[table.name]
        if chain.base.hook not in hooks or chain.name != chain.base.hook.value:
            raise UnsupportedError(self.name, chain, f"iptables table {table.name} has no such built-in chain")
        expected = iptables_base_chain(table.name, chain.base.hook, chain.base.policy)
        if chain.base != expected:
            raise UnsupportedError(
                self.name, chain, f"iptables fixes the type and priority of {table.name} {chain.name}"
            )

    def document(self, family: Family, tables: dict[str, Table]) -> str:
        lines: list[str] = []
        for table in tables.values():
            lines += self.table_lines(table)
        return "".join(line + "\n" for line in lines)

    def table_lines(self, table: Table) -> list[str]:
        builtin = {c.base.hook: c for c in table.chains if c.base is not None}
        user = sorted((c for c in table.chains if c.base is None), key=lambda c: c.name)
        lines = [f"*{table.name}"]
        for hook in IPTABLES_BUILTIN_HOOKS[table.name]:
            policy = builtin[hook].base.policy if hook in builtin else ChainPolicy.ACCEPT  # type: ignore[union-attr]
            lines.append(f":{hook.value} {policy.value} [0:0]")
        lines += [f":{c.name} - [0:0]" for c in user]
        for hook in IPTABLES_BUILTIN_HOOKS[table.name]:
            if hook in builtin:
                lines += self.chain_lines(table, builtin[hook])
        for chain in user:
            lines += self.chain_lines(table, chain)
        lines.append("COMMIT")
        return lines

    def chain_lines(self, table: Table, chain: Chain) -> list[str]:
        lines: list[str] = []
        for rule in chain.rules:
            lines += self.rule_lines(table, chain, rule)
        return lines
