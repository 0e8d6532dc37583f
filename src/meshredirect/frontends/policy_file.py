"""Policy files: a small, readable language for a :class:`~meshredirect.policy.Policy`, and its formatter.

One statement per line, ``#`` comments; each statement sets part of the policy
with clauses, and what the file leaves out comes from its ``preset`` (Istio's
production setting without one). The grammar is ``policy.lark`` next to this
module; the parser is built on first use and cached.

>>> policy = parse_policy('''
... preset istio
... proxy uid 1337 gid 1337          # the sidecar's user
... inbound capture 15006 except ports 22, 15020
... outbound capture 15001 except cidr 10.96.0.0/12
... ''')
>>> str(policy.inbound_ports_exclude), str(policy.outbound_cidrs_exclude)
('22,15020', '10.96.0.0/12')
>>> print(format_policy(policy), end="")
preset istio
inbound except ports 22, 15020
outbound except cidr 10.96.0.0/12

Errors say where, with the line and a caret, and suggest the keyword meant:

>>> parse_policy("outbund capture 15001\\n", path="mesh.policy")
Traceback (most recent call last):
...
meshredirect.errors.SourceError: mesh.policy:1:1: unexpected 'outbund': expected a statement: chains, dns, drop, families, groups, inbound, interfaces, layout, loopback, outbound, passthrough, preset, proxy (did you mean 'outbound'?)
    outbund capture 15001
    ^

Statements and clauses (``LIST`` is comma separated; ``*`` is everything, ``none`` nothing):

================  ==============================================================================
``preset``        ``preset NAME`` (first statement): istio, istio-1.4, linkerd, kuma
``proxy``         ``uid IDS`` ``gid IDS``
``inbound``       ``capture PORT`` ``ports LIST|*`` ``except ports LIST`` ``tunnel PORT|none``
                  ``mode redirect|tproxy`` ``mark N`` ``table N``
``outbound``      ``capture PORT`` ``cidr LIST|*`` ``also ports LIST`` (captured whatever the
                  address) ``except cidr LIST`` ``except ports LIST``
``dns``           ``capture PORT`` | ``off`` [``port PORT``], ``all``, ``servers LIST``
``interfaces``    ``exclude NAMES`` ``reroute NAMES``
``groups``        ``include NAMES|*`` ``exclude NAMES`` (owner groups, captured or not outbound)
``loopback``      ``cidr CIDR`` ``capture proxy|all|none``
``passthrough``   ``ADDRESS[, ADDRESS]`` (the proxy's inbound passthrough source, IPv4 and IPv6)
``families``      ``ipv4[, ipv6]``
``drop``          ``invalid [off]``
``chains``        ``prefix NAME``
``layout``        ``multiport | one-rule-per-port``
================  ==============================================================================
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

from meshredirect.errors import PolicyError, SourceError, SourcePosition, UnsafePolicyError
from meshredirect.ir import Family
from meshredirect.policy import DnsCapture, InterceptionMode, LoopbackCapture, Policy
from meshredirect.values import ALL, AddressSet, All, IdSet, PortSet, network_of

if TYPE_CHECKING:
    from lark import Lark

__all__ = ["Setting", "Statement", "format_file", "format_policy", "parse_policy", "parse_statements"]

GRAMMAR: Final = "policy.lark"
#: Statement keywords, in canonical order.
STATEMENTS: Final = (
    "preset",
    "proxy",
    "inbound",
    "outbound",
    "dns",
    "interfaces",
    "groups",
    "loopback",
    "passthrough",
    "families",
    "drop",
    "chains",
    "layout",
)
#: Policy field -> how errors and the formatter name it.
LABELS: Final = {
    "preset": "preset",
    "proxy_uids": "proxy uid",
    "proxy_gids": "proxy gid",
    "inbound_port": "inbound capture",
    "inbound_ports": "inbound ports",
    "inbound_ports_exclude": "inbound except ports",
    "inbound_tunnel_port": "inbound tunnel",
    "inbound_mode": "inbound mode",
    "tproxy_mark": "inbound mark",
    "tproxy_route_table": "inbound table",
    "outbound_port": "outbound capture",
    "outbound_cidrs": "outbound cidr",
    "outbound_ports": "outbound also ports",
    "outbound_cidrs_exclude": "outbound except cidr",
    "outbound_ports_exclude": "outbound except ports",
    "dns.enabled": "dns capture",
    "dns.port": "dns port",
    "dns.capture_all": "dns all",
    "dns.servers": "dns servers",
    "exclude_interfaces": "interfaces exclude",
    "reroute_interfaces": "interfaces reroute",
    "owner_groups_include": "groups include",
    "owner_groups_exclude": "groups exclude",
    "loopback_cidr": "loopback cidr",
    "loopback_capture": "loopback capture",
    "passthrough_ipv4": "passthrough",
    "passthrough_ipv6": "passthrough",
    "families": "families",
    "drop_invalid": "drop invalid",
    "chain_prefix": "chains prefix",
    "one_rule_per_port": "layout",
}
#: Statement -> the fields it sets, in canonical clause order.
FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "preset": ("preset",),
    "proxy": ("proxy_uids", "proxy_gids"),
    "inbound": (
        "inbound_port",
        "inbound_ports",
        "inbound_ports_exclude",
        "inbound_tunnel_port",
        "inbound_mode",
        "tproxy_mark",
        "tproxy_route_table",
    ),
    "outbound": (
        "outbound_port",
        "outbound_cidrs",
        "outbound_ports",
        "outbound_cidrs_exclude",
        "outbound_ports_exclude",
    ),
    "dns": ("dns.enabled", "dns.port", "dns.capture_all", "dns.servers"),
    "interfaces": ("exclude_interfaces", "reroute_interfaces"),
    "groups": ("owner_groups_include", "owner_groups_exclude"),
    "loopback": ("loopback_cidr", "loopback_capture"),
    "passthrough": ("passthrough_ipv4", "passthrough_ipv6"),
    "families": ("families",),
    "drop": ("drop_invalid",),
    "chains": ("chain_prefix",),
    "layout": ("one_rule_per_port",),
}
_BARE_NAME = re.compile(r"^[A-Za-z0-9_.@:$+-]+$")
_KEYWORDS_IN_NAMES: Final = frozenset({"none", "exclude", "reroute", "include"})


@attrs.frozen(kw_only=True)
class Setting:
    """One field set by a clause, with where the clause starts."""

    field: str
    value: object
    line: int
    column: int
    #: Set by implication (``servers`` without ``all`` turns ``all`` off), never printed.
    implied: bool = False


@attrs.frozen(kw_only=True)
class Statement:
    """One line of a policy file: its keyword and the fields its clauses set."""

    keyword: str
    settings: tuple[Setting, ...]
    line: int
    column: int

    def values(self) -> dict[str, object]:
        return {s.field: s.value for s in self.settings}


# ----------------------------------------------------------------------------- parsing


@functools.cache
def _parser() -> Lark:
    from importlib.resources import files

    from lark import Lark

    grammar = files("meshredirect.frontends").joinpath(GRAMMAR).read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False)


def parse_statements(text: str, *, path: str = "<policy>") -> tuple[Statement, ...]:
    """The statements of a policy file, values converted and checked one by one (no policy built yet)."""
    from lark.exceptions import UnexpectedInput

    source = text if text.endswith("\n") else text + "\n"
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source, path) from None
    builder = _StatementBuilder(source.splitlines(), path)
    return tuple(builder.statement(child) for child in tree.children)


def parse_policy(text: str, *, path: str = "<policy>") -> Policy:
    """Read a policy file into a :class:`~meshredirect.policy.Policy` (see the module docstring)."""
    statements = parse_statements(text, path=path)
    return _build(statements, text.splitlines(), path)


def _position(lines: Sequence[str], path: str, line: int, column: int) -> SourcePosition:
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    return SourcePosition(path, line, column, text.rstrip("\r\n"))


def _keyword_of(terminal: str) -> str | None:
    """The literal text of a keyword terminal, or None for a pattern (ports, addresses, names)."""
    for term in _parser().terminals:
        if term.name == terminal and term.pattern.type == "str":
            return str(term.pattern.value)
    return {"FAMILY": "ipv4", "_NL": "the end of the line"}.get(terminal)


_DESCRIPTIONS: Final = {
    "PORT": "a port number",
    "PORTS": "a port or a range low-high",
    "NUMBER": "a number",
    "ADDRESS": "an IP address or CIDR",
    "NAME": "a name",
    "WORD": "a name",
    "STRING": 'a quoted "name"',
    "FAMILY": "ipv4 or ipv6",
    "_NL": "the end of the line",
}


def _syntax_error(exc: Any, source: str, path: str) -> SourceError:
    from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

    lines = source.splitlines()
    line, column = max(getattr(exc, "line", 1), 1), max(getattr(exc, "column", 1), 1)
    expected: set[str] = set()
    if isinstance(exc, UnexpectedToken):
        expected = set(exc.expected)
        if exc.interactive_parser is not None:
            # The parse table merges the followers of shared rules (lists); ask what really fits here.
            expected = _accepts(exc.interactive_parser) or expected
        if exc.token.type == "$END":
            line, column = len(lines), len(lines[-1]) + 1 if lines else 1
    elif isinstance(exc, UnexpectedCharacters):
        expected = set(exc.allowed or ())
        try:
            # As above: replay the text before the bad character and ask what fits there.
            replay = _parser().parse_interactive(source[: exc.pos_in_stream])
            replay.exhaust_lexer()
            expected = _accepts(replay) or expected
        except UnexpectedInput:
            pass
    expected.discard("$END")
    current = lines[line - 1] if 0 < line <= len(lines) else ""
    match = re.match(r"[^\s,#]+", current[column - 1 :])
    at_end = column > len(current.rstrip())
    found = match.group(0) if match else ("the end of the line" if at_end else current[column - 1])
    keywords = sorted({k for k in (_keyword_of(t) for t in expected) if k and _is_keyword(k)})
    others = sorted({_DESCRIPTIONS[t] for t in expected if t in _DESCRIPTIONS and _keyword_of(t) in (None, "ipv4")})
    others = [o for o in others if o != "the end of the line"] + (["the end of the line"] if "_NL" in expected else [])
    if set(STATEMENTS) <= set(keywords):
        wanted = "a statement: " + ", ".join(sorted(STATEMENTS))
        keywords = sorted(STATEMENTS)
    else:
        shown = [repr(k) if not k[0].isalnum() else k for k in keywords] + others
        wanted = shown[0] if len(shown) == 1 else "one of: " + ", ".join(shown) if shown else "something else"
    close = difflib.get_close_matches(found, keywords, n=1, cutoff=0.6) if found.isidentifier() else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = repr(found) if found != "the end of the line" else found
    return SourceError(_position(lines, path, line, column), f"unexpected {what}: expected {wanted}{hint}")


def _accepts(interactive: Any) -> set[str]:
    return set(interactive.accepts())


def _is_keyword(text: str) -> bool:
    return text != "the end of the line"


class _StatementBuilder:
    """Turns parse trees into :class:`Statement`s, converting each value where its token stands."""

    def __init__(self, lines: Sequence[str], path: str) -> None:
        self.lines = lines
        self.path = path

    def fail(self, line: int, column: int, message: str) -> SourceError:
        return SourceError(_position(self.lines, self.path, line, column), message)

    def statement(self, tree: Any) -> Statement:
        keyword = str(tree.data)
        settings: list[Setting] = []
        meta = tree.meta
        if keyword in ("preset", "families", "drop", "chains", "layout", "passthrough"):
            settings += self.single(keyword, tree)
        else:
            for clause in tree.children:
                if not hasattr(clause, "type"):  # keyword tokens carry nothing
                    settings += self.clause(str(clause.data), clause)
        seen: dict[str, Setting] = {}
        for setting in settings:
            if setting.field in seen and not setting.implied:
                first = seen[setting.field]
                raise self.fail(
                    setting.line,
                    setting.column,
                    f"{LABELS[setting.field]} is already set in this statement (column {first.column})",
                )
            seen[setting.field] = setting
        if "dns.servers" in seen and "dns.capture_all" not in seen:
            at = seen["dns.servers"]
            settings.append(Setting(field="dns.capture_all", value=False, line=at.line, column=at.column, implied=True))
        return Statement(keyword=keyword, settings=tuple(settings), line=meta.line, column=meta.column)

    # -- statements without clauses ------------------------------------------------

    def single(self, keyword: str, tree: Any) -> list[Setting]:
        tokens = [t for t in tree.children if hasattr(t, "type")]

        def at(field: str, value: object, token: Any = None) -> Setting:
            where = token if token is not None else tree.meta
            return Setting(field=field, value=value, line=where.line, column=where.column)

        if keyword == "preset":
            return [at("preset", str(tokens[-1]), tokens[-1])]
        if keyword == "chains":
            return [at("chain_prefix", str(tokens[-1]), tokens[-1])]
        if keyword == "layout":
            return [at("one_rule_per_port", str(tokens[-1]) == "one-rule-per-port", tokens[-1])]
        if keyword == "drop":
            return [at("drop_invalid", not any(t.type == "OFF" for t in tokens))]
        if keyword == "families":
            names = [t for t in tokens if t.type == "FAMILY"]
            seen: set[str] = set()
            for token in names:
                if str(token) in seen:
                    raise self.fail(token.line, token.column, f"families: {token} is listed twice")
                seen.add(str(token))
            return [at("families", frozenset(Family(str(t)) for t in names))]
        # passthrough: one address per family
        found: dict[int, Setting] = {}
        for token in (t for t in tokens if t.type == "ADDRESS"):
            try:
                address = ipaddress.ip_address(str(token))
            except ValueError:
                raise self.fail(
                    token.line, token.column, f"passthrough: expected an IPv4 or IPv6 address, got {str(token)!r}"
                ) from None
            if address.version in found:
                raise self.fail(
                    token.line, token.column, f"passthrough: expected one IPv{address.version} address, got a second"
                )
            field = "passthrough_ipv4" if address.version == 4 else "passthrough_ipv6"
            found[address.version] = at(field, address, token)
        return list(found.values())

    # -- clauses -------------------------------------------------------------------

    def clause(self, name: str, tree: Any) -> list[Setting]:
        meta = tree.meta
        children = list(tree.children)
        tokens = [c for c in children if hasattr(c, "type")]
        lists = [c for c in children if not hasattr(c, "type")]

        def at(field: str, value: object) -> Setting:
            return Setting(field=field, value=value, line=meta.line, column=meta.column)

        def port(field: str) -> int:
            token = next(t for t in tokens if t.type == "PORT")
            return self.port(token, field)

        match name:
            case "proxy_uid":
                return [at("proxy_uids", self.ids(lists[0], "proxy_uids"))]
            case "proxy_gid":
                return [at("proxy_gids", self.ids(lists[0], "proxy_gids"))]
            case "inbound_capture":
                return [at("inbound_port", port("inbound_port"))]
            case "inbound_ports":
                return [at("inbound_ports", self.ports(lists[0], "inbound_ports"))]
            case "inbound_except_ports":
                return [at("inbound_ports_exclude", self.ports(lists[0], "inbound_ports_exclude"))]
            case "inbound_tunnel":
                if any(t.type == "NONE" for t in tokens):
                    return [at("inbound_tunnel_port", None)]
                return [at("inbound_tunnel_port", port("inbound_tunnel_port"))]
            case "inbound_mode":
                mode = next(t for t in tokens if t.type in ("REDIRECT", "TPROXY"))
                return [at("inbound_mode", InterceptionMode(str(mode).upper()))]
            case "inbound_mark":
                return [at("tproxy_mark", self.number(tokens[-1], "tproxy_mark"))]
            case "inbound_table":
                return [at("tproxy_route_table", self.number(tokens[-1], "tproxy_route_table"))]
            case "outbound_capture":
                return [at("outbound_port", port("outbound_port"))]
            case "outbound_cidr":
                return [at("outbound_cidrs", self.addresses(lists[0], "outbound_cidrs"))]
            case "outbound_also_ports":
                return [at("outbound_ports", self.ports(lists[0], "outbound_ports"))]
            case "outbound_except_cidr":
                return [at("outbound_cidrs_exclude", self.addresses(lists[0], "outbound_cidrs_exclude"))]
            case "outbound_except_ports":
                return [at("outbound_ports_exclude", self.ports(lists[0], "outbound_ports_exclude"))]
            case "dns_capture":
                return [at("dns.enabled", True), at("dns.port", port("dns.port"))]
            case "dns_off":
                return [at("dns.enabled", False)]
            case "dns_port":
                return [at("dns.port", port("dns.port"))]
            case "dns_all":
                return [at("dns.capture_all", True)]
            case "dns_servers":
                return [at("dns.servers", self.hosts(lists[0], "dns.servers"))]
            case "interfaces_exclude":
                return [at("exclude_interfaces", self.names(lists[0]))]
            case "interfaces_reroute":
                return [at("reroute_interfaces", self.names(lists[0]))]
            case "groups_include":
                if any(t.type == "STAR" for t in tokens):
                    return [at("owner_groups_include", ALL)]
                return [at("owner_groups_include", self.groups(lists[0]))]
            case "groups_exclude":
                return [at("owner_groups_exclude", self.groups(lists[0]))]
            case "loopback_cidr":
                token = tokens[-1]
                try:
                    return [at("loopback_cidr", network_of(str(token), field="loopback cidr"))]
                except PolicyError as exc:
                    raise self.fail(token.line, token.column, str(exc)) from None
            case "loopback_capture":
                return [at("loopback_capture", LoopbackCapture(str(tokens[-1]).lower()))]
        raise AssertionError(f"clause {name} has no builder")  # the grammar and this match go together

    # -- values --------------------------------------------------------------------

    def port(self, token: Any, field: str) -> int:
        value = int(str(token))
        if not 1 <= value <= 65535:
            raise self.fail(token.line, token.column, f"{LABELS[field]}: expected a port number 1-65535, got {value}")
        return value

    def number(self, token: Any, field: str) -> int:
        del field  # the policy checks the range and names the field
        text = str(token)
        return int(text, 16) if text[:2].lower() == "0x" else int(text)

    def _items(self, tree: Any) -> tuple[list[Any], bool, bool]:
        """The item tokens of a list, and whether it is ``*`` / ``none``."""
        tokens: list[Any] = []
        for child in tree.children:
            if hasattr(child, "type"):
                tokens.append(child)
            else:
                tokens += [c for c in child.children if hasattr(c, "type")]
        star = any(t.type == "STAR" for t in tokens)
        none = any(t.type == "NONE" for t in tokens)
        return [t for t in tokens if t.type not in ("STAR", "NONE")], star, none

    def ports(self, tree: Any, field: str) -> PortSet | All:
        items, star, _none = self._items(tree)
        if star:
            return ALL
        intervals: list[tuple[int, int]] = []
        for token in items:
            try:
                intervals += PortSet.parse(str(token), field=LABELS[field]).intervals
            except PolicyError as exc:
                raise self.fail(token.line, token.column, str(exc)) from None
        return PortSet(tuple(intervals))

    def ids(self, tree: Any, field: str) -> IdSet:
        items, _star, _none = self._items(tree)
        intervals: list[tuple[int, int]] = []
        for token in items:
            try:
                intervals += IdSet.parse(str(token), field=LABELS[field]).intervals
            except PolicyError as exc:
                raise self.fail(token.line, token.column, str(exc)) from None
        return IdSet(tuple(intervals))

    def addresses(self, tree: Any, field: str) -> AddressSet | All:
        items, star, _none = self._items(tree)
        if star:
            return ALL
        networks = []
        for token in items:
            try:
                networks.append(network_of(str(token), field=LABELS[field]))
            except PolicyError as exc:
                raise self.fail(token.line, token.column, str(exc)) from None
        return AddressSet(tuple(networks))

    def hosts(self, tree: Any, field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        items, _star, _none = self._items(tree)
        out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for token in items:
            try:
                out.append(ipaddress.ip_address(str(token)))
            except ValueError:
                raise self.fail(
                    token.line, token.column, f"{LABELS[field]}: expected an IPv4 or IPv6 address, got {str(token)!r}"
                ) from None
        return tuple(out)

    def names(self, tree: Any) -> tuple[str, ...]:
        tokens = [c for c in tree.children if hasattr(c, "type")]
        if len(tokens) == 1 and tokens[0].type == "WORD" and str(tokens[0]) == "none":
            return ()
        return tuple(str(t)[1:-1] if t.type == "STRING" else str(t) for t in tokens)

    def groups(self, tree: Any) -> tuple[int | str, ...]:
        return tuple(int(n) if n.isdigit() else n for n in self.names(tree))


# ----------------------------------------------------------------------------- building the policy


def _build(statements: Sequence[Statement], lines: Sequence[str], path: str) -> Policy:
    from meshredirect.presets import preset

    def fail(setting: Setting | Statement | None, message: str) -> SourceError:
        line, column = (setting.line, setting.column) if setting is not None else (1, 1)
        return SourceError(_position(lines, path, line, column), message)

    base = Policy()
    where: dict[str, Setting] = {}
    preset_statement: Statement | None = None
    for index, statement in enumerate(statements):
        if statement.keyword == "preset":
            setting = statement.settings[0]
            if index:
                raise fail(setting, "preset: expected the preset as the first statement (what follows changes it)")
            try:
                base = preset(str(setting.value))
            except PolicyError as exc:
                raise fail(setting, str(exc)) from None
            preset_statement = statement
            continue
        for setting in statement.settings:
            if setting.implied:
                continue
            if setting.field in where:
                first = where[setting.field]
                raise fail(setting, f"{LABELS[setting.field]} is already set on line {first.line}")
            where[setting.field] = setting
    # What a clause implies (``servers`` without ``all``) gives way to what another says outright.
    for statement in statements:
        for setting in statement.settings:
            if setting.implied:
                where.setdefault(setting.field, setting)
    fields: dict[str, object] = {f: s.value for f, s in where.items() if not f.startswith("dns.")}
    dns = {f.removeprefix("dns."): s.value for f, s in where.items() if f.startswith("dns.")}
    try:
        if dns:
            fields["dns"] = DnsCapture(**{**attrs.asdict(base.dns, recurse=False), **dns})
        return attrs.evolve(base, **fields)
    except PolicyError as exc:
        found = where.get(exc.field) or (where.get("dns.enabled") if exc.field.startswith("dns") else None)
        label = LABELS.get(exc.field, exc.field)
        origin: Setting | Statement | None = found if found is not None else preset_statement
        if found is None:
            label = f"{label} (from the preset)" if preset_statement is not None else f"{label} (the default)"
        if isinstance(exc, UnsafePolicyError):
            raise fail(origin, f"{label}: refused: {exc.reason} (given: {_show(exc.got)})") from None
        raise fail(origin, f"{label}: expected {exc.expected}, got {_show(exc.got)}") from None


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------- printing


def _list(items: Iterable[str]) -> str:
    shown = list(items)
    return ", ".join(shown) if shown else "none"


def _name(name: str) -> str:
    if _BARE_NAME.match(name) and name not in _KEYWORDS_IN_NAMES:
        return name
    return f'"{name}"'


def _render_value(field: str, value: object) -> str:
    if isinstance(value, All):
        return "*"
    if isinstance(value, (PortSet, IdSet)):
        return _list(str(value).split(",")) if value else "none"
    if isinstance(value, AddressSet):
        return _list(str(n) for n in value)
    if field in ("exclude_interfaces", "reroute_interfaces", "owner_groups_include", "owner_groups_exclude"):
        return _list(_name(str(v)) for v in value)  # type: ignore[attr-defined]
    if field == "dns.servers":
        return _list(str(v) for v in value)  # type: ignore[attr-defined]
    if field == "inbound_tunnel_port":
        return "none" if value is None else str(value)
    if isinstance(value, InterceptionMode):
        return value.value.lower()
    if isinstance(value, LoopbackCapture):
        return value.value
    return str(value)


_CLAUSES: Final = {
    "proxy_uids": "uid",
    "proxy_gids": "gid",
    "inbound_port": "capture",
    "inbound_ports": "ports",
    "inbound_ports_exclude": "except ports",
    "inbound_tunnel_port": "tunnel",
    "inbound_mode": "mode",
    "tproxy_mark": "mark",
    "tproxy_route_table": "table",
    "outbound_port": "capture",
    "outbound_cidrs": "cidr",
    "outbound_ports": "also ports",
    "outbound_cidrs_exclude": "except cidr",
    "outbound_ports_exclude": "except ports",
    "exclude_interfaces": "exclude",
    "reroute_interfaces": "reroute",
    "owner_groups_include": "include",
    "owner_groups_exclude": "exclude",
    "loopback_cidr": "cidr",
    "loopback_capture": "capture",
}


def render_statement(keyword: str, values: Mapping[str, object]) -> str:
    """One statement in canonical form from the fields it sets."""
    parts = [keyword]
    if keyword == "preset":
        parts.append(str(values["preset"]))
    elif keyword == "dns":
        if "dns.enabled" in values:
            parts.append(f"capture {values.get('dns.port', 15053)}" if values["dns.enabled"] else "off")
        if "dns.port" in values and not values.get("dns.enabled"):
            parts.append(f"port {values['dns.port']}")
        if values.get("dns.capture_all"):
            parts.append("all")
        if "dns.servers" in values:
            parts.append(f"servers {_render_value('dns.servers', values['dns.servers'])}")
    elif keyword == "passthrough":
        parts.append(", ".join(str(values[f]) for f in FIELDS["passthrough"] if f in values))
    elif keyword == "families":
        parts.append(", ".join(sorted(f.value for f in values["families"])))  # type: ignore[attr-defined]
    elif keyword == "drop":
        parts.append("invalid" if values["drop_invalid"] else "invalid off")
    elif keyword == "chains":
        parts.append(f"prefix {values['chain_prefix']}")
    elif keyword == "layout":
        parts.append("one-rule-per-port" if values["one_rule_per_port"] else "multiport")
    else:
        for field in FIELDS[keyword]:
            if field in values:
                parts.append(f"{_CLAUSES[field]} {_render_value(field, values[field])}")
    return " ".join(parts)


def _differences(policy: Policy, base: Policy) -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = []
    for keyword in STATEMENTS[1:]:
        if keyword == "dns":
            if policy.dns != base.dns:
                values: dict[str, object] = {"dns.enabled": policy.dns.enabled, "dns.port": policy.dns.port}
                if policy.dns.capture_all:
                    values["dns.capture_all"] = True
                if policy.dns.servers or (not policy.dns.capture_all and base.dns.capture_all):
                    values["dns.servers"] = policy.dns.servers
                out.append((keyword, values))
            continue
        changed = {f: getattr(policy, f) for f in FIELDS[keyword] if getattr(policy, f) != getattr(base, f)}
        if keyword == "passthrough" and changed:
            changed = {f: getattr(policy, f) for f in FIELDS[keyword]}
        if changed:
            out.append((keyword, changed))
    return out


def format_policy(policy: Policy, *, base: str | None = None) -> str:
    """A policy file for ``policy``: its closest preset, then what differs from it (one statement per line).

    ``base`` names the preset to start from; by default the one that needs the fewest clauses.
    """
    from meshredirect.presets import PRESETS, preset

    names = [base] if base is not None else list(PRESETS)

    def cost(name: str) -> int:
        return sum(len(values) for _k, values in _differences(policy, preset(name)))

    best = min(names, key=cost)
    lines = [render_statement("preset", {"preset": best})]
    lines += [render_statement(keyword, values) for keyword, values in _differences(policy, preset(best))]
    return "\n".join(lines) + "\n"


def format_file(text: str, *, path: str = "<policy>") -> str:
    """A policy file in canonical form, its comments kept: clauses in order, lists normalised, one space apart.

    The file must be valid (it is read as a policy first, so errors are reported as by :func:`parse_policy`).

    >>> print(format_file("# mesh\\noutbound  except ports 6379,5432   capture 15001 # db\\n\\n\\ndrop invalid\\n"), end="")
    # mesh
    outbound capture 15001 except ports 5432, 6379  # db
    <BLANKLINE>
    drop invalid
    """
    statements = parse_statements(text, path=path)
    _build(statements, text.splitlines(), path)
    by_line = {s.line: s for s in statements}
    out: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        comment = _comment_of(raw)
        statement = by_line.get(number)
        if statement is not None:
            line = render_statement(statement.keyword, statement.values())
            out.append(f"{line}  {comment}" if comment else line)
        elif comment:
            out.append(comment)
        elif out and out[-1] != "":
            out.append("")
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def _comment_of(line: str) -> str:
    """The ``#`` comment of a line (outside quoted names), stripped; empty when none."""
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[index:].rstrip()
    return ""
