"""``istio-iptables`` flags: every Istio case as a flag line, every flag, every quirk, every pinned error."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance import istio_cases
from meshredirect.api import render
from meshredirect.cli import main
from meshredirect.compiler import compile_policy
from meshredirect.errors import PolicyError, UnsafePolicyError
from meshredirect.frontends.istio import ISTIO_DEFAULTS, policy_from_istio_config
from meshredirect.frontends.istio_flags import (
    ENV_ONLY,
    FLAGS,
    IstioFlag,
    IstioFlags,
    Kind,
    addresses_enable_ipv6,
    parse_istio_flags,
    parse_resolv_conf,
)
from meshredirect.ir import Family
from meshredirect.policy import InterceptionMode, Policy
from meshredirect.values import ALL, AddressSet, IdSet, PortSet

CASES = istio_cases()
BY_FIELD = {f.field: f for f in FLAGS if f.field}
ENV_OF_FIELD = {field: name for name, (field, _d, _h) in ENV_ONLY.items() if field}
NO_USER = {}.get


def policy_of(argv: list[str], environ: dict[str, str] | None = None, **kw: Any) -> Policy:
    flags = parse_istio_flags(argv, environ or {})
    options: dict[str, Any] = {"proxy_uid_lookup": NO_USER, "dns_servers": (), "enable_ipv6": False}
    options.update(kw)
    return flags.policy(**options)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- the Istio cases as flag lines


@st.composite
def flag_line(draw: st.DrawFn, case: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
    """A command line, an environment and a resolv.conf that say what ``case`` says, in randomly chosen forms."""
    argv: list[str] = []
    environ: dict[str, str] = {}
    for field, value in case.items():
        if field in ENV_OF_FIELD:
            if value != ISTIO_DEFAULTS[field] or draw(st.booleans()):
                environ[ENV_OF_FIELD[field]] = str(value)
            continue
        flag = BY_FIELD.get(field)
        if flag is None:
            continue
        argv_part, env_part = draw(flag_forms(flag, value))
        argv += argv_part
        environ.update(env_part)
    if draw(st.booleans()):
        argv.append(f"--enable-ipv6={str(case['enable_ipv6']).lower()}")
    else:
        environ["ENABLE_INBOUND_IPV6"] = str(case["enable_ipv6"]).lower()
    servers = [*case["dns_servers_v4"], *case["dns_servers_v6"]]
    resolv = "search cluster.local\n" + "".join(f"nameserver {s}\n" for s in servers)
    return argv, environ, resolv


def flag_forms(flag: IstioFlag, value: object) -> st.SearchStrategy[tuple[list[str], dict[str, str]]]:
    if flag.kind is Kind.BOOL:
        on = bool(value)
        text = "true" if on else "false"
        forms: list[tuple[list[str], dict[str, str]]] = [
            ([f"--{flag.name}={text}"], {}),
            ([], {flag.env[0]: st_bool_text(on)}),
            ([], {flag.env[-1]: text}),
        ]
        forms.append(([f"--{flag.name}"], {}) if on else ([], {}))
        return st.sampled_from(forms)
    text = str(value)
    forms = [([f"--{flag.name}", text], {}), ([f"--{flag.name}={text}"], {}), ([], {flag.env[0]: text})]
    if flag.short:
        forms += [([f"-{flag.short}", text], {}), ([f"-{flag.short}={text}"], {})]
        if text:
            forms.append(([f"-{flag.short}{text}"], {}))
    return st.sampled_from(forms)


def st_bool_text(on: bool) -> str:
    return "1" if on else "0"


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=40)
@given(data=st.data())
def test_every_istio_case_as_a_flag_line_gives_the_same_policy(name: str, data: st.DataObject) -> None:
    case = CASES[name]
    argv, environ, resolv = data.draw(flag_line(case))
    flags = parse_istio_flags(argv, environ)
    policy = flags.policy(
        proxy_uid_lookup=NO_USER,
        dns_servers=parse_resolv_conf(resolv) if flags.flag("redirect-dns") else (),
        enable_ipv6=flags.text("enable-ipv6") == "true",
    )
    assert policy == policy_from_istio_config(case)


def test_the_flag_line_generator_can_fail() -> None:
    """A wrong rendering is caught: the case's -b given as -d instead must give another policy."""
    case = CASES["inbound-ports-include"]
    assert policy_of(["-d", case["inbound_ports_include"]]) != policy_from_istio_config(case)


# ----------------------------------------------------------------------------- every flag


def test_flag_table_is_complete() -> None:
    shorts = {f.short for f in FLAGS if f.short}
    assert shorts == set("pzeugmtrbdixqockn")
    longs = {f.name for f in FLAGS}
    for name in (
        "redirect-dns",
        "capture-all-dns",
        "drop-invalid",
        "dual-stack",
        "dry-run",
        "skip-rule-apply",
        "run-validation",
        "iptables-probe-port",
        "probe-timeout",
        "network-namespace",
        "cni-mode",
        "reconcile",
        "cleanup-only",
        "force-apply",
        "native-nftables",
        "force-iptables-binary",
    ):
        assert name in longs
    assert set(ENV_ONLY) == {
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "ENVOY_USER",
    }
    fields = {f.field for f in FLAGS if f.field} | {f for f, _d, _h in ENV_ONLY.values() if f}
    assert fields | {"dns_servers_v4", "dns_servers_v6", "enable_ipv6"} == set(ISTIO_DEFAULTS)


#: A valid value for each flag, other than its default.
SAMPLE = {
    "envoy-port": "15101",
    "inbound-capture-port": "15106",
    "inbound-tunnel-port": "15108",
    "proxy-uid": "1500",
    "proxy-gid": "1501",
    "istio-inbound-interception-mode": "TPROXY",
    "istio-inbound-ports": "8080,8443",
    "istio-local-exclude-ports": "22",
    "istio-exclude-interfaces": "eth9",
    "istio-service-cidr": "10.0.0.0/8",
    "istio-service-exclude-cidr": "10.96.0.0/12",
    "istio-outbound-ports": "3306",
    "istio-local-outbound-ports-exclude": "5432",
    "kube-virt-interfaces": "net1",
    "istio-inbound-tproxy-mark": "77",
    "istio-inbound-tproxy-route-table": "177",
    "iptables-probe-port": "16002",
    "probe-timeout": "1m30s",
    "network-namespace": "/proc/1/ns/net",
    "force-iptables-binary": "legacy",
    "enable-ipv6": "true",
    "resolv-conf": "/tmp/resolv.conf",
}


@pytest.mark.parametrize("flag", FLAGS, ids=[f.name for f in FLAGS])
def test_every_flag_by_long_short_and_environment(flag: IstioFlag) -> None:
    value = "true" if flag.kind is Kind.BOOL else SAMPLE[flag.name]
    assert value != flag.default
    spellings: list[tuple[list[str], dict[str, str], str]] = [([f"--{flag.name}={value}"], {}, flag.label)]
    if flag.kind is Kind.BOOL:
        spellings.append(([f"--{flag.name}"], {}, flag.label))
    else:
        spellings.append(([f"--{flag.name}", value], {}, flag.label))
    if flag.short:
        spellings.append(
            ([f"-{flag.short}", value] if flag.kind is not Kind.BOOL else [f"-{flag.short}"], {}, flag.label)
        )
    for variable in flag.env:
        spellings.append(([], {variable: value}, f"{variable} (environment)"))
    for argv, environ, where in spellings:
        flags = parse_istio_flags(argv, environ)
        assert flags.text(flag.name) == value, (argv, environ)
        assert flags.where(flag.name) == where
    assert parse_istio_flags([], {}).text(flag.name) == flag.default


#: Flag -> a check of the policy field it feeds when set to SAMPLE.
FIELD_EFFECTS = {
    "envoy-port": lambda p: p.outbound_port == 15101,
    "inbound-capture-port": lambda p: p.inbound_port == 15106,
    "inbound-tunnel-port": lambda p: p.inbound_tunnel_port == 15108,
    "proxy-uid": lambda p: p.proxy_uids == IdSet.of(1500) and p.proxy_gids == IdSet.of(1500),
    "proxy-gid": lambda p: p.proxy_gids == IdSet.of(1501),
    "istio-inbound-interception-mode": lambda p: p.inbound_mode is InterceptionMode.TPROXY,
    "istio-inbound-ports": lambda p: p.inbound_ports == PortSet.of(8080, 8443),
    "istio-local-exclude-ports": lambda p: p.inbound_ports_exclude == PortSet(()),
    "istio-exclude-interfaces": lambda p: p.exclude_interfaces == ("eth9",),
    "istio-service-cidr": lambda p: p.outbound_cidrs == AddressSet.of("10.0.0.0/8"),
    "istio-service-exclude-cidr": lambda p: p.outbound_cidrs_exclude == AddressSet.of("10.96.0.0/12"),
    "istio-outbound-ports": lambda p: p.outbound_ports == PortSet.of(3306),
    "istio-local-outbound-ports-exclude": lambda p: p.outbound_ports_exclude == PortSet.of(5432),
    "kube-virt-interfaces": lambda p: p.reroute_interfaces == ("net1",),
    "istio-inbound-tproxy-mark": lambda p: p.tproxy_mark == 77,
    "istio-inbound-tproxy-route-table": lambda p: p.tproxy_route_table == 177,
    "redirect-dns": lambda p: p.dns.enabled and p.dns.servers == (),
    "capture-all-dns": lambda p: not p.dns.enabled,
    "drop-invalid": lambda p: p.drop_invalid,
}


@pytest.mark.parametrize("name", sorted(FIELD_EFFECTS))
def test_every_policy_flag_reaches_its_policy_field(name: str) -> None:
    flag = next(f for f in FLAGS if f.name == name)
    value = "true" if flag.kind is Kind.BOOL else SAMPLE[name]
    extra = ["--capture-all-dns"] if name == "redirect-dns" else []
    policy = policy_of([f"--{name}={value}", *extra])
    assert FIELD_EFFECTS[name](policy)
    assert not FIELD_EFFECTS[name](policy_of([])) or name in ("istio-local-exclude-ports", "capture-all-dns")


def test_defaults_are_istio_iptables_defaults() -> None:
    """No flag at all: 15001/15006/15008, uid and gid 1337, no inbound and no outbound capture."""
    policy = policy_of([])
    assert (policy.outbound_port, policy.inbound_port, policy.inbound_tunnel_port) == (15001, 15006, 15008)
    assert policy.proxy_uids == IdSet.of(1337) and policy.proxy_gids == IdSet.of(1337)
    assert policy.inbound_ports == PortSet(()) and policy.outbound_cidrs == AddressSet(())
    assert policy == policy_from_istio_config(CASES["empty"])


def test_the_injection_template_line_is_the_production_default() -> None:
    argv = [
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
    ]
    assert policy_of(argv) == Policy()


# ----------------------------------------------------------------------------- quirks


def test_trailing_commas_and_empty_items_are_ignored() -> None:
    policy = policy_of(["-b", "*", "-d", "15020,15021,", "-x", "10.0.0.0/8,,", "-q", ",3306,"])
    assert policy.inbound_ports_exclude == PortSet.of(15020, 15021)
    assert policy.outbound_cidrs_exclude == AddressSet.of("10.0.0.0/8")
    assert policy.outbound_ports == PortSet.of(3306)


def test_star_means_everything() -> None:
    policy = policy_of(["-b", "*", "-i", "*"])
    assert policy.inbound_ports is ALL and policy.outbound_cidrs is ALL


def test_gid_defaults_to_uid() -> None:
    assert policy_of(["-u", "3,4"]).proxy_gids == IdSet.of(3, 4)
    assert policy_of(["-u", "3,4", "-g", "5"]).proxy_gids == IdSet.of(5)


def test_envoy_user_resolves_the_uid_when_u_is_empty() -> None:
    users = {"istio-proxy": 1400, "envoy": 101}.get
    assert policy_of([], proxy_uid_lookup=users).proxy_uids == IdSet.of(1400)
    assert policy_of([], {"ENVOY_USER": "envoy"}, proxy_uid_lookup=users).proxy_uids == IdSet.of(101)
    assert policy_of([], {"ENVOY_USER": "nobody-here"}, proxy_uid_lookup=users).proxy_uids == IdSet.of(1337)
    assert policy_of(["-u", "7"], {"ENVOY_USER": "envoy"}, proxy_uid_lookup=users).proxy_uids == IdSet.of(7)


def test_exclude_ports_only_with_star_and_a_warning() -> None:
    flags = parse_istio_flags(["-b", "80", "-d", "22"], {})
    warnings: list[str] = []
    policy = flags.policy(proxy_uid_lookup=NO_USER, dns_servers=(), enable_ipv6=False, warnings=warnings)
    assert policy.inbound_ports_exclude == PortSet(())
    assert warnings == [
        "-d/--istio-local-exclude-ports is ignored: inbound exclusions apply only with -b '*' (as in istio-iptables)"
    ]
    assert policy_of(["-b", "*", "-d", "22"]).inbound_ports_exclude == PortSet.of(22)


def test_dns_without_servers_is_disabled_with_a_warning() -> None:
    flags = parse_istio_flags(["--redirect-dns"], {})
    warnings: list[str] = []
    policy = flags.policy(proxy_uid_lookup=NO_USER, dns_servers=(), enable_ipv6=False, warnings=warnings)
    assert not policy.dns.enabled
    assert warnings == [
        "--redirect-dns is set but --capture-all-dns is not and /etc/resolv.conf names no DNS server for the "
        "families programmed: DNS capture is disabled (as istio-iptables does)"
    ]
    only_v6 = parse_istio_flags(["--redirect-dns"], {})
    warnings.clear()
    assert not only_v6.policy(
        proxy_uid_lookup=NO_USER, dns_servers=("fd00::a",), enable_ipv6=False, warnings=warnings
    ).dns.enabled
    assert len(warnings) == 1


def test_dns_with_servers_and_capture_all() -> None:
    policy = policy_of(["--redirect-dns"], dns_servers=("10.96.0.10", "fd00::a"), enable_ipv6=True)
    assert policy.dns.enabled and [str(s) for s in policy.dns.servers] == ["10.96.0.10", "fd00::a"]
    everything = policy_of(["--redirect-dns", "--capture-all-dns"])
    assert everything.dns.enabled and everything.dns.capture_all
    assert policy_of([], {"ISTIO_META_DNS_CAPTURE": "true"}, dns_servers=("10.96.0.10",)).dns.enabled


def test_a_later_variable_wins_and_the_command_line_wins_over_both() -> None:
    env = {"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"}
    assert parse_istio_flags([], env).flag("redirect-dns")
    assert not parse_istio_flags(["--redirect-dns=false"], env).flag("redirect-dns")
    assert parse_istio_flags(["-p", "1"], {"ENVOY_PORT": "2"}).text("envoy-port") == "1"
    assert parse_istio_flags([], {"INVALID_DROP": "1"}).flag("drop-invalid")


def test_loopback_cidr_and_owner_groups_come_from_the_environment() -> None:
    policy = policy_of(
        [], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/8", "ISTIO_OUTBOUND_OWNER_GROUPS": "java,202"}
    )
    assert str(policy.loopback_cidr) == "127.0.0.0/8" and policy.owner_groups_include == ("java", 202)
    excluded = policy_of([], {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp"})
    assert excluded.owner_groups_exclude == (888, "ftp") and excluded.owner_groups_include is ALL


def test_enable_ipv6_programs_both_families() -> None:
    assert policy_of([], enable_ipv6=True).families == frozenset({Family.IPV4, Family.IPV6})
    assert policy_of([]).families == frozenset({Family.IPV4})


def test_ipv6_detection_follows_getlocalip() -> None:
    v4_first = ["127.0.0.1", "10.1.0.5", "::1", "fe80::1", "fd00::5"]
    assert addresses_enable_ipv6(v4_first, dual_stack=False) is False
    assert addresses_enable_ipv6(v4_first, dual_stack=True) is True
    assert addresses_enable_ipv6(["::1", "fe80::1", "fd00::5"], dual_stack=False) is True
    assert addresses_enable_ipv6(["127.0.0.1", "::ffff:10.1.0.5"], dual_stack=True) is False
    assert addresses_enable_ipv6(["127.0.0.1", "fe80::1"], dual_stack=False) is None


def test_go_flag_syntax() -> None:
    flags = parse_istio_flags(["-nb*", "-p15101", "-z=15106", "--dry-run=false", "-e", "", "--"], {})
    assert not flags.flag("dry-run")
    assert (flags.text("istio-inbound-ports"), flags.text("envoy-port"), flags.text("inbound-capture-port")) == (
        "*",
        "15101",
        "15106",
    )
    assert flags.text("inbound-tunnel-port") == ""
    assert policy_of(["-e", ""]).inbound_tunnel_port is None
    assert parse_istio_flags(["-n=false"], {}).flag("dry-run") is False
    assert parse_istio_flags(["-b", "-d"], {}).text("istio-inbound-ports") == "-d"
    assert parse_istio_flags(["-h"], {}).help and parse_istio_flags(["--help"], {}).help


def test_resolv_conf() -> None:
    text = "# a comment\nnameserver 10.96.0.10\nnameserver  fd00::a%eth0\nnameserver bogus\noptions ndots:5\n"
    assert parse_resolv_conf(text) == ("10.96.0.10", "fd00::a")


def test_probe_timeout_in_seconds() -> None:
    assert parse_istio_flags(["--probe-timeout", "1m30s"], {}).seconds("probe-timeout") == 90.0
    assert parse_istio_flags(["--probe-timeout=500ms"], {}).seconds("probe-timeout") == 0.5
    assert parse_istio_flags([], {}).seconds("probe-timeout") == 5.0


# ----------------------------------------------------------------------------- errors, pinned

ERRORS = [
    (
        ["--envoy-prot", "1"],
        {},
        "istio-iptables: expected a known flag (did you mean '--envoy-port'?), got '--envoy-prot'",
    ),
    (["--nonsense"], {}, "istio-iptables: expected a known flag, got '--nonsense'"),
    (["-y"], {}, "istio-iptables: expected a known flag, got '-y'"),
    (["-p"], {}, "-p/--envoy-port: expected a value, got 'nothing (the command line ends)'"),
    (["--envoy-port"], {}, "-p/--envoy-port: expected a value, got 'nothing (the command line ends)'"),
    (["extra"], {}, "istio-iptables: expected only flags (no arguments), got 'extra'"),
    (["--", "extra"], {}, "istio-iptables: expected only flags (no arguments), got 'extra'"),
    (
        ["--dry-run=maybe"],
        {},
        "-n/--dry-run: expected true or false (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False), got 'maybe'",
    ),
    (
        [],
        {"REDIRECT_DNS": "yes"},
        "REDIRECT_DNS (environment): expected true or false (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False), got 'yes'",
    ),
    (["--probe-timeout", "5"], {}, "--probe-timeout: expected a duration such as 5s, 1m30s or 500ms, got '5'"),
    (["--probe-timeout=-1s"], {}, "--probe-timeout: expected a duration that is not negative, got '-1s'"),
    (["--iptables-probe-port", "70000"], {}, "--iptables-probe-port: expected a number 0-65535, got '70000'"),
    (["--force-iptables-binary", "nf"], {}, "--force-iptables-binary: expected 'nft' or 'legacy' (or empty), got 'nf'"),
    (["--enable-ipv6", "yes"], {}, "--enable-ipv6: expected 'auto' or 'true' or 'false', got 'yes'"),
    (
        ["--force-legacy-iptables"],
        {},
        "--force-legacy-iptables: expected a current flag; use --force-iptables-binary=legacy (its replacement in "
        "istio-iptables), got '--force-legacy-iptables'",
    ),
    (
        ["--iptables-trace-logging=true"],
        {},
        "--iptables-trace-logging: expected a current flag; use 'meshredirect graph' to see the rules "
        "(istio-iptables dropped this flag), got '--iptables-trace-logging=true'",
    ),
]


@pytest.mark.parametrize(("argv", "environ", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_command_lines_are_pinned(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_istio_flags(argv, environ)
    assert str(info.value) == message


VALUE_ERRORS = [
    (["-z", "http"], {}, "-z/--inbound-capture-port: expected a port number 1-65535, got 'http'"),
    ([], {"INBOUND_CAPTURE_PORT": "0"}, "INBOUND_CAPTURE_PORT (environment): expected a port number 1-65535, got '0'"),
    (["-b", "80,abc"], {}, "-b/--istio-inbound-ports: expected a port number 1-65535, got 'abc'"),
    (
        ["-x", "10.0.0.300/8"],
        {},
        "-x/--istio-service-exclude-cidr: expected an IPv4 or IPv6 address or CIDR, got '10.0.0.300/8'",
    ),
    (
        ["-m", "tproxy"],
        {},
        "-m/--istio-inbound-interception-mode: expected REDIRECT or TPROXY (istio-iptables would silently treat any "
        "other value as REDIRECT), got 'tproxy'",
    ),
    (
        ["-u", "0"],
        {},
        "-u/--proxy-uid: refused: uid 0 (root) would exempt every root process from capture, a mesh bypass (given: 0)",
    ),
    (
        ["-u", "7", "-g", "0"],
        {},
        "-g/--proxy-gid: refused: gid 0 (root) would exempt every root-group process from capture, a mesh bypass (given: 0)",
    ),
    (
        ["-i", "127.0.0.0/8"],
        {},
        "-i/--istio-service-cidr: refused: a loopback range included for outbound capture sends the proxy's local "
        "connections back to itself: a known loop (given: '127.0.0.0/8')",
    ),
    (
        [],
        {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.0/8"},
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR (environment): expected an IPv4 CIDR inside 127.0.0.0/8 that holds "
        "127.0.0.1, got '10.0.0.0/8'",
    ),
    (
        [],
        {"ISTIO_OUTBOUND_OWNER_GROUPS": "101", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "102"},
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE (environment): refused: owner groups can be included or excluded, "
        "not both (given: '102')",
    ),
    (["-k", "eth 1"], {}, None),
    (["-t", "0", "-m", "TPROXY", "-b", "*"], {}, "-t/--istio-inbound-tproxy-mark: expected a mark 1-4294967294, got 0"),
    (
        ["-r", "254"],
        {},
        "-r/--istio-inbound-tproxy-route-table: expected a route table number other than 0, 253 (default), "
        "254 (main), 255 (local), got 254",
    ),
]


@pytest.mark.parametrize(("argv", "environ", "message"), VALUE_ERRORS, ids=[str(i) for i in range(len(VALUE_ERRORS))])
def test_malformed_values_name_the_flag(argv: list[str], environ: dict[str, str], message: str | None) -> None:
    with pytest.raises(PolicyError) as info:
        policy_of(argv, environ)
    if message is None:
        assert str(info.value).startswith("-k/--kube-virt-interfaces: expected an interface name")
    else:
        assert str(info.value) == message
    if "refused" in (message or ""):
        assert isinstance(info.value, UnsafePolicyError)


# ----------------------------------------------------------------------------- the command


@contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["istio-iptables", *argv])
    return status, out.getvalue(), err.getvalue()


def test_dry_run_prints_the_rules_of_the_policy() -> None:
    status, out, err = run_cli("-n", "--enable-ipv6=false", "-b", "*", "-i", "*", "-d", "15090,15021,15020")
    assert (status, err) == (0, "")
    assert out == render(compile_policy(Policy()), "iptables-save").text()


def test_dry_run_with_dns_reads_the_resolv_conf(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.96.0.10\n")
    status, out, _err = run_cli("-n", "--enable-ipv6=false", "--redirect-dns", f"--resolv-conf={resolv}")
    assert status == 0 and "-d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in out
    status, _out, err = run_cli("-n", "--enable-ipv6=false", "--redirect-dns", f"--resolv-conf={tmp_path}/missing")
    assert status == 3 and f"cannot read {tmp_path}/missing: No such file or directory" in err


def test_help_lists_every_flag() -> None:
    status, out, _err = run_cli("--help")
    assert status == 0
    for flag in FLAGS:
        assert f"--{flag.name}" in out and all(v in out for v in flag.env)
    for variable in ENV_ONLY:
        assert variable in out


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (
            ["--envoy-prot", "1"],
            2,
            "meshredirect istio-iptables: error: istio-iptables: expected a known flag (did you mean '--envoy-port'?), got '--envoy-prot'\n",
        ),
        (
            ["-n", "--enable-ipv6=false", "-z", "http"],
            2,
            "meshredirect istio-iptables: error: -z/--inbound-capture-port: expected a port number 1-65535, got 'http'\n",
        ),
    ],
)
def test_command_errors_exit_with_a_pinned_message(argv: list[str], status: int, message: str) -> None:
    assert run_cli(*argv) == (status, "", message)


def test_validation_is_skipped_with_a_warning_in_a_dry_run() -> None:
    status, out, err = run_cli("-n", "--enable-ipv6=false", "--run-validation", "-b", "*")
    assert status == 0 and out.startswith("*nat\n")
    assert err == (
        "meshredirect istio-iptables: warning: --run-validation is skipped with --dry-run (nothing was applied to "
        "validate)\n"
    )


def test_native_nftables_prints_and_applies_through_the_nftables_backend() -> None:
    status, out, err = run_cli("-n", "--enable-ipv6=false", "--native-nftables")
    assert (status, err) == (0, "")
    assert out.startswith("table ip istio\ndelete table ip istio\ntable ip istio {\n    chain nat-OUTPUT {\n")
    assert "iptables" not in out


def test_environment_reaches_the_command() -> None:
    with environment(ISTIO_INBOUND_PORTS="*", ISTIO_SERVICE_CIDR="*", ENABLE_INBOUND_IPV6="false", DRY_RUN="true"):
        status, out, _err = run_cli("-d", "15090,15021,15020")
    assert status == 0 and out == render(compile_policy(Policy()), "iptables-save").text()


def test_unresolvable_group_names_the_variable() -> None:
    with environment(ISTIO_OUTBOUND_OWNER_GROUPS="no-such-group-here"):
        status, out, err = run_cli("-n", "--enable-ipv6=false")
    assert (status, out) == (2, "")
    assert err == (
        "meshredirect istio-iptables: error: ISTIO_OUTBOUND_OWNER_GROUPS (environment): refused: group "
        "'no-such-group-here' does not exist on this machine; a rule naming it cannot be loaded (given: "
        "'no-such-group-here')\n"
    )


def test_istio_flags_value_object() -> None:
    flags = parse_istio_flags(["-p", "1"], {})
    assert isinstance(flags, IstioFlags) and flags.given("envoy-port") and not flags.given("dry-run")
