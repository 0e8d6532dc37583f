"""meshredirect-cni as the runtime sees it: every bad input gives pinned CNI error JSON, never a traceback.

The installed executable is run as a runtime runs it (environment, standard
input); skipped pods are handled in-process (they touch no kernel).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshredirect.api import render
from meshredirect.cni.config import parse_plugin_config
from meshredirect.cni.plugin import run_plugin
from meshredirect.cni.protocol import CniError, parse_cni_args, passthrough_result
from meshredirect.cni.rules import differences, owned_lines
from meshredirect.compiler import compile_policy
from meshredirect.ir import Family
from meshredirect.policy import Policy
from strategies import policies

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
    assert json.loads(out)["msg"] == (
        "annotation traffic.sidecar.istio.io/excludeOutboundPorts: outbound_ports_exclude: "
        "expected a port number 1-65535, got '99999'"
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


@settings(max_examples=60)
@given(policies(), st.data())
def test_check_comparison_accepts_the_rendering_and_catches_any_removed_or_changed_line(
    policy: Policy, data: st.DataObject
) -> None:
    """The CHECK comparison is right on the rules it expects, and fails on every single-line mutation."""
    ruleset = compile_policy(policy)
    saved = {f: render(ruleset, "iptables-save").artifact(f).content for f in ruleset.families}
    assert differences(ruleset, saved) == []
    family = data.draw(st.sampled_from(ruleset.families))
    owned = [line for lines in owned_lines(saved[family], policy.chain_prefix).values() for line in lines]
    victim = data.draw(st.sampled_from(owned))
    lines = saved[family].splitlines()
    index = (
        lines.index(victim)
        if victim in lines
        else next(i for i, line in enumerate(lines) if line.startswith(victim + " "))
    )
    removed = {**saved, family: "\n".join(lines[:index] + lines[index + 1 :]) + "\n"}
    assert differences(ruleset, removed) != []
    if victim.startswith("-A "):
        changed = {**saved, family: saved[family].replace(victim, victim + " -m comment --comment x", 1)}
        assert differences(ruleset, changed) != []


def test_check_comparison_ignores_counters_and_other_tools_rules() -> None:
    ruleset = compile_policy(Policy())
    text = render(ruleset, "iptables-save").artifact(Family.IPV4).content
    noisy = text.replace(":OUTPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [12:720]\n:KUBE-X - [0:0]")
    noisy = noisy.replace("COMMIT", "-A KUBE-X -j RETURN\nCOMMIT")
    assert differences(ruleset, {Family.IPV4: "# Generated by iptables-save\n" + noisy}) == []


def test_plugin_config_examples_parse() -> None:
    parsed = parse_plugin_config(config(policy={"families": "dual", "dns": {"enabled": True, "capture_all": True}}))
    policy = parsed.base_policy()
    assert policy.dns.enabled and len(policy.families) == 2
    with pytest.raises(CniError, match=r"policy: dns\.capture_all: expected true or false"):
        parse_plugin_config(config(policy={"dns": {"enabled": True, "capture_all": "maybe"}})).base_policy()
