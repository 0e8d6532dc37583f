"""Shared test set-up: hypothesis profiles and golden-file updates.

- ``HYPOTHESIS_PROFILE=ci`` (what CI uses), ``dev`` (default, quick) or ``long``.
- ``pytest --update-goldens`` rewrites golden files instead of comparing them.
- Real-kernel tests need root: the public pytest plugin
  (:mod:`meshredirect.testing.pytest_plugin`, loaded through its entry point)
  gives the ``netns``, ``load_rules`` and ``loaded_namespace`` fixtures and
  :func:`require_kernel`: skipped with the reason elsewhere, and
  ``MESHREDIRECT_REQUIRE_KERNEL=1`` (set by CI) turns that skip into a failure.
- With ``MESHREDIRECT_REQUIRE_KERNEL=1`` the run also fails when any test was
  skipped for any other reason: CI runs every test (the skipped ones are listed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from meshredirect.testing.pytest_plugin import require_kernel

__all__ = ["require_kernel"]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", help="rewrite golden files from the current output")


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SKIPPED and os.environ.get("MESHREDIRECT_REQUIRE_KERNEL") == "1":
        terminalreporter.section("skipped, where every test must run (MESHREDIRECT_REQUIRE_KERNEL=1)", red=True)
        for line in _SKIPPED:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED and os.environ.get("MESHREDIRECT_REQUIRE_KERNEL") == "1" and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
