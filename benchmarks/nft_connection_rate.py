"""New-connection rate through our nft rules (sets) against the iptables lowering (one rule per CIDR).

Each configuration lives in its own network namespace, set up once: a veth
pair routes 10.200.0.0/24 out of the namespace, a small C server accepts on
the proxy's outbound port 15001, and the rules are loaded. A small C client
opens TCP connections to 10.200.0.1:80 (not excluded, so every exclusion is
tested and the connection is REDIRECTed to 15001) and closes them with a
reset (no TIME_WAIT). Configurations:

- ``no rules``: no netfilter rules at all; the client connects to 127.0.0.1:15001.
- ``nft, no exclusions``: the default policy through the nftables-json backend (the baseline).
- ``nft, N excluded CIDRs``: the same plus N excluded CIDRs (one interval set) and 100 excluded ports.
- ``iptables-nft, no exclusions`` and ``iptables-nft, N excluded CIDRs``: the iptables-restore
  backend loaded with iptables-nft (one rule per CIDR).
- ``iptables-legacy, N excluded CIDRs``: the same loaded with iptables-legacy.

The configurations are interleaved in short slices, round after round (in a
shuffled order), and each
slice's rate is divided by the baseline's rate of the same round; the report gives
the median, min and max of those ratios. After the run the rule counters must show
that the nat chain really saw every connection (a retransmitted SYN may count twice) (a nat table that only RETURNs is
never evaluated, so the counters are checked, not assumed).

    .venv/bin/python benchmarks/nft_connection_rate.py [--cidrs 1000] [--rounds 9] [--slice 3000]

Needs root. Results go to benchmarks/results/nft_connection_rate_N.json and are
printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTBOUND_PORT = 15001
TARGET = "10.200.0.1"

CLIENT_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_in to = {0};
    to.sin_family = AF_INET;
    to.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &to.sin_addr);
    long count = atol(argv[3]), failed = 0;
    struct linger reset = {1, 0};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < count; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&to, sizeof to) != 0) failed++;
        setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(s);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld %ld\n", (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec), failed);
    return 0;
}
"""

SERVER_C = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in at = {0};
    at.sin_family = AF_INET;
    at.sin_port = htons(atoi(argv[1]));
    if (bind(l, (struct sockaddr *)&at, sizeof at) || listen(l, 4096)) return 1;
    for (;;) { int c = accept(l, NULL, NULL); if (c >= 0) close(c); }
}
"""


def build(workdir: Path) -> tuple[str, str]:
    for name, source in (("client", CLIENT_C), ("server", SERVER_C)):
        (workdir / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-O2", "-o", str(workdir / name), str(workdir / f"{name}.c")], check=True)
    return str(workdir / "client"), str(workdir / "server")


def excluded_cidrs(count: int) -> list[str]:
    """/24 networks two apart in 11.0.0.0/8 (they never collapse), none holding the target."""
    return [str(ipaddress.ip_network((0x0B000000 + (i << 9), 24))) for i in range(count)]


class Config:
    def __init__(self, label: str, backend: str | None, cidrs: int, variant: str = "nft") -> None:
        self.label = label
        self.backend = backend
        self.cidrs = cidrs
        self.variant = variant
        self.ns = ""
        self.server: subprocess.Popen[bytes] | None = None
        self.connections = 0

    @property
    def destination(self) -> tuple[str, int]:
        return ("127.0.0.1", OUTBOUND_PORT) if self.backend is None else (TARGET, 80)

    def policy(self) -> object:
        from meshredirect.policy import Policy

        if not self.cidrs:
            return Policy()
        return Policy(
            outbound_cidrs_exclude=excluded_cidrs(self.cidrs), outbound_ports_exclude=list(range(20000, 20200, 2))
        )

    def setup(self, index: int, server: str) -> None:
        from meshredirect.api import render
        from meshredirect.apply.nftables import NftablesApplier
        from meshredirect.compiler import compile_policy

        self.ns = f"mr-bench-{index}"
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        for command in (
            "ip link set lo up",
            "ip link add v0 type veth peer name v1",
            "ip link set v0 up",
            "ip link set v1 up",
            "ip addr add 10.200.0.2/24 dev v0",
            "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_close=1",
        ):
            subprocess.run(["ip", "netns", "exec", self.ns, *command.split()], check=False, capture_output=True)
        if self.backend == "nftables-json":
            NftablesApplier(self.ns, counters=True).apply(compile_policy(self.policy()))  # type: ignore[arg-type]
        elif self.backend == "iptables":
            document = render(compile_policy(self.policy()), "iptables-restore").artifacts[0].content  # type: ignore[arg-type]
            subprocess.run(
                ["ip", "netns", "exec", self.ns, f"iptables-{self.variant}-restore", "--noflush"],
                input=document.encode(),
                check=True,
            )
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, server, str(OUTBOUND_PORT)])
        time.sleep(0.2)

    def run_slice(self, client: str, count: int) -> float:
        host, port = self.destination
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, client, host, str(port), str(count)], capture_output=True, check=True
        ).stdout.split()
        elapsed_ns, failed = int(out[0]), int(out[1])
        if failed:
            raise SystemExit(f"{self.label}: {failed} of {count} connections failed")
        self.connections += count
        return count / (elapsed_ns / 1e9)

    def redirected(self) -> int | None:
        """How many connections the REDIRECT rule saw, from the rule counters (None: no rules)."""
        if self.backend == "nftables-json":
            listing = json.loads(
                subprocess.run(
                    ["ip", "netns", "exec", self.ns, "nft", "-j", "list", "ruleset"], capture_output=True, check=True
                ).stdout
            )
            for item in listing["nftables"]:
                rule = item.get("rule")
                if rule and rule["chain"] == "nat-ISTIO_REDIRECT":
                    return next(s["counter"]["packets"] for s in rule["expr"] if "counter" in s)
        if self.backend == "iptables":
            text = subprocess.run(
                ["ip", "netns", "exec", self.ns, f"iptables-{self.variant}-save", "-c", "-t", "nat"],
                capture_output=True,
                check=True,
            ).stdout.decode()
            found = re.search(r"\[(\d+):\d+\] -A ISTIO_REDIRECT .*REDIRECT", text)
            return int(found.group(1)) if found else 0
        return None

    def teardown(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cidrs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--slice", type=int, default=3000, help="connections per configuration per round")
    args = parser.parse_args()
    n = args.cidrs
    configs = [
        Config("nft, no exclusions (baseline)", "nftables-json", 0),
        Config("no rules", None, 0),
        Config(f"nft, {n:,} excluded CIDRs (set)", "nftables-json", n),
        Config("iptables-nft, no exclusions", "iptables", 0),
        Config(f"iptables-nft, {n:,} excluded CIDRs (rule each)", "iptables", n),
        Config(f"iptables-legacy, {n:,} excluded CIDRs (rule each)", "iptables", n, variant="legacy"),
    ]
    rates: dict[str, list[float]] = {c.label: [] for c in configs}
    ratios: dict[str, list[float]] = {c.label: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        client, server = build(Path(tmp))
        try:
            for index, config in enumerate(configs):
                config.setup(index, server)
            for config in configs:
                config.run_slice(client, 500)  # warm up
            shuffle = random.Random(1)
            for _ in range(args.rounds):
                order = configs[:]
                shuffle.shuffle(order)  # no configuration always runs first (or after the same one)
                this_round = {c.label: c.run_slice(client, args.slice) for c in order}
                base = this_round[configs[0].label]
                for label, rate in this_round.items():
                    rates[label].append(rate)
                    ratios[label].append(rate / base)
            checks = {c.label: (c.redirected(), c.connections) for c in configs}
        finally:
            for config in configs:
                config.teardown()
    rows = []
    for config in configs:
        seen, made = checks[config.label]
        # A SYN dropped and sent again starts a new conntrack entry and is counted again: at least, not exactly.
        if seen is not None and seen < made:
            raise SystemExit(f"{config.label}: the REDIRECT rule counted only {seen} of {made} connections")
        r = ratios[config.label]
        rows.append({
            "what": config.label,
            "connections_per_s": round(statistics.median(rates[config.label])),
            "us_per_connection": round(1e6 / statistics.median(rates[config.label]), 2),
            "ratio_median": round(statistics.median(r), 3),
            "ratio_min": round(min(r), 3),
            "ratio_max": round(max(r), 3),
            "redirect_counter": seen,
            "connections": made,
        })  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"cidrs": n, "rounds": args.rounds, "slice": args.slice, "kernel": platform.release()}
    (RESULTS / f"nft_connection_rate_{n}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(
        f"{n:,} excluded CIDRs, {args.rounds} rounds of {args.slice} connections per configuration, kernel {meta['kernel']}\n"
    )
    print(
        "| configuration | connections/s | us/connection | ratio to baseline (median) | min | max | REDIRECT counter |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        counter = "-" if row["redirect_counter"] is None else f"{row['redirect_counter']:,} of {row['connections']:,}"
        print(f"| {row['what']} | {row['connections_per_s']:,} | {row['us_per_connection']} | {row['ratio_median']} "
              f"| {row['ratio_min']} | {row['ratio_max']} | {counter} |")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
