"""The README's commands are the ones that run: CI calls its test command, the demo works."""

from __future__ import annotations

import re

from conftest import REPO, run_cli


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    demo, tests = commands
    assert "demo-mllm" in demo and "pytest" in tests
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_demo_compares_dense_and_fitprune_shapes_llava(tmp_path):
    proc = run_cli("demo-mllm", "--workdir", str(tmp_path), "--questions", "30", "--calib", "4", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| dense") or line.startswith("| fitprune")]
    assert len(rows) == 2, proc.stdout
    dense, pruned = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    expected = proc.stdout.split("(expected: ", 1)[1].split(")", 1)[0]
    assert dense[1] == repr(expected)  # the packaged model answers the demo's question
    assert float(dense[2]) > 0 and float(pruned[2]) > 0  # prefill ms
    assert dense[3] == "100%" and "(-" in pruned[3]  # FLOPs: the pruned bundle needs fewer
    assert float(dense[4].split("%")[0]) >= 80.0  # accuracy on the test questions
    for name in ("shapes-llava-dense", "shapes-llava-fitprune"):
        assert (tmp_path / name / "manifest.json").is_file()
