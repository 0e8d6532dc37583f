"""Time from policy to rules in a fresh network namespace: the apply layer against the floor.

Each round creates fresh namespaces (one per configuration) and runs, interleaved:

- in-process: ``meshredirect.apply.apply(policy, netns=PATH)`` (variant detected, both families
  looked at), then the same call again (already up to date), for the default policy and for a
  dual-stack TPROXY policy (four tables, two families, policy routing);
- as a process: the installed ``meshredirect apply --netns PATH`` (cached bytecode);
- floor: the same documents loaded with ``iptables-nft-restore --noflush`` (and, for TPROXY, the
  four ``ip`` routing commands) and nothing else, started the same way (setns from this process),
  and a bare ``true`` started in the namespace;
- ``apply(policy, backend="nftables")`` in-process
  against ``nft -j -f`` of the same JSON document (plus the ``ip`` commands) alone.

Wall times; medians of ``--repeat`` rounds with min and max. Needs root. Results go to
benchmarks/results/apply_time.json and are printed as a Markdown table.

    .venv/bin/python benchmarks/apply_time.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLI = str(Path(sys.executable).with_name("meshredirect"))


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    from meshredirect.api import render
    from meshredirect.apply.actions import apply
    from meshredirect.apply.netns import Target
    from meshredirect.apply.routing import routes_for
    from meshredirect.backend import available_backends, create_backend
    from meshredirect.compiler import compile_policy
    from meshredirect.policy import Policy

    # Start-up as a user sees it: bytecode compiled once and cached (an installed package has it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    compileall = [sys.executable, "-m", "compileall", "-q", str(ROOT / "src"), str(ROOT / "backends")]
    subprocess.run(compileall, check=True, env=env, stdout=subprocess.DEVNULL)
    policies = {"default": Policy(), "TPROXY dual-stack": Policy(families="both", inbound_mode="TPROXY")}
    documents = {
        name: [a.content for a in render(compile_policy(p), "iptables-restore").artifacts]
        for name, p in policies.items()
    }
    routing = {name: [c.rule_argv("add") for c in routes_for(p)] + [c.route_argv("add") for c in routes_for(p)]
               for name, p in policies.items()}  # fmt: skip
    nft_documents: dict[str, str] = {}
    if "nftables-json" in available_backends():
        layout = create_backend("nftables-json")
        for name, policy in policies.items():
            per_family = layout.commands(compile_policy(policy)).values()  # type: ignore[attr-defined]
            nft_documents[name] = json.dumps({"nftables": [c for commands in per_family for c in commands]})
    samples: dict[str, list[float]] = {}

    def record(what: str, seconds: float) -> None:
        samples.setdefault(what, []).append(seconds)

    def fresh() -> tuple[str, Target]:
        name = f"mr-bench-{os.getpid()}-{len(created)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)  # as in a pod
        return name, Target.of(name)

    def run(target: Target, argv: list[str], text: str | None = None) -> None:
        done = target.run(argv, text)
        if done.returncode != 0:
            raise SystemExit(f"{argv} failed: {done.stderr}")

    def one_round(name: str, policy: Policy) -> None:
        _, target = fresh()
        record(f"{name}: apply, in-process", timed(lambda: apply(policy, netns=target)))
        record(f"{name}: apply again (up to date), in-process", timed(lambda: apply(policy, netns=target)))
        ns_name, _ = fresh()
        argv = [CLI, "apply", "--netns", ns_name]
        if name != "default":
            argv += ["--family", "both", "--inbound-mode", "TPROXY"]
        process = timed(lambda: subprocess.run(argv, check=True, capture_output=True, env=env))
        record(f"{name}: meshredirect apply, process", process)
        _, floor_target = fresh()

        def floor() -> None:
            for index, document in enumerate(documents[name]):
                tool = "ip6tables-nft-restore" if index else "iptables-nft-restore"
                run(floor_target, [tool, "--noflush"], document)
            for command in routing[name]:
                run(floor_target, list(command))

        record(f"{name}: floor (iptables-nft-restore{' + ip' if routing[name] else ''} only)", timed(floor))
        if name not in nft_documents:
            return
        _, nft_target = fresh()
        record(
            f"{name}: apply --backend nftables, in-process",
            timed(lambda: apply(policy, backend="nftables", netns=nft_target)),
        )
        _, nft_floor_target = fresh()

        def nft_floor() -> None:
            run(nft_floor_target, ["nft", "-j", "-f", "-"], nft_documents[name])
            for command in routing[name]:
                run(nft_floor_target, list(command))

        record(f"{name}: floor (nft -j -f{' + ip' if routing[name] else ''} only)", timed(nft_floor))

    created: list[str] = []
    try:
        for _ in range(args.repeat):
            for name, policy in policies.items():
                one_round(name, policy)
            _, target = fresh()
            record("a process in the namespace: true", timed(lambda: run(target, ["true"])))  # noqa: B023
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False)
    rows = [
        {
            "what": what,
            "median_ms": statistics.median(values) * 1e3,
            "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3,
            "runs": len(values),
        }
        for what, values in samples.items()
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "apply_time.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| what | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['what']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | {row['max_ms']:.2f} |")


if __name__ == "__main__":
    main()
