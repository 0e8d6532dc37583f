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
    parser.add_argument(
        "--check",
        action="store_true",
        help="prove the backend's output decides as the IR does for this policy and print the proof instead of "
        "the rules (backends that can: ebpf); exit 1 with counterexamples",
    )
    ebpf = parser.add_argument_group("ebpf backend")
    ebpf.add_argument(
        "--local-only",
        action="store_true",
        help="implement the decisions for local connections (nat OUTPUT) and list the other chains (remote "
        "inbound capture, TPROXY) in the README instead of refusing them",
    )
    ebpf.add_argument(
        "--local-address",
        action="append",
        default=[],
        metavar="ADDRS",
        help="this pod's addresses, comma separated: connections to them leave on lo (as -o lo sees them)",
    )
    ebpf.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="NETWORK=INTERFACE",
        help="a route besides the default one via eth0 (for rules that name other interfaces)",
    )
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meshredirect.backend import create_backend
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
    ebpf = {
        "--local-only": args.local_only,
        "--local-address": args.local_address,
        "--route": args.route,
    }
    for flag, value in ebpf.items():
        if value and args.backend != "ebpf":
            raise PolicyError(flag, expected="only with --backend ebpf", got=args.backend)
    if args.backend == "ebpf":
        options["local_only"] = args.local_only
        options["local_addresses"] = [a for item in args.local_address for a in item.split(",") if a.strip()]
        options["routes"] = args.route
    ruleset = compile_policy(policy)
    if args.check and args.backend == "ebpf":
        # The proof runs in the semantics engine's model of the pod; the program is built for its routing.
        if args.local_address or args.route:
            raise PolicyError(
                "--check",
                expected="the semantics engine's environment of the policy (leave out --local-address and --route)",
                got=" ".join([*args.local_address, *args.route]),
            )
        from meshredirect.semantics.model import Environment

        options["environment"] = Environment.for_policy(policy, ruleset)
    backend = create_backend(args.backend, options)
    rendering = backend.render(ruleset)
    status = 0
    if args.check:
        prove = getattr(backend, "prove", None)
        if prove is None:
            raise PolicyError("--check", expected="a backend that can prove its output (ebpf)", got=args.backend)
        proof = prove(ruleset)
        sys.stdout.write(proof.text())
        status = 0 if proof.holds else 1
        if args.out_dir is None:
            return status
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
    if not args.check:
        for artifact in rendering.artifacts:
            print(out_dir / artifact.name)
    return status
