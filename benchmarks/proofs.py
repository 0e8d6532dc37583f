"""Proof time: ``check`` (a policy) and ``verify`` (rules read from a node) against ruleset size.

Needs the semantics engine (``meshredirect.semantics``) and, for ``verify``, the iptables reader;
until they are in this build the section says so instead of a number.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Context, Section


def proof_time(ctx: Context) -> Section:
    del ctx
    section = Section(key="proof_time", title="Proof time of check and verify")
    missing = [
        name
        for name, module in (
            ("the semantics engine", "meshredirect.semantics"),
            ("the iptables reader", "meshredirect.readers"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        section.notes.append(f"Not measured on this run: {' and '.join(missing)} not in this build.")
    return section


if __name__ == "__main__":
    print(proof_time(Context()).markdown())
