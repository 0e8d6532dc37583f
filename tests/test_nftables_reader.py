"""The nft JSON reader: what nft prints (and what its JSON input may say) into IR, and its errors.

Real listings come from the kernel in tests/kernel/test_nftables_reader_kernel.py; here the
documents are written out, so every normalised form and every error message is pinned.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshredirect.compiler import compile_policy
from meshredirect.errors import SourceError
from meshredirect.ir import (
    FULL_MASK,
    Accept,
    AddressMatch,
    AddressRange,
    ConnmarkSave,
    CtState,
    CtStateMatch,
    Direction,
    Dnat,
    Drop,
    Family,
    FamilyMatch,
    InterfaceMatch,
    Jump,
    Log,
    MarkMatch,
    Masquerade,
    NatFlag,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Reject,
    Return,
    Rule,
    Ruleset,
    SetMark,
    Snat,
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.policy import Policy
from meshredirect.readers.nftables import canonical_json, mark_function, read_nft_json
from meshredirect.values import AddressSet, IdSet, PortSet
from meshredirect_nftables import NftLowering

META_MARK = {"meta": {"key": "mark"}}


def _match(left: object, right: object, op: str = "==") -> dict[str, object]:
    return {"match": {"op": op, "left": left, "right": right}}


def _daddr(version: int = 4) -> dict[str, object]:
    return {"payload": {"protocol": "ip" if version == 4 else "ip6", "field": "daddr"}}


def document(*rules: list[object], family: str = "ip", extra: tuple[object, ...] = ()) -> str:
    """A listing like nft prints: metainfo, a table, a base chain, a user chain, rules with handles."""
    items: list[object] = [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": family, "name": "t", "handle": 1}},
        *extra,
        {"chain": {"family": family, "table": "t", "name": "c", "handle": 1, "type": "filter", "hook": "output",
                   "prio": -151, "policy": "accept"}},
        {"chain": {"family": family, "table": "t", "name": "next", "handle": 2}},
    ]  # fmt: skip
    for handle, expr in enumerate(rules, start=3):
        items.append({"rule": {"family": family, "table": "t", "chain": "c", "handle": handle, "expr": expr}})
    return json.dumps({"nftables": items}, indent=1)


def read_rules(*rules: list[object], family: str = "ip", extra: tuple[object, ...] = ()) -> list[Rule]:
    return list(read_nft_json(document(*rules, family=family, extra=extra)).tables[0].chain("c").rules)


RETURN = {"return": None}
COUNTER = {"counter": {"packets": 12, "bytes": 3456}}


def test_normalised_forms_read_as_the_ir_they_mean() -> None:
    rules = read_rules(
        [_match(_daddr(), "127.0.0.1", "!="), COUNTER, RETURN],  # /32 printed as a plain address
        [_match(_daddr(), {"range": ["10.0.0.0", "10.0.1.255"]}), RETURN],  # a range that is a CIDR
        [_match(_daddr(), {"set": ["192.168.1.1", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}), RETURN],
        [_match({"payload": {"protocol": "tcp", "field": "dport"}}, {"set": [15090, {"range": [15020, 15021]}]}), RETURN],
        [_match({"meta": {"key": "skuid"}}, {"set": [{"range": [5, 9]}, 1337]}, "!="), RETURN],
        [_match({"ct": {"key": "state"}}, ["established", "related"], "in"), RETURN],
        [_match({"ct": {"key": "state"}}, {"|": ["established", "related"]}, "!="), RETURN],
        [_match({"&": [META_MARK, 255]}, 58), RETURN],
        [_match({"meta": {"key": "l4proto"}}, 6), RETURN],  # a protocol number
        [_match({"meta": {"key": "oifname"}}, "eth*"), RETURN],
    )  # fmt: skip
    assert [r.matches for r in rules] == [
        (AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("127.0.0.1"), negate=True),),
        (AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/23")),),
        (AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/8", "192.168.1.1")),),
        (PortMatch(protocol=Protocol.TCP, ports=PortSet.of((15020, 15021), 15090)),),
        (OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of((5, 9), 1337), negate=True, socketless=False),),
        (CtStateMatch(states={CtState.ESTABLISHED, CtState.RELATED}),),
        (CtStateMatch(states={CtState.ESTABLISHED, CtState.RELATED}, negate=True),),
        (MarkMatch(value=58, mask=255),),
        (ProtocolMatch(protocol=Protocol.TCP),),
        (InterfaceMatch(direction=Direction.DESTINATION, name="eth+"),),
    ]
    assert all(r.target == Return() for r in rules)


def test_rule_positions_point_at_the_rule_in_the_document() -> None:
    text = document([RETURN], [{"drop": None}])
    rules = read_nft_json(text, path="dump.json").tables[0].chain("c").rules
    positions = [r.position for r in rules]
    assert [p.path for p in positions if p] == ["dump.json", "dump.json"]
    lines = text.splitlines()
    assert all(p is not None and lines[p.line - 1][p.column - 1] == "{" for p in positions)
    assert positions[0] is not None and positions[1] is not None and positions[0].line < positions[1].line


def test_named_sets_and_verdict_maps() -> None:
    named = {"set": {"family": "ip", "table": "t", "name": "ex", "type": "ipv4_addr", "handle": 5,
                     "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}},
                                                     {"range": ["172.16.0.0", "172.16.0.3"]}, "192.168.1.1"]}}  # fmt: skip
    vmap = {"vmap": {"key": _daddr(), "data": {"set": [
        [{"range": ["10.0.0.0", "10.95.255.255"]}, {"jump": {"target": "next"}}],
        [{"prefix": {"addr": "10.96.0.0", "len": 12}}, RETURN],
        [{"prefix": {"addr": "11.0.0.0", "len": 8}}, {"jump": {"target": "next"}}]]}}}  # fmt: skip
    rules = read_rules([_match(_daddr(), "@ex"), RETURN], [vmap], extra=(named,))
    assert rules[0].matches == (
        AddressMatch(
            direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/8", "172.16.0.0/30", "192.168.1.1")
        ),
    )
    # One rule per verdict (the keys of a map never overlap, so their order does not matter): returns first.
    assert [(r.target, r.matches[0].addresses) for r in rules[1:]] == [  # type: ignore[union-attr]
        (Return(), AddressSet.of("10.96.0.0/12")),
        (
            Jump(chain="next"),
            AddressSet.of("10.0.0.0/12", "10.16.0.0/12", "10.32.0.0/11", "10.64.0.0/11", "11.0.0.0/8"),
        ),
    ]


def test_tproxy_forms() -> None:
    tcp = _match({"meta": {"key": "l4proto"}}, "tcp")
    rules = read_rules(
        [tcp, {"tproxy": {"port": 15006}}, {"mangle": {"key": META_MARK, "value": 1337}}, COUNTER, {"accept": None}],
        [tcp, {"tproxy": {"addr": "127.0.0.1", "port": 15006}}, {"accept": None}],
        [tcp, {"tproxy": {"port": 15006}}],  # not terminal in nft: no IR form
        family="ip",
    )
    assert rules[0].target == TProxy(port=15006, mark=1337)
    assert rules[1].target == TProxy(port=15006, address=ipaddress.ip_address("127.0.0.1"))
    assert rules[2].target == UnknownTarget(
        dialect="nftables", name="tproxy", tokens=(canonical_json([{"tproxy": {"port": 15006}}]),)
    )


def test_mark_expressions_are_decoded_exactly() -> None:
    assert mark_function({"^": [{"&": [META_MARK, 0xFFFFDFFF]}, 0x4000]}, META_MARK) == (0x4000, 0x2000)
    assert mark_function({"&": [META_MARK, 0xFFFF00FF]}, META_MARK) == (0, 0xFF00)
    assert mark_function(META_MARK, META_MARK) == (0, 0)
    assert mark_function({"|": [META_MARK, {"ct": {"key": "mark"}}]}, META_MARK) is None
    rules = read_rules(
        [{"mangle": {"key": META_MARK, "value": {"|": [{"&": [META_MARK, 0xFFFF12FF]}, 0x1200]}}}],
        [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": META_MARK}}],
    )
    assert [r.target for r in rules] == [SetMark(value=0x1200, mask=0xFF00), ConnmarkSave()]


def test_several_statements_become_several_rules_only_where_that_is_exact() -> None:
    mark_set = {"mangle": {"key": META_MARK, "value": 7}}
    rules = read_rules(
        [_match({"meta": {"key": "l4proto"}}, "tcp"), {"log": {"prefix": "x: "}}, {"accept": None}],
        [_match(META_MARK, 1), mark_set, {"accept": None}],  # the rule reads what it writes: no IR form
    )
    tcp = (ProtocolMatch(protocol=Protocol.TCP),)
    assert rules[:2] == [Rule(matches=tcp, target=Log(prefix="x: ")), Rule(matches=tcp, target=Accept())]
    assert isinstance(rules[2].target, UnknownTarget) and rules[2].matches == (MarkMatch(value=1),)


def test_nat_port_selection_flags_are_read_as_nft_prints_them() -> None:
    # As `nft -j list ruleset` printed these rules loaded into a namespace: one flag as a string, several as a list.
    rules = read_rules(
        [{"masquerade": {"flags": "fully-random"}}],
        [{"masquerade": {"port": {"range": [1000, 2000]}, "flags": ["random", "fully-random"]}}],
        [{"snat": {"addr": "1.2.3.4", "flags": "persistent"}}],
        [{"dnat": {"addr": "1.2.3.4", "port": 80, "flags": ["random", "persistent"]}}],
        [{"redirect": {"flags": "random"}}],
        [{"redirect": {"flags": "sometimes"}}],
    )
    one = AddressRange(first=ipaddress.ip_address("1.2.3.4"), last=ipaddress.ip_address("1.2.3.4"))
    assert [r.target for r in rules[:5]] == [
        Masquerade(flags={NatFlag.RANDOM_FULLY}),
        Masquerade(ports=PortSet.of((1000, 2000)), flags={NatFlag.RANDOM, NatFlag.RANDOM_FULLY}),
        Snat(addresses=one, flags={NatFlag.PERSISTENT}),
        Dnat(addresses=one, ports=PortSet.of(80), flags={NatFlag.RANDOM, NatFlag.PERSISTENT}),
        Redirect(flags={NatFlag.RANDOM}),
    ]
    assert isinstance(rules[5].target, UnknownTarget)  # a flag the IR does not know is not guessed


def test_what_has_no_ir_form_is_kept_as_unknown_never_guessed() -> None:
    cpu = _match({"meta": {"key": "cpu"}}, 1)
    rules = read_rules(
        [cpu, RETURN],
        [_match({"meta": {"key": "skuid"}}, "nobody"), RETURN],  # names are not resolved here
        [_match({"meta": {"key": "iifname"}}, "eth\\*"), RETURN],  # a literal star
        [_match({"payload": {"protocol": "th", "field": "dport"}}, 53), RETURN],
        [{"xt": {"type": "target", "name": "NOTRACK"}}],
        [{"notrack": None}],
    )
    assert rules[0].matches == (UnknownMatch(dialect="nftables", tokens=(canonical_json(cpu),)),)
    assert all(isinstance(r.matches[0], UnknownMatch) for r in rules[1:4])
    assert [(r.target.name if isinstance(r.target, UnknownTarget) else None) for r in rules[4:]] == [
        "NOTRACK",
        "notrack",
    ]


def test_user_and_group_names_resolve_through_the_mappings_given() -> None:
    text = document([_match({"meta": {"key": "skgid"}}, {"set": ["java", 7]}), RETURN])
    rules = read_nft_json(text, groups={"java": 1001}).tables[0].chain("c").rules
    assert rules[0].matches == (OwnerMatch(kind=OwnerKind.GID, ids=IdSet.of(7, 1001), socketless=False),)
    assert isinstance(read_nft_json(text).tables[0].chain("c").rules[0].matches[0], UnknownMatch)


def test_rejects_defaults_and_the_hidden_tcp_match() -> None:
    rules = read_rules(
        [{"reject": {"type": "icmp", "expr": "port-unreachable"}}],
        [{"reject": {"type": "tcp reset"}}],
        [{"reject": {"type": "icmp", "expr": "host-prohibited"}}],
    )
    assert [(r.matches, r.target) for r in rules] == [
        ((), Reject(with_="icmp-port-unreachable")),
        ((ProtocolMatch(protocol=Protocol.TCP),), Reject(with_="tcp-reset")),
        ((), Reject(with_="icmp-host-prohibited")),
    ]


def test_inet_tables_keep_the_family_ip_protocol_implies() -> None:
    rules = read_rules(
        [_match({"payload": {"protocol": "ip", "field": "protocol"}}, "tcp"), RETURN],
        [_match({"meta": {"key": "nfproto"}}, "ipv4", "!="), {"drop": None}],
        family="inet",
    )
    assert rules[0].matches == (FamilyMatch(family=Family.IPV4), ProtocolMatch(protocol=Protocol.TCP))
    assert rules[1].matches == (FamilyMatch(family=Family.IPV6),) and rules[1].target == Drop()


def test_other_families_and_hooks_outside_the_ir_are_not_read() -> None:
    items = [
        {"table": {"family": "netdev", "name": "n"}},
        {"chain": {"family": "netdev", "table": "n", "name": "in", "type": "filter", "hook": "ingress", "prio": 0}},
        {"rule": {"family": "netdev", "table": "n", "chain": "in", "expr": [{"drop": None}]}},
        {"table": {"family": "inet", "name": "i"}},
        {"chain": {"family": "inet", "table": "i", "name": "in", "type": "filter", "hook": "ingress", "prio": 0}},
    ]
    assert read_nft_json(json.dumps({"nftables": items})).tables[0].chains == ()


def test_the_command_form_is_applied_in_order() -> None:
    table = {"family": "ip", "name": "t"}
    chain = {"family": "ip", "table": "t", "name": "c", "type": "nat", "hook": "output", "prio": "dstnat"}

    def rule(n: int, **extra: int) -> dict[str, object]:
        return {
            "family": "ip",
            "table": "t",
            "chain": "c",
            "expr": [_match({"meta": {"key": "skuid"}}, n), RETURN],
            **extra,
        }

    commands = [
        {"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
        {"add": {"chain": chain}}, {"add": {"rule": rule(2)}}, {"insert": {"rule": rule(1)}},
        {"add": {"rule": rule(3, index=1)}}, {"insert": {"rule": rule(0, index=0)}},
    ]  # fmt: skip
    ruleset = read_nft_json(json.dumps({"nftables": commands}))
    chain_ir = ruleset.tables[0].chain("c")
    assert chain_ir.base is not None and chain_ir.base.priority == -100
    assert [r.matches[0].ids for r in chain_ir.rules] == [IdSet.of(n) for n in (0, 1, 2, 3)]  # type: ignore[union-attr]
    flushed = read_nft_json(json.dumps({"nftables": [*commands, {"flush": {"table": table}}]}))
    assert flushed.tables[0].chain("c").rules == ()


ERRORS = [
    ("{", "<stdin>:1:2: expected JSON (nft -j output), got: Expecting property name enclosed in double quotes"),
    ("[]", "<stdin>:1:1: expected an object {\"nftables\": [...]}, got []"),
    ('{"nftables": [1]}', '<stdin>:1:15: expected an nftables object such as {"rule": {...}}, got 1'),
    ('{"nftables": [{"quux": {}}]}', "<stdin>:1:15: expected a table, chain, set, map, element or rule, got 'quux'"),
    ('{"nftables": [{"table": {"family": "ip"}}]}', '<stdin>:1:15: expected a table with family, name, got {"family": "ip"}'),
    ('{"nftables": [{"table": {"family": "ipx", "name": "t"}}]}',
     "<stdin>:1:15: expected family ip, ip6, inet, arp, bridge or netdev, got 'ipx'"),
    ('{"nftables": [{"chain": {"family": "ip", "table": "t", "name": "c"}}]}',
     "<stdin>:1:15: expected a chain of a declared table, got a chain for table ip t, which is not declared"),
    ('{"nftables": [{"table": {"family": "ip", "name": "t"}},\n {"chain": {"family": "ip", "table": "t", "name": "c", '
     '"type": "bogus", "hook": "input"}}]}', "<stdin>:2:2: expected chain type filter, nat or route, got 'bogus'"),
    ('{"nftables": [{"table": {"family": "ip", "name": "t"}}, {"chain": {"family": "ip", "table": "t", "name": "c"}},'
     ' {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": [{"jump": {"target": "nowhere"}}]}}]}',
     "<stdin>:1:113: expected a jump to a declared chain, got a jump to 'nowhere'"),
    ('{"nftables": [{"wipe": {"table": {}}}]}', "<stdin>:1:15: expected a table, chain, set, map, element or rule, got 'wipe'"),
    ('{"nftables": [{"flush": {"set": {}}}]}', "<stdin>:1:15: expected to flush the ruleset, a table or a chain, got 'set'"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m.split(": ", 1)[1][:40] for _, m in ERRORS])
def test_errors_name_the_place_what_was_expected_and_what_was_given(text: str, message: str) -> None:
    with pytest.raises(SourceError) as info:
        read_nft_json(text)
    assert str(info.value).splitlines()[0] == message
    assert str(info.value).splitlines()[-1].strip() == "^"


# ----------------------------------------------------------------------------- properties

CORPUS = [
    json.dumps({"nftables": [c for cs in NftLowering().commands(compile_policy(p)).values() for c in cs]}, indent=1)
    for p in (Policy(), Policy(families="both", inbound_mode="TPROXY", drop_invalid=True,
                               dns={"enabled": True, "servers": ["10.96.0.10"]}))
]  # fmt: skip


@settings(deadline=None)
@given(st.sampled_from(CORPUS), st.data())
def test_mutated_documents_give_ir_or_a_source_error_never_anything_else(text: str, data: st.DataObject) -> None:
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(chars) - 1))
        action = data.draw(st.sampled_from(["delete", "replace", "insert"]))
        char = data.draw(st.sampled_from(list('{}[]",:0123456789abcdefnulltrue-@ ')))
        if action == "delete":
            del chars[position]
        elif action == "replace":
            chars[position] = char
        else:
            chars.insert(position, char)
    try:
        result = read_nft_json("".join(chars))
    except SourceError:
        return
    assert isinstance(result, Ruleset)


@settings(deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["match", "op", "left", "right", "meta", "key", "payload", "protocol", "field",
                                         "set", "range", "prefix", "addr", "len", "mangle", "value", "tproxy", "port",
                                         "vmap", "data", "jump", "target", "ct", "&", "|", "reject", "type", "expr"]),
                        inner, max_size=3), max_leaves=12))  # fmt: skip
def test_any_statement_shape_reads_as_ir_or_unknown(statement: object) -> None:
    text = document([statement]) if not isinstance(statement, dict) or "jump" not in statement else document([])
    try:
        rules = read_nft_json(text).tables[0].chain("c").rules
    except SourceError:
        return
    assert all(isinstance(r, Rule) for r in rules)


def test_reading_our_own_json_is_exact_for_full_masks() -> None:
    rules = read_rules([_match(META_MARK, 1337), {"mangle": {"key": META_MARK, "value": 1338}}])
    assert rules == [Rule(matches=(MarkMatch(value=1337),), target=SetMark(value=1338, mask=FULL_MASK))]
