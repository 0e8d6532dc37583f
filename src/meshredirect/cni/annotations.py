"""Istio's per-pod traffic annotations applied on top of the plugin's base policy.

This is the subset the CNI plugin needs, behind one function
(:func:`policy_for_pod`), until the Istio front end's full annotation mapping
replaces it. Meanings follow Istio's CNI plugin: ``includeInboundPorts``
defaults to ``*``; ``excludeInboundPorts`` adds to the proxy's own ports
(15020, 15021, 15090), never removes them; ``istio.io/reroute-virtual-interfaces``
wins over the deprecated ``kubevirtInterfaces``.

>>> from meshredirect.policy import Policy
>>> policy = policy_for_pod(Policy(), {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12",
...                                     "traffic.sidecar.istio.io/excludeInboundPorts": "22"})
>>> str(policy.outbound_cidrs_exclude), str(policy.inbound_ports_exclude)
('10.96.0.0/12', '22,15020-15021,15090')
>>> policy_for_pod(Policy(), {"sidecar.istio.io/interceptionMode": "TPROXYY"})
Traceback (most recent call last):
...
meshredirect.cni.protocol.CniError: CNI error 104: annotation sidecar.istio.io/interceptionMode: inbound_mode: expected REDIRECT or TPROXY, got 'TPROXYY'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from meshredirect.cni.protocol import CniError, PluginCode

if TYPE_CHECKING:
    from meshredirect.policy import Policy

__all__ = ["ANNOTATIONS", "INJECT_ANNOTATION", "policy_for_pod"]

_TRAFFIC: Final = "traffic.sidecar.istio.io/"
#: annotation -> the policy field it sets.
ANNOTATIONS: Final[dict[str, str]] = {
    f"{_TRAFFIC}includeOutboundIPRanges": "outbound_cidrs",
    f"{_TRAFFIC}excludeOutboundIPRanges": "outbound_cidrs_exclude",
    f"{_TRAFFIC}includeInboundPorts": "inbound_ports",
    f"{_TRAFFIC}excludeInboundPorts": "inbound_ports_exclude",
    f"{_TRAFFIC}includeOutboundPorts": "outbound_ports",
    f"{_TRAFFIC}excludeOutboundPorts": "outbound_ports_exclude",
    f"{_TRAFFIC}excludeInterfaces": "exclude_interfaces",
    f"{_TRAFFIC}kubevirtInterfaces": "reroute_interfaces",
    "istio.io/reroute-virtual-interfaces": "reroute_interfaces",
    "sidecar.istio.io/interceptionMode": "inbound_mode",
}
#: ``"false"`` here means the pod has no sidecar: it gets no rules.
INJECT_ANNOTATION: Final = "sidecar.istio.io/inject"
_DEPRECATED: Final = f"{_TRAFFIC}kubevirtInterfaces"


def _items(value: str) -> list[str]:
    """Istio's comma lists tolerate empty items and spaces."""
    return [item.strip() for item in value.split(",") if item.strip()]


def policy_for_pod(base: Policy, annotations: Mapping[str, str]) -> Policy:
    """``base`` with the pod's traffic annotations applied; a bad value is CNI error 104 naming the annotation."""
    import attrs

    from meshredirect.errors import MeshRedirectError

    changes: dict[str, object] = {}
    sources: dict[str, str] = {}
    for key, field in ANNOTATIONS.items():
        if key not in annotations:
            continue
        if key == _DEPRECATED and "istio.io/reroute-virtual-interfaces" in annotations:
            continue
        raw = annotations[key].strip()
        value: object
        value = raw if field == "inbound_mode" or raw == "*" else _items(raw)
        if field == "inbound_ports_exclude":
            value = [*(_items(raw)), *(str(p) for p in _ports(base.inbound_ports_exclude))]
        changes[field] = value
        sources[field] = key
    if not changes:
        return base
    try:
        return attrs.evolve(base, **changes)
    except MeshRedirectError as exc:
        field = getattr(exc, "field", "")
        key = sources.get(str(field).split(".")[0], ", ".join(sorted(sources.values())))
        raise CniError(PluginCode.INVALID_ANNOTATION, f"annotation {key}: {exc}") from None


def _ports(ports: object) -> list[str]:
    text = str(ports)
    return _items(text) if text else []
