"""Istio's pod annotations (and a pod's container ports) to a :class:`~meshredirect.policy.Policy`.

What Istio's sidecar injector passes to ``istio-iptables`` for a pod, read from
its manifest (a Pod, a workload with a pod template, in JSON or YAML) or from an
annotation map: the annotations below, with the injector's defaults.

=============================================================  ======  ============================================
annotation                                                     flag    default
=============================================================  ======  ============================================
``sidecar.istio.io/interceptionMode``                          ``-m``  ``REDIRECT`` (``TPROXY``; ``NONE`` = no rules)
``traffic.sidecar.istio.io/includeOutboundIPRanges``           ``-i``  ``*``
``traffic.sidecar.istio.io/excludeOutboundIPRanges``           ``-x``  (none)
``traffic.sidecar.istio.io/includeInboundPorts``               ``-b``  the pod's container ports (or ``*``, see below)
``traffic.sidecar.istio.io/excludeInboundPorts``               ``-d``  (none); the status port (``status.sidecar.
                                                                       istio.io/port``, 15020), 15021 and 15090 are
                                                                       always added
``traffic.sidecar.istio.io/includeOutboundPorts``              ``-q``  (none)
``traffic.sidecar.istio.io/excludeOutboundPorts``              ``-o``  (none)
``traffic.sidecar.istio.io/excludeInterfaces``                 ``-c``  (none)
``istio.io/reroute-virtual-interfaces``                        ``-k``  (none); wins over the next
``traffic.sidecar.istio.io/kubevirtInterfaces``                ``-k``  (none)
=============================================================  ======  ============================================

The proxy runs as uid and gid 1337 on 15001/15006 (the injector's ``-u 1337``).
Without ``includeInboundPorts`` the inbound ports are the pod's declared
container ports (every container but ``istio-proxy``), as Istio's injector long
did; ``inbound_default="*"`` takes today's injector default instead (every
port, which also covers ports a container does not declare).

>>> policy, warnings = policy_from_annotations(
...     {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12"}, container_ports=[8080, 9090])
>>> str(policy.inbound_ports), str(policy.outbound_cidrs), str(policy.outbound_cidrs_exclude)
('8080,9090', '*', '10.96.0.0/12')
>>> policy_from_annotations({"traffic.sidecar.istio.io/includeInboundPorts": "80,http"})
Traceback (most recent call last):
...
meshredirect.errors.PolicyError: annotation traffic.sidecar.istio.io/includeInboundPorts: expected a port number 1-65535, got 'http'

Sources: Istio's sidecar injection template (the ``istio-init`` arguments) and
the istio-cni plugin's ``redirect.go`` (annotation names and defaults).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from meshredirect.errors import PolicyError, SourceError, SourcePosition, UnsafePolicyError
from meshredirect.policy import Policy

__all__ = [
    "ANNOTATIONS",
    "ANNOTATION_OF_FIELD",
    "load_manifest",
    "pod_annotations",
    "pod_container_ports",
    "policy_from_annotations",
    "policy_from_pod",
    "read_pod",
]

INTERCEPTION_MODE: Final = "sidecar.istio.io/interceptionMode"
STATUS_PORT: Final = "status.sidecar.istio.io/port"
INJECT: Final = "sidecar.istio.io/inject"
REROUTE: Final = "istio.io/reroute-virtual-interfaces"
KUBEVIRT: Final = "traffic.sidecar.istio.io/kubevirtInterfaces"
#: Ports the injector always leaves alone inbound besides the status port: the proxy's health and metrics.
ALWAYS_EXCLUDED_INBOUND: Final = ("15021", "15090")
DEFAULT_STATUS_PORT: Final = "15020"
PROXY_CONTAINER: Final = "istio-proxy"

#: Annotation -> (the istio-iptables configuration field it feeds, the injector's default).
ANNOTATIONS: Final[dict[str, tuple[str, str]]] = {
    INTERCEPTION_MODE: ("inbound_interception_mode", "REDIRECT"),
    "traffic.sidecar.istio.io/includeOutboundIPRanges": ("outbound_ip_ranges_include", "*"),
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": ("outbound_ip_ranges_exclude", ""),
    "traffic.sidecar.istio.io/includeInboundPorts": ("inbound_ports_include", ""),
    "traffic.sidecar.istio.io/excludeInboundPorts": ("inbound_ports_exclude", ""),
    "traffic.sidecar.istio.io/includeOutboundPorts": ("outbound_ports_include", ""),
    "traffic.sidecar.istio.io/excludeOutboundPorts": ("outbound_ports_exclude", ""),
    "traffic.sidecar.istio.io/excludeInterfaces": ("exclude_interfaces", ""),
    REROUTE: ("reroute_virtual_interfaces", ""),
    KUBEVIRT: ("reroute_virtual_interfaces", ""),
}
#: Policy field -> the annotation that feeds it (for errors; the CNI plugin applies a pod's annotations with it).
ANNOTATION_OF_FIELD: Final = {
    "inbound_mode": INTERCEPTION_MODE,
    "outbound_cidrs": "traffic.sidecar.istio.io/includeOutboundIPRanges",
    "outbound_cidrs_exclude": "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "inbound_ports": "traffic.sidecar.istio.io/includeInboundPorts",
    "inbound_ports_exclude": "traffic.sidecar.istio.io/excludeInboundPorts",
    "outbound_ports": "traffic.sidecar.istio.io/includeOutboundPorts",
    "outbound_ports_exclude": "traffic.sidecar.istio.io/excludeOutboundPorts",
    "exclude_interfaces": "traffic.sidecar.istio.io/excludeInterfaces",
    "reroute_interfaces": REROUTE,
}


def policy_from_annotations(
    annotations: Mapping[str, object],
    *,
    container_ports: Sequence[int] = (),
    inbound_default: str = "container-ports",
) -> tuple[Policy, list[str]]:
    """The policy the injector would program for a pod with these annotations and container ports, and warnings.

    ``inbound_default`` is ``"container-ports"`` or ``"*"``: the inbound ports
    when ``includeInboundPorts`` is absent. Errors name the annotation.
    """
    from meshredirect.frontends.istio import policy_from_istio_config

    if inbound_default not in ("container-ports", "*"):
        raise PolicyError("inbound default", expected="'container-ports' or '*'", got=inbound_default)
    values = {name: str(value).strip() for name, value in annotations.items()}
    warnings: list[str] = []
    mode = values.get(INTERCEPTION_MODE, "REDIRECT")
    if mode == "NONE":
        raise PolicyError(
            f"annotation {INTERCEPTION_MODE}",
            expected="REDIRECT or TPROXY (with NONE Istio programs no rules for the pod: nothing to compile)",
            got=mode,
        )
    if mode not in ("REDIRECT", "TPROXY"):
        raise PolicyError(f"annotation {INTERCEPTION_MODE}", expected="REDIRECT or TPROXY", got=mode)
    if values.get(INJECT, "").lower() == "false":
        warnings.append(f"the pod says {INJECT}: false; Istio would inject no sidecar and program no rules")
    config: dict[str, Any] = {
        "proxy_port": "15001",
        "inbound_capture_port": "15006",
        "proxy_uid": "1337",
        "proxy_gid": "1337",
    }
    for name, (field, default) in ANNOTATIONS.items():
        if name == KUBEVIRT and REROUTE in values:
            if values.get(KUBEVIRT) and values[KUBEVIRT] != values[REROUTE]:
                warnings.append(f"{KUBEVIRT} is ignored: {REROUTE} is set too and wins (as in Istio's injector)")
            continue
        if field not in config or name in values:
            config[field] = values.get(name, default)
    if "traffic.sidecar.istio.io/includeInboundPorts" not in values:
        if inbound_default == "*":
            config["inbound_ports_include"] = "*"
        else:
            config["inbound_ports_include"] = ",".join(str(p) for p in dict.fromkeys(container_ports))
            if not container_ports:
                warnings.append(
                    "the pod declares no container ports and has no includeInboundPorts annotation: no inbound "
                    "capture (annotate includeInboundPorts: '*' to capture every port)"
                )
    status = values.get(STATUS_PORT, DEFAULT_STATUS_PORT)
    excluded = [p for p in config["inbound_ports_exclude"].split(",") if p.strip()]
    excluded += [p for p in (status, *ALWAYS_EXCLUDED_INBOUND) if p and p != "0"]
    config["inbound_ports_exclude"] = ",".join(dict.fromkeys(excluded))
    try:
        return policy_from_istio_config(config), warnings
    except PolicyError as exc:
        raise _rename(exc, values) from None


def _rename(exc: PolicyError, values: Mapping[str, str]) -> PolicyError:
    name = ANNOTATION_OF_FIELD.get(exc.field)
    if name == REROUTE and REROUTE not in values:
        name = KUBEVIRT
    if exc.field == "inbound_ports" and name not in values:
        where = "the pod's container ports (the default of includeInboundPorts)"
    elif exc.field == "inbound_ports_exclude" and name not in values:
        where = f"the inbound ports always excluded ({STATUS_PORT} and 15021, 15090)"
    elif name is None:
        return exc
    else:
        where = f"annotation {name}"
    if isinstance(exc, UnsafePolicyError):
        return UnsafePolicyError(where, reason=exc.reason, got=exc.got)
    return PolicyError(where, expected=exc.expected, got=exc.got)


# ----------------------------------------------------------------------------- manifests


def _pod_template(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod (metadata + spec) inside a manifest: a Pod, a workload's template, a CronJob's job template."""
    spec = manifest.get("spec")
    if not isinstance(spec, Mapping):
        return None
    if isinstance(spec.get("containers"), list):
        return manifest
    template = spec.get("template")
    if isinstance(template, Mapping):
        return template
    job = spec.get("jobTemplate")
    if isinstance(job, Mapping):
        return _pod_template(job)
    return None


def _is_annotation_map(document: Mapping[str, Any]) -> bool:
    return bool(document) and all("/" in str(key) and not isinstance(v, (Mapping, list)) for key, v in document.items())


def pod_annotations(document: Mapping[str, Any]) -> Mapping[str, object]:
    """A manifest's pod annotations (or the document itself when it is an annotation map)."""
    if _is_annotation_map(document):
        return document
    pod = _pod_template(document)
    if pod is None:
        raise PolicyError(
            "pod manifest",
            expected="a Pod, a workload with a pod template, or a map of annotations",
            got=str(document.get("kind", "a document without spec.containers or spec.template")),
        )
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") if isinstance(metadata, Mapping) else None
    if annotations is None:
        return {}
    if not isinstance(annotations, Mapping):
        raise PolicyError("metadata.annotations", expected="a map of annotations", got=type(annotations).__name__)
    return annotations


def pod_container_ports(document: Mapping[str, Any]) -> list[int]:
    """The declared ``containerPort`` of every container but ``istio-proxy``, in order, without repeats."""
    pod = _pod_template(document)
    if pod is None:
        return []
    ports: list[int] = []
    for container in pod["spec"].get("containers") or []:
        if not isinstance(container, Mapping) or container.get("name") == PROXY_CONTAINER:
            continue
        for entry in container.get("ports") or []:
            port = entry.get("containerPort") if isinstance(entry, Mapping) else None
            if isinstance(port, bool) or not isinstance(port, int):
                raise PolicyError(
                    f"container {container.get('name', '?')!s} ports", expected="containerPort numbers", got=port
                )
            if port not in ports:
                ports.append(port)
    return ports


def policy_from_pod(
    document: Mapping[str, Any], *, inbound_default: str = "container-ports"
) -> tuple[Policy, list[str]]:
    """The policy of a loaded pod manifest (or annotation map), and warnings."""
    return policy_from_annotations(
        pod_annotations(document), container_ports=pod_container_ports(document), inbound_default=inbound_default
    )


def load_manifest(text: str, *, path: str = "<pod>") -> Mapping[str, Any]:
    """A JSON or YAML document (one); syntax errors carry the line and a caret."""
    lines = text.splitlines()

    def at(line: int, column: int, message: str) -> SourceError:
        shown = lines[line - 1] if 0 < line <= len(lines) else ""
        return SourceError(SourcePosition(path, line, column, shown), message)

    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        import json

        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise at(exc.lineno, exc.colno, f"invalid JSON: {exc.msg}") from None
    else:
        import yaml

        try:
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            if mark is None:
                raise at(1, 1, f"invalid YAML: {problem}") from None
            raise at(mark.line + 1, mark.column + 1, f"invalid YAML: {problem}") from None
        if len(documents) != 1:
            raise at(1, 1, f"expected one document (a pod or an annotation map), got {len(documents)}")
        document = documents[0]
    if not isinstance(document, Mapping):
        raise at(1, 1, f"expected a map (a pod or an annotation map), got {type(document).__name__}")
    return document


def read_pod(text: str, *, path: str = "<pod>", inbound_default: str = "container-ports") -> tuple[Policy, list[str]]:
    """Load a manifest and build its policy; an error about an annotation points at its line in the file."""
    document = load_manifest(text, path=path)
    try:
        return policy_from_pod(document, inbound_default=inbound_default)
    except PolicyError as exc:
        name = exc.field.removeprefix("annotation ")
        lines = text.splitlines()
        for number, line in enumerate(lines, start=1):
            column = line.find(name)
            if name != exc.field and column >= 0:
                raise SourceError(SourcePosition(path, number, column + 1, line), str(exc)) from None
        raise PolicyError(f"{path}: {exc.field}", expected=exc.expected, got=exc.got) from None
