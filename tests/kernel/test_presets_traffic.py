"""Presets meet real traffic: who is captured when a pod connects to its own address over lo.

Istio and Kuma hairpin the proxy's own connection to the pod's address to the
inbound port; Linkerd does not (``LoopbackCapture.NONE``). An application's
connection to its own pod address stays direct in all three. Each case runs in
a throwaway namespace with the preset's rules applied for real.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import require_kernel
from meshredirect.apply.iptables import IptablesApplier, NamespaceRunner
from meshredirect.compiler import compile_policy
from meshredirect.presets import preset
from meshredirect.testing.netns import NetNamespace

pytestmark = pytest.mark.kernel

POD_IP = "10.77.0.1"
APP_PORT = 8080
APP_UID = 4321

#: Binds the app port and the proxy's inbound port, connects from a child running as UID to the
#: pod address, and prints which listener accepted. Runs inside the namespace.
PROBE = textwrap.dedent(
    """
    import encodings.idna  # noqa: F401  (imported before dropping privileges: the interpreter may not be readable then)
    import json, os, socket, sys
    app_port, inbound_port, uid, pod_ip = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    listeners = {}
    for name, port in (("app", app_port), ("inbound", inbound_port)):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(1)
        s.settimeout(5)
        listeners[name] = s
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            c = socket.create_connection((pod_ip, app_port), timeout=5)
            c.close()
        finally:
            os._exit(0)
    import select
    ready, _, _ = select.select(list(listeners.values()), [], [], 5)
    os.waitpid(pid, 0)
    print(json.dumps([name for name, s in listeners.items() if s in ready]))
    """
)


def accepted_by(preset_name: str, uid: int) -> list[str]:
    policy = preset(preset_name)
    with NetNamespace() as ns:
        ns.run(["ip", "link", "add", "pod0", "type", "veth", "peer", "name", "peer0"])
        ns.run(["ip", "addr", "add", f"{POD_IP}/24", "dev", "pod0"])
        ns.run(["ip", "link", "set", "pod0", "up"])
        ns.run(["ip", "link", "set", "peer0", "up"])
        IptablesApplier(NamespaceRunner(ns.name)).apply(compile_policy(policy))
        result = ns.run(
            [sys.executable, "-c", PROBE, str(APP_PORT), str(policy.inbound_port), str(uid), POD_IP], timeout=30
        )
    return list(json.loads(result.stdout))


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


@pytest.mark.parametrize(("name", "uid"), [("istio", 1337), ("kuma", 5678)])
def test_proxy_to_own_pod_address_is_hairpinned_to_the_inbound_port(name: str, uid: int) -> None:
    assert accepted_by(name, uid) == ["inbound"]


def test_linkerd_proxy_to_own_pod_address_goes_direct() -> None:
    assert accepted_by("linkerd", 2102) == ["app"]


@pytest.mark.parametrize("name", ["istio", "kuma", "linkerd"])
def test_app_to_own_pod_address_goes_direct(name: str) -> None:
    assert accepted_by(name, APP_UID) == ["app"]


def test_the_probe_sees_a_broken_hairpin() -> None:
    """The check can fail: istio-1.4 captures the app's own connection too (LoopbackCapture.ALL)."""
    assert accepted_by("istio-1.4", APP_UID) == ["inbound"]
