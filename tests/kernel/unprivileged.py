"""Run the CLI in a forked child that dropped to an unprivileged uid (optionally inside a namespace)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from meshredirect.apply.netns import Target
from meshredirect.cli import main


def run_cli_as(uid: int, argv: Sequence[str], *, inside: Target | None = None) -> tuple[int, str]:
    """Exit status and output (stdout and stderr together) of ``meshredirect ARGV`` run as ``uid``.

    Modules the command needs are imported by the caller first: the child may not read the
    interpreter's files once it has dropped its privileges.
    """
    read, write = os.pipe()
    # The child must fork inside the block: leaving it would move the child back out of the namespace.
    with inside.entered() if inside is not None else contextlib.nullcontext():
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            _child(uid, argv, read, write)
    os.close(write)
    with os.fdopen(read) as pipe:
        output = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), output


def _child(uid: int, argv: Sequence[str], read: int, write: int) -> None:  # pragma: no cover
    status = 99
    try:
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        sys.stdout = os.fdopen(1, "w")
        sys.stderr = sys.stdout
        status = main(list(argv))
        sys.stdout.flush()
    finally:
        os._exit(status)
