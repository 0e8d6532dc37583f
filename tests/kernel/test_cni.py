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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_kernel
from meshredirect.cni.install import LAUNCHER_NAME, launcher_script
from meshredirect.cni.rules import owned_lines
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


def our_chains(ns: NetNamespace) -> dict[str, list[str]]:
    return owned_lines(ns.run(["iptables-nft-save"]).stdout, "ISTIO")


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


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0"])
def test_chained_after_bridge_redirects_real_traffic_and_check_and_del_behave(
    version: str, host: NetNamespace, plugin_dir: Path, tmp_path: Path
) -> None:
    index = 1 if version == "1.0.0" else 2
    subnet = SUBNET.format(index)
    gateway = subnet.replace(".0/24", ".1")
    pods = tmp_path / "pods"
    pods.mkdir()
    pod_manifest(pods, "shop", "web", {"sidecar.istio.io/status": "{}"})
    pod_manifest(pods, "shop", "batch", {"traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{gateway}/32"})
    config = network(version, subnet, tmp_path / "ipam", {"pod_source": {"kind": "directory", "path": str(pods)}})
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
            assert set(our_chains(pod)) == {"nat"}
            assert our_chains(batch)  # excluded CIDR, but captured otherwise
            assert our_chains(system) == {}  # kube-system is excluded
            assert our_chains(host) == {}

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
            pod.run(
                [
                    "iptables-nft",
                    "-t",
                    "nat",
                    "-D",
                    "ISTIO_REDIRECT",
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15001",
                ]
            )
            with pytest.raises(CniPluginError) as failed:
                runtime.check(config, web_at)
            assert failed.value.plugin == "meshredirect-cni"
            assert failed.value.code == 110
            assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in failed.value.details

            runtime.delete(config, web_at)
            assert our_chains(pod) == {}
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
