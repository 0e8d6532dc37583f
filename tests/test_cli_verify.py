"""``meshredirect verify``: the mesh found in a node's rules, proven loop-free, or the loop shown."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from conformance import ISTIO, SEED, istio_restore
from meshredirect.api import render
from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.policy import Policy

UID_RETURN = "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
GID_RETURN = "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n"
PASSTHROUGH = "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def verify_text(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, *flags: str) -> tuple[int, str]:
    path = tmp_path / "node.rules"
    path.write_text(text)
    status, out, err = run(capsys, "verify", str(path), *flags)
    assert err == ""
    return status, out


def test_the_seed_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "verify", str(SEED))
    assert (status, err) == (0, "")
    assert out.splitlines()[:6] == [
        f"read {SEED}: 13 rules (ipv4 nat)",
        "mesh chains: ISTIO_OUTPUT, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_INBOUND",
        "  outbound port 15001 (found in the rules)",
        "  inbound port 15006, REDIRECT (found in the rules)",
        "  proxy uid 1337 (found in the rules), gid 1337 (found in the rules)",
        "  inbound passthrough from 127.0.0.6, ::6 over lo (found in the rules)",
    ]
    assert "ok   no loop: every chain of interceptions ends" in out
    assert "FAIL" not in out
    assert out.endswith(f"verified: {SEED} holds every property\n")


def test_without_the_proxy_exemption_the_seed_loops(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = SEED.read_text().replace(UID_RETURN, "").replace(GID_RETURN, "")
    status, out = verify_text(capsys, tmp_path, text)
    assert status == 1
    assert "  proxy uid 1337 (assumed: not found in the rules), gid 1337 (assumed: not found in the rules)" in out
    assert "FAIL no loop: every chain of interceptions ends" in out
    assert (
        "  traffic loop: tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1000 gid=1000 out eth0 "
        "is intercepted again and again" in out
    )
    assert (
        "    2. tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1337 gid=1337 out eth0  captured to the outbound listener"
        in out
    )
    assert "    ... connection 3 is connection 2 again: a loop" in out
    assert "      nat ISTIO_REDIRECT #1: proto tcp -> REDIRECT :15001  [matched]" in out
    assert out.rstrip().splitlines()[-1].startswith("NOT verified: ")


def test_without_the_passthrough_rule_the_seed_loops(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out = verify_text(capsys, tmp_path, SEED.read_text().replace(PASSTHROUGH, ""))
    assert status == 1
    assert "FAIL no loop: every chain of interceptions ends" in out
    assert (
        "    2. tcp 127.0.0.6:43210 -> 10.0.0.5:8080 local uid=1337 gid=1337 out lo  captured to the inbound listener"
        in out
    )


def test_stated_values_win_over_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    """A proxy that runs as another uid than the rules exempt loops: stating it shows that."""
    status, out, _ = run(capsys, "verify", str(SEED), "--proxy-uid", "101", "--proxy-gid", "101")
    assert status == 1
    assert "  proxy uid 101 (stated), gid 101 (stated)" in out
    assert "FAIL no loop: every chain of interceptions ends" in out


@pytest.mark.parametrize(
    "policy",
    [Policy(), Policy(families="both", inbound_mode="TPROXY", dns={"enabled": True, "capture_all": True})],
    ids=["default", "dual-stack-tproxy-dns"],
)
def test_compiled_rules_verify(capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: Policy) -> None:
    text = render(compile_policy(policy), "iptables-save").text()
    status, out = verify_text(capsys, tmp_path, text)
    assert status == 0, out


def test_standard_input(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(SEED.read_text()))
    status, out, _ = run(capsys, "verify", "-")
    assert status == 0 and out.startswith("read stdin: 13 rules (ipv4 nat)\n")


BAD = [
    (["verify", str(SEED), "--outbound-port", "0"],
     "meshredirect verify: error: --outbound-port: expected a port number 1-65535, got '0'\n"),
    (["verify", str(SEED), "--proxy-uid", "x"],
     "meshredirect verify: error: --proxy-uid: expected a numeric id 0-4294967294, got 'x'\n"),
    (["verify", str(SEED), "--passthrough", "localhost"],
     "meshredirect verify: error: --passthrough: expected an IPv4 or IPv6 address, got 'localhost'\n"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[m.split(": ")[2] for _, m in BAD])
def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert run(capsys, *argv) == (2, "", message)


def test_a_file_that_is_not_rules(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("# my rules\nhello\n")
    assert run(capsys, "verify", str(path)) == (
        2,
        "",
        f"meshredirect verify: error: {path}:2:1: expected *TABLE, :CHAIN POLICY, COMMIT, a # comment or a command "
        "(-A, -I, -R, -D, -N, -X, -F, -Z, -P, -E), got 'hello'\n    hello\n    ^\n",
    )


def test_rules_without_a_mesh_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plain.rules"
    path.write_text("*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    status, out, err = run(capsys, "verify", str(path))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect verify: error: {path}: expected rules that redirect connections to a proxy (REDIRECT or "
        "TPROXY to a local port), or the proxy's ports (--outbound-port, --inbound-port), got '1 rules without one'\n"
    )


def test_a_node_dump_is_read_and_its_mesh_found(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Istio's chains beside kube-proxy and Docker rules: the mesh is found and every class is followed."""
    from meshredirect.testing.node_dump import node_dump

    status, out = verify_text(capsys, tmp_path, node_dump(services=3, endpoints=2, containers=2))
    assert status in (0, 1)
    assert "  outbound port 15001 (found in the rules)" in out
    assert "  proxy uid 1337 (found in the rules), gid 1337 (found in the rules)" in out
    assert "checked " in out


@pytest.mark.parametrize("name", ["inbound-ports-tproxy", "inbound-ports-wildcard-tproxy"])
def test_istios_tproxy_rules_loop_and_the_documented_repair_ends_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    """verify and the conformance proof agree: Istio's TPROXY rules send the proxy's marked connections to the
    app back to the inbound port (docs/istio-differences.md); with the documented repairs they verify."""
    from test_istio_conformance import repaired

    text = istio_restore(name, 4)
    assert text is not None
    status, out = verify_text(capsys, tmp_path, text, "--tunnel-port", "15008")
    assert status == 1
    assert "FAIL no loop: every chain of interceptions ends" in out
    assert " mark=0x539 out lo is intercepted again and again" in out
    status, out = verify_text(capsys, tmp_path, repaired(name, text), "--tunnel-port", "15008")
    assert status == 0, out


def test_rerouted_interfaces_are_treated_as_outbound(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "verify", str(ISTIO / "iptables" / "kube-virt-interfaces.v4.restore"), "-e", "15008")
    assert status == 0, out
    assert "  traffic arriving on eth2, eth1 treated as outbound (found in the rules)" in out


def test_an_nftables_dump_verifies_with_the_mesh_found_in_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    flags = ["--family", "both", "-m", "TPROXY", "--redirect-dns", "--capture-all-dns"]
    status, out, _ = run(capsys, "compile", "-B", "nftables-json", *flags)
    assert status == 0
    status, out = verify_text(capsys, tmp_path, out, "--tunnel-port", "15008")
    assert status == 0, out
    assert "  outbound port 15001 (found in the rules)" in out
    assert "  inbound port 15006, TPROXY (found in the rules)" in out
    assert "  DNS port 15053 (found in the rules)" in out


def test_violation_traces_shorten_long_runs_of_rules_unless_all_rules(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """On a node with many services, a trace meets KUBE-SERVICES' rule per service: shortened by default."""
    from meshredirect.testing.node_dump import node_dump

    text = node_dump(services=20, endpoints=1, containers=0)
    status, short = verify_text(capsys, tmp_path, text)
    assert status == 1 and "nat KUBE-SERVICES #3-#19: 17 more rules  [no match]" in short
    status, full = verify_text(capsys, tmp_path, text, "--all-rules")
    assert status == 1 and "more rules" not in full
    assert full.count("nat KUBE-SERVICES #") > short.count("nat KUBE-SERVICES #") + 16
