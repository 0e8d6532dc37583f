"""``meshredirect trace`` and ``meshredirect check``: output, exit status and error messages."""

from __future__ import annotations

import attrs
import pytest

from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.ir import OwnerMatch, Return


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_trace_follows_an_app_connection_through_the_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "trace", "--dst", "93.184.216.34", "--dport", "443")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "connection 1: tcp 10.0.0.5:43210 -> 93.184.216.34:443 local uid=1000 gid=1000 out eth0"
    assert "  nat ISTIO_OUTPUT #8: any -> jump ISTIO_REDIRECT  [matched]" in lines
    assert "verdict: redirected to 127.0.0.1:15001" in lines
    assert "=> captured to the proxy's outbound listener; the proxy opens connection 2" in lines
    assert "connection 2: tcp 10.0.0.5:43210 -> 93.184.216.34:443 local uid=1337 gid=1337 out eth0" in lines
    assert "  nat ISTIO_OUTPUT #4: uid 1337 -> RETURN  [matched]" in lines
    assert lines[-2:] == ["verdict: passed to 93.184.216.34:443 (sent out)", "=> leaves the pod"]


def test_trace_of_an_inbound_connection_and_its_passthrough(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "trace", "--dst", "10.0.0.5", "--dport", "8080", "--in-if", "eth0")
    assert status == 0
    assert "connection 1: tcp 203.0.113.10:43210 -> 10.0.0.5:8080 remote in eth0" in out
    assert "verdict: redirected to 10.0.0.5:15006" in out
    assert "connection 2: tcp 127.0.0.6:43210 -> 10.0.0.5:8080 local uid=1337 gid=1337 out lo" in out
    assert out.splitlines()[-1] == "=> delivered to a local listener"


def test_trace_with_policy_flags_and_without_follow_ups(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "trace", "--dst", "10.96.0.1", "--no-follow", "-x", "10.96.0.0/12")
    assert status == 0
    assert out.splitlines()[0] == "connection: tcp 10.0.0.5:43210 -> 10.96.0.1:80 local uid=1000 gid=1000 out eth0"
    assert out.splitlines()[-1] == "verdict: passed to 10.96.0.1:80 (sent out)"


def test_trace_shows_a_socketless_packet_and_ipv6(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "trace", "--dst", "2001:db8::1", "--uid", "none", "--family", "both", "--no-follow")
    assert status == 0
    assert out.splitlines()[0] == "connection: tcp [fd00::5]:43210 -> [2001:db8::1]:80 local no socket out eth0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dst", "nonsense"], "--dst: expected an IPv4 or IPv6 address, got 'nonsense'"),
        (["--dst", "10.0.0.5", "--dport", "0"], "--dport: expected a number 1-65535, got '0'"),
        (["--dst", "10.0.0.5", "--uid", "x"], "--uid: expected a number 0-4294967294, got 'x'"),
        (["--dst", "10.0.0.5", "--src", "::1"], "--src: expected an IPv4 address, like --dst, got '::1'"),
        (
            ["--dst", "10.0.0.5", "--in-if", "eth0", "--out-if", "lo"],
            "--out-if: expected no value for a remote connection (use --in-if), got 'lo'",
        ),
        (
            ["--dst", "10.0.0.5", "--origin", "local", "--in-if", "eth0"],
            "--in-if: expected no value for a local connection (use --out-if), got 'eth0'",
        ),
        (["--dst", "10.0.0.5", "-p", "0"], "outbound_port: expected a port number 1-65535, got '0'"),
    ],
)
def test_trace_refuses_bad_input_with_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run(capsys, "trace", *argv)
    assert status == 2
    assert out == ""
    assert err == f"meshredirect trace: error: {message}\n"


def test_trace_needs_a_destination(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["trace"])
    assert exited.value.code == 2
    assert "the following arguments are required: --dst" in capsys.readouterr().err


def test_check_proves_the_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "check")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("checked ") and lines[0].endswith(" paths")
    assert "ok   no loop: every chain of interceptions ends" in lines
    assert all(line.startswith("ok   ") for line in lines[1:])


def test_check_exits_1_with_counterexamples(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import meshredirect.compiler

    def broken(policy: object) -> object:
        ruleset = compile_policy(policy)  # type: ignore[arg-type]
        table = ruleset.tables[0]
        chains = tuple(
            attrs.evolve(
                c,
                rules=tuple(
                    r
                    for r in c.rules
                    if not (
                        isinstance(r.target, Return) and len(r.matches) == 1 and isinstance(r.matches[0], OwnerMatch)
                    )
                ),
            )
            for c in table.chains
        )
        return attrs.evolve(ruleset, tables=(attrs.evolve(table, chains=chains),))

    monkeypatch.setattr(meshredirect.compiler, "compile_policy", broken)
    status, out, _ = run(capsys, "check", "--examples", "1")
    assert status == 1
    assert "FAIL no loop: every chain of interceptions ends" in out
    assert "VIOLATED: no loop: every chain of interceptions ends" in out
    assert "  chain:" in out and "  trace of step 1: " in out


def test_check_refuses_a_negative_example_count(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "check", "--examples", "-1")
    assert status == 2
    assert err == "meshredirect check: error: --examples: expected a number 0 or more, got -1\n"
