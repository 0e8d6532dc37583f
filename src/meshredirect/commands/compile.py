"""``meshredirect compile``: print (or write) the rules a policy compiles to."""

from __future__ import annotations

import argparse
import sys

from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        "-B",
        default="iptables-restore",
        help="backend to lower to (default: iptables-restore; see 'meshredirect backends')",
    )
    parser.add_argument(
        "--installed",
        metavar="FAMILY=FILE",
        action="append",
        default=[],
        help="iptables-restore: the target's current iptables-save output (e.g. ipv4=saved.v4), so that the "
        "document replaces our rules there instead of adding to them",
    )
    parser.add_argument("--out-dir", help="write each artifact to this directory instead of printing")
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meshredirect.api import render
    from meshredirect.compiler import compile_policy
    from meshredirect.errors import EnvironmentProblem, PolicyError

    policy = policy_from_arguments(args)
    options: dict[str, object] = {}
    if args.installed:
        if args.backend != "iptables-restore":
            raise PolicyError("--installed", expected="only with --backend iptables-restore", got=args.backend)
        installed: dict[str, str] = {}
        for item in args.installed:
            family, sep, path = item.partition("=")
            if not sep or family not in ("ipv4", "ipv6"):
                raise PolicyError("--installed", expected="FAMILY=FILE with FAMILY ipv4 or ipv6", got=item)
            try:
                installed[family] = Path(path).read_text()
            except OSError as exc:
                raise EnvironmentProblem(f"cannot read {path}: {exc.strerror}") from None
        options["installed"] = installed
    rendering = render(compile_policy(policy), args.backend, **options)
    if args.out_dir is None:
        sys.stdout.write(rendering.text())
        return 0
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for artifact in rendering.artifacts:
            (out_dir / artifact.name).write_text(artifact.content)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write to {out_dir}: {exc.strerror}") from None
    for artifact in rendering.artifacts:
        print(out_dir / artifact.name)
    return 0
