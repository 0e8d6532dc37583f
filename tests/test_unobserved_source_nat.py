"""Proofs leave out source NAT and mark rewrites nobody reads, and still prove the same thing.

A packet that leaves the pod after nat POSTROUTING is not looked at again
(one that loops back over lo is, by the rules of PREROUTING and INPUT, and
the stage runs when one of them reads what it may change):
the properties :mod:`meshredirect.semantics.check` proves read the verdict,
the route and the proxy's follow-up connections (which start from the
original connection), never the source the rules left. So the proof skips a
source NAT stage that can only rewrite the source, the mark and the
conntrack mark (``Interpreter.source_nat_summary``), and the splits its tests
would make (on a node with kube-proxy's and Docker's masquerading, most of
the paths). Here the proof with and without the shortcut is compared
exhaustively: for every pair of paths whose classes of connections meet,
with the same random choices, the properties violated are the same, and so
are the verdicts (their kind), arrivals and routes of every step. Node
dumps get extra POSTROUTING rules from a pool that holds everything that
must keep the stage in (a DROP, a choice point, a mark test after a mark
rewrite, MASQUERADE out of an interface without an address, an SNAT range,
an unknown match, a REDIRECT where there is none...). Rules of nat chains
that only rewrite the mark (kube-proxy's jumps to KUBE-MARK-MASQ) are
likewise decided only when the mark is read; the dumps get more of those,
and rules that read the mark later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshredirect.semantics.interpreter as interpreter_module
from meshredirect.node import mesh_environment
from meshredirect.readers.iptables import read_iptables
from meshredirect.semantics.check import Checker, checker
from meshredirect.semantics.explore import Leaf, Run
from meshredirect.semantics.proxy import Step
from meshredirect.testing.node_dump import node_dump

#: Rules added to nat POSTROUTING: the first ones the stage may be left out with, the rest keep it in.
POOL = (
    "-A POSTROUTING -s 10.244.0.0/16 -j SNAT --to-source 10.0.0.9",
    "-A POSTROUTING -j CONNMARK --set-xmark 0x10/0x10",
    "-A POSTROUTING -m connmark --mark 0x10/0x10 -j MASQUERADE",
    "-A POSTROUTING -m mark --mark 0x4000/0x4000 -j RETURN",
    "-A POSTROUTING -j MARK --set-xmark 0x2/0x2",
    "-A POSTROUTING -m mark --mark 0x2/0x2 -j RETURN",
    "-A POSTROUTING -m mark --mark 0x1/0x1 -j DROP",
    "-A POSTROUTING -p tcp -m tcp --dport 8080 -j REJECT",
    "-A POSTROUTING -m statistic --mode random --probability 0.5 -j MASQUERADE",
    "-A POSTROUTING -o eth1 -j MASQUERADE",
    "-A POSTROUTING -j SNAT --to-source 10.0.0.1-10.0.0.3",
    "-A POSTROUTING -m set --match-set foo src -j MASQUERADE",
    "-A POSTROUTING -p tcp -j REDIRECT --to-ports 1",
)


#: Rules of the hooks a packet looping back over lo meets after nat POSTROUTING (table, rule) that read
#: what the stage may change: the proof must run the stage before them (or show they fail anyway).
OBSERVERS = (
    ("filter", "-A INPUT -s 127.0.0.1/32 -p tcp -m tcp --dport 15001 -j DROP"),
    ("filter", "-A INPUT -m mark --mark 0x4000/0x4000 -j REJECT"),
    ("filter", "-A INPUT -m conntrack --ctstate SNAT -j DROP"),
    ("filter", "-A INPUT -m connmark --mark 0x10/0x10 -j DROP"),
    ("filter", "-A INPUT -p tcp -m tcp --sport 1024:2000 -j DROP"),
    ("filter", "-A INPUT ! -s 10.0.0.0/8 -d 10.0.0.5/32 -p tcp -m tcp --dport 8080 -j DROP"),
    ("mangle", "-A PREROUTING -i lo -m mark --mark 0x4000/0x4000 -j MARK --set-xmark 0x8/0x8"),
    ("mangle", "-A INPUT -m mark --mark 0x8/0x8 -j DROP"),
    ("mangle", "-A INPUT -s 10.0.0.5/32 -j CONNMARK --set-xmark 0x20/0x20"),
)
#: Rules of nat chains that only rewrite the mark (the proof decides them when the mark is read), some
#: that do more, and rules that read the mark afterwards.
MARKERS = (
    ("nat", "-A OUTPUT -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x8/0x8"),
    ("nat", "-A OUTPUT -d 10.96.0.0/12 -j KUBE-MARK-MASQ"),
    ("nat", "-A OUTPUT -m mark --mark 0x8/0x8 -j MARK --set-xmark 0x1/0x1"),
    ("nat", "-A OUTPUT -m statistic --mode random --probability 0.5 -j MARK --set-xmark 0x2/0x2"),
    ("nat", "-A PREROUTING -s 10.0.0.0/8 -j MARK --set-xmark 0x4000/0x4000"),
    ("nat", "-A PREROUTING -p tcp -m tcp --sport 1000:2000 -j MARK --set-xmark 0x1/0x1"),
    ("filter", "-A OUTPUT -m mark --mark 0x8/0x8 -j DROP"),
    ("filter", "-A OUTPUT -m mark --mark 0x1/0x1 -p tcp -j REJECT"),
    ("mangle", "-A POSTROUTING -m mark --mark 0x4000/0x4000 -j DROP"),
    ("mangle", "-A POSTROUTING -m mark --mark 0x2/0x2 -j DROP"),
    ("filter", "-A INPUT -m mark --mark 0x4000/0x4000 -p tcp -m tcp --dport 15006 -j DROP"),
)


def dump(
    services: int,
    endpoints: int,
    containers: int,
    seed: int,
    extra: Sequence[tuple[int, str]],
    *,
    observers: Sequence[tuple[str, str]] = (),
) -> str:
    """A node dump with ``extra`` rules put at those positions among its nat POSTROUTING rules, and the
    ``observers`` at the end of their tables."""
    lines = node_dump(services=services, endpoints=endpoints, containers=containers, seed=seed).splitlines()
    nat = lines.index("*nat")
    at = [i for i, line in enumerate(lines) if i > nat and line.startswith("-A POSTROUTING")]
    for position, rule in sorted(extra, key=lambda item: -item[0]):
        where = at[position % len(at)] if at else lines.index("COMMIT", nat)
        lines.insert(where, rule)
    for table, rule in observers:
        lines.insert(lines.index("COMMIT", lines.index(f"*{table}")), rule)
    return "\n".join(lines) + "\n"


#: What a path shows: the properties violated, and for each step of the chain its verdict's kind and arrival.
Outcome = tuple[frozenset[str], tuple[str, ...]]


def kind(step: Step) -> str:
    verdict = step.evaluation.verdict
    detail = getattr(verdict, "local", getattr(verdict, "reject", ""))
    return f"{type(verdict).__name__}{detail} {step.arrival.value} {step.evaluation.first_oif}"


def explore(check: Checker) -> list[list[Leaf[Outcome]]]:
    """Per root of the class space, the leaves of the proof and what each path shows."""
    found = []
    for root in check.space.roots:
        symbols = check.space.symbols(root)

        def program(run: Run, root: Any = root, symbols: Any = symbols) -> Outcome:
            connection = check.space.connection(root, {d: run.value(d) for d in root.dims})
            chain = check.chain_of(connection, symbols=symbols, tracer=run)
            violated = frozenset(p.name for p, _ in check._violations(connection, chain, run))
            return violated, tuple(kind(step) for step in chain.steps)

        found.append(root.explorer().explore(program))
    return found


def differences(first: list[Leaf[Outcome]], second: list[Leaf[Outcome]]) -> list[str]:
    """Where two proofs over the same classes disagree: paths with the same choices whose regions meet."""
    out = []
    for a in first:
        for b in second:
            if a.choices != b.choices or a.result == b.result:
                continue
            if any(all(x & y for x, y in zip(box_a, box_b, strict=True)) for box_a in a.boxes for box_b in b.boxes):
                out.append(f"{a.example} {a.choices}: {a.result} against {b.result}")
    return out


def both(text: str) -> tuple[list[list[Leaf[Outcome]]], list[list[Leaf[Outcome]]]]:
    ruleset = read_iptables(text)
    _mesh, env = mesh_environment(ruleset)
    eager = checker(ruleset, env)
    eager.source_nat = True
    lazy = checker(ruleset, env)
    assert lazy.source_nat is False  # what check() and verify use
    # Regions are compared box by box: each explores every rule of its dispatch runs (mirrors have their own test).
    eager.interpreter.use_mirrors = lazy.interpreter.use_mirrors = False
    return explore(eager), explore(lazy)


def disagreements(text: str) -> list[str]:
    eager, lazy = both(text)
    assert len(eager) == len(lazy)
    return [d for e, z in zip(eager, lazy, strict=True) for d in differences(e, z)]


@settings(max_examples=25, deadline=None)
@given(
    services=st.integers(0, 2),
    endpoints=st.integers(1, 2),
    containers=st.integers(0, 2),
    seed=st.integers(0, 3),
    extra=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(POOL)), max_size=3),
    observers=st.lists(st.sampled_from(OBSERVERS + MARKERS), max_size=3),
)
def test_leaving_out_unobserved_source_nat_proves_the_same(
    *,
    services: int,
    endpoints: int,
    containers: int,
    seed: int,
    extra: list[tuple[int, str]],
    observers: list[tuple[str, str]],
) -> None:
    assert disagreements(dump(services, endpoints, containers, seed, extra, observers=observers)) == []


@pytest.mark.parametrize("rule", POOL)
def test_each_pool_rule_on_its_own(rule: str) -> None:
    assert disagreements(dump(1, 2, 1, 0, [(0, rule)])) == []


@pytest.mark.parametrize("observer", OBSERVERS + MARKERS, ids=[rule for _table, rule in OBSERVERS + MARKERS])
def test_each_observer_after_masquerading(observer: tuple[str, str]) -> None:
    extra = [(0, "-A POSTROUTING -j CONNMARK --set-xmark 0x10/0x10"), (0, "-A POSTROUTING -o lo -j MASQUERADE")]
    assert disagreements(dump(1, 1, 1, 0, extra, observers=[observer])) == []


def test_the_shortcut_saves_paths_on_a_node_dump() -> None:
    eager, lazy = both(dump(3, 2, 2, 0, []))
    assert sum(map(len, lazy)) < sum(map(len, eager)) * 0.9


def test_the_comparison_catches_a_stage_left_out_that_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken summary that lets a stage with a DROP be left out: the comparison finds the difference."""
    text = dump(1, 1, 0, 0, [(0, "-A POSTROUTING -p tcp -m tcp --dport 8080 -j DROP")])
    assert disagreements(text) == []
    summary = interpreter_module._SourceNatSummary(masquerade=False, mark_tests=(), visits=0)
    monkeypatch.setattr(interpreter_module, "_summarise_source_nat", lambda _interpreter, _stage: summary)
    found = disagreements(text)
    assert found and all("Dropped" in d and "Passed" in d for d in found)


def test_the_comparison_catches_a_stage_left_out_that_a_later_rule_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken shortcut that never runs the stage left for later: a rule of INPUT that reads the source
    MASQUERADE wrote on lo sees the old one, and the comparison finds the difference."""
    text = dump(1, 1, 0, 0, [(0, "-A POSTROUTING -o lo -j MASQUERADE")], observers=[OBSERVERS[0]])
    assert disagreements(text) == []

    def forget(run: Any) -> None:
        run.pending = None

    monkeypatch.setattr(interpreter_module._Run, "_force", forget)
    found = disagreements(text)
    assert found and all("Dropped" in d for d in found)


@pytest.mark.parametrize("reader", [rule for rule in MARKERS if rule[0] != "nat"], ids=lambda rule: rule[1])
def test_each_mark_rewrite_with_each_reader(reader: tuple[str, str]) -> None:
    writers = [rule for rule in MARKERS if rule[0] == "nat"]
    assert disagreements(dump(1, 1, 0, 0, [], observers=[*writers, reader])) == []


def test_the_comparison_catches_a_mark_rewrite_left_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken shortcut that decides a rule left for later but never rewrites the mark: a later test of
    the mark sees the old one, and the comparison finds the difference."""
    text = dump(1, 1, 0, 0, [], observers=[MARKERS[0], MARKERS[6]])
    assert disagreements(text) == []

    def undone(run: Any, item: Any) -> None:
        run._rule_matches(item.rule)

    monkeypatch.setattr(interpreter_module._Run, "_mark_rule", undone)
    found = disagreements(text)
    assert found and all("Dropped" in d for d in found)
