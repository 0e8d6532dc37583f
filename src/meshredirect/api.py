"""Convenience functions of the public API that tie the pieces together.

>>> from meshredirect import Policy, compile_policy
>>> print(render(compile_policy(Policy(inbound_ports="")), "iptables-save").text(), end="")
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from meshredirect.backend import Rendering, create_backend
from meshredirect.errors import UnsafePolicyError
from meshredirect.ir import Ruleset
from meshredirect.policy import Group, Policy
from meshredirect.values import All

__all__ = ["render", "resolve_groups"]


def render(ruleset: Ruleset, backend: str, **options: object) -> Rendering:
    """Lower a ruleset with the backend registered under ``backend``."""
    return create_backend(backend, options).render(ruleset)


def resolve_groups(policy: Policy, lookup: Callable[[str], int | None]) -> Policy:
    """Replace group names in a policy by numeric gids; a name that does not resolve is refused.

    ``lookup`` maps a name to a gid or None (the CLI passes this machine's
    group database; tests pass a dictionary's ``get``).

    >>> resolve_groups(Policy(owner_groups_include="java,202"), {"java": 1001}.get).owner_groups_include
    (1001, 202)
    >>> resolve_groups(Policy(owner_groups_exclude="888,ftp"), {}.get)
    Traceback (most recent call last):
    ...
    meshredirect.errors.UnsafePolicyError: owner_groups_exclude: refused: group 'ftp' does not exist on this machine; a rule naming it cannot be loaded (given: 'ftp')
    """

    def resolve(field: str, groups: tuple[Group, ...]) -> tuple[int, ...]:
        out: list[int] = []
        for group in groups:
            if isinstance(group, int):
                out.append(group)
                continue
            gid = lookup(group)
            if gid is None:
                raise UnsafePolicyError(
                    field,
                    reason=f"group {group!r} does not exist on this machine; a rule naming it cannot be loaded",
                    got=group,
                )
            out.append(gid)
        return tuple(out)

    include = policy.owner_groups_include
    return attrs.evolve(
        policy,
        owner_groups_include=include if isinstance(include, All) else resolve("owner_groups_include", include),
        owner_groups_exclude=resolve("owner_groups_exclude", policy.owner_groups_exclude),
    )
