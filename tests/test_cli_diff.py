"""``meshredirect diff``: the semantic difference of two rule files, or of a rule file and a policy."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from conformance import ISTIO, SEED
from meshredirect.cli import main

EMPTY = ISTIO / "iptables" / "empty.v4.restore"
WILDCARD = ISTIO / "iptables" / "inbound-ports-wildcard.v4.restore"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_istio_empty_and_inbound_wildcard_differ_exactly_in_inbound_capture(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ISTIO / "iptables")
    status, out, err = run(capsys, "diff", "empty.v4.restore", "inbound-ports-wildcard.v4.restore")
    assert status == 1 and err == ""
    blocks = out.split("\n\n")
    # How the engine splits the classes (their number, order and example) is its business; the meaning is pinned.
    assert re.fullmatch(
        r"empty.v4.restore and inbound-ports-wildcard.v4.restore differ on \d+ classes of connections "
        r"\(of \d+, \d+ paths\):",
        blocks[0],
    )
    to_the_pod = [b for b in blocks[1:] if "   e.g. tcp 203.0.113.10:43210 -> 10.0.0.5:8080 remote in eth0\n" in b]
    assert len(to_the_pod) == 1
    assert to_the_pod[0].split("\n", 1)[1].rstrip("\n") == (
        "   e.g. tcp 203.0.113.10:43210 -> 10.0.0.5:8080 remote in eth0\n"
        "   empty.v4.restore:                  passed to 10.0.0.5:8080 (delivered locally)\n"
        "   inbound-ports-wildcard.v4.restore: redirected to 10.0.0.5:15006"
    )
    # Every class is inbound TCP (remote), captured by one side only: the whole difference, and nothing else.
    for block in blocks[1:]:
        lines = block.strip().splitlines()
        assert " tcp remote;" in lines[0]
        assert lines[1].endswith("remote in eth0")
        assert "redirected to 10.0.0.5:15006" not in lines[2]
        assert lines[3].endswith("redirected to 10.0.0.5:15006")


def test_equivalent_rules_print_one_line_and_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "diff", str(SEED), "--preset", "istio-1.4")
    assert status == 0 and err == ""
    assert re.fullmatch(
        rf"equivalent: {re.escape(str(SEED))} and the policy treat every connection alike "
        r"\(\d+ classes of connections, \d+ paths\)\n",
        out,
    )


def test_a_changed_rule_is_a_difference(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The check must fail on broken input: the seed without its uid exemption differs from the preset."""
    broken = tmp_path / "broken.rules"
    broken.write_text(SEED.read_text().replace("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n", ""))
    status, out, _ = run(capsys, "diff", str(broken), "--preset", "istio-1.4", "--trace")
    assert status == 1
    assert "e.g. tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1337 gid=1000 out eth0" in out
    assert "the policy:" in out and "trace in the policy:" in out


def test_standard_input_is_one_of_the_sides(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(EMPTY.read_text()))
    status, out, _ = run(capsys, "diff", str(EMPTY), "-")
    assert status == 0
    assert out.startswith(f"equivalent: {EMPTY} and stdin treat every connection alike")


BAD = [
    (["diff", "nope.rules"], "meshredirect diff: error: rule file: expected a readable file (No such file or directory), got 'nope.rules'\n"),
    (["diff", "-", "-"], "meshredirect diff: error: B: expected at most one rule file read from standard input, got '-'\n"),
    (["diff", str(EMPTY), "--rules-family", "ipv6"],
     f"meshredirect diff: error: {EMPTY}:10:26: -s: expected an IPv6 address or network, got '127.0.0.6/32'\n"
     "    -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\n                             ^\n"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_input_exits_2_with_the_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    status, out, err = run(capsys, *argv)
    assert (status, out, err) == (2, "", message)


def test_a_syntax_error_names_the_file_line_and_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.rules"
    path.write_text("*nat\n-A OUTPUT -p tcp --dport 80x -j RETURN\nCOMMIT\n")
    status, out, err = run(capsys, "diff", str(path))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect diff: error: {path}:2:26: --dport: expected a port or a range LOW:HIGH, got '80x'\n"
        "    -A OUTPUT -p tcp --dport 80x -j RETURN\n                             ^\n"
    )


def test_a_rule_file_against_a_policy_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "mesh.policy"
    policy.write_text("preset istio-1.4\n")
    status, out, _ = run(capsys, "diff", str(SEED), "--policy", str(policy))
    assert status == 0 and out.startswith(f"equivalent: {SEED} and the policy")
    policy.write_text("preset istio-1.4\ninbound except ports 22, 8080, 15020\n")
    status, out, _ = run(capsys, "diff", str(SEED), "--policy", str(policy))
    assert status == 1
    assert "e.g. tcp 203.0.113.10:43210 -> 10.0.0.5:8080 remote in eth0" in out


RICH = ["--family", "both", "-m", "TPROXY", "--redirect-dns", "--capture-all-dns", "-x", "10.96.0.0/12"]


def test_iptables_rules_and_nftables_json_are_compared_by_meaning(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Both backends' output for a dual-stack TPROXY policy with DNS capture, read back: equivalent; and an
    nftables ruleset with one port changed is not."""
    for backend, name in (("iptables-save", "rules.txt"), ("nftables-json", "rules.json")):
        status, out, _ = run(capsys, "compile", "-B", backend, *RICH)
        assert status == 0
        (tmp_path / name).write_text(out)
    status, out, _ = run(capsys, "diff", str(tmp_path / "rules.txt"), str(tmp_path / "rules.json"))
    assert status == 0 and out.startswith(f"equivalent: {tmp_path / 'rules.txt'} and {tmp_path / 'rules.json'}")
    broken = tmp_path / "broken.json"
    broken.write_text((tmp_path / "rules.json").read_text().replace('"port": 15001', '"port": 15002', 1))
    status, out, _ = run(capsys, "diff", str(tmp_path / "rules.txt"), str(broken))
    assert status == 1 and "redirected to 127.0.0.1:15002" in out


def test_an_nftables_json_error_keeps_the_files_line_numbers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text('# ---- rules.ip.json ----\n{"nftables": [\n{"add": }\n]}\n')
    status, out, err = run(capsys, "diff", str(path))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect diff: error: {path}:3:9: expected JSON (nft -j output), got: Expecting value\n"
        '    {"add": }\n            ^\n'
    )
