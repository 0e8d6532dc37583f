"""How long ``check`` takes on the default policy (Istio's), with the size of its proof.

Run: ``.venv/bin/python benchmarks/check_default.py [--repeat N] [--json FILE]``.
Prints the best and median wall time of ``check(Policy())`` (compiling included,
in one process, after a warm-up run), the number of classes of connections the
proof covers and the number of paths it explored; the target is well under one
second. ``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from meshredirect.policy import Policy
from meshredirect.semantics.check import check

#: The acceptance target for the default policy.
TARGET_SECONDS = 1.0
#: The policies measured (the runner's proof section calls :func:`measure` on each).
PRESETS = {
    "default (ipv4)": Policy(),
    "default, dual stack": Policy(families="dual"),
    "TPROXY, dual stack, DNS": Policy(
        families="dual", inbound_mode="TPROXY", dns={"enabled": True, "capture_all": True}
    ),
}


def measure(policy: Policy, repeat: int) -> dict[str, float | int | bool]:
    report = check(policy)  # warm-up: imports and caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        report = check(policy)
        times.append(time.perf_counter() - start)
    return {
        "best_seconds": min(times),
        "median_seconds": statistics.median(times),
        "classes": report.classes,
        "paths": report.paths,
        "ok": report.ok,
        "repeat": repeat,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {}
    for name, policy in PRESETS.items():
        figures = measure(policy, args.repeat)
        results[name] = figures
        print(
            f"check {name:<26} best {figures['best_seconds'] * 1000:7.1f} ms  median {figures['median_seconds'] * 1000:7.1f} ms"
            f"  {figures['classes']:>7} classes  {figures['paths']:>5} paths  {'proven' if figures['ok'] else 'VIOLATED'}"
        )
    default = results["default (ipv4)"]
    verdict = "under" if default["median_seconds"] < TARGET_SECONDS else "OVER"
    print(f"default policy: {verdict} the {TARGET_SECONDS:.0f} s target")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
