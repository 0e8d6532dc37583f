"""Real traffic through applied rules and a real proxy running as uid 1337, for every backend, mode and family.

Each cell of the matrix (iptables nf_tables and legacy, REDIRECT and TPROXY) gets its own pod and peer
namespaces (:class:`~meshredirect.testing.pod.PodNetwork`), the policy applied with the apply layer,
servers in both namespaces and the proxy (:mod:`meshredirect.testing.proxy`) in the pod. Every test
then runs in both families. What the tests see is what the kernel did: the proxy's events (what it
accepted, on which port, with which original destination), and the servers' answers (how many proxy
hops the connection took, and which source address reached them).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import pytest

from conftest import require_kernel
from meshredirect.apply.actions import apply
from meshredirect.apply.routing import routes_for
from meshredirect.compiler import compile_policy
from meshredirect.ir import (
    Family,
    Ruleset,
)
from meshredirect.policy import Policy
from meshredirect.semantics import Environment
from meshredirect.testing.assertions import LoopError, assert_loop_free
from meshredirect.testing.mutations import Mutation, mutate
from meshredirect.testing.pod import PodNetwork
from meshredirect.testing.proxy import ProxyProcess, Reply, Server, hops_of, probe

pytestmark = pytest.mark.kernel

#: (backend, iptables variant): both iptables variants, and nftables.
BACKENDS: Final = (("iptables", "nft"), ("iptables", "legacy"), ("nftables", None))
MODES: Final = ("REDIRECT", "TPROXY")
FAMILIES: Final = (4, 6)
APP_PORT: Final = 8080
HEALTH_PORT: Final = 15021
EXCLUDED_PORT: Final = 9443
MAX_HOPS: Final = 4
A = PodNetwork.ADDRESSES


def policy_for(mode: str) -> Policy:
    return Policy(
        families="both",
        inbound_mode=mode,
        outbound_ports_exclude=str(EXCLUDED_PORT),
        outbound_cidrs_exclude=[A["excluded_network"][4], A["excluded_network"][6]],
        exclude_interfaces="eth1",
    )


@attrs.frozen(kw_only=True)
class Cell:
    net: PodNetwork
    backend: str
    variant: str | None
    mode: str
    policy: Policy
    proxy: ProxyProcess

    def accepts(self, reply: Reply) -> list[dict[str, Any]]:
        assert reply.id is not None
        return [event for event in self.proxy.events_of(reply.id) if event["event"] == "accept"]


@pytest.fixture(
    scope="module",
    params=[(backend, variant, mode) for backend, variant in BACKENDS for mode in MODES],
    ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}",
)
def cell(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cell]:
    require_kernel()
    backend, variant, mode = request.param
    policy = policy_for(mode)
    families = [socket.AF_INET, socket.AF_INET6]
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(PodNetwork())
        apply(policy, backend=backend, netns=net.pod_target, variant=variant)
        stack.enter_context(Server(net.pod_target, "app", [APP_PORT, HEALTH_PORT], families))
        stack.enter_context(Server(net.peer_target, "peer", [APP_PORT, EXCLUDED_PORT], families))
        events = Path(tmp_path_factory.mktemp("proxy")) / "events"
        proxy = stack.enter_context(
            ProxyProcess(net.pod_target, events, mode=mode, max_hops=MAX_HOPS, connect_timeout=1)
        )
        assert (proxy.ready["uid"], proxy.ready["gid"]) == (1337, 1337)
        yield Cell(net=net, backend=backend, variant=variant, mode=mode, policy=policy, proxy=proxy)


@pytest.mark.parametrize("v", FAMILIES, ids=["ipv4", "ipv6"])
def test_app_outbound_reaches_the_proxy_with_its_original_destination_once(cell: Cell, v: int) -> None:
    reply = probe(cell.net.pod_target, A["peer"][v], APP_PORT)
    assert (reply.server, reply.hops, reply.error) == ("peer", 1, None)
    (accept,) = cell.accepts(reply)
    assert accept["kind"] == "outbound" and accept["local"][1] == cell.policy.outbound_port
    assert (accept["original"], accept["how"]) == ([A["peer"][v], APP_PORT], "SO_ORIGINAL_DST")
    # The proxy's upstream connection is the one the server saw: it was not captured again.
    (upstream,) = [e for e in cell.proxy.events_of(reply.id or "") if e["event"] == "upstream"]
    assert reply.peer is not None and upstream["source"] == list(reply.peer)
    assert reply.peer[0] == A["pod"][v]


@pytest.mark.parametrize("v", FAMILIES, ids=["ipv4", "ipv6"])
def test_inbound_from_the_peer_reaches_the_inbound_port_and_the_passthrough_is_not_captured(cell: Cell, v: int) -> None:
    reply = probe(cell.net.peer_target, A["pod"][v], APP_PORT)
    assert (reply.server, reply.hops, reply.error) == ("app", 1, None)
    (accept,) = cell.accepts(reply)
    assert accept["kind"] == "inbound" and accept["original"] == [A["pod"][v], APP_PORT]
    assert reply.peer is not None
    if cell.mode == "TPROXY":
        # Diverted, not NATed: the transparent socket's local address is the original destination,
        # and the app sees the original client (the proxy connects from it, with the mark).
        assert (accept["local"], accept["how"]) == ([A["pod"][v], APP_PORT], "local address (not NATed)")
        assert reply.peer[0] == A["peer"][v]
    else:
        assert (accept["local"][1], accept["how"]) == (cell.policy.inbound_port, "SO_ORIGINAL_DST")
        assert reply.peer[0] == str(cell.policy.passthrough_for(Family.IPV4 if v == 4 else Family.IPV6))


@pytest.mark.parametrize("v", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    "case",
    [
        ("excluded outbound port", "pod", "peer", EXCLUDED_PORT, "peer", "pod"),
        ("excluded outbound CIDR", "pod", "peer_excluded", APP_PORT, "peer", "pod"),
        ("excluded interface, outbound", "pod", "peer_eth1", APP_PORT, "peer", "pod_eth1"),
        ("excluded interface, inbound", "peer", "pod_eth1", APP_PORT, "app", "peer_eth1"),
        ("health port, inbound", "peer", "pod", HEALTH_PORT, "app", "peer"),
    ],
    ids=lambda case: case[0].replace(" ", "-").replace(",", ""),
)
def test_exclusions_and_the_health_port_bypass_the_proxy(
    cell: Cell, v: int, case: tuple[str, str, str, int, str, str]
) -> None:
    """(what, which side connects, to which address, port, which server answers, from which source)"""
    name, side, destination, port, server, source = case
    target = cell.net.pod_target if side == "pod" else cell.net.peer_target
    reply = probe(target, A[destination][v], port)
    assert (reply.server, reply.hops, reply.error) == (server, 0, None), name
    assert reply.peer is not None and reply.peer[0] == A[source][v], name
    assert cell.accepts(reply) == [], name


# ----------------------------------------------------------------------------- broken rulesets loop


def broken_for(policy: Policy, mutation: Mutation) -> Ruleset:
    """The policy's rules with one mistake (:mod:`meshredirect.testing.mutations`)."""
    return mutate(compile_policy(policy), mutation, Environment.for_policy(policy).proxy)


def predicted_loop(ruleset: Ruleset, policy: Policy) -> bool:
    """Whether the semantics engine finds a loop (:func:`meshredirect.testing.assertions.assert_loop_free`)."""
    try:
        assert_loop_free(ruleset, Environment.for_policy(policy))
    except LoopError:
        return True
    return False


@pytest.mark.parametrize("v", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("breakage", ["owner exemptions removed", "passthrough exemption removed"])
def test_a_broken_ruleset_makes_a_real_loop_that_ends_at_the_hop_bound(cell: Cell, v: int, breakage: str) -> None:
    outbound = breakage.startswith("owner")
    broken = broken_for(cell.policy, Mutation.DROP_PROXY_EXEMPTIONS if outbound else Mutation.DROP_PASSTHROUGH)
    where = cell.net.pod_target
    apply(broken, backend=cell.backend, netns=where, variant=cell.variant, routing=routes_for(cell.policy))
    try:
        client, address = (where, A["peer"][v]) if outbound else (cell.net.peer_target, A["pod"][v])
        reply = probe(client, address, APP_PORT)
        accepts = cell.accepts(reply)
        kind = "outbound" if outbound else "inbound"
        if cell.mode == "TPROXY" and v == 4 and not outbound:
            # IPv4 only: nat OUTPUT redirects the marked passthrough (foreign source) to 127.0.0.1, and
            # IPv4 routes no reply from 127.0.0.1 to a remote address: the captured connection hangs.
            assert hops_of(accepts) == [1]
            assert reply.server is None and (reply.error or "").startswith("upstream: ")
        else:
            # Every hop is the proxy accepting its own connection again, to the same original destination.
            assert reply.loop and reply.hops == MAX_HOPS + 1
            assert hops_of(accepts) == list(range(1, MAX_HOPS + 2))
            assert {event["kind"] for event in accepts[1:]} == {kind}
            assert {tuple(event["original"]) for event in accepts} == {(A["peer" if outbound else "pod"][v], APP_PORT)}
        assert predicted_loop(broken, cell.policy), "the semantics engine does not predict the loop the kernel shows"
    finally:
        outcome = apply(cell.policy, backend=cell.backend, netns=where, variant=cell.variant)
        assert outcome.changed


def test_the_correct_ruleset_is_predicted_loop_free() -> None:
    for mode in MODES:
        policy = policy_for(mode)
        assert not predicted_loop(compile_policy(policy), policy)
