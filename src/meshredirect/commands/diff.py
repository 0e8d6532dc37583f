"""``meshredirect diff A [B]``: where two rule sets treat connections differently, by proof.

``A`` and ``B`` are rule files (``-``: standard input, for one of them). Without ``B``, ``A`` is
compared with the rules of the policy the policy flags describe (Istio's production setting by
default). Every class of connections is compared (the semantics engine's equivalence proof); the
output lists each class on which the two differ, with an example connection and both verdicts.
Nothing is listed when they are equivalent.

Exit status: 0 equivalent, 1 different, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments
from meshredirect.commands._rules_args import STDIN, add_rules_arguments, read_rules

ASPECTS = {
    "verdict": "",
    "ctmark": " (same verdict, different connection mark)",
    "zone": " (same verdict, different conntrack zone)",
    "unknown": " (a verdict cannot be decided: the rules use a match or target the engine does not model)",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Prove where two rule sets treat connections differently: every class of connections is compared, "
        "and each class that differs is listed with an example connection and both verdicts. Without B, "
        "A is compared with the rules of the policy the policy flags describe. Exit status: 0 equivalent, "
        "1 different, 2 bad input."
    )
    parser.add_argument("a", metavar="A", help="a rule file (iptables-save, iptables -S or restore input; '-': stdin)")
    parser.add_argument("b", metavar="B", nargs="?", help="another rule file (default: the policy's rules)")
    parser.add_argument("--trace", action="store_true", help="show both traces of each example connection")
    add_rules_arguments(parser)
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.compiler import compile_policy
    from meshredirect.errors import PolicyError
    from meshredirect.node import environment_for_rules
    from meshredirect.semantics.equivalence import equivalence_report
    from meshredirect.semantics.model import Environment

    if args.a == STDIN and args.b == STDIN:
        raise PolicyError("B", expected="at most one rule file read from standard input", got=STDIN)
    first = read_rules(args.a, args)
    if args.b is not None:
        second = read_rules(args.b, args)
        env = environment_for_rules(first, second)
        label_b = args.b
    else:
        policy = policy_from_arguments(args)
        second = compile_policy(policy)
        env = environment_for_rules(first, second, base=Environment.for_policy(policy))
        label_b = "the policy"
    label_a = "stdin" if args.a == STDIN else args.a
    label_b = "stdin" if label_b == STDIN else label_b
    report = equivalence_report(first, second, env)
    out = sys.stdout
    if report.equivalent:
        print(f"equivalent: {label_a} and {label_b} treat every connection alike "
              f"({report.classes} classes of connections, {report.paths} paths)", file=out)  # fmt: skip
        return 0
    count = len(report.differences)
    print(f"{label_a} and {label_b} differ on {count} class{'es' if count != 1 else ''} of connections "
          f"(of {report.classes}, {report.paths} paths):", file=out)  # fmt: skip
    width = max(len(label_a), len(label_b)) + 1
    for index, difference in enumerate(report.differences, 1):
        print(file=out)
        print(f"{index}. {difference.description}{ASPECTS.get(difference.aspect, '')}", file=out)
        print(f"   e.g. {difference.example}", file=out)
        print(f"   {(label_a + ':').ljust(width)} {difference.first.verdict}", file=out)
        print(f"   {(label_b + ':').ljust(width)} {difference.second.verdict}", file=out)
        if args.trace:
            for label, evaluation in ((label_a, difference.first), (label_b, difference.second)):
                print(f"   trace in {label}:", file=out)
                for line in evaluation.explain().splitlines():
                    print(f"     {line}", file=out)
    return 1
