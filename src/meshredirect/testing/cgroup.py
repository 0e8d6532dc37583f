"""Throwaway cgroup v2 directories for real-kernel tests of cgroup eBPF programs.

>>> root = cgroup2_root()
>>> root is None or root.is_dir()
True

Typical use (needs root)::

    with Cgroup() as cgroup:
        process = subprocess.Popen(cgroup.enter(["ip", "netns", "exec", ns, "python3", "app.py"]))
        ...

A process joins the cgroup by writing its own pid into ``cgroup.procs``
before it execs the command, so everything it runs (and every socket it
opens) belongs to the cgroup. ``ip netns exec`` remounts ``/sys``, so the
cgroup is joined first, then the namespace. The directory is removed on exit;
the caller ends its processes (by pid) before.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["Cgroup", "cgroup2_root"]

_counter = itertools.count()
#: How long removing the directory waits for exiting processes to leave it.
REMOVE_WAIT_SECONDS: Final = 5.0


def cgroup2_root() -> Path | None:
    """Where a cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class Cgroup:
    """A fresh cgroup v2 directory (``mr-<pid>-<n>``); a private cgroup2 mount when the machine has none."""

    def __init__(self) -> None:
        self.mountpoint: Path | None = None
        self.path = Path()

    def __enter__(self) -> Cgroup:
        root = cgroup2_root()
        if root is None:
            self.mountpoint = Path(tempfile.mkdtemp(prefix="mr-cgroup2-"))
            subprocess.run(["mount", "-t", "cgroup2", "none", str(self.mountpoint)], check=True, capture_output=True)
            root = self.mountpoint
        self.path = root / f"mr-{os.getpid()}-{next(_counter)}"
        self.path.mkdir()
        return self

    def enter(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside this cgroup."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *argv]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        deadline = time.monotonic() + REMOVE_WAIT_SECONDS
        while True:
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if self.mountpoint is not None:
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True, check=False)
            self.mountpoint.rmdir()
