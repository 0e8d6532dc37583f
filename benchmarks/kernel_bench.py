"""Real-kernel benchmarks, each inside throwaway network namespaces (needs root).

- ``apply_time``: policy to loaded rules in a fresh namespace (the apply layer, in-process) against
  the floor: ``iptables-restore --noflush`` of the same document alone.
- ``connection_rate``: the cost of a new TCP connection through the rules, with 0 / 100 / 1,000 /
  10,000 excluded CIDRs, against a namespace with no rules at all. A small C client (a Python
  connect loop would hide differences under ~5 us) opens connections to an address the rules
  redirect to a C server on 15001; the configurations run interleaved in short slices and are
  reported as ratios to the baseline of the same round, with min and max. Afterwards each
  namespace's REDIRECT counter must equal the connections made: otherwise the rules were not on
  the path and the figure would mean nothing.

Only addresses inside the namespaces created here are used. Every namespace and process is
removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Context, Section, Stats, interleaved, is_root, md_table, ms, pyplot, ratios, save_plot

CIDR_COUNTS = (0, 100, 1_000, 10_000)
APPLY_CIDR_COUNTS = (0, 1_000, 10_000)
#: Where the rules send captured outbound connections, and where the C server listens.
PROXY_PORT = 15001
#: The destination the client connects to: behind a veth pair inside the namespace, routed, not local.
TARGET = ("10.99.0.2", 80)
#: (interface, its peer, the interface's address); a veth pair, since this kernel may lack dummy devices.
LINK = ("bench0", "bench1", "10.99.0.1/24")
#: Connections per slice of the client: BATCHES batches of BATCH, the slice's figure being its fastest
#: batch (other work on a shared machine only ever adds time, so the fastest batch is the least disturbed).
BATCH = 500
BATCHES = 4
SLICE = BATCH * BATCHES
#: Counted REDIRECTs may exceed connections by this fraction (SYNs retransmitted under load).
RETRANSMIT_TOLERANCE = 0.001

SERVER_C = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a; memset(&a, 0, sizeof a);
    a.sin_family = AF_INET; a.sin_port = htons(atoi(argv[1])); a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) return 1;
    for (;;) { int c = accept(s, 0, 0); if (c >= 0) close(c); }
}
"""

CLIENT_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_in a; memset(&a, 0, sizeof a);
    a.sin_family = AF_INET; a.sin_port = htons(atoi(argv[2])); inet_pton(AF_INET, argv[1], &a.sin_addr);
    long n = atol(argv[3]), batches = atol(argv[4]);
    struct linger l = {1, 0};  /* close with RST: no TIME_WAIT, so ports do not run out */
    double best = 0;
    for (long b = 0; b < batches; b++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < n; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
            setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof l);
            close(s);
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double each = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n;
        if (b == 0 || each < best) best = each;
    }
    printf("%.1f\n", best);
    return 0;
}
"""


def _unavailable() -> str | None:
    if not is_root():
        return "needs root (network namespaces); run `./dev bench` as root"
    for tool in ("ip", "cc", "iptables-nft-restore"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on this machine"
    return None


def _skipped(key: str, title: str, reason: str) -> Section:
    return Section(key=key, title=title, notes=[f"Not measured on this run: {reason}."])


def _cidrs(count: int) -> list[str]:
    # /30 networks two apart in 11.0.0.0/8: none collapse, none holds the target address.
    return [f"11.{(8 * i) >> 16 & 255}.{(8 * i) >> 8 & 255}.{8 * i & 255}/30" for i in range(count)]


def _ruleset(cidrs: int) -> Any:
    from meshredirect import Policy, compile_policy

    return compile_policy(Policy(outbound_cidrs_exclude=_cidrs(cidrs)))


@contextlib.contextmanager
def _namespaces() -> Iterator[Callable[[], Any]]:
    """A factory of fresh namespaces (lo up, a veth pair routing TARGET); all deleted on exit."""
    from meshredirect.testing.netns import NetNamespace

    made: list[NetNamespace] = []

    def make() -> NetNamespace:
        ns = NetNamespace()
        made.append(ns)
        ns.create()
        ns.run(["ip", "link", "add", LINK[0], "type", "veth", "peer", "name", LINK[1]])
        ns.run(["ip", "addr", "add", LINK[2], "dev", LINK[0]])
        ns.run(["ip", "link", "set", LINK[1], "up"])
        ns.run(["ip", "link", "set", LINK[0], "up"])
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.delete()


# ----------------------------------------------------------------------------- apply time


def apply_time(ctx: Context) -> Section:
    title = "Apply time into a fresh namespace"
    reason = _unavailable()
    if reason:
        return _skipped("apply_time", title, reason)
    from meshredirect import render
    from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner
    from meshredirect.ir import Family

    rounds = ctx.repeat(7, 3)
    results: dict[int, dict[str, Stats]] = {}
    rule_counts: dict[int, int] = {}
    with _namespaces() as fresh:
        for count in APPLY_CIDR_COUNTS:
            ruleset = _ruleset(count)
            document = render(ruleset, "iptables-restore").artifact(Family.IPV4).content
            rule_counts[count] = sum(1 for line in document.splitlines() if line.startswith("-A "))

            def ours(rs: Any = ruleset) -> float:
                ns = fresh()
                start = time.perf_counter()
                IptablesApplier(NamespaceRunner(ns.name)).apply(rs)
                elapsed = time.perf_counter() - start
                ns.delete()
                return elapsed

            def floor(doc: str = document) -> float:
                ns = fresh()
                start = time.perf_counter()
                ns.run(["iptables-nft-restore", "--noflush"], input=doc)
                elapsed = time.perf_counter() - start
                ns.delete()
                return elapsed

            results[count] = interleaved(
                {"meshredirect apply (in-process)": ours, "floor: iptables-nft-restore --noflush": floor}, rounds
            )
    rows = []
    for count, stats in results.items():
        for name, s in stats.items():
            rows.append([f"{count:,}", f"{rule_counts[count]:,}", name, *ms(s)])
    table = md_table(["excluded CIDRs", "rules", "what", "median ms", "min ms", "max ms"], rows, "rrlrrr")

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.2))
    names = list(next(iter(results.values())))
    width = 0.38
    for offset, name in enumerate(names):
        xs = [i + (offset - 0.5) * width for i in range(len(results))]
        med = [results[c][name].median * 1e3 for c in results]
        err = [
            [m - results[c][name].low * 1e3 for m, c in zip(med, results, strict=True)],
            [results[c][name].high * 1e3 - m for m, c in zip(med, results, strict=True)],
        ]
        axes.bar(xs, med, width, yerr=err, capsize=3, label=name)
    axes.set_xticks(range(len(results)), [f"{c:,} CIDRs" for c in results])
    axes.set_ylabel("ms (median, bars: min–max)")
    axes.set_title("Apply into a fresh namespace vs loading the same rules alone")
    axes.legend(fontsize=8)
    plot = save_plot(figure, ctx, "apply_time.png")
    return Section(
        key="apply_time",
        title=title,
        text=(
            "From a compiled ruleset to rules loaded in a new namespace. *meshredirect apply* is the apply "
            "layer in-process (`IptablesApplier.apply`: it reads the namespace's current rules with "
            "`iptables-save`, renders an `iptables-restore` document that replaces only our chains, loads "
            "it in one transaction, and reads the rules back to report the change). The floor is "
            f"`iptables-nft-restore --noflush` of the same document alone. {rounds} rounds, interleaved, "
            "each in a namespace of its own (creating the namespace is not timed)."
        ),
        tables=[table],
        plots=[(plot, "apply time against the floor")],
        notes=[
            "Not measured yet: `nft -j -f` of the nftables backend's output (no nftables backend in this "
            "build), and `meshredirect apply` as a process (no such command in this build)."
        ],
        data={str(c): {n: s.as_dict(1e3) for n, s in st.items()} for c, st in results.items()},
    )


# ----------------------------------------------------------------------------- connection rate


def _build(workdir: Path) -> tuple[Path, Path]:
    binaries = []
    for name, source in (("server", SERVER_C), ("client", CLIENT_C)):
        (workdir / f"{name}.c").write_text(source)
        subprocess.run(["cc", "-O2", "-o", str(workdir / name), str(workdir / f"{name}.c")], check=True)
        binaries.append(workdir / name)
    return binaries[0], binaries[1]


def _redirected_packets(ns: Any, variant: str) -> int:
    saved = ns.run([f"iptables-{variant}-save", "-c", "-t", "nat"]).stdout
    total = 0
    for line in saved.splitlines():
        found = re.match(r"\[(\d+):\d+\] -A \S+ .*-j REDIRECT --to-ports " + str(PROXY_PORT), line)
        if found:
            total += int(found.group(1))
    return total


def connection_rate(ctx: Context) -> Section:
    title = "New-connection cost with 0 to 10,000 excluded CIDRs"
    reason = _unavailable()
    if reason:
        return _skipped("connection_rate", title, reason)
    from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner

    rounds = ctx.repeat(9, 3)
    variants = [v for v in ("nft", "legacy") if shutil.which(f"iptables-{v}-restore")]
    servers: list[subprocess.Popen[str]] = []
    counts: dict[str, tuple[Any, str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="mr-bench-") as tmp, _namespaces() as fresh:
        server, client = _build(Path(tmp))
        configs: dict[str, tuple[Any, tuple[str, int]]] = {}
        try:
            base = fresh()
            configs["no rules (direct to 127.0.0.1:15001)"] = (base, ("127.0.0.1", PROXY_PORT))
            for variant in variants:
                for count in CIDR_COUNTS:
                    ns = fresh()
                    IptablesApplier(NamespaceRunner(ns.name), variant=variant).apply(_ruleset(count))
                    name = f"iptables-{variant}, {count:,} excluded CIDRs"
                    configs[name] = (ns, TARGET)
                    counts[name] = (ns, variant, 0)
            for ns, _ in configs.values():
                servers.append(ns.popen([str(server), str(PROXY_PORT)], stdout=subprocess.DEVNULL))
            time.sleep(0.2)

            def slice_of(name: str) -> Callable[[], float]:
                ns, (address, port) = configs[name]

                def measure() -> float:
                    out = ns.run([str(client), address, str(port), str(BATCH), str(BATCHES)]).stdout
                    if name in counts:
                        c = counts[name]
                        counts[name] = (c[0], c[1], c[2] + SLICE)
                    return float(out) * 1e-9

                return measure

            measures = {name: slice_of(name) for name in configs}
            for measure in measures.values():  # warm-up slice, counted too
                measure()
            stats = interleaved(measures, rounds)
            checks = []
            for name, (ns, variant, made) in counts.items():
                seen = _redirected_packets(ns, variant)
                checks.append((name, made, seen))
        finally:
            for process in servers:
                process.kill()
                process.wait()
    baseline = "no rules (direct to 127.0.0.1:15001)"
    relative = ratios(stats, baseline)
    rows = []
    for name, s in stats.items():
        r = relative[name]
        rate = 1 / s.median
        rows.append(
            [
                name,
                f"{s.median * 1e6:.1f}",
                f"{s.low * 1e6:.1f}–{s.high * 1e6:.1f}",
                f"{rate:,.0f}",
                f"{1 / r.median:.3f}",
                f"{1 / r.high:.3f}–{1 / r.low:.3f}",
            ]
        )
    table = md_table(
        ["configuration", "µs per connection (median)", "min–max µs", "connections/s", "rate vs no rules", "min–max"],
        rows,
        "lrrrrr",
    )
    # NAT sees a connection's first packet only; a SYN the kernel retransmits before the connection is
    # confirmed can be counted once more. Fewer counts than connections would mean the rules were not
    # on the path; a few more are retransmissions.
    bad = [c for c in checks if not c[1] <= c[2] <= c[1] * (1 + RETRANSMIT_TOLERANCE)]
    extra = sum(seen - made for _, made, seen in checks)
    notes = [
        "Counters checked: "
        + (
            "in every namespace the REDIRECT rule counted every connection made "
            f"({checks[0][1]:,} each"
            + (f"; {extra} more in all, SYNs the kernel retransmitted under load" if extra else "")
            + "), so every measured connection crossed the rules."
            if not bad
            else "MISMATCH: " + "; ".join(f"{n}: {made} made, {seen} counted" for n, made, seen in bad)
        ),
        "Not measured yet: nftables with sets (no nftables backend in this build), eBPF (no eBPF backend "
        "in this build); iptables with ipset is not offered by the iptables backend.",
    ]
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.6))
    for variant in variants:
        names = [f"iptables-{variant}, {c:,} excluded CIDRs" for c in CIDR_COUNTS]
        xs = [max(c, 1) for c in CIDR_COUNTS]
        med = [1 / relative[n].median for n in names]
        low = [m - 1 / relative[n].high for m, n in zip(med, names, strict=True)]
        high = [1 / relative[n].low - m for m, n in zip(med, names, strict=True)]
        axes.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=f"iptables-{variant}, one rule per CIDR")
    axes.axhline(1.0, color="k", linestyle=":", linewidth=1, label="no rules")
    axes.set_xscale("log")
    axes.set_xlabel("excluded CIDRs (0 drawn at 1)")
    axes.set_ylabel("connection rate / rate with no rules")
    axes.set_ylim(bottom=0)
    axes.set_title("New-connection rate through the rules, relative to no rules")
    axes.legend(fontsize=8)
    plot = save_plot(figure, ctx, "connection_rate.png")
    return Section(
        key="connection_rate",
        title=title,
        text=(
            "Each configuration in its own namespace: a C client opens and resets TCP connections "
            f"({BATCHES} batches of {BATCH} per slice; a slice's figure is its fastest batch, the one least "
            f"disturbed by other work on the machine) to {TARGET[0]}:{TARGET[1]}, which the compiled rules redirect to a C "
            f"server on {PROXY_PORT}; the baseline namespace has no rules and the client connects to "
            f"127.0.0.1:{PROXY_PORT} directly. The excluded CIDRs never hold the destination, so every "
            f"connection walks all of them. {rounds} rounds, the configurations interleaved within each; "
            "ratios are taken per round against the baseline of the same round."
        ),
        tables=[table],
        plots=[(plot, "connection rate relative to no rules")],
        notes=notes,
        data={
            name: {"us": s.as_dict(1e6), "rate_ratio_median": 1 / relative[name].median} for name, s in stats.items()
        },
    )


def main() -> None:
    ctx = Context(quick="--quick" in sys.argv)
    for section in (apply_time(ctx), connection_rate(ctx)):
        print(section.markdown())


if __name__ == "__main__":
    main()
