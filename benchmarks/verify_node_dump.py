"""verify on a node dump: Istio's chains beside thousands of kube-proxy and Docker rules.

Target: ``meshredirect verify`` on a realistic node dump finishes in under 2 s. The dump
(``meshredirect.testing.node_dump``) holds Istio's production nat chains, 600 kube-proxy services
(cluster IPs, endpoints spread with ``-m statistic``, node ports, masquerade marks) and 40 Docker port
mappings: about 5,000 rules in three tables. ``-m statistic`` is a choice point (the proof covers every
outcome) and ``MASQUERADE --random-fully`` a known NAT flag, so the dump can be proven; runs of rules keyed
by a destination, port or source (KUBE-SERVICES, KUBE-NODEPORTS, Docker's rules) are dispatched in one step;
source NAT and mark rewrites that nothing reads split nothing (docs/semantics.md, "Why exhaustive enumeration
is a proof"); socketless connections share paths with the sockets of other ids; a choice among a service's
alike endpoints is explored once; returns a few rules apart share a path; rules alike but for their
addresses and ports (services, node ports, health checks, Docker containers: mirrors of the ruleset) are
explored once, each path standing for its images. The reader splits lines
without lark when every line has a plain shape (lark explains the errors).
Measured: the whole command as a user runs it (a process: start-up, reading, finding the mesh, the proofs,
printing), and in-process its parts, for the full dump and for smaller ones (fewer services), to show how
each part grows; the proofs as wall-clock and CPU time (this machine is shared: CPU time drifts less).
Each figure is the median of the runs made (min-max); sizes from 100 services run once, the command five times.

    .venv/bin/python benchmarks/verify_node_dump.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_SECONDS = 2.0
#: (kube-proxy services, Docker containers): the last is the node dump the target is about.
SIZES = ((0, 0), (20, 10), (100, 40), (600, 40))


def timed(function, *args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(services: int, containers: int, repeat: int, *, prove: bool = True) -> dict[str, object]:
    from meshredirect.node import detect_mesh
    from meshredirect.readers.iptables import read_iptables
    from meshredirect.testing.node_dump import node_dump

    text = node_dump(services=services, containers=containers)
    reads, detects, checks, cpus = [], [], [], []
    for _ in range(repeat):
        ruleset, seconds = timed(read_iptables, text)
        reads.append(seconds)
        _, seconds = timed(detect_mesh, ruleset)
        detects.append(seconds)
        if prove:
            from meshredirect.node import verify_rules

            cpu = time.process_time()
            verification, seconds = timed(verify_rules, ruleset)
            cpus.append(time.process_time() - cpu)
            checks.append(seconds)
    row: dict[str, object] = {
        "services": services,
        "containers": containers,
        "rules": sum(1 for _ in ruleset.rules()),
        "read": reads,
        "detect": detects,
        "verify": checks,
        "verify_cpu": cpus,
    }
    if not prove:
        return row
    report = verification.report
    return row | {
        "classes": report.classes,
        "paths": report.paths,
        "violations": len(report.violations),
        "violated": sorted({v.property.name for v in report.violations}),
    }


def cli_run(services: int, containers: int, repeat: int) -> tuple[list[float], int]:
    from meshredirect.testing.node_dump import node_dump

    times = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="mr-bench-") as folder:
        path = Path(folder) / "node.rules"
        path.write_text(node_dump(services=services, containers=containers))
        for _ in range(repeat):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "meshredirect", "verify", str(path)], capture_output=True, text=True, check=False
            )
            times.append(time.perf_counter() - start)
            status = done.returncode
            if status not in (0, 1):
                raise RuntimeError(f"meshredirect verify exited {status}: {done.stderr.strip()}")
    return times, status


def show(values: list[float]) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small sizes only, once each")
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    rows = []
    big = sizes[-1]
    for services, containers in sizes:
        repeat = 1 if args.quick or services >= 100 else 3
        rows.append(measure(services, containers, repeat))
    cli_times, status = cli_run(*big, repeat=1 if args.quick else 5)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verify_node_dump.json").write_text(
        json.dumps({"sizes": rows, "cli": {"size": big, "seconds": cli_times, "status": status}}, indent=1) + "\n"
    )
    print(
        "| services | rules | read (s) | find mesh (s) | proofs (s) | proofs, CPU (s) | classes | paths | violations |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        violated = ", ".join(row["violated"]) or "none"  # type: ignore[arg-type]
        print(
            f"| {row['services']} | {row['rules']} | {show(row['read'])} | {show(row['detect'])} | "  # type: ignore[arg-type]
            f"{show(row['verify'])} | {show(row['verify_cpu'])} | {row['classes']:,} | {row['paths']:,} | "  # type: ignore[arg-type]
            f"{row['violations']} ({violated}) |"
        )
    rules = rows[-1]["rules"]
    met = "met" if statistics.median(cli_times) < TARGET_SECONDS else "NOT met"  # (the median, not the best run)
    print()
    print(
        f"`meshredirect verify` on the {rules}-rule node dump ({big[0]} services): {show(cli_times)} s "
        f"(exit {status}); target < {TARGET_SECONDS:.0f} s: **{met}**."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
