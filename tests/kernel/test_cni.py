"""The chained plugin with the real reference plugins, through the CNI protocol, with real traffic.

A throwaway "host" namespace stands in for the node: the real ``bridge``
plugin (with ``host-local`` IPAM) makes a bridge there and a veth pair into
a pod namespace; ``loopback`` brings the pod's lo up; then ``meshredirect-cni``
runs chained after ``bridge``. Plugins run exactly as the specification says
(:class:`meshredirect.testing.cni.CniRuntime`), inside the host namespace.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_kernel
from meshredirect.cni.install import LAUNCHER_NAME, launcher_script
from meshredirect.testing.cni import Attachment, CniPluginError, CniRuntime
from meshredirect.testing.netns import NetNamespace

pytestmark = pytest.mark.kernel

REFERENCE_PLUGINS = Path("/usr/lib/cni")
SUBNET = "10.198.{}.0/24"
SERVER_PORT = 8080
PROXY_UID = 1337
#: The proxy accepts at most this many connections: a capture loop ends by itself and shows as extra accepts.
PROXY_MAX_ACCEPTS = 4

SERVER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(16)
print("ready", flush=True)
while True:
    conn, peer = listener.accept()
    conn.sendall(f"server saw {peer[0]}\\n".encode())
    conn.close()
"""

# Runs as root only to bind; drops to the proxy uid/gid before accepting, so its upstream
# connections carry the proxy's owner, as a sidecar's do.
PROXY = """
import encodings.idna, os, socket, struct, sys  # everything imported before the uid drop
SO_ORIGINAL_DST = 80
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(16)
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
print("ready", flush=True)
for accepted in range(1, int(sys.argv[3]) + 1):
    conn, peer = listener.accept()
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, = struct.unpack("!H", raw[2:4])
    dst = socket.inet_ntoa(raw[4:8])
    print(f"accept {accepted} from {peer[0]} original {dst}:{port}", flush=True)
    conn.sendall(f"proxy uid {os.getuid()} original {dst}:{port}\\n".encode())
    try:
        upstream = socket.create_connection((dst, port), timeout=3)
        conn.sendall(upstream.recv(200))
        upstream.close()
    except OSError as exc:
        conn.sendall(f"upstream failed {exc}\\n".encode())
    conn.close()
"""

CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
data = b""
while chunk := s.recv(200):
    data += chunk
print(data.decode(), end="")
"""


@pytest.fixture
def host() -> Iterator[NetNamespace]:
    require_kernel()
    with NetNamespace() as ns:
        yield ns


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A CNI plugin directory holding the launcher the installer writes (running this checkout)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    launcher = directory / LAUNCHER_NAME
    launcher.write_text(launcher_script([sys.executable, "-m", "meshredirect.cni"]))
    launcher.chmod(0o755)
    return directory


def network(version: str, subnet: str, data_dir: Path, ours: dict[str, object]) -> dict[str, object]:
    return {
        "cniVersion": version,
        "name": "mrtest",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "mrbr0",
                "isGateway": True,
                "ipam": {
                    "type": "host-local",
                    "subnet": subnet,
                    "dataDir": str(data_dir),
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "meshredirect-cni", **ours},
        ],
    }


def loopback(version: str) -> dict[str, object]:
    return {"cniVersion": version, "name": "lo", "plugins": [{"type": "loopback"}]}


def start(ns: NetNamespace, script: str, *args: object) -> subprocess.Popen[str]:
    process = ns.popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise AssertionError(f"helper did not start: {line!r} {process.stderr.read() if process.stderr else ''}")
    return process


def stop(process: subprocess.Popen[str]) -> str:
    process.kill()
    out, _ = process.communicate(timeout=10)
    return out


def connect(ns: NetNamespace, address: str, port: int) -> str:
    return ns.run([sys.executable, "-c", CLIENT, address, str(port)], timeout=20).stdout


def our_tables(ns: NetNamespace, backend: str) -> set[str]:
    """Where our rules are in a namespace: iptables tables holding ISTIO_ chains, or our nftables tables."""
    if backend == "nftables":
        listing = json.loads(ns.run(["nft", "-j", "list", "tables"]).stdout)["nftables"]
        return {f"{t['table']['family']} {t['table']['name']}" for t in listing if "table" in t}
    found, table = set(), ""
    for save in ("iptables-nft-save", "ip6tables-nft-save"):
        for line in ns.run([save]).stdout.splitlines():
            table = line[1:] if line.startswith("*") else table
            if line.startswith(":ISTIO_"):
                found.add(table)
    return found


def delete_rule(ns: NetNamespace, backend: str, chain: str, rule: str) -> None:
    """Delete one of our rules by hand, as an operator or another tool would."""
    if backend == "iptables":
        ns.run(["iptables-nft", "-t", "nat", "-D", chain, *rule.split()])
        return
    listing = ns.run(["nft", "-a", "list", "chain", "ip", "istio", f"nat-{chain}"]).stdout
    handle = next(line.split("# handle ")[1] for line in listing.splitlines() if rule in line and "# handle" in line)
    ns.run(["nft", "delete", "rule", "ip", "istio", f"nat-{chain}", "handle", handle.strip()])


#: What CHECK says after the outbound REDIRECT rule is deleted: app connections it lets through (the engine picks
#: the example connections; the meaning is pinned).
CHECK_REDIRECT_GONE = re.compile(
    r"^- tcp \S+ -> \S+ local uid=\d+ gid=\d+ out eth0: "
    r"policy: redirected to 127\.0\.0\.1:15001; installed: passed to \S+ \(sent out\)$",
    re.MULTILINE,
)


#: (CNI version, backend): both versions with iptables, and nftables.
CASES = [("1.0.0", "iptables"), ("0.4.0", "iptables"), ("1.0.0", "nftables")]


def pod_manifest(directory: Path, namespace: str, name: str, annotations: dict[str, str]) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
    }
    (directory / f"{namespace}_{name}.json").write_text(json.dumps(manifest))


def k8s(namespace: str, name: str) -> tuple[tuple[str, str], ...]:
    return (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", "x"),
    )


@pytest.mark.parametrize(("version", "backend"), CASES, ids=[f"{v}-{b}" for v, b in CASES])
def test_chained_after_bridge_redirects_real_traffic_and_check_and_del_behave(
    version: str, backend: str, host: NetNamespace, plugin_dir: Path, tmp_path: Path
) -> None:
    index = CASES.index((version, backend)) + 1
    subnet = SUBNET.format(index)
    gateway = subnet.replace(".0/24", ".1")
    pods = tmp_path / "pods"
    pods.mkdir()
    pod_manifest(pods, "shop", "web", {"sidecar.istio.io/status": "{}"})
    pod_manifest(pods, "shop", "batch", {"traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{gateway}/32"})
    ours = {"pod_source": {"kind": "directory", "path": str(pods)}, "backend": backend}
    config = network(version, subnet, tmp_path / "ipam", ours)
    runtime = CniRuntime([plugin_dir, REFERENCE_PLUGINS], exec_netns=str(host.path))
    processes: list[subprocess.Popen[str]] = []
    with NetNamespace() as pod, NetNamespace() as batch, NetNamespace() as system:
        web_at = Attachment(container_id="web1", netns=str(pod.path), args=k8s("shop", "web"))
        batch_at = Attachment(container_id="batch1", netns=str(batch.path), args=k8s("shop", "batch"))
        system_at = Attachment(container_id="dns1", netns=str(system.path), args=k8s("kube-system", "dns"))
        try:
            results = {}
            for attachment in (web_at, batch_at, system_at):
                runtime.add(loopback(version), attachment)
                results[attachment.container_id] = runtime.add(config, attachment)
            # ADD passed the bridge's result through unchanged.
            bridge_outputs = [json.loads(out) for (t, c, _, _, out) in runtime.log if t == "bridge" and c == "ADD"]
            assert results["web1"] == bridge_outputs[0]
            assert results["web1"]["cniVersion"] == version
            # The rules are in the pod's namespace, and nowhere else.
            assert our_tables(pod, backend) == ({"ip istio"} if backend == "nftables" else {"nat"})
            assert our_tables(batch, backend)  # excluded CIDR, but captured otherwise
            assert our_tables(system, backend) == set()  # kube-system is excluded
            assert our_tables(host, backend) == set()

            processes.append(server := start(host, SERVER, gateway, SERVER_PORT))
            processes.append(proxy := start(pod, PROXY, 15001, PROXY_UID, PROXY_MAX_ACCEPTS))
            pod_ip = results["web1"]["ips"][0]["address"].split("/")[0]
            reply = connect(pod, gateway, SERVER_PORT)
            if not reply.endswith(f"server saw {pod_ip}\n"):
                proxy.kill()
                raise AssertionError(f"unexpected reply {reply!r}; proxy: {proxy.communicate()}")
            # The app's connection landed on the proxy with the original destination; the proxy's own
            # upstream (uid 1337) went out directly: the server saw the pod's address, once.
            assert reply == f"proxy uid {PROXY_UID} original {gateway}:{SERVER_PORT}\nserver saw {pod_ip}\n"
            proxy_log = stop(proxy)
            assert proxy_log.count("accept ") == 1, proxy_log
            # The batch pod's annotation excludes the server's address: direct, no proxy.
            batch_ip = results["batch1"]["ips"][0]["address"].split("/")[0]
            assert connect(batch, gateway, SERVER_PORT) == f"server saw {batch_ip}\n"
            stop(server)

            runtime.check(config, web_at)
            if backend == "iptables":
                delete_rule(pod, backend, "ISTIO_REDIRECT", "-p tcp -j REDIRECT --to-ports 15001")
            else:
                delete_rule(pod, backend, "ISTIO_REDIRECT", "redirect to :15001")
            with pytest.raises(CniPluginError) as failed:
                runtime.check(config, web_at)
            assert failed.value.plugin == "meshredirect-cni"
            assert failed.value.code == 110
            assert failed.value.msg == (
                f"the redirect rules in {pod.path} are missing or changed (pod shop/web gets the istio policy)"
            )
            assert CHECK_REDIRECT_GONE.search(failed.value.details), failed.value.details

            runtime.delete(config, web_at)
            assert our_tables(pod, backend) == set()
            assert pod.run(["ip", "-o", "link", "show", "eth0"], check=False).returncode != 0
            runtime.cache[("mrtest", "web1", "eth0")] = results["web1"]
            runtime.delete(config, web_at)  # DEL twice succeeds
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
            for attachment in (web_at, batch_at, system_at):
                with contextlib.suppress(Exception):
                    runtime.delete(config, attachment)
        system_path = str(system.path)
    # DEL when the namespace is already gone succeeds too.
    gone = Attachment(container_id="dns1", netns=system_path, args=k8s("kube-system", "dns"))
    runtime.delete(config, gone)


def test_add_into_a_missing_namespace_is_a_cni_error(host: NetNamespace, plugin_dir: Path, tmp_path: Path) -> None:
    runtime = CniRuntime([plugin_dir, REFERENCE_PLUGINS], exec_netns=str(host.path))
    previous = {"cniVersion": "1.0.0", "interfaces": [], "ips": []}
    config = {"cniVersion": "1.0.0", "name": "mrtest", "type": "meshredirect-cni", "prevResult": previous}
    missing = Attachment(container_id="gone1", netns="/var/run/netns/mr-does-not-exist")
    with pytest.raises(CniPluginError) as failed:
        runtime.invoke("meshredirect-cni", "ADD", config, missing)
    assert failed.value.code == 3
    assert failed.value.msg == "CNI_NETNS: the network namespace /var/run/netns/mr-does-not-exist does not exist"
    assert runtime.invoke("meshredirect-cni", "DEL", config, missing) is None


def _swap(text: str, first: str, second: str) -> str:
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.strip() == first)
    j = next(n for n, line in enumerate(lines) if line.strip() == second)
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + "\n"


def _replace_line(text: str, old: str, new: list[str]) -> str:
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.strip() == old)
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    return "\n".join([*lines[:i], *(indent + n for n in new), *lines[i + 1 :]]) + "\n"


def reload_in_another_form(ns: NetNamespace, backend: str) -> None:
    """Load our rules again with the kernel's own tool, in another form that means the same: the proxy's uid and gid
    exemptions swapped (both return), and the inbound ports' one lookup split into one rule per port range."""
    if backend == "iptables":
        text = ns.run(["iptables-nft-save", "-t", "nat"]).stdout
        changed = _swap(
            text,
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        )
        changed = _replace_line(
            changed,
            "-A ISTIO_INBOUND -p tcp -m multiport --dports 15008,15020:15021,15090 -j RETURN",
            [f"-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j RETURN" for p in ("15008", "15020:15021", "15090")],
        )
        ns.run(["iptables-nft-restore"], input=changed)
        after = ns.run(["iptables-nft-save", "-t", "nat"]).stdout
    else:
        text = ns.run(["nft", "list", "table", "ip", "istio"]).stdout
        changed = _swap(text, "meta skuid 1337 return", "meta skgid 1337 return")
        changed = _replace_line(
            changed,
            "tcp dport { 15008, 15020-15021, 15090 } return",
            [f"tcp dport {p} return" for p in ("15008", "15020-15021", "15090")],
        )
        ns.run(["nft", "delete", "table", "ip", "istio"])
        ns.run(["nft", "-f", "-"], input=changed)
        after = ns.run(["nft", "list", "table", "ip", "istio"]).stdout
    assert after != text and len(after.splitlines()) == len(text.splitlines()) + 2, after


@pytest.mark.parametrize("backend", [b for v, b in CASES if v == "1.0.0"])
def test_check_passes_when_the_rules_changed_in_form_but_not_in_meaning(
    backend: str, host: NetNamespace, plugin_dir: Path, tmp_path: Path
) -> None:
    subnet = SUBNET.format(10 + len(backend))
    config = network("1.0.0", subnet, tmp_path / "ipam", {"backend": backend})
    runtime = CniRuntime([plugin_dir, REFERENCE_PLUGINS], exec_netns=str(host.path))
    with NetNamespace() as pod:
        attachment = Attachment(container_id="form1", netns=str(pod.path), args=k8s("shop", "web"))
        try:
            runtime.add(config, attachment)
            runtime.check(config, attachment)
            reload_in_another_form(pod, backend)
            runtime.check(config, attachment)  # passes: the same connections get the same verdicts
        finally:
            runtime.delete(config, attachment)
