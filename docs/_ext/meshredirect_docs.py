"""Pages generated from the code on every build, so the documentation cannot drift from it.

Written under ``docs/_generated/`` (not committed) when the builder starts:

- ``fragments/cli.md``: ``meshredirect --help`` and the help of every command in
  :data:`meshredirect.cli.COMMANDS`, from each command's own argument parser;
- ``fragments/policy-fields.md``: every field of :class:`meshredirect.policy.Policy`
  (and of its DNS part) with its type, default, command-line flag and meaning;
- ``fragments/support-matrix.md``: every IR node sample x every installed backend;
- ``fragments/exports.md`` and ``fragments/api-modules.md``: ``meshredirect.__all__``
  and an ``automodule`` for every public module;
- ``fragments/more-pages.md``: a table of contents of the topic pages other
  parts of the project add to ``docs/`` (every ``docs/*.md`` this site does not
  list itself), so a new page appears without editing the site;
- ``img/graph-*.svg``: ``meshredirect graph`` pictures.

A field without a description, or a command without help, is reported as a
warning, which fails the strict build.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Pages this site holds itself, in reading order; other docs/*.md files are topic pages of their own.
OWN_PAGES = (
    "index",
    "getting-started",
    "policy",
    "file-language",
    "cli",
    "pictures",
    "backends",
    "ir",
    "api",
    "benchmarks",
)
#: Topic pages other parts of the project write, in the order the index lists them when present.
TOPIC_ORDER = ("semantics", "proofs", "verify", "nftables", "ebpf", "apply", "frontends", "migrating", "cni", "testing")
#: Modules documented on their own page (the IR) or as the command line (commands).
API_SKIP = ("meshredirect.ir", "meshredirect.commands.", "meshredirect.__main__")
#: Width of the command-line help, fixed so the generated page does not depend on the terminal.
HELP_COLUMNS = "100"


def _write(path: Path, text: str) -> None:
    """Write only when the text changed, so Sphinx's incremental builds stay incremental."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@contextlib.contextmanager
def _columns(width: str) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


# ----------------------------------------------------------------------------- CLI


def cli_reference() -> str:
    from meshredirect.cli import COMMANDS, command_parser, top_parser

    lines = [
        "Exit status: 0 success; 1 a check found a violation or a difference; 2 bad input (usage, "
        "policy, file syntax, unknown backend); 3 the machine cannot do what was asked (a missing "
        "tool, privilege or namespace).",
        "",
        "## meshredirect",
        "",
        "```text",
    ]
    with _columns(HELP_COLUMNS):
        lines += [top_parser().format_help().rstrip(), "```", ""]
        for name, (_module, summary) in COMMANDS.items():
            if not summary:
                logger.warning("command %r has no one-line help in meshredirect.cli.COMMANDS", name)
            lines += [f"## meshredirect {name}", "", summary[:1].upper() + summary[1:] + ".", ""]
            lines += ["```text", command_parser(name).format_help().rstrip(), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- policy fields


def _show_default(value: object) -> str:
    import enum
    import ipaddress

    from meshredirect.policy import DnsCapture
    from meshredirect.values import All

    if isinstance(value, All):
        return "`*`"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, DnsCapture):
        return "off" if not value.enabled else str(value)
    if isinstance(value, frozenset | tuple):
        items = sorted(_show_default(v).strip("`") for v in value)
        return f"`{','.join(items)}`" if items else "empty"
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return f"`{value}`"
    text = str(value)
    return f"`{text}`" if text else "empty"


def _field_docs(module: str) -> dict[tuple[str, str], str]:
    from sphinx.pycode import ModuleAnalyzer

    analyzer = ModuleAnalyzer.for_module(module)
    return {key: " ".join(line.strip() for line in lines).strip() for key, lines in analyzer.find_attr_docs().items()}


def policy_fields() -> str:
    import attrs

    from meshredirect.commands._policy_args import BOOLEAN_FLAGS, DNS_FLAGS, FLAGS
    from meshredirect.policy import DnsCapture, Policy

    docs = _field_docs("meshredirect.policy")
    flags: dict[str, tuple[str, str]] = {}
    for flag, (field, short, text) in FLAGS.items():
        flags[field] = (f"`{short}`, `{flag}`" if short else f"`{flag}`", text)
    for flag, (field, text) in BOOLEAN_FLAGS.items():
        flags[field] = (f"`{flag}`", text)
    for flag, (field, text) in DNS_FLAGS.items():
        flags[f"dns.{field}"] = (f"`{flag}`", text)
    flags["dns.servers"] = ("`--dns-servers`", "DNS servers to capture queries to")
    flags["dns.port"] = ("`--dns-port`", "the agent's DNS port")

    entries: list[str] = []

    def add(owner: str, prefix: str, cls: type) -> None:
        defaults = cls()
        for field in attrs.fields(cls):
            name = prefix + field.name
            flag, help_text = flags.get(name, ("", ""))
            meaning = docs.get((owner, field.name)) or help_text
            if not meaning:
                logger.warning("policy field %s has neither a #: comment nor a flag with help", name)
            if not flag and name != "dns":
                logger.warning("policy field %s has no command-line flag", name)
            kind = str(field.type).replace("meshredirect.values.", "")
            details = f"`{kind}`, default {_show_default(getattr(defaults, field.name))}"
            details += f"; flag {flag}" if flag else "; its parts below"
            entries.extend([f"`{name}` ({details})", f": {meaning}", ""])

    add("Policy", "", Policy)
    add("DnsCapture", "dns.", DnsCapture)
    return "\n".join(entries)


# ----------------------------------------------------------------------------- support matrix


def support_table() -> str:
    from meshredirect.backend import available_backends
    from meshredirect.notation import describe_match, describe_target
    from meshredirect.support import support_matrix
    from meshredirect.testing.samples import SAMPLE_MATCHES

    backends = available_backends()
    cells = support_matrix(backends)
    by_node: dict[int, dict[str, Any]] = {}
    order: list[Any] = []
    for cell in cells:
        if id(cell.node) not in by_node:
            by_node[id(cell.node)] = {}
            order.append(cell.node)
        by_node[id(cell.node)][cell.backend] = cell
    rows = [
        "| IR node | sample | " + " | ".join(f"`{b}`" for b in backends) + " |",
        "|---|---|" + "---|" * len(backends),
    ]
    for node in order:
        describe: Any = describe_match if type(node) in SAMPLE_MATCHES else describe_target
        marks = []
        for backend in backends:
            cell = by_node[id(node)][backend]
            marks.append("✓" if cell.lowers else f"✗ {_cell(cell.reason)}")
        rows.append(
            f"| {{py:class}}`~meshredirect.ir.{type(node).__name__}` | `{_cell(describe(node))}` | "
            + " | ".join(marks)
            + " |"
        )
    refused = sum(1 for c in cells if not c.lowers)
    summary = (
        f"{len(order)} samples of {len({type(n) for n in order})} node types x {len(backends)} backends: "
        f"{len(cells) - refused} lowered, {refused} refused."
    )
    return summary + "\n\n" + "\n".join(rows) + "\n"


def _backend_entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    from meshredirect.backend import ENTRY_POINT_GROUP

    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def backend_table() -> str:
    rows = ["| backend | class | what it writes |", "|---|---|---|"]
    for ep in _backend_entry_points():
        doc = (ep.load().__doc__ or "").strip().splitlines()
        rows.append(f"| `{ep.name}` | `{ep.value}` | {_cell(doc[0] if doc else '')} |")
    return "\n".join(rows) + "\n"


def backend_modules() -> str:
    packages: list[str] = []
    for ep in _backend_entry_points():
        package = ep.value.split(":")[0].split(".")[0]
        if package not in packages:
            packages.append(package)
    out: list[str] = []
    for package in packages:
        for name in _public_modules(package):
            out += [f"### `{name}`", ""]
            out += _automodule(name, ":no-members:") if name == package else _automodule(name)
    return "\n".join(out)


# ----------------------------------------------------------------------------- API


def _automodule(name: str, *options: str) -> list[str]:
    """An automodule directive inside a MyST page (autodoc writes reStructuredText)."""
    return ["```{eval-rst}", f".. automodule:: {name}", *(f"   {option}" for option in options), "```", ""]


def _public_modules(package: str) -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts) or info.name.startswith(API_SKIP):
            continue
        names.append(info.name)
    return names


def exports_table() -> str:
    import meshredirect

    rows = ["| name | what | defined in |", "|---|---|---|"]
    for name in meshredirect.__all__:
        value = getattr(meshredirect, name)
        module = meshredirect._EXPORTS[name]
        if isinstance(value, type):
            kind, role = ("exception" if issubclass(value, BaseException) else "class"), "py:class"
        elif callable(value):
            kind, role = "function", "py:func"
        else:
            kind, role = "constant", "py:data"
        rows.append(f"| `meshredirect.{name}` | {kind} | {{{role}}}`{module}.{name}` |")
    return "\n".join(rows) + "\n"


def api_modules() -> str:
    out = []
    for name in _public_modules("meshredirect"):
        if name == "meshredirect":
            continue
        out += [f"## `{name}`", "", *_automodule(name)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- other pages


def more_pages(docs: Path) -> str:
    present = sorted(p.stem for p in docs.glob("*.md") if p.stem not in OWN_PAGES)
    ordered = [p for p in TOPIC_ORDER if p in present] + [p for p in present if p not in TOPIC_ORDER]
    lines = ["```{toctree}", ":caption: Topics", ":hidden:", ""]
    lines += ordered
    lines += ["```", ""]
    if not ordered:
        return ""
    return "\n".join(lines)


#: Traced pictures: name -> ``meshredirect graph`` arguments (the docs show these as commands too).
TRACED_PICTURES = {
    "trace-outbound": ["--trace", "--dst", "93.184.216.34", "--dport", "443", "--follow"],
    "trace-inbound-passthrough": [
        "--trace",
        "--origin",
        "remote",
        "--src",
        "10.0.0.9",
        "--dst",
        "10.0.0.5",
        "--dport",
        "8080",
        "--follow",
    ],
}


def pictures(out: Path) -> None:
    from meshredirect.cli import command_parser
    from meshredirect.commands._policy_args import policy_from_arguments
    from meshredirect.commands.graph import svg_from_dot, trace_highlights
    from meshredirect.compiler import compile_policy
    from meshredirect.graph import to_dot
    from meshredirect.policy import Policy

    examples = {
        "default": to_dot(compile_policy(Policy())),
        "tproxy-dual-stack": to_dot(compile_policy(Policy(families="both", inbound_mode="TPROXY"))),
    }
    for name, argv in TRACED_PICTURES.items():
        # The graph command's own parser and tracing, as `meshredirect graph ARGS -O FILE.svg` runs them.
        args = command_parser("graph").parse_args(argv)
        policy = policy_from_arguments(args)
        ruleset = compile_policy(policy)
        examples[name] = to_dot(ruleset, highlight=trace_highlights(ruleset, policy, args))
    for name, dot in examples.items():
        stamp = out / f"graph-{name}.dot"
        if not stamp.exists() or stamp.read_text() != dot or not (out / f"graph-{name}.svg").exists():
            _write(out / f"graph-{name}.svg", svg_from_dot(dot))
            _write(stamp, dot)


def generate(app: Sphinx) -> None:
    docs = Path(app.srcdir)
    generated = docs / "_generated"
    fragments = generated / "fragments"
    _write(fragments / "cli.md", cli_reference())
    _write(fragments / "policy-fields.md", policy_fields())
    _write(fragments / "support-matrix.md", support_table())
    _write(fragments / "backend-table.md", backend_table())
    _write(fragments / "backend-modules.md", backend_modules())
    _write(fragments / "exports.md", exports_table())
    _write(fragments / "api-modules.md", api_modules())
    _write(fragments / "more-pages.md", more_pages(docs))
    pictures(generated / "img")


def setup(app: Sphinx) -> dict[str, typing.Any]:
    app.connect("builder-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
