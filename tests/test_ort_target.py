"""The onnxruntime-target graphs (export/ort_fused.py, issue 19): ONNX Runtime's fused ops on the same weights file
as the portable graphs, the same tokens (test_pruned_export and test_mod run every recipe on both graph sets), a
decode that writes its KV entries into the runtime's buffers in place, and a graph ONNX Runtime runs as few
kernels."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

from conftest import make_image

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def dense(tiny_bundles):
    return tiny_bundles["gqa56"]


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def test_bundle_holds_both_targets_on_one_weights_file(dense):
    manifest = json.loads((dense / "manifest.json").read_text())
    graphs = manifest["graphs"]
    assert {g: graphs[g]["target"] for g in graphs} == {
        "vision": "portable", "prefill": "portable", "decode": "portable",
        "prefill_ort": "onnxruntime", "decode_ort": "onnxruntime"}
    layers = manifest["model"]["text"]["num_layers"]
    for name in ("prefill_ort", "decode_ort"):
        ops = _ops(dense / graphs[name]["file"])
        assert ops["GroupQueryAttention"] == layers
        assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1
        assert ops["Transpose"] == 0 and ops["Neg"] == 0 and ops["Softmax"] == 0
        assert graphs[name]["custom_ops"] == []  # ONNX Runtime's own ops need no plugin
    for name in ("prefill", "decode"):  # the portable graphs stay standard ONNX
        model = onnx.load(str(dense / graphs[name]["file"]), load_external_data=False)
        assert {node.domain for node in model.graph.node} <= {""}
    files = {entry["file"] for g in graphs.values() for entry in g["external_initializers"]}
    assert files == {"weights.bin"}
    portable = {e["name"]: e["offset"] for e in graphs["prefill"]["external_initializers"]}
    fused = {e["name"]: e["offset"] for e in graphs["prefill_ort"]["external_initializers"]}
    shared = set(portable) & set(fused)
    assert "text.layers.0.attn.qkv.weight" in shared and all(portable[n] == fused[n] for n in shared)


def _generate(bundle, graphs: str, tmp_path):
    from mllm_deploy.runtime.pipeline import Pipeline

    with Pipeline.load(bundle, graphs=graphs) as pipe:
        ids = pipe.input_ids(prompt="Describe the picture in detail.")
        pixels = pipe.pixel_values(make_image(tmp_path / "q.png", size=(77, 91), seed=3))
        generator = pipe.generator
        logits, cache = generator.prefill(ids, generator.encode_image(pixels), capacity_extra=NEW_TOKENS)
        tokens = []
        for step in range(NEW_TOKENS):
            tokens.append(int(np.argmax(logits)))
            logits = generator.decode(tokens[-1], ids.shape[1] + step, cache)
        return tokens, cache, generator.runners["decode"]


def test_in_place_decode_fills_the_same_cache_and_binds_each_buffer_once(dense, tmp_path):
    """The fused decode writes each new entry into the runtime's own buffer (no new.* outputs copied back), binds
    every KV buffer once per generation, and leaves the cache holding what the portable decode writes."""
    fused_tokens, fused_cache, runner = _generate(dense, "onnxruntime", tmp_path)
    portable_tokens, portable_cache, portable_runner = _generate(dense, "portable", tmp_path)
    assert runner.kv_in_place and not portable_runner.kv_in_place
    assert fused_tokens == portable_tokens
    assert runner.kv_values_created == 2 * len(fused_cache.keys)  # once per buffer, not once per step
    assert list(fused_cache.lengths) == list(portable_cache.lengths)
    for ours, theirs, n in zip(fused_cache.keys + fused_cache.values, portable_cache.keys + portable_cache.values,
                               list(fused_cache.lengths) * 2):
        assert np.allclose(ours[:, :, :n], theirs[:, :, :n], atol=1e-4)
        assert not ours[:, :, n:].any()  # nothing written past the valid entries


def test_full_cache_is_refused_before_the_in_place_write(dense, tmp_path):
    from mllm_deploy.runtime.pipeline import Pipeline

    with Pipeline.load(dense, graphs="onnxruntime") as pipe:
        ids = pipe.input_ids(prompt="Hi.")
        generator = pipe.generator
        pixels = pipe.pixel_values(make_image(tmp_path / "q.png", seed=1))
        logits, cache = generator.prefill(ids, generator.encode_image(pixels), capacity_extra=1)
        generator.decode(int(np.argmax(logits)), ids.shape[1], cache)
        before = [k.copy() for k in cache.keys]
        with pytest.raises(ValueError, match="KV cache full"):
            generator.decode(1, ids.shape[1] + 1, cache)
        assert all(np.array_equal(a, b) for a, b in zip(before, cache.keys))


def test_onnxruntime_runs_the_fused_decode_as_few_kernels(dense):
    """The optimised decode graph: about ten kernels a layer (the portable one had 64 before this target)."""
    import onnxruntime as ort

    manifest = json.loads((dense / "manifest.json").read_text())
    layers = manifest["model"]["text"]["num_layers"]
    counts = {}
    for name in ("decode", "decode_ort"):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        out = dense.parent / f"{name}.optimized.onnx"
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(dense / manifest["graphs"][name]["file"]), options,
                             providers=["CPUExecutionProvider"])
        counts[name] = len(onnx.load(str(out), load_external_data=False).graph.node)
        out.unlink()
    assert counts["decode_ort"] <= 12 * layers + 12, counts
    assert counts["decode_ort"] * 3 < counts["decode"], counts


def test_portable_only_bundle(tiny_model_dirs, tmp_path, capsys):
    from mllm_deploy.core.errors import BundleError
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b", ExportOptions(ort_graphs=False),
                           log=lambda m: None)
    assert set(json.loads((bundle / "manifest.json").read_text())["graphs"]) == {"vision", "prefill", "decode"}
    assert not list(bundle.glob("*.ort.onnx"))
    with pytest.raises(BundleError, match="has no onnxruntime-target graphs"):
        with Pipeline.load(bundle, graphs="onnxruntime") as pipe:
            pipe.generator
    with Pipeline.load(bundle) as pipe:  # auto: the portable graphs
        assert not pipe.generator.runners["decode"].kv_in_place


def test_model_the_fused_ops_cannot_express_gets_portable_graphs_and_says_so(tiny_model_dirs, tmp_path):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    messages = []
    bundle = export_bundle(str(tiny_model_dirs["gqa70"]), tmp_path / "b", ExportOptions(verify=False),
                           log=messages.append)
    assert "prefill_ort" not in json.loads((bundle / "manifest.json").read_text())["graphs"]
    assert any("no onnxruntime-target graphs (head_dim 12 is not a multiple of 8" in m for m in messages), messages


def test_cuda_provider_without_onnxruntime_gpu_is_one_line(dense, tmp_path):
    """--provider cuda where this onnxruntime has no CUDA provider: one line naming it and the [gpu] extra, exit 1,
    rather than ONNX Runtime's silent fall-back to the CPU."""
    import onnxruntime as ort

    from conftest import run_cli

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    image = make_image(tmp_path / "q.png", seed=2)
    result = run_cli("run-mllm", str(dense), "--image", str(image), "--prompt", "Hi.", "--provider", "cuda")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDAExecutionProvider" in lines[0] and "mllm-deploy[gpu]" in lines[0], lines


def test_runtime_flags_reach_the_sessions(dense, tmp_path):
    """run-mllm and bench-mllm take --graphs and --weights: the portable graphs and one shared mapping give the
    same answer, and bench-mllm records the mode it ran."""
    from conftest import run_cli

    image = make_image(tmp_path / "q.png", seed=2)
    answers = {}
    for flags in ((), ("--graphs", "portable", "--weights", "shared")):
        result = run_cli("run-mllm", str(dense), "--image", str(image), "--prompt", "Hi.", "--json",
                         "--max-new-tokens", "6", *flags)
        assert result.returncode == 0, result.stderr
        answers[flags] = json.loads(result.stdout)["tokens"]
    assert len(set(map(tuple, answers.values()))) == 1
    out = tmp_path / "bench.json"
    result = run_cli("bench-mllm", str(dense), "--weights", "fast", "--repeats", "1", "--new-tokens", "3",
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["results"][0]["weights_mode"] == "fast"


def test_onnxruntime_comes_from_one_extra_and_its_absence_is_one_line(dense, tmp_path):
    """onnxruntime and onnxruntime-gpu install one module: neither is a base dependency, each has its extra; a
    runtime without either says which to install."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    pyproject = (REPO / "pyproject.toml").read_text()
    base = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "onnxruntime" not in base
    assert re.search(r'^cpu = \["onnxruntime>=[0-9.]+"\]$', pyproject, re.M)
    assert re.search(r'^gpu = \["onnxruntime-gpu>=[0-9.]+"\]$', pyproject, re.M)
    image = make_image(tmp_path / "q.png", seed=2)
    code = ("import sys; sys.modules['onnxruntime'] = None\n"  # as if neither wheel were installed
            "from mllm_deploy.runtime.cli import main\n"
            f"sys.exit(main([{str(dense)!r}, '--image', {str(image)!r}, '--prompt', 'Hi.']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "" and len(lines) == 1, result.stderr
    assert "mllm-deploy[cpu]" in lines[0] and "[gpu]" in lines[0]


def test_a_generator_reuses_its_kv_buffers_and_answers_the_same(dense, tmp_path):
    """generate() hands its finished cache's buffers to the next request of the same size (no fresh 2x per-layer
    buffers, whose first touch cost 25-60 ms per small-llava prefill), cleared past the new entries, so the
    answers do not change; a request of another size gets buffers of its own."""
    from mllm_deploy.runtime.pipeline import Pipeline

    with Pipeline.load(dense) as pipe:
        ids = pipe.input_ids(prompt="Describe the picture in detail.")
        pixels = pipe.pixel_values(make_image(tmp_path / "q.png", seed=2))
        generator = pipe.generator
        first = generator.generate(ids, pixels, 6, ignore_eos=True).tokens
        buffers = [id(k) for k in generator._spare_cache.keys]
        second = generator.generate(ids, pixels, 6, ignore_eos=True).tokens
        assert [id(k) for k in generator._spare_cache.keys] == buffers
        assert second == first
        _, cache = generator.prefill(ids, generator.encode_image(pixels), capacity_extra=6)  # not generate()'s
        assert not any(k[:, :, n:].any() for k, n in zip(cache.keys, cache.lengths))
        other = generator.generate(ids, pixels, 3, ignore_eos=True).tokens
        assert other == first[:3] and [id(k) for k in generator._spare_cache.keys] != buffers
