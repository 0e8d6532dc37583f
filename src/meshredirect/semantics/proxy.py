"""The proxy model: what the sidecar does with the connections the rules hand it.

A connection that the rules send to one of the proxy's listeners is an
*interception*; the proxy then opens a follow-up connection, which the rules
see again. An interception step is ``c -> c'``; :func:`follow` walks the
chain of steps from a connection to its end:

- redirected (or TPROXY'd) to the **outbound** listener: the proxy reads the
  original destination (``SO_ORIGINAL_DST``) and connects there as itself
  (the proxy's uid and gid), from the source address the kernel picks;
- to the **inbound** listener: the proxy connects to the app at the
  original destination, from 127.0.0.6 (::6) in REDIRECT mode; in TPROXY
  mode from the original source, with the TPROXY mark on its socket;
- to the **DNS** listener: the agent forwards the query, as the proxy, to
  the original destination;
- to the **tunnel** listener: the tunnel ends there (what travels inside is
  another connection, out of scope).

Like Istio's proxy, it refuses (blackholes) a connection whose original
destination is its own outbound or inbound listener, and a connection that
reaches one of those listeners directly (not redirected) has itself as its
original destination, so it ends there too.

:class:`ProxyModel` can be told to misbehave (``inbound_via_outbound``: the
inbound side hands connections to the outbound side instead of connecting
from the passthrough address), so that tests see the checks catch the loop
that follows.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> from meshredirect.semantics.interpreter import Interpreter
>>> env = Environment.for_policy(Policy())
>>> interpreter = Interpreter(compile_policy(Policy()), env)
>>> chain = follow(interpreter, Connection.remote(src="10.0.0.1", dst="10.0.0.5", dport=8080))
>>> for step in chain.steps:
...     print(step.connection, "=>", step.arrival.value)
tcp 10.0.0.1:43210 -> 10.0.0.5:8080 remote in eth0 => inbound listener
tcp 127.0.0.6:43210 -> 10.0.0.5:8080 local uid=1337 gid=1337 out lo => local port
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final

import attrs

from meshredirect.ir import Family
from meshredirect.semantics.explore import In, Sym, Tracer, probe
from meshredirect.semantics.interpreter import (
    ROUTED,
    Choices,
    Dropped,
    Evaluation,
    Interpreter,
    Passed,
    Redirected,
    TProxied,
    Unknown,
)
from meshredirect.semantics.model import DEFAULT_SOURCE_PORT, Connection, Environment, Origin

__all__ = ["Arrival", "InterceptionChain", "ProxyModel", "Step", "arrival", "arrives_at", "follow"]

#: More steps than this and a chain is called a loop (a sound chain has at most three).
MAX_STEPS: Final = 6


class Arrival(enum.Enum):
    """Where a connection ends up."""

    OUTBOUND = "outbound listener"
    INBOUND = "inbound listener"
    TUNNEL = "tunnel listener"
    DNS = "DNS listener"
    #: Delivered untouched to a local port (a listener of the proxy or an app: see :func:`~meshredirect.semantics.proxy.arrives_at`).
    LOCAL = "local port"
    APP = "application"
    AWAY = "leaves the pod"
    DROPPED = "dropped"
    UNKNOWN = "unknown"

    @property
    def proxy(self) -> bool:
        """Whether this is one of the proxy's listeners."""
        return self in (Arrival.OUTBOUND, Arrival.INBOUND, Arrival.TUNNEL, Arrival.DNS)


@attrs.frozen(kw_only=True)
class Step:
    """One connection of a chain: what the rules did to it and where it arrived."""

    connection: Connection
    evaluation: Evaluation
    arrival: Arrival
    #: The rules sent it to a proxy listener (NAT or TPROXY), rather than it going there by itself.
    captured: bool
    #: What the proxy did about it, when that ends the chain (e.g. a blackhole).
    note: str | None = None

    def __str__(self) -> str:
        how = "captured to the" if self.captured else "reaches the" if self.arrival.proxy else "->"
        text = f"{self.connection}  {how} {self.arrival.value}"
        return text + (f" ({self.note})" if self.note else "")


@attrs.frozen(kw_only=True)
class InterceptionChain:
    """A connection and the follow-up connections the proxy opens for it, to the end."""

    steps: tuple[Step, ...]
    #: The chain did not end within ``MAX_STEPS`` steps (or a connection came back).
    looped: bool = False

    @property
    def captures(self) -> tuple[Arrival, ...]:
        """The listeners of the captured steps, in order."""
        return tuple(s.arrival for s in self.steps if s.captured)

    def cycle(self) -> tuple[int, int] | None:
        """(first, repeat): 1-based positions of the first connection that comes back, if one does."""
        for j, step in enumerate(self.steps):
            for i in range(j):
                if self.steps[i].connection == step.connection:
                    return i + 1, j + 1
        return None

    def describe(self) -> str:
        lines = [f"{i}. {step}" for i, step in enumerate(self.steps, 1)]
        if self.looped:
            cycle = self.cycle()
            if cycle is not None:
                lines.append(f"... connection {cycle[1]} is connection {cycle[0]} again: a loop")
            else:
                lines.append(f"... and so on: the chain does not end within {MAX_STEPS} steps")
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class ProxyModel:
    """How the proxy reacts (see the module docstring); the flags model faults, for tests."""

    #: Refuse connections whose original destination is the proxy's own outbound or inbound listener.
    blackhole_own_listeners: bool = True
    #: Fault: the inbound side forwards through the outbound side (the connection to the app is
    #: opened as an outbound upstream connection instead of from the passthrough address).
    inbound_via_outbound: bool = False


class _Keys:
    """Tests of stable identity on one environment (the explorer caches them by identity)."""

    def __init__(self, env: Environment) -> None:
        proxy = env.proxy
        listeners: dict[int, Arrival] = {proxy.outbound_port: Arrival.OUTBOUND, proxy.inbound_port: Arrival.INBOUND}
        if proxy.tunnel_port is not None:
            listeners[proxy.tunnel_port] = Arrival.TUNNEL
        if proxy.dns_port is not None:
            listeners[proxy.dns_port] = Arrival.DNS
        self.listener: Callable[[Any], Arrival] = lambda port: listeners.get(port, Arrival.APP)
        self.is_local: Callable[[Any], Hashable] = env.is_local
        self.own_listener_port = In(frozenset({proxy.outbound_port, proxy.inbound_port}))
        self.source_for: Callable[[Any], Hashable] = functools.partial(_source_for, env)


def _source_for(env: Environment, dst: Any) -> Any:
    return env.source_for(dst)


_KEYS: dict[int, tuple[Environment, _Keys]] = {}


def _keys(env: Environment) -> _Keys:
    found = _KEYS.get(id(env))
    if found is not None and found[0] is env:
        return found[1]
    keys = _Keys(env)
    if len(_KEYS) > 16:
        _KEYS.clear()
    _KEYS[id(env)] = (env, keys)
    return keys


def arrival(ev: Evaluation, env: Environment, tracer: Tracer | None = None) -> tuple[Arrival, bool, str | None]:
    """Where an evaluated connection arrives, whether it was captured, and a note."""
    keys = _keys(env)
    verdict = ev.verdict
    match verdict:
        case Passed():
            if not verdict.local:
                return Arrival.AWAY, False, None
            # Which listener takes it matters only to some checks (the chain ends here: a connection
            # that reaches the proxy's listener directly has that listener as original destination).
            return Arrival.LOCAL, False, None
        case Redirected():
            if not probe(tracer, verdict.address, ev.symbols.get("verdict.address"), keys.is_local):
                return Arrival.AWAY, False, "its destination was rewritten to another host"
            where = probe(tracer, verdict.port, ev.symbols.get("verdict.port"), keys.listener)
            return where, where is not Arrival.APP, None
        case TProxied():
            where = keys.listener(verdict.port)
            if where is Arrival.APP or not env.proxy.transparent:
                return Arrival.DROPPED, True, f"no transparent listener on port {verdict.port}"
            return where, True, None
        case Dropped():
            return Arrival.DROPPED, False, str(verdict)
        case Unknown():
            return Arrival.UNKNOWN, False, verdict.reason
    raise AssertionError(verdict)


def arrives_at(step: Step, listener: Arrival, env: Environment, tracer: Tracer | None = None) -> bool:
    """Whether a step that arrived at a local port (:attr:`Arrival.LOCAL`) arrived at ``listener``."""
    verdict = step.evaluation.verdict
    if step.arrival is listener:
        return True
    if step.arrival is not Arrival.LOCAL or not isinstance(verdict, Passed):
        return False
    found = probe(tracer, verdict.port, step.evaluation.symbols.get("verdict.port"), _keys(env).listener)
    return bool(found is listener)


def follow(
    interpreter: Interpreter,
    connection: Connection,
    *,
    model: ProxyModel | None = None,
    symbols: Mapping[str, Sym] | None = None,
    tracer: Tracer | None = None,
    trace: bool = True,
    choices: Choices | Sequence[bool] | None = None,
    source_nat: bool = True,
) -> InterceptionChain:
    """The interception chain of ``connection``: its evaluation and the proxy's follow-ups, to the end.

    ``symbols`` and ``tracer`` serve the proof enumeration (see :meth:`~meshredirect.semantics.interpreter.Interpreter.evaluate`).
    ``choices`` fixes the outcomes of the choice points met along the whole chain, in order (an explorer
    leaf's ``choices``); without it the tracer chooses, or, with no tracer, each takes the default.
    ``source_nat=False``: see :meth:`~meshredirect.semantics.interpreter.Interpreter.evaluate` (the chain
    itself never reads a connection's source after NAT: a follow-up starts from the original connection).
    """
    if choices is None and tracer is None:
        choices = Choices()
    elif choices is not None and not isinstance(choices, Choices):
        choices = Choices(choices)
    proxy_model = model if model is not None else ProxyModel()
    env = interpreter.env
    steps: list[Step] = []
    current: Connection | None = connection
    current_symbols: Mapping[str, Sym] = symbols or {}
    while current is not None:
        # Steps are deterministic: a chain that comes back to a connection runs to this bound.
        if len(steps) >= MAX_STEPS:
            return InterceptionChain(steps=tuple(steps), looped=True)
        ev = interpreter.evaluate(
            current, trace=trace, symbols=current_symbols, tracer=tracer, choices=choices, source_nat=source_nat
        )
        where, captured, note = arrival(ev, env, tracer)
        nxt = _follow_up(ev, where, captured, env=env, model=proxy_model, symbols=current_symbols, tracer=tracer)
        if nxt is None or isinstance(nxt, str):
            steps.append(Step(connection=current, evaluation=ev, arrival=where, captured=captured, note=note or nxt))
            break
        steps.append(Step(connection=current, evaluation=ev, arrival=where, captured=captured, note=note))
        current, current_symbols = nxt
    return InterceptionChain(steps=tuple(steps))


def _follow_up(
    ev: Evaluation,
    where: Arrival,
    captured: bool,
    *,
    env: Environment,
    model: ProxyModel,
    symbols: Mapping[str, Sym],
    tracer: Tracer | None,
) -> tuple[Connection, Mapping[str, Sym]] | str | None:
    """The proxy's next connection (and its symbols), a note on why there is none, or None."""
    if where not in (Arrival.OUTBOUND, Arrival.INBOUND, Arrival.DNS) or not captured:
        return None
    keys = _keys(env)
    original = ev.original
    dst_sym, dport_sym = symbols.get("dst"), symbols.get("dport")
    if (
        model.blackhole_own_listeners
        and where is not Arrival.DNS
        and probe(tracer, original.dst, dst_sym, keys.is_local)
        and probe(tracer, original.dport, dport_sym, keys.own_listener_port)
    ):
        return "the proxy refuses it: its original destination is the proxy's own listener"
    proxy = env.proxy
    family: Family = original.family
    if where is Arrival.INBOUND and not model.inbound_via_outbound:
        if proxy.transparent:
            src, src_sym, mark = original.src, symbols.get("src"), proxy.tproxy_mark
        else:
            src, src_sym, mark = proxy.passthrough_for(family), None, 0
    else:
        src = probe(tracer, original.dst, dst_sym, keys.source_for)
        src_sym, mark = None, 0
    follow_up = Connection(
        family=family,
        protocol=original.protocol,
        src=src,
        sport=DEFAULT_SOURCE_PORT,
        dst=original.dst,
        dport=original.dport,
        origin=Origin.LOCAL,
        oif=env.route(original.dst, mark),
        socket=proxy.socket,
        mark=mark,
    )
    follow_symbols: dict[str, Sym] = {"oif": ROUTED}
    for field, sym in (("src", src_sym), ("dst", dst_sym), ("dport", dport_sym)):
        if sym is not None:
            follow_symbols[field] = sym
    return follow_up, follow_symbols
