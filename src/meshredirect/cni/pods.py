"""Where the plugin learns a pod's annotations: a directory of manifests, or the Kubernetes API.

The Kubernetes client is plain ``urllib`` (a CNI plugin starts once per pod;
a full client library would cost more than the rest of the plugin): one GET
of ``/api/v1/namespaces/NS/pods/NAME`` with the service account's bearer
token over TLS verified against the cluster CA. Transient failures
(connection refused, time-outs, 429, 5xx) are retried and finally reported
as CNI error 11 (try again later); 401/403 and 404 are reported at once.

>>> pod = pod_from_manifest({"metadata": {"name": "web", "namespace": "shop",
...     "annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "9000"}},
...     "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}}, where="web.json")
>>> pod.namespace, pod.name, pod.annotation("traffic.sidecar.istio.io/excludeOutboundPorts"), pod.container_ports
('shop', 'web', '9000', (8080,))
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from meshredirect.cni.config import DirectorySource, KubernetesSource, PodSource
from meshredirect.cni.protocol import CniError, PluginCode, WellKnown

__all__ = ["PodInfo", "lookup_pod", "pod_from_manifest"]

MANIFEST_SUFFIXES: Final = (".json", ".yaml", ".yml")
#: Seconds between attempts at the Kubernetes API (times the attempt number).
RETRY_BACKOFF: Final = 0.2
#: Statuses worth another attempt: rate limiting and server-side trouble.
TRANSIENT_STATUSES: Final = frozenset({429, 500, 502, 503, 504})


@attrs.frozen(kw_only=True)
class PodInfo:
    """What the plugin needs of a pod."""

    namespace: str
    name: str
    annotations: tuple[tuple[str, str], ...] = ()
    #: The ports the pod's containers declare (every container but the proxy's), in order.
    container_ports: tuple[int, ...] = ()

    def annotation(self, key: str) -> str | None:
        for name, value in self.annotations:
            if name == key:
                return value
        return None

    @property
    def annotation_map(self) -> dict[str, str]:
        return dict(self.annotations)


def pod_from_manifest(manifest: Mapping[str, Any], *, where: str) -> PodInfo:
    """A :class:`PodInfo` from a Pod object (as the API returns it, or as a manifest file holds it)."""
    if not isinstance(manifest, Mapping):
        raise CniError(PluginCode.POD_SOURCE, f"{where}: expected a Pod object, got {type(manifest).__name__}")
    kind = manifest.get("kind", "Pod")
    if kind != "Pod":
        raise CniError(PluginCode.POD_SOURCE, f"{where}: expected kind Pod, got {kind!r}")
    metadata = manifest.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str):
        raise CniError(PluginCode.POD_SOURCE, f"{where}: expected metadata.name, got {metadata!r:.60}")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise CniError(
            PluginCode.POD_SOURCE, f"{where}: expected metadata.annotations of strings, got {annotations!r:.60}"
        )
    from meshredirect.errors import PolicyError
    from meshredirect.frontends.pod import pod_container_ports

    try:
        ports = pod_container_ports(manifest)
    except PolicyError as exc:
        raise CniError(PluginCode.POD_SOURCE, f"{where}: spec.containers: {exc}") from None
    return PodInfo(
        namespace=str(metadata.get("namespace") or "default"),
        name=metadata["name"],
        annotations=tuple(sorted(annotations.items())),
        container_ports=tuple(ports),
    )


def lookup_pod(source: PodSource, namespace: str, name: str) -> PodInfo:
    """The pod from the configured source; CNI errors say what went wrong and whether to retry."""
    if isinstance(source, DirectorySource):
        return _from_directory(source, namespace, name)
    return _from_kubernetes(source, namespace, name)


# ----------------------------------------------------------------------------- directory


def _load_manifest(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CniError(PluginCode.POD_SOURCE, f"{path}: cannot read: {exc}") from None
    if path.suffix == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            start = text.rfind("\n", 0, exc.pos) + 1
            end = text.find("\n", exc.pos)
            line = text[start : end if end != -1 else len(text)]
            raise CniError(
                PluginCode.POD_SOURCE,
                f"{path}:{exc.lineno}:{exc.colno}: expected a JSON Pod manifest: {exc.msg}",
                f"    {line}\n    {' ' * (exc.colno - 1)}^",
            ) from None
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise CniError(
            PluginCode.POD_SOURCE, f"{path}: YAML manifests need PyYAML (pip install pyyaml); use .json otherwise"
        ) from None
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise CniError(PluginCode.POD_SOURCE, f"{where}: expected a YAML Pod manifest: {exc}") from None


def _from_directory(source: DirectorySource, namespace: str, name: str) -> PodInfo:
    directory = Path(source.path)
    if not directory.is_dir():
        raise CniError(PluginCode.POD_SOURCE, f"pod_source.path: expected a directory, got {source.path!r}")
    for path in sorted(directory.iterdir()):
        if path.suffix not in MANIFEST_SUFFIXES or not path.is_file():
            continue
        for document in _load_manifest(path):
            pod = pod_from_manifest(document, where=str(path))
            if pod.namespace == namespace and pod.name == name:
                return pod
    raise CniError(PluginCode.POD_NOT_FOUND, f"pod {namespace}/{name}: not found in {source.path}")


# ----------------------------------------------------------------------------- Kubernetes API


def _api_message(body: bytes) -> str:
    try:
        status = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace").strip()
    return str(status.get("message", "")) if isinstance(status, dict) else ""


def _from_kubernetes(source: KubernetesSource, namespace: str, name: str) -> PodInfo:
    try:
        token = Path(source.token_file).read_text().strip()
    except OSError as exc:
        raise CniError(
            PluginCode.POD_SOURCE, f"pod_source.token_file: cannot read {source.token_file}: {exc.strerror}"
        ) from None
    try:
        context = ssl.create_default_context(cafile=source.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CniError(PluginCode.POD_SOURCE, f"pod_source.ca_file: cannot use {source.ca_file}: {exc}") from None
    url = (
        f"{source.api_server}/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
        f"/pods/{urllib.parse.quote(name, safe='')}"
    )
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}, method="GET"
    )
    last = ""
    for attempt in range(1, source.attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=source.timeout_seconds, context=context) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            detail = _api_message(exc.read())
            if exc.code == 404:
                raise CniError(
                    PluginCode.POD_NOT_FOUND, f"pod {namespace}/{name}: not found by the API", detail
                ) from None
            if exc.code in (401, 403):
                raise CniError(
                    PluginCode.NOT_AUTHORISED,
                    f"pod {namespace}/{name}: the API refused the service account (HTTP {exc.code}); "
                    "it needs get on pods (see deploy/k8s/rbac.yaml)",
                    detail,
                ) from None
            if exc.code not in TRANSIENT_STATUSES:
                raise CniError(
                    PluginCode.POD_SOURCE, f"pod {namespace}/{name}: HTTP {exc.code} from the API", detail
                ) from None
            last = f"HTTP {exc.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise CniError(
                    PluginCode.POD_SOURCE, f"{source.api_server}: TLS verification failed: {reason.verify_message}"
                ) from None
            last = f"{reason}"
        else:
            try:
                manifest = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CniError(PluginCode.POD_SOURCE, f"{url}: expected a JSON Pod, got {body[:60]!r}") from None
            return pod_from_manifest(manifest, where=url)
        if attempt < source.attempts:
            time.sleep(RETRY_BACKOFF * attempt)
    raise CniError(
        WellKnown.TRY_AGAIN_LATER,
        f"pod {namespace}/{name}: the Kubernetes API at {source.api_server} did not answer after "
        f"{source.attempts} attempt(s)",
        last,
    )
