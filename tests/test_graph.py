"""``meshredirect graph``: the DOT diagram holds every chain, rule and jump, as Graphviz itself reads it.

The structure is checked on Graphviz's own reading of the text (``dot -Tjson``),
not on the text: every chain is a node with one row per rule, every jump and
goto an edge from the rule's row to the chain it enters, every base chain an
edge from its hook, and nothing else. The checker is shown to fail on broken
diagrams. Goldens pin the text for a few policies (``pytest --update-goldens``).
"""

from __future__ import annotations

import html
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.graph import (
    ChainRef,
    Highlight,
    RuleRef,
    chain_node,
    describe_match,
    describe_rule,
    describe_target,
    hook_node,
    jumps,
    to_dot,
)
from meshredirect.ir import (
    Chain,
    Family,
    Goto,
    Hook,
    Jump,
    Rule,
    Ruleset,
    Table,
    iptables_base_chain,
)
from meshredirect.policy import Policy
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS
from meshredirect.testing.strategies import policies

GOLDEN = Path(__file__).parent / "golden" / "graph"

GOLDEN_POLICIES: dict[str, Policy] = {
    "default": Policy(),
    "dual-stack-tproxy-dns": Policy(
        families="both", inbound_mode="TPROXY", dns={"enabled": True, "servers": ["10.96.0.10", "fd00::a"]}
    ),
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def layout(dot_text: str) -> dict[str, Any]:
    """Graphviz's own reading of a DOT text (fails the test on a syntax error)."""
    result = subprocess.run(["dot", "-Tjson"], input=dot_text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def diagram_problems(ruleset: Ruleset, graph: dict[str, Any]) -> list[str]:
    """What a laid-out diagram misses or adds compared with the ruleset; empty when it shows it exactly."""
    problems: list[str] = []
    objects = graph.get("objects", [])
    nodes = {obj["_gvid"]: obj for obj in objects[graph.get("_subgraph_cnt", 0) :]}
    by_name = {obj["name"]: obj for obj in nodes.values()}
    seen_edges = {
        (nodes[e["tail"]]["name"], e.get("tailport", ""), nodes[e["head"]]["name"], e.get("label", ""))
        for e in graph.get("edges", [])
        if e.get("style") != "invis"
    }
    expected_edges: set[tuple[str, str, str, str]] = set()
    for table in ruleset.tables:
        for chain in table.chains:
            name = chain_node(table.family, table.name, chain.name)
            node = by_name.get(name)
            if node is None:
                problems.append(f"chain {name} has no node")
                continue
            label = node.get("label", "")
            for index, rule in enumerate(chain.rules):
                row = f'PORT="r{index}"'
                if row not in label:
                    problems.append(f"rule {index + 1} of {name} has no row")
                elif html.escape(describe_rule(rule)) not in label:
                    problems.append(f"rule {index + 1} of {name} is not described in its row")
            if f'PORT="r{len(chain.rules)}"' in label:
                problems.append(f"chain {name} shows more rows than it has rules")
            if chain.base is not None:
                hook = hook_node(table.family, chain.base.hook)
                from_hook = {edge for edge in seen_edges if edge[0] == hook and edge[2] == name}
                if not from_hook:
                    problems.append(f"base chain {name} has no edge from {hook}")
                expected_edges.update(from_hook)
    for rule, target, kind in jumps(ruleset):
        tail = chain_node(rule.family, rule.table, rule.chain)
        head = chain_node(target.family, target.table, target.chain)
        edge = (tail, f"r{rule.index}:e", head, kind)
        expected_edges.add(edge)
        if edge not in seen_edges:
            problems.append(f"{kind} from rule {rule.index + 1} of {tail} to {head} has no edge")
        if head not in by_name:
            problems.append(f"{kind} target {head} has no node")
    problems.extend(
        f"edge {tail}:{port} -> {head} shows nothing" for tail, port, head, _ in seen_edges - expected_edges
    )
    return problems


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", sorted(GOLDEN_POLICIES))
def test_diagram_matches_golden(name: str, update_goldens: bool) -> None:
    text = to_dot(compile_policy(GOLDEN_POLICIES[name]))
    path = GOLDEN / f"{name}.dot"
    if update_goldens:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden for {name}: run pytest --update-goldens"
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(GOLDEN_POLICIES))
def test_every_chain_rule_and_jump_is_drawn(name: str) -> None:
    ruleset = compile_policy(GOLDEN_POLICIES[name])
    assert diagram_problems(ruleset, layout(to_dot(ruleset))) == []


@settings(max_examples=25, deadline=None)
@given(policies())
def test_every_generated_policy_is_drawn_exactly(policy: Policy) -> None:
    ruleset = compile_policy(policy)
    assert diagram_problems(ruleset, layout(to_dot(ruleset))) == []


def test_checker_fails_on_broken_diagrams() -> None:
    ruleset = compile_policy(Policy())
    text = to_dot(ruleset)
    jump_line = next(line for line in text.splitlines() if ":r7:e ->" in line)
    assert diagram_problems(ruleset, layout(text.replace(jump_line + "\n", ""))) == [
        "jump from rule 8 of ipv4/nat/ISTIO_OUTPUT to ipv4/nat/ISTIO_REDIRECT has no edge"
    ]
    hook_line = next(line for line in text.splitlines() if line.strip().startswith('"ipv4/hook/OUTPUT" ->'))
    assert diagram_problems(ruleset, layout(text.replace(hook_line + "\n", ""))) == [
        "base chain ipv4/nat/OUTPUT has no edge from ipv4/hook/OUTPUT"
    ]
    row = '<TR><TD PORT="r3" ALIGN="LEFT">4. uid 1337 → RETURN</TD></TR>'
    assert row in text
    assert diagram_problems(ruleset, layout(text.replace(row, ""))) == ["rule 4 of ipv4/nat/ISTIO_OUTPUT has no row"]
    assert diagram_problems(ruleset, layout(text.replace("4. uid 1337", "4. uid 1338"))) == [
        "rule 4 of ipv4/nat/ISTIO_OUTPUT is not described in its row"
    ]
    extra = text.replace("}\n}\n", '"ipv4/nat/OUTPUT":r0:e -> "ipv4/nat/ISTIO_INBOUND":h:w;\n}\n}\n')
    assert diagram_problems(ruleset, layout(extra)) == [
        "edge ipv4/nat/OUTPUT:r0:e -> ipv4/nat/ISTIO_INBOUND shows nothing"
    ]
    node = next(line for line in text.splitlines() if line.strip().startswith('"ipv4/nat/ISTIO_REDIRECT" ['))
    assert "ipv4/nat/ISTIO_REDIRECT has no node" in " ".join(
        diagram_problems(ruleset, layout(text.replace(node + "\n", "").replace('"ipv4/nat/ISTIO_REDIRECT"', '"x"')))
    )


def _table(*chains: Chain) -> Ruleset:
    return Ruleset(tables=(Table(family=Family.IPV4, name="nat", chains=chains),))


def test_goto_is_dashed_and_a_missing_chain_is_drawn_as_missing() -> None:
    ruleset = _table(
        Chain(
            name="OUTPUT",
            base=iptables_base_chain("nat", Hook.OUTPUT),
            rules=(Rule(target=Goto(chain="MESH")), Rule(target=Jump(chain="GONE"))),
        ),
        Chain(name="MESH"),
    )
    text = to_dot(ruleset)
    assert '"ipv4/nat/OUTPUT":r0:e -> "ipv4/nat/MESH":h:w [label="goto", style=dashed];' in text
    assert "GONE<BR/>(no such chain)" in text
    assert "<I>no rules</I>" in text
    assert diagram_problems(ruleset, layout(text)) == []


def test_hooks_come_in_netfilter_order_and_base_chains_in_priority_order() -> None:
    ruleset = compile_policy(Policy(inbound_mode="TPROXY", dns={"enabled": True, "capture_all": True}))
    text = to_dot(ruleset)
    hook_edges = [line.strip() for line in text.splitlines() if line.strip().startswith('"ipv4/hook/OUTPUT" ->')]
    assert [edge.split('label="')[1].split('"')[0] for edge in hook_edges] == [
        "1. raw (-300)",
        "2. mangle (-150)",
        "3. nat (-100)",
    ]
    assert text.index('"ipv4/hook/PREROUTING" [') < text.index('"ipv4/hook/OUTPUT" [')


def test_the_highlighted_path_is_coloured() -> None:
    ruleset = compile_policy(Policy())
    nat = dict(family=Family.IPV4, table="nat")
    tested = [RuleRef(**nat, chain="ISTIO_OUTPUT", index=i) for i in range(8)]  # type: ignore[arg-type]
    matched = [
        RuleRef(**nat, chain="OUTPUT", index=0),  # type: ignore[arg-type]
        RuleRef(**nat, chain="ISTIO_OUTPUT", index=7),  # type: ignore[arg-type]
        RuleRef(**nat, chain="ISTIO_REDIRECT", index=0),  # type: ignore[arg-type]
    ]
    entered = [ChainRef(**nat, chain=c) for c in ("OUTPUT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")]  # type: ignore[arg-type]
    text = to_dot(
        ruleset, highlight=Highlight(title="app -> 10.0.0.1:80", entered=entered, tested=tested, matched=matched)
    )
    assert "label=<app -&gt; 10.0.0.1:80>;" in text
    assert '<TD PORT="r7" ALIGN="LEFT" BGCOLOR="#ffb74d">8. any → jump ISTIO_REDIRECT</TD>' in text
    assert '<TD PORT="r3" ALIGN="LEFT" BGCOLOR="#fff3e0">4. uid 1337 → RETURN</TD>' in text
    assert '<TD PORT="r0" ALIGN="LEFT">1. tcp dport {15008, 15020-15021, 15090} → RETURN</TD>' in text
    assert '"ipv4/nat/ISTIO_OUTPUT":r7:e -> "ipv4/nat/ISTIO_REDIRECT":h:w [label="jump", color="#e65100"' in text
    assert '"ipv4/nat/ISTIO_OUTPUT":r1:e -> "ipv4/nat/ISTIO_IN_REDIRECT":h:w [label="jump"];' in text
    assert '"ipv4/hook/OUTPUT" [shape=box, style="rounded,filled", fillcolor="#ffcc80", color="#e65100"' in text
    assert '"ipv4/hook/PREROUTING" [shape=box, style="rounded,filled", fillcolor="#eeeeee", label' in text
    assert diagram_problems(ruleset, layout(text)) == []


# ----------------------------------------------------------------------------- notation


def test_every_sample_node_has_its_own_description() -> None:
    for samples, describe in ((SAMPLE_MATCHES, describe_match), (SAMPLE_TARGETS, describe_target)):
        texts = [describe(node) for nodes in samples.values() for node in nodes]  # type: ignore[operator]
        assert all(texts), texts
        assert len(set(texts)) == len(texts), sorted(texts)


def test_descriptions_are_pinned() -> None:
    texts = {describe_match(node) for nodes in SAMPLE_MATCHES.values() for node in nodes}
    assert {
        "src 127.0.0.6/32",
        "dst != 127.0.0.0/8",
        "tcp dport != 15008",
        "udp sport 15053",
        "oif lo",
        "iif != eth+",
        "uid 1337",
        "gid != {101, 202}",
        "mark & 0xff != 0x53a",
        "ctstate RELATED,ESTABLISHED",
        "ctstate != INVALID",
        "dst type LOCAL",
        "dst in ipset mesh-excluded",
        "random 0.5",
        "every 3 from 1",
        "unknown iptables match: -m pkttype --pkt-type unicast",
    } <= texts
    targets = {describe_target(node) for nodes in SAMPLE_TARGETS.values() for node in nodes}
    assert {
        "REDIRECT :15001",
        "TPROXY :15006 mark 1337",
        "TPROXY 127.0.0.1:15006 mark 0x1/0x1",
        "MARK set 1338",
        "CONNMARK save",
        "CT zone 2",
        "MASQUERADE :1024-2048",
        "SNAT to 10.0.0.1",
        "DNAT to 10.244.1.5 :8080",
        "REJECT with tcp-reset",
        "LOG 'mesh: '",
        "LOG level 6",
        "unknown iptables target: NOTRACK",
    } <= targets


# ----------------------------------------------------------------------------- command line


def test_graph_prints_dot_of_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "graph")
    assert (status, err) == (0, "")
    assert out == (GOLDEN / "default.dot").read_text()
    status, out, _ = run(capsys, "graph", "--family", "both", "-x", "10.96.0.0/12")
    assert status == 0 and "cluster_ipv6" in out and "dst 10.96.0.0/12 → RETURN" in out


def test_graph_writes_svg(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "rules.svg"
    status, out, err = run(capsys, "graph", "--output", str(target))
    assert (status, out, err) == (0, "", "")
    svg = ET.fromstring(target.read_text())
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {"".join(t.itertext()) for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {"ISTIO_OUTPUT", "ISTIO_REDIRECT", "1. proto tcp → REDIRECT :15001"} <= texts
    status, out, _ = run(capsys, "graph", "-T", "svg")
    assert status == 0 and out.startswith("<?xml")


def test_graph_without_graphviz_says_what_to_install(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    target = tmp_path / "rules.svg"
    status, out, err = run(capsys, "graph", "--output", str(target))
    assert (status, out) == (3, "")
    assert err == (
        "meshredirect graph: error: Graphviz's 'dot' program is not installed; it is needed for SVG output "
        "(install the Debian package graphviz, or use --format dot)\n"
    )
    assert not target.exists()
    status, out, _ = run(capsys, "graph", "--format", "dot")
    assert status == 0 and out.startswith("digraph")


def test_graph_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, "graph", "-p", "0")
    assert (status, out) == (2, "")
    assert err == "meshredirect graph: error: outbound_port: expected a port number 1-65535, got '0'\n"
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "graph", "--format", "png")
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.endswith(
        "meshredirect graph: error: argument --format/-T: invalid choice: 'png' (choose from 'dot', 'svg')\n"
    )
    status, out, err = run(capsys, "graph", "--output", str(tmp_path / "missing" / "x.dot"))
    assert (status, out) == (3, "")
    assert (
        err == f"meshredirect graph: error: cannot write {tmp_path / 'missing' / 'x.dot'}: No such file or directory\n"
    )


# ----------------------------------------------------------------------------- the README's picture

README_SVG = Path(__file__).resolve().parent.parent / "docs" / "_static" / "graph" / "default.svg"


def _svg_texts(svg_text: str) -> list[str]:
    svg = ET.fromstring(svg_text)
    return sorted("".join(t.itertext()) for t in svg.iter("{http://www.w3.org/2000/svg}text"))


def test_the_readme_picture_is_the_default_policy(update_goldens: bool) -> None:
    """The SVG the README shows is `meshredirect graph` of the default policy (regenerate with --update-goldens).

    Compared by the text it shows, not byte for byte: Graphviz's layout may differ between its versions.
    """
    from meshredirect.commands.graph import svg_from_dot

    fresh = svg_from_dot(to_dot(compile_policy(Policy())))
    if update_goldens:
        README_SVG.parent.mkdir(parents=True, exist_ok=True)
        README_SVG.write_text(fresh)
    assert README_SVG.exists(), "no picture for the README: run pytest --update-goldens"
    assert _svg_texts(README_SVG.read_text()) == _svg_texts(fresh)
    readme = (README_SVG.parents[3] / "README.md").read_text()
    assert "(docs/_static/graph/default.svg)" in readme
