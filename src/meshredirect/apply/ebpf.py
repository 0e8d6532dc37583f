"""Build, load, fill and attach the ``ebpf`` backend's output; detach and remove it again.

Everything here works from the rendering's artifacts (the C source and the
maps document), so the core never imports the backend. The order matters and
is the only one offered: the maps are filled before any program is attached,
because a program running with an empty uid map would send the proxy's own
connections back to the proxy.

Typical use (root, clang, bpftool; see ``tests/kernel/test_ebpf.py``)::

    with BpfFilesystem() as bpffs:
        loaded = load(rendering, workdir, bpffs.path / "meshredirect")
        try:
            loaded.attach(cgroup)
            ...
        finally:
            loaded.detach(cgroup)
            loaded.remove()
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import attrs

from meshredirect.backend import Rendering
from meshredirect.errors import EnvironmentProblem

__all__ = ["BpfFilesystem", "LoadedProgram", "bpf_refused", "build", "load", "multiarch_include", "run_tool"]

#: clang's flags for the BPF target (-g: BTF, which the map definitions need).
CLANG_FLAGS: Final = ("-O2", "-g", "-Wall", "-target", "bpf")
#: Lines of a failing tool's output kept in the error (the verifier's log can be long).
KEPT_LINES: Final = 60


def run_tool(argv: Sequence[str], *, input: str | None = None, what: str | None = None) -> str:
    """Run a tool; a missing tool or a failure raises EnvironmentProblem with its output."""
    try:
        result = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"{argv[0]} is not installed", remedy="install the Debian packages clang, llvm, libbpf-dev and bpftool"
        ) from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        shown = "\n".join(output[-KEPT_LINES:])
        raise EnvironmentProblem(f"{what or ' '.join(argv)} failed (exit {result.returncode}):\n{shown}")
    return result.stdout


def multiarch_include() -> Path:
    """/usr/include/<triplet>, where Debian keeps asm/types.h (glibc's headers are never included).

    The triplet is ``gcc -dumpmachine``'s (what the documentation says) or, without gcc, clang's
    ``-print-multiarch``.
    """
    for argv in (["gcc", "-dumpmachine"], ["clang", "-print-multiarch"]):
        if shutil.which(argv[0]):
            triplet = run_tool(argv).strip()
            path = Path("/usr/include") / triplet
            if triplet and (path / "asm").is_dir():
                return path
    raise EnvironmentProblem(
        "cannot find /usr/include/<triplet>/asm (the kernel's headers for this machine)",
        remedy="install the Debian package linux-libc-dev",
    )


def build(rendering: Rendering, workdir: Path) -> Path:
    """Compile the rendering's C source with clang for the BPF target; returns the object file."""
    source = rendering.artifact(kind="c")
    workdir.mkdir(parents=True, exist_ok=True)
    c_file = workdir / source.name
    c_file.write_text(source.content)
    obj = c_file.with_suffix(".o")
    run_tool(
        ["clang", *CLANG_FLAGS, f"-I{multiarch_include()}", "-c", str(c_file), "-o", str(obj)],
        what=f"clang -target bpf {source.name}",
    )
    return obj


@attrs.frozen(kw_only=True)
class LoadedProgram:
    """Programs and maps loaded and pinned under ``pin_dir`` (``progs/`` and ``maps/``)."""

    pin_dir: Path
    #: program name -> bpftool cgroup attach type
    programs: dict[str, str]
    document: dict[str, Any]

    @property
    def maps_dir(self) -> Path:
        return self.pin_dir / "maps"

    def program_path(self, name: str) -> Path:
        return self.pin_dir / "progs" / name

    def fill(self, document: dict[str, Any] | None = None) -> int:
        """Load every entry of the maps document (one bpftool batch); returns how many."""
        lines = []
        for item in (document or self.document)["maps"]:
            for entry in item["entries"]:
                lines.append(
                    f"map update pinned {self.maps_dir / item['name']} key hex {entry['key']} value hex {entry['value']}"
                )
        if lines:
            with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as batch:
                batch.write("\n".join(lines) + "\n")
            try:
                run_tool(["bpftool", "batch", "file", batch.name], what="bpftool map update (batch)")
            finally:
                os.unlink(batch.name)
        return len(lines)

    def attach(self, cgroup: Path) -> None:
        """Attach every program to a cgroup v2 directory."""
        for name, attach in self.programs.items():
            run_tool(["bpftool", "cgroup", "attach", str(cgroup), attach, "pinned", str(self.program_path(name))])

    def detach(self, cgroup: Path) -> None:
        """Detach our programs from the cgroup (those that are attached; never fails on a missing one)."""
        for name, attach in self.programs.items():
            subprocess.run(
                ["bpftool", "cgroup", "detach", str(cgroup), attach, "pinned", str(self.program_path(name))],
                capture_output=True,
                check=False,
            )

    def attached(self, cgroup: Path) -> list[str]:
        """Names of the programs attached to the cgroup (all of them, ours or not)."""
        listing = json.loads(run_tool(["bpftool", "-j", "cgroup", "show", str(cgroup)]).strip() or "[]")
        return [item.get("name", "") for item in listing]

    def dump(self, name: str) -> list[tuple[bytes, bytes]]:
        """The entries of one pinned map as (key, value) bytes."""
        data = json.loads(
            run_tool(["bpftool", "-j", "map", "dump", "pinned", str(self.maps_dir / name)]).strip() or "[]"
        )
        return [(bytes(int(b, 16) for b in e["key"]), bytes(int(b, 16) for b in e["value"])) for e in data]

    def remove(self) -> None:
        """Unpin everything (the kernel frees programs and maps once nothing holds them)."""
        shutil.rmtree(self.pin_dir, ignore_errors=True)


def load(rendering: Rendering, workdir: Path, pin_dir: Path, *, fill: bool = True) -> LoadedProgram:
    """Build, load and pin the programs and maps, and (``fill``) load the maps' entries. Nothing is attached."""
    document = json.loads(rendering.artifact(kind="ebpf-maps").content)
    obj = build(rendering, workdir)
    pin_dir.mkdir(parents=True, exist_ok=True)
    loaded = LoadedProgram(
        pin_dir=pin_dir,
        programs={p["name"]: p["attach"] for p in document["programs"]},
        document=document,
    )
    try:
        run_tool(
            ["bpftool", "prog", "loadall", str(obj), str(pin_dir / "progs"), "pinmaps", str(loaded.maps_dir)],
            what="bpftool prog loadall (the kernel's verifier)",
        )
        if fill:
            loaded.fill()
    except BaseException:
        loaded.remove()
        raise
    return loaded


def bpf_refused(workdir: Path, bpffs: Path) -> str | None:
    """Why this kernel refuses to load a trivial cgroup program, or None when it loads one."""
    trivial = workdir / "probe.bpf.c"
    workdir.mkdir(parents=True, exist_ok=True)
    trivial.write_text(
        '#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\nSEC("cgroup/connect4")\n'
        "int mr_probe(struct bpf_sock_addr *ctx) { return 1; }\n"
        'char _license[] SEC("license") = "Apache-2.0";\n'
    )
    obj = trivial.with_suffix(".o")
    run_tool(["clang", *CLANG_FLAGS, f"-I{multiarch_include()}", "-c", str(trivial), "-o", str(obj)])
    probe = bpffs / "mr-probe"
    result = subprocess.run(
        ["bpftool", "prog", "load", str(obj), str(probe)], capture_output=True, text=True, check=False
    )
    probe.unlink(missing_ok=True)
    if result.returncode != 0:
        return f"the kernel refuses to load a trivial cgroup/connect4 program: {result.stderr.strip()[-300:]}"
    return None


class BpfFilesystem:
    """A bpf filesystem to pin into: a private instance mounted on a temporary directory (removed on exit)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="mr-bpffs-"))
        self.mounted = False

    def __enter__(self) -> BpfFilesystem:
        try:
            run_tool(["mount", "-t", "bpf", "bpf", str(self.path)], what="mount -t bpf")
        except BaseException:
            self.path.rmdir()
            raise
        self.mounted = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], capture_output=True, check=False)
            self.mounted = False
        with contextlib.suppress(OSError):
            self.path.rmdir()
