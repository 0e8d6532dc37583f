"""Named starting points: policies that reproduce what a mesh's own tool programs.

>>> sorted(PRESETS)
['istio', 'istio-1.4']
>>> preset("istio-1.4").inbound_tunnel_port is None
True
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


#: Preset name -> a function building its policy (``--preset`` on the command line).
PRESETS: Final[dict[str, Callable[[], Policy]]] = {
    "istio": _istio,
    "istio-1.4": _istio_1_4,
}


def preset(name: str) -> Policy:
    """The policy of a named preset, with a did-you-mean error for unknown names."""
    factory = PRESETS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PolicyError("preset", expected="one of " + ", ".join(sorted(PRESETS)) + hint, got=name)
    return factory()
