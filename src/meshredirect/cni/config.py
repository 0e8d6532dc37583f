"""meshredirect-cni's part of the network configuration: which pods get rules, and which policy.

The plugin entry of a conflist holds the well-known CNI fields and these
(every one optional)::

    {
      "type": "meshredirect-cni",
      "preset": "istio",
      "policy": {"outbound_cidrs_exclude": ["10.96.0.0/12"], "families": "ipv4"},
      "exclude_namespaces": ["kube-system"],
      "skip_pods": ["monitoring/*"],
      "pod_source": {"kind": "kubernetes", "api_server": "https://10.96.0.1:443",
                     "token_file": "/etc/cni/net.d/meshredirect/token",
                     "ca_file": "/etc/cni/net.d/meshredirect/ca.crt"},
      "require_annotation": "sidecar.istio.io/status",
      "annotations": true,
      "inbound_ports_default": "*",
      "backend": "iptables",
      "iptables_variant": "auto"
    }

``policy`` takes the fields of :class:`meshredirect.policy.Policy` by name,
on top of ``preset``. Unknown keys are refused (CNI error 2, naming the key
and its value); invalid values are CNI error 7 with the policy's own message.

>>> config = parse_plugin_config({"cniVersion": "1.0.0", "name": "k8s", "type": "meshredirect-cni",
...                               "policy": {"outbound_ports_exclude": "9000"}})
>>> str(config.base_policy().outbound_ports_exclude), config.exclude_namespaces
('9000', ('kube-system',))
>>> parse_plugin_config({"type": "meshredirect-cni", "polcy": {}})
Traceback (most recent call last):
...
meshredirect.cni.protocol.CniError: CNI error 2: unsupported field 'polcy' = {} (did you mean 'policy'?)
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from meshredirect.cni.protocol import CniError, WellKnown

if TYPE_CHECKING:
    from meshredirect.policy import Policy

__all__ = [
    "DEFAULT_EXCLUDED_NAMESPACES",
    "PLUGIN_TYPE",
    "DirectorySource",
    "KubernetesSource",
    "PluginConfig",
    "parse_plugin_config",
]

PLUGIN_TYPE: Final = "meshredirect-cni"
DEFAULT_EXCLUDED_NAMESPACES: Final = ("kube-system",)
#: Where a pod's service account token and CA sit in a pod (the installer copies them for the plugin).
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_API_TIMEOUT: Final = 5.0
DEFAULT_API_ATTEMPTS: Final = 3
VARIANTS: Final = ("auto", "nft", "legacy")
#: The apply layer's backends the plugin can load rules with.
BACKENDS: Final = ("iptables", "nftables")
#: What a pod without an includeInboundPorts annotation gets: every port (Istio's injector today), or the
#: ports its containers declare (with which a port a container does not declare bypasses the mesh).
INBOUND_PORTS_DEFAULTS: Final = ("*", "container-ports")

#: Fields the specification defines for every plugin configuration (they are not ours to refuse).
WELL_KNOWN_FIELDS: Final = frozenset(
    {"cniVersion", "name", "type", "args", "ipMasq", "ipam", "dns", "runtimeConfig", "prevResult", "capabilities"}
)
PLUGIN_FIELDS: Final = (
    "preset",
    "policy",
    "exclude_namespaces",
    "skip_pods",
    "pod_source",
    "require_annotation",
    "annotations",
    "inbound_ports_default",
    "backend",
    "iptables_variant",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@attrs.frozen(kw_only=True)
class DirectorySource:
    """Pod manifests (JSON, or YAML when PyYAML is installed) in a directory: for tests and static nodes."""

    path: str


@attrs.frozen(kw_only=True)
class KubernetesSource:
    """The Kubernetes API, reached with a service account token over TLS."""

    api_server: str
    token_file: str = f"{SERVICE_ACCOUNT_DIR}/token"
    ca_file: str | None = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    timeout_seconds: float = DEFAULT_API_TIMEOUT
    attempts: int = DEFAULT_API_ATTEMPTS


PodSource = DirectorySource | KubernetesSource


@attrs.frozen(kw_only=True)
class PluginConfig:
    """The parsed plugin configuration (see the module docstring)."""

    cni_version: str | None
    name: str | None
    preset: str = "istio"
    policy_fields: tuple[tuple[str, Any], ...] = ()
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    skip_pods: tuple[str, ...] = ()
    pod_source: PodSource | None = None
    require_annotation: str | None = None
    annotations: bool = True
    inbound_ports_default: str = "*"
    backend: str = "iptables"
    iptables_variant: str = "auto"

    @property
    def variant(self) -> str | None:
        """The iptables variant to ask the apply layer for (None: detect it)."""
        return None if self.iptables_variant == "auto" else self.iptables_variant

    def base_policy(self) -> Policy:
        """The preset with the configured fields; invalid values are CNI error 7."""
        import attrs as _attrs

        from meshredirect.errors import MeshRedirectError
        from meshredirect.policy import Policy
        from meshredirect.presets import preset

        try:
            policy = preset(self.preset)
            if self.policy_fields:
                policy = _attrs.evolve(policy, **dict(self.policy_fields))
        except MeshRedirectError as exc:
            raise CniError(WellKnown.INVALID_NETWORK_CONFIG, f"policy: {exc}") from None
        known = {f.name for f in _attrs.fields(Policy)}
        assert all(name in known for name, _ in self.policy_fields)
        groups = policy.unresolved_groups()
        if groups:
            raise CniError(
                WellKnown.INVALID_NETWORK_CONFIG,
                f"policy: group {groups[0]!r}: expected a numeric gid (a name cannot be resolved for a pod from "
                "the node's group database)",
            )
        return policy

    def skips(self, namespace: str | None, name: str | None) -> str | None:
        """Why a pod gets no rules from its namespace or name alone, or None."""
        if namespace is not None and namespace in self.exclude_namespaces:
            return f"namespace {namespace!r} is excluded"
        if namespace is not None and name is not None:
            for pattern in self.skip_pods:
                if fnmatch.fnmatchcase(f"{namespace}/{name}", pattern):
                    return f"pod {namespace}/{name} matches skip_pods entry {pattern!r}"
        return None


def _invalid(field: str, expected: str, got: object) -> CniError:
    return CniError(WellKnown.INVALID_NETWORK_CONFIG, f"{field}: expected {expected}, got {json.dumps(got)}")


def _string_list(field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _invalid(field, "a list of non-empty strings", value)
    return tuple(value)


def _unsupported(field: str, value: object, known: tuple[str, ...] | frozenset[str]) -> CniError:
    close = difflib.get_close_matches(field, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CniError(WellKnown.UNSUPPORTED_FIELD, f"unsupported field {field!r} = {json.dumps(value)}{hint}")


def _pod_source(value: object) -> PodSource | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("kind") not in ("directory", "kubernetes"):
        raise _invalid("pod_source", 'an object with "kind": "directory" or "kubernetes"', value)
    kind = value["kind"]
    if kind == "directory":
        for key in value:
            if key not in ("kind", "path"):
                raise _unsupported(f"pod_source.{key}", value[key], ("pod_source.kind", "pod_source.path"))
        path = value.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise _invalid("pod_source.path", "an absolute directory path", path)
        return DirectorySource(path=path)
    allowed = ("kind", "api_server", "token_file", "ca_file", "timeout_seconds", "attempts")
    for key in value:
        if key not in allowed:
            raise _unsupported(f"pod_source.{key}", value[key], tuple(f"pod_source.{k}" for k in allowed))
    server = value.get("api_server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise _invalid("pod_source.api_server", "an https:// URL of the Kubernetes API", server)
    token_file = value.get("token_file", f"{SERVICE_ACCOUNT_DIR}/token")
    if not isinstance(token_file, str) or not token_file.startswith("/"):
        raise _invalid("pod_source.token_file", "an absolute file path", token_file)
    ca_file = value.get("ca_file", f"{SERVICE_ACCOUNT_DIR}/ca.crt")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.startswith("/")):
        raise _invalid("pod_source.ca_file", "an absolute file path or null (the system's CAs)", ca_file)
    timeout = value.get("timeout_seconds", DEFAULT_API_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise _invalid("pod_source.timeout_seconds", "a number of seconds in (0, 60]", timeout)
    attempts = value.get("attempts", DEFAULT_API_ATTEMPTS)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise _invalid("pod_source.attempts", "a whole number 1-10", attempts)
    return KubernetesSource(
        api_server=server.rstrip("/"),
        token_file=token_file,
        ca_file=ca_file,
        timeout_seconds=float(timeout),
        attempts=attempts,
    )


def parse_plugin_config(config: Mapping[str, Any]) -> PluginConfig:
    """Check and read the plugin's fields of a network configuration (see the module docstring)."""
    for key, value in config.items():
        if key not in WELL_KNOWN_FIELDS and key not in PLUGIN_FIELDS:
            raise _unsupported(key, value, (*PLUGIN_FIELDS, *WELL_KNOWN_FIELDS))
    name = config.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise _invalid("name", "a network name: an alphanumeric, then alphanumerics, '_', '.' or '-'", name)
    preset = config.get("preset", "istio")
    if not isinstance(preset, str):
        raise _invalid("preset", "a preset name", preset)
    from meshredirect.presets import PRESETS

    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _invalid("preset", "one of " + ", ".join(sorted(PRESETS)) + hint, preset)
    fields = config.get("policy", {})
    if not isinstance(fields, dict):
        raise _invalid("policy", "an object of policy fields", fields)
    from meshredirect.policy import Policy

    known = tuple(f.name for f in attrs.fields(Policy))
    for key, value in fields.items():
        if key not in known:
            raise _unsupported(f"policy.{key}", value, tuple(f"policy.{k}" for k in known))
    exclude = config.get("exclude_namespaces", list(DEFAULT_EXCLUDED_NAMESPACES))
    skip = config.get("skip_pods", [])
    for pattern in _string_list("skip_pods", skip):
        if "/" not in pattern:
            raise _invalid("skip_pods", "entries NAMESPACE/NAME (shell patterns allowed)", pattern)
    require = config.get("require_annotation")
    if require is not None and (not isinstance(require, str) or not require):
        raise _invalid("require_annotation", "an annotation key or null", require)
    source = _pod_source(config.get("pod_source"))
    if require is not None and source is None:
        raise _invalid("require_annotation", "a pod_source to read annotations from", require)
    annotations = config.get("annotations", True)
    if not isinstance(annotations, bool):
        raise _invalid("annotations", "true or false", annotations)
    inbound_default = config.get("inbound_ports_default", "*")
    if inbound_default not in INBOUND_PORTS_DEFAULTS:
        raise _invalid("inbound_ports_default", '"*" or "container-ports"', inbound_default)
    if inbound_default == "container-ports" and (source is None or not annotations):
        raise _invalid(
            "inbound_ports_default",
            '"*" without a pod_source whose annotations apply (container ports are read from the pod)',
            inbound_default,
        )
    backend = config.get("backend", "iptables")
    if backend not in BACKENDS:
        raise _invalid("backend", " or ".join(BACKENDS), backend)
    variant = config.get("iptables_variant", "auto")
    if variant not in VARIANTS:
        raise _invalid("iptables_variant", " or ".join(VARIANTS), variant)
    version = config.get("cniVersion")
    return PluginConfig(
        cni_version=version if isinstance(version, str) else None,
        name=name,
        preset=preset,
        policy_fields=tuple(fields.items()),
        exclude_namespaces=_string_list("exclude_namespaces", exclude),
        skip_pods=tuple(skip),
        pod_source=source,
        require_annotation=require,
        annotations=annotations,
        inbound_ports_default=inbound_default,
        backend=backend,
        iptables_variant=variant,
    )
