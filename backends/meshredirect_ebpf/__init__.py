"""eBPF backend for meshredirect: cgroup connect programs generated from the IR, their maps, a reference model.

- :mod:`~meshredirect_ebpf.lowering`: IR (nat OUTPUT chains) to a program plan;
- :mod:`~meshredirect_ebpf.csource`: the plan as restricted C for clang's BPF target;
- :mod:`~meshredirect_ebpf.maps`: every map as data, and the JSON document of their entries;
- :mod:`~meshredirect_ebpf.model`: the same plan run in Python, for proofs anywhere;
- :mod:`~meshredirect_ebpf.environment`: the routing the program assumes, given explicitly.

Registered as ``ebpf`` in the ``meshredirect.backends`` entry-point group.
"""

from __future__ import annotations

from meshredirect_ebpf.backend import EbpfBackend
from meshredirect_ebpf.environment import Environment, Route
from meshredirect_ebpf.model import ConnectCall, Outcome, Refused, Rewritten, Unchanged, decide

__all__ = [
    "ConnectCall",
    "EbpfBackend",
    "Environment",
    "Outcome",
    "Refused",
    "Rewritten",
    "Route",
    "Unchanged",
    "decide",
]
