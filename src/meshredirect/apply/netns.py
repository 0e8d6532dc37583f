"""The target network namespace of an action, entered by the calling thread only while the action runs.

A target is a path to a network namespace file (``/var/run/netns/NAME``, as
``ip netns add`` makes, or ``/proc/PID/ns/net`` of a running process), a bare
name (short for ``/var/run/netns/NAME``), or None for the namespace the
process is in.

Linux keeps the network namespace per thread, and a process or socket
created by a thread belongs to that thread's namespace. So
:meth:`Target.entered` moves only the calling thread (``setns(2)``) and moves
it back when the block ends: the kernel tools started inside the block and
the sockets opened there live in the target, and nothing else in the
process is affected. Problems are reported as
:class:`~meshredirect.errors.EnvironmentProblem` naming the path and what to do.

>>> Target.of(None).describe()
'the current network namespace'
>>> str(Target.of("pod-1").path)
'/var/run/netns/pod-1'
>>> Target.of("").describe()
Traceback (most recent call last):
...
meshredirect.errors.EnvironmentProblem: network namespace: expected a path such as /var/run/netns/NAME or /proc/PID/ns/net, or a name, got ''
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import attrs

from meshredirect.errors import EnvironmentProblem

__all__ = ["NETNS_DIR", "TOOL_PACKAGES", "Target", "require_nftables_bindings", "require_root", "require_tool"]

NETNS_DIR: Final = Path("/var/run/netns")
#: setns(2) namespace type of a network namespace.
CLONE_NEWNET: Final = 0x40000000
#: The namespace a thread is in now (a thread may differ from its process).
_THREAD_NETNS: Final = "/proc/thread-self/ns/net"
#: How long one kernel tool may take before it counts as hung.
TOOL_TIMEOUT: Final = 60.0

#: Which Debian package provides each tool the apply layer runs.
TOOL_PACKAGES: Final[dict[str, str]] = {
    "ip": "iproute2",
    "nft": "nftables",
    **{
        f"{base}-{variant}{suffix}": "iptables"
        for base in ("iptables", "ip6tables")
        for variant in ("nft", "legacy")
        for suffix in ("", "-save", "-restore")
    },
}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        if code == errno.EINVAL:
            raise EnvironmentProblem(f"{what} is not a network namespace")
        if code == errno.EPERM:
            raise EnvironmentProblem(
                f"not privileged to enter {what} (setns needs CAP_SYS_ADMIN)", remedy="run as root"
            )
        raise EnvironmentProblem(f"cannot enter {what}: {os.strerror(code)}")


def require_root(action: str) -> None:
    """Refuse early, with the reason, when the process cannot change netfilter rules."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            f"{action} needs root: netfilter rules and routing can only be read and changed with "
            f"CAP_NET_ADMIN (running as uid {os.geteuid()})",
            remedy="run as root, e.g. with sudo, or in a privileged init container",
        )


def require_tool(name: str) -> str:
    """The path of a kernel tool, or an error that says which Debian package provides it."""
    path = shutil.which(name)
    if path is None:
        package = TOOL_PACKAGES.get(name)
        raise EnvironmentProblem(
            f"{name} is not installed", remedy=f"install the Debian package {package}" if package else None
        )
    return path


def require_nftables_bindings() -> None:
    """Refuse, saying what to install, when the libnftables Python bindings cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("nftables") is None:
        raise EnvironmentProblem(
            "the libnftables Python bindings (module nftables) are not installed",
            remedy="install the Debian package python3-nftables (it is not on PyPI); a virtual environment "
            "reaches it through a .pth file, as ./dev setup writes one",
        )


@attrs.frozen
class Target:
    """A network namespace to act in; ``path`` None means the current one."""

    path: Path | None = None

    @classmethod
    def of(cls, netns: str | os.PathLike[str] | Target | None) -> Target:
        """A target from what a user gave: a path, a name under /var/run/netns, or None."""
        if isinstance(netns, Target):
            return netns
        if netns is None:
            return cls(None)
        text = os.fspath(netns)
        if not text or text in (".", ".."):
            raise EnvironmentProblem(
                "network namespace: expected a path such as /var/run/netns/NAME or /proc/PID/ns/net, "
                f"or a name, got {text!r}"
            )
        return cls(Path(text) if "/" in text else NETNS_DIR / text)

    def describe(self) -> str:
        return "the current network namespace" if self.path is None else f"network namespace {self.path}"

    def check(self) -> None:
        """Raise when the namespace does not exist or is not a network namespace."""
        with self.entered():
            pass

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into the namespace for the block (no-op for the current one)."""
        if self.path is None:
            yield
            return
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EnvironmentProblem(
                f"network namespace {self.path} does not exist",
                remedy="create it (ip netns add NAME) or give /proc/PID/ns/net of a running process",
            ) from None
        except PermissionError:
            raise EnvironmentProblem(f"not privileged to open {self.path}", remedy="run as root") from None
        except OSError as exc:
            raise EnvironmentProblem(f"cannot open network namespace {self.path}: {exc.strerror}") from None
        try:
            home = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target, str(self.path))
                try:
                    yield
                finally:
                    _setns(home, "the original network namespace")
            finally:
                os.close(home)
        finally:
            os.close(target)

    def run(
        self, argv: Sequence[str], input: str | None = None, *, timeout: float = TOOL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a kernel tool inside the namespace; a missing tool is reported with its package."""
        executable = require_tool(argv[0])
        with self.entered():
            try:
                return subprocess.run(
                    [executable, *argv[1:]],
                    input=input,
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                raise EnvironmentProblem(f"{' '.join(argv)} did not finish within {timeout:g} s") from None
