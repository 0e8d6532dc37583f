"""The generated parts of the documentation site hold everything they must (the strict build checks links)."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import pytest

pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import meshredirect_docs as gen  # noqa: E402

import meshredirect  # noqa: E402
from meshredirect.backend import available_backends  # noqa: E402
from meshredirect.cli import COMMANDS  # noqa: E402
from meshredirect.policy import DnsCapture, Policy  # noqa: E402
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS  # noqa: E402


def test_every_command_has_its_help_on_the_cli_page() -> None:
    page = gen.cli_reference()
    assert "usage: meshredirect [-h] [--version]" in page
    for name in COMMANDS:
        assert f"\n## meshredirect {name}\n" in page
        assert f"usage: meshredirect {name} [-h]" in page


def test_every_policy_field_has_an_entry_with_a_meaning_and_a_flag() -> None:
    lines = gen.policy_fields().splitlines()
    terms = {line.split("`")[1]: (line, lines[i + 1]) for i, line in enumerate(lines) if line.startswith("`")}
    expected = [f.name for f in attrs.fields(Policy)] + [f"dns.{f.name}" for f in attrs.fields(DnsCapture)]
    assert list(terms) == expected
    for name, (term, meaning) in terms.items():
        assert meaning.startswith(": ") and len(meaning) > 10, f"{name} has no meaning"
        assert "; flag `" in term or name == "dns", f"{name} has no flag"
    assert terms["outbound_port"][0] == "`outbound_port` (`int`, default `15001`; flag `-p`, `--outbound-port`)"


def test_every_public_name_is_in_the_api_table() -> None:
    table = gen.exports_table()
    for name in meshredirect.__all__:
        assert f"| `meshredirect.{name}` |" in table
    assert "| `meshredirect.compile_policy` | function | {py:func}`meshredirect.compiler.compile_policy` |" in table
    assert "| `meshredirect.Policy` | class | {py:class}`meshredirect.policy.Policy` |" in table


def test_the_support_matrix_has_every_sample_and_backend() -> None:
    lines = gen.support_table().splitlines()
    header = next(line for line in lines if line.startswith("| IR node"))
    assert all(f"`{b}`" in header for b in available_backends())
    samples = sum(len(v) for v in (*SAMPLE_MATCHES.values(), *SAMPLE_TARGETS.values()))
    assert len([line for line in lines if line.startswith("| {py:class}")]) == samples


def test_topic_pages_of_other_parts_are_listed_in_order(tmp_path: Path) -> None:
    assert gen.more_pages(tmp_path) == ""
    for name in ("index", "policy", "zeta", "cni", "semantics"):
        (tmp_path / f"{name}.md").write_text("# x\n")
    page = gen.more_pages(tmp_path)
    assert page.splitlines()[4:7] == ["semantics", "cni", "zeta"]
    assert "policy" not in page.splitlines() and "index" not in page.splitlines()


def test_every_public_module_is_documented() -> None:
    page = gen.api_modules()
    assert ".. automodule:: meshredirect.graph" in page
    assert ".. automodule:: meshredirect.support" in page
    assert ".. automodule:: meshredirect.ir" not in page  # its own page
    assert "meshredirect.commands.compile" not in page  # the CLI page


def test_the_traced_pictures_are_drawn_and_shown(tmp_path: Path) -> None:
    """The docs' pictures of a connection's path come from the graph command and the pages show them."""
    import xml.etree.ElementTree as ET

    gen.pictures(tmp_path)
    for name in gen.TRACED_PICTURES:
        svg = ET.fromstring((tmp_path / f"graph-{name}.svg").read_text())
        texts = {"".join(t.itertext()) for t in svg.iter("{http://www.w3.org/2000/svg}text")}
        assert any("[1: matched]" in t for t in texts) and any("[2: matched]" in t for t in texts), name
        for page in ("pictures.md", "semantics.md"):
            assert f"(_generated/img/graph-{name}.svg)" in (ROOT / "docs" / page).read_text(), (name, page)
    texts = {"".join(t.itertext()) for t in ET.parse(tmp_path / "graph-trace-inbound-passthrough.svg").iter()}
    assert any("2. tcp 127.0.0.6:43210 -> 10.0.0.5:8080 local uid=1337" in t for t in texts)
