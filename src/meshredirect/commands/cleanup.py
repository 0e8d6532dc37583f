"""``meshredirect cleanup``: remove our chains, jumps, tables and TPROXY routing from a network namespace.

What is ours is named by the policy's chain prefix (``--chain-prefix``, default
ISTIO); ``--family`` limits the families cleaned (default: both).
"""

from __future__ import annotations

import argparse
import sys

from meshredirect.commands._apply_args import add_target_arguments, variant_of
from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.apply.actions import cleanup

    policy = policy_from_arguments(args)
    families = policy.families if args.policy_families is not None else None
    outcome = cleanup(
        policy,
        backend=args.backend,
        netns=args.netns,
        families=families,
        variant=variant_of(args),
        dry_run=args.dry_run,
    )
    if args.dry_run:
        sys.stdout.write(outcome.documents())
        print(outcome.report(), file=sys.stderr)
    else:
        print(outcome.report())
    return 0
