"""Throwaway network namespaces for real-kernel tests.

>>> reason = kernel_unavailable()
>>> reason is None or isinstance(reason, str)
True

Typical use (needs root and iproute2)::

    with NetNamespace() as ns:
        ns.run(["iptables-restore", "--noflush"], input=text)
        print(ns.run(["iptables-save"]).stdout)

A namespace is deleted when the block ends, also when it fails. Names start
with ``mr-`` and carry the process id, so parallel runs do not collide and a
leftover can be traced to its run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["NETNS_DIR", "CommandFailed", "NetNamespace", "iptables_tool", "kernel_unavailable"]

#: Where ``ip netns`` keeps the namespaces it names (a namespace's :attr:`NetNamespace.path` is in it).
NETNS_DIR: Final = Path("/var/run/netns")
_counter = itertools.count()


def kernel_unavailable() -> str | None:
    """Why real-kernel tests cannot run here, or None when they can.

    >>> reason = kernel_unavailable()
    >>> reason is None or reason.startswith("needs ")
    True
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces and netfilter rules)"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip'); install the Debian package iproute2"
    return None


def iptables_tool(tool: str, *, family: int = 4, variant: str = "nft") -> str:
    """The executable name of an iptables tool; ``tool`` is ``""`` for the main command.

    >>> iptables_tool("restore", family=6, variant="legacy")
    'ip6tables-legacy-restore'
    >>> iptables_tool("")
    'iptables-nft'
    """
    base = "ip6tables" if family == 6 else "iptables"
    suffix = f"-{tool}" if tool else ""
    return f"{base}-{variant}{suffix}"


class CommandFailed(subprocess.CalledProcessError):
    """A command in a namespace failed; the message carries its standard error.

    >>> print(CommandFailed(2, ["iptables-restore"], "", "iptables-restore: line 2 failed\\n"))
    Command '['iptables-restore']' returned non-zero exit status 2.
    iptables-restore: line 2 failed
    """

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


class NetNamespace:
    """A named network namespace created on enter and deleted on exit (also when the block fails).

    >>> ns = NetNamespace("mr-example")
    >>> ns.path, ns.created
    (PosixPath('/var/run/netns/mr-example'), False)
    >>> if kernel_unavailable() is None:
    ...     with NetNamespace() as ns:
    ...         assert ns.path.exists() and "lo" in ns.run(["ip", "-o", "link"]).stdout
    ...     assert not ns.path.exists()
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"mr-{os.getpid()}-{next(_counter)}"
        self.created = False

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def create(self) -> NetNamespace:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, text=True)
        self.created = True
        self.run(["ip", "link", "set", "lo", "up"])
        return self

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace; with ``check`` a failure raises with its stderr."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start a long-running process inside the namespace (the caller ends it)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], text=True, **kwargs)  # type: ignore[call-overload, no-any-return]

    def delete(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self.created = False

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()
