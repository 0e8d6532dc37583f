"""Golden files pin the compiled rules of every Istio case and of the presets.

Goldens pin output; they do not prove meaning (the semantics tests do). They
are regenerated with ``pytest --update-goldens``, never edited by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance import istio_cases
from meshredirect.api import render, resolve_groups
from meshredirect.compiler import compile_policy
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.policy import Policy
from meshredirect.presets import PRESETS, preset

GOLDEN = Path(__file__).parent / "golden" / "compile"
#: Fixed group ids for the cases that name groups, so goldens do not depend on the machine.
GROUPS = {"java": 1001, "ftp": 1002}

EXTRA: dict[str, Policy] = {
    "dual-stack-tproxy-dns-everything": Policy(
        families="both",
        inbound_mode="TPROXY",
        dns={"enabled": True, "servers": ["10.96.0.10", "fd00::a"]},
        drop_invalid=True,
        exclude_interfaces="eth9",
        reroute_interfaces="net1",
        outbound_cidrs="10.0.0.0/8,fd00::/8",
        outbound_cidrs_exclude="10.96.0.0/12",
        outbound_ports="3306",
        outbound_ports_exclude="5432,6379",
        owner_groups_exclude="2000",
    ),
    "many-ports-split-multiport": Policy(inbound_ports_exclude=list(range(1000, 1040, 2))),
}


def cases() -> dict[str, Policy]:
    out = {
        f"istio-{name}": resolve_groups(policy_from_istio_config(c), GROUPS.get) for name, c in istio_cases().items()
    }
    out.update({f"preset-{name}": preset(name) for name in PRESETS})
    out.update(EXTRA)
    return out


CASES = cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_rules_match_golden(name: str, update_goldens: bool) -> None:
    text = render(compile_policy(CASES[name]), "iptables-save").text()
    path = GOLDEN / f"{name}.rules"
    if update_goldens:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden for {name}: run pytest --update-goldens"
    assert text == path.read_text()
