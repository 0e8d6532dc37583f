"""The same commands as ``nft -f`` text, for people to read (and ``nft -f`` to load).

The text is printed from the JSON commands of :class:`~meshredirect_nftables.lowering.NftLowering`,
so both renderings cannot drift apart: loading either gives the kernel the
same rules (a kernel test checks it). JSON that has no text form here (an
unknown expression a reader kept) is refused.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.ir import Family
>>> from meshredirect.policy import Policy
>>> from meshredirect_nftables.lowering import NftLowering
>>> commands = NftLowering().commands(compile_policy(Policy(inbound_ports="")))[Family.IPV4]
>>> print(table_text(commands), end="")
table ip istio
delete table ip istio
table ip istio {
    chain nat-OUTPUT {
        type nat hook output priority -101; policy accept;
        meta l4proto tcp jump nat-ISTIO_OUTPUT
    }
    chain nat-ISTIO_OUTPUT {
        ip saddr 127.0.0.6 oifname "lo" return
        ip daddr != 127.0.0.1 oifname "lo" tcp dport != 15008 meta skuid 1337 jump nat-ISTIO_IN_REDIRECT
        ip daddr != 127.0.0.1 oifname "lo" tcp dport != 15008 meta skgid 1337 jump nat-ISTIO_IN_REDIRECT
        meta skuid 1337 return
        meta skgid 1337 return
        oifname "lo" return
        ip daddr 127.0.0.1 return
        jump nat-ISTIO_REDIRECT
    }
    chain nat-ISTIO_REDIRECT {
        meta l4proto tcp redirect to :15001
    }
    chain nat-ISTIO_IN_REDIRECT {
        meta l4proto tcp redirect to :15006
    }
}
"""

from __future__ import annotations

import re
from typing import Any, Final

from meshredirect.errors import UnsupportedError

__all__ = ["expression_text", "statement_text", "table_text"]

Json = Any

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_/.-]*$")
_META_PLAIN: Final = frozenset({"iifname", "oifname"})
#: Values printed in hexadecimal (marks), keyed by the expression they are compared with or set to.
_HEX_KEYS: Final = ({"meta": {"key": "mark"}}, {"ct": {"key": "mark"}})
BACKEND: Final = "nftables"


class _NoText(Exception):
    pass


def _name(text: str) -> str:
    if _IDENTIFIER.match(text):
        return text
    if '"' in text:
        raise _NoText(text)
    return f'"{text}"'


def _string(text: str) -> str:
    if '"' in text or "\\" in text[:-1]:
        raise _NoText(text)
    return f'"{text}"'


def expression_text(expression: Json, *, hex_numbers: bool = False, quote: bool = False) -> str:
    """One nft expression (left or right side) as text.

    >>> expression_text({"payload": {"protocol": "ip", "field": "daddr"}})
    'ip daddr'
    >>> expression_text({"set": [22, {"range": [15020, 15021]}]})
    '{ 22, 15020-15021 }'
    """
    if isinstance(expression, bool) or expression is None:
        raise _NoText(expression)
    if isinstance(expression, int):
        return hex(expression) if hex_numbers else str(expression)
    if isinstance(expression, str):
        return _string(expression) if quote else expression
    if isinstance(expression, list):
        return ",".join(expression_text(e, hex_numbers=hex_numbers, quote=quote) for e in expression)
    if not isinstance(expression, dict) or len(expression) != 1:
        raise _NoText(expression)
    ((kind, spec),) = expression.items()
    if kind == "meta":
        return spec["key"] if spec["key"] in _META_PLAIN else f"meta {spec['key']}"
    if kind == "payload":
        return f"{spec['protocol']} {spec['field']}"
    if kind == "ct" and set(spec) == {"key"}:
        return f"ct {spec['key']}"
    if kind == "fib":
        return f"fib {' . '.join(spec['flags'])} {spec['result']}"
    if kind in ("&", "|", "^"):
        left, right = spec
        return f"{expression_text(left, hex_numbers=True)} {kind} {expression_text(right, hex_numbers=True)}"
    if kind == "prefix":
        return f"{spec['addr']}/{spec['len']}"
    if kind == "range":
        low, high = (expression_text(v, hex_numbers=hex_numbers, quote=quote) for v in spec)
        return f"{low}-{high}"
    if kind == "set":
        return "{ " + ", ".join(expression_text(e, hex_numbers=hex_numbers, quote=quote) for e in spec) + " }"
    raise _NoText(expression)


def statement_text(statement: Json) -> str:
    """One statement of a rule as text.

    >>> statement_text({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "eth*"}})
    'oifname != "eth*"'
    >>> statement_text({"tproxy": {"port": 15006}})
    'tproxy to :15006'
    """
    ((kind, spec),) = statement.items()
    kind = str(kind)
    if kind == "match":
        left = spec["left"]
        hex_numbers = left in _HEX_KEYS or (isinstance(left, dict) and "&" in left)
        quote = left in ({"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}})
        op = "" if spec["op"] in ("==", "in") else f"{spec['op']} "
        right = expression_text(spec["right"], hex_numbers=hex_numbers, quote=quote)
        return f"{expression_text(left)} {op}{right}"
    if kind in ("accept", "drop", "return", "continue"):
        return kind
    if kind == "vmap":
        pairs = ", ".join(f"{expression_text(key)} : {statement_text(verdict)}" for key, verdict in spec["data"]["set"])
        return f"{expression_text(spec['key'])} vmap {{ {pairs} }}"
    if kind in ("jump", "goto"):
        return f"{kind} {_name(spec['target'])}"
    if kind == "counter":
        return "counter"
    if kind in ("redirect", "masquerade", "snat", "dnat"):
        if spec is None:
            return kind
        family = f" {spec['family']}" if "family" in spec else ""
        address = expression_text(spec["addr"]) if "addr" in spec else ""
        if ":" in address and "port" in spec:
            address = f"[{address}]"
        port = f":{expression_text(spec['port'])}" if "port" in spec else ""
        flags = spec.get("flags", [])
        flags_text = " " + ",".join([flags] if isinstance(flags, str) else flags) if flags else ""
        to = f" to {address}{port}" if address or port else ""
        return f"{kind}{family}{to}{flags_text}"
    if kind == "tproxy":
        family = f" {spec['family']}" if "family" in spec else ""
        address = spec.get("addr", "")
        if ":" in address:
            address = f"[{address}]"
        return f"tproxy{family} to {address}:{spec['port']}"
    if kind == "mangle":
        key = spec["key"]
        hex_numbers = key in _HEX_KEYS
        return f"{expression_text(key)} set {expression_text(spec['value'], hex_numbers=hex_numbers)}"
    if kind == "reject":
        if spec is None:
            return "reject"
        if spec.get("type") == "tcp reset":
            return "reject with tcp reset"
        return f"reject with {spec['type']} type {spec['expr']}"
    if kind == "log":
        if spec is None:
            return "log"
        parts = ["log"]
        if "prefix" in spec:
            parts.append(f"prefix {_string(spec['prefix'])}")
        if "level" in spec:
            parts.append(f"level {spec['level']}")
        return " ".join(parts)
    raise _NoText(statement)


def table_text(commands: list[Json]) -> str:
    """The text of one table's replace transaction (as :meth:`~meshredirect_nftables.lowering.NftLowering.table_commands` writes it)."""
    head: list[str] = []
    chains: dict[str, list[str]] = {}
    declared: dict[str, str] = {}
    table = ""
    for command in commands:
        ((verb, body),) = command.items()
        ((kind, spec),) = body.items()
        try:
            if kind == "table":
                table = f"{spec['family']} {_name(spec['name'])}"
                if verb == "delete":
                    head.append(f"delete table {table}")
                elif not head or head[-1].startswith("delete"):
                    head.append(f"table {table}")
            elif kind == "chain":
                chains[spec["name"]] = []
                if "hook" in spec:
                    declared[spec["name"]] = (
                        f"type {spec['type']} hook {spec['hook']} priority {spec['prio']}; policy {spec['policy']};"
                    )
            elif kind == "rule":
                text = " ".join(statement_text(s) for s in spec["expr"])
                if "comment" in spec:
                    text += f" comment {_string(spec['comment'])}"
                chains[spec["chain"]].append(text)
            else:
                raise _NoText(command)
        except (_NoText, KeyError, TypeError, ValueError) as exc:
            raise UnsupportedError(BACKEND, command, f"no nft text form for {exc}") from None
    lines = [*head[:-1], f"{head[-1]} {{"] if head else []
    for name, rules in chains.items():
        lines.append(f"    chain {_name(name)} {{")
        if name in declared:
            lines.append(f"        {declared[name]}")
        lines += [f"        {rule}" for rule in rules]
        lines.append("    }")
    lines.append("}")
    return "".join(line + "\n" for line in lines)
