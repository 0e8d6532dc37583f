"""The CNI protocol as a plugin sees it: environment, configuration on standard input, results and errors.

Pure: nothing here reads the environment or a file by itself; callers pass
them in, so every rule of the specification (versions 0.4.0 and 1.0.0) is
tested without a runtime.

>>> env = parse_environment({"CNI_COMMAND": "VERSION"})
>>> env.command
'VERSION'
>>> print(version_result("0.4.0"))
{"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0"]}
>>> error = CniError(WellKnown.INVALID_ENVIRONMENT, "CNI_IFNAME: expected an interface name, got ''")
>>> print(error.to_json("1.0.0"))
{"cniVersion": "1.0.0", "code": 4, "msg": "CNI_IFNAME: expected an interface name, got ''"}
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = [
    "COMMANDS",
    "LATEST_VERSION",
    "SUPPORTED_VERSIONS",
    "CniArgs",
    "CniEnvironment",
    "CniError",
    "PluginCode",
    "WellKnown",
    "decode_config",
    "parse_cni_args",
    "parse_environment",
    "passthrough_result",
    "version_result",
]

#: The CNI specification versions this plugin speaks (CHECK and prevResult on DEL arrived in 0.4.0).
SUPPORTED_VERSIONS: Final = ("0.4.0", "1.0.0")
LATEST_VERSION: Final = SUPPORTED_VERSIONS[-1]
COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION")

#: A container id or network name: an alphanumeric, then alphanumerics, '_', '.' or '-'.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Linux interface names: 1-15 characters, not '.' or '..', no '/', ':' or white space.
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")
_CNI_ARG_KEY = re.compile(r"^[A-Za-z0-9_]+$")


class WellKnown(enum.IntEnum):
    """The specification's well-known error codes (1-99 are reserved for these)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11


class PluginCode(enum.IntEnum):
    """meshredirect-cni's own error codes (100 and above, as the specification allows)."""

    #: Loading the rules into the pod's namespace failed.
    APPLY_FAILED = 100
    #: The pod source (a manifest directory, the Kubernetes API) could not be read or is malformed.
    POD_SOURCE = 101
    #: The pod is not known to the pod source.
    POD_NOT_FOUND = 102
    #: The Kubernetes API refused the service account (authentication or RBAC).
    NOT_AUTHORISED = 103
    #: The pod's annotations describe an invalid or refused policy.
    INVALID_ANNOTATION = 104
    #: CHECK: our rules in the pod's namespace are missing or differ from the compiled policy.
    RULES_DIFFER = 110
    #: Removing the rules from the pod's namespace failed.
    CLEANUP_FAILED = 111


class CniError(Exception):
    """An error reported to the runtime as CNI error JSON (``code``, ``msg``, optional ``details``)."""

    def __init__(self, code: int, msg: str, details: str | None = None) -> None:
        self.code = int(code)
        self.msg = msg
        self.details = details
        super().__init__(f"CNI error {self.code}: {msg}" + (f" ({details})" if details else ""))

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str) -> str:
        return json.dumps(self.to_dict(cni_version))


@attrs.frozen(kw_only=True)
class CniArgs:
    """``CNI_ARGS``: ``KEY=VALUE`` pairs separated by ``;`` (Kubernetes runtimes pass the pod's name here)."""

    values: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        for name, value in self.values:
            if name == key:
                return value
        return None

    @property
    def pod_namespace(self) -> str | None:
        return self.get("K8S_POD_NAMESPACE") or None

    @property
    def pod_name(self) -> str | None:
        return self.get("K8S_POD_NAME") or None


@attrs.frozen(kw_only=True)
class CniEnvironment:
    """The protocol parameters of one invocation."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: CniArgs = CniArgs()
    path: tuple[str, ...] = ()


def parse_cni_args(text: str) -> CniArgs:
    """Read ``CNI_ARGS``; a pair without ``=`` or with a malformed key is an error (code 4).

    >>> parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d").pod_name
    'cart-7d'
    >>> parse_cni_args("K8S_POD_NAME")
    Traceback (most recent call last):
    ...
    meshredirect.cni.protocol.CniError: CNI error 4: CNI_ARGS: expected KEY=VALUE pairs separated by ';', got 'K8S_POD_NAME'
    """
    pairs: list[tuple[str, str]] = []
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not _CNI_ARG_KEY.match(key.strip()):
            raise CniError(
                WellKnown.INVALID_ENVIRONMENT,
                f"CNI_ARGS: expected KEY=VALUE pairs separated by ';', got {item!r}",
            )
        pairs.append((key.strip(), value.strip()))
    return CniArgs(values=tuple(pairs))


def parse_environment(environ: Mapping[str, str]) -> CniEnvironment:
    """The protocol parameters from the environment, checked as the specification requires per command.

    ADD and CHECK need ``CNI_CONTAINERID``, ``CNI_NETNS`` and ``CNI_IFNAME``; DEL
    needs the container id and interface name (the namespace may be gone);
    VERSION needs only ``CNI_COMMAND``. Errors are code 4 and name the variable.

    >>> parse_environment({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"})
    Traceback (most recent call last):
    ...
    meshredirect.cni.protocol.CniError: CNI error 4: CNI_NETNS: required for ADD, got nothing
    """
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        shown = repr(command) if command else "nothing"
        raise CniError(
            WellKnown.INVALID_ENVIRONMENT, f"CNI_COMMAND: expected one of {', '.join(COMMANDS)}, got {shown}"
        )
    if command == "VERSION":
        return CniEnvironment(command=command)
    required = ("CNI_CONTAINERID", "CNI_IFNAME") if command == "DEL" else ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    for name in required:
        if not environ.get(name):
            raise CniError(WellKnown.INVALID_ENVIRONMENT, f"{name}: required for {command}, got nothing")
    container_id = environ.get("CNI_CONTAINERID", "")
    if not _IDENTIFIER.match(container_id):
        raise CniError(
            WellKnown.INVALID_ENVIRONMENT,
            "CNI_CONTAINERID: expected an alphanumeric followed by alphanumerics, '_', '.' or '-', "
            f"got {container_id!r}",
        )
    ifname = environ.get("CNI_IFNAME", "")
    if not _IFNAME.match(ifname) or ifname in (".", ".."):
        raise CniError(
            WellKnown.INVALID_ENVIRONMENT,
            f"CNI_IFNAME: expected an interface name of 1-15 characters without '/', ':' or spaces, got {ifname!r}",
        )
    netns = environ.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(WellKnown.INVALID_ENVIRONMENT, f"CNI_NETNS: expected an absolute path, got {netns!r}")
    return CniEnvironment(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
    )


def _position(text: str, index: int) -> tuple[int, int, str]:
    line = text.count("\n", 0, index) + 1
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return line, index - start + 1, text[start : end if end != -1 else len(text)]


def decode_config(data: bytes, *, source: str = "<stdin>") -> dict[str, Any]:
    """The network configuration JSON object; undecodable input is code 6 with line, column and a caret.

    >>> decode_config(b'{"cniVersion": "1.0.0"}')
    {'cniVersion': '1.0.0'}
    >>> decode_config(b'{"cniVersion": "1.0.0",}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    meshredirect.cni.protocol.CniError: CNI error 6: <stdin>:1:24: expected a JSON network configuration: Expecting property name enclosed in double quotes ...
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CniError(
            WellKnown.DECODE_FAILURE,
            f"{source}: expected UTF-8 JSON, got a byte 0x{data[exc.start]:02x} at {exc.start}",
        ) from None
    if not text.strip():
        raise CniError(WellKnown.DECODE_FAILURE, f"{source}: expected a JSON network configuration, got nothing")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        line, column, context = _position(text, exc.pos)
        pad = " " * (column - 1)
        raise CniError(
            WellKnown.DECODE_FAILURE,
            f"{source}:{line}:{column}: expected a JSON network configuration: {exc.msg}",
            f"    {context}\n    {pad}^",
        ) from None
    if not isinstance(value, dict):
        raise CniError(
            WellKnown.DECODE_FAILURE, f"{source}: expected a JSON object, got {type(value).__name__} {value!r:.40}"
        )
    return value


def check_version(config: Mapping[str, Any]) -> str:
    """The configuration's ``cniVersion`` if supported, else error 1 (incompatible version)."""
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        shown = repr(version) if version is not None else "nothing (which means 0.1.0)"
        raise CniError(
            WellKnown.INCOMPATIBLE_VERSION,
            f"cniVersion: expected one of {', '.join(SUPPORTED_VERSIONS)}, got {shown}",
        )
    return str(version)


def version_result(requested: str | None = None) -> str:
    """The VERSION answer, in the requested version when supported."""
    version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
    return json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def passthrough_result(config: Mapping[str, Any], cni_version: str) -> str:
    """ADD's output for a chained plugin that changes no interface: ``prevResult`` unchanged.

    Only ``cniVersion`` is set (to the configuration's, as results must match it).

    >>> passthrough_result({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}}, "1.0.0")
    '{"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}'
    """
    previous = config.get("prevResult")
    if not isinstance(previous, dict):
        raise CniError(
            WellKnown.INVALID_NETWORK_CONFIG,
            "prevResult: expected the result of the main plugin (meshredirect-cni is a chained plugin and must "
            f"follow one in a plugin list), got {'nothing' if previous is None else type(previous).__name__}",
        )
    return json.dumps({**previous, "cniVersion": cni_version})
