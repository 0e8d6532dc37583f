"""docs/migrating.md says true things: its policy files parse, its commands print what it shows, its tables hold."""

from __future__ import annotations

import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import attrs
import pytest

from meshredirect.cli import main
from meshredirect.frontends.pod import policy_from_annotations
from meshredirect.frontends.policy_file import format_file, parse_policy
from meshredirect.presets import preset

DOC = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", TEXT, flags=re.DOTALL)


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


POLICY_FILES = [b for kind, b in BLOCKS if kind == "text" and b.startswith("preset ")]


def test_the_doc_shows_policy_files() -> None:
    assert len(POLICY_FILES) == 4


@pytest.mark.parametrize("block", POLICY_FILES)
def test_every_policy_file_in_the_doc_parses_and_is_canonical(block: str) -> None:
    parse_policy(block)
    assert format_file(block) == block


def _command_and_output(start: str) -> tuple[list[str], str]:
    for kind, block in BLOCKS:
        if kind == "console" and block.startswith(start):
            lines = block.splitlines()
            return shlex.split(lines[0].removeprefix("$ ")), "\n".join(lines[1:]) + "\n"
    raise AssertionError(f"no console block starts with {start!r}")


def test_the_injection_line_is_preset_istio(tmp_path: Path) -> None:
    argv, _ = _command_and_output("$ meshredirect policy --to mesh.policy")
    target = tmp_path / "mesh.policy"
    argv = [str(target) if a == "mesh.policy" else a for a in argv]
    status, _out, _err = cli(argv[1:])
    assert status == 0 and target.read_text() == "preset istio\n"


def test_the_customised_sidecar_prints_the_policy_shown() -> None:
    argv, _ = _command_and_output("$ meshredirect policy --from-istio-flags ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE")
    status, out, _err = cli(argv[1:])
    shown = next(b for b in POLICY_FILES if "mode tproxy" in b)
    assert (status, out) == (0, shown)


def test_the_error_example(tmp_path: Path) -> None:
    argv, expected = _command_and_output("$ meshredirect compile --policy mesh.policy")
    path = tmp_path / "mesh.policy"
    path.write_text("preset istio\ninbound captur 15006\n")
    status, out, err = cli([str(path) if a == "mesh.policy" else a for a in argv[1:]])
    assert (status, out) == (2, "")
    assert err == expected.replace("mesh.policy:", f"{path}:")


def test_the_linkerd_line_is_the_linkerd_preset() -> None:
    rows = """\
inbound capture 4143
outbound capture 4140
proxy uid 2102 gid none
inbound except ports 4190, 4191, 4567, 4568 tunnel none
outbound except ports 4567, 4568
loopback capture none
chains prefix PROXY_INIT
"""
    assert parse_policy(rows) == preset("linkerd")


def test_the_kuma_defaults_are_the_kuma_preset() -> None:
    rows = """\
proxy uid 5678 gid none
inbound capture 15006 except ports none tunnel none
outbound capture 15001
families ipv4, ipv6
chains prefix KUMA_MESH
"""
    assert parse_policy(rows) == preset("kuma")
    assert (
        parse_policy("preset kuma\nfamilies ipv4\n").families == attrs.evolve(preset("kuma"), families="ipv4").families
    )


ANNOTATION_ROWS = [
    ("sidecar.istio.io/interceptionMode", "TPROXY", "inbound mode tproxy"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8", "outbound cidr 10.0.0.0/8"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.96.0.0/12", "outbound except cidr 10.96.0.0/12"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "3306", "outbound also ports 3306"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "5432", "outbound except ports 5432"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "eth1", "interfaces exclude eth1"),
    ("istio.io/reroute-virtual-interfaces", "net1", "interfaces reroute net1"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "22", "inbound except ports 22, 15020-15021, 15090"),
]


@pytest.mark.parametrize(("annotation", "value", "line"), ANNOTATION_ROWS)
def test_the_annotation_table(annotation: str, value: str, line: str) -> None:
    assert f"`{annotation}: " in TEXT and f"`{line}`" in TEXT
    policy, _ = policy_from_annotations({annotation: value}, inbound_default="*")
    assert policy == parse_policy(line + "\n")


FRONTENDS = (DOC.parent / "frontends.md").read_text()


@pytest.mark.parametrize(
    ("text", "start"),
    [("preset istio\ninbound capture 70000\n", "mesh.policy:2:17: "), ("outbund capture 15001\n", "mesh.policy:1:1: ")],
)
def test_the_frontends_page_shows_real_errors(text: str, start: str) -> None:
    from meshredirect.errors import SourceError

    with pytest.raises(SourceError) as info:
        parse_policy(text, path="mesh.policy")
    message = str(info.value)
    assert message.startswith(start)
    assert f"```text\n{message}\n```" in FRONTENDS


def test_the_frontends_page_lists_every_statement() -> None:
    from meshredirect.frontends.policy_file import STATEMENTS

    for keyword in STATEMENTS:
        assert f"| `{keyword}" in FRONTENDS
