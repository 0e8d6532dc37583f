"""The front ends on the command line: compile --policy / --from-pod, fmt, policy --from-istio-flags."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from conformance import istio_cases
from meshredirect.api import render, resolve_groups
from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.frontends.pod import read_pod
from meshredirect.frontends.policy_file import parse_policy
from meshredirect.policy import Policy
from meshredirect.presets import preset
from test_pod import POD_YAML


def cli(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            status = main(list(argv))
    finally:
        sys.stdin = saved
    return status, out.getvalue(), err.getvalue()


def rules(policy: Policy) -> str:
    return render(compile_policy(policy), "iptables-save").text()


# ----------------------------------------------------------------------------- compile --policy / --from-pod


def test_compile_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.policy"
    path.write_text("preset linkerd\noutbound except cidr 10.96.0.0/12  # services\n")
    status, out, err = cli("compile", "-B", "iptables-save", "--policy", str(path))
    assert (status, err) == (0, "")
    assert out == rules(parse_policy(path.read_text()))
    assert cli("compile", "-B", "iptables-save", "--policy", "-", stdin=path.read_text())[1] == out


def test_flags_change_what_the_file_says(tmp_path: Path) -> None:
    path = tmp_path / "mesh.policy"
    path.write_text("preset kuma\n")
    status, out, _ = cli("compile", "-B", "iptables-save", "--policy", str(path), "--drop-invalid")
    assert status == 0 and out == rules(Policy(**{**_fields(preset("kuma")), "drop_invalid": True}))


def _fields(policy: Policy) -> dict[str, object]:
    import attrs

    return attrs.asdict(policy, recurse=False)


def test_a_bad_policy_file_is_located_and_prints_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.policy"
    path.write_text("# mesh\ninbound captur 15006\n")
    assert cli("compile", "--policy", str(path)) == (
        2,
        "",
        f"meshredirect compile: error: {path}:2:9: unexpected 'captur': expected one of: capture, except, mark, "
        "mode, ports, table, tunnel (did you mean 'capture'?)\n    inbound captur 15006\n            ^\n",
    )


def test_one_starting_point_only_and_readable_files(tmp_path: Path) -> None:
    assert cli("compile", "--policy", "x.policy", "--preset", "kuma") == (
        2,
        "",
        "meshredirect compile: error: --policy/--from-pod/--preset: expected at most one of them, got "
        "'--policy x.policy, --preset kuma'\n",
    )
    missing = tmp_path / "missing.policy"
    assert cli("compile", "--policy", str(missing)) == (
        2,
        "",
        f"meshredirect compile: error: --policy: expected a readable UTF-8 file, got '{missing} (No such file or "
        "directory)'\n",
    )


def test_compile_from_a_pod(tmp_path: Path) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text(POD_YAML)
    status, out, err = cli("compile", "-B", "iptables-save", "--from-pod", str(path))
    assert (status, err) == (0, "")
    assert out == rules(read_pod(POD_YAML)[0])
    status, out, _ = cli("compile", "-B", "iptables-save", "--from-pod", str(path), "--pod-inbound-default", "*")
    assert status == 0 and "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" in out


def test_pod_warnings_go_to_stderr(tmp_path: Path) -> None:
    path = tmp_path / "pod.json"
    path.write_text('{"sidecar.istio.io/inject": "false", "traffic.sidecar.istio.io/includeInboundPorts": "*"}')
    status, out, err = cli("compile", "--from-pod", str(path))
    assert status == 0 and out
    assert err == (
        "meshredirect: warning: the pod says sidecar.istio.io/inject: false; Istio would inject no sidecar and "
        "program no rules\n"
    )


# ----------------------------------------------------------------------------- fmt


def test_fmt_prints_checks_and_writes(tmp_path: Path) -> None:
    messy = tmp_path / "messy.policy"
    messy.write_text("outbound   except ports 6379,5432 capture 15001 # db\n")
    clean = tmp_path / "clean.policy"
    clean.write_text("drop invalid\n")
    assert cli("fmt", str(messy)) == (0, "outbound capture 15001 except ports 5432, 6379  # db\n", "")
    assert cli("fmt", "--check", str(messy), str(clean)) == (1, f"{messy}\n", "")
    assert cli("fmt", "--check", str(clean)) == (0, "", "")
    assert cli("fmt", "--write", str(messy), str(clean)) == (0, "", "")
    assert messy.read_text() == "outbound capture 15001 except ports 5432, 6379  # db\n"
    assert cli("fmt", "-", stdin="drop  invalid\n") == (0, "drop invalid\n", "")


def test_fmt_writes_nothing_when_one_file_is_bad(tmp_path: Path) -> None:
    messy = tmp_path / "messy.policy"
    messy.write_text("drop  invalid\n")
    bad = tmp_path / "bad.policy"
    bad.write_text("inbound capture 0\n")
    status, out, err = cli("fmt", "--write", str(messy), str(bad))
    assert (status, out) == (2, "")
    assert err == (
        f"meshredirect fmt: error: {bad}:1:17: inbound capture: expected a port number 1-65535, got 0\n"
        "    inbound capture 0\n                    ^\n"
    )
    assert messy.read_text() == "drop  invalid\n"


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize("name", sorted(istio_cases()))
def test_policy_file_from_every_istio_case_flag_line(name: str, tmp_path: Path) -> None:
    case = istio_cases()[name]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("".join(f"nameserver {s}\n" for s in [*case["dns_servers_v4"], *case["dns_servers_v6"]]))
    words = [f"ISTIO_OUTBOUND_OWNER_GROUPS={case['owner_groups_include']}"]
    words.append(f"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE={case['owner_groups_exclude']}")
    words.append(f"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR={case['host_ipv4_loopback_cidr']}")
    words += ["-p", case["proxy_port"], "-z", case["inbound_capture_port"], "-e", case["inbound_tunnel_port"]]
    words += ["-u", case["proxy_uid"], "-g", case["proxy_gid"], "-m", case["inbound_interception_mode"]]
    words += ["-t", case["inbound_tproxy_mark"], "-r", case["inbound_tproxy_route_table"]]
    words += ["-b", case["inbound_ports_include"], "-d", case["inbound_ports_exclude"]]
    words += ["-i", case["outbound_ip_ranges_include"], "-x", case["outbound_ip_ranges_exclude"]]
    words += ["-q", case["outbound_ports_include"], "-o", case["outbound_ports_exclude"]]
    words += ["-c", case["exclude_interfaces"], "-k", case["reroute_virtual_interfaces"]]
    for flag in ("redirect_dns", "capture_all_dns", "drop_invalid"):
        words.append(f"--{flag.replace('_', '-')}={str(case[flag]).lower()}")
    words += [f"--enable-ipv6={str(case['enable_ipv6']).lower()}", f"--resolv-conf={resolv}"]
    target = tmp_path / f"{name}.policy"
    status, out, err = cli("policy", "--to", str(target), "--from-istio-flags", *words)
    assert status == 0, err
    assert out == f"{target}\n"
    assert parse_policy(target.read_text()) == policy_from_istio_config(case)


def test_policy_from_a_pod_and_from_flags_to_standard_output(tmp_path: Path) -> None:
    pod = tmp_path / "pod.yaml"
    pod.write_text(POD_YAML)
    status, out, _ = cli("policy", "--from-pod", str(pod))
    assert status == 0 and parse_policy(out) == read_pod(POD_YAML)[0]
    assert cli("policy", "--preset", "linkerd", "--drop-invalid") == (0, "preset linkerd\ndrop invalid\n", "")


def test_policy_keeps_group_names() -> None:
    status, out, _err = cli("policy", "--from-istio-flags", "ISTIO_OUTBOUND_OWNER_GROUPS=no-such-group-here", "-b", "*")
    assert status == 0 and "groups include no-such-group-here\n" in out
    with pytest.raises(Exception, match="group 'no-such-group-here' does not exist"):
        resolve_groups(parse_policy(out), lambda name: None)


def test_policy_from_istio_flags_errors_are_pinned() -> None:
    assert cli("policy", "--from-istio-flags", "-p", "http") == (
        2,
        "",
        "meshredirect policy: error: -p/--envoy-port: expected a port number 1-65535, got 'http'\n",
    )
    assert cli("policy", "--preset", "kuma", "--from-istio-flags", "-b", "*") == (
        2,
        "",
        "meshredirect policy: error: --from-istio-flags: expected no other starting point, got '--preset'\n",
    )


def test_cli_start_up_does_not_import_the_parsers() -> None:
    code = (
        "import io, sys, contextlib\n"
        "from meshredirect.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['istio-iptables', '-n', '--enable-ipv6=false', '-b', '*'])\n"
        "print(sorted(m for m in ('lark', 'yaml', 'hypothesis') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
