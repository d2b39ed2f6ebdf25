"""Every CLI answers --help quickly; the runtime runs with torch made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib

import pytest

from conftest import REPO, make_image

SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])

# Imported before anything else in a child interpreter: makes `import torch` fail.
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_instant_and_imports_nothing_heavy(script):
    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][script].split(":")
    code = (f"import sys, time; t = time.perf_counter(); import {module} as m\n"
            f"try:\n    m.{func}(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [n for n in ('torch', 'transformers', 'onnx', 'onnxruntime', 'tensorrt') if n in sys.modules]\n"
            "print(heavy, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    heavy, seconds = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert heavy == "[]", f"{script} --help imported {heavy}"
    assert float(seconds) < 1.0


def test_runtime_import_and_run_without_torch(tiny_bundles, tmp_path):
    image = make_image(tmp_path / "x.png")
    code = BLOCK_TORCH + (
        "import mllm_deploy.runtime, mllm_deploy.runtime.pipeline, mllm_deploy.runtime.preprocess\n"
        "from mllm_deploy.runtime.cli import main\n"
        f"rc = main([{str(tiny_bundles['gqa56'])!r}, '--image', {str(image)!r}, '--prompt', 'hi', '--json',"
        " '--max-new-tokens', '4'])\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) >= 1


def test_sampling_is_seeded_and_differs_from_greedy(tiny_bundles, tmp_path):
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.sampling import SamplingConfig

    image = make_image(tmp_path / "s.png")
    with Pipeline.load(tiny_bundles["gqa56"]) as pipe:
        hot = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, seed=7)
        a = pipe.ask(image, prompt="hi", max_new_tokens=12, sampling=hot).generation.tokens
        b = pipe.ask(image, prompt="hi", max_new_tokens=12, sampling=hot).generation.tokens
        c = pipe.ask(image, prompt="hi", max_new_tokens=12, sampling=SamplingConfig(temperature=1.5, seed=8)).generation.tokens
        greedy = pipe.ask(image, prompt="hi", max_new_tokens=12).generation.tokens
    assert a == b
    assert a != c or a != greedy


def test_top_k_one_is_greedy():
    import numpy as np

    from mllm_deploy.runtime.sampling import Sampler, SamplingConfig

    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert Sampler(SamplingConfig(temperature=2.0, top_k=1, seed=0))(logits) == int(np.argmax(logits))
    nucleus = Sampler(SamplingConfig(temperature=1.0, top_p=1e-6, seed=0))
    assert nucleus(logits) == int(np.argmax(logits))


def test_streaming_text_equals_final_text(tiny_bundles, tmp_path):
    from mllm_deploy.runtime.pipeline import Pipeline

    pieces: list[str] = []
    with Pipeline.load(tiny_bundles["gqa56"]) as pipe:
        answer = pipe.ask(make_image(tmp_path / "t.png"), prompt="hi", max_new_tokens=16, on_text=pieces.append)
    assert "".join(pieces) == answer.text


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path):
    from conftest import VENV_BIN

    proc = subprocess.run(f"'{VENV_BIN / 'flops-mllm'}' --model llava-1.5-13b-shape | head -1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("formula:")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_cli_says_its_version(script):
    from conftest import run_cli
    from mllm_deploy import __version__

    proc = run_cli(script, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"{script} (mllm-deploy) {__version__}", proc


def test_json_flag_means_the_same_on_every_command(tiny_bundles, tmp_path):
    """--json alone puts the JSON on stdout in place of the text; --json PATH writes it there and keeps the text
    (issue 24: run/flops/check-trt took a flag, bench/eval a path)."""
    import json

    from conftest import make_image, run_cli

    bundle = str(tiny_bundles["gqa56"])
    image = str(make_image(tmp_path / "q.png", seed=5))
    commands = {
        "run-mllm": [bundle, "--image", image, "--prompt", "Hi.", "--max-new-tokens", "2"],
        "flops-mllm": ["--model", "tiny-llava"],
        "check-trt-mllm": [bundle, "--trt", "10.16"],
        "bench-mllm": [bundle, "--repeats", "1", "--new-tokens", "2"],
        "eval-mllm": [bundle, "--dataset", "shapes-vqa:test:2"],
    }
    for tool, args in commands.items():
        alone = run_cli(tool, *args, "--json")
        assert alone.returncode == 0, (tool, alone.stderr)
        on_stdout = json.loads(alone.stdout)  # nothing but the JSON
        out = tmp_path / f"{tool}.json"
        to_file = run_cli(tool, *args, "--json", str(out))
        assert to_file.returncode == 0, (tool, to_file.stderr)
        assert set(json.loads(out.read_text())) == set(on_stdout), tool
        if tool != "check-trt-mllm":  # a bundle without findings prints no lines
            assert to_file.stdout.strip() and not to_file.stdout.lstrip().startswith("{"), (tool, to_file.stdout)
