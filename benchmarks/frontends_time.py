"""Front-end cost: reading policy files, istio-iptables flags and pod manifests, and the istio-iptables CLI.

In-process: building the lark parser (in a fresh interpreter, where it is built on first use), parsing
a small and a large policy file (1,000 excluded CIDRs), printing a policy, reading a flag line and a
pod manifest. As a process: ``meshredirect istio-iptables --dry-run`` with Istio's injection flags,
against ``meshredirect compile`` and a bare ``python -c pass``. Each figure is the median of repeated
runs with the min and max; results go to benchmarks/results/frontends_time.json and are printed as a
Markdown table.

    .venv/bin/python benchmarks/frontends_time.py [--repeat N]
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
INJECTION_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INJECTION_FLAGS += ["-d", "15090,15021,15020", "--enable-ipv6=false"]
SMALL_FILE = """\
# the mesh
preset istio
proxy uid 1337 gid 1337
inbound capture 15006 except ports 22, 15020, 15021, 15090
outbound capture 15001 except cidr 10.96.0.0/12, 169.254.169.254 except ports 5432, 6379
dns capture 15053 servers 10.96.0.10
"""
POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations:
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.0/12"
    traffic.sidecar.istio.io/excludeOutboundPorts: "5432"
spec:
  containers:
  - name: app
    ports:
    - containerPort: 8080
"""


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3}


def big_file(cidrs: int) -> str:
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    networks = ", ".join(f"{ipaddress.IPv4Address(base + 8 * i)}/30" for i in range(cidrs))
    return f"preset istio\noutbound except cidr {networks}\n"


def in_process(repeat: int) -> list[dict[str, object]]:
    from meshredirect.frontends.istio_flags import parse_istio_flags
    from meshredirect.frontends.pod import read_pod
    from meshredirect.frontends.policy_file import format_file, format_policy, parse_policy

    code = (
        "import time; t = time.perf_counter(); from meshredirect.frontends.policy_file import _parser; _parser(); "
        "print(time.perf_counter() - t)"
    )

    def cold_parser() -> float:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return float(out)

    samples = [cold_parser() for _ in range(max(3, repeat // 3))]
    rows: list[dict[str, object]] = [
        {
            "what": "import lark + build the policy parser (fresh interpreter)",
            "median_ms": statistics.median(samples) * 1e3,
            "min_ms": min(samples) * 1e3,
            "max_ms": max(samples) * 1e3,
        }
    ]
    big = big_file(1_000)
    policy = parse_policy(SMALL_FILE)
    rows.append({"what": "parse_policy: 6-line file", **timed(lambda: parse_policy(SMALL_FILE), repeat)})
    rows.append({"what": "parse_policy: 1,000 CIDRs", **timed(lambda: parse_policy(big), repeat)})
    rows.append({"what": "format_policy: 6-line file's policy", **timed(lambda: format_policy(policy), repeat)})
    rows.append({"what": "format_file: 6-line file", **timed(lambda: format_file(SMALL_FILE), repeat)})

    def flags() -> object:
        return parse_istio_flags(INJECTION_FLAGS, {}).policy(
            proxy_uid_lookup=lambda name: None, dns_servers=(), enable_ipv6=False
        )

    rows.append({"what": "istio-iptables flags to a policy (injection line)", **timed(flags, repeat)})
    rows.append({"what": "read_pod: YAML pod", **timed(lambda: read_pod(POD), repeat)})
    return rows


def as_process(repeat: int) -> list[dict[str, object]]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "src"), str(ROOT / "backends")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    import tempfile

    exe = str(Path(sys.executable).parent / "meshredirect")
    scratch = tempfile.TemporaryDirectory()
    policy_file = Path(scratch.name) / "small.policy"
    policy_file.write_text(SMALL_FILE)
    rows = []
    for label, argv in (
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("meshredirect compile -B iptables-save (default)", [exe, "compile", "-B", "iptables-save"]),
        ("meshredirect istio-iptables --dry-run (injection flags)", [exe, "istio-iptables", "-n", *INJECTION_FLAGS]),
        (
            "meshredirect compile -B iptables-save --policy (6 lines)",
            [exe, "compile", "-B", "iptables-save", "--policy", str(policy_file)],
        ),
    ):
        rows.append(
            {"what": label, **timed(lambda a=argv: subprocess.run(a, check=True, stdout=subprocess.DEVNULL), repeat)}
        )
    scratch.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    rows = in_process(args.repeat) + as_process(max(5, args.repeat // 2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "frontends_time.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| what | median ms | min ms | max ms |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['what']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | {row['max_ms']:.2f} |")


if __name__ == "__main__":
    main()
