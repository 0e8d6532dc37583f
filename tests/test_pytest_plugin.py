"""The pytest plugin as a user meets it: a test suite of its own, run by pytest in a fresh process.

The suite lives in a temporary directory (no project conftest, no project
configuration): the plugin and its ``kernel`` marker (``--strict-markers``)
come only from the ``pytest11`` entry point of the installed package. The
kernel gate is seen to skip and, with ``MESHREDIRECT_REQUIRE_KERNEL=1``, to
fail: both with ``ip`` off the PATH (the same gate as without root).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import require_kernel
from meshredirect.testing import pytest_plugin


def docstring_example() -> str:
    """The complete test module the plugin's docstring shows (the indented block after "A complete test module")."""
    text = pytest_plugin.__doc__ or ""
    block = text[text.index("A complete test module") :].split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)) + "\n"


EXAMPLE = docstring_example()

MORE = """
from meshredirect import Policy


def test_tproxy_routing_comes_with_the_policy(load_rules):
    ns = load_rules(Policy(inbound_mode="TPROXY"), variant="legacy")
    assert "fwmark 0x539 lookup 133" in ns.run(["ip", "rule"]).stdout
    assert "-j TPROXY --on-port 15006" in ns.run(["iptables-legacy-save", "-t", "mangle"]).stdout


def test_nftables_through_the_apply_layer(load_rules):
    ns = load_rules(Policy(), backend="nftables")
    assert "redirect to :15001" in ns.run(["nft", "list", "ruleset"]).stdout
"""

UNDEFINED = """

def test_needs_rules(loaded_namespace):
    pass
"""


def run_suite(tmp_path: Path, *, env: dict[str, str] | None = None, **modules: str) -> subprocess.CompletedProcess[str]:
    """Run pytest on these test modules (name: text) in a directory of their own."""
    for name, text in modules.items():
        (tmp_path / f"{name}.py").write_text(text)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "--strict-markers",
            "-p",
            "no:cacheprovider",
            *sorted(f"{n}.py" for n in modules),
        ],
        cwd=tmp_path,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def without_ip(**extra: str) -> dict[str, str]:
    """The environment with a PATH that holds no ``ip``: the kernel gate's other reason."""
    env = {k: v for k, v in os.environ.items() if k != "MESHREDIRECT_REQUIRE_KERNEL"}
    env["PATH"] = str(Path(sys.executable).parent)
    env.update(extra)
    return env


@pytest.mark.kernel
def test_a_users_suite_runs_its_kernel_tests_with_the_fixtures(tmp_path: Path) -> None:
    require_kernel()
    result = run_suite(tmp_path, test_example=EXAMPLE, test_more=MORE, test_undefined=UNDEFINED)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "4 passed, 1 error" in result.stdout
    assert "PASSED test_example.py::test_the_proxy_is_exempt" in result.stdout
    assert "PASSED test_example.py::test_the_exclusion_is_loaded" in result.stdout
    assert "PASSED test_more.py::test_tproxy_routing_comes_with_the_policy" in result.stdout
    assert "PASSED test_more.py::test_nftables_through_the_apply_layer" in result.stdout
    # loaded_namespace without the rules to load: the message says which fixture to define
    assert "_ ERROR at setup of test_needs_rules _" in result.stdout
    assert (
        "_\nthe loaded_namespace fixture needs the rules to load: define a fixture named redirect_rules "
        "that returns a Policy, a Ruleset or iptables-restore text\n" in result.stdout
    )


def test_without_the_kernel_the_fixtures_skip_with_the_reason(tmp_path: Path) -> None:
    result = run_suite(tmp_path, env=without_ip(), test_example=EXAMPLE, test_more=MORE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 skipped" in result.stdout
    assert result.stdout.count(": needs iproute2 ('ip'); install the Debian package iproute2") == 4


def test_with_require_kernel_set_the_fixtures_fail_instead(tmp_path: Path) -> None:
    result = run_suite(tmp_path, env=without_ip(MESHREDIRECT_REQUIRE_KERNEL="1"), test_example=EXAMPLE, test_more=MORE)
    assert result.returncode == 1
    assert "4 errors" in result.stdout
    assert "_ ERROR at setup of test_the_proxy_is_exempt _" in result.stdout
    message = "_\nreal-kernel test cannot run: needs iproute2 ('ip'); install the Debian package iproute2\n"
    assert result.stdout.count(message) == 4
