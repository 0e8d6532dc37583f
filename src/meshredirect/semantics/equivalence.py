"""Equivalence of two rulesets: the same verdict for every connection, or concrete differences.

:func:`equivalent` explores the classes of the union of both rulesets'
constants (see :mod:`meshredirect.semantics.classes`) path by path
(:mod:`meshredirect.semantics.explore`) and compares, for every class
combination, what each ruleset does: the verdict, and the two pieces of
connection state that outlive the first packet (the conntrack mark and the
conntrack zone). An empty result is a proof that the two rulesets treat every
new connection alike in the environment; each :class:`Difference` carries an
example connection, both evaluations (with their traces) and a short
description of the class of connections it stands for.

A verdict the interpreter cannot decide (:class:`~meshredirect.semantics.interpreter.Unknown`)
is a difference too: equivalence that cannot be proven is not claimed. A ruleset
with choice points (a random ``statistic`` match) may give one connection
several evaluations, one per combination of outcomes
(:meth:`~meshredirect.semantics.interpreter.Interpreter.evaluate_all`); two
rulesets agree on a connection when each may do whatever the other may do.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> equivalent(compile_policy(Policy()), compile_policy(Policy(one_rule_per_port=True)))
()
>>> differences = equivalent(compile_policy(Policy()), compile_policy(Policy(inbound_ports_exclude="22")))
>>> to_pod = [d for d in differences if str(d.example.dst) == "10.0.0.5" and d.example.dport == 22]
>>> print(to_pod[0].example)
tcp 203.0.113.10:43210 -> 10.0.0.5:22 remote in eth0
>>> print(to_pod[0].first.verdict, "|", to_pod[0].second.verdict)
redirected to 10.0.0.5:15006 | passed to 10.0.0.5:22 (delivered locally)
>>> print(to_pod[0].description)
ipv4 tcp remote; dst 10.0.0.5; dport 22
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from meshredirect.ir import Family, Ruleset
from meshredirect.semantics.classes import ClassSpace, Root
from meshredirect.semantics.explore import Eq, MarkSym, Run, Sym
from meshredirect.semantics.interpreter import (
    Dropped,
    Evaluation,
    Interpreter,
    Passed,
    Redirected,
    TProxied,
    Unknown,
)
from meshredirect.semantics.model import Connection, Environment

__all__ = [
    "Difference",
    "EquivalenceReport",
    "compare_evaluations",
    "compare_outcomes",
    "equivalence_report",
    "equivalent",
]


@attrs.frozen(kw_only=True)
class Difference:
    """A class of connections the two rulesets treat differently, with an example."""

    example: Connection
    first: Evaluation
    second: Evaluation
    #: The class of connections this example stands for, in words.
    description: str
    #: What differs: "verdict", "ctmark", "zone", or "unknown" (a verdict could not be decided).
    aspect: str

    def __str__(self) -> str:
        return (
            f"{self.example}\n  first:  {self.first.verdict}\n  second: {self.second.verdict}\n"
            f"  differs in: {self.aspect}\n  class: {self.description}"
        )


@attrs.frozen(kw_only=True)
class EquivalenceReport:
    """The differences, and how much the proof covered."""

    differences: tuple[Difference, ...]
    #: Class combinations covered (the product of every dimension's classes, after pruning).
    classes: int
    #: Paths explored (each covers a region of class combinations).
    paths: int

    @property
    def equivalent(self) -> bool:
        return not self.differences


def equivalent(a: Ruleset, b: Ruleset, env: Environment | None = None) -> tuple[Difference, ...]:
    """Where ``a`` and ``b`` treat connections differently (empty: nowhere). See the module docstring."""
    return equivalence_report(a, b, env).differences


def equivalence_report(
    a: Ruleset, b: Ruleset, env: Environment | None = None, *, families: Sequence[Family] | None = None
) -> EquivalenceReport:
    """:func:`equivalent` with the size of the proof."""
    environment = (env if env is not None else Environment.default()).covering(a, b)
    space = ClassSpace([a, b], environment, families=families)
    first, second = Interpreter(a, environment), Interpreter(b, environment)
    differences: list[Difference] = []
    paths = 0
    for root in space.roots:
        explorer = root.explorer()
        symbols = space.symbols(root)

        def program(run: Run, root: Root = root, symbols: Mapping[str, str] = symbols) -> _Found | None:
            connection = space.connection(root, {d: run.value(d) for d in root.dims})
            outcomes_a = first.evaluate_all(connection, trace=False, symbols=symbols, tracer=run)
            outcomes_b = second.evaluate_all(connection, trace=False, symbols=symbols, tracer=run)
            found = compare_outcomes(outcomes_a, outcomes_b, run)
            return None if found is None else (connection, *found)

        for leaf in explorer.explore(program):
            if leaf.result is None:
                continue
            connection, aspect, choices_a, choices_b = leaf.result
            differences.append(
                Difference(
                    example=connection,
                    first=first.evaluate(connection, choices=choices_a),
                    second=second.evaluate(connection, choices=choices_b),
                    description=space.describe(root, leaf.region),
                    aspect=aspect,
                )
            )
        paths += explorer.runs
    return EquivalenceReport(differences=tuple(differences), classes=space.count(), paths=paths)


#: A difference found on a path: the connection, what differs, and the choices of each side's evaluation shown.
_Found = tuple[Connection, str, tuple[bool, ...], tuple[bool, ...]]


def compare_outcomes(
    first: Sequence[Evaluation], second: Sequence[Evaluation], run: Run | None = None
) -> tuple[str, tuple[bool, ...], tuple[bool, ...]] | None:
    """Whether two rulesets may do the same things to a connection: every evaluation one may give (one per
    combination of outcomes of its choice points, e.g. random matches) the other may give too.

    Returns what differs and the choices of an evaluation of each side that shows it, or None.
    """
    if len(first) == 1 and len(second) == 1:
        aspect = compare_evaluations(first[0], second[0], run)
        return None if aspect is None else (aspect, first[0].choices, second[0].choices)
    for ours, theirs, swap in ((first, second, False), (second, first, True)):
        for one in ours:
            if any(compare_evaluations(one, other, run) is None for other in theirs):
                continue
            aspect = compare_evaluations(one, theirs[0], run) or "verdict"
            pair = (theirs[0].choices, one.choices) if swap else (one.choices, theirs[0].choices)
            return aspect, *pair
    return None


def compare_evaluations(ea: Evaluation, eb: Evaluation, run: Run | None = None) -> str | None:
    """What differs between two evaluations of one connection ("verdict", "ctmark", "zone", "unknown"), or None.

    With ``run``, fields that stand for a dimension are compared through it (sound during exploration).
    """
    va, vb = ea.verdict, eb.verdict
    if isinstance(va, Unknown) or isinstance(vb, Unknown):
        return "unknown"
    if type(va) is not type(vb):
        return "verdict"
    same: bool
    if isinstance(va, (Passed, Redirected)):
        assert isinstance(vb, (Passed, Redirected))
        same = _same(va.address, vb.address, ea=ea, eb=eb, field="verdict.address", run=run)
        same = same and _same(va.port, vb.port, ea=ea, eb=eb, field="verdict.port", run=run)
        if same and isinstance(va, Passed):
            assert isinstance(vb, Passed)
            same = va.local == vb.local
    elif isinstance(va, TProxied):
        assert isinstance(vb, TProxied)
        same = (
            va.port == vb.port
            and _same(va.address, vb.address, ea=ea, eb=eb, field="verdict.address", run=run)
            and _same(va.mark, vb.mark, ea=ea, eb=eb, field="verdict.mark", run=run)
        )
    else:
        assert isinstance(va, Dropped) and isinstance(vb, Dropped)
        same = va.reject == vb.reject
    if not same:
        return "verdict"
    if not _same(ea.connection.ctmark, eb.connection.ctmark, ea=ea, eb=eb, field="ctmark", run=run):
        return "ctmark"
    if ea.zone != eb.zone:
        return "zone"
    return None


def _same(x: Any, y: Any, *, ea: Evaluation, eb: Evaluation, field: str, run: Run | None) -> bool:
    sx: Sym | None = ea.symbols.get(field)
    sy: Sym | None = eb.symbols.get(field)
    if run is None or (sx is None and sy is None):
        return bool(x == y)
    if sx is not None and sy is not None:
        if sx == sy:
            return True
        if isinstance(sx, MarkSym) or isinstance(sy, MarkSym):
            dim_x = sx.dim if isinstance(sx, MarkSym) else sx
            dim_y = sy.dim if isinstance(sy, MarkSym) else sy
            if dim_x == dim_y:
                # Two transforms of one mark: equal where the test says so.
                return bool(run.decide(dim_x, _TransformsEqual.of(sx, sy)))
        raise ValueError(f"cannot compare {field} standing for two different dimensions ({sx}, {sy})")
    sym, constant = (sx, y) if sx is not None else (sy, x)
    assert sym is not None
    return bool(run.decide(sym, Eq(constant)))


@attrs.frozen
class _TransformsEqual:
    """``t1(v) == t2(v)`` for two mark transforms of one dimension (hashable, so cached by value)."""

    first: tuple[int, int]
    second: tuple[int, int]

    @classmethod
    def of(cls, x: Sym, y: Sym) -> _TransformsEqual:
        def parts(s: Sym) -> tuple[int, int]:
            return (s.and_mask, s.xor) if isinstance(s, MarkSym) else (0xFFFFFFFF, 0)

        return cls(parts(x), parts(y))

    def __call__(self, value: int) -> bool:
        return ((value & self.first[0]) ^ self.first[1]) == ((value & self.second[0]) ^ self.second[1])
