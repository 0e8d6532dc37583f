"""What an ``iptables-save`` dump says about chains and jumps: just enough to replace our own rules.

This is not the full reader (that lives in the core and builds IR); it only
needs the table sections, the chain declarations and, for each ``-A`` line,
its chain, its rule text and its jump target, so that restore documents can
delete exactly the lines that are there.
"""

from __future__ import annotations

import itertools
import shlex

import attrs

__all__ = ["SaveRule", "SaveState", "SaveTable", "parse_save"]

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@attrs.frozen(kw_only=True)
class SaveRule:
    chain: str
    #: The rule as printed after ``-A CHAIN``: fed back verbatim after ``-D CHAIN``.
    spec: str
    #: The ``-j``/``-g`` target, or None.
    target: str | None


@attrs.frozen(kw_only=True)
class SaveTable:
    name: str
    chains: tuple[str, ...]
    rules: tuple[SaveRule, ...]

    def rules_in(self, chain: str) -> list[SaveRule]:
        return [rule for rule in self.rules if rule.chain == chain]


@attrs.frozen(kw_only=True)
class SaveState:
    tables: tuple[SaveTable, ...] = ()

    def table(self, name: str) -> SaveTable | None:
        for table in self.tables:
            if table.name == name:
                return table
        return None


def _target(spec: str) -> str | None:
    try:
        tokens = shlex.split(spec)
    except ValueError:
        tokens = spec.split()
    for flag, value in itertools.pairwise(tokens):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return value
    return None


def parse_save(text: str) -> SaveState:
    """Read the sections, chains and rules of ``iptables-save`` output (unknown lines are ignored)."""
    tables: list[SaveTable] = []
    name: str | None = None
    chains: list[str] = []
    rules: list[SaveRule] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, rules = line[1:].strip(), [], []
        elif line == "COMMIT":
            if name is not None:
                tables.append(SaveTable(name=name, chains=tuple(chains), rules=tuple(rules)))
            name = None
        elif line.startswith(":") and name is not None:
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and name is not None:
            _, chain, *rest = line.split(" ", 2)
            spec = rest[0] if rest else ""
            rules.append(SaveRule(chain=chain, spec=spec, target=_target(spec)))
    return SaveState(tables=tuple(tables))
