"""The apply layer: the only part of meshredirect with side effects.

It runs the kernel tools (``iptables-restore``, ``nft``, ``ip``...) inside a
target network namespace, reading the current state first so that each change
is one transaction per table and family that replaces exactly our rules, and
undoing everything when any part fails.

- :func:`apply` / :func:`cleanup` (module :mod:`~meshredirect.apply.actions`):
  load a policy's rules and TPROXY routing, or remove ours; both return an
  :class:`Outcome` (what changed, which variant and why, "already up to date").
- :func:`validate` (module :mod:`~meshredirect.apply.validation`): check with a
  real connection that capture works in the namespace, and name the likely
  cause when it does not.
- Appliers per backend: :mod:`~meshredirect.apply.iptables` (and nftables),
  policy routing: :mod:`~meshredirect.apply.routing`, namespaces:
  :mod:`~meshredirect.apply.netns`.

Submodules load on first use.

>>> from meshredirect.apply import families_of
>>> families_of("both")
(<Family.IPV4: 'ipv4'>, <Family.IPV6: 'ipv6'>)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["ApplyFailed", "Outcome", "Validation", "apply", "cleanup", "families_of", "validate"]

_EXPORTS = {
    "apply": "meshredirect.apply.actions",
    "cleanup": "meshredirect.apply.actions",
    "Outcome": "meshredirect.apply.actions",
    "families_of": "meshredirect.apply.actions",
    "ApplyFailed": "meshredirect.apply.base",
    "validate": "meshredirect.apply.validation",
    "Validation": "meshredirect.apply.validation",
}

if TYPE_CHECKING:
    from meshredirect.apply.actions import Outcome, apply, cleanup, families_of
    from meshredirect.apply.base import ApplyFailed
    from meshredirect.apply.validation import Validation, validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meshredirect.apply' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
