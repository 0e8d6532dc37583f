"""pytest plugin: throwaway network namespaces and rules loaded into them, for real-kernel tests.

Installing meshredirect registers this module with pytest (entry point
``pytest11``, name ``meshredirect``): its fixtures are there in every test
suite of the environment, without a ``conftest.py`` line. A real-kernel test
then takes three lines. A complete test module (``tests/test_pytest_plugin.py``
runs this very example, as root and without the kernel)::

    import pytest
    from meshredirect import Policy


    def test_the_proxy_is_exempt(load_rules):
        ns = load_rules(Policy())
        assert "-m owner --uid-owner 1337 -j RETURN" in ns.run(["iptables-save"]).stdout


    @pytest.fixture
    def redirect_rules():
        return Policy(outbound_ports_exclude="22")


    @pytest.mark.kernel
    def test_the_exclusion_is_loaded(loaded_namespace):
        assert "--dport 22 -j RETURN" in loaded_namespace.run(["iptables-save", "-t", "nat"]).stdout

Fixtures (each test gets its own namespace, deleted after it, also when it fails):

``netns``
    a fresh :class:`~meshredirect.testing.netns.NetNamespace` with ``lo`` up.
``load_rules``
    a function ``load_rules(rules, *, backend="iptables", variant=None)``
    that loads rules into the test's namespace and returns it; ``rules`` is a
    :class:`~meshredirect.policy.Policy` (its rules and its TPROXY routing), a
    compiled :class:`~meshredirect.ir.Ruleset` (both through the apply layer,
    :func:`meshredirect.apply.apply`), or ``iptables-restore`` text (loaded as
    it is, with ``--noflush``; ``family=6`` for ``ip6tables-restore``). See
    :func:`load_into`.
``redirect_rules``
    what ``loaded_namespace`` loads: override it in your ``conftest.py`` or
    test module (by default it asks you to).
``loaded_namespace``
    the test's namespace with ``redirect_rules`` loaded.

Without root (or without iproute2) these fixtures skip the test with the
reason; with ``MESHREDIRECT_REQUIRE_KERNEL=1`` in the environment (what CI
sets) they fail it instead, so a CI machine that cannot run them is noticed.
The same gate is :func:`require_kernel`, for tests that make their own
namespaces. The marker ``kernel`` labels such tests (``pytest -m "not kernel"``
leaves them out).

The examples of the fixtures below define a test that asks for the fixture,
then call it with what pytest would give it; they touch a kernel only as
root (in a namespace of their own), and do nothing elsewhere.

>>> kernel_gate(None, {})
>>> kernel_gate("needs root", {})
('skip', 'needs root')
>>> kernel_gate("needs root", {REQUIRE_KERNEL_VARIABLE: "1"})
('fail', 'real-kernel test cannot run: needs root')
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, Literal, Protocol

import pytest

from meshredirect.testing.netns import NetNamespace, kernel_unavailable

if TYPE_CHECKING:
    from meshredirect.ir import Ruleset
    from meshredirect.policy import Policy

__all__ = [
    "REQUIRE_KERNEL_VARIABLE",
    "VARIANTS",
    "RuleLoader",
    "kernel_gate",
    "load_into",
    "load_rules",
    "loaded_namespace",
    "netns",
    "redirect_rules",
    "require",
    "require_kernel",
]

#: Set to ``1`` to turn a skipped real-kernel test into a failure (CI does).
REQUIRE_KERNEL_VARIABLE: Final = "MESHREDIRECT_REQUIRE_KERNEL"
#: The iptables variants rules can be loaded with.
VARIANTS: Final = ("nft", "legacy")
#: The marker real-kernel tests carry, and its meaning (registered by this plugin).
KERNEL_MARKER: Final = "kernel: loads rules into a real kernel inside throwaway network namespaces (needs root)"


def kernel_gate(reason: str | None, environ: Mapping[str, str]) -> tuple[Literal["skip", "fail"], str] | None:
    """What a real-kernel test does when the kernel is unavailable for ``reason`` (None: it runs).

    ``reason`` is :func:`~meshredirect.testing.netns.kernel_unavailable`'s
    answer, ``environ`` the process environment; the answer is ``"skip"`` or
    ``"fail"`` (with ``MESHREDIRECT_REQUIRE_KERNEL=1``) and the message.

    >>> kernel_gate("needs root (network namespaces and netfilter rules)", {"MESHREDIRECT_REQUIRE_KERNEL": "1"})
    ('fail', 'real-kernel test cannot run: needs root (network namespaces and netfilter rules)')
    >>> kernel_gate("needs root", {"MESHREDIRECT_REQUIRE_KERNEL": "0"})
    ('skip', 'needs root')
    """
    if reason is None:
        return None
    if environ.get(REQUIRE_KERNEL_VARIABLE) == "1":
        return "fail", f"real-kernel test cannot run: {reason}"
    return "skip", reason


def require_kernel() -> None:
    """Skip the calling test when real-kernel tests cannot run here (fail with ``MESHREDIRECT_REQUIRE_KERNEL=1``).

    Call it first in a test that makes namespaces of its own (the fixtures
    call it for you). It returns when the test can run, and otherwise stops
    the test the way pytest does (``pytest.skip`` or ``pytest.fail``):

    >>> try:
    ...     require_kernel()
    ...     outcome = "runs"
    ... except (pytest.skip.Exception, pytest.fail.Exception) as stopped:
    ...     outcome = str(stopped)
    >>> outcome == "runs" or outcome.startswith(("needs ", "real-kernel test cannot run: "))
    True
    """
    require(kernel_unavailable())


def require(reason: str | None) -> None:
    """Stop the calling test for ``reason`` (something it needs is missing), as real-kernel tests stop.

    None lets the test run; otherwise it is skipped with the reason, or fails
    with ``MESHREDIRECT_REQUIRE_KERNEL=1`` (see :func:`kernel_gate`). For a
    tool or a kernel feature a test needs besides root and iproute2:

    >>> import shutil
    >>> require(None)
    >>> def test_the_rules_compile_to_bpf() -> None:
    ...     require(None if shutil.which("clang") else "needs clang (Debian package clang)")
    >>> try:
    ...     require("needs clang (Debian package clang)")
    ... except (pytest.skip.Exception, pytest.fail.Exception) as stopped:
    ...     print(str(stopped).endswith("needs clang (Debian package clang)"))
    True
    """
    gate = kernel_gate(reason, os.environ)
    if gate is None:
        return
    action, message = gate
    if action == "fail":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class RuleLoader(Protocol):
    """The ``load_rules`` fixture's type: annotate the fixture's parameter with it.

    >>> import functools
    >>> from meshredirect.policy import Policy
    >>> def test_the_exclusion(load_rules: RuleLoader) -> None:
    ...     ns = load_rules(Policy(outbound_ports_exclude="22"), backend="nftables")
    ...     assert "tcp dport 22 return" in ns.run(["nft", "list", "ruleset"]).stdout
    >>> if kernel_unavailable() is None:
    ...     with NetNamespace() as ns:
    ...         test_the_exclusion(functools.partial(load_into, ns))
    """

    def __call__(
        self, rules: Policy | Ruleset | str, *, backend: str = "iptables", variant: str | None = None, family: int = 4
    ) -> NetNamespace: ...


def load_into(
    ns: NetNamespace,
    rules: Policy | Ruleset | str,
    *,
    backend: str = "iptables",
    variant: str | None = None,
    family: int = 4,
) -> NetNamespace:
    """Load ``rules`` into ``ns`` and return ``ns``.

    A Policy or a compiled Ruleset goes through :func:`meshredirect.apply.apply`
    (one transaction per table and family, TPROXY policy routing for a Policy;
    ``backend`` ``iptables`` or ``nftables``; ``variant`` ``nft`` or ``legacy``,
    detected when None). Text is loaded as it is with ``iptables-restore
    --noflush`` (``family=6``: ``ip6tables-restore``; ``variant`` default ``nft``).
    A load the kernel refuses raises :class:`~meshredirect.apply.ApplyFailed`
    (a Policy or Ruleset) or :class:`~meshredirect.testing.netns.CommandFailed`
    (text), with the tool's message.

    >>> text = "*nat\\n-A OUTPUT -p tcp --dport 22 -j RETURN\\nCOMMIT\\n"
    >>> if kernel_unavailable() is None:
    ...     with NetNamespace() as ns:
    ...         rules = load_into(ns, text).run(["iptables", "-t", "nat", "-S", "OUTPUT"]).stdout
    ...         assert "-A OUTPUT -p tcp -m tcp --dport 22 -j RETURN" in rules.splitlines()
    >>> load_into(None, text, family=5)  # type: ignore[arg-type]
    Traceback (most recent call last):
    ...
    ValueError: expected family 4 or 6, got 5
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"expected an iptables variant, one of {', '.join(VARIANTS)}; got {variant!r}")
    if isinstance(rules, str):
        if family not in (4, 6):
            raise ValueError(f"expected family 4 or 6, got {family!r}")
        base = "ip6tables" if family == 6 else "iptables"
        ns.run([f"{base}-{variant or VARIANTS[0]}-restore", "--noflush"], input=rules)
        return ns
    from meshredirect.apply import apply
    from meshredirect.ir import Ruleset
    from meshredirect.policy import Policy

    if not isinstance(rules, (Policy, Ruleset)):
        raise TypeError(f"expected a Policy, a Ruleset or iptables-restore text, got {type(rules).__name__}")
    apply(rules, backend=backend, netns=ns.name, variant=variant)
    return ns


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", KERNEL_MARKER)


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A fresh network namespace (``lo`` up), deleted after the test; needs root (see :func:`require_kernel`).

    >>> def test_lo_is_up(netns: NetNamespace) -> None:
    ...     assert "<LOOPBACK,UP," in netns.run(["ip", "link", "show", "lo"]).stdout
    >>> if kernel_unavailable() is None:
    ...     with NetNamespace() as ns:  # what the fixture gives the test
    ...         test_lo_is_up(ns)
    """
    require_kernel()
    with NetNamespace() as ns:
        yield ns


@pytest.fixture
def load_rules(netns: NetNamespace) -> RuleLoader:
    """A function that loads rules into the test's namespace and returns the namespace (see :func:`load_into`).

    >>> import functools
    >>> from meshredirect.policy import Policy
    >>> def test_the_proxy_is_exempt(load_rules: RuleLoader) -> None:
    ...     ns = load_rules(Policy())
    ...     assert "-m owner --uid-owner 1337 -j RETURN" in ns.run(["iptables-save", "-t", "nat"]).stdout
    >>> if kernel_unavailable() is None:
    ...     with NetNamespace() as ns:  # what the fixture gives the test
    ...         test_the_proxy_is_exempt(functools.partial(load_into, ns))
    """

    def load(
        rules: Policy | Ruleset | str, *, backend: str = "iptables", variant: str | None = None, family: int = 4
    ) -> NetNamespace:
        return load_into(netns, rules, backend=backend, variant=variant, family=family)

    return load


@pytest.fixture
def redirect_rules() -> Policy | Ruleset | str:
    """The rules ``loaded_namespace`` loads: override this fixture (a Policy, a Ruleset or iptables-restore text).

    In your ``conftest.py`` or test module (a test that asks for
    ``loaded_namespace`` without it fails, saying so):

    >>> from meshredirect.policy import Policy
    >>> @pytest.fixture
    ... def redirect_rules() -> Policy:
    ...     return Policy(outbound_ports_exclude="22")
    """
    pytest.fail(
        "the loaded_namespace fixture needs the rules to load: define a fixture named redirect_rules "
        "that returns a Policy, a Ruleset or iptables-restore text",
        pytrace=False,
    )


@pytest.fixture
def loaded_namespace(load_rules: RuleLoader, redirect_rules: Policy | Ruleset | str) -> NetNamespace:
    """The test's namespace with ``redirect_rules`` loaded.

    >>> from meshredirect.policy import Policy
    >>> def test_the_exclusion_is_loaded(loaded_namespace: NetNamespace) -> None:
    ...     assert "--dport 22 -j RETURN" in loaded_namespace.run(["iptables-save", "-t", "nat"]).stdout
    >>> if kernel_unavailable() is None:
    ...     with NetNamespace() as ns:  # what the fixture gives the test, with redirect_rules as above
    ...         test_the_exclusion_is_loaded(load_into(ns, Policy(outbound_ports_exclude="22")))
    """
    return load_rules(redirect_rules)
