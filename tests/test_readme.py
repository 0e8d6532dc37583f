"""The console examples of the README and of docs/semantics.md are what the commands print today.

``pytest --update-goldens`` rewrites the output of every console block from
the command it shows (run for real), and touches nothing else in those files.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from meshredirect.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Files whose console blocks show a command's whole output (others, like docs/migrating.md, have their own tests).
FILES = (README, ROOT / "docs" / "semantics.md")
BLOCK = re.compile(r"```console\n\$ (meshredirect [^\n]*)\n(.*?)```", re.S)
EXAMPLES = [(path.name, *found) for path in FILES for found in BLOCK.findall(path.read_text())]


def _output(capsys: pytest.CaptureFixture[str], command: str) -> str:
    capsys.readouterr()
    status = main(shlex.split(command)[1:])
    assert status == 0, command
    return capsys.readouterr().out


def test_the_readme_has_examples() -> None:
    assert sum(1 for name, _, _ in EXAMPLES if name == README.name) >= 3


@pytest.mark.parametrize(("name", "command", "output"), EXAMPLES, ids=[f"{n}: {c}" for n, c, _ in EXAMPLES])
def test_readme_example_output_is_current(
    capsys: pytest.CaptureFixture[str], name: str, command: str, output: str, update_goldens: bool
) -> None:
    fresh = _output(capsys, command)
    if update_goldens and fresh != output:
        path = next(p for p in FILES if p.name == name)
        block = f"```console\n$ {command}\n"
        path.write_text(path.read_text().replace(block + output + "```", block + fresh + "```", 1))
        return
    assert fresh == output, f"{name}: run pytest --update-goldens"
