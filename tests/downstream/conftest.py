"""A downstream project's test set-up: meshredirect's public API and its pytest plugin, nothing else.

This package stands for a mesh team's own CI: it proves Istio's own rule sets
(the conformance data next to it) with meshredirect's testing toolkit. It
imports no test helper of the meshredirect project (``tests/test_testing.py``
checks that every import here is public), and the plugin's fixtures
(``netns``, ``load_rules``, ``loaded_namespace``) come from the ``pytest11``
entry point of the installed package, as they would in any other project.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Final

import attrs
import pytest

from meshredirect import preset
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.ir import Ruleset
from meshredirect.policy import Policy
from meshredirect.semantics import Environment
from meshredirect.testing import as_ruleset

HERE: Final = Path(__file__).resolve().parent
CONFORMANCE: Final = HERE.parent / "data" / "conformance"
#: Istio's expected rules per capture configuration (see the README there).
ISTIO_RULES: Final = sorted((CONFORMANCE / "istio" / "iptables").glob("*.restore"))
#: The nat table of a pod with an Istio 1.4 sidecar, as ``iptables -t nat -S`` printed it.
SEED_RULES: Final = CONFORMANCE / "seed" / "istio-1.4-nat.rules"
#: The group names some Istio cases use, as the node would resolve them.
GROUPS: Final = {"java": 1001, "ftp": 21}


@attrs.frozen(kw_only=True)
class RuleFile:
    """One rule file, what it was generated from, and the pod it is meant for."""

    path: Path
    family: str
    policy: Policy

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def case(self) -> str:
        return self.path.name.split(".")[0]

    @property
    def env(self) -> Environment:
        return Environment.for_policy(self.policy)

    def ruleset(self) -> Ruleset:
        return _read(self.path, self.family)


@cache
def _read(path: Path, family: str) -> Ruleset:
    return as_ruleset(path, family=family, groups=GROUPS)


@cache
def istio_cases() -> dict[str, dict[str, Any]]:
    data = json.loads((CONFORMANCE / "istio" / "cases.json").read_text())
    return {name: {**data["base"], **fields} for name, fields in data["cases"].items()}


def rule_files() -> list[RuleFile]:
    """Every Istio rule file (one per case and family) and the seed rules."""
    files = [
        RuleFile(
            path=path,
            family="ipv6" if ".v6." in path.name else "ipv4",
            policy=policy_from_istio_config(istio_cases()[path.name.split(".")[0]]),
        )
        for path in ISTIO_RULES
    ]
    return [*files, RuleFile(path=SEED_RULES, family="ipv4", policy=preset("istio-1.4"))]


@pytest.fixture(params=rule_files(), ids=lambda f: f.name)
def rule_file(request: pytest.FixtureRequest) -> RuleFile:
    """Each rule file in turn."""
    file: RuleFile = request.param
    return file
