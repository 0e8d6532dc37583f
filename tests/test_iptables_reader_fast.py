"""The iptables reader's fast path (lines split without lark) reads exactly what lark's parse reads.

The fast path splits text made of the simple line shapes with the grammar's own terminal patterns and hands
anything it is not sure of to lark. Proof that this changes nothing: for generated and real inputs, the fast
path takes exactly the texts lark takes, into lark's line objects, and the whole reading (ruleset and rule
positions, or SourceError with its message, position and caret) is the same with the fast path on and off. Inputs: documents generated from
the grammar (``hypothesis.extra.lark``), byte-level mutations of real rule files, lines assembled from the
lexically tricky pieces (quotes, escapes, odd white space, words glued to counters), the iptables-save
backend's output of generated rulesets, and every real file (Istio's restore files, the seed, the golden
files, node dumps). The check itself is shown to catch a broken fast path.

The same check covers the rule plans (a rule of a shape read before is read from that shape's plan, with its own
values put in): the reference reading parses every rule in full. Rules of one shape are shown to read back their
own values, and the check to catch a plan that puts in another rule's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conformance import ISTIO, SEED
from iptables_strategies import iptables_rulesets
from meshredirect.api import render
from meshredirect.errors import SourceError, SourcePosition, UnsupportedError
from meshredirect.ir import (
    AddressMatch,
    AddressRange,
    Direction,
    Dnat,
    Family,
    Goto,
    Jump,
    PortMatch,
    Protocol,
    Ruleset,
)
from meshredirect.readers import _iptables_spec, iptables
from meshredirect.readers.iptables import read_iptables
from meshredirect.testing.node_dump import ISTIO_NAT, node_dump
from meshredirect.values import AddressSet, PortSet
from test_iptables_reader_fuzz import SEEDS, _lark_documents, mutated

GROUPS = {"java": 1001, "ftp": 1002}
GOLDEN = Path(__file__).parent / "golden"


@contextmanager
def lark_only() -> Iterator[None]:
    """Every text goes to lark, as before the fast path."""
    saved = iptables._fast_path
    iptables._fast_path = False
    try:
        yield
    finally:
        iptables._fast_path = saved


@contextmanager
def every_rule_parsed() -> Iterator[None]:
    """Every rule specification is parsed in full, as before the plans."""
    saved = _iptables_spec._shape_plans
    _iptables_spec._shape_plans = False
    try:
        yield
    finally:
        _iptables_spec._shape_plans = saved


def reading(text: str, **options: Any) -> tuple[Ruleset, list[SourcePosition | None]] | str:
    """The ruleset and where each rule was read (rulesets compare without positions), or the error as the
    user sees it (message, position, line and caret)."""
    try:
        ruleset = read_iptables(text, path="in.rules", **options)
    except SourceError as error:
        return f"SourceError: {error}"
    return ruleset, [rule.position for _, _, rule in ruleset.rules()]


def check_same(text: str, **options: Any) -> bool:
    """Both paths give the same lines and the same reading; True when the fast path took the text.

    The fast path also takes every text lark takes (so lark is only ever needed to explain an error). The
    reference reading also parses every rule in full (no plans)."""
    fast_lines = iptables._fast_lines(text)
    try:
        lark_lines = iptables._parser().parse(text)
    except Exception as exc:  # lark's error: the fast path must have declined
        assert fast_lines is None, f"the fast path took text lark refuses ({type(exc).__name__}): {text!r}"
    else:
        assert fast_lines is not None, f"the fast path declined text lark takes: {text!r}"
        assert fast_lines == lark_lines, f"different lines for {text!r}"
    fast = reading(text, **options)
    with lark_only(), every_rule_parsed():
        slow = reading(text, **options)
    assert fast == slow, f"different readings for {text!r}:\n{fast}\n{slow}"
    return fast_lines is not None


# ----------------------------------------------------------------------------- generated inputs


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_lark_documents())
def test_documents_from_the_grammar_read_the_same(text: str) -> None:
    check_same(text)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_mutated_real_files_read_the_same(text: str) -> None:
    check_same(text, groups=GROUPS)


#: Pieces whose lexing is delicate: command words alone and glued, rule numbers, quoted parts with spaces and
#: escapes (closed and not), counters glued to words, white space the grammar ignores and white space it does
#: not, and the characters that start the other line shapes.
_PIECES = [
    "-A", "--append", "-I", "--insert", "-R", "-D", "-N", "-X", "-F", "-Z", "-P", "-E", "--rename-chain",
    "-Afoo", "-A-A", "COMMIT", "COMMITX", "*", "*nat", ":", ":OUTPUT", "#", "# x", "[0:0]", "[1:2]x", "[a:0]",
    "OUTPUT", "MESH", "ACCEPT", "ACCEPT[0:0]", "-", "1", "12", "0", "1x", "٣", "-p", "tcp", "-j", "RETURN",
    "--dport", "80", "-m", "comment", "--comment", '"a b"', '""', '"a\\" b"', '"a\\\\"', 'x"y z"w', '"open',
    'a"', '"a"b"', "\\", "\\x", "!", "-c", "nat", "filter",
]  # fmt: skip
_SEPARATORS = [" ", " ", " ", "  ", "\t", " \r", "\f", "\v", "", "\xa0", "\x1c", "\u2003"]


_STARTS = ["-A", "-A", "-A", "--append", "-I", "-R", "-D", "-N", "-X", "-F", "-Z", "-P", "-E", "[0:0] -A", "[1:2]-A",
           ":", "*", "#", "COMMIT", ""]  # fmt: skip


@st.composite
def tricky_lines(draw: st.DrawFn) -> str:
    """A few lines, each a line start and pieces, mostly with single spaces between them (as real files)."""
    lines = []
    space = st.one_of(st.just(" "), st.sampled_from(_SEPARATORS))
    for _ in range(draw(st.integers(1, 4))):
        pieces = [draw(st.sampled_from(_STARTS)), *draw(st.lists(st.sampled_from(_PIECES), max_size=7))]
        line = draw(st.sampled_from(["", "", " ", "\t"]))
        for piece in pieces:
            line += piece + draw(space)
        lines.append(line.rstrip(" ") if draw(st.integers(0, 3)) else line)
    return "\n".join(lines)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(tricky_lines())
@example('-A "a b" x')
@example(":X ACCEPT[0:0]")
@example("[0:0]-A X -j ACCEPT")
@example("-D X 5 6")
@example("-I X 5 -j ACCEPT")
@example("-Z X 1")
@example('-A X -m comment --comment "a\\" b" -j ACCEPT')
@example("-A X -j ACCEPT\r\n-A X\t-j DROP")
@example("-A X -j ACCEPT\xa0")
def test_tricky_lines_read_the_same(text: str) -> None:
    check_same(text)
    for lines in (text, *text.split("\n")):  # alone, a line is more often one the fast path takes
        check_same("*filter\n:X - [0:0]\n" + lines + "\nCOMMIT\n")


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(iptables_rulesets())
def test_rendered_rulesets_read_the_same(ruleset: Ruleset) -> None:
    try:
        text = render(ruleset, "iptables-save").text()
    except UnsupportedError:
        assume(False)
        return
    assert check_same(text), "the iptables-save backend's output takes the fast path"


# ----------------------------------------------------------------------------- every real file


def _real_files() -> list[Path]:
    return sorted(
        [
            *(ISTIO / "iptables").glob("*.restore"),
            SEED,
            *(GOLDEN / "compile").glob("*.rules"),
        ]
    )


@pytest.mark.parametrize("path", _real_files(), ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_real_file_reads_the_same(path: Path) -> None:
    text = path.read_text()
    family = Family.IPV6 if path.name.endswith(".v6.restore") else None
    assert check_same(text, family=family, groups=GROUPS), "a real file takes the fast path"
    # Written with CRLF line ends, with tabs, or with wider spaces: other paths through the splitter.
    check_same(text.replace("\n", "\r\n"), family=family, groups=GROUPS)
    check_same(text.replace(" -", "\t-"), family=family, groups=GROUPS)
    check_same(text.replace(" ", "  "), family=family, groups=GROUPS)


def test_every_mutation_seed_is_covered() -> None:
    assert set(SEEDS) <= set(_real_files())


@pytest.mark.parametrize(
    ("services", "endpoints", "containers", "seed"), [(0, 0, 0, 0), (3, 2, 2, 1), (40, 3, 5, 2), (600, 3, 40, 0)]
)
def test_node_dumps_read_the_same(services: int, endpoints: int, containers: int, seed: int) -> None:
    text = node_dump(services=services, endpoints=endpoints, containers=containers, seed=seed)
    assert check_same(text), "a node dump takes the fast path"


def test_istio_chains_in_every_command_form_read_the_same() -> None:
    """iptables -S output and restore input with -I/-R/-D/-Z/-E/-X/-F/-P, numbered and not."""
    listing = "-P OUTPUT ACCEPT\n-N MESH\n-A OUTPUT -p tcp -j MESH\n-A MESH -j RETURN\n"
    restore = (
        "*nat\n:MESH - [0:0]\n-A MESH -j RETURN\n-I MESH 1 -p tcp -j RETURN\n-I MESH -p udp -j RETURN\n"
        "-R MESH 2 -p sctp -j RETURN\n-D MESH 1\n-D MESH -p sctp -j RETURN\n-Z MESH 1\n-Z MESH\n-Z\n"
        "-N OTHER\n-E OTHER THIRD\n-X THIRD\n-F MESH\n-F\n-P OUTPUT DROP -c 1 2\n[3:4] -A MESH -j RETURN\nCOMMIT\n"
    )
    for text in (listing, restore, ISTIO_NAT):
        assert check_same(text, table="nat" if text is listing else None)


# ----------------------------------------------------------------------------- the fast path follows the grammar


def test_the_forms_are_the_grammars_rules() -> None:
    """Each command's forms are exactly the expansions lark makes of its rule (after the command word)."""
    forms: dict[str, set[tuple[str, ...]]] = {}
    for rule in iptables._parser().rules:
        if rule.origin.name in iptables._FORMS:
            first, *rest = (symbol.name for symbol in rule.expansion)
            assert iptables._COMMAND_TERMINALS[first] == rule.origin.name
            forms.setdefault(str(rule.origin.name), set()).add(tuple(rest))
    assert forms == {rule: set(expanded) for rule, expanded in iptables._FORMS.items()}


def test_the_terminal_patterns_are_the_grammars() -> None:
    """The patterns the fast path reads out of the grammar file are those lark compiles from it."""
    from lark import load_grammar

    eval_escaping: Callable[[str], str] = load_grammar.eval_escaping  # lark's reading of a /regexp/ literal
    compiled = {terminal.name: terminal.pattern.value for terminal in iptables._parser().terminals}
    patterns = iptables._terminal_patterns()
    for name in ("COUNTERS", "INDEX", "SPEC", "COMMENT", "COMMIT", *iptables._COMMAND_TERMINALS):
        assert eval_escaping(patterns[name]) == compiled[name], name
    for name in ("CHAIN", "TABLE", "POLICY"):
        assert eval_escaping(patterns["_WORD"]) == compiled[name], name
    (ignored,) = (compiled[name] for name in iptables._parser().ignore_tokens)
    assert eval_escaping(patterns["%ignore"]) == ignored


# ----------------------------------------------------------------------------- the check catches a broken fast path


def test_the_check_catches_a_broken_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A word dropped, a line number or a column moved, a rule number read as an option, a line lark refuses
    taken, a text lark takes declined: each one is caught."""
    text = node_dump(services=3, endpoints=2, containers=2)
    numbered = "*nat\n:X - [0:0]\n-A X -j RETURN\n-I X 1 -p tcp -j RETURN\nCOMMIT\n"
    assert check_same(text)
    assert check_same(numbered)
    split_words, command_words, line_patterns, fit = (
        iptables._split_words,
        iptables._command_words,
        iptables._line_patterns,
        iptables._fit,
    )

    def drops_a_word(rest: str) -> list[str] | None:
        words = split_words(rest)
        return words[:-1] if words and "--to-destination" in words else words

    def next_line(line: str, start: int, number: int, plain: bool) -> Any:
        return command_words(line, start, number + 1 if "--dport" in line else number, plain)

    def next_column(line: str, start: int, number: int, plain: bool) -> Any:
        return command_words(" " + line, start + 1, number, plain)

    def number_as_option(rule: str, words: Any) -> Any:
        parts = fit(rule, words)
        if parts and [kind for kind, _ in parts[:2]] == ["CHAIN", "INDEX"]:
            return [parts[0], ("SPEC", [word for _, taken in parts[1:] for word in taken])]
        return parts

    def takes_too_much() -> tuple[re.Pattern[str], ...]:  # any line is a comment, "#" or not
        head, words, other = line_patterns()
        return head, words, re.compile(other.pattern.replace("(?P<COMMENT>#", "(?P<COMMENT>#?"))

    for name, broken, broken_text in (
        ("_split_words", drops_a_word, text),
        ("_command_words", next_line, text),
        ("_command_words", next_column, text),
        ("_fit", number_as_option, numbered),
        ("_line_patterns", takes_too_much, "*nat\nnot a line\nCOMMIT\n"),
        ("_fast_lines", lambda text: None, text),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(iptables, name, broken)
            with pytest.raises(AssertionError):
                check_same(broken_text)


# ----------------------------------------------------------------------------- rules of one shape

#: Rules in pairs of one shape (the second read from the first's plan) that differ in every value a plan puts in.
_SHAPES = """*nat
:OUTPUT ACCEPT [0:0]
:A - [0:0]
:B - [0:0]
-A OUTPUT -d 10.0.0.1/32 -p tcp -m comment --comment "one" -m tcp --dport 80 -j A
-A OUTPUT -d 10.0.0.2/32 -p tcp -m comment --comment "two" -m tcp --dport 443 -j B
-A A ! -s 10.1.0.0/16 -p udp -m udp --sport 53 -j DNAT --to-destination 10.2.0.1:5353
-A A ! -s 10.9.0.0/24 -p udp -m udp --sport 54 -j DNAT --to-destination 10.2.0.2
-A B -s 10.3.0.1,10.3.0.2 -d 10.4.0.1 -m comment --comment x -m comment --comment y -g A
-A B -s 10.3.0.3 -d 10.4.0.2,10.4.0.3 -m comment --comment z -m comment --comment w -g B
COMMIT
"""


def _address(direction: Direction, network: str, *, negate: bool = False) -> AddressMatch:
    return AddressMatch(direction=direction, addresses=AddressSet.of(network), negate=negate)


def _port(protocol: Protocol, direction: Direction, port: int) -> PortMatch:
    return PortMatch(protocol=protocol, ports=PortSet.of(port), direction=direction)


def _dnat(address: str, port: int | None) -> Dnat:
    ip = ipaddress.IPv4Address(address)
    return Dnat(addresses=AddressRange(first=ip, last=ip), ports=None if port is None else PortSet.of(port))


SRC, DST, TCP, UDP = Direction.SOURCE, Direction.DESTINATION, Protocol.TCP, Protocol.UDP

#: What :data:`_SHAPES` reads as: (chain, line, matches, target, comment) of each rule.
_OWN_VALUES = [
    ("OUTPUT", 5, (_address(DST, "10.0.0.1/32"), _port(TCP, DST, 80)), Jump(chain="A"), "one"),
    ("OUTPUT", 6, (_address(DST, "10.0.0.2/32"), _port(TCP, DST, 443)), Jump(chain="B"), "two"),
    ("A", 7, (_address(SRC, "10.1.0.0/16", negate=True), _port(UDP, SRC, 53)), _dnat("10.2.0.1", 5353), None),
    ("A", 8, (_address(SRC, "10.9.0.0/24", negate=True), _port(UDP, SRC, 54)), _dnat("10.2.0.2", None), None),
    ("B", 9, (_address(SRC, "10.3.0.1/32"), _address(DST, "10.4.0.1/32")), Goto(chain="A"), "x y"),
    ("B", 9, (_address(SRC, "10.3.0.2/32"), _address(DST, "10.4.0.1/32")), Goto(chain="A"), "x y"),
    ("B", 10, (_address(SRC, "10.3.0.3/32"), _address(DST, "10.4.0.2/32")), Goto(chain="B"), "z w"),
    ("B", 10, (_address(SRC, "10.3.0.3/32"), _address(DST, "10.4.0.3/32")), Goto(chain="B"), "z w"),
]


def check_own_values() -> None:
    """Each rule of :data:`_SHAPES` reads back its own addresses, ports, comments, target and position."""
    read = [
        (chain.name, rule.position.line if rule.position else 0, rule.matches, rule.target, rule.comment)
        for _, chain, rule in read_iptables(_SHAPES).rules()
    ]
    assert read == _OWN_VALUES


def test_rules_of_one_shape_read_their_own_values() -> None:
    check_own_values()
    with every_rule_parsed():
        check_own_values()
    assert check_same(_SHAPES)


@pytest.mark.parametrize(
    "rule",
    [
        '-A A -m comment --comment "' + "c" * 256 + '" -j A',  # too long: the error at this rule's comment
        "-A A -d 10.0.0.300 -j A",  # an error at this rule's address
        "-A A ! -d 10.0.0.1,10.0.0.2 -j A",  # a negated list
        "-A A -d 10.0.0.0/255.0.255.0 -j A",  # a mask with holes: an unknown match
        "-A A -p tcp --dport 0 -j A",  # port 0, and a port out of range: no hole, parsed in full
        "-A A -p tcp --dport 65536 -j A",
        "-A A -p tcp --dport http -j A",
        "-A A -p tcp -j DNAT --to-destination 10.0.0.1:0",  # errors at this rule's NAT destination
        "-A A -p tcp -j DNAT --to-destination ::1",
        "-A A -j NEW",  # a chain made after the first rule of the shape
        "-A A --jump=NEW",
        "-A A --ju NEW",
        "-A A -g NEW",
        "-A A -m comment --comment -s -d 10.0.0.1 -j A",  # a hole that is another option's value
        "-A A -m comment --comment --comment -j A",
        "-A A -p tcp -m tcp --tcp-flags SYN -d 10.0.0.1 -j A",
        "-A A -p tcp -m multiport --dport 80 -j A",  # --dport as multiport's --dports (an abbreviation)
        "-A A -p tcp -m tcp --dport 80 -m tcp --dport 80 -j A",
        "-A A -p tcp --dport=80 -j A",
        "-A A -m foo --comment x -d 10.0.0.1 -j A",  # an unknown match takes what follows
        "-A A -6 -d 10.0.0.1 -j A",
        "-A A -j REDIRECT --to-ports 80",  # the target outside its table (an error each time)
    ],
)
def test_rules_of_one_shape_read_as_parsed_in_full(rule: str) -> None:
    """A rule first of its shape, then in a second rule of the shape with other values (before and after a
    chain ``NEW`` is made), reads as when every rule is parsed in full: the same rules, or the same error."""
    other = rule.replace("10.0.0.", "10.0.9.").replace("80", "81").replace("-j A", "-j B").replace("c" * 256, "d")
    for first, second in ((other, rule), (rule, other), (rule, rule)):
        text = f"*nat\n:A - [0:0]\n:B - [0:0]\n{first}\n{second}\n-N NEW\n{first}\n{second}\nCOMMIT\n"
        assert check_same(text)


def test_plans_read_most_rules_of_a_node_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 600 services' 5,082 rules come in a few dozen shapes; only the first rule of each is parsed in full."""
    parsed = 0
    parts = _iptables_spec._Rule.parts

    def counted(rule: Any) -> Any:
        nonlocal parsed
        parsed += 1
        return parts(rule)

    monkeypatch.setattr(_iptables_spec._Rule, "parts", counted)
    ruleset = read_iptables(node_dump())
    assert sum(1 for _ in ruleset.rules()) == 5082
    assert parsed < 100


def test_the_check_catches_a_broken_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that gives a rule the first rule's values (all of them, or only its matches, target or comment) is
    caught by both checks."""
    plan_rules = _iptables_spec._Plan.rules

    def first(plan: Any, args: Any, ctx: Any, position: Any) -> Any:
        return plan.parts.rules(position)

    def breaks(field: str) -> Callable[..., Any]:
        def broken(plan: Any, args: Any, ctx: Any, position: Any) -> Any:
            made = getattr(plan.parts.rules(position)[0], field)
            return [attrs.evolve(rule, **{field: made}) for rule in plan_rules(plan, args, ctx, position)]

        return broken

    for broken in (first, *map(breaks, ("matches", "target", "comment"))):
        with monkeypatch.context() as patch:
            patch.setattr(_iptables_spec._Plan, "rules", broken)
            with pytest.raises(AssertionError):
                check_own_values()
            with pytest.raises(AssertionError):
                check_same(_SHAPES)
    check_own_values()
