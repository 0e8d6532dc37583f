"""The backend interface and the registry that finds backends through entry points.

A backend is a class with a ``name`` and one method, ``render(ruleset)``,
returning a :class:`Rendering`: one or more named artifacts (a restore file
per family, a JSON document, C source and maps...). Backends are pure: no
I/O, no environment. What they cannot express raises
:class:`~meshredirect.errors.UnsupportedError` naming the IR node.

Backends are found through the ``meshredirect.backends`` entry-point group,
the same way a third-party backend is; the core never imports one directly.

>>> names = available_backends()
>>> "iptables-save" in names and "iptables-restore" in names
True
>>> get_backend("iptables-sav")
Traceback (most recent call last):
...
meshredirect.errors.BackendNotFoundError: unknown backend 'iptables-sav'; did you mean 'iptables-save'? ...
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

import attrs

from meshredirect.errors import BackendNotFoundError
from meshredirect.ir import Family, Ruleset

__all__ = [
    "ENTRY_POINT_GROUP",
    "Artifact",
    "Backend",
    "Rendering",
    "available_backends",
    "create_backend",
    "get_backend",
]

ENTRY_POINT_GROUP: Final = "meshredirect.backends"


@attrs.frozen(kw_only=True)
class Artifact:
    """One output of a backend: a file's name, its text and what it is for."""

    name: str
    content: str
    family: Family | None = None
    #: What the artifact is, e.g. ``"iptables-restore"``, ``"nftables-json"``, ``"c"``.
    kind: str = "text"


@attrs.frozen(kw_only=True)
class Rendering:
    """Everything a backend produced for one ruleset."""

    backend: str
    artifacts: tuple[Artifact, ...]

    def artifact(self, family: Family | None = None, kind: str | None = None) -> Artifact:
        """The single artifact of a family (and kind); ``KeyError`` if there is none."""
        for artifact in self.artifacts:
            if (family is None or artifact.family is family) and (kind is None or artifact.kind == kind):
                return artifact
        raise KeyError(f"{self.backend} produced no artifact for family={family} kind={kind}")

    def text(self) -> str:
        """All artifacts as one text for people: each preceded by a comment naming it when there are several."""
        if len(self.artifacts) == 1:
            return self.artifacts[0].content
        parts = []
        for artifact in self.artifacts:
            parts.append(f"# ---- {artifact.name} ----\n{artifact.content}")
        return "\n".join(parts)


@runtime_checkable
class Backend(Protocol):
    """What every backend provides."""

    name: ClassVar[str]

    def render(self, ruleset: Ruleset) -> Rendering:
        """Lower a ruleset; raise UnsupportedError for nodes it cannot express."""
        ...


_registry: dict[str, Any] | None = None


def _entry_points() -> dict[str, Any]:
    global _registry
    if _registry is None:
        from importlib.metadata import entry_points

        _registry = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _registry


def available_backends() -> tuple[str, ...]:
    """Names of the installed backends, sorted."""
    return tuple(sorted(_entry_points()))


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``, with a did-you-mean error otherwise."""
    registry = _entry_points()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=1, cutoff=0.5)
        raise BackendNotFoundError(name, sorted(registry), close[0] if close else None)
    cls = registry[name].load()
    return cls  # type: ignore[no-any-return]


def create_backend(name: str, options: Mapping[str, object] | None = None) -> Backend:
    """Instantiate a backend by name with keyword options."""
    return get_backend(name)(**dict(options or {}))
