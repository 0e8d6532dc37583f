"""Named starting points: policies that reproduce what a mesh's own tool programs.

Each preset documents where its values come from. A preset reproduces what the
mesh's tool *means* (which connections reach which proxy port), not the exact
text of its rules: chain names carry the preset's prefix, and lists become one
multiport rule.

>>> sorted(PRESETS)
['istio', 'istio-1.4', 'kuma', 'linkerd']
>>> preset("istio-1.4").inbound_tunnel_port is None
True
>>> linkerd = preset("linkerd")
>>> linkerd.outbound_port, linkerd.inbound_port, str(linkerd.proxy_uids), linkerd.loopback_capture.value
(4140, 4143, '2102', 'none')
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Final

from meshredirect.errors import PolicyError
from meshredirect.policy import LoopbackCapture, Policy
from meshredirect.values import ALL

__all__ = ["PRESETS", "preset"]


def _istio() -> Policy:
    """Istio's production default (istio-init / istio-cni, 1.5 and later)."""
    return Policy()


def _istio_1_4() -> Policy:
    """Istio 1.4: no tunnel port, ports 22 and 15020 left alone inbound, and every local
    connection over lo to the pod's own address captured to the inbound port (the app's
    too), one rule per excluded port. Source: the nat table such a pod holds
    (``conformance/seed/istio-1.4-nat.rules``)."""
    return Policy(
        inbound_tunnel_port=None,
        inbound_ports=ALL,
        inbound_ports_exclude=(22, 15020),
        loopback_capture=LoopbackCapture.ALL,
        one_rule_per_port=True,
    )


#: Linkerd's proxy listens here (``proxy.ports``: inbound 4143, outbound 4140, admin 4191, control 4190).
LINKERD_INBOUND_PORT: Final = 4143
LINKERD_OUTBOUND_PORT: Final = 4140
LINKERD_PROXY_UID: Final = 2102
#: The injector's ``--inbound-ports-to-ignore``: the proxy's control and admin ports, then
#: ``proxyInit.ignoreInboundPorts``.
LINKERD_INBOUND_PORTS_TO_IGNORE: Final = (4190, 4191, 4567, 4568)
#: The injector's ``--outbound-ports-to-ignore`` (``proxyInit.ignoreOutboundPorts``) for an application pod.
LINKERD_OUTBOUND_PORTS_TO_IGNORE: Final = (4567, 4568)


def _linkerd() -> Policy:
    """Linkerd 2 (``linkerd-init``, proxy-init 2.x): every inbound TCP port but the ignored ones
    to 4143, every outbound TCP connection but the proxy's (uid 2102) and those over ``lo`` to
    4140. Linkerd exempts the proxy by uid only and has no lo hairpin (its ``PROXY_INIT_OUTPUT``
    returns everything leaving over lo), no tunnel port and no DNS capture; it programs IPv4
    only unless asked. Source: linkerd2-proxy-init ``iptables.go`` (``addIncomingTrafficRules``,
    ``addOutgoingTrafficRules``) and the linkerd2 chart's ``partials.proxy-init`` with its
    default values (``proxy.uid``, ``proxy.ports``, ``proxyInit.ignoreInboundPorts`` and
    ``ignoreOutboundPorts`` = ``4567,4568``)."""
    return Policy(
        outbound_port=LINKERD_OUTBOUND_PORT,
        inbound_port=LINKERD_INBOUND_PORT,
        inbound_tunnel_port=None,
        proxy_uids=LINKERD_PROXY_UID,
        proxy_gids=(),
        inbound_ports=ALL,
        inbound_ports_exclude=LINKERD_INBOUND_PORTS_TO_IGNORE,
        outbound_ports_exclude=LINKERD_OUTBOUND_PORTS_TO_IGNORE,
        loopback_capture=LoopbackCapture.NONE,
        chain_prefix="PROXY_INIT",
    )


#: kuma-dp runs as this uid (``kumactl install transparent-proxy --kuma-dp-user``).
KUMA_PROXY_UID: Final = 5678


def _kuma() -> Policy:
    """Kuma (``kumactl install transparent-proxy`` / ``kuma-init`` with default settings):
    inbound TCP to 15006, outbound to 15001, kuma-dp exempted by uid 5678 only, the inbound
    passthrough from 127.0.0.6 (::6) over lo left alone and kuma-dp's own connections over lo
    to the pod's address hairpinned to the inbound port (Kuma's rules follow Istio's here), no
    ports excluded, no tunnel port, DNS capture off, IPv4 and IPv6 (``--ip-family-mode
    dualstack``, the default; Kuma skips IPv6 on a host without it, which these rules cannot
    know: ``families ipv4`` says ``--ip-family-mode ipv4``). Chains are named ``KUMA_MESH_*``.
    Source: Kuma's ``pkg/transparentproxy/config`` (``DefaultConfig``: inbound 15006, outbound
    15001, DNS 15053 off, ``IPFamilyModeDualStack``; owner uid 5678 from ``consts``) and
    ``iptables/builder/builder_table_nat.go`` (the ``MESH_OUTBOUND`` rules). Not modelled: older
    Kuma's separate IPv6 inbound port 15010."""
    return Policy(
        outbound_port=15001,
        inbound_port=15006,
        inbound_tunnel_port=None,
        proxy_uids=KUMA_PROXY_UID,
        proxy_gids=(),
        inbound_ports=ALL,
        inbound_ports_exclude=(),
        loopback_capture=LoopbackCapture.PROXY,
        families="dual",
        chain_prefix="KUMA_MESH",
    )


#: Preset name -> a function building its policy (``--preset`` on the command line).
PRESETS: Final[dict[str, Callable[[], Policy]]] = {
    "istio": _istio,
    "istio-1.4": _istio_1_4,
    "linkerd": _linkerd,
    "kuma": _kuma,
}


def preset(name: str) -> Policy:
    """The policy of a named preset, with a did-you-mean error for unknown names."""
    factory = PRESETS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PolicyError("preset", expected="one of " + ", ".join(sorted(PRESETS)) + hint, got=name)
    return factory()
