"""``meshredirect graph``: draw a ruleset's chains (Graphviz DOT, or SVG through Graphviz's ``dot``)."""

from __future__ import annotations

import argparse
import sys
from typing import Final

from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments

FORMATS: Final = ("dot", "svg")
#: How long ``dot`` may take to lay out a diagram (large rulesets take a few seconds).
DOT_TIMEOUT_SECONDS: Final = 120


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        "-T",
        choices=FORMATS,
        help="dot (Graphviz text, the default) or svg (runs Graphviz's 'dot'); "
        "with --output, the file's suffix chooses when this is not given",
    )
    parser.add_argument("--output", "-O", metavar="FILE", help="write to FILE instead of printing")
    add_policy_arguments(parser)


def svg_from_dot(dot_text: str, *, dot: str = "dot") -> str:
    """Lay out DOT text with Graphviz's ``dot`` and return the SVG; EnvironmentProblem when it cannot run."""
    import subprocess

    from meshredirect.errors import EnvironmentProblem

    try:
        result = subprocess.run(
            [dot, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=DOT_TIMEOUT_SECONDS, check=False
        )
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"Graphviz's {dot!r} program is not installed; it is needed for SVG output",
            remedy="install the Debian package graphviz, or use --format dot",
        ) from None
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{dot} -Tsvg took longer than {DOT_TIMEOUT_SECONDS} s") from None
    if result.returncode != 0:
        raise EnvironmentProblem(f"{dot} -Tsvg failed (status {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    if args.output is not None and args.output.lower().endswith(".svg"):
        return "svg"
    return "dot"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meshredirect.compiler import compile_policy
    from meshredirect.errors import EnvironmentProblem
    from meshredirect.graph import to_dot

    ruleset = compile_policy(policy_from_arguments(args))
    text = to_dot(ruleset)
    if _format(args) == "svg":
        text = svg_from_dot(text)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {args.output}: {exc.strerror}") from None
    return 0
