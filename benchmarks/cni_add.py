"""CNI ADD and DEL cost: the meshredirect-cni process against the floor, in fresh network namespaces.

Per pod a runtime pays one plugin process per command. Measured (wall time, median of repeated
runs with min and max, configurations interleaved run by run):

- ``VERSION``: process start-up alone (no rules);
- ``ADD``: the plugin process loading the default policy into a fresh namespace (``backend: iptables``);
- ``CHECK``: the plugin process reading the rules back and proving them equivalent to the policy;
- ``DEL``: the plugin process removing them;
- the same three with ``backend: nftables``;
- floor: ``nsenter --net`` running ``iptables-nft-restore --noflush`` of the same document, and a
  bare ``nsenter --net true``.

Needs root. Results go to benchmarks/results/cni_add.json and are printed as a Markdown table.

    .venv/bin/python benchmarks/cni_add.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLUGIN = [sys.executable, "-m", "meshredirect.cni"]
PREVIOUS = {"cniVersion": "1.0.0", "interfaces": [], "ips": []}
CONFIG = {"cniVersion": "1.0.0", "name": "bench", "type": "meshredirect-cni", "prevResult": PREVIOUS}


def run(argv: list[str], env: dict[str, str] | None = None, stdin: bytes = b"") -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed: {done.stdout!r} {done.stderr!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    from meshredirect.api import render
    from meshredirect.compiler import compile_policy
    from meshredirect.ir import Family
    from meshredirect.policy import Policy

    document = render(compile_policy(Policy()), "iptables-restore").artifact(Family.IPV4).content
    backends = {"": "iptables", " (nftables)": "nftables"}
    commands = [f"{c}{label}" for label in backends for c in ("ADD", "CHECK", "DEL")]
    samples: dict[str, list[float]] = {
        k: [] for k in ("VERSION", *commands, "floor: iptables-nft-restore", "floor: nsenter true")
    }
    base = {"PATH": os.environ["PATH"], "CNI_CONTAINERID": "bench", "CNI_IFNAME": "eth0"}
    for index in range(args.repeat):
        name = f"mr-bench-{os.getpid()}-{index}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        path = f"/var/run/netns/{name}"
        try:
            samples["VERSION"].append(run(PLUGIN, {**base, "CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}'))
            for label, backend in backends.items():
                config = json.dumps({**CONFIG, "backend": backend}).encode()
                for command in ("ADD", "CHECK", "DEL"):
                    env = {**base, "CNI_COMMAND": command, "CNI_NETNS": path}
                    samples[f"{command}{label}"].append(run(PLUGIN, env, config))
            samples["floor: iptables-nft-restore"].append(
                run(["nsenter", f"--net={path}", "iptables-nft-restore", "--noflush"], stdin=document.encode())
            )
            samples["floor: nsenter true"].append(run(["nsenter", f"--net={path}", "true"]))
        finally:
            subprocess.run(["ip", "netns", "del", name], check=False)
    rows = [
        {
            "what": what,
            "median_ms": statistics.median(values) * 1e3,
            "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3,
        }
        for what, values in samples.items()
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cni_add.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"| what ({args.repeat} runs) | median ms | min | max |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} |")


if __name__ == "__main__":
    main()
