"""A pod's Istio annotations on top of the plugin's base policy, through the Istio front end's mapping.

The front end (:mod:`meshredirect.frontends.pod`) reads every annotation
Istio's sidecar injector reads, with the injector's meanings: the interception
mode, the outbound CIDR and port lists, the inbound port lists (the status
port ``status.sidecar.istio.io/port``, 15021 and 15090 always excluded, and
exclusions honoured only with ``*``, as ``istio-iptables`` does), the excluded
and rerouted interfaces (``istio.io/reroute-virtual-interfaces`` winning over
the deprecated ``kubevirtInterfaces``). The plugin keeps its configured policy
(the preset and the ``policy`` fields: proxy ids, capture ports, families,
DNS...) and takes from the front end's policy for the pod:

- each field whose annotation the pod carries;
- ``inbound_ports`` always: the ``includeInboundPorts`` annotation, else the
  plugin's ``inbound_ports_default`` (``"*"``: every port, what Istio's injector
  does today; ``"container-ports"``: the ports the pod's containers declare);
- ``inbound_ports_exclude``, when the pod carries ``excludeInboundPorts`` or
  the status port annotation: the configured exclusions and the front end's.

>>> from meshredirect.policy import Policy
>>> policy, warnings = policy_for_pod(Policy(), {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12",
...                                             "traffic.sidecar.istio.io/excludeInboundPorts": "22"})
>>> str(policy.outbound_cidrs_exclude), str(policy.inbound_ports), str(policy.inbound_ports_exclude)
('10.96.0.0/12', '*', '22,15020-15021,15090')
>>> policy, _ = policy_for_pod(Policy(), {}, container_ports=[8080, 9090], inbound_default="container-ports")
>>> str(policy.inbound_ports)
'8080,9090'
>>> policy_for_pod(Policy(), {"sidecar.istio.io/interceptionMode": "TPROXYY"})
Traceback (most recent call last):
...
meshredirect.cni.protocol.CniError: CNI error 104: annotation sidecar.istio.io/interceptionMode: expected REDIRECT or TPROXY, got 'TPROXYY'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from meshredirect.cni.protocol import CniError, PluginCode

if TYPE_CHECKING:
    from meshredirect.policy import Policy

__all__ = ["INJECT_ANNOTATION", "INTERCEPTION_MODE_ANNOTATION", "NO_INTERCEPTION", "policy_for_pod"]

#: ``"false"`` here means the pod has no sidecar: it gets no rules.
INJECT_ANNOTATION: Final = "sidecar.istio.io/inject"
#: ``NONE`` here means Istio programs no rules for the pod: it gets none.
INTERCEPTION_MODE_ANNOTATION: Final = "sidecar.istio.io/interceptionMode"
NO_INTERCEPTION: Final = "NONE"


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def policy_for_pod(
    base: Policy,
    annotations: Mapping[str, str],
    *,
    container_ports: Sequence[int] = (),
    inbound_default: str = "*",
) -> tuple[Policy, list[str]]:
    """``base`` with the pod's traffic annotations applied (see the module docstring), and the front end's
    warnings; a bad value is CNI error 104 naming the annotation."""
    import attrs

    from meshredirect.errors import MeshRedirectError
    from meshredirect.frontends.pod import (
        ANNOTATION_OF_FIELD,
        KUBEVIRT,
        REROUTE,
        STATUS_PORT,
        policy_from_annotations,
    )

    try:
        pod_policy, warnings = policy_from_annotations(
            annotations, container_ports=container_ports, inbound_default=inbound_default
        )
    except MeshRedirectError as exc:
        raise CniError(PluginCode.INVALID_ANNOTATION, str(exc)) from None
    changes: dict[str, object] = {}
    for field, name in ANNOTATION_OF_FIELD.items():
        if field == "inbound_ports_exclude":
            if name in annotations or STATUS_PORT in annotations:
                theirs = _items(str(pod_policy.inbound_ports_exclude))
                changes[field] = list(dict.fromkeys([*_items(str(base.inbound_ports_exclude)), *theirs]))
        elif field == "inbound_ports" or name in annotations or (name == REROUTE and KUBEVIRT in annotations):
            changes[field] = getattr(pod_policy, field)
    try:
        return attrs.evolve(base, **changes), warnings
    except MeshRedirectError as exc:
        field = str(getattr(exc, "field", "")).split(".")[0]
        annotation = ANNOTATION_OF_FIELD.get(field)
        if annotation == REROUTE and REROUTE not in annotations:
            annotation = KUBEVIRT
        if field == "inbound_ports" and annotation not in annotations:
            where = f"inbound_ports_default {inbound_default!r}"
        else:
            where = f"annotation {annotation}" if annotation else "the pod's annotations"
        raise CniError(PluginCode.INVALID_ANNOTATION, f"{where}: {exc}") from None
