"""``meshredirect trace``: one connection through a policy's rules, rule by rule, and on through the proxy.

Prints every rule the connection meets (matched or not) and the verdict,
then each follow-up connection the proxy opens for it, to the end of the
chain. A local connection is the default; ``--in-if`` (or ``--origin
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
        sys.stdout.write(f"connection: {connection}\n{interpreter.evaluate(connection).explain()}\n")
        return 0
    chain = follow(interpreter, connection)
    sys.stdout.write(render_chain(chain))
    return 0


def render_chain(chain: Any) -> str:
    """Each step's trace, then what happens next."""
    from meshredirect.semantics.proxy import Arrival

    out: list[str] = []
    for index, step in enumerate(chain.steps, 1):
        out.append(f"connection {index}: {step.connection}")
        out.append(step.evaluation.explain())
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
