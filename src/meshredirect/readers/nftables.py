"""Read ``nft -j list ruleset`` output (or ``nft -j -f`` input) into IR.

The reader is pure: it takes the JSON text and returns a
:class:`~meshredirect.ir.Ruleset` with one :class:`~meshredirect.ir.Table`
per nftables table of the ``ip``, ``ip6`` and ``inet`` families. It accepts
what ``nft`` prints (``metainfo``, handles, counters, set and map objects,
the normalised forms: ``/32`` prefixes as plain addresses, ranges,
reordered set elements, flag lists) and the command form of ``nft -j -f``
input (``add``/``create``/``insert``/``delete``/``flush``, applied in order,
as a transaction would).

Anything it cannot model exactly becomes an
:class:`~meshredirect.ir.UnknownMatch` or
:class:`~meshredirect.ir.UnknownTarget` of dialect ``"nftables"`` holding
the JSON of the expression (tracing then says "unknown"; the nftables
backend can write it back verbatim). Text that is not such a document
raises :class:`~meshredirect.errors.SourceError` with line, column and a
caret.

What maps to what (each exact; nftables semantics are kept where they differ
from iptables):

- ``meta l4proto`` -> ProtocolMatch; ``ip protocol`` -> ProtocolMatch (in an
  ``inet`` table preceded by FamilyMatch(IPV4)); ``meta nfproto`` -> FamilyMatch.
- ``ip/ip6 saddr/daddr`` with addresses, prefixes, ranges, anonymous or
  named sets -> AddressMatch (ranges become the CIDRs that cover them exactly).
- ``tcp/udp/sctp sport/dport`` -> PortMatch (the protocol is implied, as nft does).
- ``iifname``/``oifname`` -> InterfaceMatch (a trailing ``*`` is the IR's ``+``).
- ``meta skuid/skgid`` -> OwnerMatch with ``socketless=False``: nft's owner
  match never matches a packet without a socket, negated or not.
- ``meta mark``/``ct mark`` (with ``&`` mask) -> MarkMatch/ConnmarkMatch;
  ``ct state`` -> CtStateMatch; ``fib saddr/daddr [. iif/oif] type`` -> AddrTypeMatch.
- verdicts, ``redirect``, ``masquerade``, ``snat``, ``dnat``, ``reject``,
  ``log``, ``meta mark set``, ``ct mark set``, ``ct zone set`` -> the IR targets.
  Mark expressions are decoded by evaluating them at mark 0 and mark 0xffffffff
  (any composition of ``&``, ``|``, ``^`` with constants is ``(mark & a) ^ b``).
- ``reject with tcp reset`` gets back the tcp match nft adds to it but does not print.
- ``tproxy to ...`` followed by an optional ``meta mark set`` and ``accept`` -> TProxy.
  (Without ``accept`` nft's tproxy is not terminal: that form stays unknown.)
- a verdict map (``vmap``) -> one rule per verdict, in a canonical order:
  its keys are disjoint, so the order does not change the meaning.
- several non-terminal statements in one rule -> one IR rule per statement,
  where no statement writes what a match of the rule reads; otherwise unknown.
- ``counter`` is ignored; a rule ``comment`` becomes :attr:`~meshredirect.ir.Rule.comment`.

Tables of the ``arp``, ``bridge`` and ``netdev`` families and base chains on
hooks the IR has no place for (``ingress``, ``egress``) are not read: they
act outside the IP hooks the IR models.

>>> text = '''{"nftables": [{"table": {"family": "ip", "name": "mesh", "handle": 1}},
...   {"chain": {"family": "ip", "table": "mesh", "name": "out", "handle": 1,
...              "type": "nat", "hook": "output", "prio": -101, "policy": "accept"}},
...   {"rule": {"family": "ip", "table": "mesh", "chain": "out", "handle": 2, "expr": [
...     {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 1337}},
...     {"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}}]}'''
>>> table = read_nft_json(text).tables[0]
>>> table.family, table.name, table.chains[0].base.priority
(<Family.IPV4: 'ipv4'>, 'mesh', -101)
>>> table.chains[0].rules[0].matches, table.chains[0].rules[0].target
((OwnerMatch(kind=<OwnerKind.UID: 'uid'>, ids=IdSet('1337'), negate=False, socketless=False),), Return())
>>> read_nft_json('''{"nftables": [{"table": {"family": "ip", "name": "t"}},
...  {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": []}}]}''', path="dump.json")
Traceback (most recent call last):
...
meshredirect.errors.SourceError: dump.json:2:2: expected a rule of a declared chain, got a rule for chain 'c' of table ip t, which is not declared
     {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": []}}]}
     ^
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

from meshredirect.errors import SourceError, SourcePosition
from meshredirect.ir import (
    FULL_MASK,
    Accept,
    AddressMatch,
    AddressRange,
    AddrType,
    AddrTypeMatch,
    BaseChain,
    Chain,
    ChainPolicy,
    ChainType,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    ConnmarkSet,
    Continue,
    CtState,
    CtStateMatch,
    CtZone,
    Direction,
    Dnat,
    Drop,
    Family,
    FamilyMatch,
    Goto,
    Hook,
    InterfaceMatch,
    Jump,
    Log,
    MarkMatch,
    Masquerade,
    Match,
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
    Table,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.values import MAX_ID, MAX_PORT, AddressSet, IdSet, IPAddress, IPNetwork, PortSet

__all__ = [
    "ADDRTYPE_NAMES",
    "CTSTATE_NAMES",
    "DIALECT",
    "FAMILY_NAMES",
    "HOOK_NAMES",
    "ICMPV6_REJECT_CODES",
    "ICMP_REJECT_CODES",
    "LOG_LEVELS",
    "PROTOCOL_NUMBERS",
    "canonical_json",
    "mark_function",
    "read_nft_json",
    "verdict_order",
]

#: The ``dialect`` of unknown nodes this reader makes (and the nftables backend writes back).
DIALECT: Final = "nftables"
#: nftables family names of the IR families.
FAMILY_NAMES: Final[dict[Family, str]] = {Family.IPV4: "ip", Family.IPV6: "ip6", Family.INET: "inet"}
_FAMILY_OF: Final = {name: family for family, name in FAMILY_NAMES.items()}
#: Families whose tables act outside the IP hooks the IR models; their tables are not read.
#: nft's names of the NAT port-selection flags.
_NAT_FLAGS: Final = {"random": NatFlag.RANDOM, "fully-random": NatFlag.RANDOM_FULLY, "persistent": NatFlag.PERSISTENT}
_OTHER_FAMILIES: Final = frozenset({"arp", "bridge", "netdev"})
HOOK_NAMES: Final[dict[Hook, str]] = {hook: hook.value.lower() for hook in Hook}
_HOOK_OF: Final = {name: hook for hook, name in HOOK_NAMES.items()}
#: Named priorities nft accepts for the IP families (``nft(8)``, "PRIORITY").
_NAMED_PRIORITIES: Final = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
#: Conntrack state names in the order nft sorts them (by their bit value).
CTSTATE_NAMES: Final[dict[CtState, str]] = {
    CtState.INVALID: "invalid",
    CtState.ESTABLISHED: "established",
    CtState.RELATED: "related",
    CtState.NEW: "new",
    CtState.UNTRACKED: "untracked",
}
_CTSTATE_OF: Final = {name: state for state, name in CTSTATE_NAMES.items()}
#: fib address types, in their numeric order (RTN_*), which is how nft sorts them.
ADDRTYPE_NAMES: Final[dict[AddrType, str]] = {t: t.value.lower() for t in AddrType}
_ADDRTYPE_OF: Final = {name: t for t, name in ADDRTYPE_NAMES.items()}
#: IANA protocol numbers of the IR protocols (nft prints names, but accepts numbers).
PROTOCOL_NUMBERS: Final[dict[Protocol, int]] = {
    Protocol.TCP: 6,
    Protocol.UDP: 17,
    Protocol.ICMP: 1,
    Protocol.ICMPV6: 58,
    Protocol.SCTP: 132,
}
_PROTOCOL_OF: Final[dict[object, Protocol]] = {
    **{p.value: p for p in Protocol},
    **{n: p for p, n in PROTOCOL_NUMBERS.items()},
    "icmpv6": Protocol.ICMPV6,
}
_PORT_PROTOCOLS: Final = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP}
#: iptables' ``--reject-with`` names (the IR's spelling) and nft's ICMP codes, per family.
ICMP_REJECT_CODES: Final[dict[str, str]] = {
    "icmp-net-unreachable": "net-unreachable",
    "icmp-host-unreachable": "host-unreachable",
    "icmp-port-unreachable": "port-unreachable",
    "icmp-proto-unreachable": "prot-unreachable",
    "icmp-net-prohibited": "net-prohibited",
    "icmp-host-prohibited": "host-prohibited",
    "icmp-admin-prohibited": "admin-prohibited",
}
ICMPV6_REJECT_CODES: Final[dict[str, str]] = {
    "icmp6-no-route": "no-route",
    "icmp6-adm-prohibited": "admin-prohibited",
    "icmp6-addr-unreachable": "addr-unreachable",
    "icmp6-port-unreachable": "port-unreachable",
}
#: syslog levels by name, as nft's ``log level`` spells them.
LOG_LEVELS: Final[dict[str, int]] = {
    "emerg": 0,
    "alert": 1,
    "crit": 2,
    "err": 3,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
_DEFAULT_LOG_LEVEL: Final = 4

Json = Any


def canonical_json(value: Json) -> str:
    """The JSON text an unknown node keeps: sorted keys, no spaces, so equal expressions compare equal.

    >>> canonical_json({"meta": {"key": "cpu"}, "b": [1, 2]})
    '{"b":[1,2],"meta":{"key":"cpu"}}'
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def mark_function(expression: Json, register: Json) -> tuple[int, int] | None:
    """Decode a mark expression into ``(value, mask)`` of ``mark = (mark & ~mask) ^ value``.

    ``register`` is the expression standing for the mark being set (``{"meta": {"key": "mark"}}``).
    Any composition of ``&``, ``|`` and ``^`` of the register with constants has
    that form, and evaluating it at 0 and at 0xffffffff recovers it exactly.
    None when the expression is anything else.

    >>> mark = {"meta": {"key": "mark"}}
    >>> mark_function(1338, mark)
    (1338, 4294967295)
    >>> mark_function({"|": [mark, 0x4000]}, mark)
    (16384, 16384)
    >>> mark_function({"|": [{"&": [mark, 0xFFFF12FF]}, 0x1200]}, mark) == (0x1200, 0xFF00)
    True
    """
    low = _evaluate_bits(expression, register, 0)
    high = _evaluate_bits(expression, register, FULL_MASK)
    if low is None or high is None:
        return None
    return low, ~(low ^ high) & FULL_MASK


def _evaluate_bits(expression: Json, register: Json, value: int) -> int | None:
    if expression == register:
        return value
    if isinstance(expression, int) and not isinstance(expression, bool) and 0 <= expression <= FULL_MASK:
        return expression
    if isinstance(expression, dict) and len(expression) == 1:
        ((op, args),) = expression.items()
        if op in ("&", "|", "^") and isinstance(args, list) and len(args) == 2:
            a = _evaluate_bits(args[0], register, value)
            b = _evaluate_bits(args[1], register, value)
            if a is None or b is None:
                return None
            return a & b if op == "&" else (a | b if op == "|" else a ^ b)
    return None


# ----------------------------------------------------------------------------- document positions


class _Document:
    """The parsed document and where each top-level item starts, for error messages."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.lines = text.splitlines() or [""]
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self.error_at(exc.lineno, exc.colno, f"expected JSON (nft -j output), got: {exc.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("nftables"), list):
            raise self.error_at(1, 1, f'expected an object {{"nftables": [...]}}, got {_brief(data)}')
        self.items: list[Json] = data["nftables"]
        self.offsets = self._item_offsets()

    def _item_offsets(self) -> list[int]:
        """Character offsets of the items of the ``nftables`` array (found by decoding them again)."""
        decoder = json.JSONDecoder()
        text = self.text
        offsets: list[int] = []
        index = _skip(text, _skip(text, 0) + 1)  # past the top-level '{'
        while index < len(text) and text[index] != "}":
            key, index = decoder.raw_decode(text, index)
            index = _skip(text, _skip(text, index) + 1)  # past the ':'
            if key == "nftables":
                offsets = []
                index = _skip(text, index + 1)  # past the '['
                while text[index] != "]":
                    offsets.append(index)
                    _, index = decoder.raw_decode(text, index)
                    index = _skip(text, index)
                    if text[index] == ",":
                        index = _skip(text, index + 1)
                index += 1
            else:
                _, index = decoder.raw_decode(text, index)
            index = _skip(text, index)
            if index < len(text) and text[index] == ",":
                index = _skip(text, index + 1)
        return offsets

    def position(self, item: int) -> SourcePosition:
        offset = self.offsets[item] if item < len(self.offsets) else 0
        line = self.text.count("\n", 0, offset) + 1
        column = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return SourcePosition(self.path, line, column, self.lines[line - 1] if line <= len(self.lines) else "")

    def error_at(self, line: int, column: int, message: str) -> SourceError:
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return SourceError(SourcePosition(self.path, line, column, text), message)

    def error(self, item: int, message: str) -> SourceError:
        return SourceError(self.position(item), message)


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _brief(value: Json, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- the state a document builds


@attrs.define
class _ChainState:
    name: str
    base: BaseChain | None
    skipped: bool = False
    rules: list[tuple[Json, int]] = attrs.Factory(list)


@attrs.define
class _TableState:
    family: Family
    name: str
    chains: dict[str, _ChainState] = attrs.Factory(dict)
    sets: dict[str, Json] = attrs.Factory(dict)


_VERBS: Final = ("add", "create", "insert", "replace", "delete", "destroy", "flush")
_IGNORED_OBJECTS: Final = frozenset(
    {"metainfo", "counter", "quota", "ct helper", "ct timeout", "ct expectation", "limit", "flowtable", "secmark",
     "synproxy", "tunnel"}
)  # fmt: skip


class _Builder:
    def __init__(self, document: _Document, names: Mapping[str, Mapping[str, int]]) -> None:
        self.doc = document
        self.names = names
        self.tables: dict[tuple[str, str], _TableState] = {}

    # -- objects ------------------------------------------------------------

    def run(self) -> None:
        for index, item in enumerate(self.doc.items):
            if not isinstance(item, dict) or len(item) != 1:
                raise self.doc.error(
                    index, f'expected an nftables object such as {{"rule": {{...}}}}, got {_brief(item)}'
                )
            ((key, body),) = item.items()
            if key in _VERBS:
                self.command(index, key, body)
            else:
                self.add(index, key, body, listed=True)

    def command(self, index: int, verb: str, body: Json) -> None:
        if not isinstance(body, dict) or len(body) != 1:
            raise self.doc.error(index, f"expected one object after {verb!r}, got {_brief(body)}")
        ((key, spec),) = body.items()
        if verb in ("add", "create"):
            self.add(index, key, spec)
        elif verb in ("insert", "replace") and key == "rule":
            self.add(index, key, spec, insert=verb == "insert", replace=verb == "replace")
        elif verb in ("delete", "destroy"):
            self.delete(index, key, spec, quiet=verb == "destroy")
        elif verb == "flush":
            self.flush(index, key, spec)
        else:
            raise self.doc.error(
                index, f"expected add, insert, delete or flush of a table, chain, set or rule, got {verb} {key}"
            )

    def _spec(self, index: int, key: str, spec: Json, *fields: str) -> dict[str, Json]:
        if not isinstance(spec, dict) or any(not isinstance(spec.get(f), str) for f in fields):
            raise self.doc.error(index, f"expected a {key} with {', '.join(fields)}, got {_brief(spec)}")
        return spec

    def _table(self, index: int, key: str, spec: dict[str, Json], *, create: bool = False) -> _TableState | None:
        family_name, name = spec["family"], spec["table"] if key != "table" else spec["name"]
        if family_name in _OTHER_FAMILIES:
            return None
        if family_name not in _FAMILY_OF:
            raise self.doc.error(index, f"expected family ip, ip6, inet, arp, bridge or netdev, got {family_name!r}")
        table = self.tables.get((family_name, name))
        if table is None and create:
            table = self.tables[(family_name, name)] = _TableState(family=_FAMILY_OF[family_name], name=name)
        if table is None:
            raise self.doc.error(
                index,
                f"expected a {key} of a declared table, got a {key} for table {family_name} {name}, which is not declared",
            )
        return table

    def add(
        self, index: int, key: str, spec: Json, *, insert: bool = False, replace: bool = False, listed: bool = False
    ) -> None:
        if key == "table":
            self._table(index, key, self._spec(index, key, spec, "family", "name"), create=True)
        elif key == "chain":
            spec = self._spec(index, key, spec, "family", "table", "name")
            table = self._table(index, key, spec)
            if table is not None and spec["name"] not in table.chains:
                table.chains[spec["name"]] = self.chain(index, spec)
        elif key in ("set", "map"):
            spec = self._spec(index, key, spec, "family", "table", "name")
            table = self._table(index, key, spec)
            if table is not None:
                table.sets[spec["name"]] = {**spec, "elem": list(spec.get("elem", []))}
        elif key == "element":
            spec = self._spec(index, key, spec, "family", "table", "name")
            table = self._table(index, key, spec)
            if table is not None:
                if spec["name"] not in table.sets:
                    raise self.doc.error(
                        index, f"expected elements of a declared set, got elements of {spec['name']!r}"
                    )
                table.sets[spec["name"]]["elem"].extend(spec.get("elem", []))
        elif key == "rule":
            spec = self._spec(index, key, spec, "family", "table", "chain")
            table = self._table(index, key, spec)
            if table is None:
                return
            chain = table.chains.get(spec["chain"])
            if chain is None:
                raise self.doc.error(
                    index,
                    f"expected a rule of a declared chain, got a rule for chain {spec['chain']!r} of table "
                    f"{spec['family']} {spec['table']}, which is not declared",
                )
            if not listed and ("handle" in spec or "position" in spec):
                raise self.doc.error(index, "expected a rule added by index or at the end, got one placed by handle")
            index_field = spec.get("index")
            if replace:
                raise self.doc.error(
                    index, "expected add or insert of a rule, got replace (rule handles are not tracked)"
                )
            if isinstance(index_field, int) and not listed:
                chain.rules.insert(index_field if insert else index_field + 1, (spec, index))
            elif insert:
                chain.rules.insert(0, (spec, index))
            else:
                chain.rules.append((spec, index))
        elif key in _IGNORED_OBJECTS:
            return
        else:
            raise self.doc.error(index, f"expected a table, chain, set, map, element or rule, got {key!r}")

    def chain(self, index: int, spec: dict[str, Json]) -> _ChainState:
        name = spec["name"]
        if "hook" not in spec and "type" not in spec:
            return _ChainState(name=name, base=None)
        hook = _HOOK_OF.get(spec.get("hook"))  # type: ignore[arg-type]
        if hook is None:
            return _ChainState(name=name, base=None, skipped=True)
        try:
            chain_type = ChainType(spec.get("type", "filter"))
        except ValueError:
            raise self.doc.error(index, f"expected chain type filter, nat or route, got {spec.get('type')!r}") from None
        priority = spec.get("prio", 0)
        if isinstance(priority, str) and priority in _NAMED_PRIORITIES:
            priority = _NAMED_PRIORITIES[priority]
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise self.doc.error(index, f"expected a numeric chain priority, got {priority!r}")
        policy = spec.get("policy", "accept")
        if policy not in ("accept", "drop"):
            raise self.doc.error(index, f"expected chain policy accept or drop, got {policy!r}")
        base = BaseChain(hook=hook, type=chain_type, priority=priority, policy=ChainPolicy(policy.upper()))
        return _ChainState(name=name, base=base)

    def delete(self, index: int, key: str, spec: Json, *, quiet: bool) -> None:
        if key == "table":
            spec = self._spec(index, key, spec, "family", "name")
            if (spec["family"], spec["name"]) not in self.tables and not quiet and spec["family"] in _FAMILY_OF:
                raise self.doc.error(
                    index, f"expected to delete a declared table, got table {spec['family']} {spec['name']}"
                )
            self.tables.pop((spec["family"], spec["name"]), None)
        elif key == "chain":
            spec = self._spec(index, key, spec, "family", "table", "name")
            table = self._table(index, key, spec)
            if table is not None:
                table.chains.pop(spec["name"], None)
        elif key in ("set", "map"):
            spec = self._spec(index, key, spec, "family", "table", "name")
            table = self._table(index, key, spec)
            if table is not None:
                table.sets.pop(spec["name"], None)
        else:
            raise self.doc.error(index, f"expected to delete a table, chain, set or map, got {key!r}")

    def flush(self, index: int, key: str, spec: Json) -> None:
        if key == "ruleset":
            self.tables.clear()
        elif key == "table":
            spec = self._spec(index, key, spec, "family", "name")
            table = self.tables.get((spec["family"], spec["name"]))
            if table is not None:
                for chain in table.chains.values():
                    chain.rules.clear()
        elif key == "chain":
            spec = self._spec(index, key, spec, "family", "table", "name")
            table = self._table(index, key, spec)
            if table is not None and spec["name"] in table.chains:
                table.chains[spec["name"]].rules.clear()
        else:
            raise self.doc.error(index, f"expected to flush the ruleset, a table or a chain, got {key!r}")

    # -- to IR --------------------------------------------------------------

    def ruleset(self) -> Ruleset:
        tables = []
        for state in self.tables.values():
            chains = []
            for chain in state.chains.values():
                if chain.skipped:
                    continue
                rules: list[Rule] = []
                for spec, index in chain.rules:
                    rules.extend(self.rule(state, spec, index))
                chains.append(Chain(name=chain.name, rules=tuple(rules), base=chain.base))
            tables.append(Table(family=state.family, name=state.name, chains=tuple(chains)))
        return Ruleset(tables=tuple(tables))

    def rule(self, table: _TableState, spec: dict[str, Json], index: int) -> list[Rule]:
        expr = spec.get("expr", [])
        if not isinstance(expr, list):
            raise self.doc.error(index, f"expected a rule's expr to be a list of statements, got {_brief(expr)}")
        for statement in expr:
            for target in _jump_targets(statement, table):
                if target not in table.chains:
                    raise self.doc.error(index, f"expected a jump to a declared chain, got a jump to {target!r}")
        comment = spec.get("comment") if isinstance(spec.get("comment"), str) else None
        position = self.doc.position(index)
        rules = _RuleReader(table, self.names).read(expr)
        return [attrs.evolve(rule, comment=comment, position=position) for rule in rules]


def _jump_targets(statement: Json, table: _TableState) -> Iterator[str]:
    if not isinstance(statement, dict):
        return
    for key in ("jump", "goto"):
        body = statement.get(key)
        if isinstance(body, dict) and isinstance(body.get("target"), str):
            yield body["target"]
    vmap = statement.get("vmap")
    if isinstance(vmap, dict):
        data = vmap.get("data")
        if isinstance(data, dict) and isinstance(data.get("set"), list):
            for pair in data["set"]:
                if isinstance(pair, list) and len(pair) == 2:
                    yield from _jump_targets(pair[1], table)


# ----------------------------------------------------------------------------- rules


class _Unknown(Exception):
    """Raised inside the rule reader for anything that is not modelled exactly."""


#: What a statement that nft accepts but the reader does not model raises while being read.
_NOT_MODELLED: Final = (_Unknown, KeyError, TypeError, ValueError, AttributeError, IndexError)
_VERDICTS: Final = ("accept", "drop", "return", "continue", "jump", "goto")
#: What a statement writes, for deciding whether a rule's statements may become separate IR rules.
_WRITES_MARK: Final = (SetMark, ConnmarkRestore, TProxy)
_WRITES_CTMARK: Final = (ConnmarkSave, ConnmarkSet)


class _RuleReader:
    def __init__(self, table: _TableState, names: Mapping[str, Mapping[str, int]]) -> None:
        self.table = table
        self.names = names
        self.family = table.family

    def read(self, expr: list[Json]) -> list[Rule]:
        matches: list[Match] = []
        statements: list[Json] = []
        for statement in expr:
            if not isinstance(statement, dict) or len(statement) != 1:
                return [Rule(matches=tuple(matches), target=self.unknown_target(expr))]
            ((key, _),) = statement.items()
            if key == "counter":
                continue
            if key == "match" and not statements:
                matches.extend(self.match(statement))
                continue
            if key == "xt" and not statements and _xt_kind(statement) == "match":
                matches.append(self.unknown_match(statement))
                continue
            statements.append(statement)
        try:
            rules = self.targets(matches, statements)
        except _NOT_MODELLED:
            return [Rule(matches=tuple(matches), target=self.unknown_target(statements))]
        return [_with_reset_dependency(rule) for rule in rules]

    # -- matches ---------------------------------------------------------------

    def unknown_match(self, statement: Json) -> UnknownMatch:
        return UnknownMatch(dialect=DIALECT, tokens=(canonical_json(statement),))

    def match(self, statement: Json) -> list[Match]:
        body = statement["match"]
        try:
            if not isinstance(body, dict) or body.get("op") not in ("==", "!=", "in"):
                raise _Unknown
            return self.expression_match(body["left"], body["op"] == "!=", body["right"])
        except _NOT_MODELLED:
            return [self.unknown_match(statement)]

    def expression_match(self, left: Json, negate: bool, right: Json) -> list[Match]:
        if not isinstance(left, dict) or len(left) != 1:
            raise _Unknown
        ((kind, spec),) = left.items()
        if kind == "meta":
            return self.meta_match(spec["key"], negate, right)
        if kind == "payload":
            return self.payload_match(spec["protocol"], spec["field"], negate, right)
        if kind == "ct" and set(spec) == {"key"}:
            if spec["key"] == "state":
                return [CtStateMatch(states=self.ct_states(right), negate=negate)]
            if spec["key"] == "mark":
                return [ConnmarkMatch(value=_u32(right), negate=negate)]
        if kind == "&" and isinstance(spec, list) and len(spec) == 2:
            register, mask = spec
            if register == {"meta": {"key": "mark"}}:
                return [MarkMatch(value=_u32(right), mask=_u32(mask), negate=negate)]
            if register == {"ct": {"key": "mark"}}:
                return [ConnmarkMatch(value=_u32(right), mask=_u32(mask), negate=negate)]
        if kind == "fib" and spec.get("result") == "type":
            return [self.fib_match(spec.get("flags", []), negate, right)]
        raise _Unknown

    def meta_match(self, key: str, negate: bool, right: Json) -> list[Match]:
        if key == "l4proto":
            return [ProtocolMatch(protocol=_protocol(right), negate=negate)]
        if key == "nfproto":
            families = {"ipv4": Family.IPV4, "ipv6": Family.IPV6}
            if right not in families:
                raise _Unknown
            family = families[right]
            if negate:
                family = Family.IPV6 if family is Family.IPV4 else Family.IPV4
            return [FamilyMatch(family=family)]
        if key in ("skuid", "skgid"):
            known = self.names["users" if key == "skuid" else "groups"]
            ids = IdSet(
                tuple(self.intervals(right, lambda v: _id_interval(known.get(v, v) if isinstance(v, str) else v)))
            )
            kind = OwnerKind.UID if key == "skuid" else OwnerKind.GID
            return [OwnerMatch(kind=kind, ids=ids, negate=negate, socketless=False)]
        if key in ("iifname", "oifname"):
            direction = Direction.SOURCE if key == "iifname" else Direction.DESTINATION
            return [InterfaceMatch(direction=direction, name=_interface(right), negate=negate)]
        if key == "mark":
            return [MarkMatch(value=_u32(right), negate=negate)]
        raise _Unknown

    def payload_match(self, protocol: str, field: str, negate: bool, right: Json) -> list[Match]:
        if protocol in ("ip", "ip6") and field in ("saddr", "daddr"):
            version = 4 if protocol == "ip" else 6
            if self.family is not Family.INET and self.family.version != version:
                raise _Unknown
            networks = list(self.networks(right, version))
            direction = Direction.SOURCE if field == "saddr" else Direction.DESTINATION
            return [AddressMatch(direction=direction, addresses=AddressSet(tuple(networks)), negate=negate)]
        if protocol == "ip" and field == "protocol" and self.family in (Family.IPV4, Family.INET):
            match = ProtocolMatch(protocol=_protocol(right), negate=negate)
            return [match] if self.family is Family.IPV4 else [FamilyMatch(family=Family.IPV4), match]
        if protocol in _PORT_PROTOCOLS and field in ("sport", "dport"):
            ports = PortSet(tuple(self.intervals(right, _port_interval)))
            direction = Direction.SOURCE if field == "sport" else Direction.DESTINATION
            return [PortMatch(protocol=_PORT_PROTOCOLS[protocol], ports=ports, direction=direction, negate=negate)]
        raise _Unknown

    def fib_match(self, flags: Json, negate: bool, right: Json) -> AddrTypeMatch:
        flag_set = set(flags) if isinstance(flags, list) else {flags}
        if flag_set in ({"saddr"}, {"saddr", "iif"}):
            direction = Direction.SOURCE
        elif flag_set in ({"daddr"}, {"daddr", "oif"}):
            direction = Direction.DESTINATION
        else:
            raise _Unknown
        names = [right] if isinstance(right, str) else self.elements(right)
        types = {_ADDRTYPE_OF[name] for name in names}  # KeyError: unknown
        return AddrTypeMatch(direction=direction, types=types, negate=negate, limit_interface=len(flag_set) == 2)

    def ct_states(self, right: Json) -> set[CtState]:
        if isinstance(right, str):
            names: list[Json] = [right]
        elif isinstance(right, list):
            names = right
        elif isinstance(right, dict) and "|" in right:
            names = _flatten_or(right)
        else:
            names = self.elements(right)
        states = {_CTSTATE_OF[name] for name in names}
        if not states:
            raise _Unknown
        return states

    # -- values ---------------------------------------------------------------

    def elements(self, right: Json) -> list[Json]:
        """The members of a set value (anonymous ``{"set": [...]}`` or a named ``"@name"``), or the single value."""
        if isinstance(right, dict) and "set" in right:
            members = right["set"]
            members = members if isinstance(members, list) else [members]
        elif isinstance(right, str) and right.startswith("@"):
            named = self.table.sets.get(right[1:])
            if named is None or "map" in named or set(named.get("flags", [])) & {"dynamic", "timeout"}:
                raise _Unknown  # contents not static, or not a set
            members = named["elem"]
        else:
            members = [right]
        out = []
        for member in members:
            if isinstance(member, dict) and "elem" in member:
                member = member["elem"]["val"]
            out.append(member)
        return out

    def intervals(self, right: Json, convert: Any) -> Iterator[tuple[int, int]]:
        for member in self.elements(right):
            if isinstance(member, dict) and "range" in member:
                lo, hi = member["range"]
                a, _ = convert(lo)
                _, b = convert(hi)
                if a > b:
                    raise _Unknown
                yield a, b
            else:
                yield convert(member)

    def networks(self, right: Json, version: int) -> Iterator[IPNetwork]:
        for member in self.elements(right):
            yield from _networks(member, version)

    # -- statements ---------------------------------------------------------

    def unknown_target(self, statements: list[Json]) -> UnknownTarget:
        name = next(iter(statements[0])) if statements and isinstance(statements[0], dict) and statements[0] else "?"
        if name == "xt" and isinstance(statements[0].get("xt"), dict):
            name = str(statements[0]["xt"].get("name", "xt"))
        return UnknownTarget(dialect=DIALECT, name=str(name), tokens=(canonical_json(statements),))

    def targets(self, matches: list[Match], statements: list[Json]) -> list[Rule]:
        keys = [next(iter(s)) for s in statements]
        if not statements:
            return [Rule(matches=tuple(matches), target=Continue())]
        if keys[0] == "tproxy":
            return [Rule(matches=tuple(matches), target=self.tproxy(statements))]
        if keys[-1] == "vmap" and all(k == "log" for k in keys[:-1]):
            return [
                *self.split(matches, [self.action(s) for s in statements[:-1]]),
                *self.vmap(matches, statements[-1]),
            ]
        if any(k in _VERDICTS for k in keys[:-1]):
            raise _Unknown
        return self.split(matches, [self.action(s) for s in statements])

    def split(self, matches: list[Match], targets: list[Target]) -> list[Rule]:
        """One IR rule per statement, exact while no statement writes what a match reads."""
        if len(targets) > 1:
            reads_mark = any(isinstance(m, (MarkMatch, UnknownMatch)) for m in matches)
            reads_ctmark = any(isinstance(m, (ConnmarkMatch, UnknownMatch)) for m in matches)
            for target in targets[:-1]:
                if (reads_mark and isinstance(target, _WRITES_MARK)) or (
                    reads_ctmark and isinstance(target, _WRITES_CTMARK)
                ):
                    raise _Unknown
        return [Rule(matches=tuple(matches), target=target) for target in targets]

    def tproxy(self, statements: list[Json]) -> TProxy:
        """``tproxy to [addr]:port [meta mark set ...] accept``: assign, mark, and end the chain as xt_TPROXY does."""
        keys = [next(iter(s)) for s in statements]
        if keys not in (["tproxy", "accept"], ["tproxy", "mangle", "accept"]):
            raise _Unknown
        spec = statements[0]["tproxy"]
        if (
            not isinstance(spec, dict)
            or set(spec) - {"family", "addr", "port"}
            or not isinstance(spec.get("port"), int)
        ):
            raise _Unknown
        address = _address(spec["addr"]) if "addr" in spec else None
        mark: int | None = None
        mask = FULL_MASK
        if len(keys) == 3:
            mangle = statements[1]["mangle"]
            register = {"meta": {"key": "mark"}}
            decoded = mark_function(mangle.get("value"), register) if mangle.get("key") == register else None
            if decoded is None:
                raise _Unknown
            mark, mask = decoded
        return TProxy(port=_port_interval(spec["port"])[0], address=address, mark=mark, mask=mask)

    def vmap(self, matches: list[Match], statement: Json) -> list[Rule]:
        spec = statement["vmap"]
        data = spec["data"]
        if isinstance(data, str) and data.startswith("@"):
            named = self.table.sets.get(data[1:])
            if named is None or named.get("map") != "verdict" or set(named.get("flags", [])) & {"dynamic", "timeout"}:
                raise _Unknown
            pairs = named["elem"]
        else:
            pairs = data["set"]
        groups: dict[str, tuple[Target, list[Json]]] = {}
        for pair in pairs:
            key, verdict = pair
            target = self.action(verdict)
            if not isinstance(target, (Accept, Drop, Return, Continue, Jump, Goto)):
                raise _Unknown
            groups.setdefault(canonical_json(verdict), (target, []))[1].append(key)
        rules = []
        for target, keys in sorted(groups.values(), key=lambda group: verdict_order(group[0])):
            key_matches = self.expression_match(spec["key"], False, {"set": keys})
            if len(key_matches) != 1:
                raise _Unknown
            rules.append(Rule(matches=(*matches, key_matches[0]), target=target))
        return rules

    def action(self, statement: Json) -> Target:
        ((key, spec),) = statement.items()
        if key in ("accept", "drop", "return", "continue"):
            verdicts: dict[str, Target] = {
                "accept": Accept(),
                "drop": Drop(),
                "return": Return(),
                "continue": Continue(),
            }
            return verdicts[key]
        if key in ("jump", "goto"):
            return Jump(chain=spec["target"]) if key == "jump" else Goto(chain=spec["target"])
        if key == "redirect":
            return Redirect(ports=self.nat_ports(spec, allowed={"port", "flags"}), flags=_nat_flags(spec))
        if key == "masquerade":
            return Masquerade(ports=self.nat_ports(spec, allowed={"port", "flags"}), flags=_nat_flags(spec))
        if key in ("snat", "dnat"):
            allowed = {"port", "addr", "family", "flags"}
            ports = self.nat_ports(spec, allowed=allowed)
            addresses = self.nat_addresses(spec.get("addr")) if spec and "addr" in spec else None
            flags = _nat_flags(spec)
            if key == "snat":
                return Snat(addresses=addresses, ports=ports, flags=flags)
            return Dnat(addresses=addresses, ports=ports, flags=flags)
        if key == "mangle":
            return self.mangle(spec)
        if key == "reject":
            return self.reject(spec)
        if key == "log":
            if spec is None:
                return Log()
            if set(spec) - {"prefix", "level"}:
                raise _Unknown
            level = LOG_LEVELS[spec["level"]] if "level" in spec else _DEFAULT_LOG_LEVEL
            return Log(prefix=spec.get("prefix"), level=level)
        raise _Unknown

    def nat_ports(self, spec: Json, *, allowed: set[str]) -> PortSet | None:
        if spec is None:
            return None
        if set(spec) - allowed:
            raise _Unknown  # an option the IR does not model
        if "port" not in spec:
            return None
        return PortSet(tuple(self.intervals(spec["port"], _port_interval)))

    def nat_addresses(self, value: Json) -> AddressRange:
        if isinstance(value, str):
            address = _address(value)
            return AddressRange(first=address, last=address)
        if isinstance(value, dict) and "range" in value:
            first, last = (_address(v) for v in value["range"])
            return AddressRange(first=first, last=last)
        if isinstance(value, dict) and "prefix" in value:
            network = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
            return AddressRange(first=network.network_address, last=network.broadcast_address)
        raise _Unknown

    def mangle(self, spec: Json) -> Target:
        key, value = spec["key"], spec["value"]
        mark, ctmark = {"meta": {"key": "mark"}}, {"ct": {"key": "mark"}}
        if key == mark:
            if value == ctmark:
                return ConnmarkRestore()
            decoded = mark_function(value, mark)
            if decoded is not None:
                return SetMark(value=decoded[0], mask=decoded[1])
        elif key == ctmark:
            if value == mark:
                return ConnmarkSave()
            decoded = mark_function(value, ctmark)
            if decoded is not None:
                return ConnmarkSet(value=decoded[0], mask=decoded[1])
        elif key == {"ct": {"key": "zone"}} and isinstance(value, int) and not isinstance(value, bool):
            return CtZone(zone=value)
        raise _Unknown

    def reject(self, spec: Json) -> Reject:
        defaults = {Family.IPV4: "icmp-port-unreachable", Family.IPV6: "icmp6-port-unreachable", Family.INET: None}
        if spec is None:
            return Reject(with_=defaults[self.family])
        kind, code = spec.get("type"), spec.get("expr")
        if kind == "tcp reset":
            return Reject(with_="tcp-reset")
        if kind == "icmp" and self.family is Family.IPV4:
            names = {v: k for k, v in ICMP_REJECT_CODES.items()}
        elif kind == "icmpv6" and self.family is Family.IPV6:
            names = {v: k for k, v in ICMPV6_REJECT_CODES.items()}
        elif kind == "icmpx" and code == "port-unreachable" and self.family is Family.INET:
            return Reject()
        else:
            raise _Unknown
        return Reject(with_=names[code])


def _with_reset_dependency(rule: Rule) -> Rule:
    """``reject with tcp reset`` implies a tcp match that nft does not print: put it back, first."""
    if not (isinstance(rule.target, Reject) and rule.target.with_ == "tcp-reset"):
        return rule
    tcp = ProtocolMatch(protocol=Protocol.TCP)
    if any(m == tcp or (isinstance(m, PortMatch) and m.protocol is Protocol.TCP) for m in rule.matches):
        return rule
    return attrs.evolve(rule, matches=(tcp, *rule.matches))


def verdict_order(target: Target) -> tuple[int, str]:
    """A fixed order of verdicts, so that the rules a verdict map stands for come out the same every time."""
    order = (Accept, Drop, Return, Continue, Jump, Goto)
    chain = target.chain if isinstance(target, (Jump, Goto)) else ""
    return next(i for i, kind in enumerate(order) if isinstance(target, kind)), chain


def _xt_kind(statement: Json) -> str | None:
    body = statement.get("xt")
    return body.get("type") if isinstance(body, dict) else None


def _flatten_or(value: Json) -> list[Json]:
    if isinstance(value, dict) and "|" in value:
        return [item for part in value["|"] for item in _flatten_or(part)]
    return [value]


def _u32(value: Json) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= FULL_MASK:
        raise _Unknown
    return value


def _protocol(value: Json) -> Protocol:
    if isinstance(value, bool) or value not in _PROTOCOL_OF:
        raise _Unknown
    return _PROTOCOL_OF[value]


def _port_interval(value: Json) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PORT:
        raise _Unknown  # port 0 and service names have no IR form
    return value, value


def _id_interval(value: Json) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise _Unknown  # a user or group name the caller did not map
    return value, value


def _interface(value: Json) -> str:
    if not isinstance(value, str) or not value or "\\" in value or "+" in value:
        raise _Unknown  # a literal '+' or an escaped '*' has no IR form (the IR's '+' means a prefix)
    name = str(value)
    if name.endswith("*"):
        name = name[:-1] + "+"
    if "*" in name:
        raise _Unknown
    return name


def _address(value: Json) -> IPAddress:
    if not isinstance(value, str):
        raise _Unknown
    return ipaddress.ip_address(value)


def _networks(member: Json, version: int) -> Iterable[IPNetwork]:
    if isinstance(member, str):
        address = _address(member)
        if address.version != version:
            raise _Unknown
        return [ipaddress.ip_network(address)]
    if isinstance(member, dict) and "prefix" in member:
        prefix = member["prefix"]
        network = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}")
        if network.version != version:
            raise _Unknown
        return [network]
    if isinstance(member, dict) and "range" in member:
        first, last = (_address(v) for v in member["range"])
        if first.version != version or last.version != version or int(first) > int(last):
            raise _Unknown
        return list(ipaddress.summarize_address_range(first, last))  # type: ignore[type-var]
    raise _Unknown


# ----------------------------------------------------------------------------- entry point


def read_nft_json(
    text: str | bytes | Mapping[str, Json],
    *,
    path: str = "<stdin>",
    users: Mapping[str, int] | None = None,
    groups: Mapping[str, int] | None = None,
) -> Ruleset:
    """Read an ``nft -j list ruleset`` dump (or ``nft -j -f`` input) into IR; see the module docstring.

    ``text`` may also be the already parsed document (then positions are not known). ``users`` and
    ``groups`` map the names ``meta skuid``/``skgid`` may print to ids (the reader does no lookups of
    its own); a name they do not hold makes the match unknown.
    """
    if isinstance(text, Mapping):
        text = json.dumps(text, indent=1)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    builder = _Builder(_Document(text, path), {"users": users or {}, "groups": groups or {}})
    builder.run()
    return builder.ruleset()


def _nat_flags(spec: Json) -> frozenset[NatFlag]:
    """The flags of a NAT statement (one name or a list); a flag the IR does not know is not modelled."""
    if not spec or "flags" not in spec:
        return frozenset()
    names = spec["flags"]
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or any(name not in _NAT_FLAGS for name in names):
        raise _Unknown
    return frozenset(_NAT_FLAGS[name] for name in names)
