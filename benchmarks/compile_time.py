"""Compile time: in-process growth from 10 to 100,000 CIDRs and ports, and the CLI as a process.

- ``scaling``: building the ``Policy``, ``compile_policy`` and ``render`` per installed backend,
  for policies with 10 ... 100,000 excluded CIDRs (and as many excluded ports, up to 20,000);
  shows the growth is linear.
- ``startup``: ``meshredirect`` as a process with cached bytecode (an installed package has it)
  against a bare ``python -c pass``, measured side by side.

Run alone: ``.venv/bin/python benchmarks/compile_time.py [--quick]``; ``./dev bench`` runs all.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    RESULTS,
    ROOT,
    Context,
    Section,
    Stats,
    growth_exponent,
    interleaved,
    md_table,
    ms,
    pyplot,
    save_plot,
    timed,
)

SIZES = (10, 100, 1_000, 10_000, 100_000)
#: Options a backend needs for these policies: eBPF implements the local connections' chains (a cgroup
#: connect hook never sees remote inbound connections; those chains stay with iptables or nftables).
BACKEND_OPTIONS: dict[str, dict[str, object]] = {"ebpf": {"local_only": True}}
#: Excluded ports are single ports two apart from 20000: at most this many fit below 65536.
MAX_PORTS = 20_000


def big_policy_fields(cidrs: int, ports: int) -> dict[str, object]:
    """``cidrs`` excluded /30 networks two apart (none collapse) and ``ports`` excluded single ports."""
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    networks = [f"{ipaddress.IPv4Address(base + 8 * i)}/30" for i in range(cidrs)]
    port_list = [20000 + 2 * i for i in range(ports)]
    return {"outbound_cidrs_exclude": networks, "outbound_ports_exclude": port_list}


def scaling(ctx: Context) -> Section:
    from meshredirect import Policy, available_backends, compile_policy, render

    backends = available_backends()

    def stage_name(backend: str) -> str:
        options = ", ".join(f"{k}" for k in BACKEND_OPTIONS.get(backend, {}))
        return f"render {backend}" + (f" ({options})" if options else "")

    stages = ["Policy()", "compile_policy", *(stage_name(b) for b in backends)]
    results: dict[str, dict[int, Stats]] = {stage: {} for stage in stages}
    refused: dict[str, str] = {}
    for size in SIZES:
        repeat = ctx.repeat(15, 5) if size <= 1_000 else ctx.repeat(7, 3) if size <= 10_000 else ctx.repeat(3, 1)
        fields = big_policy_fields(size, min(size, MAX_PORTS))
        results["Policy()"][size] = timed(lambda f=fields: Policy(**f), repeat)  # type: ignore[arg-type,misc]
        policy = Policy(**fields)  # type: ignore[arg-type]
        results["compile_policy"][size] = timed(lambda p=policy: compile_policy(p), repeat)  # type: ignore[misc]
        ruleset = compile_policy(policy)
        for backend in backends:
            options = BACKEND_OPTIONS.get(backend, {})
            try:
                render(ruleset, backend, **options)
            except Exception as exc:  # a backend that refuses the policy is reported, not timed
                refused.setdefault(backend, f"{size:,} CIDRs on: {exc}")
                continue
            results[stage_name(backend)][size] = timed(
                lambda b=backend, r=ruleset, o=options: render(r, b, **o),  # type: ignore[misc]
                repeat,
                warmup=0,
            )

    rows = []
    for size in SIZES:
        row: list[object] = [f"{size:,}", f"{min(size, MAX_PORTS):,}"]
        for stage in stages:
            stats = results[stage].get(size)
            row.append(
                "refused"
                if stats is None
                else f"{stats.median * 1e3:.2f} ({stats.low * 1e3:.2f}–{stats.high * 1e3:.2f})"
            )
        rows.append(row)
    exponents: list[object] = ["growth exponent, last 10x", ""]
    for stage in stages:
        points = results[stage]
        if len(points) >= 2:
            sizes = sorted(points)
            exponents.append(f"{growth_exponent(sizes, [points[s].median for s in sizes]):.2f}")
        else:
            exponents.append("")
    rows.append(exponents)
    table = md_table(["CIDRs", "ports", *(f"{s} ms" for s in stages)], rows)

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for stage in stages:
        points = results[stage]
        if not points:
            continue
        sizes = sorted(points)
        medians = [points[s].median * 1e3 for s in sizes]
        low = [m - points[s].low * 1e3 for m, s in zip(medians, sizes, strict=True)]
        high = [points[s].high * 1e3 - m for m, s in zip(medians, sizes, strict=True)]
        axes.errorbar(sizes, medians, yerr=[low, high], marker="o", capsize=3, label=stage)
    first = results["compile_policy"]
    if first:
        ref_sizes = [SIZES[0], SIZES[-1]]
        top = max(stats.median for points in results.values() for stats in points.values()) * 1e3
        axes.plot(ref_sizes, [top * ref_sizes[0] / ref_sizes[1], top], "k:", linewidth=1, label="linear (slope 1)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("excluded CIDRs (and ports, up to 20,000)")
    axes.set_ylabel("time, ms (median, bars: min–max)")
    axes.set_title("Compile time in-process, per stage and backend")
    axes.legend(fontsize=8)
    plot = save_plot(figure, ctx, "compile_scaling.png")

    section = Section(
        key="compile_scaling",
        title="Compile time, 10 to 100,000 CIDRs",
        text=(
            "In-process: building the `Policy` (validation and CIDR collapse), `compile_policy`, and "
            "`render` for every installed backend, for policies with N excluded /30 networks two apart "
            "(none collapse) and as many excluded single ports (at most 20,000). Median of repeated runs "
            "(15 up to 1,000 CIDRs, 7 at 10,000, 3 at 100,000), min–max in brackets. The growth exponent "
            "between the two largest sizes is 1.0 for linear growth."
        ),
        tables=[table],
        plots=[(plot, "compile time against policy size, log-log")],
        data={
            stage: {str(size): stats.as_dict(1e3) for size, stats in points.items()}
            for stage, points in results.items()
        },
    )
    for backend, reason in refused.items():
        section.notes.append(f"`{backend}` refused the policies of {reason}")
    return section


def _bytecode_cached() -> None:
    """Compile the sources' bytecode once, as an installed package has it (this environment disables writing it)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "src"), str(ROOT / "backends")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def startup(ctx: Context) -> Section:
    _bytecode_cached()
    exe = str(Path(sys.executable).parent / "meshredirect")
    fields = big_policy_fields(10_000, 1_000)
    RESULTS.mkdir(parents=True, exist_ok=True)
    argfile = RESULTS / "big-policy.args"
    # 10,000 CIDRs do not fit on a command line: they come from an @file, one argument per line.
    argfile.write_text(
        "-x\n"
        + ",".join(fields["outbound_cidrs_exclude"])  # type: ignore[arg-type]
        + "\n-o\n"
        + ",".join(map(str, fields["outbound_ports_exclude"]))  # type: ignore[call-overload]
        + "\n"
    )
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import meshredirect'": [sys.executable, "-c", "import meshredirect"],
        "meshredirect --version": [exe, "--version"],
        "meshredirect compile (default policy)": [exe, "compile"],
        "meshredirect compile -B iptables-save": [exe, "compile", "-B", "iptables-save"],
        "meshredirect graph (DOT)": [exe, "graph"],
        "meshredirect compile (10,000 CIDRs + 1,000 ports)": [exe, "compile", f"@{argfile}"],
    }

    def runner(argv: list[str]) -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    for argv in commands.values():  # warm the page cache
        runner(argv)
    stats = interleaved({name: (lambda a=argv: runner(a)) for name, argv in commands.items()}, ctx.repeat(21, 5))  # type: ignore[misc]
    base = stats["python -c pass"].median
    rows = [[f"`{name}`", *ms(s), f"{(s.median - base) * 1e3:+.1f}"] for name, s in stats.items()]
    table = md_table(["command", "median ms", "min ms", "max ms", "over python -c pass, ms"], rows)

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.2))
    names = list(stats)
    medians = [stats[n].median * 1e3 for n in names]
    errors = [
        [m - stats[n].low * 1e3 for m, n in zip(medians, names, strict=True)],
        [stats[n].high * 1e3 - m for m, n in zip(medians, names, strict=True)],
    ]
    axes.barh(names, medians, xerr=errors, capsize=3, color="#5c6bc0")
    axes.invert_yaxis()
    axes.set_xlabel("wall time of the process, ms (median, bars: min–max)")
    axes.set_title("Start-up: the CLI as a process, side by side with a bare interpreter")
    plot = save_plot(figure, ctx, "startup.png")
    return Section(
        key="startup",
        title="CLI start-up and compile as a process",
        text=(
            "Each command run as a new process, with the project's bytecode compiled and cached as an "
            "installed package has it, against a bare `python -c pass`. The commands are interleaved "
            "round after round so a drift of the machine hits them all alike. The large policy comes "
            "from an `@file` (10,000 CIDRs do not fit on a command line)."
        ),
        tables=[table],
        plots=[(plot, "process start-up times")],
        data={name: s.as_dict(1e3) for name, s in stats.items()},
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    ctx = Context(quick=args.quick)
    for section in (scaling(ctx), startup(ctx)):
        print(section.markdown())


if __name__ == "__main__":
    main()
