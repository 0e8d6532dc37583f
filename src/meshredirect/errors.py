"""Every error meshredirect raises on purpose.

All of them derive from one root, so a caller can catch everything the
library means to report with a single ``except``::

    MeshRedirectError
    ├── PolicyError            a field holds an invalid value
    │   └── UnsafePolicyError  valid values that together are refused (a loop, a contradiction)
    ├── UnsupportedError       a backend cannot express an IR node (fail closed)
    ├── BackendNotFoundError   no backend of that name is installed
    ├── SourceError            text that cannot be read (policy files, rule files), with line:col
    └── EnvironmentProblem     the machine lacks a tool, a privilege or a namespace

Every message says what was expected and what was given.

>>> from meshredirect.errors import PolicyError
>>> print(PolicyError("outbound_port", expected="a port number 1-65535", got=0))
outbound_port: expected a port number 1-65535, got 0
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BackendNotFoundError",
    "EnvironmentProblem",
    "MeshRedirectError",
    "PolicyError",
    "SourceError",
    "SourcePosition",
    "UnsafePolicyError",
    "UnsupportedError",
]


class MeshRedirectError(Exception):
    """Root of every error meshredirect raises on purpose."""


class PolicyError(MeshRedirectError, ValueError):
    """A policy field holds a value outside its domain."""

    def __init__(self, field: str, *, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{field}: expected {expected}, got {_show(got)}")


class UnsafePolicyError(PolicyError):
    """Values that are each valid but are refused together, with the reason."""

    def __init__(self, field: str, *, reason: str, got: object) -> None:
        self.field = field
        self.expected = reason
        self.got = got
        self.reason = reason
        ValueError.__init__(self, f"{field}: refused: {reason} (given: {_show(got)})")


class UnsupportedError(MeshRedirectError):
    """A backend met an IR node it cannot express. It never drops one silently."""

    def __init__(self, backend: str, node: object, reason: str) -> None:
        self.backend = backend
        self.node = node
        self.reason = reason
        super().__init__(f"backend {backend!r} cannot express {type(node).__name__}: {reason} (node: {node!r})")


class BackendNotFoundError(MeshRedirectError, LookupError):
    """No backend is registered under the requested name."""

    def __init__(self, name: str, available: Sequence[str], suggestion: str | None) -> None:
        self.name = name
        self.available = tuple(available)
        self.suggestion = suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        listing = ", ".join(self.available) or "(none installed)"
        super().__init__(f"unknown backend {name!r}{hint} (available: {listing})")


class SourcePosition:
    """Where in a text a problem sits: file name, 1-based line and column, and the line itself."""

    __slots__ = ("column", "line", "path", "text")

    def __init__(self, path: str, line: int, column: int, text: str) -> None:
        self.path = path
        self.line = line
        self.column = column
        self.text = text

    def __repr__(self) -> str:
        return f"SourcePosition({self.path!r}, {self.line}, {self.column})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SourcePosition):
            return NotImplemented
        return (self.path, self.line, self.column) == (other.path, other.line, other.column)

    def __hash__(self) -> int:
        return hash((self.path, self.line, self.column))

    def caret(self) -> str:
        """The offending line with a caret under the column."""
        pad = "".join("\t" if ch == "\t" else " " for ch in self.text[: max(self.column - 1, 0)])
        return f"    {self.text}\n    {pad}^"


class SourceError(MeshRedirectError, ValueError):
    """Text (a policy file, a rule file) that cannot be read, located by line and column."""

    def __init__(self, position: SourcePosition, message: str) -> None:
        self.position = position
        self.message = message
        super().__init__(f"{position.path}:{position.line}:{position.column}: {message}\n{position.caret()}")


class EnvironmentProblem(MeshRedirectError):
    """The machine cannot do what was asked: a missing tool or privilege, a namespace that does not exist."""

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        self.message = message
        self.remedy = remedy
        super().__init__(message + (f" ({remedy})" if remedy else ""))


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    return str(value)
