"""Assertions about redirect rules that fail with a counterexample: a connection and what the rules do to it.

Each assertion proves its property over every connection (the semantics
engine splits connections into finitely many classes that the rules cannot
tell apart, and checks one of each), and raises a
:class:`RedirectAssertionError` (an :class:`AssertionError`, so pytest shows
it as a test failure) naming a concrete connection, the chain of
interceptions it goes through and the rule-by-rule trace of each step.

Rules may be given as a :class:`~meshredirect.ir.Ruleset`, a
:class:`~meshredirect.policy.Policy` (compiled first), ``iptables-save`` /
``iptables-restore`` text, ``nft -j list ruleset`` JSON, or a
:class:`~pathlib.Path` to a file holding either (see :func:`as_ruleset`).
The environment (the pod: its addresses, its proxy's uids, gids and ports)
defaults to Istio's (:meth:`Environment.for_policy <meshredirect.semantics.model.Environment.for_policy>`
for a policy, else :meth:`Environment.default <meshredirect.semantics.model.Environment.default>`).

>>> from meshredirect.policy import Policy
>>> from meshredirect.semantics import Connection, Environment, Redirected
>>> assert_loop_free(Policy())
>>> env = Environment.default()
>>> app = Connection.local(env, dst="93.184.216.34", dport=443)
>>> assert_verdict(Policy(), app, Redirected)
>>> assert_verdict(Policy(outbound_ports_exclude="443"), app, Redirected)
Traceback (most recent call last):
...
meshredirect.testing.assertions.VerdictError: tcp 10.0.0.5:43210 -> 93.184.216.34:443 local uid=1000 gid=1000 out eth0: expected redirected, got passed to 93.184.216.34:443 (sent out)
...

The exception hierarchy::

    AssertionError
     +-- RedirectAssertionError     .connection, .explanation
          +-- LoopError             assert_loop_free
          +-- BypassError           assert_no_bypass
          +-- NotEquivalentError    assert_equivalent
          +-- VerdictError          assert_verdict
          +-- UnsoundError          assert_sound
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from meshredirect.ir import Ruleset
from meshredirect.policy import Policy
from meshredirect.semantics.interpreter import Dropped, Passed, Redirected, TProxied, Unknown, Verdict, evaluate
from meshredirect.semantics.model import Connection, Environment, Origin

if TYPE_CHECKING:
    from meshredirect.semantics.check import Violation

__all__ = [
    "BypassError",
    "LoopError",
    "NotEquivalentError",
    "RedirectAssertionError",
    "Rules",
    "UnsoundError",
    "VerdictError",
    "as_ruleset",
    "assert_equivalent",
    "assert_loop_free",
    "assert_no_bypass",
    "assert_sound",
    "assert_verdict",
    "environment_for",
]

#: Anything the assertions accept as rules.
Rules: TypeAlias = Ruleset | Policy | str | Path
#: The engine's properties (:class:`~meshredirect.semantics.check.Property`) each assertion proves.
LOOP_PROPERTIES: Final = ("LOOP", "CAPTURE_BOUND", "DECIDED")
BYPASS_PROPERTIES: Final = ("OUTBOUND_COMPLETE", "INBOUND_COMPLETE")
#: How many steps of a chain a failure shows the trace of.
TRACED_STEPS: Final = 3
#: How many counterexamples beyond the first a failure lists (one line each).
MORE_EXAMPLES: Final = 4
_VERDICT_TYPES: Final = typing.get_args(Verdict)


class RedirectAssertionError(AssertionError):
    """A property of redirect rules does not hold; ``connection`` shows it, ``explanation`` says how.

    ``str(error)`` is the headline (the first line) and the explanation: the
    chain of interceptions and every step's trace. Catch this class to handle
    any of the assertions' failures alike:

    >>> from meshredirect.policy import Policy
    >>> from meshredirect.semantics import Connection, Environment, Passed
    >>> app = Connection.local(Environment.default(), dst="93.184.216.34", dport=443)
    >>> try:
    ...     assert_verdict(Policy(), app, Passed)
    ... except RedirectAssertionError as error:
    ...     print(error.connection.dport, error.counterexamples)
    ...     print(error.headline)
    ...     print(error.explanation.splitlines()[0])
    443 1
    tcp 10.0.0.5:43210 -> 93.184.216.34:443 local uid=1000 gid=1000 out eth0: expected passed, got redirected to 127.0.0.1:15001
      == OUTPUT (out eth0)
    """

    def __init__(
        self, headline: str, *, connection: Connection | None, explanation: str = "", counterexamples: int = 1
    ) -> None:
        self.headline = headline
        self.connection = connection
        self.explanation = explanation
        #: How many classes of connections fail (each stands for many connections).
        self.counterexamples = counterexamples
        super().__init__(headline + (f"\n{explanation}" if explanation else ""))


class LoopError(RedirectAssertionError):
    """Some connection is intercepted again and again (or more often than a sound chain is, or undecidably).

    Raised by :func:`assert_loop_free`; here the proxy's own connections are
    no longer exempt, so its upstream connection is captured again:

    >>> from meshredirect.policy import Policy
    >>> from meshredirect.testing.mutations import Mutation, mutate
    >>> try:
    ...     assert_loop_free(mutate(as_ruleset(Policy()), Mutation.DROP_PROXY_EXEMPTIONS))
    ... except LoopError as error:
    ...     print(error.explanation.splitlines()[2:4])
    ['  1. tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1000 gid=1000 out eth0  captured to the outbound listener', '  2. tcp 10.0.0.5:43210 -> 203.0.113.10:8080 local uid=1337 gid=1337 out eth0  captured to the outbound listener']
    """


class BypassError(RedirectAssertionError):
    """Some connection the policy captures does not reach the proxy.

    Raised by :func:`assert_no_bypass`; rules that exclude a port the policy
    captures let that port's connections bypass the proxy:

    >>> from meshredirect.policy import Policy
    >>> try:
    ...     assert_no_bypass(Policy(outbound_ports_exclude="5432"), Policy())
    ... except BypassError as error:
    ...     print(error.connection.dport)
    5432
    """


class NotEquivalentError(RedirectAssertionError):
    """Two rulesets treat some connection differently.

    Raised by :func:`assert_equivalent`; the explanation shows both verdicts first:

    >>> from meshredirect.policy import Policy
    >>> try:
    ...     assert_equivalent(Policy(), Policy(inbound_ports_exclude="8080,15020-15021,15090"))
    ... except NotEquivalentError as error:
    ...     print(error.connection.dport)
    ...     for line in error.explanation.splitlines()[:2]:
    ...         print(line)
    8080
      first:  redirected to 10.0.0.5:15006
      second: passed to 10.0.0.5:8080 (delivered locally)
    """


class VerdictError(RedirectAssertionError):
    """The rules do not do to a connection what was expected.

    Raised by :func:`assert_verdict`; the explanation is the connection's trace:

    >>> from meshredirect.policy import Policy
    >>> from meshredirect.semantics import Connection, Dropped
    >>> peer = Connection.remote(src="203.0.113.10", dst="10.0.0.5", dport=22)
    >>> try:
    ...     assert_verdict(Policy(inbound_ports_exclude="22"), peer, Dropped)
    ... except VerdictError as error:
    ...     print(error.headline)
    ...     print(error.explanation.splitlines()[-1])
    tcp 203.0.113.10:43210 -> 10.0.0.5:22 remote in eth0: expected dropped, got passed to 10.0.0.5:22 (delivered locally)
      verdict: passed to 10.0.0.5:22 (delivered locally)
    """


class UnsoundError(RedirectAssertionError):
    """Some property the engine proves does not hold (``properties`` names every one that fails).

    Raised by :func:`assert_sound`; the headline names the first failing
    property, the explanation ends with the others:

    >>> from meshredirect.policy import Policy
    >>> from meshredirect.testing.mutations import Mutation, mutate
    >>> try:
    ...     assert_sound(mutate(as_ruleset(Policy()), Mutation.DROP_PASSTHROUGH), Policy())
    ... except UnsoundError as error:
    ...     print(error.properties)
    ...     print(error.headline.split(":")[0])
    ...     print(error.explanation.splitlines()[-2])
    ('LOOP', 'PASSTHROUGH')
    no loop
    also failing:
    """

    def __init__(self, headline: str, *, properties: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(headline, **kwargs)
        #: The names of the failing :class:`~meshredirect.semantics.check.Property` members, in order.
        self.properties = properties


# ----------------------------------------------------------------------------- inputs


def as_ruleset(
    rules: Rules,
    *,
    family: str | None = None,
    users: Mapping[str, int] | None = None,
    groups: Mapping[str, int] | None = None,
) -> Ruleset:
    """The IR of ``rules``: a Ruleset as is, a Policy compiled, text or a file read by the matching reader.

    Text that starts with ``{`` is ``nft -j`` JSON; any other text is iptables
    text (``iptables-save``, ``iptables -S`` or ``iptables-restore`` input;
    ``family`` ``"ipv4"`` or ``"ipv6"`` when the text does not say; ``users``
    and ``groups`` resolve owner names as the node would).

    >>> from meshredirect.policy import Policy
    >>> len(as_ruleset(Policy()).tables)
    1
    >>> as_ruleset(42)
    Traceback (most recent call last):
    ...
    TypeError: expected rules (a Ruleset, a Policy, iptables or nft JSON text, or a Path to such a file), got int 42
    """
    if isinstance(rules, Ruleset):
        return rules
    if isinstance(rules, Policy):
        from meshredirect.compiler import compile_policy

        return compile_policy(rules)
    if isinstance(rules, Path):
        return _read(rules.read_text(), path=str(rules), family=family, users=users, groups=groups)
    if isinstance(rules, str):
        return _read(rules, path="<rules>", family=family, users=users, groups=groups)
    raise TypeError(
        "expected rules (a Ruleset, a Policy, iptables or nft JSON text, or a Path to such a file), "
        f"got {type(rules).__name__} {rules!r}"
    )


def _read(
    text: str,
    *,
    path: str,
    family: str | None,
    users: Mapping[str, int] | None,
    groups: Mapping[str, int] | None,
) -> Ruleset:
    if text.lstrip().startswith("{"):
        from meshredirect.readers.nftables import read_nft_json

        return read_nft_json(text, path=path)
    from meshredirect.readers.iptables import read_iptables

    return read_iptables(text, path=path, family=family, users=users, groups=groups)


def environment_for(rules: Rules, env: Environment | None = None) -> Environment:
    """The environment the assertions use: ``env`` if given, else the policy's own, else Istio's default.

    Either way it is extended with the interfaces the rules name.

    >>> from meshredirect.policy import Policy
    >>> environment_for(Policy(outbound_port=15101)).proxy.outbound_port
    15101
    """
    return _environment(rules, as_ruleset(rules), env)


def _environment(rules: Rules, ruleset: Ruleset, env: Environment | None) -> Environment:
    if env is not None:
        return env.covering(ruleset)
    if isinstance(rules, Policy):
        return Environment.for_policy(rules, ruleset)
    return Environment.default().covering(ruleset)


def _policy_of(policy_or_exclusions: Policy | Mapping[str, Any]) -> Policy:
    import attrs

    if isinstance(policy_or_exclusions, Policy):
        return policy_or_exclusions
    if isinstance(policy_or_exclusions, Mapping):
        fields = {f.name for f in attrs.fields(Policy)}
        unknown = sorted(set(policy_or_exclusions) - fields)
        if unknown:
            raise ValueError(f"expected policy fields ({', '.join(sorted(fields))}), got {unknown[0]!r}")
        return Policy(**policy_or_exclusions)
    raise TypeError(f"expected a Policy or a mapping of policy fields, got {type(policy_or_exclusions).__name__}")


# ----------------------------------------------------------------------------- assertions


def assert_loop_free(rules: Rules, env: Environment | None = None) -> None:
    """Prove that no connection is intercepted in a loop; raise :class:`LoopError` with one that is.

    Stronger than "ends": every chain of interceptions is at most one
    outbound capture followed by at most one inbound capture (or one DNS or
    tunnel capture). A connection whose fate cannot be decided (a match the
    engine does not model) fails too: a proof with a hole is not claimed.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> from meshredirect.testing.mutations import Mutation, mutate
    >>> assert_loop_free(compile_policy(Policy()))
    >>> broken = mutate(compile_policy(Policy()), Mutation.DROP_PROXY_EXEMPTIONS)
    >>> try:
    ...     assert_loop_free(broken)
    ... except LoopError as error:
    ...     print(error.headline)  # doctest: +ELLIPSIS
    ...     print(error.connection.socket)
    not loop-free on ... of connections, e.g. traffic loop: tcp 10.0.0.5:... -> ... local uid=1000 gid=1000 out eth0 is intercepted again and again (6 steps and on)
    uid=1000 gid=1000
    """
    from meshredirect.semantics.check import check

    ruleset = as_ruleset(rules)
    environment = _environment(rules, ruleset, env)
    violations = [v for v in check(ruleset, environment).violations if v.property.name in LOOP_PROPERTIES]
    if violations:
        violations.sort(key=lambda v: _plainest(v, environment))
        raise _failure(LoopError, "not loop-free", violations)


def assert_no_bypass(
    rules: Rules, policy_or_exclusions: Policy | Mapping[str, Any], env: Environment | None = None
) -> None:
    """Prove that every TCP connection the policy captures reaches the proxy; raise :class:`BypassError` otherwise.

    ``policy_or_exclusions`` says what should be captured: a
    :class:`~meshredirect.policy.Policy`, or a mapping of policy fields (the
    exclusions: ``{"outbound_ports_exclude": "22"}``; the other fields keep
    Istio's defaults). Covered: every app connection out of the pod over a
    non-loopback interface that no exclusion covers reaches the outbound
    listener, and every inbound connection to the pod's address on a
    captured port reaches the inbound listener.

    >>> from meshredirect.policy import Policy
    >>> assert_no_bypass(Policy(outbound_ports_exclude="22"), {"outbound_ports_exclude": "22"})
    >>> assert_no_bypass(Policy(outbound_ports_exclude="22,5432"), {"outbound_ports_exclude": "22"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    meshredirect.testing.assertions.BypassError: the proxy is bypassed on ... of connections, e.g. mesh bypass: tcp 10.0.0.5:... -> ...:5432 local uid=1000 gid=1000 out eth0 should reach the proxy's outbound listener (...), but: passed to ...:5432 (sent out)
    ...
    """
    from meshredirect.semantics.check import check

    policy = _policy_of(policy_or_exclusions)
    if policy.unresolved_groups():
        raise ValueError(
            f"expected a policy with numeric owner groups, got group names {', '.join(policy.unresolved_groups())}: "
            "resolve them first (meshredirect.resolve_groups)"
        )
    ruleset = as_ruleset(rules)
    environment = env.covering(ruleset) if env is not None else Environment.for_policy(policy, ruleset)
    report = check(policy, environment, ruleset=ruleset)
    violations = [v for v in report.violations if v.property.name in BYPASS_PROPERTIES]
    if violations:
        violations.sort(key=lambda v: _plainest(v, environment))
        raise _failure(BypassError, "the proxy is bypassed", violations)


def assert_sound(rules: Rules, policy: Policy | None = None, env: Environment | None = None) -> None:
    """Prove every property the engine knows (:func:`meshredirect.semantics.check.check`); raise
    :class:`UnsoundError` with the first violation of each failing property otherwise.

    Without ``policy``: loop-freedom, the proxy's own traffic never sent to its
    outbound port, the passthrough always passing, the proxy's ports and DNS
    queries never captured, every verdict decided. With ``policy`` (or when
    ``rules`` is a Policy): also that everything it captures reaches the proxy
    and every exclusion is honoured.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> from meshredirect.testing.mutations import Mutation, mutate
    >>> assert_sound(Policy())
    >>> try:
    ...     assert_sound(mutate(compile_policy(Policy()), Mutation.CAPTURE_LOOPBACK))
    ... except UnsoundError as error:
    ...     print(error.properties)
    ...     print(error.headline)  # doctest: +ELLIPSIS
    ('PROXY_PORTS',)
    the proxy's own ports and its DNS queries are never captured: fails on ... of connections, e.g. tcp ... -> 127.0.0.1:15001 local ... out lo to the proxy's own listener is captured (redirected to 127.0.0.1:15006)
    """
    from meshredirect.semantics.check import check

    ruleset = as_ruleset(rules)
    if policy is None and isinstance(rules, Policy):
        policy = rules
    if policy is not None and policy.unresolved_groups():
        raise ValueError(
            f"expected a policy with numeric owner groups, got group names {', '.join(policy.unresolved_groups())}: "
            "resolve them first (meshredirect.resolve_groups)"
        )
    if policy is not None:
        environment = env.covering(ruleset) if env is not None else Environment.for_policy(policy, ruleset)
        report = check(policy, environment, ruleset=ruleset)
    else:
        environment = _environment(rules, ruleset, env)
        report = check(ruleset, environment)
    if report.ok:
        return
    failing = [p for p in report.properties if report.of(p)]
    first = sorted(report.of(failing[0]), key=lambda v: _plain(v.connection, environment))
    failure = _failure(UnsoundError, failing[0].value, first, properties=tuple(p.name for p in failing))
    if len(failing) > 1:
        failure.explanation += "\nalso failing:\n" + "\n".join(
            f"  {p.value} ({len(report.of(p))} classes)" for p in failing[1:]
        )
        failure.args = (failure.headline + "\n" + failure.explanation,)
    raise failure


def assert_equivalent(a: Rules, b: Rules, env: Environment | None = None) -> None:
    """Prove that ``a`` and ``b`` treat every connection alike; raise :class:`NotEquivalentError` otherwise.

    Any mix of inputs works (a policy against the iptables text on a node, or
    against hand-written nft JSON); the verdict, the connection mark and the
    conntrack zone of every class of connections are compared.

    >>> from meshredirect.policy import Policy
    >>> assert_equivalent(Policy(), Policy(one_rule_per_port=True))
    >>> assert_equivalent(Policy(), Policy(outbound_ports_exclude="5432"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    meshredirect.testing.assertions.NotEquivalentError: the rulesets differ on ... of connections, e.g. tcp 10.0.0.5:... -> ...:5432 local uid=1000 gid=1000 out eth0
      first:  redirected to 127.0.0.1:15001
      second: passed to ...:5432 (sent out)
    ...
    """
    from meshredirect.semantics.equivalence import equivalent

    first, second = as_ruleset(a), as_ruleset(b)
    if env is None:
        policy = a if isinstance(a, Policy) else b if isinstance(b, Policy) else None
        env = Environment.for_policy(policy) if policy is not None else Environment.default()
    environment = env.covering(first, second)
    differences = sorted(equivalent(first, second, environment), key=lambda d: _plain(d.example, environment))
    if not differences:
        return
    d = differences[0]
    count = len(differences)
    headline = f"the rulesets differ on {count} class{'es' if count != 1 else ''} of connections, e.g. {d.example}"
    lines = [
        f"  first:  {d.first.verdict}",
        f"  second: {d.second.verdict}",
        f"  differs in: {d.aspect}",
        f"  class: {d.description}",
        "trace in the first:",
        *(f"  {line}" for line in d.first.explain().splitlines()),
        "trace in the second:",
        *(f"  {line}" for line in d.second.explain().splitlines()),
    ]
    if count > 1:
        lines.append("other differences:")
        lines += [f"  {o.example}: {o.first.verdict} | {o.second.verdict}" for o in differences[1 : 1 + MORE_EXAMPLES]]
        if count > 1 + MORE_EXAMPLES:
            lines.append(f"  ... and {count - 1 - MORE_EXAMPLES} more")
    raise NotEquivalentError(headline, connection=d.example, explanation="\n".join(lines), counterexamples=count)


def assert_verdict(
    rules: Rules,
    connection: Connection,
    expected: Passed
    | Redirected
    | TProxied
    | Dropped
    | Unknown
    | type[Passed | Redirected | TProxied | Dropped | Unknown],
    env: Environment | None = None,
) -> None:
    """Check what the rules do to one connection; raise :class:`VerdictError` with the trace otherwise.

    ``expected`` is a verdict (:class:`~meshredirect.semantics.interpreter.Passed`,
    :class:`~meshredirect.semantics.interpreter.Redirected`...) compared in
    full, or a verdict class (any verdict of that kind).

    >>> from ipaddress import ip_address
    >>> from meshredirect.policy import Policy
    >>> remote = Connection.remote(src="203.0.113.10", dst="10.0.0.5", dport=8080)
    >>> assert_verdict(Policy(), remote, Redirected(address=ip_address("10.0.0.5"), port=15006))
    """
    if not (isinstance(expected, _VERDICT_TYPES) or (isinstance(expected, type) and expected in _VERDICT_TYPES)):
        names = ", ".join(t.__name__ for t in _VERDICT_TYPES)
        raise TypeError(f"expected a verdict or a verdict class ({names}), got {expected!r}")
    ruleset = as_ruleset(rules)
    evaluation = evaluate(ruleset, connection, _environment(rules, ruleset, env))
    verdict = evaluation.verdict
    if isinstance(expected, type):
        if isinstance(verdict, expected):
            return
        want = expected.__name__.lower()
    else:
        if verdict == expected:
            return
        want = str(expected)
    trace = "\n".join(f"  {line}" for line in evaluation.explain().splitlines())
    raise VerdictError(f"{connection}: expected {want}, got {verdict}", connection=connection, explanation=trace)


def _plainest(violation: Violation, env: Environment) -> tuple[int, tuple[bool, ...]]:
    """Sort key: the property's order (a loop first), then the plainest counterexample."""
    order = list(type(violation.property)).index(violation.property)
    return order, _plain(violation.connection, env)


def _plain(c: Connection, env: Environment) -> tuple[bool, ...]:
    """Sort key of connections, plainest first: no mark, a socket when local, an app's rather than the
    proxy's, not to loopback, not a peer's connection to another host, a peer's rather than a local one."""
    local = c.origin is Origin.LOCAL
    elsewhere = not local and not env.is_local(c.dst)
    proxy = local and env.proxy.owns(c.socket)
    return c.mark != 0, local and c.socket is None, proxy, c.dst.is_loopback, elsewhere, local


def _explain(violation: Violation) -> str:
    """The class, the chain of interceptions, and the traces of its first steps."""
    chain = violation.chain
    lines = [f"class: {violation.description}", "chain:"]
    lines += [f"  {line}" for line in chain.describe().splitlines()]
    for index, step in enumerate(chain.steps[:TRACED_STEPS], 1):
        lines.append(f"trace of step {index}: {step.connection}")
        lines += [f"  {line}" for line in step.evaluation.explain().splitlines()]
    if len(chain.steps) > TRACED_STEPS:
        lines.append(f"(the traces of steps {TRACED_STEPS + 1} to {len(chain.steps)} are left out)")
    return "\n".join(lines)


def _failure(
    kind: type[RedirectAssertionError], what: str, violations: list[Violation], **extra: Any
) -> RedirectAssertionError:
    first = violations[0]
    count = len(violations)
    classes = f"{count} class{'es' if count != 1 else ''} of connections"
    headline = (
        f"{what}: fails on {classes}, e.g. {first.message}" if extra else f"{what} on {classes}, e.g. {first.message}"
    )
    lines = [_explain(first)]
    if count > 1:
        lines.append("other counterexamples:")
        lines += [f"  {v.message}" for v in violations[1 : 1 + MORE_EXAMPLES]]
        if count > 1 + MORE_EXAMPLES:
            lines.append(f"  ... and {count - 1 - MORE_EXAMPLES} more")
    return kind(headline, connection=first.connection, explanation="\n".join(lines), counterexamples=count, **extra)
