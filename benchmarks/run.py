"""Run every benchmark and write the results page: ``docs/benchmarks.md`` and ``docs/_static/bench/*.png``.

    ./dev bench                         # everything (needs root for the namespace benchmarks)
    ./dev bench --quick                 # fewer repetitions, to try the runner
    ./dev bench --only startup,apply_time

Each benchmark is a function ``(Context) -> Section`` listed in BENCHMARKS; any other script in
this folder (one a part of the project added) is run as a process and the Markdown it prints goes on
the page under its docstring's title. A failure in one is reported on the page (and makes the
runner exit 1) without losing the others. The raw numbers go to
``benchmarks/results/results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_time
import kernel_bench
import proofs
from harness import DOCS, RESULTS, Context, Section

#: key -> the function that measures it, in the order of the page.
BENCHMARKS: dict[str, Callable[[Context], Section]] = {
    "compile_scaling": compile_time.scaling,
    "startup": compile_time.startup,
    "apply_time": kernel_bench.apply_time,
    "connection_rate": kernel_bench.connection_rate,
    "proof_time": proofs.proof_time,
}
#: The whole run must stay under this (the issue's budget).
BUDGET_SECONDS = 600
#: Modules of this folder that are not benchmark scripts of their own.
#: (check_default is called by proofs.proof_time; ebpf_connection_cost's configurations by
#: kernel_bench.connection_rate, which measures every backend side by side, nft_connection_rate's too.)
NOT_SCRIPTS = frozenset(
    {
        "run",
        "harness",
        "compile_time",
        "kernel_bench",
        "proofs",
        "check_default",
        "ebpf_connection_cost",
        "nft_connection_rate",
    }
)
#: A script found in this folder (one a part of the project added) may take this long.
SCRIPT_TIMEOUT_SECONDS = 240

HEADER = """# Benchmarks

Speed targets are checked here, by the scripts in `benchmarks/`, never by timed unit tests. This
page is written by `./dev bench` (`benchmarks/run.py`); do not edit it by hand. Every figure is the
median of repeated runs with its spread (min–max); every comparison was measured side by side in
one run. Absolute times drift by up to 40% between runs on this kind of machine; ratios are stable.
"""


def machine() -> str:
    import subprocess

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        except OSError:
            return "absent"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"

    return (
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {version(['iptables-nft', '--version'])}, "
        f"{version(['nft', '--version'])}."
    )


#: The probe of the machine's speed: additions of a plain Python loop (about 0.8 s on this machine at its usual speed).
SPEED_PROBE_ADDITIONS = 20_000_000


def speed_probe() -> float:
    """Seconds a plain Python loop takes (best of 3): the machine's speed at the time, which the load
    average does not show (a virtual machine's host may slow it down)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(SPEED_PROBE_ADDITIONS):
            total += i
        best = min(best, time.perf_counter() - start)
    return best


def speed_note(before: float, after: float) -> str:
    """The probe's result for the page.

    >>> speed_note(0.84, 0.9)
    ' A plain Python loop of 20,000,000 additions took 0.84 s before the run and 0.90 s after it (compare it between pages: absolute times scale with it).'
    """
    return (
        f" A plain Python loop of {SPEED_PROBE_ADDITIONS:,} additions took {before:.2f} s before the run and"
        f" {after:.2f} s after it (compare it between pages: absolute times scale with it)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (to try the runner)")
    parser.add_argument("--only", help="comma separated keys: " + ", ".join(BENCHMARKS))
    parser.add_argument("--note", default="", help="a sentence for the page about this run (what else ran)")
    parser.add_argument("--output", default=str(DOCS / "benchmarks.md"), help="the page to write")
    args = parser.parse_args()
    functions = all_benchmarks(scripts())
    keys = list(functions) if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in keys if k not in functions]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (expected some of: {', '.join(functions)})")
    ctx = Context(quick=args.quick)
    speed_before = speed_probe()
    load_before = os.getloadavg()
    sampler = LoadSampler()
    sampler.start()
    sections: list[Section] = []
    failed = False
    started = time.perf_counter()
    for key in keys:
        print(f"bench: {key} ...", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        try:
            section = functions[key](ctx)
        except Exception:
            failed = True
            section = Section(key=key, title=key, notes=["FAILED:\n\n```text\n" + traceback.format_exc() + "```"])
        section.seconds = time.perf_counter() - begin
        print(f"bench: {key} took {section.seconds:.1f} s", file=sys.stderr, flush=True)
        sections.append(section)
    total = time.perf_counter() - started

    previous: dict[str, object] = {}
    results_file = RESULTS / "results.json"
    if args.only and results_file.exists():
        previous = json.loads(results_file.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file.write_text(
        json.dumps({**previous, **{s.key: s.data for s in sections}}, indent=1, sort_keys=True) + "\n"
    )

    sampler.stop()
    load = load_note(load_before, os.getloadavg(), sampler.samples) + speed_note(speed_before, speed_probe())
    body = [
        HEADER,
        machine()
        + f" The whole run took {total:.0f} s"
        + (" (--quick)." if args.quick else ".")
        + load
        + (f" {args.note.strip()}" if args.note.strip() else ""),
        "",
    ]
    body += [section.markdown() for section in sections]
    output = Path(args.output)
    if args.only and output.exists():
        # Replace only the sections that ran; keep the others as they were.
        old = output.read_text()
        for section in sections:
            old = _replace_section(old, section)
        output.write_text(old)
    else:
        output.write_text("\n".join(body).rstrip() + "\n")
    print(f"bench: wrote {output} in {total:.0f} s", file=sys.stderr)
    if total > BUDGET_SECONDS:
        print(f"bench: over the budget of {BUDGET_SECONDS} s", file=sys.stderr)
        failed = True
    return 1 if failed else 0


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmarks run (a daemon thread)."""

    def __init__(self, every: float = 5.0) -> None:
        import threading

        self.every = every
        self.samples: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self.samples.append(os.getloadavg()[0])


def load_note(before: tuple[float, float, float], after: tuple[float, float, float], during: list[float]) -> str:
    """How loaded the machine was, as ``uptime`` shows it, before, during and after the run.

    >>> load_note((0.5, 0.4, 0.3), (0.6, 0.5, 0.4), [0.7])[:66]
    ' Load average (1, 5, 15 min, as uptime shows it): 0.50, 0.40, 0.30'
    """
    cpus = os.cpu_count() or 1
    peak = max([before[0], after[0], *during])
    text = (
        " Load average (1, 5, 15 min, as uptime shows it): "
        + ", ".join(f"{x:.2f}" for x in before)
        + " before the run, "
        + ", ".join(f"{x:.2f}" for x in after)
        + f" after it, 1-minute peak {peak:.1f} during it on {cpus} CPUs"
    )
    if peak > cpus:
        return text + (
            ": other work shared the CPUs, so absolute times are inflated and spread; the side-by-side "
            "ratios hold better."
        )
    return text + "."


def all_benchmarks(paths: list[Path]) -> dict[str, Callable[[Context], Section]]:
    """The runner's functions, then a section per script; a script named like a function
    (``apply_time.py``) gets its file name as key, so both run."""
    functions: dict[str, Callable[[Context], Section]] = dict(BENCHMARKS)
    for path in paths:
        key = path.stem if path.stem not in functions else path.name
        functions[key] = lambda _ctx, p=path, k=key: script_section(p, k)  # type: ignore[misc]
    return functions


def scripts() -> list[Path]:
    """Benchmark scripts other parts of the project added to this folder, run as they are."""
    here = Path(__file__).resolve().parent
    return sorted(p for p in here.glob("*.py") if p.stem not in NOT_SCRIPTS and not p.stem.startswith("_"))


def script_section(path: Path, key: str | None = None) -> Section:
    """Run a benchmark script as a process and take the Markdown it prints; its docstring says what it measures."""
    import ast
    import subprocess

    doc = ast.get_docstring(ast.parse(path.read_text())) or path.stem
    paragraphs = [p.strip() for p in doc.split("\n\n") if p.strip()]
    title = paragraphs[0].splitlines()[0].rstrip(".")
    section = Section(key=key or path.stem, title=title)
    section.text = "\n\n".join(p for p in paragraphs[1:] if not p.startswith((".venv", "./", "python")))
    section.text += f"\n\nMeasured by `benchmarks/{path.name}`, run as it is by the runner."
    try:
        result = subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_SECONDS,
            check=False,
            cwd=path.parent.parent,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"benchmarks/{path.name} took longer than {SCRIPT_TIMEOUT_SECONDS} s") from None
    if result.returncode != 0:
        raise RuntimeError(f"benchmarks/{path.name} exited {result.returncode}:\n{result.stderr.strip()[-3000:]}")
    section.tables.append(result.stdout.strip() + "\n")
    return section


def _replace_section(page: str, section: Section) -> str:
    start = page.find(f"## {section.title}\n")
    if start < 0:
        return page.rstrip() + "\n\n" + section.markdown()
    end = page.find("\n## ", start + 1)
    end = len(page) if end < 0 else end + 1
    return page[:start] + section.markdown() + page[end:]


if __name__ == "__main__":
    sys.exit(main())
