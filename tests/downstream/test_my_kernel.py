"""Real-kernel tests with the plugin's fixtures: each test gets a throwaway network namespace.

They need root (and iproute2, iptables); without, they are skipped with the
reason (``MESHREDIRECT_REQUIRE_KERNEL=1`` makes that a failure).
"""

from __future__ import annotations

import pytest

from meshredirect import Policy
from meshredirect.testing import NetNamespace, RuleLoader, assert_equivalent

pytestmark = pytest.mark.kernel


# docs-start: kernel
def test_the_exclusion_is_in_the_kernel(load_rules: RuleLoader) -> None:
    ns = load_rules(Policy(outbound_ports_exclude="22"))
    assert "-p tcp -m tcp --dport 22 -j RETURN" in ns.run(["iptables-save", "-t", "nat"]).stdout


# docs-end: kernel


# docs-start: loaded
@pytest.fixture
def redirect_rules() -> Policy:
    return Policy(outbound_ports_exclude="22", inbound_mode="TPROXY")


def test_what_the_kernel_holds_means_the_policy(loaded_namespace: NetNamespace, redirect_rules: Policy) -> None:
    saved = loaded_namespace.run(["iptables-save"]).stdout
    assert_equivalent(saved, redirect_rules)


# docs-end: loaded
