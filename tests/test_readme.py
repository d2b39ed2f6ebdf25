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


def test_demo_answers_and_prints_timings(tmp_path):
    proc = run_cli("demo-mllm", "--workdir", str(tmp_path), "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "prefill" in proc.stdout and "ms/token" in proc.stdout
    assert (tmp_path / "tiny-llava-bundle" / "manifest.json").is_file()
