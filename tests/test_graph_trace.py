"""``meshredirect graph --trace`` and ``graph FILE``: the highlighted path is exactly the traced one.

The check reads the diagram as Graphviz lays it out (``dot -Tjson``) and
compares what it colours with what :func:`meshredirect.semantics.evaluate`'s
trace says, for generated policies and connections: the rows coloured (or
tagged, with several connections) are exactly the rules each connection was
tested against, the strong ones exactly those that matched, the headers
exactly the chains it entered, and the coloured arrows exactly the jumps it
took and the base chains it entered from a hook. The checker is shown to fail
on broken diagrams. Goldens pin two traced diagrams (``pytest --update-goldens``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshredirect.compiler import compile_policy
from meshredirect.graph import _PALETTES, Highlight, chain_node, hook_node, to_dot
from meshredirect.ir import Goto, Jump, Ruleset
from meshredirect.policy import Policy
from meshredirect.semantics.interpreter import ChainEnd, Evaluation, Interpreter, MatchResult, RuleVisit
from meshredirect.semantics.model import Environment
from meshredirect.semantics.proxy import follow
from meshredirect.testing.strategies import connections, policies
from test_graph import layout, run

GOLDEN = Path(__file__).parent / "golden" / "graph"

#: name -> the command line of a traced diagram kept as a golden.
_INBOUND = ["--origin", "remote", "--src", "10.0.0.9", "--dst", "10.0.0.5", "--dport", "8080"]
GOLDEN_TRACES: dict[str, list[str]] = {
    "trace-outbound-follow": ["--trace", "--dst", "93.184.216.34", "--dport", "443", "--follow"],
    "trace-inbound-follow": ["--trace", *_INBOUND, "--follow"],
    "trace-tproxy-dual-stack": [
        "--trace",
        "--dst",
        "2001:db8::1",
        "--dport",
        "443",
        "--family",
        "both",
        "-m",
        "TPROXY",
    ],
}


# ----------------------------------------------------------------------------- what a trace says


@attrs.frozen
class Path_:
    """What one connection's trace says, in the diagram's names: rows are (chain node, 0-based index)."""

    entered: frozenset[str]
    tested: frozenset[tuple[str, int]]
    matched: frozenset[tuple[str, int]]


def path_of(evaluation: Evaluation) -> Path_:
    entered, tested, matched = set(), set(), set()
    for entry in evaluation.trace:
        if isinstance(entry, (RuleVisit, ChainEnd)):
            entered.add(chain_node(entry.family, entry.table, entry.chain))
        if isinstance(entry, RuleVisit):
            row = (chain_node(entry.family, entry.table, entry.chain), entry.index - 1)
            tested.add(row)
            if entry.result is MatchResult.MATCHED:
                matched.add(row)
    return Path_(frozenset(entered), frozenset(tested), frozenset(matched))


# ----------------------------------------------------------------------------- what the diagram shows

_ROW = re.compile(r'<TD PORT="r(\d+)" ALIGN="LEFT"(?: BGCOLOR="([^"]+)")?>(.*?)</TD>')
_HEADER = re.compile(r'<TD PORT="h" ALIGN="LEFT" BGCOLOR="([^"]+)">')
_TAG = re.compile(r"\[(\d+)(: matched)?\]")


def highlight_problems(ruleset: Ruleset, paths: list[Path_], graph: dict[str, Any]) -> list[str]:
    """Where a laid-out diagram's colours differ from the traced paths; empty when they agree exactly."""
    problems: list[str] = []
    palettes = [_PALETTES[i % len(_PALETTES)] for i in range(len(paths))]
    objects = graph.get("objects", [])
    nodes = {obj["_gvid"]: obj for obj in objects[graph.get("_subgraph_cnt", 0) :]}
    by_name = {obj["name"]: obj for obj in nodes.values()}
    for table in ruleset.tables:
        for chain in table.chains:
            name = chain_node(table.family, table.name, chain.name)
            label = by_name[name].get("label", "")
            entering = [p for p, path in zip(palettes, paths, strict=True) if name in path.entered]
            header = _HEADER.search(label)
            shown = header.group(1) if header else None
            if shown != (entering[0].header if entering else "#e8eaf6"):
                problems.append(f"{name}: header {shown}, entered by {len(entering)} path(s)")
            for match in _ROW.finditer(label):
                index, colour, text = int(match.group(1)), match.group(2), match.group(3)
                row = (name, index)
                tested = [i for i, path in enumerate(paths) if row in path.tested]
                matched = [i for i, path in enumerate(paths) if row in path.matched]
                expected_colour = (
                    palettes[matched[0]].matched if matched else palettes[tested[0]].tested if tested else None
                )
                if colour != expected_colour:
                    problems.append(f"{name} rule {index + 1}: colour {colour}, expected {expected_colour}")
                if len(paths) > 1:
                    tags = {(int(n) - 1, bool(m)) for n, m in _TAG.findall(text)}
                    expected_tags = {(i, i in matched) for i in tested}
                    if tags != expected_tags:
                        problems.append(
                            f"{name} rule {index + 1}: tags {sorted(tags)}, expected {sorted(expected_tags)}"
                        )
    for edge in graph.get("edges", []):
        if edge.get("style") == "invis":
            continue
        tail, head = nodes[edge["tail"]]["name"], nodes[edge["head"]]["name"]
        colours = edge["color"].split(":") if "color" in edge else []
        port = edge.get("tailport", "")
        if port.startswith("r"):
            row = (tail, int(port[1:].split(":")[0]))
            expected = [p.line for p, path in zip(palettes, paths, strict=True) if row in path.matched]
            what = f"jump {tail} rule {row[1] + 1} -> {head}"
        else:
            expected = [p.line for p, path in zip(palettes, paths, strict=True) if head in path.entered]
            what = f"hook {tail} -> {head}"
        if colours != expected:
            problems.append(f"{what}: colours {colours}, expected {expected}")
    for table in ruleset.tables:
        for chain in table.chains:
            if chain.base is None:
                continue
            hook = by_name[hook_node(table.family, chain.base.hook)]
            bases = {
                chain_node(t.family, t.name, c.name)
                for t in ruleset.tables
                if t.family is table.family
                for c in t.base_chains(chain.base.hook)
            }
            entering = [p for p, path in zip(palettes, paths, strict=True) if bases & path.entered]
            fill = hook.get("fillcolor")
            if fill != (entering[0].header if entering else "#eeeeee"):
                problems.append(f"{hook['name']}: fill {fill}, entered by {len(entering)} path(s)")
    return sorted(set(problems))


def _jumps_taken(ruleset: Ruleset, paths: list[Path_]) -> int:
    rows = set().union(*(path.matched for path in paths))
    return sum(
        1
        for table in ruleset.tables
        for chain in table.chains
        for index, rule in enumerate(chain.rules)
        if isinstance(rule.target, (Jump, Goto)) and (chain_node(table.family, table.name, chain.name), index) in rows
    )


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_highlighted_path_is_exactly_the_traced_one(data: st.DataObject) -> None:
    policy = data.draw(policies())
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    connection = data.draw(connections(env))
    evaluation = Interpreter(ruleset, env).evaluate(connection)
    dot = to_dot(ruleset, highlight=Highlight.of_trace(evaluation.trace, title=str(connection)))
    assert highlight_problems(ruleset, [path_of(evaluation)], layout(dot)) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_each_follow_up_connection_is_highlighted_in_its_own_colour(data: st.DataObject) -> None:
    policy = data.draw(policies())
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    chain = follow(Interpreter(ruleset, env), data.draw(connections(env)))
    paths = [path_of(step.evaluation) for step in chain.steps]
    dot = to_dot(ruleset, highlight=[Highlight.of_trace(step.evaluation.trace) for step in chain.steps])
    assert highlight_problems(ruleset, paths, layout(dot)) == []


def test_the_checker_fails_on_wrong_highlights() -> None:
    policy = Policy()
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    from meshredirect.semantics.model import Connection

    chain = follow(Interpreter(ruleset, env), Connection.local(env, dst="93.184.216.34", dport=443))
    paths = [path_of(step.evaluation) for step in chain.steps]
    assert len(paths) == 2 and _jumps_taken(ruleset, paths) == 2
    highlights = [Highlight.of_trace(step.evaluation.trace) for step in chain.steps]
    dot = to_dot(ruleset, highlight=highlights)
    assert highlight_problems(ruleset, paths, layout(dot)) == []
    one = to_dot(ruleset, highlight=highlights[0])
    assert highlight_problems(ruleset, paths[:1], layout(one)) == []
    # A path drawn against another's trace.
    assert "ipv4/nat/ISTIO_OUTPUT rule 4: colour #fff3e0, expected #ffb74d" in highlight_problems(
        ruleset, paths[1:], layout(one)
    )
    # A matched row shown as merely tested, an untouched row coloured, a tag lost.
    matched_row = '<TD PORT="r7" ALIGN="LEFT" BGCOLOR="#ffb74d">8. any -&gt; jump ISTIO_REDIRECT</TD>'
    assert matched_row in one
    assert highlight_problems(
        ruleset, paths[:1], layout(one.replace(matched_row, matched_row.replace("b74d", "f3e0")))
    ) == ["ipv4/nat/ISTIO_OUTPUT rule 8: colour #fff3e0, expected #ffb74d"]
    untouched = '<TD PORT="r0" ALIGN="LEFT">1. tcp dport'
    assert highlight_problems(
        ruleset, paths[:1], layout(one.replace(untouched, untouched.replace('LEFT"', 'LEFT" BGCOLOR="#fff3e0"')))
    ) == ["ipv4/nat/ISTIO_INBOUND rule 1: colour #fff3e0, expected None"]
    assert highlight_problems(ruleset, paths, layout(dot.replace(">[2: matched]</B>", ">[2]</B>", 1))) == [
        "ipv4/nat/OUTPUT rule 1: tags [(0, True), (1, False)], expected [(0, True), (1, True)]"
    ]
    # An arrow not coloured, or coloured for a path that did not take it; a header not coloured.
    jump = '[label="jump", color="#e65100", fontcolor="#e65100", penwidth=2.5]'
    assert highlight_problems(ruleset, paths[:1], layout(one.replace(jump, '[label="jump"]'))) == [
        "jump ipv4/nat/ISTIO_OUTPUT rule 8 -> ipv4/nat/ISTIO_REDIRECT: colours [], expected ['#e65100']",
        "jump ipv4/nat/OUTPUT rule 1 -> ipv4/nat/ISTIO_OUTPUT: colours [], expected ['#e65100']",
    ]
    assert "ipv4/nat/ISTIO_OUTPUT rule 4: colour #64b5f6, expected #fff3e0" in highlight_problems(
        ruleset, paths[:1], layout(dot)
    )
    header = 'BGCOLOR="#ffcc80"><B>ISTIO_REDIRECT</B>'
    assert header in one
    assert highlight_problems(ruleset, paths[:1], layout(one.replace(header, header.replace("ffcc80", "e8eaf6")))) == [
        "ipv4/nat/ISTIO_REDIRECT: header #e8eaf6, entered by 1 path(s)"
    ]


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("name", sorted(GOLDEN_TRACES))
def test_traced_diagram_matches_golden(capsys: pytest.CaptureFixture[str], name: str, update_goldens: bool) -> None:
    status, text, err = run(capsys, "graph", *GOLDEN_TRACES[name])
    assert (status, err) == (0, "")
    path = GOLDEN / f"{name}.dot"
    if update_goldens:
        path.write_text(text)
    assert path.exists(), f"no golden for {name}: run pytest --update-goldens"
    assert text == path.read_text()


def test_graph_trace_titles_each_connection_with_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "graph", *GOLDEN_TRACES["trace-outbound-follow"])
    assert status == 0
    assert (
        '<FONT COLOR="#e65100">1. tcp 10.0.0.5:43210 -&gt; 93.184.216.34:443 local uid=1000 gid=1000 out eth0: '
        "redirected to 127.0.0.1:15001; the proxy opens connection 2</FONT>" in out
    )
    assert (
        '<FONT COLOR="#1565c0">2. tcp 10.0.0.5:43210 -&gt; 93.184.216.34:443 local uid=1337 gid=1337 out eth0: '
        "passed to 93.184.216.34:443 (sent out)</FONT>" in out
    )
    status, out, _ = run(capsys, "graph", "--trace", "--dst", "93.184.216.34", "--dport", "443")
    assert status == 0
    assert (
        "label=<tcp 10.0.0.5:43210 -&gt; 93.184.216.34:443 local uid=1000 gid=1000 out eth0: "
        "redirected to 127.0.0.1:15001>;" in out
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dst", "10.0.0.1"], "--dst: expected --trace with the connection's flags, got '10.0.0.1'"),
        (["--uid", "1337"], "--uid: expected --trace with the connection's flags, got '1337'"),
        (["--follow"], "--follow: expected --trace (the connection whose follow-ups to draw), got 'no --trace'"),
        (["--trace"], "--trace: expected the connection's --dst, got 'no --dst'"),
        (["--trace", "--dst", "nonsense"], "--dst: expected an IPv4 or IPv6 address, got 'nonsense'"),
        (["--trace", "--dst", "10.0.0.5", "--dport", "0"], "--dport: expected a number 1-65535, got '0'"),
        (
            ["--trace", "--dst", "10.0.0.5", "--in-if", "eth0", "--out-if", "lo"],
            "--out-if: expected no value for a remote connection (use --in-if), got 'lo'",
        ),
    ],
)
def test_graph_trace_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run(capsys, "graph", *argv)
    assert (status, out) == (2, "")
    assert err == f"meshredirect graph: error: {message}\n"


def test_graph_draws_an_nft_json_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from meshredirect.api import render
    from meshredirect.readers.nftables import read_nft_json

    document = render(compile_policy(Policy()), "nftables-json").artifacts[0].content
    rules = tmp_path / "rules.json"
    rules.write_text(document)
    status, out, err = run(capsys, "graph", str(rules))
    assert (status, err) == (0, "")
    assert out == to_dot(read_nft_json(document, path=str(rules)))
    assert '"ipv4/istio/nat-ISTIO_OUTPUT":r7:e -> "ipv4/istio/nat-ISTIO_REDIRECT":h:w' in out
    status, traced, _ = run(capsys, "graph", str(rules), "--trace", "--dst", "93.184.216.34", "--dport", "443")
    assert status == 0 and "redirected to 127.0.0.1:15001>;" in traced
    assert '<TD PORT="r7" ALIGN="LEFT" BGCOLOR="#ffb74d">8. any -&gt; jump nat-ISTIO_REDIRECT</TD>' in traced


def test_graph_draws_an_iptables_save_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from meshredirect.api import render
    from meshredirect.readers.iptables import read_iptables

    text = render(compile_policy(Policy(inbound_mode="TPROXY")), "iptables-save").text()
    rules = tmp_path / "saved.rules"
    rules.write_text(text)
    status, out, err = run(capsys, "graph", str(rules))
    assert (status, err) == (0, "")
    read = read_iptables(text, path=str(rules))
    assert out == to_dot(read)
    assert '"ipv4/mangle/ISTIO_INBOUND":r6:e -> "ipv4/mangle/ISTIO_TPROXY":h:w' in out
    # --trace on rules read from a file: the pod has policy routing for the TPROXY mark the rules set.
    argv = ["--trace", "--in-if", "eth0", "--dst", "10.0.0.5", "--dport", "8080", "--follow"]
    status, traced, _ = run(capsys, "graph", str(rules), *argv)
    assert status == 0
    assert "remote in eth0: TPROXY to 10.0.0.5:15006 with mark 0x539; the proxy opens connection 2" in traced
    assert "[2: matched]" in traced


def test_graph_reads_standard_input(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from meshredirect.api import render

    document = render(compile_policy(Policy()), "nftables-json").artifacts[0].content
    monkeypatch.setattr("sys.stdin", io.StringIO(document))
    status, out, _ = run(capsys, "graph", "-")
    assert status == 0 and "nat-ISTIO_REDIRECT" in out


def test_graph_file_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(
        '{"nftables": [\n  {"table": {"family": "ip", "name": "x", "handle": 1}},\n'
        '  {"chain": {"family": "ip", "table": "x", "name": 5}}\n]}\n'
    )
    status, out, err = run(capsys, "graph", str(broken))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect graph: error: {broken}:3:3: expected a chain with family, table, name, "
        'got {"family": "ip", "table": "x", "name": 5}\n'
        '      {"chain": {"family": "ip", "table": "x", "name": 5}}\n'
        "      ^\n"
    )
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"nftables": [\n  {"table": {"family": "ip", "name": "x"}\n')
    status, out, err = run(capsys, "graph", str(truncated))
    assert (status, out) == (2, "")
    assert err.startswith(f"meshredirect graph: error: {truncated}:")
    assert err.endswith("^\n")
    missing = tmp_path / "missing.json"
    status, out, err = run(capsys, "graph", str(missing))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect graph: error: rule file: expected a readable file (No such file or directory), got '{missing}'\n"
    )
    unfinished = tmp_path / "unfinished.rules"
    unfinished.write_text("*nat\n-A OUTPUT -p tcp -j REDIRECT --to-ports 15001\n")
    status, out, err = run(capsys, "graph", str(unfinished))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect graph: error: {unfinished}:2:1: expected COMMIT before the end of the input "
        "(table nat opened at line 1)\n"
        "    -A OUTPUT -p tcp -j REDIRECT --to-ports 15001\n"
        "    ^\n"
    )
    target = tmp_path / "out.svg"
    status, _, _ = run(capsys, "graph", str(broken), "-O", str(target))
    assert status == 2 and not target.exists()
