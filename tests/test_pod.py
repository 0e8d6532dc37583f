"""Istio pod annotations and container ports to a policy: every annotation, manifests in JSON and YAML, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshredirect.errors import PolicyError, SourceError, UnsafePolicyError
from meshredirect.frontends.pod import (
    ANNOTATIONS,
    load_manifest,
    pod_container_ports,
    policy_from_annotations,
    policy_from_pod,
    read_pod,
)
from meshredirect.policy import InterceptionMode, Policy
from meshredirect.values import ALL, AddressSet, IdSet, PortSet

T = "traffic.sidecar.istio.io/"

#: annotation -> (value, check of the policy)
EACH: dict[str, tuple[str, Any]] = {
    "sidecar.istio.io/interceptionMode": ("TPROXY", lambda p: p.inbound_mode is InterceptionMode.TPROXY),
    T + "includeOutboundIPRanges": ("10.0.0.0/8,", lambda p: p.outbound_cidrs == AddressSet.of("10.0.0.0/8")),
    T + "excludeOutboundIPRanges": (
        "10.96.0.0/12",
        lambda p: p.outbound_cidrs_exclude == AddressSet.of("10.96.0.0/12"),
    ),
    T + "includeInboundPorts": ("*", lambda p: p.inbound_ports is ALL),
    T + "excludeInboundPorts": ("22", lambda p: p.inbound_ports_exclude == PortSet.of(22, 15020, 15021, 15090)),
    T + "includeOutboundPorts": ("3306", lambda p: p.outbound_ports == PortSet.of(3306)),
    T + "excludeOutboundPorts": ("5432,6379", lambda p: p.outbound_ports_exclude == PortSet.of(5432, 6379)),
    T + "excludeInterfaces": ("eth1", lambda p: p.exclude_interfaces == ("eth1",)),
    T + "kubevirtInterfaces": ("net1,net2", lambda p: p.reroute_interfaces == ("net1", "net2")),
    "istio.io/reroute-virtual-interfaces": ("net3", lambda p: p.reroute_interfaces == ("net3",)),
}


def test_every_annotation_is_listed() -> None:
    assert set(EACH) == set(ANNOTATIONS)


@pytest.mark.parametrize("name", sorted(EACH))
def test_every_annotation_reaches_its_field(name: str) -> None:
    value, check = EACH[name]
    extra = {T + "includeInboundPorts": "*"} if name == T + "excludeInboundPorts" else {}
    policy, _warnings = policy_from_annotations({name: value, **extra}, container_ports=[8080])
    assert check(policy)
    default, _ = policy_from_annotations(extra, container_ports=[8080])
    assert not check(default)


def test_injector_defaults() -> None:
    policy, warnings = policy_from_annotations({}, container_ports=[8080, 9090, 8080])
    assert warnings == []
    assert (policy.outbound_port, policy.inbound_port, policy.inbound_tunnel_port) == (15001, 15006, 15008)
    assert policy.proxy_uids == IdSet.of(1337) and policy.proxy_gids == IdSet.of(1337)
    assert policy.inbound_ports == PortSet.of(8080, 9090)
    assert policy.outbound_cidrs is ALL and policy.outbound_cidrs_exclude == AddressSet(())


def test_star_default_is_todays_injector() -> None:
    policy, _ = policy_from_annotations({}, container_ports=[8080], inbound_default="*")
    assert policy == Policy()


def test_status_port_annotation_is_excluded() -> None:
    policy, _ = policy_from_annotations({T + "includeInboundPorts": "*", "status.sidecar.istio.io/port": "15999"})
    assert policy.inbound_ports_exclude == PortSet.of(15021, 15090, 15999)
    off, _ = policy_from_annotations({T + "includeInboundPorts": "*", "status.sidecar.istio.io/port": "0"})
    assert off.inbound_ports_exclude == PortSet.of(15021, 15090)


def test_reroute_wins_over_kubevirt_with_a_warning() -> None:
    policy, warnings = policy_from_annotations(
        {"istio.io/reroute-virtual-interfaces": "net3", T + "kubevirtInterfaces": "net1"}, container_ports=[80]
    )
    assert policy.reroute_interfaces == ("net3",)
    assert warnings == [
        "traffic.sidecar.istio.io/kubevirtInterfaces is ignored: istio.io/reroute-virtual-interfaces is set too and "
        "wins (as in Istio's injector)"
    ]


def test_warnings_for_no_ports_and_no_injection() -> None:
    _policy, warnings = policy_from_annotations({"sidecar.istio.io/inject": "false"})
    assert warnings == [
        "the pod says sidecar.istio.io/inject: false; Istio would inject no sidecar and program no rules",
        "the pod declares no container ports and has no includeInboundPorts annotation: no inbound capture "
        "(annotate includeInboundPorts: '*' to capture every port)",
    ]


ERRORS = [
    (
        {"sidecar.istio.io/interceptionMode": "NONE"},
        "annotation sidecar.istio.io/interceptionMode: expected REDIRECT or TPROXY (with NONE Istio programs no "
        "rules for the pod: nothing to compile), got 'NONE'",
    ),
    (
        {"sidecar.istio.io/interceptionMode": "redirect"},
        "annotation sidecar.istio.io/interceptionMode: expected REDIRECT or TPROXY, got 'redirect'",
    ),
    (
        {T + "includeInboundPorts": "80,http"},
        "annotation traffic.sidecar.istio.io/includeInboundPorts: expected a port number 1-65535, got 'http'",
    ),
    (
        {T + "excludeOutboundIPRanges": "10.0.0.0/33"},
        "annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: expected an IPv4 or IPv6 address or CIDR, "
        "got '10.0.0.0/33'",
    ),
    (
        {T + "includeOutboundIPRanges": "127.0.0.0/8"},
        "annotation traffic.sidecar.istio.io/includeOutboundIPRanges: refused: a loopback range included for "
        "outbound capture sends the proxy's local connections back to itself: a known loop (given: '127.0.0.0/8')",
    ),
    (
        {T + "kubevirtInterfaces": "eth 0"},
        "annotation traffic.sidecar.istio.io/kubevirtInterfaces: expected an interface name of 1-15 characters "
        "(letters, digits, '_.@:-', optional trailing '+'), got 'eth 0'",
    ),
    (
        {T + "excludeInterfaces": "eth1", "istio.io/reroute-virtual-interfaces": "eth1"},
        "annotation istio.io/reroute-virtual-interfaces: refused: an interface cannot be both excluded and "
        "rerouted (given: 'eth1')",
    ),
]


@pytest.mark.parametrize(("annotations", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_annotations_name_the_annotation(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_annotations(annotations, container_ports=[8080])
    assert str(info.value) == message
    if "refused" in message:
        assert isinstance(info.value, UnsafePolicyError)


def test_container_port_errors_name_the_default() -> None:
    with pytest.raises(UnsafePolicyError) as info:
        policy_from_annotations({}, container_ports=[15008])
    assert str(info.value) == (
        "the pod's container ports (the default of includeInboundPorts): refused: the tunnel port is never "
        "captured inbound, it cannot be listed for capture (given: 15008)"
    )


# ----------------------------------------------------------------------------- manifests

POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations:
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.0/12"
    traffic.sidecar.istio.io/excludeOutboundPorts: "5432"
spec:
  containers:
  - name: app
    image: web
    ports:
    - containerPort: 8080
    - containerPort: 8443
      protocol: TCP
  - name: istio-proxy
    image: proxy
    ports:
    - containerPort: 15090
      name: http-envoy-prom
"""


def test_pod_yaml_and_json_give_the_same_policy() -> None:
    from_yaml, _ = read_pod(POD_YAML, path="pod.yaml")
    import yaml

    from_json, _ = read_pod(json.dumps(yaml.safe_load(POD_YAML)), path="pod.json")
    assert from_yaml == from_json
    assert from_yaml.inbound_ports == PortSet.of(8080, 8443)
    assert from_yaml.outbound_cidrs_exclude == AddressSet.of("10.96.0.0/12")
    assert from_yaml.outbound_ports_exclude == PortSet.of(5432)


def test_workload_templates_and_annotation_maps() -> None:
    import yaml

    pod = yaml.safe_load(POD_YAML)
    deployment = {"kind": "Deployment", "spec": {"template": {"metadata": pod["metadata"], "spec": pod["spec"]}}}
    cronjob = {"kind": "CronJob", "spec": {"jobTemplate": {"spec": deployment["spec"]}}}
    expected, _ = policy_from_pod(pod)
    assert policy_from_pod(deployment)[0] == expected
    assert policy_from_pod(cronjob)[0] == expected
    annotations_only, _ = read_pod('traffic.sidecar.istio.io/includeInboundPorts: "*"\n')
    assert annotations_only == Policy()
    assert pod_container_ports(pod) == [8080, 8443]


def test_yaml_numbers_are_taken_as_text() -> None:
    policy, _ = read_pod("traffic.sidecar.istio.io/includeInboundPorts: 8080\n")
    assert policy.inbound_ports == PortSet.of(8080)


MANIFEST_ERRORS = [
    (
        "metadata:\n  annotations: [unclosed\n",
        "pod.yaml:3:1: invalid YAML: expected ',' or ']', but got '<stream end>'\n    \n    ^",
    ),
    (
        '{"kind": "Pod",}',
        "pod.yaml:1:16: invalid JSON: Expecting property name enclosed in double quotes\n"
        '    {"kind": "Pod",}\n                   ^',
    ),
    ("- a\n- b\n", "pod.yaml:1:1: expected a map (a pod or an annotation map), got list\n    - a\n    ^"),
    ("a: 1\n---\nb: 2\n", "pod.yaml:1:1: expected one document (a pod or an annotation map), got 2\n    a: 1\n    ^"),
]


@pytest.mark.parametrize(("text", "message"), MANIFEST_ERRORS, ids=[str(i) for i in range(len(MANIFEST_ERRORS))])
def test_manifest_syntax_errors_are_located(text: str, message: str) -> None:
    with pytest.raises(SourceError) as info:
        load_manifest(text, path="pod.yaml")
    assert str(info.value) == message


def test_annotation_errors_point_at_their_line() -> None:
    text = POD_YAML.replace('"5432"', '"5432,postgres"')
    with pytest.raises(SourceError) as info:
        read_pod(text, path="pod.yaml")
    assert str(info.value) == (
        "pod.yaml:7:5: annotation traffic.sidecar.istio.io/excludeOutboundPorts: expected a port number 1-65535, "
        "got 'postgres'\n        traffic.sidecar.istio.io/excludeOutboundPorts: \"5432,postgres\"\n        ^"
    )


def test_not_a_pod() -> None:
    with pytest.raises(PolicyError) as info:
        read_pod("kind: Service\nspec:\n  ports: []\n", path="svc.yaml")
    assert str(info.value) == (
        "svc.yaml: pod manifest: expected a Pod, a workload with a pod template, or a map of annotations, got 'Service'"
    )
    with pytest.raises(PolicyError, match="containerPort numbers"):
        read_pod("spec:\n  containers:\n  - name: a\n    ports:\n    - containerPort: http\n")
