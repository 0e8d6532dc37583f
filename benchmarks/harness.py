"""What every benchmark shares: timing with spread, side-by-side interleaving, Markdown tables, plots.

A benchmark is a function ``run(ctx) -> Section`` in a module of this folder;
``benchmarks/run.py`` calls each, then writes ``docs/benchmarks.md`` and the
plots under ``docs/_static/bench/``. A benchmark that cannot run here (no root,
a backend or engine not installed yet) returns a section that says why, so the
page always tells what was and was not measured.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
PLOTS = DOCS / "_static" / "bench"


@dataclass
class Stats:
    """Median and spread (min, max) of repeated measurements, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def as_dict(self, scale: float = 1.0) -> dict[str, float]:
        return {
            "median": self.median * scale,
            "min": self.low * scale,
            "max": self.high * scale,
            "n": len(self.samples),
        }


@dataclass
class Section:
    """One benchmark's part of the results page."""

    key: str
    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name under PLOTS, caption)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.text:
            parts += [self.text.strip(), ""]
        for table in self.tables:
            parts += [table.rstrip(), ""]
        for name, caption in self.plots:
            parts += [f"![{caption}](_static/bench/{name})", ""]
        for note in self.notes:
            parts += [note.strip(), ""]
        parts += [f"<small>This section took {self.seconds:.1f} s to measure.</small>", ""]
        return "\n".join(parts)


@dataclass
class Context:
    """What the runner hands each benchmark: how hard to try, and where to put plots."""

    quick: bool = False
    plots: Path = PLOTS

    def repeat(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def timed(fn: Callable[[], object], repeat: int, *, warmup: int = 1) -> Stats:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Stats(samples)


def interleaved(configs: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, Stats]:
    """Measure several configurations side by side: round after round, each configuration once per round.

    Each callable returns its own measurement (or None to time the call itself), so slow drifts of the
    machine hit every configuration alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            start = time.perf_counter()
            value = fn()
            samples[name].append(time.perf_counter() - start if value is None else value)
    return {name: Stats(values) for name, values in samples.items()}


def ratios(stats: dict[str, Stats], baseline: str) -> dict[str, Stats]:
    """Per round, each configuration's value divided by the baseline's of the same round."""
    base = stats[baseline].samples
    return {name: Stats([v / b for v, b in zip(s.samples, base, strict=True)]) for name, s in stats.items()}


def md_table(columns: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table; ``align`` holds one of 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ms(stats: Stats) -> list[str]:
    """Median, min and max in milliseconds, for a table row."""
    return [f"{stats.median * 1e3:.2f}", f"{stats.low * 1e3:.2f}", f"{stats.high * 1e3:.2f}"]


def growth_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """The exponent k in time ~ size^k between the two largest sizes (1.0 is linear growth)."""
    import math

    return math.log(times[-1] / times[-2]) / math.log(sizes[-1] / sizes[-2])


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive backend (no screen here)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def save_plot(figure: Any, ctx: Context, name: str) -> str:
    ctx.plots.mkdir(parents=True, exist_ok=True)
    # Fixed metadata so that a re-run with the same numbers writes the same bytes.
    figure.savefig(ctx.plots / name, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(figure)
    return name


def is_root() -> bool:
    return os.geteuid() == 0
