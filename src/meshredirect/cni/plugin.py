"""The plugin's four commands: ADD, DEL, CHECK and VERSION.

:func:`run_plugin` is the whole protocol for one invocation: it reads the
environment and standard input it is given, writes the result (or the CNI
error JSON) and returns the exit status. Nothing escapes as a traceback: an
unexpected exception is reported as plugin error 100 with its type and text.

Which pods get rules: every pod except those in ``exclude_namespaces``, those
matching ``skip_pods``, and, when a ``pod_source`` is configured, those
annotated ``sidecar.istio.io/inject: "false"`` or lacking the
``require_annotation``. A skipped pod's ADD passes the previous result
through and touches nothing.

>>> import io, json
>>> out = io.StringIO()
>>> run_plugin({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}', out, io.StringIO())
0
>>> json.loads(out.getvalue())["supportedVersions"]
['0.4.0', '1.0.0']
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

import attrs

from meshredirect.cni.config import PluginConfig, parse_plugin_config
from meshredirect.cni.protocol import (
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    CniEnvironment,
    CniError,
    PluginCode,
    WellKnown,
    check_version,
    decode_config,
    parse_environment,
    passthrough_result,
    version_result,
)

if TYPE_CHECKING:
    from meshredirect.ir import Ruleset
    from meshredirect.policy import Policy

__all__ = ["Decision", "decide", "run_plugin"]


@attrs.frozen(kw_only=True)
class Decision:
    """What ADD and CHECK do for a pod: the policy (and its compiled ruleset) to install, or why none."""

    policy: Policy | None
    ruleset: Ruleset | None
    reason: str
    #: What the annotations' front end warns about (written to standard error).
    warnings: tuple[str, ...] = ()


def _skip(reason: str) -> Decision:
    return Decision(policy=None, ruleset=None, reason=reason)


def decide(config: PluginConfig, env: CniEnvironment) -> Decision:
    """The rules a pod gets (or why it gets none), from the configuration and the pod's annotations."""
    from meshredirect.compiler import compile_policy

    namespace, name = env.args.pod_namespace, env.args.pod_name
    skip = config.skips(namespace, name)
    if skip:
        return _skip(skip)
    policy = config.base_policy()
    warnings: list[str] = []
    if config.pod_source is not None and namespace and name:
        from meshredirect.cni.annotations import (
            INJECT_ANNOTATION,
            INTERCEPTION_MODE_ANNOTATION,
            NO_INTERCEPTION,
            policy_for_pod,
        )
        from meshredirect.cni.pods import lookup_pod

        pod = lookup_pod(config.pod_source, namespace, name)
        if (pod.annotation(INJECT_ANNOTATION) or "").strip().lower() == "false":
            return _skip(f"pod {namespace}/{name} is annotated {INJECT_ANNOTATION}: false")
        if config.require_annotation and pod.annotation(config.require_annotation) is None:
            return _skip(f"pod {namespace}/{name} lacks the annotation {config.require_annotation}")
        if config.annotations:
            if (pod.annotation(INTERCEPTION_MODE_ANNOTATION) or "").strip() == NO_INTERCEPTION:
                return _skip(f"pod {namespace}/{name} is annotated {INTERCEPTION_MODE_ANNOTATION}: {NO_INTERCEPTION}")
            policy, found = policy_for_pod(
                policy,
                pod.annotation_map,
                container_ports=pod.container_ports,
                inbound_default=config.inbound_ports_default,
            )
            warnings += found
    elif config.require_annotation:
        return _skip("no pod name in CNI_ARGS to look the required annotation up")
    who = f"pod {namespace}/{name}" if namespace and name else "the container"
    return Decision(
        policy=policy,
        ruleset=compile_policy(policy),
        reason=f"{who} gets the {config.preset} policy",
        warnings=tuple(warnings),
    )


def _require_namespace(env: CniEnvironment) -> None:
    import os

    if not os.path.exists(env.netns):
        raise CniError(WellKnown.UNKNOWN_CONTAINER, f"CNI_NETNS: the network namespace {env.netns} does not exist")


def cmd_add(config: PluginConfig, raw: Mapping[str, Any], env: CniEnvironment, version: str, stderr: IO[str]) -> str:
    from meshredirect.cni.rules import load
    from meshredirect.errors import MeshRedirectError

    result = passthrough_result(raw, version)
    decision = decide(config, env)
    if decision.policy is None:
        return result
    for warning in decision.warnings:
        stderr.write(f"meshredirect-cni: warning: {warning}\n")
    _require_namespace(env)
    try:
        load(decision.policy, config, env.netns)
    except MeshRedirectError as exc:
        raise CniError(PluginCode.APPLY_FAILED, f"loading the rules into {env.netns} failed", str(exc)) from None
    return result


def cmd_del(config: PluginConfig, env: CniEnvironment) -> None:
    import os

    from meshredirect.cni.rules import remove
    from meshredirect.errors import MeshRedirectError

    if not env.netns or not os.path.exists(env.netns):
        return
    prefix = config.base_policy().chain_prefix
    try:
        remove(prefix, config, env.netns)
    except MeshRedirectError as exc:
        if not os.path.exists(env.netns):
            return  # the namespace went away while we worked: nothing is left to remove
        raise CniError(PluginCode.CLEANUP_FAILED, f"removing our rules from {env.netns} failed", str(exc)) from None


def cmd_check(config: PluginConfig, raw: Mapping[str, Any], env: CniEnvironment) -> None:
    from meshredirect.cni.rules import differences, installed
    from meshredirect.errors import MeshRedirectError
    from meshredirect.semantics.model import Environment

    if not isinstance(raw.get("prevResult"), dict):
        raise CniError(
            WellKnown.INVALID_NETWORK_CONFIG, "prevResult: CHECK needs the result of the preceding ADD, got nothing"
        )
    decision = decide(config, env)
    if decision.policy is None or decision.ruleset is None:
        return
    _require_namespace(env)
    try:
        found = installed(decision.policy, config, env.netns)
    except MeshRedirectError as exc:
        raise CniError(PluginCode.APPLY_FAILED, f"reading the rules in {env.netns} failed", str(exc)) from None
    problems = differences(decision.ruleset, found, Environment.for_policy(decision.policy))
    if problems:
        raise CniError(
            PluginCode.RULES_DIFFER,
            f"the redirect rules in {env.netns} are missing or changed ({decision.reason})",
            "\n".join(problems),
        )


def run_plugin(environ: Mapping[str, str], stdin: bytes, stdout: IO[str], stderr: IO[str]) -> int:
    """Run one invocation of the plugin; returns the exit status (0 success, 1 a CNI error was written)."""
    version = LATEST_VERSION
    try:
        env = parse_environment(environ)
        if env.command == "VERSION":
            requested = None
            if stdin.strip():
                try:
                    requested = json.loads(stdin).get("cniVersion")
                except (ValueError, AttributeError):
                    requested = None
            stdout.write(version_result(requested) + "\n")
            return 0
        raw = decode_config(stdin)
        if raw.get("cniVersion") in SUPPORTED_VERSIONS:
            version = str(raw["cniVersion"])
        check_version(raw)
        config = parse_plugin_config(raw)
        if env.command == "ADD":
            stdout.write(cmd_add(config, raw, env, version, stderr) + "\n")
        elif env.command == "DEL":
            cmd_del(config, env)
        else:
            cmd_check(config, raw, env)
        return 0
    except CniError as exc:
        stdout.write(exc.to_json(version) + "\n")
        return 1
    except Exception as exc:  # the runtime must get CNI error JSON, never a traceback on stdout
        error = CniError(PluginCode.APPLY_FAILED, f"internal error: {type(exc).__name__}: {exc}")
        stdout.write(error.to_json(version) + "\n")
        stderr.write(f"meshredirect-cni: {error.msg}\n")
        return 1
