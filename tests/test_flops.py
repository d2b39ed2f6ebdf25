"""The FLOPs model: published figures for LLaVA-1.5-7B, Eq. 5's closed form, and the `exact`
formula against the MatMuls a real exported prefill graph performs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LLAVA15_7B_CONFIG, METHODS, run_cli

from mllm_deploy.formats.flops import FORMULAS, prefill_cost
from mllm_deploy.formats.recipe import Recipe, ScoreSpec, model_ref
from mllm_deploy.core.errors import MllmError
from mllm_deploy.formats.geometry import read_config, spec_from_config

LLAVA_15_7B = LLAVA15_7B_CONFIG
# FitPrune's published 50% recipe for LLaVA-1.5-7B: tokens removed after each layer's attention.
FITPRUNE_50_REMOVED = [3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1,
                       0, 0, 1, 1, 2, 0, 0, 0]


def write_config(root: Path, cfg: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture
def llava7b(tmp_path):
    model_dir = write_config(tmp_path / "llava-1.5-7b", LLAVA_15_7B)
    return model_dir, spec_from_config(read_config(model_dir))


def fitprune_recipe(spec) -> Recipe:
    tokens = [spec.visual_tokens]
    for removed in FITPRUNE_50_REMOVED[:-1]:
        tokens.append(tokens[-1] - removed)
    return Recipe(model=model_ref(spec), method={"name": "fitprune", "budget": 0.5}, visual_tokens=tokens,
                  prune_stage="after_attention", final_visual_tokens=spec.visual_tokens - sum(FITPRUNE_50_REMOVED),
                  score=ScoreSpec(query_rows="text", head_reduction="max", combine="self_times_cross"))


def fastv_recipe(spec, k: int = 2, r: float = 0.5) -> Recipe:
    kept = round(spec.visual_tokens * (1 - r))
    tokens = [spec.visual_tokens] * k + [kept] * (spec.text.num_layers - k)
    return Recipe(model=model_ref(spec), method={"name": "fastv", "K": k, "R": r}, visual_tokens=tokens,
                  score=ScoreSpec(query_rows="last_text", attention_layer_offset=-1))


# ---- published figures -------------------------------------------------------------------------
def test_fitprune_dense_macs_from_config_alone(llava7b):
    model_dir, spec = llava7b
    assert spec.visual_tokens == 576
    result = run_cli("flops-mllm", "--model", str(model_dir), "--formula", "fitprune-macs", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"formula", "dense", "recipe", "reduction", "kv_bytes_per_layer", "units", "text_tokens",
                           "visual_tokens", "prefix_tokens", "num_layers", "method", "kv_dtype", "kv_bytes",
                           "llm_visual_tokens", "skip_attention"}
    assert (report["units"], report["text_tokens"], report["visual_tokens"]) == ("MACs", 64, 576)  # FitPrune's unit
    assert report["kv_bytes"] == sum(report["kv_bytes_per_layer"])
    assert math.isclose(report["dense"], 3.817e12, rel_tol=1e-3)
    assert report["recipe"] == report["dense"] and report["reduction"] == 0.0
    # 576 visual + 64 text tokens, K and V, 32 heads x 128, float16
    assert report["kv_bytes_per_layer"] == [2 * 32 * 128 * (64 + 576) * 2] * 32
    human = run_cli("flops-mllm", "--model", str(model_dir))
    assert human.returncode == 0 and "576 visual" in human.stdout and "reduction" in human.stdout


def test_fitprune_published_recipe_halves_macs(llava7b):
    _, spec = llava7b
    report = prefill_cost(spec, fitprune_recipe(spec), formula="fitprune-macs")
    print(f"FitPrune 50% LLaVA-1.5-7B recipe: MACs reduction {report.reduction:.4%}")
    assert report.units == "MACs"
    assert 0.45 < report.reduction < 0.60


def test_fastv_eq5_matches_closed_form(llava7b):
    _, spec = llava7b
    text, k, r = 64, 2, 0.5
    d, m, layers, n_vis = spec.text.hidden_size, spec.text.intermediate_size, spec.text.num_layers, spec.visual_tokens

    def cost(n):
        return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m

    n = text + n_vis
    n_hat = n - r * n_vis
    report = prefill_cost(spec, fastv_recipe(spec, k, r), text_tokens=text, formula="fastv-eq5")
    assert report.dense == layers * cost(n)
    assert report.recipe == k * cost(n) + (layers - k) * cost(n_hat)
    assert report.reduction == pytest.approx(1 - (k * cost(n) + (layers - k) * cost(n_hat)) / (layers * cost(n)))


def test_exact_counts_the_ranking_product(llava7b):
    _, spec = llava7b
    t, text = spec.text, 40
    fastv = fastv_recipe(spec)
    dense_layer = prefill_cost(spec, None, text, "exact").dense
    report = prefill_cost(spec, fastv, text, "exact")

    def layer(n):  # one decoder layer, n tokens, no pruning
        return (2 * n * t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + 4 * t.num_heads * n * n * t.head_dim
                + 2 * n * t.num_heads * t.head_dim * t.hidden_size + 6 * n * t.hidden_size * t.intermediate_size)

    lm_head = 2 * t.hidden_size * t.vocab_size
    assert dense_layer == 32 * layer(text + 576) + lm_head
    # FastV ranks in layer K-1 = 1: the last text row against all 40 + 576 keys
    ranking = 2 * t.num_heads * 1 * (text + 576) * t.head_dim
    assert report.recipe == 2 * layer(text + 576) + 30 * layer(text + 288) + lm_head + ranking


def test_kv_bytes_follow_the_recipe(llava7b):
    _, spec = llava7b
    per_token = 2 * spec.text.num_kv_heads * spec.text.head_dim * 4  # float32
    report = prefill_cost(spec, fastv_recipe(spec), text_tokens=10, kv_dtype_bytes=4)
    assert report.kv_bytes_per_layer == [per_token * 586] * 2 + [per_token * 298] * 30
    recipe = fitprune_recipe(spec)
    kv = prefill_cost(spec, recipe, text_tokens=10).kv_bytes_per_layer
    assert kv == [2 * spec.text.num_kv_heads * spec.text.head_dim * 2 * (10 + n) for n in recipe.visual_tokens]
    assert all(b <= a for a, b in zip(kv, kv[1:])) and kv[-1] < kv[0]


# ---- errors ------------------------------------------------------------------------------------
def test_bad_arguments(llava7b, tmp_path):
    model_dir, spec = llava7b
    with pytest.raises(MllmError, match="exact, fastv-eq5, fitprune-macs"):
        prefill_cost(spec, formula="nope")
    with pytest.raises(MllmError, match="text_tokens"):
        prefill_cost(spec, text_tokens=-1)
    assert set(FORMULAS) >= {"exact", "fastv-eq5", "fitprune-macs"}
    result = run_cli("flops-mllm", "--model", str(model_dir), "--formula", "nope")
    assert result.returncode != 0
    result = run_cli("flops-mllm", "--model", str(model_dir), "--text-tokens", "-3")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_recipe_for_another_model_is_refused(llava7b, tmp_path):
    model_dir, spec = llava7b
    recipe_path = tmp_path / "fastv.json"
    recipe_path.write_text(fastv_recipe(spec).to_json())
    ok = run_cli("flops-mllm", "--model", str(model_dir), "--recipe", str(recipe_path), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["reduction"] > 0.4
    other_cfg = json.loads(json.dumps(LLAVA_15_7B))
    other_cfg["text_config"].update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, num_key_value_heads=40)
    other = write_config(tmp_path / "llava-1.5-13b", other_cfg)
    result = run_cli("flops-mllm", "--model", str(other), "--recipe", str(recipe_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.fingerprint" in lines[0], result.stderr


# ---- exact == the exported graph -----------------------------------------------------------------
def matmul_flops_of_prefill(bundle: Path, text_tokens: int, image_start: int, work: Path) -> int:
    """Run prefill.onnx with every MatMul's activations exposed; sum 2 x output elements x K."""
    import onnx
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    n_visual, hidden = manifest["model"]["visual_tokens"], manifest["model"]["text"]["hidden_size"]
    model = onnx.load(str(bundle / "prefill.onnx"), load_external_data=False)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    exposed = {o.name for o in graph.output}
    for node in matmuls:
        for name in (node.input[0], node.input[1], node.output[0]):
            if name not in initializers and name not in exposed:
                graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                exposed.add(name)
    # Never write into the shared bundle: save a copy next to a copy of its (tiny) weights file;
    # onnxruntime refuses a symlink that resolves outside the model's directory.
    onnx.save(model, str(work / "prefill.onnx"))
    shutil.copyfile(bundle / manifest["weights"], work / manifest["weights"])
    session = ort.InferenceSession(str(work / "prefill.onnx"), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    vocab = manifest["model"]["text"]["vocab_size"]
    ids = rng.integers(5, vocab, size=text_tokens + n_visual)
    ids[image_start:image_start + n_visual] = manifest["model"]["image_token_id"]
    feeds = {
        "input_ids": ids[None].astype(np.int64),
        "image_features": rng.standard_normal((1, n_visual, hidden)).astype(np.float32),
        "image_start": np.array([image_start], np.int64),
    }
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    total = 0
    for node in matmuls:
        inner = values[node.input[0]].shape[-1]
        total += 2 * int(np.prod(values[node.output[0]].shape)) * inner
    return total


def test_exact_formula_equals_exported_prefill_matmuls(tiny_bundles, tiny_model_dirs, tmp_path):
    spec = spec_from_config(read_config(tiny_model_dirs["gqa56"]))
    assert spec.text.num_kv_heads < spec.text.num_heads  # GQA: KV heads are broadcast over query groups
    text_tokens = 11
    measured = matmul_flops_of_prefill(tiny_bundles["gqa56"], text_tokens, image_start=4, work=tmp_path)
    assert prefill_cost(spec, None, text_tokens=text_tokens, formula="exact").dense == measured


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_formula_equals_pruned_prefill_matmuls(method, pruned_bundles, recipes, tiny_model_dirs, tmp_path):
    """The ranking products, PyramidDrop's ranking projections and the smaller layers are all counted."""
    from mllm_deploy.formats.recipe import load_recipe

    spec = spec_from_config(read_config(tiny_model_dirs["gqa56"]))
    recipe = load_recipe(recipes["gqa56", method], spec)
    text_tokens = 13
    measured = matmul_flops_of_prefill(pruned_bundles("gqa56", method, "native"), text_tokens, 4, tmp_path)
    report = prefill_cost(spec, recipe, text_tokens=text_tokens, formula="exact", prefix_tokens=4)
    assert report.recipe == measured


def test_geometry_presets_plan_without_weights(tmp_path):
    from conftest import run_cli as cli

    seven = cli("flops-mllm", "--model", "llava-1.5-7b-shape", "--formula", "fitprune-macs", "--json")
    assert seven.returncode == 0, seven.stderr
    assert json.loads(seven.stdout)["dense"] == pytest.approx(3.817e12, rel=1e-3)
    thirteen = cli("flops-mllm", "--model", "llava-1.5-13b-shape", "--json")
    assert json.loads(thirteen.stdout)["dense"] > 1.5 * json.loads(cli("flops-mllm", "--model", "llava-1.5-7b-shape",
                                                                          "--json").stdout)["dense"]
    recipe = cli("calib-mllm", "--model", "llava-1.5-13b-shape", "--method", "fastv", "-o", str(tmp_path / "r.json"))
    assert recipe.returncode == 0, recipe.stderr
    refused = cli("export-mllm", "--model", "llava-1.5-7b-shape", "-o", str(tmp_path / "b"))
    assert refused.returncode == 1 and "geometry preset without weights" in refused.stderr
    assert not (tmp_path / "b").exists()
