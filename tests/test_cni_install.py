"""The installer on realistic CNI configuration directories (temporary ones, never /etc/cni/net.d)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import require_kernel
from meshredirect.cni.install import LAUNCHER_NAME, Installer, choose_config
from meshredirect.errors import EnvironmentProblem

# What Calico's installer writes (formatting, key order and all).
CALICO = b"""{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    }
  ]
}
"""
# A single-plugin file, as the bridge plugin's examples and some distributions ship it.
BRIDGE_CONF = b'{"cniVersion": "1.0.0", "name": "bridge", "type": "bridge", "bridge": "cni0", "isGateway": true,\n "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}\n'
OURS = {"type": "meshredirect-cni", "exclude_namespaces": ["kube-system", "istio-system"]}
CLI = [sys.executable, "-m", "meshredirect.cni"]


def conf_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    directory = tmp_path / "net.d"
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "calico-kubeconfig").write_text("# not a CNI configuration\n")
    return directory


def types(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_bytes())["plugins"]]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


def test_the_runtime_s_file_is_the_first_by_name() -> None:
    assert (
        choose_config(["99-loopback.conf", "10-calico.conflist", "05-x.json", ".05-hidden.conf", "00-notes.txt"])
        == "05-x.json"
    )
    assert choose_config(["calico-kubeconfig"]) is None


def test_insert_is_idempotent_and_uninstall_restores_the_original_byte_for_byte(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO, "99-loopback.conf": b'{"type": "loopback"}'})
    target = directory / "10-calico.conflist"
    target.chmod(0o640)
    installer = Installer(directory, OURS)
    assert installer.install_once() == f"{target}: meshredirect-cni appended"
    after = json.loads(target.read_bytes())
    before = json.loads(CALICO)
    assert after["plugins"][:-1] == before["plugins"]
    assert after["plugins"][-1] == OURS
    assert {k: v for k, v in after.items() if k != "plugins"} == {k: v for k, v in before.items() if k != "plugins"}
    assert target.stat().st_mode & 0o777 == 0o640
    once = target.read_bytes()
    inode = target.stat().st_ino
    assert installer.install_once() == f"{target}: already holds meshredirect-cni"
    assert target.read_bytes() == once and target.stat().st_ino == inode  # not even rewritten
    assert (directory / "99-loopback.conf").read_bytes() == b'{"type": "loopback"}'
    assert not [p for p in directory.iterdir() if "tmp" in p.name]
    assert installer.uninstall() == [f"{target}: restored as it was before meshredirect-cni was added"]
    assert target.read_bytes() == CALICO
    assert sorted(p.name for p in directory.iterdir()) == [
        "10-calico.conflist",
        "99-loopback.conf",
        "calico-kubeconfig",
        "meshredirect",
    ]


def test_a_changed_plugin_entry_is_replaced_in_place(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO})
    Installer(directory, OURS).install_once()
    Installer(directory, {"type": "meshredirect-cni", "preset": "istio-1.4"}).install_once()
    plugins = json.loads((directory / "10-calico.conflist").read_bytes())["plugins"]
    assert plugins[-1] == {"type": "meshredirect-cni", "preset": "istio-1.4"}
    assert [p["type"] for p in plugins].count("meshredirect-cni") == 1


def test_a_single_plugin_conf_becomes_a_conflist_and_comes_back(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-bridge.conf": BRIDGE_CONF})
    installer = Installer(directory, OURS)
    assert (
        installer.install_once()
        == f"{directory}/10-bridge.conf: converted to 10-bridge.conflist with meshredirect-cni appended"
    )
    assert not (directory / "10-bridge.conf").exists()
    conflist = json.loads((directory / "10-bridge.conflist").read_bytes())
    assert conflist["name"] == "bridge" and conflist["cniVersion"] == "1.0.0"
    assert types(directory / "10-bridge.conflist") == ["bridge", "meshredirect-cni"]
    assert installer.install_once().endswith("already holds meshredirect-cni")
    installer.uninstall()
    assert (directory / "10-bridge.conf").read_bytes() == BRIDGE_CONF
    assert not (directory / "10-bridge.conflist").exists()


def test_the_watcher_inserts_again_after_another_tool_rewrites_the_file(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {})
    target = directory / "10-calico.conflist"
    installer = Installer(directory, OURS)
    stop = threading.Event()
    messages: list[str] = []
    watcher = threading.Thread(target=installer.watch, args=(0.02, stop, messages.append))
    watcher.start()
    try:
        wait_for(lambda: bool(messages), "the watcher reports that it waits")
        assert messages[0] == (
            f"waiting: no CNI configuration in {directory} yet (the main network plugin writes one when it is "
            "ready; 'install --watch' waits for it)"
        )
        target.write_bytes(CALICO)  # the main plugin becomes ready
        wait_for(lambda: types(target)[-1] == "meshredirect-cni", "insertion")
        rewritten = CALICO.replace(b'"mtu": 0', b'"mtu": 1440')
        target.write_bytes(rewritten)  # Calico's installer rewrites its file
        wait_for(lambda: types(target)[-1] == "meshredirect-cni", "insertion after the rewrite")
        assert json.loads(target.read_bytes())["plugins"][0]["mtu"] == 1440
    finally:
        stop.set()
        watcher.join(timeout=10)
    installer.uninstall()
    assert target.read_bytes() == rewritten  # the latest original, byte for byte


def test_uninstall_after_a_foreign_change_removes_only_our_entry(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO})
    target = directory / "10-calico.conflist"
    installer = Installer(directory, OURS)
    installer.install_once()
    changed = json.loads(target.read_bytes())
    changed["plugins"][0]["mtu"] = 9000
    target.write_text(json.dumps(changed))
    assert installer.uninstall() == [f"{target}: changed by another tool since; removed only meshredirect-cni"]
    assert types(target) == ["calico", "portmap", "bandwidth"]
    assert json.loads(target.read_bytes())["plugins"][0]["mtu"] == 9000


def test_no_configuration_yet_is_an_environment_problem(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="no CNI configuration in"):
        Installer(conf_dir(tmp_path, {}), OURS).install_once()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(
    ("files", "plugin_config", "status", "message"),
    [
        ({}, None, 3, "meshredirect-cni install: error: no CNI configuration in {dir} yet (the main network plugin "
         "writes one when it is ready; 'install --watch' waits for it)"),
        ({"10-calico.conflist": b'{"name": "k8s",\n  "plugins": [}'}, None, 2,
         "meshredirect-cni install: error: {dir}/10-calico.conflist:2:15: expected a CNI configuration (JSON): "
         "Expecting value\n      \"plugins\": [}}\n                  ^"),
        ({"10-calico.conflist": CALICO}, '{"type": "meshredirect-cni", "policy": {"outbound_port": 0}}', 2,
         "meshredirect-cni install: error: --plugin-config {cfg}: expected a valid meshredirect-cni entry, "
         "got 'policy: outbound_port: expected a port number 1-65535, got 0'"),
        ({"10-calico.conflist": CALICO}, "[]", 2,
         "meshredirect-cni install: error: --plugin-config: expected a JSON object, got '{cfg}: expected a JSON "
         "object, got list []'"),
    ],
)  # fmt: skip
def test_installer_errors_are_pinned(
    tmp_path: Path, files: dict[str, bytes], plugin_config: str | None, status: int, message: str
) -> None:
    directory = conf_dir(tmp_path, files)
    args = ["install", "--conf-dir", str(directory)]
    cfg = tmp_path / "plugin.json"
    if plugin_config is not None:
        cfg.write_text(plugin_config)
        args += ["--plugin-config", str(cfg)]
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    done = cli(*args)
    assert (done.returncode, done.stdout) == (status, "")
    assert done.stderr.rstrip("\n") == message.format(dir=directory, cfg=cfg)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = cli("install", "--interval", "0", "--watch")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "meshredirect-cni install: error: --interval: expected a positive number of seconds, got 0.0"
    )
    done = cli("instal")
    assert done.returncode == 2 and "invalid choice: 'instal'" in done.stderr


def test_watching_installer_survives_rewrites_and_uninstalls_on_sigterm(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO})
    target = directory / "10-calico.conflist"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args = [
        "install",
        "--conf-dir",
        str(directory),
        "--bin-dir",
        str(bin_dir),
        "--watch",
        "--interval",
        "0.05",
        "--uninstall-on-exit",
    ]
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: types(target)[-1] == "meshredirect-cni", "insertion by the watching installer")
        launcher = bin_dir / LAUNCHER_NAME
        wait_for(launcher.exists, "the launcher")
        version = subprocess.run(
            [str(launcher)], input="", env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True, check=True
        )
        assert json.loads(version.stdout)["supportedVersions"] == ["0.4.0", "1.0.0"]
        target.write_bytes(CALICO)
        wait_for(lambda: types(target)[-1] == "meshredirect-cni", "insertion after a rewrite")
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert target.read_bytes() == CALICO
    assert not (bin_dir / LAUNCHER_NAME).exists()
    assert f"{target}: meshredirect-cni appended" in out
    assert f"{target}: restored as it was before meshredirect-cni was added" in out


def test_the_agent_launcher_runs_the_plugin_in_the_installer_s_mount_namespace(tmp_path: Path) -> None:
    require_kernel()  # nsenter --mount needs CAP_SYS_ADMIN
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / LAUNCHER_NAME
    env = dict(os.environ)
    args = [
        "install",
        "--conf-dir",
        str(directory),
        "--bin-dir",
        str(bin_dir),
        "--via-agent",
        "--watch",
        "--interval",
        "0.05",
    ]
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pid_file = directory / "meshredirect" / "agent.pid"
    try:
        wait_for(lambda: pid_file.exists() and launcher.exists(), "the agent's pid file and launcher")
        assert pid_file.read_text().strip() == str(process.pid)
        version = subprocess.run(
            [str(launcher)],
            input="",
            env={"CNI_COMMAND": "VERSION"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert json.loads(version.stdout)["supportedVersions"] == ["0.4.0", "1.0.0"], version.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert not pid_file.exists()
    # With no agent running the launcher still answers in CNI's terms: try again later.
    done = subprocess.run(
        [str(launcher)], input="", env={"CNI_COMMAND": "ADD"}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert json.loads(done.stdout) == {
        "cniVersion": "1.0.0",
        "code": 11,
        "msg": f"meshredirect-cni: the node agent is not running (no live process in {pid_file}); try again later",
    }


def test_kubernetes_mode_copies_the_service_account_and_configures_the_pod_source(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO})
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    plugin = tmp_path / "plugin.json"
    plugin.write_text(json.dumps({"type": "meshredirect-cni", "require_annotation": "sidecar.istio.io/status"}))
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    args = [
        "install", "--conf-dir", str(directory), "--host-conf-dir", "/etc/cni/net.d", "--kubernetes",
        "--service-account-dir", str(account), "--plugin-config", str(plugin),
    ]  # fmt: skip
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    entry = json.loads((directory / "10-calico.conflist").read_bytes())["plugins"][-1]
    assert entry["pod_source"] == {
        "kind": "kubernetes",
        "api_server": "https://10.96.0.1:443",
        "token_file": "/etc/cni/net.d/meshredirect/token",
        "ca_file": "/etc/cni/net.d/meshredirect/ca.crt",
    }
    token = directory / "meshredirect" / "token"
    assert token.read_text() == "token-1"
    assert token.stat().st_mode & 0o777 == 0o600
    # Without the Kubernetes environment the installer says what is missing.
    env.pop("KUBERNETES_SERVICE_HOST")
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 3
    assert done.stderr.strip() == (
        "meshredirect-cni install: error: --kubernetes: KUBERNETES_SERVICE_HOST is not set (run the installer in a "
        "Kubernetes pod)"
    )


def test_with_the_agent_the_plugin_reads_the_credentials_inside_the_container(tmp_path: Path) -> None:
    directory = conf_dir(tmp_path, {"10-calico.conflist": CALICO})
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1")
    (account / "ca.crt").write_text("ca")
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    args = [
        "install", "--conf-dir", str(directory), "--host-conf-dir", "/etc/cni/net.d", "--kubernetes",
        "--service-account-dir", str(account), "--via-agent", "--watch", "--interval", "0.05",
        "--bin-dir", str(tmp_path),
    ]  # fmt: skip
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    target = directory / "10-calico.conflist"
    try:
        wait_for(lambda: types(target)[-1] == "meshredirect-cni", "insertion")
        (account / "token").write_text("token-2")  # the projected token rotates
        wait_for(lambda: (directory / "meshredirect" / "token").read_text() == "token-2", "the rotated token copied")
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    source = json.loads(target.read_bytes())["plugins"][-1]["pod_source"]
    assert source["token_file"] == f"{directory}/meshredirect/token"
    # The launcher runs on the node: it reads the agent's pid where the node sees it.
    assert "/etc/cni/net.d/meshredirect/agent.pid" in (tmp_path / LAUNCHER_NAME).read_text()
