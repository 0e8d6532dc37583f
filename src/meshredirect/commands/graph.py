"""``meshredirect graph``: draw a ruleset's chains (Graphviz DOT, or SVG through Graphviz's ``dot``).

The ruleset is the policy's (the policy flags; Istio's production setting by
default), or the one a rule FILE holds (``-``: standard input). ``--trace``
highlights the path of one connection, described by the same flags as
``meshredirect trace`` takes: the chains it entered, the rules it was tested
against and those that matched, and its verdict in the title; ``--follow``
adds the follow-up connections the proxy opens for it, each in a colour of
its own. With a FILE, ``--trace`` follows the proxy found in the rules (as
``meshredirect verify`` finds it); the policy flags describe the rest of the
pod (and the proxy, when the rules show none).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

from meshredirect.commands._connection_args import (
    add_connection_arguments,
    connection_from_arguments,
    given_connection_flags,
)
from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments
from meshredirect.commands._rules_args import add_rules_arguments, read_rules

FORMATS: Final = ("dot", "svg")
#: How long ``dot`` may take to lay out a diagram (large rulesets take a few seconds).
DOT_TIMEOUT_SECONDS: Final = 120


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        help="draw the rules this file holds instead of the policy's: iptables-save, iptables -S or "
        "iptables-restore text, or nft -j list ruleset output (JSON); '-' reads standard input",
    )
    parser.add_argument(
        "--format",
        "-T",
        choices=FORMATS,
        help="dot (Graphviz text, the default) or svg (runs Graphviz's 'dot'); "
        "with --output, the file's suffix chooses when this is not given",
    )
    parser.add_argument("--output", "-O", metavar="FILE", help="write to FILE instead of printing")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="highlight the path of the connection the flags below describe (as 'meshredirect trace' takes them)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="with --trace: also the proxy's follow-up connections, each in a colour of its own",
    )
    add_connection_arguments(parser, required=False)
    add_rules_arguments(parser)
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
    from meshredirect.errors import EnvironmentProblem, PolicyError
    from meshredirect.graph import to_dot

    given = given_connection_flags(args)
    if not args.trace:
        if given:
            raise PolicyError(
                given[0], expected="--trace with the connection's flags", got=getattr(args, _dest(given[0]))
            )
        if args.follow:
            raise PolicyError(
                "--follow", expected="--trace (the connection whose follow-ups to draw)", got="no --trace"
            )
    elif args.dst is None:
        raise PolicyError("--trace", expected="the connection's --dst", got="no --dst")
    policy = policy_from_arguments(args)
    ruleset = compile_policy(policy) if args.file is None else read_rules(args.file, args)
    highlights = trace_highlights(ruleset, policy, args, read=args.file is not None) if args.trace else None
    text = to_dot(ruleset, highlight=highlights)
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


def _dest(flag: str) -> str:
    from meshredirect.commands._connection_args import CONNECTION_FLAGS

    return CONNECTION_FLAGS[flag][0]


def trace_highlights(ruleset: Any, policy: Any, args: argparse.Namespace, *, read: bool = False) -> list[Any]:
    """The connection's path (and with --follow its follow-ups'), one highlight each, titled with the verdict.

    The pod is the policy's. For rules ``read`` from a file, it has every interface they name and policy
    routing for the marks their TPROXY targets set, and its proxy is the mesh found in the rules, as
    ``meshredirect verify`` finds it (the policy's when none is found).
    """
    from meshredirect.graph import Highlight
    from meshredirect.semantics.interpreter import Interpreter
    from meshredirect.semantics.model import Environment
    from meshredirect.semantics.proxy import follow

    env = Environment.for_policy(policy, ruleset)
    if read:
        import attrs

        from meshredirect.node import detect_mesh, environment_for_rules

        env = environment_for_rules(ruleset, base=Environment.for_policy(policy))
        mesh = detect_mesh(ruleset)
        if mesh.found:
            env = attrs.evolve(env, proxy=mesh.proxy(), rerouted_interfaces=mesh.rerouted)
    connection = connection_from_arguments(args, env)
    interpreter = Interpreter(ruleset, env)
    if not args.follow:
        evaluation = interpreter.evaluate(connection)
        return [Highlight.of_trace(evaluation.trace, title=f"{connection}: {evaluation.verdict}")]
    chain = follow(interpreter, connection)
    highlights = []
    for index, step in enumerate(chain.steps, 1):
        title = f"{step.connection}: {step.evaluation.verdict}"
        if index < len(chain.steps):
            title += f"; the proxy opens connection {index + 1}"
        elif chain.looped:
            title += "; LOOP: the chain does not end"
        highlights.append(Highlight.of_trace(step.evaluation.trace, title=title))
    return highlights
