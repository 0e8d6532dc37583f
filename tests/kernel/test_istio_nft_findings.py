"""Istio's own nft rules against Istio's own iptables rules (and ours), by real connections, case by case.

For every case of tests/data/conformance/istio/cases.json, three pods are built
(each a namespace with a veth to a peer namespace, listeners on the app port 80
and the proxy ports 15001 and 15006, the TPROXY routes): one with Istio's nft
golden loaded, one with Istio's iptables rules (v4, and v6 when the case
enables IPv6), one with ours (nftables backend). Eight probe connections run in
each, as root (not the proxy): outbound from the pod to a peer address and to a
captured port, inbound from the peer to the pod's port 80, each over IPv4 and
IPv6; every probe records who accepted it (``app``, ``15001``, ``15006``) or
``-`` when the connection left the pod (nobody there answers).

This is sampling, not proof: the semantics engine proves equivalence class by
class once it is on main. What it shows, it shows on a real kernel, and the
table of differences is pinned here and published in docs/nftables.md.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import attrs
import pytest

from conformance import ISTIO, istio_cases
from conftest import require_kernel
from meshredirect.api import render, resolve_groups
from meshredirect.compiler import compile_policy
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.testing.netns import NetNamespace

pytestmark = pytest.mark.kernel

CASES = istio_cases()
#: Group names of the owner-group cases, resolved to fixed gids as the golden tests do.
GROUPS = {"java": 1001, "ftp": 1002}
PROBES = ("out4", "out6", "in4", "in6")
#: Outbound probe addresses when a case names none: on the pod's link, where nobody answers.
OUT4 = "10.10.0.99"
OUT6 = "fd10::99"

_POD = r"""
import json, select, socket, sys
names = {}
def listen(family, host, port, transparent=False):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        s.setsockopt(socket.SOL_IP if family == socket.AF_INET else socket.IPPROTO_IPV6, 19 if family == socket.AF_INET else 75, 1)
    s.bind((host, port)); s.listen(16); s.setblocking(False); names[s] = "app" if port == app_port else str(port)
app_port, out_port, out4, out6 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    listen(family, host, app_port); listen(family, host, 15001); listen(family, host, 15006, transparent=True)
def accepted(wait):
    got = []
    ready, _, _ = select.select(list(names), [], [], wait)
    for s in ready:
        try:
            conn, peer = s.accept()
        except BlockingIOError:
            continue
        got.append((names[s], peer[0])); conn.close()
    return got
print("ready", flush=True)
sys.stdin.readline()  # the peer has connected
result = {}
for who, peer in accepted(0.5):
    result["in6" if ":" in peer else "in4"] = who
for probe, family, address in (("out4", socket.AF_INET, out4), ("out6", socket.AF_INET6, out6)):
    c = socket.socket(family, socket.SOCK_STREAM); c.settimeout(0.4)
    try:
        c.connect((address, out_port))
    except OSError:
        result[probe] = "-"
        continue
    got = accepted(0.5)
    result[probe] = got[0][0] if got else "?"
    c.close()
print(json.dumps(result), flush=True)
"""

_PEER = r"""
import socket, sys
for family, address in ((socket.AF_INET, "10.10.0.1"), (socket.AF_INET6, "fd10::1")):
    c = socket.socket(family, socket.SOCK_STREAM); c.settimeout(0.4)
    try:
        c.connect((address, int(sys.argv[1])))
    except OSError:
        pass
    c.close()
"""


@attrs.frozen
class Probes:
    """Where the probes go: the inbound port, the outbound port and one outbound address per family."""

    inbound_port: int = 80
    outbound_port: int = 80
    out4: str = OUT4
    out6: str = OUT6

    @classmethod
    def for_case(cls, case: str) -> Probes:
        """Ports and addresses the case captures, where it names any (else the defaults)."""
        fields = CASES[case]
        inbound = [p for p in fields["inbound_ports_include"].split(",") if p.strip().isdigit()]
        outbound_ports = [p for p in fields["outbound_ports_include"].split(",") if p.strip().isdigit()]
        included = [ipaddress.ip_network(c) for c in fields["outbound_ip_ranges_include"].split(",") if "/" in c]
        out = {}
        for network in included:
            out.setdefault(network.version, str(network.network_address + 99))
        return cls(
            inbound_port=int(inbound[0]) if inbound else 80,
            outbound_port=int(outbound_ports[0]) if outbound_ports else 80,
            out4=out.get(4, OUT4),
            out6=out.get(6, OUT6),
        )


def probe(loads: list[tuple[list[str], str]], probes: Probes = Probes()) -> dict[str, str]:
    """Build a pod and a peer, load rules into the pod, run the probes; who accepted each."""
    with NetNamespace() as pod, NetNamespace() as peer:
        for command in (
            ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["ip", "link", "set", "v1", "netns", peer.name],
            ["ip", "link", "set", "v0", "up"],
            ["ip", "addr", "add", "10.10.0.1/24", "dev", "v0"],
            ["ip", "-6", "addr", "add", "fd10::1/64", "dev", "v0", "nodad"],
            ["ip", "-6", "addr", "add", "::6/128", "dev", "lo"],
            ["ip", "rule", "add", "fwmark", "1337", "lookup", "133"],
            ["ip", "route", "add", "local", "default", "dev", "lo", "table", "133"],
            ["ip", "-6", "rule", "add", "fwmark", "1337", "lookup", "133"],
            ["ip", "-6", "route", "add", "local", "default", "dev", "lo", "table", "133"],
        ):
            pod.run(command)
        for command in (
            ["ip", "link", "set", "v1", "up"],
            ["ip", "addr", "add", "10.10.0.2/24", "dev", "v1"],
            ["ip", "-6", "addr", "add", "fd10::2/64", "dev", "v1", "nodad"],
        ):
            peer.run(command)
        pod.run(["ip", "route", "replace", f"{probes.out4}/32", "dev", "v0"])
        pod.run(["ip", "-6", "route", "replace", f"{probes.out6}/128", "dev", "v0"])
        pod.run(["ip", "-6", "neigh", "add", "fd10::2", "lladdr", _mac(peer, "v1"), "dev", "v0"])
        peer.run(["ip", "-6", "neigh", "add", "fd10::1", "lladdr", _mac(pod, "v0"), "dev", "v1"])
        for argv, text in loads:
            pod.run(argv, input=text)
        argv = [str(probes.inbound_port), str(probes.outbound_port), probes.out4, probes.out6]
        server = pod.popen([sys.executable, "-c", _POD, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert server.stdout is not None and server.stdin is not None
            assert server.stdout.readline().strip() == "ready"
            peer.run([sys.executable, "-c", _PEER, str(probes.inbound_port)])
            server.stdin.write("go\n")
            server.stdin.flush()
            result: dict[str, str] = json.loads(server.stdout.readline())
        finally:
            server.kill()
            server.wait()
    return {p: result.get(p, "-") for p in PROBES}


def _mac(ns: NetNamespace, device: str) -> str:
    return json.loads(ns.run(["ip", "-j", "link", "show", device]).stdout)[0]["address"]  # type: ignore[no-any-return]


def _istio_nft(case: str) -> str:
    text = (ISTIO / "nftables" / f"{case}.golden").read_text()
    for name, gid in GROUPS.items():
        text = text.replace(f"skgid {name} ", f"skgid {gid} ").replace(f"skgid != {name} ", f"skgid != {gid} ")
    return text


def _istio_iptables(case: str) -> list[tuple[list[str], str]]:
    loads = []
    for version, tool in ((4, "iptables-nft-restore"), (6, "ip6tables-nft-restore")):
        path = ISTIO / "iptables" / f"{case}.v{version}.restore"
        if path.exists():
            text = path.read_text()
            for name, gid in GROUPS.items():
                text = text.replace(f"--gid-owner {name} ", f"--gid-owner {gid} ")
            loads.append(([tool, "--noflush"], text))
    return loads


def _ours(case: str) -> str:
    policy = resolve_groups(policy_from_istio_config(CASES[case]), GROUPS.get)
    return render(compile_policy(policy), "nftables").text()


def findings() -> dict[str, dict[str, dict[str, str]]]:
    """Per case, the probe results of Istio nft, Istio iptables and ours (pods built in parallel)."""
    jobs = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for case in sorted(CASES):
            if not (ISTIO / "iptables" / f"{case}.v4.restore").exists():
                continue  # inbound-ports-empty-tproxy: Istio's nft goldens only
            probes = Probes.for_case(case)
            jobs[(case, "istio nft")] = pool.submit(probe, [(["nft", "-f", "-"], _istio_nft(case))], probes)
            jobs[(case, "istio iptables")] = pool.submit(probe, _istio_iptables(case), probes)
            jobs[(case, "ours")] = pool.submit(probe, [(["nft", "-f", "-"], _ours(case))], probes)
        out: dict[str, dict[str, dict[str, str]]] = {}
        for (case, who), job in jobs.items():
            out.setdefault(case, {})[who] = job.result()
    return out


#: Where Istio's nft rules and Istio's iptables rules let the same probe end somewhere else:
#: case -> probe -> (istio nft, istio iptables). Every other case and probe agrees.
DIFFERENCES = {
    # IPv6 is off in these cases, so Istio's iptables rules program nothing for it; Istio's nft rules live in
    # inet tables without an IPv4 guard on these rules, and capture IPv6 too.
    "inbound-ports-include": {"in6": ("15006", "app")},
    "inbound-ports-wildcard": {"in6": ("15006", "app")},
    "kube-virt-interfaces": {"out6": ("15001", "-")},
    "outbound-ports-include": {"out6": ("15001", "-")},
}


def test_istio_nft_against_istio_iptables_per_case() -> None:
    require_kernel()
    table = findings()
    differences: dict[str, dict[str, tuple[str, str]]] = {}
    for case, results in table.items():
        for p in PROBES:
            nft, iptables = results["istio nft"][p], results["istio iptables"][p]
            if nft != iptables:
                differences.setdefault(case, {})[p] = (nft, iptables)
            # Ours always ends where Istio's iptables rules end.
            assert results["ours"][p] == iptables, (case, p, results)
    assert differences == DIFFERENCES, json.dumps(table, indent=1)


if __name__ == "__main__":
    # Print the table for docs/nftables.md.
    table = findings()
    print("| case | probe | Istio nft | Istio iptables | ours |\n|---|---|---|---|---|")
    for case, results in table.items():
        for p in PROBES:
            row = [results[w][p] for w in ("istio nft", "istio iptables", "ours")]
            print(f"| {case} | {p} | " + " | ".join(row) + " |")
