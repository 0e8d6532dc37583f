"""The path explorer is sound: every class combination behaves as the path that covers it says.

The proof enumeration runs a program once per path; a region is claimed to
behave like its representative. These tests evaluate class combinations one
by one, concretely (no tracer), and compare with the result of the path whose
region holds them. A program that branches on a value without telling the
explorer must be caught by the same comparison.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings

from meshredirect.compiler import compile_policy
from meshredirect.ir import Family
from meshredirect.node import mesh_environment
from meshredirect.policy import Policy
from meshredirect.readers.iptables import read_iptables
from meshredirect.semantics.check import Checker, checker
from meshredirect.semantics.classes import ClassSpace, Root, mark_classes
from meshredirect.semantics.explore import Explorer, Leaf, Run
from meshredirect.semantics.interpreter import Choices, Interpreter
from meshredirect.semantics.model import Environment
from meshredirect.testing.node_dump import node_dump
from strategies import policies

#: Above this many class combinations a root is checked on a random sample of them.
EXHAUSTIVE_LIMIT = 1500
SAMPLE = 600


def combinations(
    leaves: list[Leaf[Any]], explorer: Explorer, rng: random.Random, sample: int = SAMPLE
) -> Iterator[tuple[int, ...]]:
    """Class indices of every combination the leaves cover, or of a sample when there are many."""
    total = sum(leaf.size for leaf in leaves)
    seen: set[tuple[int, ...]] = set()
    for leaf in leaves:
        for box in leaf.boxes:
            members = [[i for i in range(m.bit_length()) if m >> i & 1] for m in box]
            count = 1
            for m in members:
                count *= len(m)
            if total <= EXHAUSTIVE_LIMIT:
                picks: Any = itertools.product(*members)
            else:
                share = max(1, sample * count // total)
                picks = (tuple(rng.choice(m) for m in members) for _ in range(min(share, count)))
            for combo in picks:
                if combo not in seen:
                    seen.add(combo)
                    yield combo


#: A program under test: (connection, run or None, symbols or None, forced choices or None) -> result.
Program = Callable[[Any, Run | None, Mapping[str, str] | None, Choices | None], Any]


def concrete_branches(program: Program, connection: Any) -> dict[tuple[bool, ...], Any]:
    """The result of every sequence of outcomes of the choice points, evaluated concretely one by one."""
    found: dict[tuple[bool, ...], Any] = {}
    todo: list[tuple[bool, ...]] = [()]
    while todo:
        forced = todo.pop()
        choices = Choices(forced)
        result = program(connection, None, None, choices)
        taken = tuple(choices.taken)
        found[taken] = result
        todo.extend((*taken[:i], not taken[i]) for i in range(len(forced), len(taken)))
    return found


def assert_sound(
    space: ClassSpace,
    program: Program,
    seed: int = 0,
    instantiate: Callable[[Any, Any], Any] = lambda result, connection: result,
    sample: int = SAMPLE,
) -> int:
    """Explore every root of ``space`` with ``program`` and compare each covered combination with concrete
    runs of it, one per sequence of choices; returns how many combinations were compared."""
    rng = random.Random(seed)
    compared = 0
    for root in space.roots:
        explorer = root.explorer()
        symbols = space.symbols(root)

        def symbolic(run: Run, root: Root = root, symbols: Mapping[str, str] = symbols) -> Any:
            return program(space.connection(root, {d: run.value(d) for d in root.dims}), run, symbols, None)

        leaves = explorer.explore(symbolic)
        # Each combination lies in one leaf per sequence of choices: a complete tree of outcomes.
        weighted = sum(Fraction(leaf.size, 2 ** len(leaf.choices)) for leaf in leaves)
        assert weighted == root.count(), "the regions do not cover the classes once per choice"
        for combo in combinations(leaves, explorer, rng, sample):
            indices = dict(zip(explorer.dims, combo, strict=True))
            connection = space.connection(root, {d: explorer.values[d][i] for d, i in indices.items()})
            concrete = concrete_branches(program, connection)
            claimed = {leaf.choices: instantiate(leaf.result, connection) for leaf in leaves if indices in leaf}
            assert concrete == claimed, f"{connection} behaves as {concrete}, but its paths say {claimed}"
            compared += 1
    return compared


def properties_program(check: Checker) -> Program:
    def program(connection: Any, run: Run | None, symbols: Mapping[str, str] | None, choices: Choices | None) -> Any:
        found = check.violations_of(connection, symbols=symbols, tracer=run, choices=choices)
        return frozenset(p for p, _ in found)

    return program


def verdict_program(interpreter: Interpreter) -> Program:
    """The verdict; during exploration its fields that stand for a dimension are kept as ("sym", dim)."""

    def program(connection: Any, run: Run | None, symbols: Mapping[str, str] | None, choices: Choices | None) -> Any:
        evaluation = interpreter.evaluate(connection, trace=False, symbols=symbols, tracer=run, choices=choices)
        verdict = evaluation.verdict
        fields = []
        for name in ("address", "port", "mark", "local", "reject"):
            if hasattr(verdict, name):
                sym = evaluation.symbols.get("verdict." + name) if run is not None else None
                fields.append((name, ("sym", str(sym)) if sym is not None else getattr(verdict, name)))
        return (type(verdict).__name__, tuple(fields), evaluation.zone)

    return program


def instantiate_verdict(result: Any, connection: Any) -> Any:
    """A path's verdict for one connection of its region: symbolic fields take the connection's values."""
    kind, fields, zone = result
    own = {"dst": connection.dst, "dport": connection.dport, "src": connection.src, "mark": connection.mark}
    concrete = tuple(
        (name, own[value[1]] if isinstance(value, tuple) and value[0] == "sym" else value) for name, value in fields
    )
    return (kind, concrete, zone)


SAMPLES = [
    Policy(),
    Policy(
        inbound_mode="TPROXY", outbound_cidrs_exclude="10.96.0.0/12", dns={"enabled": True, "servers": ["10.96.0.10"]}
    ),
    Policy(loopback_capture="all", inbound_ports="80,443", outbound_ports_exclude="22", exclude_interfaces="eth1"),
    Policy(families="ipv6", owner_groups_include="1001", reroute_interfaces="tap0", outbound_cidrs="fd00:10::/64"),
]


@pytest.mark.parametrize("policy", SAMPLES, ids=["istio", "tproxy-dns", "loopback-all", "ipv6-groups-reroute"])
def test_the_check_behaves_on_every_class_as_its_path_says(policy: Policy) -> None:
    check = checker(policy)
    assert assert_sound(check.space, properties_program(check)) > 100


@pytest.mark.parametrize("policy", SAMPLES, ids=["istio", "tproxy-dns", "loopback-all", "ipv6-groups-reroute"])
def test_verdicts_are_the_same_on_every_class_of_a_path(policy: Policy) -> None:
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    space = ClassSpace([ruleset], env, families=(Family.IPV4, Family.IPV6))
    assert assert_sound(space, verdict_program(Interpreter(ruleset, env)), instantiate=instantiate_verdict) > 100


@settings(max_examples=6)
@given(policies(families=frozenset({Family.IPV4})))
def test_generated_policies_check_soundly(policy: Policy) -> None:
    check = checker(policy, families=(Family.IPV4,))
    assert_sound(check.space, properties_program(check), seed=1, sample=200)


def test_a_program_that_branches_behind_the_explorers_back_is_caught() -> None:
    policy = Policy()
    check = checker(policy)

    def cheating(connection: Any, run: Run | None, symbols: Mapping[str, str] | None, choices: Choices | None) -> Any:
        honest = properties_program(check)(connection, run, symbols, choices)
        return (honest, connection.dport == 8080)  # reads the port without a decision

    with pytest.raises(AssertionError, match="behaves as"):
        assert_sound(check.space, cheating)


def _node(services: int = 3, containers: int = 2) -> Checker:
    """The checker ``meshredirect verify`` runs on a small node dump (Istio, kube-proxy, Docker)."""
    ruleset = read_iptables(node_dump(services=services, endpoints=3, containers=containers))
    return checker(ruleset, mesh_environment(ruleset)[1])


def test_a_node_with_random_endpoint_choices_checks_soundly_on_every_branch() -> None:
    check = _node()
    assert assert_sound(check.space, properties_program(check), sample=300) > 100
    interpreter = check.interpreter
    assert assert_sound(check.space, verdict_program(interpreter), instantiate=instantiate_verdict, sample=300) > 100


def test_a_program_that_takes_one_branch_of_a_choice_behind_the_explorers_back_is_caught() -> None:
    check = _node(services=2, containers=0)

    def one_branch(connection: Any, run: Run | None, symbols: Mapping[str, str] | None, choices: Choices | None) -> Any:
        # Always the default outcome during exploration: the other endpoints are never seen.
        return properties_program(check)(connection, run, symbols, choices if run is None else Choices())

    with pytest.raises(AssertionError, match=r"do not cover the classes once per choice|behaves as"):
        assert_sound(check.space, one_branch, sample=100)


def test_regions_partition_the_product() -> None:
    explorer = Explorer({"x": list(range(5)), "y": list(range(3))})

    def program(run: Run) -> tuple[int, int]:
        a = run.decide_all([("x", lambda v: v % 2 == 0, True), ("y", lambda v: v > 0, True)])
        return (int(a), run.decide("x", lambda v: v > 2))

    leaves = explorer.explore(program)
    covered = [(x, y) for leaf in leaves for x in range(5) for y in range(3) if {"x": x, "y": y} in leaf]
    assert sorted(covered) == [(x, y) for x in range(5) for y in range(3)]


def test_mark_classes_give_every_outcome_combination_a_witness() -> None:
    tests = [(0xFF, 0x01), (0xFF00, 0x0200), (0xFFFF, 0x0201), (0xFFFFFFFF, 1337)]
    marks = mark_classes(tests)
    found = {tuple((m & mask) == value for mask, value in tests) for m in marks}
    # Every combination some mark gives (searched over the bits the tests look at).
    wanted = {tuple((m & mask) == value for mask, value in tests) for m in [*range(0x10000), 1337, 1337 | 0x10000]}
    assert found == wanted
    assert marks[0] == 0
