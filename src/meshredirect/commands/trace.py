"""``meshredirect trace``: one connection through a policy's rules, rule by rule, and on through the proxy.

Prints every rule the connection meets (matched or not; a run of more than
12 rules of a chain that do not match shows its first and last, unless
``--all-rules``) and the verdict, then each follow-up connection the proxy
opens for it, to the end of the chain. A local connection is the default; ``--in-if`` (or ``--origin
remote``) makes it arrive from a peer. The connection's family is that of
``--dst`` (``--family`` is the policy's flag: the families it programs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshredirect.commands._connection_args import add_connection_arguments, connection_from_arguments
from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    group = add_connection_arguments(parser, required=True)
    group.add_argument(
        "--no-follow", action="store_true", help="only the connection itself, not the proxy's follow-ups"
    )
    add_all_rules_argument(group)
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.compiler import compile_policy
    from meshredirect.semantics.interpreter import Interpreter
    from meshredirect.semantics.model import Environment
    from meshredirect.semantics.proxy import follow

    policy = policy_from_arguments(args)
    connection = connection_from_arguments(args, Environment.for_policy(policy))
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    interpreter = Interpreter(ruleset, env)
    if args.no_follow:
        explained = interpreter.evaluate(connection).explain(**elision(args))
        sys.stdout.write(f"connection: {connection}\n{explained}\n")
        return 0
    chain = follow(interpreter, connection)
    sys.stdout.write(render_chain(chain, **elision(args)))
    return 0


def elision(args: argparse.Namespace) -> dict[str, Any]:
    """The ``explain`` arguments ``--all-rules`` asks for (none: the default shortening)."""
    return {"elide": None} if args.all_rules else {}


def add_all_rules_argument(parser: Any) -> None:
    parser.add_argument(
        "--all-rules",
        action="store_true",
        help="show every rule a trace meets (default: long runs of rules that do not match are shortened)",
    )


def render_chain(chain: Any, **elide: Any) -> str:
    """Each step's trace, then what happens next (``elide``: see ``Evaluation.explain``)."""
    from meshredirect.semantics.proxy import Arrival

    out: list[str] = []
    for index, step in enumerate(chain.steps, 1):
        out.append(f"connection {index}: {step.connection}")
        out.append(step.evaluation.explain(**elide))
        following = index < len(chain.steps)
        if step.captured and step.arrival.proxy:
            what = f"=> captured to the proxy's {step.arrival.value}"
        elif step.arrival is Arrival.LOCAL:
            what = "=> delivered to a local listener"
        else:
            what = f"=> {step.arrival.value}"
        if step.note:
            what += f" ({step.note})"
        if following:
            what += f"; the proxy opens connection {index + 1}"
        out.append(what)
        out.append("")
    if chain.looped:
        cycle = chain.cycle()
        where = f": connection {cycle[1]} is connection {cycle[0]} again" if cycle else ""
        out.append(f"LOOP: the chain does not end{where}")
    return "\n".join(out).rstrip("\n") + "\n"
