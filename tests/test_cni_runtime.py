"""The test runtime follows the specification: what each plugin gets, in which order, and errors.

Plugins here are small executables that record what they were given (environment and standard
input) and answer as a plugin would; the real reference plugins run in tests/kernel/test_cni.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from meshredirect.cni.annotations import policy_for_pod
from meshredirect.policy import Policy
from meshredirect.testing.cni import Attachment, CniPluginError, CniRuntime, CniRuntimeError

RECORDER = """#!/bin/sh
log={log}
config=$(cat)
printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' "$(basename "$0")" "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" \\
  "$CNI_IFNAME" "$CNI_ARGS" "$config" >> "$log"
if [ "$CNI_COMMAND" = ADD ]; then
  printf '{{"cniVersion": "1.0.0", "ips": [{{"address": "10.1.0.%s/24"}}]}}\\n' "$(wc -l < "$log")"
fi
"""
FAILING = """#!/bin/sh
cat > /dev/null
echo '{"cniVersion": "1.0.0", "code": 11, "msg": "busy", "details": "try later"}'
exit 1
"""


def plugin_dir(tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    directory = tmp_path / "bin"
    directory.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    for name in names:
        path = directory / name
        path.write_text(FAILING if name == "failing" else RECORDER.format(log=log))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory, log


def calls(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        name, command, container, netns, ifname, args, config = line.split("\t")
        out.append(
            {"plugin": name, "command": command, "id": container, "netns": netns, "ifname": ifname, "args": args,
             "config": json.loads(config)}
        )  # fmt: skip
    return out


NETWORK = {
    "cniVersion": "1.0.0",
    "name": "net1",
    "plugins": [
        {"type": "first", "cniVersion": "0.3.1", "name": "other", "keyA": [1, 2]},
        {"type": "second", "capabilities": {"portMappings": True, "bandwidth": False}},
    ],
}
ATTACHMENT = Attachment(
    container_id="c1",
    netns="/var/run/netns/pod",
    args=(("K8S_POD_NAMESPACE", "shop"), ("K8S_POD_NAME", "web")),
    capability_args=(("portMappings", [{"hostPort": 80, "containerPort": 8080}]), ("bandwidth", {"rate": 1})),
)


def test_add_check_del_follow_the_specification(tmp_path: Path) -> None:
    directory, log = plugin_dir(tmp_path, ["first", "second"])
    runtime = CniRuntime([tmp_path / "empty", directory])
    result = runtime.add(NETWORK, ATTACHMENT)
    runtime.check(NETWORK, ATTACHMENT)
    runtime.delete(NETWORK, ATTACHMENT)
    seen = calls(log)
    assert [(c["plugin"], c["command"]) for c in seen] == [
        ("first", "ADD"), ("second", "ADD"), ("first", "CHECK"), ("second", "CHECK"), ("second", "DEL"), ("first", "DEL"),
    ]  # fmt: skip
    for call in seen:
        assert (call["id"], call["netns"], call["ifname"]) == ("c1", "/var/run/netns/pod", "eth0")
        assert call["args"] == "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"
        # name and cniVersion come from the list; capabilities never reach the plugin.
        assert (call["config"]["name"], call["config"]["cniVersion"]) == ("net1", "1.0.0")
        assert "capabilities" not in call["config"]
    first_add, second_add = seen[0]["config"], seen[1]["config"]
    assert "prevResult" not in first_add and first_add["keyA"] == [1, 2]
    assert second_add["prevResult"] == {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.1/24"}]}
    # Only declared (and enabled) capabilities become runtimeConfig.
    assert second_add["runtimeConfig"] == {"portMappings": [{"hostPort": 80, "containerPort": 8080}]}
    assert "runtimeConfig" not in first_add
    assert result == {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]}
    for call in seen[2:]:
        assert call["config"]["prevResult"] == result  # CHECK and DEL get the final ADD result
    with pytest.raises(CniRuntimeError, match="CHECK needs a preceding ADD"):
        runtime.check(NETWORK, ATTACHMENT)


def test_disable_check_and_del_without_a_cached_result(tmp_path: Path) -> None:
    directory, log = plugin_dir(tmp_path, ["first", "second"])
    runtime = CniRuntime([directory])
    runtime.add(NETWORK, ATTACHMENT)
    runtime.check({**NETWORK, "disableCheck": True}, ATTACHMENT)
    runtime.cache.clear()
    runtime.delete(NETWORK, ATTACHMENT)
    seen = calls(log)
    assert [c["command"] for c in seen] == ["ADD", "ADD", "DEL", "DEL"]
    assert all("prevResult" not in c["config"] for c in seen[2:])


def test_the_first_error_stops_the_list(tmp_path: Path) -> None:
    directory, log = plugin_dir(tmp_path, ["first", "failing", "second"])
    network = {**NETWORK, "plugins": [{"type": "first"}, {"type": "failing"}, {"type": "second"}]}
    with pytest.raises(CniPluginError) as failed:
        CniRuntime([directory]).add(network, ATTACHMENT)
    assert (failed.value.plugin, failed.value.code, failed.value.msg, failed.value.details) == (
        "failing",
        11,
        "busy",
        "try later",
    )
    assert [c["plugin"] for c in calls(log)] == ["first"]
    with pytest.raises(CniRuntimeError, match="plugin 'missing': no executable of that name in"):
        CniRuntime([directory]).add({**NETWORK, "plugins": [{"type": "missing"}]}, ATTACHMENT)


ANNOTATED = [
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8, 192.168.0.0/16,", "outbound_cidrs", "10.0.0.0/8,192.168.0.0/16"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*", "outbound_cidrs", "*"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "169.254.169.254/32", "outbound_cidrs_exclude", "169.254.169.254/32"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "80,443", "inbound_ports", "80,443"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "", "inbound_ports", ""),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "22", "inbound_ports_exclude", "22,15020-15021,15090"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "5432", "outbound_ports", "5432"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "9000,9001", "outbound_ports_exclude", "9000-9001"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "eth1", "exclude_interfaces", ("eth1",)),
    ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1", "reroute_interfaces", ("net1",)),
    ("istio.io/reroute-virtual-interfaces", "net2", "reroute_interfaces", ("net2",)),
    ("sidecar.istio.io/interceptionMode", "TPROXY", "inbound_mode", "TPROXY"),
]  # fmt: skip


@pytest.mark.parametrize(("annotation", "value", "field", "expected"), ANNOTATED)
def test_each_annotation_sets_its_policy_field(annotation: str, value: str, field: str, expected: object) -> None:
    got = getattr(policy_for_pod(Policy(), {annotation: value})[0], field)
    shown = got.value if field == "inbound_mode" else (got if isinstance(got, tuple) else str(got))
    assert shown == expected


def test_the_new_reroute_annotation_wins_over_the_deprecated_one() -> None:
    both = {"traffic.sidecar.istio.io/kubevirtInterfaces": "old0", "istio.io/reroute-virtual-interfaces": "new0"}
    policy, warnings = policy_for_pod(Policy(), both)
    assert policy.reroute_interfaces == ("new0",)
    assert warnings == [
        "traffic.sidecar.istio.io/kubevirtInterfaces is ignored: istio.io/reroute-virtual-interfaces is set too "
        "and wins (as in Istio's injector)"
    ]
    assert policy_for_pod(Policy(), {"unrelated": "x"}) == (Policy(), [])
