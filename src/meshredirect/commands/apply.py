"""``meshredirect apply``: load a policy's rules (and TPROXY routing) into a network namespace."""

from __future__ import annotations

import argparse
import sys

from meshredirect.commands._apply_args import add_target_arguments, variant_of
from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.apply.actions import apply

    policy = policy_from_arguments(args)
    outcome = apply(policy, backend=args.backend, netns=args.netns, variant=variant_of(args), dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(outcome.documents())
        print(outcome.report(), file=sys.stderr)
    else:
        print(outcome.report())
    return 0
