"""``meshredirect fmt FILE...``: print policy files in canonical form (or rewrite them, or check them)."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy files ('-' for standard input)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", "-w", action="store_true", help="rewrite each file in place when it changes")
    mode.add_argument(
        "--check", action="store_true", help="print the files that are not in canonical form and exit 1 if any"
    )


def run(args: argparse.Namespace) -> int:
    from meshredirect.commands._policy_args import read_input
    from meshredirect.errors import EnvironmentProblem
    from meshredirect.frontends.policy_file import format_file

    # Read and format every file before writing any: one bad file changes nothing.
    results = []
    for path in args.files:
        text = read_input(path, "fmt")
        results.append((path, text, format_file(text, path="<stdin>" if path == "-" else path)))
    if args.check:
        changed = [path for path, text, formatted in results if text != formatted]
        for path in changed:
            print(path)
        return 1 if changed else 0
    if args.write:
        for path, text, formatted in results:
            if path == "-":
                sys.stdout.write(formatted)
            elif text != formatted:
                try:
                    with open(path, "w", encoding="utf-8") as handle:
                        handle.write(formatted)
                except OSError as exc:
                    raise EnvironmentProblem(f"cannot write {path}: {exc.strerror}") from None
        return 0
    for _path, _text, formatted in results:
        sys.stdout.write(formatted)
    return 0
