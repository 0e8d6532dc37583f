"""The Kubernetes pod source against a small fake API server on 127.0.0.1, over real TLS.

The server is started by the test (a self-signed certificate made with
``openssl``), answers like the API does (Pod objects, Status objects on
errors) and records what it was asked.
"""

from __future__ import annotations

import io
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest

from meshredirect.cni.config import KubernetesSource
from meshredirect.cni.plugin import run_plugin
from meshredirect.cni.pods import lookup_pod
from meshredirect.cni.protocol import CniError

TOKEN = "test-token-0123"
PODS: dict[str, dict[str, str]] = {
    "web": {"traffic.sidecar.istio.io/excludeOutboundPorts": "9000", "sidecar.istio.io/status": "{}"},
    "off": {"sidecar.istio.io/inject": "false"},
    "flaky": {},
}


@attrs.define
class FakeApi:
    url: str
    ca_file: str
    token_file: str
    requests: list[tuple[str, str | None]]
    failures: dict[str, int]

    def source(self, **changes: Any) -> KubernetesSource:
        fields = {"api_server": self.url, "token_file": self.token_file, "ca_file": self.ca_file, "attempts": 2}
        return KubernetesSource(**{**fields, **changes})


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the fake API server's certificate (Debian package openssl)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApi]:
    cert, key = make_certificate(tmp_path, "fake-apiserver")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    requests: list[tuple[str, str | None]] = []
    failures = {"flaky": 1, "down": 99}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            requests.append((self.path, self.headers.get("Authorization")))
            parts = self.path.split("/")
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.reply(403, {"kind": "Status", "message": 'pods is forbidden: User "system:anonymous" cannot get'})
                return
            if len(parts) != 7 or parts[1:4] != ["api", "v1", "namespaces"] or parts[5] != "pods":
                self.reply(404, {"kind": "Status", "message": "the server could not find the requested resource"})
                return
            namespace, name = parts[4], parts[6]
            if failures.get(name, 0) > 0:
                failures[name] -= 1
                self.reply(503, {"kind": "Status", "message": "etcdserver: leader changed"})
                return
            if namespace != "shop" or name not in PODS:
                self.reply(404, {"kind": "Status", "message": f'pods "{name}" not found'})
                return
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "annotations": PODS[name]},
                "spec": {"containers": [{"name": "app", "image": "app"}]},
            }
            self.reply(200, pod)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield FakeApi(f"https://127.0.0.1:{port}", str(cert), str(token_file), requests, failures)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_pod_is_read_with_the_service_account_token(api: FakeApi) -> None:
    pod = lookup_pod(api.source(), "shop", "web")
    assert pod.annotation("traffic.sidecar.istio.io/excludeOutboundPorts") == "9000"
    assert api.requests == [("/api/v1/namespaces/shop/pods/web", f"Bearer {TOKEN}")]


def test_a_transient_failure_is_retried(api: FakeApi) -> None:
    assert lookup_pod(api.source(), "shop", "flaky").name == "flaky"
    assert len(api.requests) == 2


@pytest.mark.parametrize(
    "case",
    [
        ("gone", {}, 102, "pod shop/gone: not found by the API", 'pods "gone" not found'),
        ("down", {}, 11, "pod shop/down: the Kubernetes API at {url} did not answer after 2 attempt(s)", "HTTP 503: etcdserver: leader changed"),
        ("web", {"token_file": "WRONG"}, 103, "pod shop/web: the API refused the service account (HTTP 403); it needs get on pods (see deploy/k8s/rbac.yaml)", 'pods is forbidden: User "system:anonymous" cannot get'),
        ("web", {"token_file": "/nonexistent/token"}, 101, "pod_source.token_file: cannot read /nonexistent/token: No such file or directory", None),
    ],
)  # fmt: skip
def test_api_errors_are_cni_errors(api: FakeApi, tmp_path: Path, case: tuple[Any, ...]) -> None:
    name, changes, code, msg, details = case
    if changes.get("token_file") == "WRONG":
        wrong = tmp_path / "wrong-token"
        wrong.write_text("someone-else")
        changes = {"token_file": str(wrong)}
    with pytest.raises(CniError) as failed:
        lookup_pod(api.source(**changes), "shop", name)
    assert (failed.value.code, failed.value.msg, failed.value.details) == (code, msg.format(url=api.url), details)


def test_a_server_certificate_from_another_ca_is_refused(api: FakeApi, tmp_path: Path) -> None:
    other, _ = make_certificate(tmp_path, "another-ca")
    with pytest.raises(CniError) as failed:
        lookup_pod(api.source(ca_file=str(other)), "shop", "web")
    assert failed.value.code == 101
    assert failed.value.msg.startswith(f"{api.url}: TLS verification failed: ")
    assert api.requests == []


def test_an_api_server_that_is_not_there_means_try_again_later(api: FakeApi) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(CniError) as failed:
        lookup_pod(api.source(api_server=f"https://127.0.0.1:{closed}", attempts=1), "shop", "web")
    assert failed.value.code == 11
    assert "Connection refused" in (failed.value.details or "")


def test_the_plugin_skips_a_pod_the_api_says_has_no_sidecar(api: FakeApi) -> None:
    previous = {"cniVersion": "1.0.0", "interfaces": [], "ips": []}
    config = {
        "cniVersion": "1.0.0",
        "name": "k8s",
        "type": "meshredirect-cni",
        "prevResult": previous,
        "pod_source": {
            "kind": "kubernetes",
            "api_server": api.url,
            "token_file": api.token_file,
            "ca_file": api.ca_file,
        },
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/mr-none",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=off",
    }
    out = io.StringIO()
    assert run_plugin(env, json.dumps(config).encode(), out, io.StringIO()) == 0
    assert json.loads(out.getvalue()) == previous
    # A pod with a sidecar gets rules: here the namespace does not exist, which ADD reports (code 3).
    out = io.StringIO()
    env["CNI_ARGS"] = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"
    assert run_plugin(env, json.dumps(config).encode(), out, io.StringIO()) == 1
    assert json.loads(out.getvalue())["code"] == 3
    assert [path for path, _ in api.requests] == [
        "/api/v1/namespaces/shop/pods/off",
        "/api/v1/namespaces/shop/pods/web",
    ]
