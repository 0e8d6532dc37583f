"""meshredirect: a service mesh's transparent-redirect policy, compiled to kernel rules and proven.

>>> import meshredirect
>>> ruleset = meshredirect.compile_policy(meshredirect.Policy())
>>> text = meshredirect.render(ruleset, "iptables-save").text()
>>> "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in text
True

The public surface is re-exported here; submodules load on first use so
that importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Policy": "meshredirect.policy",
    "DnsCapture": "meshredirect.policy",
    "InterceptionMode": "meshredirect.policy",
    "LoopbackCapture": "meshredirect.policy",
    "DEFAULT_POLICY": "meshredirect.policy",
    "compile_policy": "meshredirect.compiler",
    "render": "meshredirect.api",
    "resolve_groups": "meshredirect.api",
    "preset": "meshredirect.presets",
    "PRESETS": "meshredirect.presets",
    "Ruleset": "meshredirect.ir",
    "Family": "meshredirect.ir",
    "available_backends": "meshredirect.backend",
    "get_backend": "meshredirect.backend",
    "Rendering": "meshredirect.backend",
    "MeshRedirectError": "meshredirect.errors",
    "PolicyError": "meshredirect.errors",
    "UnsafePolicyError": "meshredirect.errors",
    "UnsupportedError": "meshredirect.errors",
    "BackendNotFoundError": "meshredirect.errors",
    "SourceError": "meshredirect.errors",
    "EnvironmentProblem": "meshredirect.errors",
    "evaluate": "meshredirect.semantics.interpreter",
    "check": "meshredirect.semantics.check",
    "equivalent": "meshredirect.semantics.equivalence",
    "Connection": "meshredirect.semantics.model",
    "Environment": "meshredirect.semantics.model",
    "ALL": "meshredirect.values",
    "PortSet": "meshredirect.values",
    "AddressSet": "meshredirect.values",
    "IdSet": "meshredirect.values",
}

__all__ = [
    "ALL",
    "DEFAULT_POLICY",
    "PRESETS",
    "AddressSet",
    "BackendNotFoundError",
    "Connection",
    "DnsCapture",
    "Environment",
    "EnvironmentProblem",
    "Family",
    "IdSet",
    "InterceptionMode",
    "LoopbackCapture",
    "MeshRedirectError",
    "Policy",
    "PolicyError",
    "PortSet",
    "Rendering",
    "Ruleset",
    "SourceError",
    "UnsafePolicyError",
    "UnsupportedError",
    "available_backends",
    "check",
    "compile_policy",
    "equivalent",
    "evaluate",
    "get_backend",
    "preset",
    "render",
    "resolve_groups",
]

if TYPE_CHECKING:
    from meshredirect.api import render, resolve_groups
    from meshredirect.backend import Rendering, available_backends, get_backend
    from meshredirect.compiler import compile_policy
    from meshredirect.errors import (
        BackendNotFoundError,
        EnvironmentProblem,
        MeshRedirectError,
        PolicyError,
        SourceError,
        UnsafePolicyError,
        UnsupportedError,
    )
    from meshredirect.ir import Family, Ruleset
    from meshredirect.policy import DEFAULT_POLICY, DnsCapture, InterceptionMode, LoopbackCapture, Policy
    from meshredirect.presets import PRESETS, preset
    from meshredirect.semantics.check import check
    from meshredirect.semantics.equivalence import equivalent
    from meshredirect.semantics.interpreter import evaluate
    from meshredirect.semantics.model import Connection, Environment
    from meshredirect.values import ALL, AddressSet, IdSet, PortSet


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meshredirect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
