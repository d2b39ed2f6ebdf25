"""The README's commands are the ones that run: CI calls its test command, the demo works."""

from __future__ import annotations

import pytest

import json
import re
import shlex

from conftest import REPO, run_cli


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_the_setup_commands_and_ci_runs_the_test_one():
    """The demo, the full test command (what CI runs) and the fast subset, one line each."""
    commands = readme_commands()
    assert len(commands) == 3 and all("\n" not in c for c in commands)
    demo, tests, fast = commands
    assert "demo-mllm" in demo and "pytest" in tests and fast.endswith('pytest -m "not slow"')
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


@pytest.mark.slow
def test_demo_leads_with_the_recipe_that_keeps_accuracy(tmp_path):
    """dense, fitted MoD (the showcase: ~40% fewer FLOPs at dense accuracy) and FitPrune, one row each."""
    proc = run_cli("demo-mllm", "--workdir", str(tmp_path), "--questions", "30", "--calib", "8", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith(("| dense", "| mod", "| fitprune"))]
    assert [row[0] for row in rows] == ["dense", "mod fitted 0.5", "fitprune 0.5"], proc.stdout
    dense, mod, fitprune = rows
    expected = proc.stdout.split("(expected: ", 1)[1].split(")", 1)[0]
    assert dense[1] == repr(expected) and mod[1] == repr(expected)  # the showcased recipe answers like dense
    assert all(float(row[2]) > 0 for row in rows)  # prefill ms
    assert dense[3] == "100%" and "(-" in mod[3] and "(-" in fitprune[3]  # fewer FLOPs
    accuracy = [float(row[4].split("%")[0]) for row in rows]
    assert accuracy[0] >= 80.0 and accuracy[1] >= accuracy[0] - 7.0  # MoD keeps (about) dense accuracy
    for name in ("shapes-llava-dense", "shapes-llava-mod", "shapes-llava-fitprune"):
        assert (tmp_path / name / "manifest.json").is_file()


def _jetson_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Jetson / TensorRT", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


@pytest.mark.slow
def test_readme_workstation_commands_for_a_jetson_run_as_written(tmp_path):
    """The export and check-trt lines a Jetson user copies, run as written (in a scratch directory)."""
    workstation = _jetson_blocks()[0]
    lines = [line.strip() for line in workstation.splitlines() if line.strip() and not line.startswith("#")]
    assert [line.split()[0] for line in lines] == [".venv/bin/calib-mllm", ".venv/bin/export-mllm",
                                                   ".venv/bin/check-trt-mllm"]
    for line in lines:
        tool, *args = shlex.split(line)
        proc = run_cli(tool.removeprefix(".venv/bin/"), *args, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, (line, proc.stdout, proc.stderr)
    assert "no problems for TensorRT 10.3" in proc.stdout and "plugins: TokenSelect, VisualScore" in proc.stdout
    manifest = json.loads((tmp_path / "tiny-fastv" / "manifest.json").read_text())
    assert manifest["routing"] == "plugin" and manifest["graphs"]["prefill"]["shape_inputs"] == ["image_start"]


def test_readme_target_commands_name_the_extras_and_nvcc_a_stock_jetpack_needs():
    """What cannot run here is checked for what a stock JetPack needs: the extra that pins cuda-python to its CUDA
    major and brings the ONNX Runtime plugin kernels, and nvcc's path (JetPack does not put it on PATH)."""
    import tomllib

    target = _jetson_blocks()[1]
    assert 'pip install -e ".[jetpack6,cpu]"' in target and "--system-site-packages" in target
    assert "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc" in target and "-DCMAKE_CUDA_ARCHITECTURES=87" in target
    assert "build-mllm" in target and "--verify" in target and "--backend tensorrt" in target
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "cuda-python>=12.2,<13" in extras["jetpack6"] and "cuda-python>=13,<14" in extras["jetpack7"]
    for name in ("jetpack6", "jetpack7"):
        assert set(extras["ort-plugins"]) <= set(extras[name])  # --verify runs plugin bundles on ONNX Runtime
        assert not any(dep.startswith("tensorrt") for dep in extras[name])  # JetPack's own TensorRT
