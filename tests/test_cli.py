"""The command line: output, and every kind of bad input with its pinned message and exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conformance import SEED
from meshredirect.cli import main

EXE = Path(sys.executable).parent / "meshredirect"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_compile_prints_the_restore_input_of_the_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "compile")
    assert status == 0 and err == ""
    assert out.startswith("*nat\n:ISTIO_INBOUND - [0:0]\n")
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n" in out
    assert out.endswith("COMMIT\n")


def test_compile_backend_family_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys, "compile", "-B", "iptables-save", "--family", "both", "-x", "10.96.0.0/12", "-e", "none"
    )
    assert status == 0
    assert "# ---- rules.v4 ----" in out and "# ---- rules.v6 ----" in out
    assert "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN" in out
    assert "15008" not in out


def test_preset_istio_1_4_reproduces_the_seed_rules(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "compile", "--preset", "istio-1.4", "-B", "iptables-save")
    assert status == 0
    rules = [line for line in out.splitlines() if line.startswith("-A")]
    assert rules == [line for line in SEED.read_text().splitlines() if line.startswith("-A")]


def test_out_dir_writes_one_file_per_family(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, "compile", "--family", "both", "--out-dir", str(tmp_path))
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restore.v4", "restore.v6"]
    assert out.splitlines() == [str(tmp_path / "restore.v4"), str(tmp_path / "restore.v6")]


def test_installed_state_makes_the_document_replace_our_rules(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    saved = tmp_path / "saved.v4"
    _, first, _ = run(capsys, "compile", "-B", "iptables-save")
    saved.write_text(first)
    status, out, _ = run(capsys, "compile", "--installed", f"ipv4={saved}")
    assert status == 0
    assert "-A PREROUTING" not in out and "-A OUTPUT" not in out  # jumps already in place are kept


def test_arguments_from_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = tmp_path / "args"
    args.write_text("-B\niptables-save\n-x\n10.0.0.0/8,192.168.0.0/16\n")
    status, out, _ = run(capsys, "compile", f"@{args}")
    assert status == 0 and "-A ISTIO_OUTPUT -d 192.168.0.0/16 -j RETURN" in out


BAD = [
    (["-p", "0"], "meshredirect compile: error: outbound_port: expected a port number 1-65535, got '0'"),
    (["-z", "http"], "meshredirect compile: error: inbound_port: expected a port number 1-65535, got 'http'"),
    (["-e", "99999"], "meshredirect compile: error: inbound_tunnel_port: expected a port number 1-65535, got '99999'"),
    (["-u", "root"], "meshredirect compile: error: proxy_uids: expected a numeric id 0-4294967294, got 'root'"),
    (["-g", "-5"], "meshredirect compile: error: proxy_gids: expected a numeric id 0-4294967294 or a range low-high, got '-5'"),
    (["-m", "DNAT"], "meshredirect compile: error: inbound_mode: expected REDIRECT or TPROXY, got 'DNAT'"),
    (["-t", "0x"], "meshredirect compile: error: tproxy_mark: expected a mark 1-4294967294, got '0x'"),
    (["-r", "255"], "meshredirect compile: error: tproxy_route_table: expected a route table number other than 0, 253 (default), 254 (main), 255 (local), got 255"),
    (["-b", "80,x"], "meshredirect compile: error: inbound_ports: expected a port number 1-65535, got 'x'"),
    (["-d", "1-"], "meshredirect compile: error: inbound_ports_exclude: expected a port number 1-65535 or a range low-high, got '1-'"),
    (["-i", "10.0.0.0/40"], "meshredirect compile: error: outbound_cidrs: expected an IPv4 or IPv6 address or CIDR, got '10.0.0.0/40'"),
    (["-x", "example.com"], "meshredirect compile: error: outbound_cidrs_exclude: expected an IPv4 or IPv6 address or CIDR, got 'example.com'"),
    (["-q", "0"], "meshredirect compile: error: outbound_ports: expected a port number 1-65535, got '0'"),
    (["-o", "70000"], "meshredirect compile: error: outbound_ports_exclude: expected a port number 1-65535, got '70000'"),
    (["-c", "bad/name"], "meshredirect compile: error: exclude_interfaces: expected an interface name of 1-15 characters (letters, digits, '_.@:-', optional trailing '+'), got 'bad/name'"),
    (["-k", "x" * 16], "meshredirect compile: error: reroute_interfaces: expected an interface name of 1-15 characters (letters, digits, '_.@:-', optional trailing '+'), got 'xxxxxxxxxxxxxxxx'"),
    (["--owner-groups-include", "no such"], "meshredirect compile: error: owner_groups_include: expected a group name or a numeric gid, got 'no such'"),
    (["--owner-groups-exclude", "no-such-group-here"], "meshredirect compile: error: owner_groups_exclude: refused: group 'no-such-group-here' does not exist on this machine; a rule naming it cannot be loaded (given: 'no-such-group-here')"),
    (["--loopback-cidr", "10.0.0.1/32"], "meshredirect compile: error: loopback_cidr: expected an IPv4 CIDR inside 127.0.0.0/8 that holds 127.0.0.1, got '10.0.0.1/32'"),
    (["--loopback-capture", "some"], "meshredirect compile: error: loopback_capture: expected proxy or all or none, got 'some'"),
    (["--passthrough-ipv6", "127.0.0.6"], "meshredirect compile: error: passthrough_ipv6: expected an IPv6 address, got '127.0.0.6'"),
    (["--chain-prefix", "has space"], "meshredirect compile: error: chain_prefix: expected a name of 1-16 characters: a letter, then letters, digits, '_' or '-', got 'has space'"),
    (["--family", "ipx"], "meshredirect compile: error: families: expected ipv4, ipv6 or both, got 'ipx'"),
    (["--redirect-dns"], "meshredirect compile: error: dns.servers: refused: DNS capture is enabled but names no server and capture_all is off, so it would capture nothing (given: 'no servers')"),
    (["--redirect-dns", "--dns-servers", "dns.local"], "meshredirect compile: error: dns.servers: expected an IPv4 or IPv6 address, got 'dns.local'"),
    (["--dns-port", "0", "--capture-all-dns", "--redirect-dns"], "meshredirect compile: error: dns.port: expected a port number 1-65535, got '0'"),
    (["--preset", "linkerdd"], "meshredirect compile: error: preset: expected one of istio, istio-1.4, kuma, linkerd (did you mean 'linkerd'?), got 'linkerdd'"),
    # refused combinations
    (["-u", "0"], "meshredirect compile: error: proxy_uids: refused: uid 0 (root) would exempt every root process from capture, a mesh bypass (given: 0)"),
    (["-u", "", "-g", ""], "meshredirect compile: error: proxy_uids: refused: with no proxy uid and no proxy gid the proxy's own connections are captured again: a loop (given: 'none')"),
    (["-z", "15001"], "meshredirect compile: error: inbound_port: refused: the proxy's listeners need distinct ports; outbound_port is 15001 too (given: 15001)"),
    (["-b", "8080", "-d", "8000-9000"], "meshredirect compile: error: inbound_ports: refused: captured ports inside the excluded ports 8000-9000 (the exclusion would win and nothing would be captured for them) (given: '8080')"),
    (["-d", "*"], "meshredirect compile: error: inbound_ports_exclude: refused: '*' in an exclude list would exclude everything (given: '*')"),
    (["-x", "*"], "meshredirect compile: error: outbound_cidrs_exclude: refused: '*' in an exclude list would exclude everything (given: '*')"),
    (["-i", "127.0.0.0/8"], "meshredirect compile: error: outbound_cidrs: refused: a loopback range included for outbound capture sends the proxy's local connections back to itself: a known loop (given: '127.0.0.0/8')"),
    (["-c", "eth1", "-k", "eth1"], "meshredirect compile: error: reroute_interfaces: refused: an interface cannot be both excluded and rerouted (given: 'eth1')"),
    # backend and tool options
    (["-B", "iptables-sav"], "meshredirect compile: error: unknown backend 'iptables-sav'; did you mean 'iptables-save'? (available: {available})"),
    (["-B", "iptables-save", "--installed", "ipv4=x"], "meshredirect compile: error: --installed: expected only with --backend iptables-restore, got 'iptables-save'"),
    (["--installed", "v4:file"], "meshredirect compile: error: --installed: expected FAMILY=FILE with FAMILY ipv4 or ipv6, got 'v4:file'"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gets_a_pinned_message_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from meshredirect.backend import available_backends

    status, out, err = run(capsys, "compile", *argv)
    assert (status, out) == (2, "")
    assert err.strip() == message.format(available=", ".join(available_backends()))


def test_missing_installed_file_is_an_environment_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, "compile", "--installed", f"ipv4={tmp_path / 'nope'}")
    assert (status, out) == (3, "")
    assert err.strip() == f"meshredirect compile: error: cannot read {tmp_path / 'nope'}: No such file or directory"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "compil")
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].startswith("meshredirect: error: unknown command 'compil'; did you mean 'compile'?")
    with pytest.raises(SystemExit) as info:
        main(["compile", "--no-such-flag"])
    assert info.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "meshredirect compile: error: unrecognized arguments: --no-such-flag"
    )
    status, _, _ = run(capsys)
    assert status == 2


def test_the_installed_command_never_prints_a_traceback() -> None:
    result = subprocess.run([str(EXE), "compile", "-p", "0"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr == "meshredirect compile: error: outbound_port: expected a port number 1-65535, got '0'\n"
    version = subprocess.run([str(EXE), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("meshredirect ")


def test_backends_lists_the_installed_backends(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "backends")
    assert status == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(names) and {"iptables-restore", "iptables-save"} <= set(names)
