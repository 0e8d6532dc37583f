"""The ``meshredirect`` command line: a thin layer over the library.

Each subcommand lives in its own module under :mod:`meshredirect.commands`
and is imported only when it runs, so start-up stays cheap (a CNI plugin or
an init container runs this once per pod).

Exit status: 0 success; 1 a check found a violation or a difference;
2 bad input (usage, policy, file syntax, unknown backend); 3 the machine
cannot do what was asked (missing tool, privilege or namespace).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, Final, NoReturn

__all__ = ["COMMANDS", "command_parser", "main", "top_parser"]

EXIT_OK: Final = 0
EXIT_VIOLATION: Final = 1
EXIT_USAGE: Final = 2
EXIT_ENVIRONMENT: Final = 3

#: subcommand -> (module, one-line help). Modules define ``configure(parser)`` and ``run(args) -> int``.
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "compile": ("meshredirect.commands.compile", "compile a policy to rules for a backend"),
    "backends": ("meshredirect.commands.backends", "list the installed backends"),
    "trace": ("meshredirect.commands.trace", "follow one connection through the rules and the proxy"),
    "check": ("meshredirect.commands.check", "prove a policy's rules loop-free and complete"),
    "apply": ("meshredirect.commands.apply", "load a policy's rules into a network namespace"),
    "cleanup": ("meshredirect.commands.cleanup", "remove our rules and routing from a network namespace"),
    "validate": ("meshredirect.commands.validate", "check with real connections that capture works"),
    "graph": ("meshredirect.commands.graph", "draw the chains of a policy's rules (Graphviz DOT or SVG)"),
    "istio-iptables": ("meshredirect.commands.istio_iptables", "program what istio-iptables would, from its flags"),
    "fmt": ("meshredirect.commands.fmt", "print a policy file in canonical form"),
    "policy": ("meshredirect.commands.policy", "write the policy file for a set of flags, a pod or a preset"),
    "verify": ("meshredirect.commands.verify", "prove a node's rules loop-free, with the mesh found in them"),
    "diff": (
        "meshredirect.commands.diff",
        "prove where two rule sets (or rules and a policy) treat connections differently",
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<16}{info[1]}" for name, info in COMMANDS.items())
    parser = _Parser(
        prog="meshredirect",
        description="Compile a service mesh's transparent-redirect policy into kernel rules, and prove what they do.",
        epilog=f"commands:\n{lines}\n\nRun 'meshredirect COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return parser


def command_parser(name: str, module: Any = None) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (the documentation renders its help from it)."""
    module = module or importlib.import_module(COMMANDS[name][0])
    parser = _Parser(
        prog=f"meshredirect {name}",
        description=COMMANDS[name][1],
        fromfile_prefix_chars="@",
        epilog="Arguments can also come from a file: @FILE reads one argument per line.",
    )
    module.configure(parser)
    return parser


def top_parser() -> argparse.ArgumentParser:
    """The parser of ``meshredirect`` itself, for its help text."""
    return _top_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        _top_parser().print_help()
        return EXIT_OK if args else EXIT_USAGE
    if args[0] == "--version":
        from meshredirect import __version__

        print(f"meshredirect {__version__}")
        return EXIT_OK
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _top_parser().print_usage(sys.stderr)
        print(f"meshredirect: error: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[name][0])
    if getattr(module, "RAW_ARGUMENTS", False):
        # The command reads its own command line (e.g. istio-iptables' Go-style flags).
        namespace = argparse.Namespace(argv=rest)
    else:
        namespace = command_parser(name, module).parse_args(rest)
    from meshredirect.errors import EnvironmentProblem, MeshRedirectError

    try:
        status: int = module.run(namespace)
    except EnvironmentProblem as exc:
        print(f"meshredirect {name}: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except MeshRedirectError as exc:
        print(f"meshredirect {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    return status


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()
