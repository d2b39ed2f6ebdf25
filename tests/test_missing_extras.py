"""A runtime-only install (`pip install '.[cpu]'`: no torch, transformers, onnx, matplotlib, TensorRT) still has
all ten commands; each that needs a missing extra says which in one line and exits 1, the others work (issue 24).
The missing packages are simulated by modules that raise ModuleNotFoundError, first on PYTHONPATH, so child
processes (bench-mllm's workers) see the same install."""

from __future__ import annotations

import json

import pytest

from conftest import make_image, run_cli, write_config_only_model

BLOCKED = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnxruntime_extensions", "matplotlib",
           "tensorrt", "cuda", "tqdm")


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return {"PYTHONPATH": str(root)}


@pytest.fixture(scope="module")
def inputs(tiny_bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    results = root / "bench.json"
    results.write_text(json.dumps({"schema": "mllm-deploy/bench@1", "results": []}))
    return {"bundle": str(tiny_bundles["gqa56"]), "image": str(make_image(root / "q.png", seed=4)),
            "config": str(write_config_only_model(root / "cfg")), "results": str(results), "root": root}


CASES = {  # command line -> the extra its error must name
    "export": (["export-mllm", "--model", "tiny-llava", "-o", "{root}/b"], "[export]"),
    "calib": (["calib-mllm", "--model", "tiny-llava", "--method", "fitprune", "--data", "builtin:synthetic:2",
               "--budget", "0.5", "-o", "{root}/r.json"], "[export]"),
    "check-trt": (["check-trt-mllm", "{bundle}", "--trt", "10.16"], "[export]"),
    "build": (["build-mllm", "{bundle}"], "mllm-deploy[trt-cu12]"),
    "demo": (["demo-mllm", "--workdir", "{root}/demo"], "[export]"),
    "report": (["report-mllm", "{results}", "-o", "{root}/report"], "[report]"),
    "bench-torch": (["bench-mllm", "{bundle}", "--backend", "torch", "--repeats", "1"], "[export]"),
    "run-tensorrt": (["run-mllm", "{bundle}", "--image", "{image}", "--prompt", "Hi.", "--backend", "tensorrt"],
                     "mllm-deploy[trt-cu12]"),
    "eval-tensorrt": (["eval-mllm", "{bundle}", "--dataset", "shapes-vqa:test:2", "--backend", "tensorrt"],
                      "mllm-deploy[trt-cu12]"),
}


@pytest.mark.parametrize("case", CASES)
def test_missing_extra_is_one_line_naming_it(case, runtime_only, inputs):
    command, extra = CASES[case]
    args = [part.format(**inputs) for part in command]
    result = run_cli(args[0], *args[1:], env=runtime_only)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-1500:]
    assert extra in lines[0] and "Traceback" not in result.stderr, lines[0]


def test_the_runtime_commands_work_without_the_extras(runtime_only, inputs):
    run = run_cli("run-mllm", inputs["bundle"], "--image", inputs["image"], "--prompt", "Hi.", "--max-new-tokens", "3",
                  "--json", env=runtime_only)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["tokens"]) >= 1
    flops = run_cli("flops-mllm", "--model", inputs["config"], "--json", env=runtime_only)
    assert flops.returncode == 0, flops.stderr
    bench = run_cli("bench-mllm", inputs["bundle"], "--repeats", "1", "--new-tokens", "2", env=runtime_only)
    assert bench.returncode == 0, bench.stderr
