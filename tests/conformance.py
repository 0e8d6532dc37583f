"""The external reference data, vendored in ``tests/data/conformance`` (see its READMEs for the source)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "tests" / "data" / "conformance"
ISTIO = CONFORMANCE / "istio"
SEED = CONFORMANCE / "seed" / "istio-1.4-nat.rules"


@cache
def istio_cases() -> dict[str, dict[str, Any]]:
    """Every case of ``cases.json`` with the base applied."""
    data = json.loads((ISTIO / "cases.json").read_text())
    return {name: {**data["base"], **fields} for name, fields in sorted(data["cases"].items())}


def istio_restore(name: str, family: int) -> str | None:
    path = ISTIO / "iptables" / f"{name}.v{family}.restore"
    return path.read_text() if path.exists() else None
