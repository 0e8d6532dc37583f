"""The agent :mod:`meshredirect.apply.nftables` starts inside a target network namespace.

It reads a JSON list of requests on standard input (``{"json": DOCUMENT}`` or
``{"cmd": TEXT}``, with ``"dry_run": true`` to have the kernel check a
transaction without committing it), runs them through one ``nftables.Nftables()`` context
created here (so in this process's namespace), stops after the first
failure, and writes a JSON list of ``{"rc", "output", "error"}``. It imports
nothing else, so that it starts fast. Exit status 3: the bindings are missing.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Final

NO_BINDINGS: Final = 3


def run_requests(requests: list[Any]) -> list[dict[str, Any]]:
    """Run requests in this process's namespace (JSON output); stops after the first failure."""
    import nftables  # type: ignore[import-not-found,import-untyped,unused-ignore]

    nft = nftables.Nftables()
    nft.set_json_output(True)
    results: list[dict[str, Any]] = []
    for request in requests:
        nft.set_dry_run(bool(request.get("dry_run", False)))
        if "json" in request:
            rc, output, error = nft.json_cmd(request["json"])
            output = output if isinstance(output, str) else json.dumps(output)
        else:
            rc, output, error = nft.cmd(request["cmd"])
        results.append({"rc": rc, "output": output, "error": error})
        if rc != 0:
            break
    return results


def main() -> int:
    try:
        import nftables  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        sys.stderr.write(f"the nftables Python bindings are not importable: {exc}\n")
        return NO_BINDINGS
    json.dump(run_requests(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
