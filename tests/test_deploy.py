"""The deployment files: Kubernetes manifests checked against the real Kubernetes schemas, offline.

``kubernetes-validate`` ships the OpenAPI-derived JSON schemas of each
Kubernetes release inside its package, so this runs without a network.
Strict mode refuses unknown fields (a misspelled key is an error, not
silently ignored by the API server).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshredirect.cli import COMMANDS
from meshredirect.cni.config import parse_plugin_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
#: The oldest Kubernetes release the manifests promise to work with, and the newest the validator knows.
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
#: meshredirect subcommands the manifests use that arrive with the apply layer (issue 6).
PENDING_COMMANDS: set[str] = set()


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                out.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return out


DOCUMENTS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] == kind]


def validate(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_every_manifest_file_holds_documents() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"daemonset.yaml", "rbac.yaml", "configmap.yaml", "namespace.yaml", "pod-init-container.yaml"} <= names
    kinds = sorted(doc["kind"] for _, doc in DOCUMENTS)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Namespace",
        "Pod",
        "Pod",
        "ServiceAccount",
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "document"), DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_manifests_pass_the_kubernetes_schema(name: str, document: dict[str, Any], version: str) -> None:
    validate(document, version)


def _daemonset() -> dict[str, Any]:
    return copy.deepcopy(by_kind("DaemonSet")[0])


BROKEN = {
    "misspelled field": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
    "wrong type": lambda d: d["spec"]["template"]["spec"].update(hostPID="yes"),
    "missing container name": lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    "missing selector": lambda d: d["spec"].pop("selector"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_the_validator_refuses_broken_manifests(breakage: str) -> None:
    document = _daemonset()
    BROKEN[breakage](document)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(document, VERSIONS[0])


def installer_args() -> list[str]:
    container = _daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["meshredirect-cni"]
    return list(container["args"])


def test_the_daemonset_runs_the_installer_with_options_it_accepts() -> None:
    from meshredirect.cni.main import _parser

    args = _parser().parse_args(installer_args())
    assert (args.command, args.watch, args.via_agent, args.kubernetes, args.uninstall_on_exit) == (
        "install",
        True,
        True,
        True,
        True,
    )
    spec = _daemonset()["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[args.conf_dir]]["hostPath"]["path"] == args.host_conf_dir
    assert volumes[mounts[args.bin_dir]]["hostPath"]["path"] == "/opt/cni/bin"
    assert volumes[mounts[str(Path(args.plugin_config).parent)]]["configMap"]["name"] == "meshredirect-cni-config"
    assert spec["hostPID"] is True  # the launcher finds the agent by its host PID
    assert spec["serviceAccountName"] == by_kind("ServiceAccount")[0]["metadata"]["name"]


def test_the_configmap_holds_a_valid_plugin_entry() -> None:
    entry = json.loads(by_kind("ConfigMap")[0]["data"]["plugin.json"])
    # What the installer adds with --kubernetes.
    entry["pod_source"] = {"kind": "kubernetes", "api_server": "https://10.96.0.1:443"}
    config = parse_plugin_config(entry)
    assert config.base_policy().outbound_port == 15001
    assert by_kind("Namespace")[0]["metadata"]["name"] in config.exclude_namespaces


def test_the_role_grants_get_on_pods_only() -> None:
    (role,) = by_kind("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]


def meshredirect_commands() -> set[str]:
    used = set()
    for _, document in DOCUMENTS:
        if document["kind"] != "Pod":
            continue
        for container in document["spec"].get("initContainers", []) + document["spec"]["containers"]:
            command = container.get("command", [])
            if command[:1] == ["meshredirect"]:
                used.add(command[1])
    return used


def test_init_containers_use_existing_meshredirect_commands() -> None:
    used = meshredirect_commands()
    assert used == {"apply", "validate"}
    missing = used - set(COMMANDS)
    assert missing <= PENDING_COMMANDS, f"manifests use unknown meshredirect commands: {missing}"
    stale = PENDING_COMMANDS & set(COMMANDS)
    assert not stale, f"{stale} arrived: remove it from PENDING_COMMANDS so the manifests are checked against it"


def test_the_containerfile_builds_the_entry_points_from_the_project() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert "/" not in base.split(":")[0], "name the base image without a registry host"
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)[0])
    assert entrypoint[0] in scripts
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        for source in shlex.split(line)[:-1]:
            assert (ROOT / source).exists(), f"Containerfile copies {source}, which does not exist"


def test_the_image_carries_what_both_rule_backends_need() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    installed = set(re.findall(r"[a-z0-9.+-]+", text.split("apt-get install", 1)[1].split("&&", 1)[0]))
    assert {"iptables", "nftables", "python3-nftables", "iproute2", "util-linux"} <= installed
    assert "import nftables; nftables.Nftables()" in text, "the build proves the bindings load"
