"""The project's own rule for CI (tests/conftest.py): with ``MESHREDIRECT_REQUIRE_KERNEL=1`` a run in which
any test was skipped fails, naming the skipped tests; without it, skips are reported and the run passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SUITE = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("the reason it gives")
"""


def run_suite(tmp_path: Path, require: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "MESHREDIRECT_REQUIRE_KERNEL"}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    if require:
        env["MESHREDIRECT_REQUIRE_KERNEL"] = "1"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "test_suite.py"]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)


def test_a_skip_fails_the_run_where_every_test_must_run(tmp_path: Path) -> None:
    result = run_suite(tmp_path, require=True)
    assert result.returncode == 1, result.stdout
    assert "skipped, where every test must run (MESHREDIRECT_REQUIRE_KERNEL=1)" in result.stdout
    assert "test_suite.py::test_skips: Skipped: the reason it gives" in result.stdout


def test_elsewhere_a_skip_is_reported_and_the_run_passes(tmp_path: Path) -> None:
    result = run_suite(tmp_path, require=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 skipped" in result.stdout
