"""The interpreter agrees with the real kernel: real TCP connections land where ``evaluate`` says.

A pod namespace (eth0 10.0.0.5/24, fd00::5/64; ::6 on lo) and a peer namespace
(10.0.0.1, fd00::1, and every remote address the connections use) are joined by
a veth pair. For each generated policy its compiled rules are loaded into the
pod with ``iptables-restore``; listeners in both namespaces answer every
connection with where it landed (listener, local address, ``SO_ORIGINAL_DST``);
sampled connections are opened for real: local ones from the pod as an app, as
the proxy (uid/gid of the policy), from the passthrough address over lo; remote
ones from the peer. Each outcome is compared with the interpreter's verdict;
every disagreement fails with both answers.
"""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_kernel
from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner
from meshredirect.compiler import compile_policy
from meshredirect.ir import Family, MarkMatch, Rule, Ruleset
from meshredirect.policy import InterceptionMode, Policy
from meshredirect.semantics.interpreter import Dropped, Evaluation, Passed, Redirected, TProxied, evaluate
from meshredirect.semantics.model import Connection, Environment
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.strategies import policies
from meshredirect.testing.traffic import describe
from meshredirect.values import AddressSet, All, PortSet

pytestmark = pytest.mark.kernel

POLICIES = 20
CONNECTIONS = 24
POD = {4: "10.0.0.5", 6: "fd00::5"}
PEER = {4: "10.0.0.1", 6: "fd00::1"}
REMOTE = {4: "203.0.113.10", 6: "2001:db8:ffff::10"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
POD_SUBNET = {4: ipaddress.ip_network("10.0.0.0/24"), 6: ipaddress.ip_network("fd00::/64")}
APP_PORTS = (80, 8080)


class Lab:
    """The two namespaces, and what is loaded in them."""

    def __init__(self, pod: NetNamespace, peer: NetNamespace) -> None:
        self.pod = pod
        self.peer = peer
        self.remote_addresses: set[str] = set()

    def add_remote(self, address: str) -> None:
        if address in self.remote_addresses or address in PEER.values():
            return
        prefix = "/128" if ":" in address else "/32"
        self.peer.run(["ip", "addr", "add", address + prefix, "dev", "lo", *(["nodad"] if ":" in address else [])])
        self.remote_addresses.add(address)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    with NetNamespace() as pod, NetNamespace() as peer:
        pod.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name])
        for ns, side in ((pod, "5"), (peer, "1")):
            ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0"])
            ns.run(["ip", "link", "set", "eth0", "up"])
            ns.run(["ip", "addr", "add", f"10.0.0.{side}/24", "dev", "eth0"])
            ns.run(["ip", "-6", "addr", "add", f"fd00::{side}/64", "dev", "eth0", "nodad"])
        pod.run(["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])
        pod.run(["ip", "route", "add", "default", "via", PEER[4]])
        pod.run(["ip", "-6", "route", "add", "default", "via", PEER[6]])
        macs = {
            ns.name: json.loads(ns.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"] for ns in (pod, peer)
        }
        pod.run(["ip", "-6", "neigh", "replace", PEER[6], "lladdr", macs[peer.name], "dev", "eth0"])
        peer.run(["ip", "-6", "neigh", "replace", POD[6], "lladdr", macs[pod.name], "dev", "eth0"])
        yield Lab(pod, peer)


# ----------------------------------------------------------------------------- connections


def _host(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(network.network_address + (1 if network.num_addresses > 2 else 0))


def _usable_remote(address: str, env: Environment) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.is_multicast or ip.is_link_local or ip.is_unspecified or ip.is_loopback or ip.is_reserved:
        return False
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("0.0.0.0/8"):
        return False
    if ip in POD_SUBNET[ip.version] and address not in (POD[ip.version], PEER[ip.version]):
        return False  # on-link: nobody would answer
    return env.route(ip) == "eth0" and not env.is_local(ip)


def _ports(ports: PortSet | All | None) -> list[int]:
    if ports is None or isinstance(ports, All):
        return []
    return [lo for lo, _hi in ports.intervals[:2]]


def sample_connections(policy: Policy, env: Environment, rng: random.Random) -> list[tuple[Connection, dict[str, Any]]]:
    """(connection, client spec) pairs: app, proxy, passthrough and remote connections of both families."""
    proxy = env.proxy
    dports = [*APP_PORTS, proxy.outbound_port, proxy.inbound_port, 53]
    dports += [p for p in (proxy.tunnel_port, proxy.dns_port) if p is not None]
    for ports in (
        policy.outbound_ports_exclude,
        policy.outbound_ports,
        policy.inbound_ports_exclude,
        policy.inbound_ports,
    ):
        dports += _ports(ports)
    groups = [] if isinstance(policy.owner_groups_include, All) else list(policy.owner_groups_include)
    groups += list(policy.owner_groups_exclude)
    out: list[tuple[Connection, dict[str, Any]]] = []
    for _ in range(CONNECTIONS):
        version = rng.choice([4, 6])
        remotes = [REMOTE[version], PEER[version]]
        for networks in (policy.outbound_cidrs_exclude, policy.outbound_cidrs):
            if isinstance(networks, AddressSet):
                remotes += [_host(n) for n in networks.for_version(version)]
        remotes += [str(s) for s in policy.dns.servers_for(Family.IPV4 if version == 4 else Family.IPV6)]
        remotes = [a for a in remotes if _usable_remote(a, env)]
        dport = rng.choice(dports)
        kinds = ["app", "app", "proxy", "passthrough", "remote", "remote"]
        family = Family.IPV4 if version == 4 else Family.IPV6
        eth0_excluded = any(name in ("eth0", "eth+", "eth0+") for name in policy.exclude_interfaces)
        if proxy.transparent and policy.captures_inbound and family in policy.families and not eth0_excluded:
            # Only where such a connection happens (a connection from the peer was captured inbound) and
            # the policy's CONNMARK rules route the app's replies back to the proxy: the interpreter
            # sees the first packet, the listener needs the handshake.
            kinds.append("transparent")
        kind = rng.choice(kinds)
        if kind == "transparent":
            # The proxy's TPROXY-mode connection to the app: from the peer's address, with the mark.
            src, mark = PEER[version], proxy.tproxy_mark
            dst = POD[version]
            connection = Connection.local(env, dst=dst, dport=dport, src=src, uid=proxy.uid, gid=proxy.gid, mark=mark)
            spec = {"dst": dst, "dport": dport, "src": src, "uid": proxy.uid, "gid": proxy.gid, "mark": mark}
            out.append((connection, {**spec, "transparent": True}))
            continue
        if kind == "remote":
            connection = Connection.remote(src=PEER[version], dst=POD[version], dport=dport, sport=40000)
            out.append((connection, {"dst": POD[version], "dport": dport}))
            continue
        dst = rng.choice([*remotes, POD[version], LOOPBACK[version]]) if kind != "passthrough" else POD[version]
        if kind == "app":
            uid, gid = 1000, rng.choice([1000, *groups]) if groups else 1000
        else:
            uid, gid = proxy.uid, proxy.gid
        src = (
            str(proxy.passthrough_for(Family.IPV4 if version == 4 else Family.IPV6)) if kind == "passthrough" else None
        )
        connection = Connection.local(env, dst=dst, dport=dport, src=src, uid=uid, gid=gid)
        out.append((connection, {"dst": dst, "dport": dport, "src": src, "uid": uid, "gid": gid}))
    return out


# ----------------------------------------------------------------------------- predictions


def predicted(evaluation: Evaluation, env: Environment) -> dict[str, Any] | None:
    """Where the interpreter says the connection lands: listener side and port, and what it reads."""
    verdict = evaluation.verdict
    original = evaluation.original
    where = "pod"
    match verdict:
        case Passed():
            where = "pod" if verdict.local else "peer"
            return {
                "where": where,
                "port": verdict.port,
                "local": str(verdict.address),
                "orig": (str(original.dst), original.dport),
            }
        case Redirected():
            where = "pod" if env.is_local(verdict.address) else "peer"
            return {
                "where": where,
                "port": verdict.port,
                "local": str(verdict.address),
                "orig": (str(original.dst), original.dport),
            }
        case TProxied():
            return {
                "where": "pod",
                "port": verdict.port,
                "local": str(original.dst),
                "orig": (str(original.dst), original.dport),
            }
        case Dropped():
            return None
    raise AssertionError(f"the interpreter could not decide: {verdict}")


def observed(result: dict[str, Any]) -> dict[str, Any] | None:
    reply = result["reply"]
    if reply is None:
        return None
    return {
        "where": reply["where"],
        "port": reply["port"],
        "local": str(ipaddress.ip_address(reply["local"][0])),
        "orig": (str(ipaddress.ip_address(reply["orig"][0])), reply["orig"][1]),
    }


# ----------------------------------------------------------------------------- running


def _listener(ns: NetNamespace, name: str, ports: set[int]) -> subprocess.Popen[str]:
    process = ns.popen(
        [sys.executable, "-m", "meshredirect.testing.traffic", "listen", name, *map(str, sorted(ports))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise AssertionError(
            f"the {name} listener did not start: {line}{process.stderr.read() if process.stderr else ''}"
        )
    return process


def _connect(ns: NetNamespace, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not specs:
        return []
    result = ns.run(
        [sys.executable, "-m", "meshredirect.testing.traffic", "connect"], input=json.dumps(specs), timeout=60
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _tproxy_routes(ns: NetNamespace, policy: Policy, add: bool) -> None:
    if policy.inbound_mode is not InterceptionMode.TPROXY:
        return
    for flag in ("-4", "-6"):
        verb = "add" if add else "del"
        ns.run(
            ["ip", flag, "rule", verb, "fwmark", str(policy.tproxy_mark), "lookup", str(policy.tproxy_route_table)],
            check=add,
        )
        ns.run(
            ["ip", flag, "route", verb, "local", "default", "dev", "lo", "table", str(policy.tproxy_route_table)],
            check=add,
        )


def agreement(
    lab: Lab,
    policy: Policy,
    rng: random.Random,
    variant: str,
    *,
    predict_with: Policy | None = None,
    ruleset: Ruleset | None = None,
    pairs: list[tuple[Connection, dict[str, Any]]] | None = None,
) -> tuple[list[str], list[str]]:
    """Run the sampled connections (or ``pairs``) for real against ``policy``'s rules (or ``ruleset``):
    the disagreements in words, and the verdicts' kinds.

    ``predict_with`` predicts with another policy's rules (to see disagreements found)."""
    loaded = ruleset if ruleset is not None else compile_policy(policy)
    env = Environment.for_policy(policy, loaded)
    model = compile_policy(predict_with) if predict_with is not None else loaded
    if pairs is None:
        pairs = sample_connections(policy, env, rng)
    for _connection, spec in pairs:
        if spec["dst"] not in (*POD.values(), *LOOPBACK.values()):
            lab.add_remote(spec["dst"])
    ports = {spec["dport"] for _c, spec in pairs} | set(env.proxy.listener_ports)
    applier = IptablesApplier(NamespaceRunner(lab.pod.name), variant=variant)
    listeners: list[subprocess.Popen[str]] = []
    try:
        applier.apply(loaded)
        _tproxy_routes(lab.pod, policy, add=True)
        listeners = [_listener(lab.pod, "pod", ports), _listener(lab.peer, "peer", ports)]
        local = [(c, s) for c, s in pairs if c.iif is None]
        remote = [(c, s) for c, s in pairs if c.iif is not None]
        results = _connect(lab.pod, [s for _c, s in local]) + _connect(lab.peer, [s for _c, s in remote])
    finally:
        for process in listeners:
            process.kill()
            process.wait()
        _tproxy_routes(lab.pod, policy, add=False)
        applier.cleanup(policy.chain_prefix)
    problems = []
    kinds = []
    for (connection, _spec), result in zip([*local, *remote], results, strict=True):
        evaluation = evaluate(model, connection, env)
        kinds.append(type(evaluation.verdict).__name__)
        want, got = predicted(evaluation, env), observed(result)
        if want != got:
            kernel = describe(result["reply"]) if result["reply"] else f"no connection ({result['error']})"
            problems.append(
                f"{connection}\n  interpreter: {evaluation.verdict} -> {want}\n  kernel: {kernel}\n"
                + "\n".join("    " + line for line in evaluation.explain().splitlines())
            )
    return problems, kinds


@settings(max_examples=POLICIES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(policy=policies(), seed=st.integers(0, 2**32 - 1), variant=st.sampled_from(["nft", "legacy"]))
def test_real_connections_land_where_the_interpreter_says(lab: Lab, policy: Policy, seed: int, variant: str) -> None:
    problems, _kinds = agreement(lab, policy, random.Random(seed), variant)
    assert not problems, f"{len(problems)} of {CONNECTIONS} disagree ({variant}) for {policy}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "policy",
    [
        Policy(families="dual"),
        Policy(inbound_mode="TPROXY", families="dual"),
        Policy(loopback_capture="all", dns={"enabled": True, "capture_all": True}),
    ],
    ids=["istio", "tproxy", "loopback-all-dns"],
)
def test_fixed_policies_agree_with_the_kernel(lab: Lab, policy: Policy) -> None:
    problems, kinds = agreement(lab, policy, random.Random(7), "nft")
    assert not problems, "\n".join(problems)
    expected = {"Passed", "Redirected"} | ({"TProxied"} if policy.inbound_mode is InterceptionMode.TPROXY else set())
    assert expected <= set(kinds), kinds


def test_a_wrong_prediction_is_caught(lab: Lab) -> None:
    # Predicting with rules that capture nothing outbound must disagree with the kernel running Istio's.
    problems, _kinds = agreement(
        lab, Policy(families="dual"), random.Random(3), "nft", predict_with=Policy(families="dual", outbound_cidrs="")
    )
    assert problems
    assert all("\n  interpreter: " in p and "\n  kernel: " in p for p in problems)
    assert any("kernel: pod:15001 (local 127.0.0.1:15001, original destination" in p for p in problems)


def test_the_tproxy_passthrough_bug_the_check_found_is_real_and_fixed(lab: Lab) -> None:
    """In TPROXY mode the proxy connects to the app from the original source with the TPROXY mark, as
    its own uid. Before the compiler's fix, nat OUTPUT hairpinned that connection to the inbound port
    (127.0.0.1:15006 / [::1]:15006): the check reports a loop. In the kernel, over IPv6 the connection
    lands on the inbound listener, as the interpreter says; over IPv4 its first packet does too, but
    the handshake then fails (the listener's answer, from 127.0.0.1 to a foreign address, cannot be
    routed; the interpreter follows first packets only). The app is never reached either way; with
    the fix it is, as predicted."""
    policy = Policy(inbound_mode="TPROXY", families="dual")
    fixed = compile_policy(policy)
    env = Environment.for_policy(policy, fixed)
    proxy = env.proxy

    def without_mark_return(ruleset: Ruleset) -> Ruleset:
        def keep(table: str, rule: Rule) -> bool:
            return not (table == "nat" and any(isinstance(m, MarkMatch) for m in rule.matches))

        tables = tuple(
            attrs.evolve(
                t, chains=tuple(attrs.evolve(c, rules=tuple(r for r in c.rules if keep(t.name, r))) for c in t.chains)
            )
            for t in ruleset.tables
        )
        return attrs.evolve(ruleset, tables=tables)

    pairs = []
    for version in (4, 6):
        spec = {"dst": POD[version], "dport": 8080, "src": PEER[version], "uid": proxy.uid, "gid": proxy.gid}
        connection = Connection.local(env, mark=proxy.tproxy_mark, **spec)  # type: ignore[arg-type]
        pairs.append((connection, {**spec, "mark": proxy.tproxy_mark, "transparent": True}))
    problems, kinds = agreement(lab, policy, random.Random(0), "nft", ruleset=fixed, pairs=pairs)
    assert not problems, "\n".join(problems)
    assert kinds == ["Passed", "Passed"]
    problems, kinds = agreement(lab, policy, random.Random(0), "nft", ruleset=without_mark_return(fixed), pairs=pairs)
    assert kinds == ["Redirected", "Redirected"]
    # IPv6 takes the redirected connection to the inbound listener for real (the loop); IPv4 drops
    # its handshake instead (the listener's answer from 127.0.0.1 to a foreign address is martian).
    assert len(problems) == 1, "\n".join(problems)
    assert problems[0].startswith(str(pairs[0][0])) and "kernel: no connection" in problems[0]
