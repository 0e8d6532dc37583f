"""Put meshredirect-cni into the node's CNI configuration, keep it there, and take it out again.

The runtime uses the first file of its configuration directory (sorted by
name, extensions ``.conf``, ``.conflist``, ``.json``). The installer appends
our plugin entry to that file's ``plugins`` list (a single-plugin ``.conf``
becomes a ``.conflist`` holding it and ours), writing a temporary file and
renaming it over the old one, so the runtime never reads half a file.
Installing twice changes nothing. :meth:`Installer.watch` polls and inserts
again whenever another tool (the main CNI's own installer, typically)
rewrites the file. Uninstalling restores each file byte for byte as it was
before our insertion, unless another tool changed it since, in which case
only our entry is taken out.

State (the original bytes of every file we changed) lives in a subdirectory
of the configuration directory, which runtimes do not read.

>>> conflist = b'{"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}'
>>> updated = insert_plugin(conflist, {"type": "meshredirect-cni"}, source="10-k8s.conflist")
>>> [p["type"] for p in json.loads(updated)["plugins"]]
['bridge', 'meshredirect-cni']
>>> insert_plugin(updated, {"type": "meshredirect-cni"}, source="10-k8s.conflist") is None
True
>>> [p["type"] for p in json.loads(remove_plugin(updated, source="x"))["plugins"]]
['bridge']
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from meshredirect.cni.config import PLUGIN_TYPE
from meshredirect.errors import EnvironmentProblem, SourceError, SourcePosition

__all__ = [
    "CONFIG_SUFFIXES",
    "LAUNCHER_NAME",
    "Installer",
    "choose_config",
    "insert_plugin",
    "launcher_script",
    "remove_plugin",
]

#: What libcni reads from the configuration directory.
CONFIG_SUFFIXES: Final = (".conf", ".conflist", ".json")
LAUNCHER_NAME: Final = PLUGIN_TYPE
STATE_DIR_NAME: Final = "meshredirect"
STATE_FILE: Final = "installed.json"
PID_FILE: Final = "agent.pid"
LAUNCHER_MARK: Final = "# meshredirect-cni launcher"


def choose_config(names: list[str]) -> str | None:
    """The file a runtime uses: the first configuration file by name.

    >>> choose_config(["99-loopback.conf", "10-calico.conflist", "notes.txt"])
    '10-calico.conflist'
    """
    candidates = sorted(n for n in names if n.endswith(CONFIG_SUFFIXES) and not n.startswith("."))
    return candidates[0] if candidates else None


def _decode(data: bytes, source: str) -> dict[str, Any]:
    text = data.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        start = text.rfind("\n", 0, exc.pos) + 1
        end = text.find("\n", exc.pos)
        line = text[start : end if end != -1 else len(text)]
        raise SourceError(
            SourcePosition(source, exc.lineno, exc.colno, line), f"expected a CNI configuration (JSON): {exc.msg}"
        ) from None
    if not isinstance(value, dict):
        raise SourceError(SourcePosition(source, 1, 1, text.splitlines()[0] if text else ""), "expected a JSON object")
    return value


def _encode(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def as_conflist(config: dict[str, Any]) -> dict[str, Any]:
    """A single-plugin configuration (``.conf``) as the equivalent plugin list."""
    if "plugins" in config:
        return config
    plugin = {k: v for k, v in config.items() if k not in ("cniVersion", "name")}
    out: dict[str, Any] = {"name": config.get("name", "k8s-pod-network")}
    if "cniVersion" in config:
        out = {"cniVersion": config["cniVersion"], **out}
    out["plugins"] = [plugin]
    return out


def insert_plugin(data: bytes, plugin: Mapping[str, Any], *, source: str) -> bytes | None:
    """The configuration with ``plugin`` as the last entry of its list; None if it is already exactly there."""
    config = as_conflist(_decode(data, source))
    plugins = config.get("plugins")
    if not isinstance(plugins, list):
        raise SourceError(SourcePosition(source, 1, 1, ""), 'expected "plugins" to be a list')
    ours = [p for p in plugins if isinstance(p, dict) and p.get("type") == plugin.get("type")]
    if len(ours) == 1 and plugins[-1] == dict(plugin) and "plugins" in _decode(data, source):
        return None
    config["plugins"] = [p for p in plugins if p not in ours] + [dict(plugin)]
    return _encode(config)


def remove_plugin(data: bytes, *, source: str, plugin_type: str = PLUGIN_TYPE) -> bytes:
    """The configuration without entries of ``plugin_type``."""
    config = _decode(data, source)
    plugins = config.get("plugins")
    if isinstance(plugins, list):
        config["plugins"] = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == plugin_type)]
    return _encode(config)


def has_plugin(data: bytes, plugin: Mapping[str, Any], *, source: str) -> bool:
    try:
        return insert_plugin(data, plugin, source=source) is None
    except SourceError:
        return False


def launcher_script(command: list[str], *, agent_pid_file: str | None = None) -> str:
    """The executable the runtime finds in its plugin directory: it runs ``command`` with the CNI protocol.

    With ``agent_pid_file`` it runs ``command`` inside the installer container's
    mount namespace (``nsenter --target PID --mount``, PID read from the file the
    watching installer writes), so the node needs only ``/bin/sh`` and
    ``nsenter``: Python, meshredirect and the iptables tools all come from the
    container image. When no agent is running it answers CNI error 11 (try
    again later).

    >>> print(launcher_script(["/usr/local/bin/python3", "-m", "meshredirect.cni"]), end="")
    #!/bin/sh
    # meshredirect-cni launcher: written by 'meshredirect-cni install', removed by 'uninstall'.
    exec /usr/local/bin/python3 -m meshredirect.cni "$@"
    """
    lines = ["#!/bin/sh", f"{LAUNCHER_MARK}: written by 'meshredirect-cni install', removed by 'uninstall'."]
    if agent_pid_file is None:
        lines.append(f'exec {shlex.join(command)} "$@"')
    else:
        quoted = shlex.quote(agent_pid_file)
        lines += [
            f"pid=$(cat {quoted} 2>/dev/null)",
            'if [ -n "$pid" ] && [ -e "/proc/$pid/ns/mnt" ]; then',
            "  export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f'  exec nsenter --target "$pid" --mount -- {shlex.join(command)} "$@"',
            "fi",
            'printf \'%s\\n\' \'{"cniVersion": "1.0.0", "code": 11, "msg": "meshredirect-cni: the node agent is '
            f"not running (no live process in {agent_pid_file}); try again later\"}}'",
            "exit 1",
        ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.meshredirect-tmp")
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise EnvironmentProblem(f"cannot write {path}: {exc.strerror}") from None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Installer:
    """Inserts and removes our plugin entry in a CNI configuration directory (see the module docstring)."""

    def __init__(
        self,
        conf_dir: str | Path,
        plugin: Mapping[str, Any],
        *,
        conflist: str | None = None,
        bin_dir: str | Path | None = None,
        launcher: str | None = None,
        credentials: Callable[[], None] | None = None,
    ) -> None:
        self.conf_dir = Path(conf_dir)
        self.plugin = {"type": PLUGIN_TYPE, **plugin}
        self.conflist = conflist
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.launcher = launcher
        self.credentials = credentials

    @property
    def state_dir(self) -> Path:
        return self.conf_dir / STATE_DIR_NAME

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        try:
            value = json.loads((self.state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"files": {}}
        except (OSError, json.JSONDecodeError) as exc:
            raise EnvironmentProblem(f"cannot read {self.state_dir / STATE_FILE}: {exc}") from None
        return value if isinstance(value, dict) and isinstance(value.get("files"), dict) else {"files": {}}

    def _save_state(self, state: dict[str, Any]) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot create {self.state_dir}: {exc.strerror}") from None
        write_atomically(self.state_dir / STATE_FILE, _encode(state), mode=0o600)

    # ------------------------------------------------------------------ install

    def _target(self) -> str | None:
        try:
            names = [p.name for p in self.conf_dir.iterdir() if p.is_file()]
        except OSError as exc:
            raise EnvironmentProblem(f"cannot list {self.conf_dir}: {exc.strerror}") from None
        if self.conflist is not None:
            return self.conflist if self.conflist in names else None
        return choose_config(names)

    def install_once(self) -> str:
        """Make sure our entry is in the runtime's configuration file (and the launcher in place); says what it did."""
        if self.credentials is not None:
            self.credentials()
        self._install_launcher()
        name = self._target()
        if name is None:
            raise EnvironmentProblem(
                f"no CNI configuration in {self.conf_dir} yet",
                remedy="the main network plugin writes one when it is ready; 'install --watch' waits for it",
            )
        path = self.conf_dir / name
        data = path.read_bytes()
        updated = insert_plugin(data, self.plugin, source=str(path))
        if updated is None:
            return f"{path}: already holds {PLUGIN_TYPE}"
        written = path if name.endswith(".conflist") or "plugins" in _decode(data, str(path)) else None
        if written is None:
            written = path.with_suffix(".conflist")
        state = self._state()
        state["files"][written.name] = {
            "original_name": name,
            "original": base64.b64encode(data).decode(),
            "written": _sha(updated),
        }
        self._save_state(state)
        write_atomically(written, updated, mode=path.stat().st_mode & 0o7777)
        if written != path:
            path.unlink()
            return f"{path}: converted to {written.name} with {PLUGIN_TYPE} appended"
        return f"{path}: {PLUGIN_TYPE} appended"

    def _install_launcher(self) -> None:
        if self.bin_dir is None or self.launcher is None:
            return
        target = self.bin_dir / LAUNCHER_NAME
        try:
            current = target.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            current = None
        if current != self.launcher:
            write_atomically(target, self.launcher.encode(), mode=0o755)

    # ------------------------------------------------------------------ uninstall

    def uninstall(self) -> list[str]:
        """Take our entry out of every file we changed (byte for byte when untouched since); remove the launcher."""
        state = self._state()
        messages: list[str] = []
        for written_name, record in sorted(state["files"].items()):
            written = self.conf_dir / written_name
            original = self.conf_dir / record["original_name"]
            try:
                current = written.read_bytes()
            except FileNotFoundError:
                messages.append(f"{written}: gone; nothing to restore")
                continue
            if _sha(current) == record["written"]:
                write_atomically(original, base64.b64decode(record["original"]))
                if written != original:
                    written.unlink()
                messages.append(f"{original}: restored as it was before {PLUGIN_TYPE} was added")
            elif has_plugin(current, {"type": PLUGIN_TYPE}, source=str(written)) or PLUGIN_TYPE.encode() in current:
                write_atomically(written, remove_plugin(current, source=str(written)))
                messages.append(f"{written}: changed by another tool since; removed only {PLUGIN_TYPE}")
            else:
                messages.append(f"{written}: no longer holds {PLUGIN_TYPE}")
        # Files we never recorded (a state lost with its directory) still get our entry taken out.
        for path in sorted(self.conf_dir.iterdir()):
            if path.is_file() and path.name.endswith(CONFIG_SUFFIXES) and path.name not in state["files"]:
                data = path.read_bytes()
                if PLUGIN_TYPE.encode() in data:
                    write_atomically(path, remove_plugin(data, source=str(path)))
                    messages.append(f"{path}: removed {PLUGIN_TYPE}")
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        if self.bin_dir is not None:
            launcher = self.bin_dir / LAUNCHER_NAME
            try:
                if LAUNCHER_MARK in launcher.read_text():
                    launcher.unlink()
                    messages.append(f"{launcher}: removed")
            except (FileNotFoundError, UnicodeDecodeError):
                pass
        return messages

    # ------------------------------------------------------------------ watch

    def watch(
        self,
        interval: float,
        stop: threading.Event,
        report: Callable[[str], None],
    ) -> None:
        """Insert now and again whenever the file loses our entry, every ``interval`` seconds, until ``stop``."""
        last = ""
        while not stop.is_set():
            try:
                message = self.install_once()
            except EnvironmentProblem as exc:
                message = f"waiting: {exc}"
            except SourceError as exc:
                message = f"waiting: {exc}"
            if message != last and not message.endswith(f"already holds {PLUGIN_TYPE}"):
                report(message)
            last = message
            stop.wait(interval)
