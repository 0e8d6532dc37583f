"""``meshredirect check``: prove a policy's rules loop-free, complete and true to their exclusions.

Exit status 0 when every property holds, 1 with the counterexamples otherwise
(each a concrete connection with its interception chain and traces).
"""

from __future__ import annotations

import argparse
import sys

from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--examples",
        type=int,
        default=3,
        metavar="N",
        help="counterexamples shown per violated property, with their traces (3)",
    )
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.errors import PolicyError
    from meshredirect.semantics.check import check

    if args.examples < 0:
        raise PolicyError("--examples", expected="a number 0 or more", got=args.examples)
    report = check(policy_from_arguments(args))
    sys.stdout.write(report.summary(examples=args.examples) + "\n")
    return 0 if report.ok else 1
