"""``validate`` in a real pod namespace: it passes where capture works, and where it does not it fails
naming the likely cause (rules absent, the wrong port, another tool's rule first)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from conftest import require_kernel
from kernel.unprivileged import run_cli_as
from meshredirect.apply.actions import apply, cleanup
from meshredirect.apply.netns import Target
from meshredirect.apply.validation import validate
from meshredirect.cli import main
from meshredirect.errors import EnvironmentProblem, PolicyError
from meshredirect.ir import Family
from meshredirect.policy import Policy
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.pod import PodNetwork
from meshredirect.testing.proxy import Server

pytestmark = pytest.mark.kernel

#: Seconds a failing check waits: long enough for a redirected local connection by far.
QUICK = 0.5
DUAL = Policy(families="both")


@pytest.fixture
def pod() -> Iterator[Target]:
    require_kernel()
    with PodNetwork() as net:
        yield net.pod_target


#: (backend, iptables variant): both iptables variants, and nftables.
BACKENDS = [("iptables", "nft"), ("iptables", "legacy"), ("nftables", None)]


@pytest.mark.parametrize(("backend", "variant"), BACKENDS, ids=[f"{b}-{v}" if v else b for b, v in BACKENDS])
@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_validate_passes_where_capture_works(pod: Target, mode: str, backend: str, variant: str | None) -> None:
    policy = Policy(families="both", inbound_mode=mode)
    apply(policy, backend=backend, netns=pod, variant=variant)
    result = validate(policy, netns=pod, timeout=2, backend=backend)
    assert result.ok, result.report()
    assert result.report().splitlines() == [
        f"validate: network namespace {pod.path}",
        "ipv4 outbound: ok: the connection to 192.0.2.1:15002 arrived at port 15001 with original destination "
        "192.0.2.1:15002 (SO_ORIGINAL_DST)",
        "ipv4 inbound: ok: the connection to 10.77.0.1:15002 arrived at port 15006 with original destination "
        "10.77.0.1:15002 (SO_ORIGINAL_DST)",
        "ipv6 outbound: ok: the connection to [2001:db8::1]:15002 arrived at port 15001 with original destination "
        "[2001:db8::1]:15002 (SO_ORIGINAL_DST)",
        "ipv6 inbound: ok: the connection to [fd77::1]:15002 arrived at port 15006 with original destination "
        "[fd77::1]:15002 (SO_ORIGINAL_DST)",
        "capture works",
    ]


def test_validate_fails_without_rules_and_says_so(pod: Target) -> None:
    result = validate(DUAL, netns=pod, timeout=QUICK)
    assert not result.ok
    outbound = result.checks[0]
    assert (outbound.observed, outbound.cause) == (
        "no connection arrived at the capture ports within 0.5 s",
        "rules absent: the ipv4 nat table holds no ISTIO_ chains (run meshredirect apply)",
    )
    inbound = result.checks[1]
    assert inbound.observed == "the connection to 10.77.0.1:15002 was refused (it reached a port where nothing listens)"
    assert result.report().endswith("capture does NOT work as the policy says")


def test_validate_names_the_wrong_port(pod: Target) -> None:
    apply(Policy(outbound_port=15011), netns=pod)
    result = validate(Policy(), netns=pod, timeout=QUICK)
    outbound, inbound = result.checks
    assert not outbound.ok and inbound.ok
    assert (
        outbound.observed == "the connection to 192.0.2.1:15002 was refused (it reached a port where nothing listens)"
    )
    assert outbound.cause == "wrong port: our rules redirect to port(s) 15006,15011, the policy's are 15001,15006"


def test_validate_names_another_tools_rule_that_comes_first(pod: Target) -> None:
    apply(Policy(), netns=pod)
    rule = ["-I", "OUTPUT", "1", "-d", "192.0.2.0/24", "-p", "tcp", "-j", "ACCEPT"]
    assert pod.run(["iptables-nft", "-t", "nat", *rule]).returncode == 0
    (outbound, _) = validate(Policy(), netns=pod, timeout=QUICK).checks
    assert not outbound.ok
    assert outbound.cause == (
        "another tool's rule comes before ours in nat OUTPUT: -A OUTPUT -d 192.0.2.0/24 -p tcp -j ACCEPT"
    )


def test_validate_finds_the_inbound_port_swapped_in(pod: Target) -> None:
    """Rules that send outbound connections to the inbound port: the probe arrives at the wrong listener."""
    apply(Policy(outbound_port=15006, inbound_port=15001), netns=pod)
    (outbound, inbound) = validate(Policy(), netns=pod, timeout=QUICK).checks
    assert (outbound.ok, inbound.ok) == (False, False)
    assert outbound.observed == "the connection to 192.0.2.1:15002 arrived at port 15006 instead of 15001"
    assert outbound.cause == "wrong port: the rules send this connection to the other capture port"


def test_validate_cannot_run_without_a_route_or_with_a_busy_port(pod: Target) -> None:
    require_kernel()
    with NetNamespace() as bare, pytest.raises(EnvironmentProblem) as problem:
        validate(netns=str(bare.path))
    assert str(problem.value) == (
        "no ipv4 route to the probe address 192.0.2.1 in the namespace "
        "(validation needs a route to it (a default route); give another probe address)"
    )
    with Server(pod, "proxy already running", [15001], [socket.AF_INET]), pytest.raises(EnvironmentProblem) as busy:
        validate(netns=pod)
    assert str(busy.value) == (
        f"ipv4 port 15001 is already in use in network namespace {pod.path} "
        "(validate listens on the capture ports itself: run it before the proxy starts)"
    )


def test_a_probe_the_policy_does_not_capture_is_refused() -> None:
    policy = Policy(outbound_cidrs_exclude="192.0.2.0/24")
    with pytest.raises(PolicyError) as refused:
        validate(policy, probe={Family.IPV4: "192.0.2.7"})
    assert str(refused.value) == (
        "probe address: expected an ipv4 destination the policy captures outbound "
        "(it is inside outbound_cidrs_exclude), got '192.0.2.7:15002'"
    )
    with pytest.raises(PolicyError, match=r"^probe address: expected an ipv6 address, got '10\.0\.0\.1'$"):
        validate(probe={Family.IPV6: "10.0.0.1"})


def test_cli_validate_exit_status(pod: Target, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(pod.path)
    assert main(["validate", "--netns", where, "--timeout", "0.3"]) == 1
    out, _ = capsys.readouterr()
    assert "likely cause: rules absent" in out
    apply(DUAL, netns=pod)
    assert main(["validate", "--netns", where, "--family", "both"]) == 0
    assert capsys.readouterr().out.endswith("capture works\n")
    assert main(["validate", "--netns", where, "--probe-address", "nonsense"]) == 2
    assert capsys.readouterr().err == (
        "meshredirect validate: error: --probe-address: expected an IPv4 or IPv6 address, got 'nonsense'\n"
    )
    cleanup(netns=pod)
    assert main(["validate", "--netns", "/var/run/netns/mr-no-such-namespace"]) == 3


def test_validate_runs_unprivileged_in_its_own_namespace(pod: Target) -> None:
    """What a CNI deployment's validation init container does: no root, no capabilities, uid 1000."""
    import meshredirect.api
    import meshredirect.commands.validate  # noqa: F401 (imported before the child drops privileges)

    apply(DUAL, netns=pod)
    status, output = run_cli_as(1000, ["validate", "--family", "both", "--timeout", "1"], inside=pod)
    assert status == 0, output
    assert output.splitlines()[1:] == [
        "ipv4 outbound: ok: the connection to 192.0.2.1:15002 arrived at port 15001 with original destination "
        "192.0.2.1:15002 (SO_ORIGINAL_DST)",
        "ipv4 inbound: skipped: probing as the proxy's uid needs root",
        "ipv6 outbound: ok: the connection to [2001:db8::1]:15002 arrived at port 15001 with original destination "
        "[2001:db8::1]:15002 (SO_ORIGINAL_DST)",
        "ipv6 inbound: skipped: probing as the proxy's uid needs root",
        "capture works",
    ]
    cleanup(netns=pod)
    status, output = run_cli_as(1000, ["validate", "--timeout", "0.3"], inside=pod)
    assert status == 1
    assert (
        "    likely cause: unknown: reading the rules needs CAP_NET_ADMIN (validate runs as uid 1000); "
        "most often our rules are absent"
    ) in output.splitlines()
    status, output = run_cli_as(1337, ["validate"], inside=pod)
    assert (status, output) == (
        3,
        "meshredirect validate: error: validate probes as its own user, whose connections the policy does not "
        "capture (uid 1337 is the proxy's) (run it as another user, or as root)\n",
    )
    status, output = run_cli_as(1000, ["validate", "--netns", str(pod.path)])
    assert status == 3 and "validate in another network namespace needs root" in output


def test_validate_names_causes_from_our_nftables_tables(pod: Target) -> None:
    (outbound,) = validate(Policy(), netns=pod, timeout=QUICK, backend="nftables").checks[:1]
    assert outbound.cause == "rules absent: no nftables table ip istio (run meshredirect apply --backend nftables)"
    apply(Policy(outbound_port=15011), backend="nftables", netns=pod)
    (outbound,) = validate(Policy(), netns=pod, timeout=QUICK, backend="nftables").checks[:1]
    assert not outbound.ok and outbound.cause == (
        "our nftables table ip istio differs from the policy's (applied with other options?): re-apply"
    )
