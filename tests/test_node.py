"""What rules read from a node say about their pod: the mesh's ports and ids, and the pod's environment."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from conformance import ISTIO, SEED
from meshredirect.compiler import compile_policy
from meshredirect.node import detect_mesh, environment_for_rules
from meshredirect.policy import InterceptionMode, LoopbackCapture, Policy
from meshredirect.readers.iptables import read_iptables
from meshredirect.semantics.model import MarkRoute
from meshredirect.testing.strategies import policies
from meshredirect.values import IdSet

GROUPS = {"java": 1001, "ftp": 1002}

#: file -> (outbound port, inbound port, DNS port, uids, gids, TPROXY mark)
DETECTED = {
    "empty.v4.restore": (None, 15006, None, "1337", "1337", None),
    "ipnets.v4.restore": (15001, 15006, None, "1337", "1337", None),
    "dns-uid-gid.v4.restore": (None, 15006, 15053, "3-4", "1-2", None),
    "inbound-ports-wildcard-tproxy.v4.restore": (None, 15006, None, "1337", "1337", 1337),
    "kube-virt-interfaces.v4.restore": (15001, 15006, None, "1337", "1337", None),
    "ipv6-dns-outbound-owner-groups-exclude.v6.restore": (None, 15006, None, "1337", "1337", None),
    "ipv6-ipnets.v6.restore": (15001, 15006, None, "1337", "1337", None),
}


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_the_mesh_is_found_in_istio_rules(name: str) -> None:
    mesh = detect_mesh(read_iptables((ISTIO / "iptables" / name).read_text(), groups=GROUPS))
    got = (mesh.outbound_port, mesh.inbound_port, mesh.dns_port, str(mesh.uids), str(mesh.gids), mesh.tproxy_mark)
    assert got == DETECTED[name]
    assert mesh.prefix == "ISTIO" and mesh.found
    assert [str(a) for a in mesh.passthrough] == (["::6"] if name.endswith(".v6.restore") else ["127.0.0.6"])


def test_the_seed_says_istio_1_4() -> None:
    mesh = detect_mesh(read_iptables(SEED.read_text()))
    assert (mesh.outbound_port, mesh.inbound_port, str(mesh.uids), str(mesh.gids)) == (15001, 15006, "1337", "1337")
    proxy = mesh.proxy()
    assert (proxy.uid, proxy.gid, proxy.outbound_port, proxy.inbound_port) == (1337, 1337, 15001, 15006)
    assert mesh.proxy(uid=101).uids == IdSet.of(101)


def test_rules_without_a_mesh_have_none() -> None:
    mesh = detect_mesh(read_iptables("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n"))
    assert not mesh.found and mesh.prefix is None and not mesh.uids


@settings(max_examples=100, deadline=None)
@given(policies())
def test_the_mesh_found_in_compiled_rules_is_the_policy(policy: Policy) -> None:
    mesh = detect_mesh(compile_policy(policy))
    assert mesh.outbound_port in (None, policy.outbound_port)
    assert mesh.inbound_port in (None, policy.inbound_port)
    if policy.loopback_capture is LoopbackCapture.PROXY and (policy.proxy_uids or policy.proxy_gids):
        assert mesh.inbound_port == policy.inbound_port  # the hairpin always says it
        assert (mesh.uids, mesh.gids) == (policy.proxy_uids, policy.proxy_gids)
    assert mesh.tproxy_mark == (
        policy.tproxy_mark if policy.inbound_mode is InterceptionMode.TPROXY and policy.captures_inbound else None
    )
    if mesh.outbound_port is not None:
        assert set(mesh.rerouted) == set(policy.reroute_interfaces)
    if any(policy.dns.active_for(family) for family in policy.families):
        assert mesh.dns_port == policy.dns.port


def test_the_environment_routes_tproxy_marks_locally_and_has_every_named_interface() -> None:
    ruleset = compile_policy(Policy(inbound_mode="TPROXY", tproxy_mark=7, exclude_interfaces="eth3,veth+"))
    env = environment_for_rules(ruleset)
    assert env.local_marks == (MarkRoute(value=7),)
    assert {"lo", "eth0", "eth3", "veth0"} <= set(env.interface_names)
    assert environment_for_rules(compile_policy(Policy())).local_marks == ()


def test_rerouted_interfaces_are_found() -> None:
    mesh = detect_mesh(read_iptables((ISTIO / "iptables" / "kube-virt-interfaces.v4.restore").read_text()))
    assert set(mesh.rerouted) == {"eth1", "eth2"}
    assert detect_mesh(read_iptables(SEED.read_text())).rerouted == ()
