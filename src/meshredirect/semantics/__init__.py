"""The semantics engine: what rules do to connections, and proofs of what a policy's rules do.

- :mod:`~meshredirect.semantics.model`: connections and the pod's environment.
- :mod:`~meshredirect.semantics.interpreter`: :func:`evaluate` one connection through a ruleset.
- :mod:`~meshredirect.semantics.classes`: the equivalence classes of connections a proof enumerates.
"""

from __future__ import annotations

from meshredirect.semantics.interpreter import (
    Dropped,
    Evaluation,
    Passed,
    Redirected,
    TProxied,
    Unknown,
    Verdict,
    evaluate,
)
from meshredirect.semantics.model import Connection, Environment, Origin, Proxy, Socket

__all__ = [
    "Connection",
    "Dropped",
    "Environment",
    "Evaluation",
    "Origin",
    "Passed",
    "Proxy",
    "Redirected",
    "Socket",
    "TProxied",
    "Unknown",
    "Verdict",
    "evaluate",
]
