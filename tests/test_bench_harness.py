"""The benchmark harness's arithmetic and page editing (no timing here: timed tests are not allowed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from harness import Section, Stats, growth_exponent, md_table, ratios
from run import BENCHMARKS, _replace_section, all_benchmarks, scripts


def test_stats_and_ratios_are_per_round() -> None:
    stats = {"base": Stats([1.0, 2.0, 4.0]), "slow": Stats([2.0, 2.0, 2.0])}
    relative = ratios(stats, "base")
    assert relative["base"].samples == [1.0, 1.0, 1.0]
    assert relative["slow"].samples == [2.0, 1.0, 0.5]
    assert (relative["slow"].median, relative["slow"].low, relative["slow"].high) == (1.0, 0.5, 2.0)


def test_growth_exponent_tells_linear_from_quadratic() -> None:
    assert growth_exponent([10, 100], [1.0, 10.0]) == 1.0
    assert growth_exponent([10, 100], [1.0, 100.0]) == 2.0


def test_markdown_table() -> None:
    assert md_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---:|\n| 1 | 2 |\n"


def test_a_rerun_replaces_only_its_section() -> None:
    page = "# B\n\n## One\n\nold one\n\n## Two\n\nold two\n"
    new = _replace_section(page, Section(key="one", title="One", text="new one"))
    assert "new one" in new and "old one" not in new and "old two" in new
    assert _replace_section(page, Section(key="x", title="Three")).count("## Three") == 1


def test_every_benchmark_has_a_function() -> None:
    assert list(BENCHMARKS) == ["compile_scaling", "startup", "apply_time", "connection_rate", "proof_time"]


def test_a_script_of_another_part_is_run_and_its_markdown_taken(tmp_path: Path) -> None:
    from run import script_section

    script = tmp_path / "benchmarks" / "probe.py"
    script.parent.mkdir()
    script.write_text(
        '"""Probe cost.\n\nHow it is measured.\n\n    python benchmarks/probe.py\n"""\nprint("| a |\\n|---|\\n| 1 |")\n'
    )
    section = script_section(script)
    assert section.title == "Probe cost"
    assert section.text.startswith("How it is measured.") and "python benchmarks" not in section.text
    assert section.tables == ["| a |\n|---|\n| 1 |\n"]


def test_a_failing_script_is_reported(tmp_path: Path) -> None:
    import pytest

    from run import script_section

    script = tmp_path / "broken.py"
    script.write_text('"""Broken."""\nraise SystemExit("no kernel here")\n')
    with pytest.raises(RuntimeError) as info:
        script_section(script)
    assert str(info.value) == "benchmarks/broken.py exited 1:\nno kernel here"


def test_a_script_named_like_a_function_runs_beside_it() -> None:
    functions = all_benchmarks([Path("benchmarks/apply_time.py"), Path("benchmarks/cni_add.py")])
    assert functions["apply_time"] is BENCHMARKS["apply_time"]
    assert list(functions)[len(BENCHMARKS) :] == ["apply_time.py", "cni_add"]


def test_scripts_called_as_functions_are_not_run_again() -> None:
    names = {path.stem for path in scripts()}
    assert not names & {"check_default", "ebpf_connection_cost", "nft_connection_rate", "proofs", "kernel_bench"}
