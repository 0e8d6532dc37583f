"""Exhaustive exploration of a program over equivalence classes, one run per distinct path.

The proof enumeration (:mod:`meshredirect.semantics.classes`) splits every
dimension of a connection (source, destination, ports, uid, gid, mark,
interface...) into classes such that every test the rules, the environment
and the checks make is constant on each class. The product of the classes is
large (often millions); most of it is never distinguished by any path through
the rules. :class:`Explorer` therefore runs a program (an evaluation and the
properties checked on it) once per *path*: every test the program makes on a
dimension goes through :meth:`Run.decide`, which records the outcome and the
set of classes giving the same outcome. After a run, every alternative
outcome of every recorded test that is still possible opens a new run (depth
first), restricted to the classes that lead there. Each run covers a
*region* (a product of class subsets, one per dimension) on which the program
behaves identically, and the regions partition the whole product: together
they are a proof over every class combination, with far fewer runs.

Soundness rests on one rule: the program branches on a dimension's value only
through :meth:`Run.decide`. ``tests/test_explore.py`` checks it by comparing
the explorer with brute-force enumeration of the full product.

>>> explorer = Explorer({"x": [0, 1, 2, 3], "y": ["a", "b"]})
>>> def program(run):
...     if run.decide("x", lambda v: v >= 2):
...         return "big"
...     return "small-" + run.decide("y", str.upper)
>>> sorted((leaf.result, leaf.size) for leaf in explorer.explore(program))
[('big', 4), ('small-A', 2), ('small-B', 2)]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final, Generic, TypeAlias, TypeVar

import attrs

from meshredirect.values import MAX_MARK

__all__ = ["Eq", "Explorer", "In", "Leaf", "MarkSym", "Run", "Sym", "Tracer"]

R = TypeVar("R")

#: A guard against programs whose paths do not end (each run adds at least one leaf).
MAX_RUNS: Final = 1_000_000


@attrs.frozen
class MarkSym:
    """A mark that is ``(v & and_mask) ^ xor`` of a dimension's value ``v`` (marks rewritten by MARK/CONNMARK)."""

    dim: str
    and_mask: int = MAX_MARK
    xor: int = 0

    def apply(self, value: int) -> int:
        return (value & self.and_mask) ^ self.xor

    @property
    def constant(self) -> bool:
        return self.and_mask == 0


#: What a value stands for during exploration: a dimension (its value as is) or a mark transform of one.
Sym: TypeAlias = str | MarkSym


@attrs.frozen
class Eq:
    """A test ``value == other`` that is cached by value (build as many as needed)."""

    other: Hashable

    def __call__(self, value: object) -> bool:
        return value == self.other


@attrs.frozen
class In:
    """A test ``value in members`` that is cached by value (``members`` must be hashable)."""

    members: Hashable

    def __call__(self, value: object) -> bool:
        return value in self.members  # type: ignore[operator]


class Tracer:
    """Where a program sends its tests on symbolic values (see :class:`Run`)."""

    def decide(self, sym: Sym, key: Callable[[Any], Hashable]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


@attrs.frozen
class _Decision:
    dim: str
    mask: int
    alternatives: tuple[int, ...]


class Run(Tracer):
    """One run of a program: the representative values of its region, and the tests it made."""

    def __init__(self, explorer: Explorer, region: dict[str, int]) -> None:
        self.explorer = explorer
        self.region = region
        self.narrowed = dict(region)
        self.decisions: list[_Decision] = []
        self.index = {dim: _lowest_bit(mask) for dim, mask in region.items()}

    def value(self, dim: str) -> Any:
        """The representative value of ``dim`` in this run."""
        return self.explorer.values[dim][self.index[dim]]

    def decide(self, sym: Sym, key: Callable[[Any], Hashable]) -> Any:
        """``key`` of the symbolic value, recorded: every class with another outcome is explored too.

        ``key`` must be a function whose identity is stable across runs (it indexes a cache).
        """
        if isinstance(sym, MarkSym):
            dim, transform = sym.dim, (sym.and_mask, sym.xor)
        else:
            dim, transform = sym, None
        outcomes = self.explorer.partition(dim, key, transform)
        value = self.value(dim)
        if transform is not None:
            value = (value & transform[0]) ^ transform[1]
        outcome = key(value)
        mask = outcomes[outcome]
        current = self.narrowed[dim]
        if current & ~mask:
            alternatives = tuple(m & current for o, m in outcomes.items() if o != outcome and m & current)
            self.decisions.append(_Decision(dim=dim, mask=mask, alternatives=alternatives))
            self.narrowed[dim] = current & mask
        return outcome


@attrs.frozen
class Leaf(Generic[R]):
    """One run: its result, the region it covers (class indices per dimension) and its representative."""

    result: R
    region: Mapping[str, frozenset[int]]
    example: Mapping[str, Any]

    @property
    def size(self) -> int:
        """How many class combinations the region holds."""
        total = 1
        for indices in self.region.values():
            total *= len(indices)
        return total


class Explorer:
    """Runs a program over every path through the classes of some dimensions (see the module docstring).

    ``dims`` maps each dimension to its classes' representative values, most
    readable first (a run takes the first class its region allows).
    """

    def __init__(self, dims: Mapping[str, Sequence[Any]]) -> None:
        self.values: dict[str, tuple[Any, ...]] = {name: tuple(values) for name, values in dims.items()}
        for name, values in self.values.items():
            if not values:
                raise ValueError(f"dimension {name!r} has no classes")
        self._partitions: dict[tuple[str, object, tuple[int, int] | None], tuple[object, dict[Hashable, int]]] = {}
        self.runs = 0

    @property
    def product(self) -> int:
        """How many class combinations there are in all."""
        total = 1
        for values in self.values.values():
            total *= len(values)
        return total

    def partition(
        self, dim: str, key: Callable[[Any], Hashable], transform: tuple[int, int] | None = None
    ) -> dict[Hashable, int]:
        """The classes of ``dim`` grouped by ``key`` (of the transformed value), as bit masks."""
        cache_key = (dim, key if isinstance(key, (Eq, In)) else id(key), transform)
        found = self._partitions.get(cache_key)
        if found is not None and (found[0] is key or isinstance(key, (Eq, In))):
            return found[1]
        outcomes: dict[Hashable, int] = {}
        for index, value in enumerate(self.values[dim]):
            if transform is not None:
                value = (value & transform[0]) ^ transform[1]
            outcome = key(value)
            outcomes[outcome] = outcomes.get(outcome, 0) | (1 << index)
        self._partitions[cache_key] = (key, outcomes)
        return outcomes

    def explore(self, program: Callable[[Run], R], region: Mapping[str, Sequence[int]] | None = None) -> list[Leaf[R]]:
        """Every distinct path of ``program``, each with the region of classes it covers.

        ``region`` restricts dimensions to some of their classes (indices).
        """
        start = {dim: (1 << len(values)) - 1 for dim, values in self.values.items()}
        if region is not None:
            for dim, indices in region.items():
                mask = 0
                for index in indices:
                    mask |= 1 << index
                start[dim] &= mask
                if not start[dim]:
                    return []
        leaves: list[Leaf[R]] = []
        stack = [start]
        while stack:
            current = stack.pop()
            run = Run(self, current)
            result = program(run)
            self.runs += 1
            if self.runs > MAX_RUNS:
                raise RuntimeError(f"more than {MAX_RUNS} runs: the program's paths do not end")
            leaves.append(
                Leaf(
                    result=result,
                    region={dim: frozenset(_bits(mask)) for dim, mask in run.narrowed.items()},
                    example={dim: self.values[dim][run.index[dim]] for dim in self.values},
                )
            )
            # Branch on every alternative outcome of every recorded decision, keeping the earlier
            # decisions' outcomes: the regions so opened are disjoint and cover the rest.
            narrowed = dict(current)
            for decision in run.decisions:
                for alternative in decision.alternatives:
                    branch = dict(narrowed)
                    branch[decision.dim] = alternative
                    stack.append(branch)
                narrowed[decision.dim] &= decision.mask
        return leaves


def _lowest_bit(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def _bits(mask: int) -> list[int]:
    out = []
    index = 0
    while mask:
        if mask & 1:
            out.append(index)
        mask >>= 1
        index += 1
    return out
