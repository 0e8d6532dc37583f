"""The README's console examples are what the commands print today."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from meshredirect.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```console\n\$ (meshredirect [^\n]*)\n(.*?)```", re.S)
EXAMPLES = BLOCK.findall(README.read_text())


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize(("command", "output"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_example_output_is_current(capsys: pytest.CaptureFixture[str], command: str, output: str) -> None:
    status = main(shlex.split(command)[1:])
    assert status == 0
    assert capsys.readouterr().out == output
