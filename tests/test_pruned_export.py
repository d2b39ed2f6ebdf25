"""Pruned bundles (FastV, PyramidDrop, VTW, FitPrune) with native and plugin routing generate
exactly what the PyTorch reference of their recipe generates, cache what the recipe says,
and form no attention map the dense graph does not."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import make_image

from conftest import CONFIGS, METHODS

NEW_TOKENS = 20


@pytest.fixture(scope="session")
def hf_models(tiny_model_dirs):
    from transformers import LlavaForConditionalGeneration

    return {name: LlavaForConditionalGeneration.from_pretrained(d).eval() for name, d in tiny_model_dirs.items()}


@pytest.mark.parametrize("routing", ["native", "plugin"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("graphs", ["portable", "onnxruntime"])
def test_pruned_bundle_generates_like_reference(graphs, config, method, routing, pruned_bundles, recipes, hf_models, tmp_path):
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = pruned_bundles(config, method, routing)
    recipe = load_recipe(recipes[config, method])
    assert recipe.method_name == method and recipe.visual_tokens != [recipe.model.visual_tokens] * recipe.num_layers
    image = make_image(tmp_path / "q.png", size=(77, 91), seed=3)
    if graphs == "onnxruntime" and config == "gqa70":  # head_dim 12: GroupQueryAttention needs a multiple of 8
        assert "prefill_ort" not in json.loads((bundle / "manifest.json").read_text())["graphs"]
        return
    with Pipeline.load(bundle, graphs=graphs) as pipe:
        ids = pipe.input_ids(prompt="Describe the picture in detail.")
        pixels = pipe.pixel_values(image)
        # EOS ignored on both sides so that every case compares all NEW_TOKENS tokens
        ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
    reference = RecipeReference(hf_models[config], recipe)
    theirs = reference.generate(torch.from_numpy(ids), torch.from_numpy(pixels), NEW_TOKENS)
    assert len(theirs) == NEW_TOKENS
    assert ours == theirs


@pytest.mark.parametrize("method", sorted(METHODS))
def test_kv_lengths_follow_the_recipe(method, pruned_bundles, recipes, tmp_path):
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = pruned_bundles("gqa56", method, "native")
    recipe = load_recipe(recipes["gqa56", method])
    manifest = json.loads((bundle / "manifest.json").read_text())
    outputs = {o["name"]: o["shape"] for o in manifest["graphs"]["prefill"]["outputs"]}
    dims = [outputs[f"present.{l}.key"][2] for l in range(recipe.num_layers)]
    assert len(set(dims)) == recipe.num_layers  # each layer's KV length is its own dimension
    with Pipeline.load(bundle) as pipe:
        ids = pipe.input_ids(prompt="hi")
        features = pipe.generator.encode_image(pipe.pixel_values(make_image(tmp_path / "k.png")))
        _, cache = pipe.generator.prefill(ids, features, capacity_extra=0)
    text = ids.shape[1] - recipe.model.visual_tokens
    assert cache.lengths.tolist() == [text + n for n in recipe.visual_tokens]
    assert [k.shape[2] for k in cache.keys] == [text + n for n in recipe.visual_tokens]


def _tensor_shapes(bundle, ids_len: int, image_start: int, n_visual: int, hidden: int) -> tuple[onnx.ModelProto, dict]:
    """Run the prefill graph with every intermediate exposed; return the graph and each tensor's shape."""
    import onnxruntime as ort

    model = onnx.load(bundle / "prefill.onnx", load_external_data=False)
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                known.add(out)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ids = np.full((1, ids_len), 5, dtype=np.int64)
    feed = {"input_ids": ids, "image_features": np.random.default_rng(0).standard_normal((1, n_visual, hidden)).astype(np.float32),
            "image_start": np.array([image_start], dtype=np.int64)}
    names = [o.name for o in model.graph.output]
    return model, dict(zip(names, (np.shape(v) for v in session.run(names, feed))))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_routing_forms_no_extra_attention_maps(method, pruned_bundles, recipes):
    """Only the main attention (and its mask) hold square [T, T] maps; a ranking holds [H, rows, T]
    with one row for FastV/PyramidDrop and the visual + text rows for FitPrune."""
    from mllm_deploy.formats.recipe import load_recipe

    recipe = load_recipe(recipes["gqa56", method])
    n, before, after = recipe.model.visual_tokens, 7, 10  # odd lengths: no clash with head_dim or hidden
    model, shapes = _tensor_shapes(pruned_bundles("gqa56", method, "native"), before + n + after, before, n,
                                   recipe.model.hidden_size)
    lengths = {before + v + after for v in recipe.visual_tokens + recipe.mlp_visual_tokens()}  # every T_l
    manifest = json.loads((pruned_bundles("gqa56", method, "native") / "manifest.json").read_text())
    heads, head_dim = manifest["model"]["text"]["num_heads"], manifest["model"]["text"]["head_dim"]
    ranking_rows = []
    for node in model.graph.node:
        for out in node.output:
            shape = shapes.get(out)
            if not shape or len(shape) < 2:
                continue
            square = shape[-1] == shape[-2] and shape[-1] in lengths
            if "/VisualScore/" in node.name:
                # a ranking holds at most [heads, rows, T]: 1 row (last text token) or the visual +
                # text rows (FitPrune), never a map over all tokens
                max_rows = n + after if recipe.score.query_rows == "visual_and_text" else 1
                keys_or_queries = head_dim in shape[-2:]  # q, k and their transposes are not attention maps
                assert keys_or_queries or np.prod(shape) <= heads * max_rows * max(lengths), (node.name, shape)
                if node.op_type == "Softmax":
                    ranking_rows.append(shape[-2])
            elif square:
                assert "/attn/" in node.name or "/causal_mask/" in node.name, (node.name, shape)
    expected_rows = {"fastv": [1], "pdrop": [1, 1], "vtw": [], "fitprune": None}[method]
    if expected_rows is None:  # FitPrune: visual rows of the layer plus the text rows after the image
        prune_layers = recipe.prune_layers
        assert ranking_rows == [recipe.visual_tokens[l] + after for l in prune_layers if recipe.mlp_visual_tokens()[l] > 0]
    else:
        assert ranking_rows == expected_rows


def test_dense_graph_has_no_routing(tiny_bundles):
    model = onnx.load(tiny_bundles["gqa56"] / "prefill.onnx", load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "TopK" or "/route/" in n.name]


def test_plugin_bundle_uses_one_node_per_routing_step(pruned_bundles, recipes):
    from mllm_deploy.formats.recipe import load_recipe

    recipe = load_recipe(recipes["gqa56", "fitprune"])
    path = pruned_bundles("gqa56", "fitprune", "plugin") / "prefill.onnx"
    model = onnx.load(path, load_external_data=False)
    custom = [n for n in model.graph.node if n.domain == "mllm_deploy"]
    layers = [l for l in recipe.prune_layers if recipe.mlp_visual_tokens()[l] > 0]
    assert sorted(n.op_type for n in custom) == sorted(["VisualScore", "TokenSelect"] * len(layers))
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"mllm_deploy"
    assert not [n for n in model.graph.node if n.op_type == "TopK"]
    from mllm_deploy.plugins.schemas import register_schemas

    register_schemas()
    onnx.checker.check_model(str(path))  # by path: the checker resolves weights.bin beside the graph


@pytest.mark.parametrize("routing", ["native", "plugin"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("config", CONFIGS)
def test_pruned_bundles_pass_tensorrt_checks(config, method, routing, pruned_bundles):
    from mllm_deploy.trt.check import check_bundle, inspect_bundle

    bundle = pruned_bundles(config, method, routing)
    for version in ("10.16", "11.4"):
        findings = check_bundle(bundle, version)
        assert all(not f for f in findings.values()), findings
    if routing == "plugin" and method != "vtw":
        assert set(inspect_bundle(bundle, "11.4").plugins) >= {"TokenSelect", "VisualScore"}


@pytest.mark.slow
def test_export_check_trt_flag(tiny_model_dirs, recipes, tmp_path):
    from conftest import run_cli

    ok = run_cli("export-mllm", "--model", str(tiny_model_dirs["gqa56"]), "--recipe", str(recipes["gqa56", "fastv"]),
                 "--routing", "plugin", "--check-trt", "10.16", "-o", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    assert "check-trt 10.16: 0 problems" in ok.stderr
    bad = run_cli("export-mllm", "--model", str(tiny_model_dirs["gqa56"]), "--opset", "21", "--check-trt", "10.3",
                  "-o", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "TensorRT 10.3" in bad.stderr and "opset 21" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("routing", ["native", "plugin"])
@pytest.mark.parametrize("base", ["fastv", "fitprune"])
def test_random_selection_baseline(base, routing, tiny_model_dirs, hf_models, tmp_path):
    """Same token counts as the method, a fixed random subset: no ranking in the graph, and the
    bundle still generates what the reference of its recipe generates."""
    from dataclasses import replace

    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.runtime.pipeline import Pipeline

    options = replace(METHODS[base], random_selection=True, seed=5)
    recipe = calibrate(str(tiny_model_dirs["gqa56"]), options, log=lambda m: None)
    assert recipe.score.combine == "random" and recipe.method["selection"] == "random"
    path = tmp_path / "random.json"
    path.write_text(recipe.to_json())
    bundle = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b", ExportOptions(recipe=str(path), routing=routing),
                           log=lambda m: None)
    model = onnx.load(bundle / "prefill.onnx", load_external_data=False)
    assert not [n for n in model.graph.node if "VisualScore" in n.name or n.op_type == "VisualScore"]
    from mllm_deploy.trt.check import check_bundle

    assert all(not findings for findings in check_bundle(bundle, "11.4").values())
    with Pipeline.load(bundle) as pipe:
        ids = pipe.input_ids(prompt="What is in the image?")
        pixels = pipe.pixel_values(make_image(tmp_path / "r.png", seed=9))
        ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
    theirs = RecipeReference(hf_models["gqa56"], recipe).generate(torch.from_numpy(ids), torch.from_numpy(pixels), NEW_TOKENS)
    assert ours == theirs
