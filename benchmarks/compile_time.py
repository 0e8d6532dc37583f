"""Compile time: the default policy and a policy with 10,000 excluded CIDRs and 1,000 excluded ports.

Measured in-process (policy construction + compile + render, per backend) and as a CLI process
(``meshredirect compile``), against a bare ``python -c pass``. Each figure is the median of repeated
runs with the min and max; results go to benchmarks/results/compile_time.json and are printed as a
Markdown table.

    .venv/bin/python benchmarks/compile_time.py [--repeat N]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def big_policy_fields(cidrs: int, ports: int) -> dict[str, object]:
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    # /30 networks two apart, so they do not collapse into fewer, larger ones.
    networks = [f"{ipaddress.IPv4Address(base + 8 * i)}/30" for i in range(cidrs)]
    port_list = [20000 + 2 * i for i in range(ports)]
    return {"outbound_cidrs_exclude": networks, "outbound_ports_exclude": port_list}


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3}


def in_process(repeat: int) -> list[dict[str, object]]:
    from meshredirect import Policy, available_backends, compile_policy, render

    rows: list[dict[str, object]] = []
    fields = big_policy_fields(10_000, 1_000)
    for label, make in (("default policy", Policy), ("10,000 CIDRs + 1,000 ports", lambda: Policy(**fields))):  # type: ignore[arg-type]
        policy = make()
        rows.append({"what": f"{label}: Policy()", **timed(make, repeat)})
        rows.append({"what": f"{label}: compile_policy", **timed(lambda p=policy: compile_policy(p), repeat)})
        ruleset = compile_policy(policy)
        for backend in available_backends():
            if backend == "ebpf":
                continue
            try:
                render(ruleset, backend)
            except Exception as exc:  # a backend that refuses the policy is reported, not timed
                rows.append({"what": f"{label}: render {backend}", "error": str(exc)})
                continue
            rows.append(
                {"what": f"{label}: render {backend}", **timed(lambda b=backend, r=ruleset: render(r, b), repeat)}
            )
    return rows


def as_process(repeat: int) -> list[dict[str, object]]:
    """Start-up as a user sees it: bytecode compiled once and cached (an installed package has it)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "src"), str(ROOT / "backends")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    exe = str(Path(sys.executable).parent / "meshredirect")
    fields = big_policy_fields(10_000, 1_000)
    # 10,000 CIDRs do not fit on a command line: pass them in an @file, one argument per line.
    argfile = RESULTS / "big-policy.args"
    RESULTS.mkdir(parents=True, exist_ok=True)
    argfile.write_text(
        "\n".join(
            [
                "-x",
                ",".join(fields["outbound_cidrs_exclude"]),
                "-o",
                ",".join(map(str, fields["outbound_ports_exclude"])),
            ]
        )  # type: ignore[arg-type]
        + "\n"
    )
    big_args = [f"@{argfile}"]
    rows = []
    for label, argv in (
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("meshredirect --version", [exe, "--version"]),
        ("meshredirect compile (default)", [exe, "compile"]),
        ("meshredirect compile (10,000 CIDRs + 1,000 ports)", [exe, "compile", *big_args]),
    ):
        rows.append(
            {"what": label, **timed(lambda a=argv: subprocess.run(a, check=True, stdout=subprocess.DEVNULL), repeat)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    rows = in_process(args.repeat) + as_process(max(5, args.repeat // 2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile_time.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| what | median ms | min ms | max ms |\n|---|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['what']} | refused: {row['error']} | | |")
        else:
            print(f"| {row['what']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | {row['max_ms']:.2f} |")


if __name__ == "__main__":
    main()
