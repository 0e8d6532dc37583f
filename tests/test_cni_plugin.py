"""meshredirect-cni as the runtime sees it: every bad input gives pinned CNI error JSON, never a traceback.

The installed executable is run as a runtime runs it (environment, standard
input); skipped pods are handled in-process (they touch no kernel).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshredirect.api import render
from meshredirect.cni.config import parse_plugin_config
from meshredirect.cni.plugin import decide, run_plugin
from meshredirect.cni.protocol import CniError, parse_cni_args, parse_environment, passthrough_result
from meshredirect.cni.rules import MAX_SHOWN, Installed, differences, owned_part
from meshredirect.compiler import compile_policy
from meshredirect.ir import (
    Accept,
    Chain,
    ChainPolicy,
    Drop,
    Family,
    Jump,
    OwnerKind,
    OwnerMatch,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Table,
)
from meshredirect.policy import Policy
from meshredirect.readers.iptables import read_iptables
from meshredirect.semantics.equivalence import equivalent
from meshredirect.semantics.model import Environment
from meshredirect.testing.strategies import policies
from meshredirect.values import IdSet
from meshredirect_nftables import NftLowering

EXECUTABLE = shutil.which("meshredirect-cni", path=str(Path(__file__).resolve().parent.parent / ".venv" / "bin"))
PREVIOUS = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}], "ips": []}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/mr-none", "CNI_IFNAME": "eth0"}


def config(**fields: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "k8s", "type": "meshredirect-cni", "prevResult": PREVIOUS, **fields}


def invoke(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any], str]:
    """The real executable, with only the protocol's environment (and PATH)."""
    assert EXECUTABLE is not None, "run ./dev setup: meshredirect-cni is not installed in .venv"
    done = subprocess.run(
        [EXECUTABLE],
        input=stdin,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {done.stdout!r}"
    return done.returncode, json.loads(lines[0]), done.stderr.decode()


ERRORS = [
    # (environment changes, standard input, code, msg)
    ({"CNI_COMMAND": ""}, b"{}", 4, "CNI_COMMAND: expected one of ADD, DEL, CHECK, VERSION, got nothing"),
    ({"CNI_COMMAND": "GC"}, b"{}", 4, "CNI_COMMAND: expected one of ADD, DEL, CHECK, VERSION, got 'GC'"),
    ({"CNI_NETNS": ""}, b"{}", 4, "CNI_NETNS: required for ADD, got nothing"),
    ({"CNI_NETNS": "netns/x"}, b"{}", 4, "CNI_NETNS: expected an absolute path, got 'netns/x'"),
    (
        {"CNI_CONTAINERID": "-bad"},
        b"{}",
        4,
        "CNI_CONTAINERID: expected an alphanumeric followed by alphanumerics, '_', '.' or '-', got '-bad'",
    ),
    (
        {"CNI_IFNAME": "a-very-long-interface"},
        b"{}",
        4,
        "CNI_IFNAME: expected an interface name of 1-15 characters without '/', ':' or spaces, "
        "got 'a-very-long-interface'",
    ),
    ({"CNI_ARGS": "K8S_POD_NAME"}, b"{}", 4, "CNI_ARGS: expected KEY=VALUE pairs separated by ';', got 'K8S_POD_NAME'"),
    ({}, b"", 6, "<stdin>: expected a JSON network configuration, got nothing"),
    (
        {},
        b'{"cniVersion": "1.0.0",\n "name": }',
        6,
        "<stdin>:2:10: expected a JSON network configuration: Expecting value",
    ),
    ({}, b"[1, 2]", 6, "<stdin>: expected a JSON object, got list [1, 2]"),
    ({}, b"\xff\xfe", 6, "<stdin>: expected UTF-8 JSON, got a byte 0xff at 0"),
    (
        {},
        json.dumps({"name": "k8s"}).encode(),
        1,
        "cniVersion: expected one of 0.4.0, 1.0.0, got nothing (which means 0.1.0)",
    ),
    ({}, json.dumps(config(cniVersion="0.3.1")).encode(), 1, "cniVersion: expected one of 0.4.0, 1.0.0, got '0.3.1'"),
    (
        {},
        json.dumps(config(exclude_namespace=["a"])).encode(),
        2,
        "unsupported field 'exclude_namespace' = [\"a\"] (did you mean 'exclude_namespaces'?)",
    ),
    (
        {},
        json.dumps(config(policy={"outbound_prot": 1})).encode(),
        2,
        "unsupported field 'policy.outbound_prot' = 1 (did you mean 'policy.outbound_port'?)",
    ),
    (
        {},
        json.dumps(config(policy={"proxy_uids": [0]})).encode(),
        7,
        "policy: proxy_uids: refused: uid 0 (root) would exempt every root process from capture, a mesh bypass (given: 0)",
    ),
    (
        {},
        json.dumps(config(policy={"outbound_port": 70000})).encode(),
        7,
        "policy: outbound_port: expected a port number 1-65535, got 70000",
    ),
    (
        {},
        json.dumps(config(policy={"owner_groups_exclude": "wheel"})).encode(),
        7,
        "policy: group 'wheel': expected a numeric gid (a name cannot be resolved for a pod from the node's group database)",
    ),
    (
        {},
        json.dumps(config(preset="istio14")).encode(),
        7,
        "preset: expected one of istio, istio-1.4, kuma, linkerd (did you mean 'istio-1.4'?), got \"istio14\"",
    ),
    (
        {},
        json.dumps(config(iptables_variant="xt")).encode(),
        7,
        'iptables_variant: expected auto or nft or legacy, got "xt"',
    ),
    (
        {},
        json.dumps(config(backend="ebpf")).encode(),
        7,
        'backend: expected iptables or nftables, got "ebpf"',
    ),
    (
        {},
        json.dumps(config(inbound_ports_default="all")).encode(),
        7,
        'inbound_ports_default: expected "*" or "container-ports", got "all"',
    ),
    (
        {},
        json.dumps(config(inbound_ports_default="container-ports")).encode(),
        7,
        'inbound_ports_default: expected "*" without a pod_source whose annotations apply (container ports are '
        'read from the pod), got "container-ports"',
    ),
    (
        {},
        json.dumps(config(skip_pods=["web"])).encode(),
        7,
        'skip_pods: expected entries NAMESPACE/NAME (shell patterns allowed), got "web"',
    ),
    (
        {},
        json.dumps(config(require_annotation="a")).encode(),
        7,
        'require_annotation: expected a pod_source to read annotations from, got "a"',
    ),
    (
        {},
        json.dumps(config(pod_source={"kind": "kubernetes", "api_server": "http://10.0.0.1"})).encode(),
        7,
        'pod_source.api_server: expected an https:// URL of the Kubernetes API, got "http://10.0.0.1"',
    ),
    (
        {},
        json.dumps(config(pod_source={"kind": "directory", "path": "pods"})).encode(),
        7,
        'pod_source.path: expected an absolute directory path, got "pods"',
    ),
    (
        {},
        json.dumps(config(pod_source={"kind": "directory", "path": "/p", "glob": "*"})).encode(),
        2,
        "unsupported field 'pod_source.glob' = \"*\" (did you mean 'pod_source.path'?)",
    ),
    (
        {},
        json.dumps({k: v for k, v in config().items() if k != "prevResult"}).encode(),
        7,
        "prevResult: expected the result of the main plugin (meshredirect-cni is a chained plugin and must follow one in a plugin list), got nothing",
    ),
    (
        {"CNI_COMMAND": "CHECK"},
        json.dumps({k: v for k, v in config().items() if k != "prevResult"}).encode(),
        7,
        "prevResult: CHECK needs the result of the preceding ADD, got nothing",
    ),
    ({}, json.dumps(config()).encode(), 3, "CNI_NETNS: the network namespace /var/run/netns/mr-none does not exist"),
    (
        {"CNI_COMMAND": "CHECK"},
        json.dumps(config()).encode(),
        3,
        "CNI_NETNS: the network namespace /var/run/netns/mr-none does not exist",
    ),
]


@pytest.mark.parametrize(("changes", "stdin", "code", "msg"), ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_input_is_a_pinned_cni_error(changes: dict[str, str], stdin: bytes, code: int, msg: str) -> None:
    env = {k: v for k, v in {**ENV, **changes}.items() if v or k == "CNI_COMMAND"}
    status, error, stderr = invoke(env, stdin)
    assert status == 1
    assert error["code"] == code
    assert error["msg"] == msg
    assert error["cniVersion"] in ("0.4.0", "1.0.0")
    assert set(error) <= {"cniVersion", "code", "msg", "details"}
    assert "Traceback" not in stderr


def test_decode_error_details_show_the_line_and_a_caret() -> None:
    _, error, _ = invoke(ENV, b'{"cniVersion": "1.0.0",\n "name": }')
    assert error["details"] == '     "name": }\n             ^'


def test_errors_answer_in_the_configuration_version() -> None:
    status, error, _ = invoke(ENV, json.dumps(config(cniVersion="0.4.0", policy={"outbound_port": 0})).encode())
    assert (status, error["cniVersion"], error["code"]) == (1, "0.4.0", 7)


@pytest.mark.parametrize(("stdin", "version"), [(b'{"cniVersion": "0.4.0"}', "0.4.0"), (b"", "1.0.0"), (b"[", "1.0.0")])
def test_version_lists_the_supported_versions(stdin: bytes, version: str) -> None:
    assert EXECUTABLE is not None
    done = subprocess.run([EXECUTABLE], input=stdin, env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True)
    assert json.loads(done.stdout) == {"cniVersion": version, "supportedVersions": ["0.4.0", "1.0.0"]}


def test_del_without_a_namespace_succeeds_and_prints_nothing() -> None:
    for netns in ("", "/var/run/netns/mr-none"):
        env = {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": netns}
        done = subprocess.run(
            [EXECUTABLE or "meshredirect-cni"],
            input=json.dumps(config()).encode(),
            env={k: v for k, v in env.items() if v},
            capture_output=True,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, b"")


def run(env: dict[str, str], conf: dict[str, Any]) -> tuple[int, str]:
    out = io.StringIO()
    status = run_plugin(env, json.dumps(conf).encode(), out, io.StringIO())
    return status, out.getvalue()


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        ("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1", {}),
        ("K8S_POD_NAMESPACE=monitoring;K8S_POD_NAME=prom-0", {"skip_pods": ["monitoring/prom-*"]}),
        ("K8S_POD_NAMESPACE=infra;K8S_POD_NAME=x", {"exclude_namespaces": ["infra"]}),
    ],
)
def test_skipped_pods_get_the_previous_result_and_no_rules(args: str, extra: dict[str, Any]) -> None:
    # The namespace does not exist: a skipped pod must not even look at it.
    status, out = run({**ENV, "CNI_ARGS": args}, config(**extra))
    assert status == 0
    assert json.loads(out) == PREVIOUS


def test_pods_annotated_inject_false_or_lacking_the_required_annotation_are_skipped(tmp_path: Path) -> None:
    for name, notes in (("off", {"sidecar.istio.io/inject": "false"}), ("plain", {})):
        pod = {"kind": "Pod", "metadata": {"name": name, "namespace": "shop", "annotations": notes}}
        (tmp_path / f"{name}.json").write_text(json.dumps(pod))
    source = {"kind": "directory", "path": str(tmp_path)}
    for name in ("off", "plain"):
        env = {**ENV, "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"}
        status, out = run(env, config(pod_source=source, require_annotation="sidecar.istio.io/status"))
        assert (status, json.loads(out)) == (0, PREVIOUS)


def test_pod_source_errors_are_plugin_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"kind": "Pod",\n  "metadata": {"name": }}')
    env = {**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"}
    status, out = run(env, config(pod_source={"kind": "directory", "path": str(tmp_path)}))
    error = json.loads(out)
    assert (status, error["code"]) == (1, 101)
    assert error["msg"] == f"{tmp_path}/broken.json:2:24: expected a JSON Pod manifest: Expecting value"
    (tmp_path / "broken.json").unlink()
    status, out = run(env, config(pod_source={"kind": "directory", "path": str(tmp_path)}))
    assert json.loads(out)["code"] == 102
    assert json.loads(out)["msg"] == f"pod shop/web: not found in {tmp_path}"


def test_a_bad_annotation_names_the_annotation(tmp_path: Path) -> None:
    pod = {
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "99999"},
        },
    }
    (tmp_path / "web.json").write_text(json.dumps(pod))
    env = {**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"}
    _, out = run(env, config(pod_source={"kind": "directory", "path": str(tmp_path)}))
    assert json.loads(out)["code"] == 104
    # The Istio front end's message: the annotation, what it expects and what it got (no internal field name).
    assert json.loads(out)["msg"] == (
        "annotation traffic.sidecar.istio.io/excludeOutboundPorts: expected a port number 1-65535, got '99999'"
    )


def pod_file(directory: Path, name: str, annotations: dict[str, str], ports: list[int] = ()) -> None:  # type: ignore[assignment]
    containers = [
        {"name": "app", "ports": [{"containerPort": p} for p in ports]},
        {"name": "istio-proxy", "ports": [{"containerPort": 15090}]},
    ]
    pod = {"kind": "Pod", "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
           "spec": {"containers": containers}}  # fmt: skip
    (directory / f"{name}.json").write_text(json.dumps(pod))


def decided(directory: Path, name: str, **fields: Any) -> Any:
    env = parse_environment({**ENV, "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"})
    return decide(parse_plugin_config(config(pod_source={"kind": "directory", "path": str(directory)}, **fields)), env)


@pytest.mark.parametrize(
    ("default", "inbound"),
    [(None, "*"), ("*", "*"), ("container-ports", "8080,9090")],
    ids=["unset", "*", "container-ports"],
)
def test_inbound_ports_default_decides_for_pods_without_include_inbound_ports(
    tmp_path: Path, default: str | None, inbound: str
) -> None:
    pod_file(tmp_path, "web", {}, ports=[8080, 9090])
    pod_file(tmp_path, "pinned", {"traffic.sidecar.istio.io/includeInboundPorts": "7000"}, ports=[8080])
    fields = {} if default is None else {"inbound_ports_default": default}
    decision = decided(tmp_path, "web", **fields)
    assert str(decision.policy.inbound_ports) == inbound
    # The proxy container's ports are not the app's; the annotation wins over either default.
    assert str(decided(tmp_path, "pinned", **fields).policy.inbound_ports) == "7000"


def test_container_ports_default_with_no_declared_port_captures_no_inbound_and_warns(tmp_path: Path) -> None:
    pod_file(tmp_path, "bare", {})
    decision = decided(tmp_path, "bare", inbound_ports_default="container-ports")
    assert str(decision.policy.inbound_ports) == ""
    assert decision.warnings == (
        "the pod declares no container ports and has no includeInboundPorts annotation: no inbound capture "
        "(annotate includeInboundPorts: '*' to capture every port)",
    )
    _, out = run({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=bare"},
                      config(pod_source={"kind": "directory", "path": str(tmp_path)},
                             inbound_ports_default="container-ports"))  # fmt: skip
    assert json.loads(out)["code"] == 3  # the namespace does not exist: the warning did not stop ADD


def test_the_front_ends_full_mapping_applies_on_top_of_the_configured_policy(tmp_path: Path) -> None:
    pod_file(
        tmp_path,
        "web",
        {
            "traffic.sidecar.istio.io/excludeInboundPorts": "22",
            "status.sidecar.istio.io/port": "15099",
            "sidecar.istio.io/interceptionMode": "TPROXY",
        },
    )
    policy = decided(tmp_path, "web", policy={"outbound_port": 15101, "families": "both"}).policy
    assert (policy.outbound_port, len(policy.families), policy.inbound_mode.value) == (15101, 2, "TPROXY")
    assert str(policy.inbound_ports_exclude) == "22,15020-15021,15090,15099"


def test_interception_mode_none_means_no_rules(tmp_path: Path) -> None:
    pod_file(tmp_path, "plain", {"sidecar.istio.io/interceptionMode": "NONE"})
    decision = decided(tmp_path, "plain")
    assert (decision.policy, decision.reason) == (
        None,
        "pod shop/plain is annotated sidecar.istio.io/interceptionMode: NONE",
    )
    status, out = run({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=plain"},
                      config(pod_source={"kind": "directory", "path": str(tmp_path)}))  # fmt: skip
    assert (status, json.loads(out)) == (0, PREVIOUS)


def test_a_bad_container_port_is_a_pod_source_error(tmp_path: Path) -> None:
    pod = {"kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"containers": [{"name": "app", "ports": [{"containerPort": "http"}]}]}}  # fmt: skip
    (tmp_path / "web.json").write_text(json.dumps(pod))
    status, out = run({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"},
                      config(pod_source={"kind": "directory", "path": str(tmp_path)}))  # fmt: skip
    assert (status, json.loads(out)["code"]) == (1, 101)
    assert json.loads(out)["msg"] == (
        f"{tmp_path}/web.json: spec.containers: container app ports: expected containerPort numbers, got 'http'"
    )


def test_unexpected_exceptions_are_reported_as_cni_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshredirect.cni import plugin

    def explode(*_: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(plugin, "decide", explode)
    err = io.StringIO()
    out = io.StringIO()
    status = run_plugin(ENV, json.dumps(config()).encode(), out, err)
    assert status == 1
    assert json.loads(out.getvalue()) == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "internal error: RuntimeError: boom",
    }
    assert "Traceback" not in err.getvalue()


# ----------------------------------------------------------------------------- pure parts, by property

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.sampled_from(["0.4.0", "1.0.0"]))
def test_add_passes_any_previous_result_through_unchanged(previous: dict[str, Any], version: str) -> None:
    out = json.loads(passthrough_result({"prevResult": previous}, version))
    assert out.pop("cniVersion") == version
    assert out == {k: v for k, v in previous.items() if k != "cniVersion"}


keys = st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True)
values = st.text(st.characters(blacklist_characters=";", blacklist_categories=["Cs"]), max_size=12).map(str.strip)


@given(st.lists(st.tuples(keys, values), max_size=5))
def test_cni_args_read_back_what_was_written(pairs: list[tuple[str, str]]) -> None:
    text = ";".join(f"{k}={v}" for k, v in pairs)
    assert parse_cni_args(text).values == tuple(pairs)


def test_cni_args_give_the_pod() -> None:
    args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc")
    assert (args.pod_namespace, args.pod_name) == ("shop", "web")


# ----------------------------------------------------------------------------- CHECK's semantic comparison


def with_foreign_rules(ruleset: Ruleset) -> Ruleset:
    """Other tools' rules everywhere ours are: a chain of theirs, a jump to it and a DROP before ours, a DROP policy."""
    tables = []
    for table in ruleset.tables:
        chains = []
        for chain in table.chains:
            if chain.base is not None:
                theirs = (Rule(target=Jump(chain="KUBE-SERVICES")), Rule(target=Drop()))
                base = attrs.evolve(chain.base, policy=ChainPolicy.DROP)
                chain = attrs.evolve(chain, rules=theirs + chain.rules, base=base)
            chains.append(chain)
        chains.append(Chain(name="KUBE-SERVICES", rules=(Rule(target=Accept()),)))
        tables.append(attrs.evolve(table, chains=tuple(chains)))
    return attrs.evolve(ruleset, tables=tuple(tables))


def without_rule(ruleset: Ruleset, table_index: int, chain_name: str, rule_index: int) -> Ruleset:
    table = ruleset.tables[table_index]
    chains = tuple(
        attrs.evolve(c, rules=c.rules[:rule_index] + c.rules[rule_index + 1 :]) if c.name == chain_name else c
        for c in table.chains
    )
    tables = list(ruleset.tables)
    tables[table_index] = attrs.evolve(table, chains=chains)
    return attrs.evolve(ruleset, tables=tuple(tables))


def installed_as(ruleset: Ruleset) -> Installed:
    return Installed(ruleset=ruleset, where="the iptables-nft tables")


@settings(max_examples=25, deadline=None)
@given(policies())
def test_check_accepts_the_policys_rules_in_either_backends_form_beside_other_tools_rules(policy: Policy) -> None:
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy)
    assert owned_part(ruleset, policy.chain_prefix) == ruleset  # the compiler puts nothing but jumps in built-ins
    assert differences(ruleset, installed_as(owned_part(with_foreign_rules(ruleset), policy.chain_prefix)), env) == []
    nft = Installed(ruleset=NftLowering().layout(ruleset), where="nftables table istio")
    assert differences(ruleset, nft, env) == []


def with_foreign_lines(save_text: str, family: Family) -> str:
    """``iptables-save`` text with another tool's chain, and a jump to it before ours in every built-in chain."""
    out: list[str] = []
    builtins: list[str] = []
    for line in save_text.splitlines():
        if line.startswith("*"):
            out += [line, ":KUBE-SERVICES - [0:0]"]
            builtins = []
            continue
        if line.startswith(":") and not line.startswith(":KUBE"):
            name, policy = line[1:].split()[:2]
            if policy != "-":
                builtins.append(name)
                line = f":{name} {policy} [12:720]"
        if line == "COMMIT" or (line.startswith("-A ") and builtins):
            out += [f"-A {name} -m comment --comment kube -j KUBE-SERVICES" for name in builtins]
            out += ["-A KUBE-SERVICES -p tcp -m tcp --dport 443 -j ACCEPT"]
            builtins = []
        out.append(line)
    tool = "ip6tables-save" if family is Family.IPV6 else "iptables-save"
    return f"# Generated by {tool} v1.8.9\n" + "\n".join(out) + "\n"


@settings(max_examples=25, deadline=None)
@given(policies())
def test_check_accepts_the_policys_iptables_rules_read_back_beside_other_tools_rules(policy: Policy) -> None:
    """What the iptables tools print for our rules, next to another tool's, read by the iptables reader."""
    ruleset = compile_policy(policy)
    tables: list[Table] = []
    for family in ruleset.families:
        text = with_foreign_lines(render(ruleset, "iptables-save").artifact(family).content, family)
        assert "KUBE-SERVICES" in text
        tables += owned_part(read_iptables(text, family=family), policy.chain_prefix).tables
    found = installed_as(Ruleset(tables=tuple(tables), owner_prefix=policy.chain_prefix))
    assert differences(ruleset, found, Environment.for_policy(policy)) == []


@settings(max_examples=25, deadline=None)
@given(policies(), st.data())
def test_check_fails_on_a_removed_rule_exactly_when_that_changes_what_a_connection_gets(
    policy: Policy, data: st.DataObject
) -> None:
    """Other tools' rules never hide a difference of ours, and never make one: the restriction is exact."""
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy)
    places = [
        (t, chain.name, r)
        for t, table in enumerate(ruleset.tables)
        for chain in table.chains
        for r in range(len(chain.rules))
    ]
    broken = without_rule(ruleset, *data.draw(st.sampled_from(places)))
    problems = differences(ruleset, installed_as(owned_part(with_foreign_rules(broken), policy.chain_prefix)), env)
    assert bool(problems) == bool(equivalent(ruleset, broken, env))


#: One listed class: the example connection, both verdicts, then the class in words.
DIFFERENCE = re.compile(
    r"- (?P<example>tcp \S+ -> \S+ [^:]+): policy: (?P<policy>[^;]+); installed: (?P<installed>.+)\n  class: .+"
)


def test_check_names_the_connections_a_missing_redirect_lets_through() -> None:
    policy = Policy()
    ruleset = compile_policy(policy)
    broken = without_rule(ruleset, 0, "ISTIO_REDIRECT", 0)
    problems = differences(ruleset, installed_as(broken), Environment.for_policy(policy))
    # How the engine splits the classes (their number and examples) is its business; the meaning is pinned.
    assert re.fullmatch(
        r"\d+ class(es)? of connections treated differently by the rules in the iptables-nft tables "
        r"\(a proof over \d+ classes\):",
        problems[0],
    )
    listed = [DIFFERENCE.fullmatch(line) for line in problems[1:]]
    assert listed and all(listed)
    for found in listed:
        assert found is not None
        assert " local " in found["example"] and "uid=1337" not in found["example"]  # the app's outbound
        assert found["policy"] == "redirected to 127.0.0.1:15001"
        assert re.fullmatch(r"passed to \S+ \(sent out\)", found["installed"])


def test_check_shows_the_loop_when_the_proxy_exemption_is_gone() -> None:
    policy = Policy()
    ruleset = compile_policy(policy)
    rules = ruleset.tables[0].chain("ISTIO_OUTPUT").rules
    exemptions = [
        i for i, r in enumerate(rules) if r.target == Return() and any(isinstance(m, OwnerMatch) for m in r.matches)
    ]
    broken = ruleset
    for index in reversed(exemptions):
        broken = without_rule(broken, 0, "ISTIO_OUTPUT", index)
    problems = differences(ruleset, installed_as(broken), Environment.for_policy(policy))
    listed = [DIFFERENCE.fullmatch(line) for line in problems[1:]]
    # The proxy's own upstream connections (its uid or its gid) would be captured again: a loop.
    assert listed and all(
        found is not None
        and ("uid=1337" in found["example"] or "gid=1337" in found["example"])
        and found["policy"].startswith("passed to ")
        and found["installed"] == "redirected to 127.0.0.1:15001"
        for found in listed
    )


def test_check_lists_at_most_a_few_classes_and_counts_the_rest() -> None:
    policy = Policy(families="both")
    ruleset = compile_policy(policy)
    nothing = Ruleset(
        tables=tuple(
            Table(family=t.family, name="nat", chains=(Chain(name="ISTIO_UNUSED", rules=(Rule(target=Redirect()),)),))
            for t in ruleset.tables
        ),
        owner_prefix="ISTIO",
    )
    problems = differences(ruleset, installed_as(nothing), Environment.for_policy(policy))
    count = int(problems[0].split(" ")[0])
    assert count > MAX_SHOWN and len(problems) == 1 + MAX_SHOWN + 1
    assert problems[-1] == f"... and {count - MAX_SHOWN} more"


def test_check_reports_missing_rules_and_policy_routing() -> None:
    policy = Policy(inbound_mode="TPROXY")
    found = Installed(
        ruleset=Ruleset(),
        where="nftables table istio",
        routing=("ip -4 rule add fwmark 0x539 lookup 133 protocol 157",),
    )
    assert differences(compile_policy(policy), found, Environment.for_policy(policy)) == [
        "none of our rules are in nftables table istio",
        "policy routing differs: it needs ip -4 rule add fwmark 0x539 lookup 133 protocol 157",
    ]


def test_the_foreign_rules_of_the_tests_are_seen_by_the_engine() -> None:
    """The noise is real: without the restriction to our part, it changes what connections get."""
    policy = Policy()
    ruleset = compile_policy(policy)
    assert equivalent(ruleset, with_foreign_rules(ruleset), Environment.for_policy(policy))
    text = with_foreign_lines(render(ruleset, "iptables-save").artifact(Family.IPV4).content, Family.IPV4)
    assert equivalent(ruleset, read_iptables(text), Environment.for_policy(policy))
    assert OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337)) in [
        m for r in ruleset.tables[0].chain("ISTIO_OUTPUT").rules for m in r.matches
    ]


def test_plugin_config_examples_parse() -> None:
    parsed = parse_plugin_config(config(policy={"families": "dual", "dns": {"enabled": True, "capture_all": True}}))
    policy = parsed.base_policy()
    assert policy.dns.enabled and len(policy.families) == 2
    with pytest.raises(CniError, match=r"policy: dns\.capture_all: expected true or false"):
        parse_plugin_config(config(policy={"dns": {"enabled": True, "capture_all": "maybe"}})).base_policy()
