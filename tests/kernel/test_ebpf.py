"""The eBPF backend's program in a real kernel: compiled with clang, loaded and attached with bpftool to a
fresh cgroup v2, with real TCP connections from processes in that cgroup inside throwaway namespaces.

The pod namespace has eth0 (10.0.0.5, fd00::5) joined by a veth pair to a remote namespace (10.0.0.9,
fd00::9); servers answer on 8080 and 15008 on both sides; a proxy (uid/gid 1337) listens on 15001 and
15006, reads SO_ORIGINAL_DST and forwards. Cgroups, pins, programs, processes and namespaces are removed
even when a test fails. Skipped only when the kernel refuses BPF itself (a trivial program does not load).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings

from conftest import require_kernel
from meshredirect.apply.ebpf import BpfFilesystem, LoadedProgram, bpf_refused, load
from meshredirect.backend import Rendering
from meshredirect.compiler import compile_policy
from meshredirect.ir import Family, OwnerMatch, Return, Ruleset
from meshredirect.policy import Policy
from meshredirect.testing.cgroup import Cgroup
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.pytest_plugin import require
from meshredirect.testing.strategies import policies
from meshredirect_ebpf import ConnectCall, EbpfBackend, Environment, Rewritten, Unchanged, decide

pytestmark = pytest.mark.kernel

ACTORS: Final = str(Path(__file__).with_name("mesh_actors.py"))
POD: Final = {4: "10.0.0.5", 6: "fd00::5"}
REMOTE: Final = {4: "10.0.0.9", 6: "fd00::9"}
PORTS: Final = (8080, 15008)
APP: Final = (1000, 1000)
PROXY: Final = (1337, 1337)
MAX_HOPS: Final = 4
READY_SECONDS: Final = 10.0
ENVIRONMENT: Final = Environment.pod(POD[4], POD[6])
#: Ports of the remote DNS-like servers (UDP and TCP): 53, and one DNS capture leaves alone.
DNS_PORTS: Final = (53, 5353)


def without_owner_exemptions(ruleset: Ruleset) -> Ruleset:
    """The ruleset with the proxy's uid/gid RETURN rules removed: the proxy's own traffic is captured again."""

    def keep(rule: Any) -> bool:
        return not (isinstance(rule.target, Return) and any(isinstance(m, OwnerMatch) for m in rule.matches))

    tables = tuple(
        attrs.evolve(t, chains=tuple(attrs.evolve(c, rules=tuple(filter(keep, c.rules))) for c in t.chains))
        for t in ruleset.tables
    )
    return attrs.evolve(ruleset, tables=tables)


@attrs.define
class Mesh:
    pod: NetNamespace
    remote: NetNamespace
    cgroup: Cgroup
    loaded: LoadedProgram
    processes: list[subprocess.Popen[str]] = attrs.field(factory=list)

    def start(self, ns: NetNamespace, argv: list[str], *, in_cgroup: bool = True) -> subprocess.Popen[str]:
        command = ["ip", "netns", "exec", ns.name, sys.executable, ACTORS, *argv]
        process = subprocess.Popen(
            self.cgroup.enter(command) if in_cgroup else command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], READY_SECONDS)
        line = process.stdout.readline() if ready else ""
        assert '"ready"' in line, f"{argv[0]} did not start: {line!r} {process.stderr.read() if not ready else ''}"
        return process

    def connect(self, identity: tuple[int, int], targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        uid, gid = identity
        command = ["ip", "netns", "exec", self.pod.name, sys.executable, ACTORS, "client", "--targets"]
        command += [json.dumps(targets), "--uid", str(uid), "--gid", str(gid)]
        result = subprocess.run(self.cgroup.enter(command), capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        results: list[dict[str, Any]] = json.loads(result.stdout)
        return results

    def stop(self) -> list[str]:
        """End our processes (by pid) and return what each wrote."""
        outputs = []
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            out, _ = process.communicate(timeout=10)
            outputs.append(out)
        self.processes.clear()
        return outputs


def _setup_network(pod: NetNamespace, remote: NetNamespace) -> None:
    pod.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", remote.name])
    for ns, me in ((pod, POD), (remote, REMOTE)):
        ns.run(["ip", "addr", "add", f"{me[4]}/24", "dev", "eth0"])
        ns.run(["ip", "addr", "add", f"{me[6]}/64", "dev", "eth0", "nodad"])
        ns.run(["ip", "link", "set", "eth0", "up"])
    pod.run(["ip", "addr", "add", "::6/128", "dev", "lo"])
    macs = {}
    for ns in (pod, remote):
        macs[ns.name] = json.loads(ns.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"]
    pod.run(["ip", "-6", "neigh", "replace", REMOTE[6], "lladdr", macs[remote.name], "dev", "eth0"])
    remote.run(["ip", "-6", "neigh", "replace", POD[6], "lladdr", macs[pod.name], "dev", "eth0"])


@contextlib.contextmanager
def _bpf_ready() -> Iterator[tuple[BpfFilesystem, Path]]:
    require_kernel()
    with tempfile.TemporaryDirectory(prefix="mr-ebpf-") as work, BpfFilesystem() as bpffs:
        reason = bpf_refused(Path(work), bpffs.path)
        if reason is not None:
            require(reason)  # skipped, or failed where real-kernel tests must run (MESHREDIRECT_REQUIRE_KERNEL=1)
        yield bpffs, Path(work)


@contextlib.contextmanager
def mesh(ruleset: Ruleset, *, dns_port: int | None = None) -> Iterator[Mesh]:
    """Namespaces, cgroup, program attached, servers and proxy running; all removed afterwards."""
    rendering = EbpfBackend(environment=ENVIRONMENT, local_only=True).render(ruleset)
    with _bpf_ready() as (bpffs, work), NetNamespace() as pod, NetNamespace() as remote, Cgroup() as cgroup:
        _setup_network(pod, remote)
        loaded = load(rendering, work, bpffs.path / "meshredirect")
        world = Mesh(pod=pod, remote=remote, cgroup=cgroup, loaded=loaded)
        try:
            loaded.attach(cgroup.path)
            listen = ["--listen", "0.0.0.0", "--listen", "::"]
            for port in PORTS:
                world.start(remote, ["server", "--name", "remote", "--port", str(port), *listen], in_cgroup=False)
                world.start(pod, ["server", "--name", "pod", "--port", str(port), *listen])
            proxy = ["proxy", "--max-hops", str(MAX_HOPS)]
            if dns_port is not None:
                proxy += ["--dns", str(dns_port)]
                for port in DNS_PORTS:
                    world.start(
                        remote, ["server", "--name", "remote", "--udp", "--port", str(port), *listen], in_cgroup=False
                    )
            world.start(pod, proxy)
            yield world
        finally:
            world.stop()
            loaded.detach(cgroup.path)
            attached = loaded.attached(cgroup.path)
            loaded.remove()
            assert attached == [], f"programs still attached: {attached}"


def _target(address: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"address": address, "port": port, **extra}


# ----------------------------------------------------------------------------- the traffic the issue names


def test_app_is_redirected_with_original_destination_and_the_proxy_is_not() -> None:
    with mesh(compile_policy(Policy(families="both"))) as world:
        (app4, app6) = world.connect(APP, [_target(REMOTE[4], 8080), _target(REMOTE[6], 8080)])
        (direct,) = world.connect(PROXY, [_target(REMOTE[4], 8080)])
        (hairpin,) = world.connect(PROXY, [_target(POD[4], 8080)])
        (local,) = world.connect(APP, [_target("127.0.0.1", 8080)])
        outputs = world.stop()
    # The app's connection reached the proxy's outbound listener, which read the original destination
    # and reached the remote server as uid 1337 (not redirected again); the app saw the address it asked for.
    for result, version in ((app4, 4), (app6, 6)):
        reply = result["reply"]
        assert reply["who"] == "proxy-outbound", result
        assert reply["original"] == [REMOTE[version], 8080]
        assert reply["upstream"]["who"] == "remote"
        assert reply["hop"] in (1, 2)
        assert result["peer"] == [REMOTE[version], 8080]
    # The proxy's own connection went straight to the server.
    assert direct["reply"] == {"who": "remote", "peer": [POD[4], direct["reply"]["peer"][1]]}
    # The proxy calling the pod's own address over lo is captured inbound; its passthrough from
    # 127.0.0.6 reaches the app's server and is not captured again.
    assert hairpin["reply"]["who"] == "proxy-inbound"
    assert hairpin["reply"]["original"] == [POD[4], 8080]
    assert hairpin["reply"]["upstream"]["who"] == "pod"
    assert hairpin["reply"]["upstream"]["peer"][0] == "127.0.0.6"
    # Loopback destinations are never captured.
    assert local["reply"]["who"] == "pod"
    accepts = [json.loads(line) for line in outputs[-1].splitlines() if '"accept"' in line]
    assert len(accepts) == 3  # two outbound, one inbound: nothing else reached the proxy


def test_without_the_owner_exemption_the_proxy_loops_until_its_hop_limit() -> None:
    ruleset = without_owner_exemptions(compile_policy(Policy()))
    with mesh(ruleset) as world:
        (result,) = world.connect(APP, [_target(REMOTE[4], 8080)])
        outputs = world.stop()
    accepts = [json.loads(line) for line in outputs[-1].splitlines() if '"accept"' in line]
    # Every hop of the proxy was redirected back to the proxy, until the hop limit ended it.
    assert len(accepts) == MAX_HOPS + 1
    assert all(a["original"] == [REMOTE[4], 8080] for a in accepts)
    reply, depth = result["reply"], 0
    while "upstream" in reply:
        assert reply["who"] == "proxy-outbound"
        reply, depth = reply["upstream"], depth + 1
    assert reply["error"] == "hop limit" and depth == MAX_HOPS


def test_dns_queries_reach_the_proxys_resolver_and_answers_come_from_the_server_asked() -> None:
    policy = Policy(families="both", dns={"enabled": True, "servers": [REMOTE[4], REMOTE[6]]})
    udp = {"udp": True}
    with mesh(compile_policy(policy), dns_port=policy.dns.port) as world:
        connected, unconnected, unconnected6, other_port, tcp = world.connect(
            APP,
            [
                _target(REMOTE[4], 53, connected=True, **udp),
                _target(REMOTE[4], 53, **udp),
                _target(REMOTE[6], 53, **udp),
                _target(REMOTE[4], 5353, **udp),
                _target(REMOTE[4], 53),
            ],
        )
        (proxy_query,) = world.connect(PROXY, [_target(REMOTE[4], 53, **udp)])
    # connect() and sendto() of the app's UDP sockets go to the proxy's resolver on 15053; the answer
    # reads as coming from the server the app asked (recvmsg), and so does the connected peer.
    for result, version in ((connected, 4), (unconnected, 4), (unconnected6, 6)):
        assert result["reply"]["who"] == "proxy-dns", result
        assert result["from"] == [REMOTE[version], 53], result
    assert connected["peer"] == [REMOTE[4], 53]
    # TCP to port 53 is captured as well; UDP to another port and the proxy's own queries are not.
    assert tcp["reply"]["who"] == "proxy-dns"
    assert other_port["reply"]["who"] == "remote" and other_port["from"] == [REMOTE[4], 5353]
    assert proxy_query["reply"] == {"who": "remote", "peer": [POD[4], proxy_query["reply"]["peer"][1]]}


# ----------------------------------------------------------------------------- the kernel agrees with the model

IDENTITIES: Final = {"app": APP, "proxy": PROXY, "proxy-uid": (1337, 1000), "proxy-gid": (1000, 1337)}


def _grid() -> list[dict[str, Any]]:
    targets = []
    for port in PORTS:
        for address in (REMOTE[4], POD[4], "127.0.0.1", REMOTE[6], POD[6], "::1"):
            targets.append(_target(address, port))
        targets.append(_target(f"::ffff:{REMOTE[4]}", port, socket=6))
        targets.append(_target(f"::ffff:{POD[4]}", port, socket=6))
        targets.append(_target(POD[4], port, bind="127.0.0.6"))
        targets.append(_target(POD[6], port, bind="::6"))
        targets.append(_target(POD[4], port, mark=MARK))
        targets.append(_target(REMOTE[6], port, mark=MARK))
    return targets


def _expected(ruleset: Ruleset, identity: tuple[int, int], target: dict[str, Any]) -> tuple[str, list[Any]]:
    """Which listener the model says accepts the connection, and the original destination it keeps."""
    program = EbpfBackend(environment=ENVIRONMENT, local_only=True).plan(ruleset)
    address = ipaddress.ip_address(target["address"])
    socket_family = Family.IPV6 if address.version == 6 else Family.IPV4
    bound = ipaddress.ip_address(target["bind"]) if target.get("bind") else None
    call = ConnectCall(
        family=socket_family,
        destination=address,
        port=target["port"],
        uid=identity[0],
        gid=identity[1],
        bound=bound,
        mark=target.get("mark", 0),
    )
    outcome = decide(program, call)
    real = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    if isinstance(outcome, Unchanged):
        return ("remote" if str(real) in REMOTE.values() else "pod"), []
    assert isinstance(outcome, Rewritten), outcome
    return {15001: "proxy-outbound", 15006: "proxy-inbound"}[outcome.port], [str(real), target["port"]]


#: The TPROXY mark: in TPROXY mode the proxy's passthrough to the app carries it.
MARK: Final = 1337
POLICIES: Final = {
    "default": Policy(families="both"),
    "tproxy": Policy(families="both", inbound_mode="TPROXY"),
    "variant": Policy(
        families="both",
        proxy_uids="",
        proxy_gids="1337",
        inbound_tunnel_port=None,
        outbound_cidrs_exclude="10.0.0.8/30",
        outbound_ports_exclude="15008",
        loopback_capture="all",
    ),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_kernel_does_what_the_reference_model_says(name: str) -> None:
    ruleset = compile_policy(POLICIES[name])
    with mesh(ruleset) as world:
        results = {who: world.connect(identity, _grid()) for who, identity in IDENTITIES.items()}
    landings = set()
    for who, identity in IDENTITIES.items():
        for result in results[who]:
            where, original = _expected(ruleset, identity, result["target"])
            assert "reply" in result, result
            assert result["reply"]["who"] == where, f"{who} {result}"
            assert result["peer"] == [result["target"]["address"], result["target"]["port"]], result
            if original:
                assert result["reply"]["original"] == original, result
            landings.add(where)
    assert landings == {"proxy-outbound", "proxy-inbound", "pod", "remote"}
    if name == "tproxy":
        # The proxy's marked connection to the pod over lo is its passthrough: not captured again.
        marked = [r for r in results["proxy"] if r["target"].get("mark") and r["target"]["address"] == POD[4]]
        assert marked and all(r["reply"]["who"] == "pod" for r in marked)
    # The comparison has teeth: a model of the ruleset without the owner exemptions disagrees with the kernel.
    broken = without_owner_exemptions(ruleset)
    disagreements = [
        result
        for who, identity in IDENTITIES.items()
        for result in results[who]
        if _expected(broken, identity, result["target"])[0] != result["reply"]["who"]
    ]
    assert disagreements


# ----------------------------------------------------------------------------- the verifier accepts what we generate


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policies())
@example(Policy(one_rule_per_port=True, outbound_ports_exclude=list(range(20000, 20160, 2))))  # 80 port sets
def test_generated_policies_load_into_the_kernel(policy: Policy) -> None:
    rendering: Rendering = EbpfBackend(environment=ENVIRONMENT, local_only=True).render(compile_policy(policy))
    with _bpf_ready() as (bpffs, work):
        loaded = load(rendering, work, bpffs.path / "meshredirect")
        try:
            for item in loaded.document["maps"]:
                if item["filled_by"] != "program":
                    entries = loaded.dump(item["name"])
                    if item["type"] == "array":  # an array has every slot; the unused ones are zero
                        entries = [(k, v) for k, v in entries if any(v)]
                    wanted = {(bytes.fromhex(e["key"]), bytes.fromhex(e["value"])) for e in item["entries"]}
                    assert set(entries) == wanted, item["name"]
        finally:
            loaded.remove()
    assert os.path.isdir(bpffs.path) is False


def test_every_supported_ir_node_loads_into_the_kernel() -> None:
    """One program holding every sample match and target the backend lowers passes the kernel's verifier."""
    from meshredirect.errors import UnsupportedError
    from meshredirect.ir import Chain, Hook, Protocol, ProtocolMatch, Rule, Table, iptables_base_chain
    from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS
    from meshredirect_ebpf.lowering import lower

    tcp = ProtocolMatch(protocol=Protocol.TCP)
    candidates = [Rule(matches=(m,), target=Return()) for items in SAMPLE_MATCHES.values() for m in items]
    candidates += [Rule(matches=(tcp,), target=t) for items in SAMPLE_TARGETS.values() for t in items]
    next_chain = Chain(name="MESH_NEXT", rules=(Rule(target=Return()),))

    def ruleset(*rules: Rule) -> Ruleset:
        output = Chain(name="OUTPUT", rules=rules, base=iptables_base_chain("nat", Hook.OUTPUT))
        return Ruleset(tables=(Table(family=Family.IPV4, name="nat", chains=(output, next_chain)),))

    supported = []
    for rule in candidates:
        try:
            lower(ruleset(rule), ENVIRONMENT)
        except UnsupportedError:
            continue
        supported.append(rule)
    assert len(supported) == 27  # 19 matches and 8 targets (see tests/test_ebpf_backend.py)
    rendering = EbpfBackend(environment=ENVIRONMENT).render(ruleset(*supported))
    with _bpf_ready() as (bpffs, work):
        load(rendering, work, bpffs.path / "meshredirect").remove()
