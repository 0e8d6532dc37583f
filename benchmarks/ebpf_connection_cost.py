"""What a new outbound TCP connection costs through the eBPF program, iptables (nft and legacy), nftables and no rules.

Each configuration lives in its own network namespace (eth0 10.0.0.5/24 on a veth pair) with a sink
on 127.0.0.1:15001 that accepts and resets. A C client (benchmarks/connbench.c, built with gcc or clang) opens
N connections to 10.0.0.9:8080 as uid 1000, which the rules redirect to the sink; "no rules" connects
to the sink directly. "exempt" rows connect to the sink directly as uid 1337: the rules or programs
run but change nothing. The eBPF rows run the client in a fresh cgroup v2 with the program attached;
the iptables rows load the compiled default policy with ``iptables-restore``; the nftables rows load
it through the apply layer. Rows with 1,000 CIDRs add 1,000
excluded /30 networks to the policy (iptables: one rule each; nftables: one set; eBPF: one LPM trie).

Configurations are interleaved in short slices within one run; a slice's figure is its fastest of 4
batches (a shared machine only adds time); each figure is the median over the slices (with min and
max) of nanoseconds per connection, and its ratio to the "no rules" slice of the same round; on a busy machine the ratio of the minimums (the least disturbed slices) is the
steadier figure. Needs root, clang (or gcc), bpftool, iproute2, iptables. Results go to
benchmarks/results/ebpf_connection_cost.json and are printed as a Markdown table.

    .venv/bin/python benchmarks/ebpf_connection_cost.py [--rounds 15] [--connections 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SINK_PORT = 15001
APP_PORT = 8080
REMOTE = "10.0.0.9"
POD = "10.0.0.5"
APP_UID = 1000
PROXY_UID = 1337


def excluded_cidrs(count: int) -> list[str]:
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    return [f"{ipaddress.IPv4Address(base + 8 * i)}/30" for i in range(count)]


class Config:
    """One namespace with its rules; the client runs there behind ``prefix`` (ip netns exec, the cgroup)."""

    def __init__(self, name: str, dst: str, uid: int, *, backend: str = "none", cidrs: int = 0) -> None:
        self.name, self.dst, self.uid = name, dst, uid
        self.port = SINK_PORT if dst == "127.0.0.1" else APP_PORT
        self.prefix: list[str] = []
        self.retries = 0
        #: iptables-nft, iptables-legacy, nftables, ebpf or none; the namespace it runs in.
        self.backend = backend
        self.cidrs = cidrs
        self.ns: Any = None
        #: Connections made through the rules' redirect (warm-up included), for the counter checks.
        self.connections = 0

    @property
    def redirected(self) -> bool:
        return self.dst == REMOTE


@contextlib.contextmanager
def namespace(stack: contextlib.ExitStack, binary: Path) -> Iterator[Any]:
    from meshredirect.testing.netns import NetNamespace

    ns = stack.enter_context(NetNamespace())
    ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
    ns.run(["ip", "addr", "add", f"{POD}/24", "dev", "eth0"])
    ns.run(["ip", "link", "set", "eth0", "up"])
    ns.run(["ip", "link", "set", "eth1", "up"])
    # Every ephemeral port: conntrack keeps a reset connection 10 s, and a port reused within that
    # time can meet the old entry.
    ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"])
    sink = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, str(binary), "sink", str(SINK_PORT)], stdout=subprocess.PIPE, text=True
    )
    stack.callback(lambda: (sink.kill(), sink.wait()))
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    yield ns


def build(work: Path) -> Path:
    binary = work / "connbench"
    import shutil

    compiler = shutil.which("gcc") or shutil.which("cc") or "clang"  # a machine may have clang only
    subprocess.run([compiler, "-O2", "-o", str(binary), str(ROOT / "benchmarks" / "connbench.c")], check=True)
    return binary


def configurations(
    stack: contextlib.ExitStack,
    work: Path,
    binary: Path,
    *,
    cidr_counts: Sequence[int] = (0, 1000),
    exempt_counts: Sequence[int] = (0,),
) -> list[Config]:
    """ "no rules", then for each backend and each of ``cidr_counts``: a namespace with the default policy
    plus that many excluded CIDRs, with a "redirected" row (an app's connection) and, for ``exempt_counts``,
    an "exempt" row (the proxy's own connection, which the rules leave alone). Everything is undone by
    ``stack``."""
    from meshredirect.apply.ebpf import BpfFilesystem, load
    from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner
    from meshredirect.compiler import compile_policy
    from meshredirect.policy import Policy
    from meshredirect.testing.cgroup import Cgroup
    from meshredirect_ebpf import EbpfBackend, Environment

    configs: list[Config] = []
    policies = {count: Policy(outbound_cidrs_exclude=excluded_cidrs(count)) for count in cidr_counts}

    ns = stack.enter_context(namespace(stack, binary))
    config = Config("no rules", "127.0.0.1", APP_UID)
    config.prefix = ["ip", "netns", "exec", ns.name]
    config.ns = ns
    configs.append(config)

    def rows(backend: str, count: int, ns: Any, prefix: list[str]) -> None:
        for row, dst, uid in (("redirected", REMOTE, APP_UID), ("exempt", "127.0.0.1", PROXY_UID)):
            if row == "exempt" and count not in exempt_counts:
                continue
            config = Config(f"{backend}, {count:,} CIDRs: {row}", dst, uid, backend=backend, cidrs=count)
            config.prefix = prefix
            config.ns = ns
            configs.append(config)

    for variant in ("nft", "legacy"):
        for count, policy in policies.items():
            ns = stack.enter_context(namespace(stack, binary))
            IptablesApplier(NamespaceRunner(ns.name), variant=variant).apply(compile_policy(policy))
            rows(f"iptables-{variant}", count, ns, ["ip", "netns", "exec", ns.name])

    from meshredirect.apply import apply

    for count, policy in policies.items():
        ns = stack.enter_context(namespace(stack, binary))
        apply(compile_policy(policy), backend="nftables", netns=ns.name)
        rows("nftables", count, ns, ["ip", "netns", "exec", ns.name])

    bpffs = stack.enter_context(BpfFilesystem())
    for index, (count, policy) in enumerate(policies.items()):
        ns = stack.enter_context(namespace(stack, binary))
        cgroup = stack.enter_context(Cgroup())
        rendering = EbpfBackend(environment=Environment.pod(POD), local_only=True).render(compile_policy(policy))
        loaded = load(rendering, work / f"ebpf{index}", bpffs.path / f"mr{index}")
        stack.callback(loaded.remove)
        loaded.attach(cgroup.path)
        stack.callback(loaded.detach, cgroup.path)
        rows("ebpf", count, ns, cgroup.enter(["ip", "netns", "exec", ns.name]))
    return configs


def measure(config: Config, binary: Path, connections: int) -> float:
    """Nanoseconds per connection of the fastest of the client's batches of ``connections`` in all."""
    argv = [*config.prefix, str(binary), "connect", config.dst, str(config.port), str(connections), str(config.uid)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{config.name}: {result.stderr.strip()}")
    nanoseconds, retries = result.stdout.split()
    config.retries += int(retries)
    config.connections += connections
    return float(nanoseconds)


def unreachable_without_rules(config: Config, binary: Path) -> str:
    """The error a connection to REMOTE meets where no rule redirects it (``config``: the "no rules" one).

    The destination is on the pod's subnet but nothing answers for it, so a connection only succeeds
    when the rules (or the program) send it to the sink: every measured connection crossed them.
    """
    argv = [*config.prefix, str(binary), "connect", REMOTE, str(APP_PORT), "4", str(APP_UID)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode == 0:
        raise RuntimeError(f"{REMOTE}:{APP_PORT} answered without rules: the benchmark would not measure them")
    return result.stderr.strip()


def summarise(samples: dict[str, list[float]]) -> list[dict[str, Any]]:
    baseline = samples["no rules"]
    rows = []
    for name, values in samples.items():
        ratios = [base / value for base, value in zip(baseline, values, strict=True)]
        rows.append(
            {
                "configuration": name,
                "median_us": statistics.median(values) / 1e3,
                "min_us": min(values) / 1e3,
                "max_us": max(values) / 1e3,
                "rate_vs_no_rules": statistics.median(ratios),
                "rate_min": min(ratios),
                "rate_max": max(ratios),
                "rate_of_minimums": min(baseline) / min(values),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | us per connection (median) | min | max | rate vs no rules (median) | min | max "
        "| rate of the minimums |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['median_us']:.2f} | {r['min_us']:.2f} | {r['max_us']:.2f} | "
            f"{r['rate_vs_no_rules']:.2f} | {r['rate_min']:.2f} | {r['rate_max']:.2f} | {r['rate_of_minimums']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=3000)
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="mr-connbench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        binary = build(work)
        configs = configurations(stack, work, binary)
        for config in configs:  # warm up: caches, conntrack tables, lazily built kernel state
            measure(config, binary, min(args.connections, 500))
        for _ in range(args.rounds):
            for config in configs:
                samples.setdefault(config.name, []).append(measure(config, binary, args.connections))
    rows = summarise(samples)
    for row, config in zip(rows, configs, strict=True):
        row["connects_reset_and_retried"] = config.retries
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"rounds": args.rounds, "connections": args.connections, "rows": rows, "samples_ns": samples}
    (RESULTS / "ebpf_connection_cost.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
