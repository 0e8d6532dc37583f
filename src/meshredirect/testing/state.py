"""Everything a network namespace holds that meshredirect could touch, as comparable text.

:func:`kernel_state` reads the rules of both iptables variants and both
families, the nftables ruleset, and the policy routing (ip rules and the
routes of every table), with counters zeroed, so that "nothing changed" and
"put back exactly" become dictionary comparisons. :func:`without_empty_tables`
drops iptables tables that hold nothing but empty built-in chains with an
ACCEPT policy: the kernel treats them as absent, and the tools leave them
behind once a table was touched.

>>> text = "*raw\\n:PREROUTING ACCEPT [0:0]\\n:OUTPUT ACCEPT [0:0]\\nCOMMIT\\n*nat\\n:OUTPUT ACCEPT [0:0]\\n-A OUTPUT -j X\\nCOMMIT\\n"
>>> print(without_empty_tables(text), end="")
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j X
COMMIT
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from meshredirect.apply.netns import Target

__all__ = ["kernel_state", "nft_ruleset", "without_empty_tables"]

_COUNTERS: Final = re.compile(r"\[\d+:\d+\]")
_BUILTIN: Final = re.compile(r"^:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT ")


def without_empty_tables(save_text: str) -> str:
    """``iptables-save`` text, normalised (no comments, zero counters), without tables that hold nothing."""
    out: list[str] = []
    table: list[str] = []
    for raw in save_text.splitlines():
        line = _COUNTERS.sub("[0:0]", raw.rstrip())
        if not line or line.startswith("#"):
            continue
        table.append(line)
        if line == "COMMIT":
            body = table[1:-1]
            if not all(_BUILTIN.match(item) for item in body):
                out += table
            table = []
    return "".join(line + "\n" for line in out)


def kernel_state(target: Target) -> dict[str, str]:
    """The namespace's iptables rules (each variant and family), nftables ruleset, ip rules and routes."""
    state: dict[str, str] = {}
    for variant in ("nft", "legacy"):
        for base in ("iptables", "ip6tables"):
            tool = f"{base}-{variant}-save"
            state[tool] = without_empty_tables(target.run([tool]).stdout)
    state["nft list ruleset"] = nft_ruleset(target.run(["nft", "-j", "list", "ruleset"]).stdout)
    for flag in ("-4", "-6"):
        state[f"ip {flag} rule"] = target.run(["ip", flag, "rule", "show"]).stdout
        state[f"ip {flag} route"] = target.run(["ip", flag, "route", "show", "table", "all"]).stdout
    return state


def nft_ruleset(json_text: str) -> str:
    """``nft -j list ruleset`` output as sorted JSON lines: counters zeroed, handles dropped, and left out:
    base chains with an accept policy and no rules, and tables left with nothing (iptables-nft creates
    built-in chains on first use and leaves them behind, empty; they change no verdict)."""
    items = [item for item in json.loads(json_text or "{}").get("nftables", []) if "metainfo" not in item]
    used = {
        (body["family"], body["table"], body["chain"])
        for item in items
        for kind, body in item.items()
        if kind == "rule"
    }
    lines: dict[tuple[str, str], list[str]] = {}
    busy: set[tuple[str, str]] = set()
    for item in items:
        (kind, body), *_ = item.items()
        table = (body["family"], body["name"] if kind == "table" else body["table"])
        empty = (body["family"], body.get("table"), body.get("name")) not in used
        if kind == "chain" and "hook" in body and body.get("policy", "accept") == "accept" and empty:
            continue
        if kind != "table":
            busy.add(table)
        lines.setdefault(table, []).append(json.dumps({kind: _scrub(body)}, sort_keys=True))
    kept = [line for table in sorted(lines) if table in busy for line in sorted(lines[table])]
    return "".join(line + "\n" for line in kept)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"packets", "bytes"}:
            return {"packets": 0, "bytes": 0}
        return {k: _scrub(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value
