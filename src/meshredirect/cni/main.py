"""``meshredirect-cni``: the CNI plugin executable, and its installer.

Run by a container runtime (no arguments, ``CNI_COMMAND`` in the
environment, the network configuration on standard input) it is the plugin
(:mod:`meshredirect.cni.plugin`). Run with a subcommand it manages the
node's CNI configuration::

    meshredirect-cni install [--conf-dir /etc/cni/net.d] [--plugin-config FILE] [--watch] ...
    meshredirect-cni uninstall [--conf-dir /etc/cni/net.d] [--bin-dir /opt/cni/bin]

Installer exit status: 0 done, 2 bad input (a malformed plugin configuration
or conflist), 3 the machine cannot do it (no configuration yet, a directory
that cannot be written).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

__all__ = ["entry", "main"]

EXIT_USAGE: Final = 2
EXIT_ENVIRONMENT: Final = 3
DEFAULT_CONF_DIR: Final = "/etc/cni/net.d"
DEFAULT_INTERVAL: Final = 5.0
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meshredirect-cni",
        description="meshredirect's chained CNI plugin. Without arguments it speaks the CNI protocol "
        "(CNI_COMMAND in the environment, the network configuration on standard input).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    install = sub.add_parser("install", help="insert the plugin into the node's CNI configuration")
    install.add_argument(
        "--conf-dir", default=DEFAULT_CONF_DIR, help=f"CNI configuration directory ({DEFAULT_CONF_DIR})"
    )
    install.add_argument("--conflist", help="the file to change (default: the one the runtime uses, first by name)")
    install.add_argument(
        "--plugin-config", metavar="FILE", help='JSON object: our plugin entry (default: {"type": "meshredirect-cni"})'
    )
    install.add_argument("--bin-dir", help="also write the plugin launcher into this CNI plugin directory")
    install.add_argument(
        "--launcher-command",
        metavar="CMD",
        help="the launcher runs this command (default: this Python with -m meshredirect.cni)",
    )
    install.add_argument(
        "--via-agent",
        action="store_true",
        help="the launcher runs the plugin inside this installer's container (nsenter --mount into the process "
        "recorded by --watch); the node then needs only /bin/sh and nsenter",
    )
    install.add_argument(
        "--host-conf-dir", help="--conf-dir as the node sees it, when this runs in a container (default: --conf-dir)"
    )
    install.add_argument(
        "--kubernetes",
        action="store_true",
        help="copy this pod's service account token and CA next to the configuration and read pod annotations "
        "from the Kubernetes API (KUBERNETES_SERVICE_HOST/PORT)",
    )
    install.add_argument("--service-account-dir", default=SERVICE_ACCOUNT_DIR, help=argparse.SUPPRESS)
    install.add_argument("--watch", action="store_true", help="keep running; insert again when another tool rewrites")
    install.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL,
        help=f"seconds between checks with --watch ({DEFAULT_INTERVAL})",
    )
    install.add_argument(
        "--uninstall-on-exit", action="store_true", help="with --watch: uninstall when stopped (SIGTERM, SIGINT)"
    )
    uninstall = sub.add_parser("uninstall", help="take the plugin out of the node's CNI configuration")
    uninstall.add_argument("--conf-dir", default=DEFAULT_CONF_DIR)
    uninstall.add_argument("--bin-dir", help="also remove the launcher from this directory")
    return parser


def _plugin_entry(path: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    from meshredirect.cni.config import PLUGIN_TYPE, parse_plugin_config
    from meshredirect.cni.protocol import CniError
    from meshredirect.errors import EnvironmentProblem, PolicyError

    if path is None:
        entry: Any = {"type": PLUGIN_TYPE}
    else:
        from meshredirect.cni.protocol import decode_config

        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise EnvironmentProblem(f"cannot read {path}: {exc.strerror}") from None
        try:
            entry = decode_config(data, source=path)
        except CniError as exc:
            raise PolicyError("--plugin-config", expected="a JSON object", got=exc.msg) from None
    result: dict[str, Any] = {"type": PLUGIN_TYPE, **entry, **extra}
    try:
        parse_plugin_config(result).base_policy()
    except CniError as exc:
        raise PolicyError(f"--plugin-config {path}", expected="a valid meshredirect-cni entry", got=exc.msg) from None
    return result


def _kubernetes_source(state_dir: str) -> dict[str, Any]:
    """The pod source for the plugin on this node: the API server this pod sees, the copied credentials."""
    from meshredirect.errors import EnvironmentProblem

    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise EnvironmentProblem(
            "--kubernetes: KUBERNETES_SERVICE_HOST is not set", remedy="run the installer in a Kubernetes pod"
        )
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return {
        "kind": "kubernetes",
        "api_server": server,
        "token_file": f"{state_dir}/token",
        "ca_file": f"{state_dir}/ca.crt",
    }


def _credentials(args: argparse.Namespace, installer: Any) -> Any:
    from meshredirect.cni.install import write_atomically
    from meshredirect.errors import EnvironmentProblem

    def copy() -> None:
        # Projected service account tokens rotate: copy again whenever they change.
        installer.state_dir.mkdir(mode=0o700, exist_ok=True)
        for name in ("token", "ca.crt"):
            source = Path(args.service_account_dir) / name
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise EnvironmentProblem(f"cannot read {source}: {exc.strerror}") from None
            target = installer.state_dir / name
            if not target.exists() or target.read_bytes() != data:
                write_atomically(target, data, mode=0o600)

    return copy


def _install(args: argparse.Namespace) -> int:
    import signal
    import threading

    from meshredirect.cni.install import PID_FILE, STATE_DIR_NAME, Installer, launcher_script
    from meshredirect.errors import EnvironmentProblem, PolicyError

    if args.interval <= 0:
        raise PolicyError("--interval", expected="a positive number of seconds", got=args.interval)
    if args.via_agent and not args.watch:
        raise PolicyError("--via-agent", expected="with --watch (the watching process is the agent)", got="no --watch")
    if args.uninstall_on_exit and not args.watch:
        raise PolicyError("--uninstall-on-exit", expected="with --watch", got="no --watch")
    host_state = f"{(args.host_conf_dir or args.conf_dir).rstrip('/')}/{STATE_DIR_NAME}"
    launcher = None
    if args.bin_dir is not None:
        import shlex

        command = (
            shlex.split(args.launcher_command) if args.launcher_command else [sys.executable, "-m", "meshredirect.cni"]
        )
        agent = f"{host_state}/{PID_FILE}" if args.via_agent else None
        launcher = launcher_script(command, agent_pid_file=agent)
    # The plugin reads the copied credentials where it runs: in this container with --via-agent, else on the node.
    plugin_state = str(Path(args.conf_dir).absolute() / STATE_DIR_NAME) if args.via_agent else host_state
    extra = {"pod_source": _kubernetes_source(plugin_state)} if args.kubernetes else {}
    installer = Installer(
        args.conf_dir,
        _plugin_entry(args.plugin_config, extra),
        conflist=args.conflist,
        bin_dir=args.bin_dir,
        launcher=launcher,
    )
    if args.kubernetes:
        installer.credentials = _credentials(args, installer)
    if not args.watch:
        print(installer.install_once())
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    pid_file = installer.state_dir / PID_FILE
    if args.via_agent:
        try:
            installer.state_dir.mkdir(mode=0o700, exist_ok=True)
            pid_file.write_text(f"{os.getpid()}\n")
        except OSError as exc:
            raise EnvironmentProblem(f"cannot write {pid_file}: {exc.strerror}") from None
    try:
        installer.watch(args.interval, stop, lambda message: print(message, flush=True))
    finally:
        if args.uninstall_on_exit:
            for message in installer.uninstall():
                print(message, flush=True)
        if args.via_agent and pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from meshredirect.cni.install import Installer

    for message in Installer(args.conf_dir, {}, bin_dir=args.bin_dir).uninstall():
        print(message)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The plugin when run without arguments, else the installer's command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        from meshredirect.cni.plugin import run_plugin

        try:
            data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
        except OSError as exc:
            from meshredirect.cni.protocol import CniError, WellKnown

            sys.stdout.write(CniError(WellKnown.IO_FAILURE, f"cannot read standard input: {exc}").to_json("1.0.0"))
            return 1
        return run_plugin(os.environ, data, sys.stdout, sys.stderr)
    namespace = _parser().parse_args(args)
    from meshredirect.errors import EnvironmentProblem, MeshRedirectError

    try:
        return _install(namespace) if namespace.command == "install" else _uninstall(namespace)
    except EnvironmentProblem as exc:
        print(f"meshredirect-cni {namespace.command}: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except MeshRedirectError as exc:
        print(f"meshredirect-cni {namespace.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()
