"""Real-kernel benchmarks, each inside throwaway network namespaces (needs root).

- ``apply_time``: policy to loaded rules in a fresh namespace (the apply layer, in-process) against
  the floor: ``iptables-restore --noflush`` of the same document alone.
- ``connection_rate``: the cost of a new TCP connection through the rules, with 0 / 100 / 1,000 /
  10,000 excluded CIDRs, for every backend side by side (iptables-nft and iptables-legacy with one
  rule per CIDR, nftables with a set, eBPF with an LPM trie; the configurations of
  ``ebpf_connection_cost.py``, called as functions), against a namespace with no rules at all. A
  small C client (a Python connect loop would hide differences under ~5 us) opens connections to
  an address only the rules can redirect to the sink on 15001; the configurations run interleaved
  in short slices and are reported as ratios to the baseline of the same round, with min and max.
  The iptables REDIRECT counters must agree with the connections made.

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
#: (interface, its peer, the interface's address); a veth pair, since this kernel may lack dummy devices.
LINK = ("bench0", "bench1", "10.99.0.1/24")
#: Connections per slice of the client: BATCHES batches of BATCH, the slice's figure being its fastest
#: batch (other work on a shared machine only ever adds time, so the fastest batch is the least disturbed).
BATCH = 500
BATCHES = 4
SLICE = BATCH * BATCHES
#: Counted REDIRECTs may exceed connections by this fraction (SYNs retransmitted under load).
RETRANSMIT_TOLERANCE = 0.001
#: ... and fall short by connections that reuse a tracked connection's NAT binding: the kernel picks
#: source ports at random from EPHEMERAL_PORTS, so of N connections about
#: EPHEMERAL_PORTS * (1 - exp(-N / EPHEMERAL_PORTS)) have ports of their own (16,000 of 18,500), and a
#: port repeated within conntrack's 10 s for a reset connection meets the old entry. Rules off the path
#: would count none; at least half is asked, well below that expectation.
COUNTED_AT_LEAST = 0.5
#: net.ipv4.ip_local_port_range of the benchmark's namespaces (1024-65535).
EPHEMERAL_PORTS = 65535 - 1024 + 1


def _unavailable() -> str | None:
    if not is_root():
        return "needs root (network namespaces); run `./dev bench` as root"
    for tool in ("ip", "iptables-nft-restore", "nft"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on this machine"
    if not any(shutil.which(c) for c in ("gcc", "cc", "clang")):
        return "needs a C compiler (gcc or clang) for the benchmark's client"
    return None


def _skipped(key: str, title: str, reason: str) -> Section:
    return Section(key=key, title=title, notes=[f"Not measured on this run: {reason}."])


def _cidrs(count: int) -> list[str]:
    # /30 networks two apart in 11.0.0.0/8: none collapse, none holds the target address.
    return [f"11.{(8 * i) >> 16 & 255}.{(8 * i) >> 8 & 255}.{8 * i & 255}/30" for i in range(count)]


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


#: The rows of the apply section: what runs, and its floor right after it.
APPLY_ROWS = (
    "meshredirect apply, in-process",
    "meshredirect apply, as a process",
    "floor: iptables-nft-restore --noflush",
    "meshredirect apply --backend nftables, in-process",
    "floor: nft -j -f",
)


def apply_time(ctx: Context) -> Section:
    title = "Apply time into a fresh namespace"
    reason = _unavailable()
    if reason:
        return _skipped("apply_time", title, reason)
    import compile_time
    from meshredirect import Policy, compile_policy, render
    from meshredirect.apply.actions import apply
    from meshredirect.ir import Family

    compile_time._bytecode_cached()  # the process row starts as an installed package does
    exe = str(Path(sys.executable).parent / "meshredirect")
    rows = list(APPLY_ROWS)
    rounds = ctx.repeat(7, 3)
    results: dict[int, dict[str, Stats]] = {}
    rule_counts: dict[int, int] = {}
    with _namespaces() as fresh, tempfile.TemporaryDirectory(prefix="mr-bench-") as tmp:
        for count in APPLY_CIDR_COUNTS:
            policy = Policy(outbound_cidrs_exclude=_cidrs(count))
            ruleset = compile_policy(policy)
            document = render(ruleset, "iptables-restore").artifact(Family.IPV4).content
            rule_counts[count] = sum(1 for line in document.splitlines() if line.startswith("-A "))
            nft_document = render(ruleset, "nftables-json").artifacts[0].content
            # The same policy for the process: 10,000 CIDRs do not fit on a command line, so an @file.
            argfile = Path(tmp) / f"policy-{count}.args"
            argfile.write_text("".join(f"{line}\n" for line in ("-x", ",".join(_cidrs(count)))) if count else "")

            def timed_in(action: Callable[[Any], object]) -> float:
                ns = fresh()
                start = time.perf_counter()
                action(ns)
                elapsed = time.perf_counter() - start
                ns.delete()
                return elapsed

            measures: dict[str, Callable[[], float]] = {
                APPLY_ROWS[0]: lambda p=policy: timed_in(lambda ns: apply(p, netns=ns.name, variant="nft")),
                APPLY_ROWS[1]: lambda a=argfile: timed_in(
                    lambda ns: subprocess.run(
                        [exe, "apply", "--netns", ns.name, "--iptables-variant", "nft", f"@{a}"],
                        check=True,
                        capture_output=True,
                    )
                ),
                APPLY_ROWS[2]: lambda d=document: timed_in(
                    lambda ns: ns.run(["iptables-nft-restore", "--noflush"], input=d)
                ),
                APPLY_ROWS[3]: lambda p=policy: timed_in(lambda ns: apply(p, backend="nftables", netns=ns.name)),
                APPLY_ROWS[4]: lambda d=nft_document: timed_in(lambda ns: ns.run(["nft", "-j", "-f", "-"], input=d)),
            }
            results[count] = interleaved({name: measures[name] for name in rows}, rounds)  # type: ignore[dict-item]
    table_rows = []
    for count, stats in results.items():
        for name, s in stats.items():
            table_rows.append([f"{count:,}", f"{rule_counts[count]:,}", name, *ms(s)])
    table = md_table(["excluded CIDRs", "rules", "what", "median ms", "min ms", "max ms"], table_rows, "rrlrrr")

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / len(rows)
    for offset, name in enumerate(rows):
        xs = [i + (offset - (len(rows) - 1) / 2) * width for i in range(len(results))]
        med = [results[c][name].median * 1e3 for c in results]
        err = [
            [m - results[c][name].low * 1e3 for m, c in zip(med, results, strict=True)],
            [results[c][name].high * 1e3 - m for m, c in zip(med, results, strict=True)],
        ]
        axes.bar(xs, med, width, yerr=err, capsize=2, label=name, hatch="//" if name.startswith("floor") else None)
    axes.set_xticks(range(len(results)), [f"{c:,} CIDRs" for c in results])
    axes.set_yscale("log")
    axes.set_ylabel("ms (median, bars: min–max), log")
    axes.set_title("Apply into a fresh namespace vs loading the same rules alone")
    axes.legend(fontsize=7)
    plot = save_plot(figure, ctx, "apply_time.png")
    notes: list[str] = []
    return Section(
        key="apply_time",
        title=title,
        text=(
            "From a policy to rules loaded in a new namespace, for the default policy plus N excluded CIDRs. "
            "*meshredirect apply* is the apply layer (`meshredirect.apply.apply`, iptables-nft): it reads "
            "the namespace's current rules of both families, renders an `iptables-restore` document that "
            "replaces only our chains, loads it in one transaction per family, and reads the rules back to "
            "report the change; *as a process* is `meshredirect apply --netns NAME` started as a new process "
            "(cached bytecode, the CIDRs from an `@file`). Its floor is `iptables-nft-restore --noflush` of "
            "the same IPv4 document alone. The nftables rows load the nftables backend's transaction "
            "through libnftables in-process, against `nft -j -f` of the same JSON document alone. Each "
            f"row in a namespace of its own (creating it is not timed); {rounds} rounds, the rows "
            "interleaved within each."
        ),
        tables=[table],
        plots=[(plot, "apply time against the floor")],
        notes=notes,
        data={str(c): {n: s.as_dict(1e3) for n, s in st.items()} for c, st in results.items()},
    )


# ----------------------------------------------------------------------------- connection rate


def _redirect_counter(ns: Any, variant: str) -> int:
    """Packets the REDIRECT to the outbound port counted in a namespace's iptables nat table."""
    saved = ns.run([f"iptables-{variant}-save", "-c", "-t", "nat"]).stdout
    total = 0
    for line in saved.splitlines():
        found = re.match(r"\[(\d+):\d+\] -A \S+ .*-j REDIRECT --to-ports " + str(PROXY_PORT), line)
        if found:
            total += int(found.group(1))
    return total


#: The backends of the connection-rate comparison, in the order of the table and the plot.
RATE_BACKENDS = {
    "iptables-nft": "iptables-nft, one rule per CIDR",
    "iptables-legacy": "iptables-legacy, one rule per CIDR",
    "nftables": "nftables, one interval set",
    "ebpf": "eBPF, one LPM trie",
}


def distinct_ports(connections: int) -> float:
    """How many distinct source ports ``connections`` random draws from the ephemeral range give, on average.

    >>> round(distinct_ports(18_500))
    16084
    """
    import math

    return EPHEMERAL_PORTS * (1 - math.exp(-connections / EPHEMERAL_PORTS))


def connection_rate(ctx: Context) -> Section:
    title = "New-connection cost with 0 to 10,000 excluded CIDRs"
    key = "connection_rate"
    reason = _unavailable()
    if reason:
        return _skipped(key, title, reason)
    import ebpf_connection_cost as conn

    rounds = ctx.repeat(9, 3)
    with tempfile.TemporaryDirectory(prefix="mr-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        binary = conn.build(work)
        configs = conn.configurations(stack, work, binary, cidr_counts=CIDR_COUNTS, exempt_counts=(0,))
        baseline = configs[0]
        control = conn.unreachable_without_rules(baseline, binary)
        for config in configs:  # warm-up slice (counted too)
            conn.measure(config, binary, BATCH)
        stats = interleaved(
            {c.name: (lambda c=c: conn.measure(c, binary, SLICE) * 1e-9) for c in configs},  # type: ignore[misc]
            rounds,
        )
        checks = []
        for config in configs:
            if config.backend.startswith("iptables-") and config.redirected:
                seen = _redirect_counter(config.ns, config.backend.removeprefix("iptables-"))
                checks.append((config.name, config.connections, config.retries, seen))
    relative = ratios(stats, baseline.name)
    rows = []
    for config in configs:
        s, r = stats[config.name], relative[config.name]
        what = "no rules (the client connects to the sink directly)" if config is baseline else config.name
        rows.append(
            [
                what,
                f"{s.median * 1e6:.1f}",
                f"{s.low * 1e6:.1f}–{s.high * 1e6:.1f}",
                f"{1 / s.median:,.0f}",
                f"{1 / r.median:.3f}",
                f"{1 / r.high:.3f}–{1 / r.low:.3f}",
                f"{stats[baseline.name].low / s.low:.3f}",
            ]
        )
    table = md_table(
        [
            "configuration",
            "µs per connection (median)",
            "min–max µs",
            "connections/s",
            "rate vs no rules",
            "min–max",
            "rate of the fastest slices",
        ],
        rows,
        "lrrrrrr",
    )
    # NAT sees a connection's first packet. A connection whose addresses and ports repeat one conntrack
    # still tracks (reset connections stay 10 s; the kernel draws source ports at random) reuses
    # that entry's NAT binding, redirected all the same but not counted again; a SYN retransmitted or a
    # connect retried after a reset is counted twice. Far fewer counts would mean rules off the path.
    bad = [c for c in checks if not c[1] * COUNTED_AT_LEAST <= c[3] <= c[1] * (1 + RETRANSMIT_TOLERANCE) + c[2]]
    counted = sum(seen for *_, seen in checks)
    made = sum(made for _, made, _, _ in checks)
    notes = [
        "Every measured connection crossed the rules: the destination "
        f"{conn.REMOTE}:{conn.APP_PORT} is on the pod's subnet but nothing answers for it (without rules "
        f"the client gets `{control.split(': ')[-1]}`), so a connection only succeeds when the rules or the "
        "program send it to the sink. "
        + (
            f"The iptables REDIRECT counters agree: {counted:,} counted for {made:,} connections made through "
            f"them (warm-up included; {made - counted:,} fewer: a connection that repeats the addresses and "
            "ports of one conntrack still tracks reuses its NAT binding without meeting the rules again; with "
            f"source ports drawn at random from {EPHEMERAL_PORTS:,}, about "
            f"{distinct_ports(made // len(checks)):,.0f} of each namespace's {made // len(checks):,} "
            "connections have ports of their own)."
            if checks and not bad
            else "MISMATCH of the iptables REDIRECT counters: "
            + "; ".join(f"{n}: {made} made, {seen} counted" for n, made, _, seen in bad)
        ),
        "iptables with ipset is not offered by the iptables backend (it lowers excluded CIDRs to one rule "
        "each); its multiport applies to ports, not addresses.",
    ]
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.6))
    xs = [max(c, 1) for c in CIDR_COUNTS]
    for backend, label in RATE_BACKENDS.items():
        names = [c.name for c in configs if c.backend == backend and c.redirected]
        if len(names) != len(CIDR_COUNTS):
            continue
        med = [1 / relative[n].median for n in names]
        low = [m - 1 / relative[n].high for m, n in zip(med, names, strict=True)]
        high = [1 / relative[n].low - m for m, n in zip(med, names, strict=True)]
        axes.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=label)
    axes.axhline(1.0, color="k", linestyle=":", linewidth=1, label="no rules")
    axes.set_xscale("log")
    axes.set_xlabel("excluded CIDRs (0 drawn at 1)")
    axes.set_ylabel("connection rate / rate with no rules")
    axes.set_ylim(bottom=0)
    axes.set_title("New-connection rate through the rules, relative to no rules")
    axes.legend(fontsize=8, loc="lower left")
    plot = save_plot(figure, ctx, "connection_rate.png")
    backends = sorted({c.backend for c in configs if c.backend != "none"}, key=list(RATE_BACKENDS).index)
    return Section(
        key=key,
        title=title,
        text=(
            "Every backend side by side in one run: "
            + ", ".join(RATE_BACKENDS[b] for b in backends)
            + ". Each configuration lives in its own namespace (the pod's eth0 on a veth pair), loaded with "
            "the default policy plus N excluded /30 networks that never hold the destination, so every "
            "connection is tested against all of them; the eBPF rows run the client in a cgroup with the "
            "program attached. A C client (`benchmarks/connbench.c`, as uid 1000) opens and resets TCP "
            f"connections to {conn.REMOTE}:{conn.APP_PORT}, which the rules redirect to a sink on "
            f"127.0.0.1:{conn.SINK_PORT}; the baseline namespace has no rules and the client connects to the "
            f"sink directly. *exempt* rows connect to the sink as the proxy (uid {conn.PROXY_UID}): the rules "
            f"run and change nothing. {BATCHES} batches of {BATCH} per slice, a slice's figure being its "
            f"fastest batch (the one least disturbed by other work on the machine); {rounds} rounds, the "
            "configurations interleaved within each; ratios are taken per round against the baseline of the "
            "same round; on a busy machine the baseline's own slices scatter, and the ratio of the fastest slices "
            "(the least disturbed: the last column) is the steadier figure. The configurations are "
            "`benchmarks/ebpf_connection_cost.py`'s, called as functions."
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
