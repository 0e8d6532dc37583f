"""The ``ebpf`` backend: cgroup programs and their maps, lowered from the IR's nat OUTPUT chains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Final

from meshredirect.backend import Artifact, Rendering
from meshredirect.errors import PolicyError
from meshredirect.ir import Ruleset
from meshredirect_ebpf.csource import c_source
from meshredirect_ebpf.environment import Environment
from meshredirect_ebpf.lowering import lower
from meshredirect_ebpf.maps import MapDefinition, map_definitions, maps_document
from meshredirect_ebpf.plan import PROGRAMS, Program

if TYPE_CHECKING:
    from meshredirect_ebpf.proof import Proof

__all__ = ["C_FILE", "MAPS_FILE", "README_FILE", "EbpfBackend"]

C_FILE: Final = "redirect.bpf.c"
MAPS_FILE: Final = "maps.json"
README_FILE: Final = "README.md"
OBJECT_FILE: Final = "redirect.bpf.o"
PIN_ROOT: Final = "/sys/fs/bpf/meshredirect"


class EbpfBackend:
    """eBPF cgroup programs (connect, sockops, getsockopt, getpeername) and maps for local connections.

    ``environment`` holds the node's local addresses and routes (default:
    loopback and a default route via eth0; give the pod's addresses, see
    :meth:`~meshredirect_ebpf.environment.Environment.pod`, or a ``meshredirect.semantics`` ``Environment``,
    whose routing it takes); ``local_addresses`` and ``routes``
    (``"NETWORK=INTERFACE"``) build one as ``Environment.pod`` does. With ``local_only`` the chains a connect hook
    cannot implement (remote inbound capture, TPROXY, DNS zones) are left out
    and listed in the README instead of refused.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> rendering = EbpfBackend(environment=Environment.pod("10.0.0.5"), local_only=True).render(
    ...     compile_policy(Policy()))
    >>> [a.name for a in rendering.artifacts]
    ['redirect.bpf.c', 'maps.json', 'README.md']
    >>> EbpfBackend().render(compile_policy(Policy()))
    Traceback (most recent call last):
    ...
    meshredirect.errors.UnsupportedError: backend 'ebpf' cannot express Chain: ipv4 nat PREROUTING decides for connections arriving from other hosts; ...
    """

    name: ClassVar[str] = "ebpf"

    def __init__(
        self,
        environment: Environment | object | None = None,
        local_only: bool = False,
        local_addresses: Sequence[str] = (),
        routes: Sequence[str] = (),
    ) -> None:
        #: The semantics engine's environment the backend was built from, if any (see :meth:`prove`).
        self.semantics_environment: object | None = None
        if environment is not None and not isinstance(environment, Environment):
            from meshredirect_ebpf.proof import environment_of

            self.semantics_environment = environment
            environment = environment_of(environment)
        if environment is None:
            environment = (
                Environment.pod(*local_addresses, routes=routes) if local_addresses or routes else Environment()
            )
        self.environment: Environment = environment
        self.local_only = bool(local_only)

    def plan(self, ruleset: Ruleset) -> Program:
        """The program plan (what the C does, as data; :mod:`meshredirect_ebpf.model` runs it)."""
        return lower(ruleset, self.environment, local_only=self.local_only)

    def prove(self, ruleset: Ruleset) -> Proof:
        """Prove with the semantics engine that the program decides as the IR for every class of local
        connections (see :mod:`meshredirect_ebpf.proof`).

        The proof runs in the semantics engine's environment the backend was built from
        (``environment=`` a ``meshredirect.semantics`` ``Environment``), else in its default one; the
        backend's own environment must be that environment's routing.
        """
        from meshredirect.semantics.model import Environment as SemanticsEnvironment
        from meshredirect_ebpf.proof import environment_of, prove

        env = self.semantics_environment or SemanticsEnvironment.default().covering(ruleset)
        if environment_of(env) != self.environment:
            raise PolicyError(
                "environment",
                expected="the routing of the environment the proof runs in (build the backend with environment= "
                "a meshredirect.semantics Environment)",
                got="another environment",
            )
        return prove(self.plan(ruleset), ruleset, env)

    def render(self, ruleset: Ruleset) -> Rendering:
        program = self.plan(ruleset)
        definitions = map_definitions(program)
        return Rendering(
            backend=self.name,
            artifacts=(
                Artifact(name=C_FILE, content=c_source(program, definitions), kind="c"),
                Artifact(name=MAPS_FILE, content=maps_document(program, definitions), kind="ebpf-maps"),
                Artifact(name=README_FILE, content=readme(program, definitions), kind="readme"),
            ),
        )


def readme(program: Program, definitions: Sequence[MapDefinition] | None = None) -> str:
    """How to build, load and attach the program, and what it assumes."""
    env = program.environment
    lines = [
        "# meshredirect eBPF redirect program",
        "",
        f"- `{C_FILE}`: cgroup programs generated from the policy's nat OUTPUT chains.",
        f"- `{MAPS_FILE}`: the programs and their attach types, the policy's sets, every map with its purpose and",
        "  the entries to load (keys and values as `bpftool` takes them).",
        "",
        "For every connection a process of the cgroup opens (`connect4`/`connect6`) and every datagram an",
        "unconnected UDP socket sends (`sendmsg4`/`sendmsg6`), the program decides what the nat OUTPUT chains",
        "decide; a redirect rewrites the destination to 127.0.0.1 (::1) and the listener's port, and keeps the",
        "original destination, which the proxy reads with `getsockopt(SOL_IP or SOL_IPV6, SO_ORIGINAL_DST)` as",
        "after an iptables REDIRECT; `getpeername()` and the source of received datagrams show the original.",
        "",
        "## Build, load, fill, attach (as root)",
        "",
        "```sh",
        f"clang -O2 -g -target bpf -I/usr/include/$(gcc -dumpmachine) -c {C_FILE} -o {OBJECT_FILE}",
        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        f"bpftool prog loadall {OBJECT_FILE} {PIN_ROOT}/progs pinmaps {PIN_ROOT}/maps",
        f"# for every entry of every map in {MAPS_FILE}, BEFORE attaching (an empty uid map means a loop):",
        f"#   bpftool map update pinned {PIN_ROOT}/maps/NAME key hex KEY value hex VALUE",
    ]
    lines += [
        f"bpftool cgroup attach CGROUP {attach} pinned {PIN_ROOT}/progs/{function}" for _, function, attach in PROGRAMS
    ]
    lines += [
        "```",
        "",
        "CGROUP is the pod's cgroup v2 directory: every process of the pod, the proxy included, must be in it",
        "(the proxy's getsockopt runs the getsockopt program). Detach with `bpftool cgroup detach` and",
        f"remove {PIN_ROOT} to undo.",
        "",
        "## Environment (the routing the program assumes)",
        "",
        "A connect hook runs before routing, so the outgoing interface and the source address an unbound",
        "socket will get come from the maps `mr_local4/6` (the local routing table: `-o lo` means the",
        "destination is one of these), `mr_route4/6` (the main table, longest prefix) and `mr_mark_routes`",
        "(marks policy routing sends to lo, as TPROXY's fwmark rule). They must equal the node's routing;",
        "other policy routing (by uid or source) and SO_BINDTODEVICE are not seen.",
        "Interfaces are numbered: " + ", ".join(f"{env.interface_id(n)} = {n}" for n in env.interfaces) + ".",
        "",
    ]
    lines += [f"- local: {r.network} (source {r.source})" for r in env.local]
    lines += [f"- route: {r.network} via {r.interface} (source {r.source or 'none'})" for r in env.routes]
    lines += [f"- mark: mark & {m.mask:#x} == {m.value:#x} leaves on lo" for m in env.mark_routes]
    lines += [
        "",
        "## Translated with an assumption",
        "",
        "- owner matches test the uid/gid of the task calling connect() (netfilter: the fsuid/fsgid of the",
        "  socket's opener); they differ only for sockets passed between processes or ids changed in between.",
        "- a DROP refuses connect() with EPERM where netfilter would let it time out.",
        "- `--ctstate` sees NEW: connect() opens a new connection; a connmark is 0, a new connection's.",
        "- `-m mark` sees the socket's mark (SO_MARK): mangle OUTPUT rules that change it are not run.",
        "- a redirected UDP socket reads every answer from the proxy as coming from the last destination it",
        "  sent to (one captured server per socket at a time).",
        "- only connect() is seen: connections of processes outside the cgroup, and connections opened",
        "  before the program was attached, are not redirected.",
        "",
        "## Left out",
        "",
    ]
    if program.left_out:
        lines += [
            "These chains of the ruleset are not implemented by the program (rendered with local_only):",
            "install them with another backend; together they were not proven equivalent to the ruleset.",
            "",
        ]
        lines += [f"- {item}" for item in program.left_out]
    else:
        lines.append("Nothing: the program implements the whole ruleset.")
    lines += ["", "## Maps", ""]
    lines += [
        f"- `{m.name}` ({m.map_type}, {len(m.entries)}/{m.max_entries} entries, {m.filled_by}): {m.purpose}"
        for m in (definitions if definitions is not None else map_definitions(program))
    ]
    if program.sets:
        lines += ["", "## The policy's sets", ""]
        lines += [f"- `{item.name}` (number {item.index}): {item.purpose}" for item in program.sets]
    return "\n".join(lines) + "\n"
