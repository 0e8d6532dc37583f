"""``meshredirect policy``: write the policy file for a set of flags, a pod, a preset or another policy file.

    meshredirect policy --from-pod pod.yaml --to pod.policy
    meshredirect policy --to mesh.policy --from-istio-flags -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*'

``--from-istio-flags`` takes the rest of the command line: ``istio-iptables``
flags, after leading ``NAME=VALUE`` words for the variables it reads, as in a
shell (``ISTIO_OUTBOUND_OWNER_GROUPS=java -p 15001``). The process's own
environment is not read: the file says what the words say. Group names stay
names (they are resolved where the policy is compiled).
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    from meshredirect.commands._policy_args import add_policy_arguments

    parser.add_argument("--to", metavar="FILE", help="write the policy file here (default: standard output)")
    parser.add_argument(
        "--from-istio-flags",
        nargs=argparse.REMAINDER,
        metavar="FLAG",
        help="start from an istio-iptables command line: every argument after it (NAME=VALUE sets a variable)",
    )
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.commands._policy_args import policy_from_arguments
    from meshredirect.errors import EnvironmentProblem
    from meshredirect.frontends.policy_file import format_policy

    base = None
    if args.from_istio_flags is not None:
        base = _from_istio_flags(args)
    policy = policy_from_arguments(args, base=base, resolve=False)
    text = format_policy(policy)
    if not args.to:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.to, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {args.to}: {exc.strerror}") from None
    print(args.to)
    return 0


def _from_istio_flags(args: argparse.Namespace) -> object:
    import re

    from meshredirect.commands.istio_iptables import build_policy
    from meshredirect.errors import PolicyError
    from meshredirect.frontends.istio_flags import parse_istio_flags

    others = [f for f in ("policy", "from_pod", "preset") if getattr(args, f)]
    if others:
        raise PolicyError(
            "--from-istio-flags", expected="no other starting point", got="--" + others[0].replace("_", "-")
        )
    # Leading NAME=VALUE words set variables, as in a shell: NAME=VALUE istio-iptables -p 15001 ...
    words = list(args.from_istio_flags)
    environ: dict[str, str] = {}
    while words and (match := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", words[0], flags=re.DOTALL)):
        environ[match.group(1)] = match.group(2)
        words.pop(0)
    flags = parse_istio_flags(words, environ)
    policy, warnings = build_policy(flags, detect_ipv6=False, resolve_groups=False)
    if flags.flag("redirect-dns") and not flags.flag("capture-all-dns"):
        warnings.append(f"DNS servers were read from {flags.text('resolv-conf')} on this machine")
    for warning in warnings:
        print(f"meshredirect policy: warning: {warning}", file=sys.stderr)
    return policy
