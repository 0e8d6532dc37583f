"""Exhaustive exploration of a program over equivalence classes, one run per distinct path.

The proof enumeration (:mod:`meshredirect.semantics.classes`) splits every
dimension of a connection (source, destination, ports, uid, gid, mark,
interface...) into classes such that every test the rules, the environment
and the checks make is constant on each class. The product of the classes is
large (often millions); most of it is never told apart by any path through
the rules. :class:`Explorer` therefore runs a program (an evaluation and the
properties checked on it) once per *path*. Every test the program makes on a
dimension goes through :meth:`Run.decide` (one test) or :meth:`Run.decide_all`
(a conjunction of tests, such as the matches of one rule): the run follows the
outcome of its representative connection, its *region* shrinks to the classes
with that outcome, and the rest of the region (the other outcomes) is kept
for later runs. A region is a union of disjoint *boxes* (a box picks a subset
of classes in every dimension), so "the rule does not match" stays one region
whichever of its matches fails. Each run covers a region on which the
program behaves identically, and the regions partition the whole product:
together they are a proof over every class combination, with far fewer runs.

A program may also meet *choice points*, where it may go either way whatever
the connection (kube-proxy's ``-m statistic`` picking an endpoint): it asks
:meth:`Run.choose`, the run takes one outcome and leaves the other, on its
region as it stands, to a later run that replays the same outcomes up to that
point. Leaves then cover every class combination once per sequence of
outcomes (:attr:`Leaf.choices`), so a property that must hold whatever the
choices is proven on every branch.

A program that knows a *mirror* of itself (a permutation of some classes that
maps what it does on a connection onto what it does on the swapped one: two
services alike but for their addresses, see
:mod:`meshredirect.semantics.symmetry`) may ask
:meth:`Run.restrict_mirrored` to keep a part of its region and leave the
images of that part to no run, when the region is its own image. The leaf then
stands for its images too (:attr:`Leaf.mirrors`, :meth:`Leaf.images`,
:attr:`Leaf.covered`).

Soundness rests on one rule: the program branches on a dimension's value only
through :meth:`Run.decide` / :meth:`Run.decide_all`, and on anything else only
through :meth:`Run.choose`. ``tests/test_explore.py`` checks it by comparing
the explorer with brute-force enumeration of the full product and of every
sequence of choices.

>>> explorer = Explorer({"x": [0, 1, 2, 3], "y": ["a", "b"]})
>>> def program(run):
...     if run.decide_all([("x", lambda v: v >= 2, True), ("y", str.upper, "A")]):
...         return "big A"
...     return "other " + run.decide("y", str.upper)
>>> sorted((leaf.result, leaf.size) for leaf in explorer.explore(program))
[('big A', 2), ('other A', 2), ('other B', 4)]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final, Generic, TypeAlias, TypeVar

import attrs

from meshredirect.values import MAX_MARK

__all__ = [
    "Eq",
    "Explorer",
    "In",
    "Leaf",
    "MarkSym",
    "Mirror",
    "Run",
    "Sym",
    "Tracer",
    "mirror_box",
    "probe",
    "probe_all",
    "subtract_part",
]

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

    def peek(self, sym: Sym, key: Callable[[Any], Hashable]) -> tuple[bool, Any]:  # pragma: no cover - interface
        """(uniform, outcome): whether ``key`` has one outcome on the whole current region, without deciding."""
        raise NotImplementedError

    def decide_all(self, atoms: Sequence[Atom]) -> bool:  # pragma: no cover - interface
        """Whether every test of a conjunction gives its wanted outcome."""
        raise NotImplementedError

    def outcome(self, sym: Sym, key: Callable[[Any], Hashable]) -> Any:  # pragma: no cover - interface
        """``key`` of the representative's value, without deciding anything."""
        raise NotImplementedError

    def resolve(
        self, sym: Sym, key: Callable[[Any], Hashable]
    ) -> tuple[int, Any, dict[Hashable, int]]:  # pragma: no cover
        """(position of the dimension, the representative's outcome, every outcome's classes)."""
        raise NotImplementedError

    def decide_resolved(self, position: int, outcome: Any, outcomes: dict[Hashable, int]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def decide_constraints(self, constraints: Mapping[int, int], holds: bool) -> bool:  # pragma: no cover
        raise NotImplementedError

    def choose(self, *, alike: bool = False) -> bool:  # pragma: no cover - interface
        """The outcome of a choice point (the program may go either way): both are explored, unless
        ``alike`` (the caller's proof that the other outcome behaves as this one: only this one is)."""
        raise NotImplementedError

    def classes(self, dim: str) -> tuple[int, tuple[Any, ...], int]:  # pragma: no cover - interface
        """(position of the dimension, its classes' values, the representative's class)."""
        raise NotImplementedError

    def alike(self, dim: str, tests: Sequence[Callable[[Any], Hashable]]) -> bool:  # pragma: no cover
        """Whether each test holds on exactly one class of ``dim``, and every box of the region holds all
        of those classes or none (so swapping any two of them maps the region onto itself)."""
        raise NotImplementedError

    def restrict(
        self, inside: Sequence[Mapping[int, int]], outside: Sequence[Mapping[int, int]]
    ) -> None:  # pragma: no cover - interface
        """Keep the part of the region in ``inside``, leave the part in ``outside`` to another run."""
        raise NotImplementedError

    def mirror(self, pairs: Sequence[tuple[str, Hashable, Hashable]]) -> Mirror | None:  # pragma: no cover
        """The permutation of classes that swapping the values of each pair (dimension, value, value) makes
        (None: it is none)."""
        raise NotImplementedError

    def invariant(self, mirror: Mirror) -> bool:  # pragma: no cover - interface
        """Whether the region is its own image under a mirror."""
        raise NotImplementedError

    def agreeing(self, position: int, index: int) -> int:  # pragma: no cover - interface
        """The classes at ``position`` that each box of the region holds exactly when it holds ``index``."""
        raise NotImplementedError

    def restrict_mirrored(
        self, inside: Sequence[Mapping[int, int]], outside: Sequence[Mapping[int, int]], mirrors: Sequence[Mirror]
    ) -> bool:  # pragma: no cover - interface
        """:meth:`restrict`, the images of the part kept under ``mirrors`` left to no run (see :class:`Run`)."""
        raise NotImplementedError

    def left(self) -> int:  # pragma: no cover - interface
        """How many regions the run has left for later so far."""
        raise NotImplementedError

    def absorb(self, constraints: Mapping[int, int], index: int) -> bool:  # pragma: no cover - interface
        """Take back into the run's region the part of the ``index``-th region it left for later on which
        every constraint (position -> classes) holds; whether some of that region is still left. The
        caller's obligation: on that part the program, from here on, does what it does on the run's region
        (the explorer cannot check it)."""
        raise NotImplementedError

    def take_back(self, index: int) -> None:  # pragma: no cover - interface
        """Take back into the run's region the ``index``-th region it left for later (same obligation)."""
        raise NotImplementedError

    def join_left(self, index: int) -> None:  # pragma: no cover - interface
        """Join the region left last for later to the ``index``-th one (the caller's obligation: the program
        does the same on both)."""
        raise NotImplementedError


def probe(tracer: Tracer | None, value: Any, sym: Sym | None, key: Callable[[Any], Hashable]) -> Any:
    """``key(value)``; through ``tracer`` when the value stands for a dimension (``sym``)."""
    if tracer is None or sym is None:
        return key(value)
    return tracer.decide(sym, key)


def probe_all(
    tracer: Tracer | None, tests: Sequence[tuple[Any, Sym | None, Callable[[Any], Hashable], Hashable]]
) -> bool:
    """Whether every ``key(value) == wanted``, decided as one conjunction (see :meth:`Run.decide_all`)."""
    atoms: list[Atom] = []
    for value, sym, key, wanted in tests:
        if tracer is None or sym is None:
            if key(value) != wanted:
                return False
        else:
            atoms.append((sym, key, wanted))
    return tracer.decide_all(atoms) if tracer is not None and atoms else True


#: A box: for each dimension (in the explorer's order), a bit mask of the classes it holds.
Box: TypeAlias = tuple[int, ...]
#: One test of a conjunction: the symbolic value, the test, and the outcome wanted.
Atom: TypeAlias = tuple["Sym", Callable[[Any], Hashable], Hashable]
#: A permutation of classes that maps the program onto itself (see :meth:`Run.restrict_mirrored`): disjoint
#: swaps (position of a dimension, class, class).
Mirror: TypeAlias = tuple[tuple[int, int, int], ...]
#: The mirrors a region stands for, by level: the region covers its images under every composition that takes
#: the identity or one mirror of each level.
MirrorLevels: TypeAlias = tuple[tuple[Mirror, ...], ...]
#: A dimension's partitions, by test (or its identity) and mark transform: (the test, outcomes' classes, each
#: class's outcome).
Partitions: TypeAlias = dict[tuple[object, tuple[int, int] | None], tuple[object, dict[Hashable, int], list[Hashable]]]
#: A region left for later: its boxes, the outcomes of the choice points met before, and its mirrors.
Alternative: TypeAlias = tuple[list[Box], tuple[bool, ...], MirrorLevels]


class Run(Tracer):
    """One run of a program: the representative values of its region, and the regions it left for later.

    A run also replays ``forced`` outcomes at the program's first choice points (see :meth:`choose`).
    """

    def __init__(
        self, explorer: Explorer, region: list[Box], forced: tuple[bool, ...] = (), mirrors: MirrorLevels = ()
    ) -> None:
        self.explorer = explorer
        self.region = region
        #: Left for later runs: a region, the outcomes of the choice points met before it was left, and the
        #: mirrors it stands for.
        self.alternatives: list[Alternative] = []
        #: The region stands for its images under these too (see :meth:`restrict_mirrored`).
        self.mirrors = mirrors
        self.index = tuple(_lowest_bit(mask) for mask in region[0])
        self.forced = forced
        #: The outcomes taken at the choice points met so far.
        self.taken: list[bool] = []

    def choose(self, *, alike: bool = False) -> bool:
        """A choice point: the program may go either way on every connection of the region. The run
        replays its forced outcome, or takes True and leaves False, on its current region, to another run
        (with ``alike``, the caller has shown that False behaves as True does: it is not explored)."""
        position = len(self.taken)
        if position < len(self.forced):
            taken = self.forced[position]
        else:
            taken = True
            if not alike:
                self.alternatives.append((list(self.region), (*self.taken, False), self.mirrors))
        self.taken.append(taken)
        return taken

    def classes(self, dim: str) -> tuple[int, tuple[Any, ...], int]:
        """(position of the dimension, its classes' values, the representative's class)."""
        position = self.explorer.position[dim]
        return position, self.explorer.values[dim], self.index[position]

    def alike(self, dim: str, tests: Sequence[Callable[[Any], Hashable]]) -> bool:
        position = self.explorer.position[dim]
        union = 0
        for test in tests:
            mask = self.explorer.partition(dim, test).get(True, 0)
            if mask.bit_count() != 1 or union & mask:
                return False
            union |= mask
        for box in self.region:
            here = box[position] & union
            if here and here != union:
                return False
        return True

    def restrict(self, inside: Sequence[Mapping[int, int]], outside: Sequence[Mapping[int, int]]) -> None:
        """Keep the part of the region in ``inside`` and leave the part in ``outside``, as one region, to
        another run. Each is a union of disjoint parts (per position, the classes wanted; positions not
        named: any class); together they must partition every combination, and ``inside`` must hold the
        representative (the caller's obligations: a wrong split makes the exploration unsound, which
        ``tests/test_explore.py`` shows is caught)."""
        left = _cut(self.region, outside)
        self.region = _cut(self.region, inside)
        if left:
            self.alternatives.append((_merge(left), tuple(self.taken), self.mirrors))

    def mirror(self, pairs: Sequence[tuple[str, Hashable, Hashable]]) -> Mirror | None:
        """The permutation of classes that swapping the values of each pair (dimension, value, value) makes;
        None unless it is one. A pair's values must either each be a class of its own (both are
        representatives: their classes swap) or lie in one class that neither represents (it stays; the
        caller's obligation: no test tells them apart there). Cached by the identity of ``pairs`` (pass
        the same object to ask again)."""
        explorer = self.explorer
        cached = explorer.mirrors.get(id(pairs))
        if cached is not None and cached[0] is pairs:
            return cached[1]
        found = _mirror_of(explorer, pairs)
        explorer.mirrors[id(pairs)] = (pairs, found)
        return found

    def agreeing(self, position: int, index: int) -> int:
        """The classes of a dimension (a mask) that each box of the region holds exactly when it holds class
        ``index``: those a mirror may swap with it."""
        agree = -1
        for box in self.region:
            mask = box[position]
            agree &= mask if mask >> index & 1 else ~mask
        return agree

    def invariant(self, mirror: Mirror) -> bool:
        """Whether the region is its own image under a mirror (each box holds both classes of each swap or
        neither)."""
        for box in self.region:
            for position, i, j in mirror:
                if (box[position] >> i ^ box[position] >> j) & 1:
                    return False
        return True

    def restrict_mirrored(
        self, inside: Sequence[Mapping[int, int]], outside: Sequence[Mapping[int, int]], mirrors: Sequence[Mirror]
    ) -> bool:
        """:meth:`restrict`, but the images of the part kept under each of ``mirrors`` are left to no run:
        this run stands for them. Only when the region is invariant under each mirror (else nothing is done:
        False). The caller's obligation: the program, from here on, does on a connection of an image what it
        does on its preimage, with the values swapped; the images lie in ``outside`` and are disjoint."""
        if not all(self.invariant(mirror) for mirror in mirrors):
            return False
        # The region is its own image: the images of its part in `inside` are its part in the images of
        # `inside`, taken out of `outside` part by part (few, small) before cutting the region.
        every = {p: (1 << len(self.explorer.values[dim])) - 1 for p, dim in enumerate(self.explorer.dims)}
        rest = [dict(part) for part in outside]
        for image in _merge_parts([_mirrored_part(part, mirror) for mirror in mirrors for part in inside]):
            rest = subtract_part(rest, image, every)
        kept = _cut(self.region, inside)
        left = _cut(self.region, rest)
        self.region = kept
        if left:
            self.alternatives.append((_merge(left), tuple(self.taken), self.mirrors))
        self.mirrors = (*self.mirrors, tuple(mirrors))
        return True

    def value(self, dim: str) -> Any:
        """The representative value of ``dim`` in this run."""
        position = self.explorer.position[dim]
        return self.explorer.values[dim][self.index[position]]

    def resolve(self, sym: Sym, key: Callable[[Any], Hashable]) -> tuple[int, Any, dict[Hashable, int]]:
        """(position of the dimension, the representative's outcome, every outcome's classes)."""
        if isinstance(sym, str):
            fast = self.explorer.fast.get(id(key))
            if fast is not None:
                entry = fast.get(sym)
                if entry is not None and entry[0] is key:
                    position = entry[1]
                    return position, entry[3][self.index[position]], entry[2]
            dim: str = sym
            transform = None
        else:
            dim, transform = sym.dim, (sym.and_mask, sym.xor)
        outcomes = self.explorer.partition(dim, key, transform)
        position = self.explorer.position[dim]
        bit = 1 << self.index[position]
        for outcome, mask in outcomes.items():
            if mask & bit:
                return position, outcome, outcomes
        raise AssertionError("every class has an outcome")

    def outcome(self, sym: Sym, key: Callable[[Any], Hashable]) -> Any:
        """``key`` of the representative's value, without deciding anything."""
        return self.resolve(sym, key)[1]

    def peek(self, sym: Sym, key: Callable[[Any], Hashable]) -> tuple[bool, Any]:
        position, outcome, outcomes = self.resolve(sym, key)
        mask = outcomes[outcome]
        return all(not (box[position] & ~mask) for box in self.region), outcome

    def decide(self, sym: Sym, key: Callable[[Any], Hashable]) -> Any:
        """``key`` of the symbolic value: the run follows its representative's outcome; the classes
        with every other outcome are explored by other runs.

        ``key`` must be a function whose identity is stable across runs (it indexes a cache), or an
        :class:`Eq` / :class:`In` (cached by value).
        """
        return self.decide_resolved(*self.resolve(sym, key))

    def decide_resolved(self, position: int, outcome: Any, outcomes: dict[Hashable, int]) -> Any:
        """:meth:`decide` on what :meth:`resolve` found."""
        mask = outcomes[outcome]
        region = self.region
        if all(not (box[position] & ~mask) for box in region):
            return outcome
        kept: list[Box] = []
        others: dict[Hashable, list[Box]] = {}
        for box in region:
            here = box[position]
            for other, other_mask in outcomes.items():
                part = here & other_mask
                if part:
                    split = (*box[:position], part, *box[position + 1 :])
                    (kept if other == outcome else others.setdefault(other, [])).append(split)
        self.region = kept
        taken = tuple(self.taken)
        self.alternatives.extend((boxes, taken, self.mirrors) for boxes in others.values())
        return outcome

    def decide_all(self, atoms: Sequence[Atom]) -> bool:
        """Whether every test gives its wanted outcome (for the representative); the run keeps the
        part of its region where that is so as well, and leaves the rest, as one region, to another run."""
        constraints: dict[int, int] = {}
        holds = True
        for sym, key, wanted in atoms:
            position, outcome, outcomes = self.resolve(sym, key)
            if outcome != wanted:
                holds = False
            constraints[position] = constraints.get(position, -1) & outcomes.get(wanted, 0)
        return self.decide_constraints(constraints, holds)

    def decide_constraints(self, constraints: Mapping[int, int], holds: bool) -> bool:
        """:meth:`decide_all` on constraints (position -> classes wanted) and the representative's outcome."""
        if not constraints:
            return holds
        matched, missed = _split(self.region, constraints)
        kept, left = (matched, missed) if holds else (missed, matched)
        if left:
            self.alternatives.append((_merge(left), tuple(self.taken), self.mirrors))
        self.region = kept
        return holds

    def left(self) -> int:
        return len(self.alternatives)

    def take_back(self, index: int) -> None:
        boxes, _taken, mirrors = self.alternatives.pop(index)
        assert mirrors == self.mirrors, "a region left before a mirrored restriction"
        self.region = [*self.region, *boxes]

    def join_left(self, index: int) -> None:
        boxes, taken, mirrors = self.alternatives.pop()
        earlier, earlier_taken, earlier_mirrors = self.alternatives[index]
        assert earlier_taken == taken, "regions left at different choices"
        assert earlier_mirrors == mirrors, "regions left at different mirrors"
        self.alternatives[index] = (_merge([*earlier, *boxes]), taken, mirrors)

    def absorb(self, constraints: Mapping[int, int], index: int) -> bool:
        boxes, taken, mirrors = self.alternatives[index]
        assert mirrors == self.mirrors, "a region left before a mirrored restriction"
        matched, missed = _split(boxes, constraints)
        if matched:
            self.region = [*self.region, *matched]
        if missed:
            self.alternatives[index] = (_merge(missed), taken, mirrors)
            return True
        self.alternatives.pop(index)
        return False


@attrs.frozen
class Leaf(Generic[R]):
    """One run: its result, the region it covers and the values of its representative."""

    result: R
    #: Disjoint boxes of class indices, as bit masks per dimension (see ``Explorer.dims``).
    boxes: tuple[Box, ...]
    example: Mapping[str, Any]
    dims: tuple[str, ...]
    #: The outcomes the run took at the program's choice points (replay them to reproduce the result).
    choices: tuple[bool, ...] = ()
    #: The leaf covers the region's images under these too (see :meth:`Run.restrict_mirrored`), where the
    #: program does what it does here, with the swapped values swapped.
    mirrors: MirrorLevels = ()

    @property
    def size(self) -> int:
        """How many class combinations the region holds (its images not counted)."""
        total = 0
        for box in self.boxes:
            count = 1
            for mask in box:
                count *= mask.bit_count()
            total += count
        return total

    @property
    def covered(self) -> int:
        """How many class combinations the leaf covers: its region and the region's images."""
        total = self.size
        for level in self.mirrors:
            total *= 1 + len(level)
        return total

    def images(self) -> list[tuple[Mirror, ...]]:
        """Every composition of mirrors the leaf covers, as the mirrors to apply, innermost level first
        (the identity: ``()``)."""
        found: list[tuple[Mirror, ...]] = [()]
        for level in reversed(self.mirrors):
            found = [
                chosen + ((mirror,) if mirror is not None else ()) for chosen in found for mirror in (None, *level)
            ]
        return found

    @property
    def region(self) -> dict[str, frozenset[int]]:
        """Per dimension, the classes some box of the region holds (an outline of the region)."""
        outline: dict[str, frozenset[int]] = {}
        for position, dim in enumerate(self.dims):
            mask = 0
            for box in self.boxes:
                mask |= box[position]
            outline[dim] = frozenset(_bits(mask))
        return outline

    def __contains__(self, indices: object) -> bool:
        """Whether a combination of class indices (a mapping dimension -> index) lies in the region."""
        assert isinstance(indices, Mapping)
        return any(all(box[p] >> indices[d] & 1 for p, d in enumerate(self.dims)) for box in self.boxes)


class Explorer:
    """Runs a program over every path through the classes of some dimensions (see the module docstring).

    ``dims`` maps each dimension to its classes' representative values, most
    readable first (a run takes the first classes its region allows).
    """

    def __init__(
        self, dims: Mapping[str, Sequence[Any]], *, partitions: Mapping[str, Partitions] | None = None
    ) -> None:
        """``partitions``: per dimension, where explorers of the same classes (the roots of one class space)
        keep the partitions they computed, for each other."""
        self.values: dict[str, tuple[Any, ...]] = {
            name: values if isinstance(values, tuple) else tuple(values) for name, values in dims.items()
        }
        for name, values in self.values.items():
            if not values:
                raise ValueError(f"dimension {name!r} has no classes")
        self.dims = tuple(self.values)
        self.position = {dim: index for index, dim in enumerate(self.dims)}
        self._partitions: dict[str, Partitions] = dict(partitions) if partitions is not None else {}
        #: The partitions of tests of stable identity: id(test) -> dim -> (test, position, outcomes, per class).
        self.fast: dict[int, dict[str, tuple[object, int, dict[Hashable, int], list[Hashable]]]] = {}
        self._indices: dict[str, dict[Hashable, int] | None] = {}
        #: Run.mirror's answers, by the identity of the pairs asked about (kept alive here).
        self.mirrors: dict[int, tuple[object, Mirror | None]] = {}
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
        by_value = isinstance(key, (Eq, In))
        cache = self._partitions.get(dim)
        if cache is None:
            cache = self._partitions[dim] = {}
        cache_key = (key if by_value else id(key), transform)
        found = cache.get(cache_key)
        if found is not None and (by_value or found[0] is key):
            if transform is None and dim not in self.fast.get(id(key), {}):
                self.fast.setdefault(id(key), {})[dim] = (key, self.position[dim], found[1], found[2])
            return found[1]
        outcomes: dict[Hashable, int] = {}
        per_class: list[Hashable] = []
        members = _members(key) if transform is None else None
        index_of = self._index(dim) if members is not None else None
        if members is not None and index_of is not None and len(members) <= len(index_of):
            # A test of membership in a set of values: the classes whose value is a member, looked up.
            count = len(index_of)
            inside = 0
            for member in members:
                at = index_of.get(member)
                if at is not None:
                    inside |= 1 << at
            if inside:
                outcomes[True] = inside
            if inside != (1 << count) - 1:
                outcomes[False] = ((1 << count) - 1) & ~inside
            per_class = [False] * count
            while inside:
                bit = inside & -inside
                inside ^= bit
                per_class[bit.bit_length() - 1] = True
            cache[cache_key] = (key, outcomes, per_class)
            self.fast.setdefault(id(key), {})[dim] = (key, self.position[dim], outcomes, per_class)
            return outcomes
        for index, value in enumerate(self.values[dim]):
            if transform is not None:
                value = (value & transform[0]) ^ transform[1]
            outcome = key(value)
            per_class.append(outcome)
            outcomes[outcome] = outcomes.get(outcome, 0) | (1 << index)
        cache[cache_key] = (key, outcomes, per_class)
        if transform is None:
            # The fast path of Run.resolve: by the test's identity, each class's outcome at hand.
            self.fast.setdefault(id(key), {})[dim] = (key, self.position[dim], outcomes, per_class)
        return outcomes

    def _index(self, dim: str) -> dict[Hashable, int] | None:
        """Each class's value -> its index, when the values are hashable and distinct (else None)."""
        if dim not in self._indices:
            index: dict[Hashable, int] | None
            try:
                index = {value: i for i, value in enumerate(self.values[dim])}
            except TypeError:
                index = None
            if index is not None and len(index) != len(self.values[dim]):
                index = None
            self._indices[dim] = index
        return self._indices[dim]

    def explore(self, program: Callable[[Run], R], region: Mapping[str, Sequence[int]] | None = None) -> list[Leaf[R]]:
        """Every distinct path of ``program``, each with the region of classes it covers.

        ``region`` restricts dimensions to some of their classes (indices).
        """
        start = [(1 << len(self.values[dim])) - 1 for dim in self.dims]
        if region is not None:
            for dim, indices in region.items():
                mask = 0
                for index in indices:
                    mask |= 1 << index
                start[self.position[dim]] &= mask
        if not all(start):
            return []
        leaves: list[Leaf[R]] = []
        stack: list[Alternative] = [([tuple(start)], (), ())]
        while stack:
            run = Run(self, *stack.pop())
            result = program(run)
            self.runs += 1
            if self.runs > MAX_RUNS:
                raise RuntimeError(f"more than {MAX_RUNS} runs: the program's paths do not end")
            leaves.append(
                Leaf(
                    result=result,
                    boxes=tuple(run.region),
                    example={dim: self.values[dim][run.index[p]] for p, dim in enumerate(self.dims)},
                    dims=self.dims,
                    choices=tuple(run.taken),
                    mirrors=run.mirrors,
                )
            )
            stack.extend(reversed(run.alternatives))
        return leaves


def _members(key: Callable[[Any], Hashable]) -> frozenset[Hashable] | tuple[Hashable] | None:
    """The values a test of membership holds for (``Eq``, ``In`` of a frozenset, ``frozenset.__contains__``),
    or None for any other test. Such a test is True exactly on those values and False on every other."""
    if isinstance(key, Eq):
        return (key.other,)
    if isinstance(key, In):
        return key.members if isinstance(key.members, frozenset) else None
    owner = getattr(key, "__self__", None)
    if isinstance(owner, frozenset) and getattr(key, "__name__", "") == "__contains__":
        return owner
    return None


def _merge(boxes: list[Box]) -> list[Box]:
    """Fewer boxes for the same region: boxes equal but in one dimension become one."""
    if len(boxes) < 2:
        return boxes
    for position in range(len(boxes[0])):
        merged: dict[Box, int] = {}
        for box in boxes:
            rest = box[:position] + box[position + 1 :]
            merged[rest] = merged.get(rest, 0) | box[position]
        if len(merged) < len(boxes):
            boxes = [(*rest[:position], mask, *rest[position:]) for rest, mask in merged.items()]
    return boxes


def _split(region: Sequence[Box], constraints: Mapping[int, int]) -> tuple[list[Box], list[Box]]:
    """The boxes of ``region`` where every constraint holds, and the disjoint rest."""
    matched: list[Box] = []
    missed: list[Box] = []
    for box in region:
        current = box
        inside = True
        for position, mask in constraints.items():
            here = current[position]
            out = here & ~mask
            if out:
                missed.append((*current[:position], out, *current[position + 1 :]))
            here &= mask
            if not here:
                inside = False
                break
            if out:
                current = (*current[:position], here, *current[position + 1 :])
        if inside:
            matched.append(current)
    return matched, missed


def _cut(region: list[Box], parts: Sequence[Mapping[int, int]]) -> list[Box]:
    """The boxes of ``region`` inside a union of disjoint parts (per position, the classes wanted)."""
    out: list[Box] = []
    for box in region:
        for part in parts:
            current = box
            for position, mask in part.items():
                here = current[position] & mask
                if not here:
                    break
                if here != current[position]:
                    current = (*current[:position], here, *current[position + 1 :])
            else:
                out.append(current)
    return out


def _mirror_of(explorer: Explorer, pairs: Sequence[tuple[str, Hashable, Hashable]]) -> Mirror | None:
    """:meth:`Run.mirror`, uncached."""
    swaps: list[tuple[int, int, int]] = []
    for dim, first, second in pairs:
        position = explorer.position.get(dim)
        if position is None:
            continue
        one: int | None
        other: int | None
        index = explorer._index(dim)
        if index is not None:
            one, other = index.get(first), index.get(second)
        else:
            masks = [explorer.partition(dim, Eq(v)).get(True, 0) for v in (first, second)]
            if any(m.bit_count() > 1 for m in masks):
                return None
            one, other = (m.bit_length() - 1 if m else None for m in masks)
        if one is None and other is None:
            continue
        if one is None or other is None:
            return None
        swaps.append((position, one, other))
    classes = [(p, c) for p, i, j in swaps for c in (i, j)]
    if len(set(classes)) != len(classes):
        return None
    return tuple(swaps)


def _mirrored_part(part: Mapping[int, int], mirror: Mirror) -> dict[int, int]:
    """A part's image under a mirror: at each swap's position, the two classes' bits exchanged (a position
    the part does not name holds every class: it stays)."""
    out = dict(part)
    for position, i, j in mirror:
        mask = out.get(position)
        if mask is not None and (mask >> i ^ mask >> j) & 1:
            out[position] = mask ^ (1 << i | 1 << j)
    return out


def _merge_parts(parts: list[dict[int, int]]) -> list[dict[int, int]]:
    """Parts as fewer parts of the same union: position by position, parts that name the same positions and
    agree on all but this one become one (the images of a part under the mirrors of one dispatch differ in
    the destination only)."""
    positions = sorted({p for part in parts for p in part})
    for position in positions:
        merged: dict[tuple[tuple[int, int], ...], dict[int, int]] = {}
        rest: list[dict[int, int]] = []
        for part in parts:
            if position not in part:
                rest.append(part)
                continue
            key = tuple(sorted((p, m) for p, m in part.items() if p != position))
            found = merged.get(key)
            if found is None:
                merged[key] = dict(part)
            else:
                found[position] |= part[position]
        parts = [*merged.values(), *rest]
    return parts


def subtract_part(
    parts: list[dict[int, int]], minus: Mapping[int, int], every: Mapping[int, int]
) -> list[dict[int, int]]:
    """Disjoint parts (per position, the classes; a position not named: every class) less another part."""
    out: list[dict[int, int]] = []
    for part in parts:
        if any(not (part.get(p, every[p]) & m) for p, m in minus.items()):
            out.append(part)
            continue
        current = dict(part)
        for p, m in minus.items():
            here = current.get(p, every[p])
            if here & ~m:
                out.append({**current, p: here & ~m})
            current[p] = here & m
    return out


def mirror_box(box: Box, mirrors: Sequence[Mirror]) -> Box:
    """A box's image under mirrors applied in order (see :meth:`Leaf.images`)."""
    part = dict(enumerate(box))
    for mirror in mirrors:
        part = _mirrored_part(part, mirror)
    return tuple(part[position] for position in range(len(box)))


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
