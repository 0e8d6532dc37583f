"""A small container runtime's CNI side, for tests: it runs plugin lists exactly as the specification says.

:class:`CniRuntime` looks each plugin's ``type`` up in its plugin
directories (as ``CNI_PATH``), derives every plugin's configuration from the
network configuration list (``cniVersion`` and ``name`` from the list,
``capabilities`` removed, ``runtimeConfig`` from the capabilities the plugin
declares and the runtime's capability arguments, ``prevResult``), runs it with
the protocol's environment variables and the configuration on standard input,
and reads its result or its error. ADD runs the list in order and caches the
final result per attachment (network name, container id, interface); CHECK
runs it in order with that result (nothing when ``disableCheck`` is true);
DEL runs it in reverse with that result and forgets it. The first error stops
the list and is raised as :class:`CniPluginError`.

With ``exec_netns`` every plugin runs inside that network namespace
(``nsenter --net``), standing in for the node: a test's "host" stays a
throwaway namespace.

>>> runtime = CniRuntime(["/nonexistent"])
>>> runtime.find_plugin("bridge")
Traceback (most recent call last):
...
meshredirect.testing.cni.CniRuntimeError: plugin 'bridge': no executable of that name in /nonexistent
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Attachment", "CniPluginError", "CniRuntime", "CniRuntimeError"]


class CniRuntimeError(Exception):
    """The runtime itself cannot go on (a plugin that is not installed, output that is not JSON)."""


class CniPluginError(Exception):
    """A plugin reported a CNI error (or exited nonzero)."""

    def __init__(self, plugin: str, command: str, status: int, error: Mapping[str, Any], stderr: str) -> None:
        self.plugin = plugin
        self.command = command
        self.status = status
        self.error = dict(error)
        self.code = error.get("code")
        self.msg = error.get("msg")
        self.details = error.get("details")
        self.stderr = stderr
        super().__init__(f"{plugin} {command}: exit {status}, CNI error {self.code}: {self.msg}")


@attrs.frozen(kw_only=True)
class Attachment:
    """The per-attachment parameters: what identifies a container's place on a network."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    #: ``CNI_ARGS`` pairs, e.g. ``{"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "cart"}``.
    args: tuple[tuple[str, str], ...] = ()
    #: Capability arguments, offered to plugins that declare the capability.
    capability_args: tuple[tuple[str, Any], ...] = ()

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


class CniRuntime:
    """Runs CNI network configuration lists (see the module docstring)."""

    def __init__(
        self, plugin_dirs: Sequence[str | Path], *, exec_netns: str | None = None, timeout: float = 60
    ) -> None:
        self.plugin_dirs = [Path(d) for d in plugin_dirs]
        self.exec_netns = exec_netns
        self.timeout = timeout
        self.cache: dict[tuple[str, str, str], dict[str, Any]] = {}
        #: Every plugin execution: (type, command, configuration given, exit status, stdout).
        self.log: list[tuple[str, str, dict[str, Any], int, str]] = []

    # ------------------------------------------------------------------ one plugin

    def find_plugin(self, plugin_type: str) -> Path:
        for directory in self.plugin_dirs:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        listing = ":".join(str(d) for d in self.plugin_dirs)
        raise CniRuntimeError(f"plugin {plugin_type!r}: no executable of that name in {listing}")

    def environment(self, command: str, attachment: Attachment | None) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command}
        env["CNI_PATH"] = ":".join(str(d) for d in self.plugin_dirs)
        if attachment is not None:
            env.update(
                CNI_CONTAINERID=attachment.container_id,
                CNI_NETNS=attachment.netns,
                CNI_IFNAME=attachment.ifname,
                CNI_ARGS=attachment.cni_args(),
            )
        return env

    def exec_plugin(
        self, plugin_type: str, command: str, stdin: bytes, attachment: Attachment | None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one plugin with the protocol's environment; returns the finished process as it is."""
        executable = str(self.find_plugin(plugin_type))
        argv = [executable] if self.exec_netns is None else ["nsenter", f"--net={self.exec_netns}", "--", executable]
        return subprocess.run(
            argv,
            input=stdin,
            env=self.environment(command, attachment),
            capture_output=True,
            timeout=self.timeout,
            check=False,
        )

    def invoke(
        self, plugin_type: str, command: str, config: Mapping[str, Any], attachment: Attachment | None
    ) -> dict[str, Any] | None:
        """Run one plugin; its JSON result (None when it printed nothing), or :class:`CniPluginError`."""
        done = self.exec_plugin(plugin_type, command, json.dumps(config).encode(), attachment)
        stdout = done.stdout.decode("utf-8", "replace")
        self.log.append((plugin_type, command, dict(config), done.returncode, stdout))
        parsed: Any = None
        if stdout.strip():
            try:
                parsed = json.loads(stdout)
            except json.JSONDecodeError:
                if done.returncode == 0:
                    raise CniRuntimeError(f"{plugin_type} {command}: output is not JSON: {stdout[:200]!r}") from None
        if done.returncode != 0:
            error = parsed if isinstance(parsed, dict) else {"code": None, "msg": stdout.strip() or None}
            raise CniPluginError(plugin_type, command, done.returncode, error, done.stderr.decode("utf-8", "replace"))
        return parsed if isinstance(parsed, dict) else None

    def version(self, plugin_type: str, cni_version: str = "1.0.0") -> dict[str, Any]:
        """The plugin's VERSION answer."""
        result = self.invoke(plugin_type, "VERSION", {"cniVersion": cni_version}, None)
        if result is None:
            raise CniRuntimeError(f"{plugin_type} VERSION: printed nothing")
        return result

    # ------------------------------------------------------------------ lists

    @staticmethod
    def derive(
        network: Mapping[str, Any], plugin: Mapping[str, Any], attachment: Attachment, previous: Any
    ) -> dict[str, Any]:
        """One plugin's execution configuration, as the specification's section 3 derives it."""
        config = {k: v for k, v in plugin.items() if k != "capabilities"}
        config["cniVersion"] = network["cniVersion"]
        config["name"] = network["name"]
        capabilities = plugin.get("capabilities") or {}
        runtime_config = {k: v for k, v in attachment.capability_args if capabilities.get(k)}
        if runtime_config:
            config["runtimeConfig"] = runtime_config
        if previous is not None:
            config["prevResult"] = previous
        return config

    def _key(self, network: Mapping[str, Any], attachment: Attachment) -> tuple[str, str, str]:
        return (str(network["name"]), attachment.container_id, attachment.ifname)

    def add(self, network: Mapping[str, Any], attachment: Attachment) -> dict[str, Any]:
        """ADD every plugin in order, each given the previous one's result; the final result is cached."""
        previous: dict[str, Any] | None = None
        for plugin in network["plugins"]:
            result = self.invoke(plugin["type"], "ADD", self.derive(network, plugin, attachment, previous), attachment)
            if result is None:
                raise CniRuntimeError(f"{plugin['type']} ADD: printed no result")
            previous = result
        assert previous is not None
        self.cache[self._key(network, attachment)] = previous
        return previous

    def check(self, network: Mapping[str, Any], attachment: Attachment) -> None:
        """CHECK every plugin in order with the cached ADD result (nothing when ``disableCheck``)."""
        if network.get("disableCheck") in (True, "true"):
            return
        previous = self.cache.get(self._key(network, attachment))
        if previous is None:
            raise CniRuntimeError("CHECK needs a preceding ADD of this attachment")
        for plugin in network["plugins"]:
            self.invoke(plugin["type"], "CHECK", self.derive(network, plugin, attachment, previous), attachment)

    def delete(self, network: Mapping[str, Any], attachment: Attachment) -> None:
        """DEL every plugin in reverse order with the cached ADD result (if any); then forget it."""
        previous = self.cache.get(self._key(network, attachment))
        for plugin in reversed(network["plugins"]):
            self.invoke(plugin["type"], "DEL", self.derive(network, plugin, attachment, previous), attachment)
        self.cache.pop(self._key(network, attachment), None)
