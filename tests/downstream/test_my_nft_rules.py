"""Proving that a hand-written nftables ruleset (``data/mesh.nft.json``, as ``nft -j list ruleset``
prints it) means exactly what a meshredirect policy means."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshredirect import Policy
from meshredirect.testing import NetNamespace, NotEquivalentError, assert_equivalent, assert_loop_free

# docs-start: nft
MESH_NFT = Path(__file__).parent / "data" / "mesh.nft.json"


def test_my_nft_rules_mean_the_default_policy() -> None:
    assert_equivalent(MESH_NFT, Policy())  # Istio's defaults, IPv4
    assert_loop_free(MESH_NFT)


# docs-end: nft


def test_the_same_rules_in_an_inet_table_also_capture_ipv6() -> None:
    # docs-start: inet
    inet = MESH_NFT.read_text().replace('"family": "ip"', '"family": "inet"')
    with pytest.raises(NotEquivalentError) as caught:
        assert_equivalent(inet, Policy())
    # docs-end: inet
    # the first difference is an IPv6 connection: the inet table captures it, the IPv4 policy does not
    error = caught.value
    assert error.connection is not None and error.connection.family.value == "ipv6"
    lines = str(error).splitlines()
    assert lines[1].startswith("  first:  redirected to [")
    assert lines[2].startswith("  second: passed to [")
    assert lines[3] == "  differs in: verdict"


@pytest.mark.kernel
def test_the_kernel_lists_rules_that_still_mean_the_policy(netns: NetNamespace) -> None:
    netns.run(["nft", "-j", "-f", str(MESH_NFT)])
    listed = netns.run(["nft", "-j", "list", "ruleset"]).stdout
    assert_equivalent(listed, Policy())
