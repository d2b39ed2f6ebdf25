"""The training-free seeds beyond in-LLM pruning: [CLS]-attention (cls) and DART selection before the language model,
their composition with an in-LLM method, and EAS attention skipping with and without the fitted stand-in (PIA).

Each bundle generates exactly what the PyTorch reference of its recipe generates (native and plugin routing where
the selection uses routing ops), selects the tokens the reference selects, caches what the recipe says (nothing for
a layer without attention) and passes TensorRT's static check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_image

NEW_TOKENS = 20
CONFIGS = ["gqa56", "gqa70"]
CALIB = "builtin:synthetic:3"


def _options():
    from mllm_deploy.calib.eas import EasOptions
    from mllm_deploy.calib.pre_llm import ClsOptions, DartOptions
    from mllm_deploy.calib.static_methods import FastVOptions

    return {
        "cls": (ClsOptions(ratio=0.5), None),
        "dart": (DartOptions(ratio=0.5, pivots=3), None),
        "dart@L1": (DartOptions(ratio=0.5, dart_layer=1, pivots=2, text_pivots=3), None),
        "cls+fastv": (FastVOptions(k=1, r=0.5), "cls"),
        "eas": (EasOptions(data=CALIB, skip=1), None),
        "eas+pia": (EasOptions(data=CALIB, skip=1, pia=True), None),
        "dart+eas+pia": (EasOptions(data=CALIB, skip=1, pia=True), "dart"),
    }


ROUTED = ["cls", "dart", "dart@L1", "cls+fastv", "dart+eas+pia"]  # the selections use routing ops: both spellings
ALL = ["cls", "dart", "dart@L1", "cls+fastv", "eas", "eas+pia", "dart+eas+pia"]


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs):
    from transformers import LlavaForConditionalGeneration

    return {name: LlavaForConditionalGeneration.from_pretrained(tiny_model_dirs[name]).eval() for name in CONFIGS}


@pytest.fixture(scope="module")
def seed_recipes(tiny_model_dirs, tmp_path_factory):
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.formats.recipe import save_recipe

    root = tmp_path_factory.mktemp("seed-recipes")
    out = {}
    for config in CONFIGS:
        for name, (options, pre) in _options().items():
            if pre is not None:
                from dataclasses import replace

                options = replace(options, pre_llm=str(out[config, pre]))
            recipe = calibrate(str(tiny_model_dirs[config]), options, log=lambda m: None)
            path = root / f"{config}-{name.replace('+', '_').replace('@', '_')}.json"
            save_recipe(recipe, path)
            out[config, name] = path
    return out


@pytest.fixture(scope="module")
def seed_bundles(tiny_model_dirs, seed_recipes, tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("seed-bundles")
    cache = {}

    def get(config: str, name: str, routing: str = "native"):
        key = (config, name, routing)
        if key not in cache:
            cache[key] = export_bundle(str(tiny_model_dirs[config]), root / "-".join(key).replace("+", "_").replace("@", "_"),
                                       ExportOptions(recipe=str(seed_recipes[config, name]), routing=routing),
                                       log=lambda m: None)
        return cache[key]

    return get


def _cases():
    for config in CONFIGS:
        for name in ALL:
            for routing in (["native", "plugin"] if name in ROUTED else ["native"]):
                yield config, name, routing


@pytest.mark.parametrize("config,name,routing", list(_cases()))
def test_bundle_generates_like_reference(config, name, routing, seed_bundles, seed_recipes, hf_models, tmp_path):
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = seed_bundles(config, name, routing)
    recipe = load_recipe(seed_recipes[config, name])
    image = make_image(tmp_path / "q.png", size=(77, 91), seed=3)
    graph_sets = ["portable"] + (["onnxruntime"] if "prefill_ort" in json.loads(
        (bundle / "manifest.json").read_text())["graphs"] else [])
    reference = RecipeReference(hf_models[config], recipe)
    for graphs in graph_sets:
        with Pipeline.load(bundle, graphs=graphs) as pipe:
            ids = pipe.input_ids(prompt="Describe the picture in detail.")
            pixels = pipe.pixel_values(image)
            ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
        theirs = reference.generate(torch.from_numpy(ids), torch.from_numpy(pixels), NEW_TOKENS)
        assert len(theirs) == NEW_TOKENS and ours == theirs, graphs


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", ["cls", "dart"])
@pytest.mark.parametrize("routing", ["native", "plugin"])
def test_vision_graph_selects_the_references_tokens(config, name, routing, seed_bundles, seed_recipes, hf_models,
                                                    tmp_path):
    """The vision graph's kept indices are the reference's, a real selection (not the first k), and its features
    are the kept rows of the tower's."""
    from mllm_deploy.calib.pre_llm_reference import select_features
    from mllm_deploy.calib.reference_layers import TextStack
    from mllm_deploy.export.pre_llm import KEPT_OUTPUT
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = seed_bundles(config, name, routing)
    stage = load_recipe(seed_recipes[config, name]).pre_llm
    with Pipeline.load(bundle) as pipe:
        pixels = pipe.pixel_values(make_image(tmp_path / "s.png", size=(60, 80), seed=11))
        out = pipe.generator.runners["vision"].infer({"pixel_values": pixels})
    model = hf_models[config]
    features = TextStack(model).image_features(torch.from_numpy(pixels))
    selected, kept = select_features(model, stage, torch.from_numpy(pixels), features)
    assert out[KEPT_OUTPUT].tolist() == kept.tolist()
    assert len(kept) == stage.keep and kept.tolist() != list(range(stage.keep))
    assert out["image_features"].shape == (1, stage.keep, features.shape[-1])
    np.testing.assert_allclose(out["image_features"], selected.numpy(), atol=1e-4)


def test_dart_in_llm_with_a_short_text_tail():
    """Fewer text tokens after the image than text pivots: the graph and the reference agree (zero pivot rows)."""
    from mllm_deploy.calib.pre_llm_reference import dart_in_llm_keep

    rng = np.random.default_rng(3)
    keys = torch.from_numpy(rng.standard_normal((1, 2, 30, 8)).astype(np.float32))
    normed = torch.from_numpy(rng.standard_normal((1, 30, 16)).astype(np.float32))
    kept = dart_in_llm_keep(keys, normed, vis_start=4, n_vis=24, keep=10, pivots=2, text_pivots=4)  # 2 text tokens
    assert len(kept) == 10 and len(set(kept.tolist())) == 10 and all(0 <= k < 24 for k in kept.tolist())


@pytest.mark.parametrize("routing", ["native", "plugin"])
def test_dart_in_llm_bundle_with_a_short_text_tail(routing, seed_bundles, seed_recipes, hf_models, tmp_path):
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = seed_bundles("gqa56", "dart@L1", routing)
    recipe = load_recipe(seed_recipes["gqa56", "dart@L1"])
    with Pipeline.load(bundle) as pipe:
        ids = pipe.input_ids(raw_prompt="look <image> x")
        start = int(np.flatnonzero(ids[0] == pipe.generator.image_token_id)[-1])
        assert ids.shape[1] - start - 1 < recipe.score.text_pivots  # fewer text tokens than text pivots
        pixels = pipe.pixel_values(make_image(tmp_path / "t.png", seed=5))
        ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
    theirs = RecipeReference(hf_models["gqa56"], recipe).generate(torch.from_numpy(ids), torch.from_numpy(pixels),
                                                                   NEW_TOKENS)
    assert ours == theirs


def test_dart_keeps_the_pivots_and_meets_the_budget():
    from mllm_deploy.calib.pre_llm_reference import dart_keep, dart_quota

    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.standard_normal((1, 40, 16)).astype(np.float32))
    features[0, 7] *= 5  # the largest L1 norm: a pivot
    kept = dart_keep(features, keep=12, pivots=5)
    assert len(kept) == 12 and len(set(kept.tolist())) == 12 and 7 in kept.tolist()
    assert kept.tolist() == sorted(kept.tolist())
    assert dart_quota(12, 5) == [2, 2, 1, 1, 1] and sum(dart_quota(12, 5)) == 7


@pytest.mark.parametrize("name", ["eas", "eas+pia", "dart+eas+pia"])
def test_skipped_attention_has_no_kv(name, seed_bundles, seed_recipes, tmp_path):
    """No past/present tensors for a layer without attention, a zero-capacity cache (no bytes) at run time, and the
    FLOPs and KV plan say the same."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.geometry import spec_from_manifest
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = seed_bundles("gqa56", name)
    recipe = load_recipe(seed_recipes["gqa56", name])
    skipped = recipe.skip_attention
    assert skipped
    manifest = json.loads((bundle / "manifest.json").read_text())
    for graph in ("prefill", "decode", "prefill_ort", "decode_ort"):
        names = {t["name"] for t in manifest["graphs"][graph]["inputs"] + manifest["graphs"][graph]["outputs"]}
        for layer in range(recipe.num_layers):
            has = any(n.endswith(f".{layer}.key") for n in names)
            assert has == (layer not in skipped), (graph, layer)
    with Pipeline.load(bundle) as pipe:
        ids = pipe.input_ids(prompt="hi")
        generation = pipe.generator.generate(ids, pipe.pixel_values(make_image(tmp_path / "k.png")), 4,
                                             ignore_eos=True)
        assert [generation.kv_tokens_per_layer[l] == 0 for l in range(recipe.num_layers)] == \
            [l in skipped for l in range(recipe.num_layers)]
        cache = pipe.generator._spare_cache
        assert all(cache.keys[l].nbytes == 0 for l in skipped)
    spec = spec_from_manifest(manifest["model"])
    report = prefill_cost(spec, recipe, text_tokens=20)
    assert [report.kv_bytes_per_layer[l] == 0 for l in range(recipe.num_layers)] == \
        [l in skipped for l in range(recipe.num_layers)]


def test_flops_count_both_stages(seed_recipes, tiny_model_dirs):
    """cls 50% then FastV cuts more than cls alone, which cuts the LLM FLOPs of half the visual tokens; EAS removes
    exactly its layers' attention products."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.models.registry import load_spec

    _, spec = load_spec(str(tiny_model_dirs["gqa56"]))
    text = 20
    cls = prefill_cost(spec, load_recipe(seed_recipes["gqa56", "cls"]), text)
    both = prefill_cost(spec, load_recipe(seed_recipes["gqa56", "cls+fastv"]), text)
    assert 0 < cls.reduction < both.reduction < 1
    t = spec.text
    n = text + load_recipe(seed_recipes["gqa56", "cls"]).pre_llm.keep
    per_layer = (2 * n * t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                 + 4 * t.num_heads * n * n * t.head_dim + 2 * n * t.num_heads * t.head_dim * t.hidden_size
                 + 6 * n * t.hidden_size * t.intermediate_size)
    assert cls.recipe == t.num_layers * per_layer + 2 * t.hidden_size * t.vocab_size
    eas = load_recipe(seed_recipes["gqa56", "eas"])
    n = text + spec.visual_tokens
    attention = (2 * n * t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                 + 4 * t.num_heads * n * n * t.head_dim + 2 * n * t.num_heads * t.head_dim * t.hidden_size)
    dense = prefill_cost(spec, None, text)
    assert prefill_cost(spec, eas, text).recipe == dense.recipe - len(eas.skip_attention) * attention


def test_composed_recipe_round_trips(seed_recipes):
    from mllm_deploy.formats.recipe import Recipe, load_recipe

    recipe = load_recipe(seed_recipes["gqa56", "cls+fastv"])
    assert recipe.pre_llm.method == "cls" and recipe.method_name == "fastv"
    assert recipe.model.visual_tokens > recipe.llm_visual_tokens == recipe.pre_llm.keep == recipe.visual_tokens[0]
    again = Recipe.from_dict(json.loads(recipe.to_json()))
    assert again == recipe and again.to_json() == recipe.to_json()
    llm = recipe.llm_recipe()
    assert llm.pre_llm is None and llm.model.visual_tokens == recipe.pre_llm.keep and llm.prune_layers == [1]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", ALL)
def test_bundles_pass_tensorrt_checks(config, name, seed_bundles):
    from mllm_deploy.trt.check import check_bundle

    for routing in (["native", "plugin"] if name in ROUTED else ["native"]):
        bundle = seed_bundles(config, name, routing)
        for version in ("10.3", "10.16", "11.4"):
            findings = check_bundle(bundle, version)
            assert all(not f for f in findings.values()), (routing, version, findings)


def test_stand_in_is_recorded_and_checked(seed_recipes, tmp_path):
    """The fit quality is in the recipe; an altered stand-in file is refused by name."""
    import shutil

    from mllm_deploy.core.errors import RecipeError
    from mllm_deploy.formats.pia import recipe_pia
    from mllm_deploy.formats.recipe import load_recipe

    recipe = load_recipe(seed_recipes["gqa56", "eas+pia"])
    layer = str(recipe.skip_attention[0])
    quality = recipe.pia["fit_quality"]
    assert quality[layer]["ffn_input_r2"] >= quality[layer]["ffn_input_r2_without"]
    assert quality["kl_with_pia"] >= 0 and quality["kl_without_pia"] > 0
    assert set(recipe_pia(recipe)) == set(recipe.skip_attention)
    copy = tmp_path / "r.json"
    shutil.copy(seed_recipes["gqa56", "eas+pia"], copy)
    stand_in = seed_recipes["gqa56", "eas+pia"].parent / recipe.pia["file"]
    data = bytearray(stand_in.read_bytes())
    data[-1] ^= 1
    (tmp_path / recipe.pia["file"]).write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="does not match pia.sha256"):
        recipe_pia(load_recipe(copy))


def test_recipe_rules(seed_recipes):
    from dataclasses import replace

    from mllm_deploy.core.errors import RecipeError
    from mllm_deploy.formats.recipe import Recipe, load_recipe

    cls = load_recipe(seed_recipes["gqa56", "cls"])
    n = cls.model.visual_tokens
    d = json.loads(cls.to_json())
    for change, message in (({"keep": n}, "must be in 1.."), ({"method": "sift"}, "not one of cls, dart"),
                            ({"positions": "original"}, "only 'contiguous'")):
        bad = {**d, "pre_llm": {**d["pre_llm"], **change}}
        with pytest.raises(RecipeError, match=message):
            Recipe.from_dict(bad)
    with pytest.raises(RecipeError, match="visual_tokens\\[0\\]"):
        Recipe.from_dict({**d, "visual_tokens": [n] * cls.num_layers})  # more than the stage keeps
    fastv = load_recipe(seed_recipes["gqa56", "cls+fastv"])
    with pytest.raises(RecipeError, match="skip_attention composes with a pre_llm stage only"):
        replace(fastv, skip_attention=[0]).validate()
    eas = load_recipe(seed_recipes["gqa56", "eas"])
    with pytest.raises(RecipeError, match="every layer"):
        replace(eas, skip_attention=list(range(eas.num_layers))).validate()


@pytest.mark.slow
def test_calib_cli_composes_and_refuses(tiny_model_dirs, seed_recipes, tmp_path):
    from conftest import run_cli

    model = str(tiny_model_dirs["gqa56"])
    ok = run_cli("calib-mllm", "--model", model, "--method", "pdrop", "--pdrop-layers", "1", "--pre-llm",
                 str(seed_recipes["gqa56", "cls"]), "-o", str(tmp_path / "p.json"))
    assert ok.returncode == 0, ok.stderr
    recipe = json.loads((tmp_path / "p.json").read_text())
    assert recipe["pre_llm"]["method"] == "cls" and recipe["method"]["pre_llm"]["name"] == "cls"
    bad = run_cli("calib-mllm", "--model", model, "--method", "fastv", "--pre-llm", str(seed_recipes["gqa56", "eas"]),
                  "-o", str(tmp_path / "b.json"))
    assert bad.returncode != 0 and "must be a cls or dart recipe" in bad.stderr and not (tmp_path / "b.json").exists()
    inside = run_cli("calib-mllm", "--model", model, "--method", "dart", "--dart-layer", "9", "-o",
                     str(tmp_path / "d.json"))
    assert inside.returncode != 0 and "--dart-layer must be 'embedding' or a layer in 1..3" in inside.stderr
