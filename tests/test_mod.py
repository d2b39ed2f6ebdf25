"""Mixture-of-depths (issue 7, docs/mod.md): recipes with trained, fitted and attention routers on two
tiny geometries, exported with native and plugin routing, generate what the PyTorch reference
generates; each layer caches capacity + text tokens; routers load from the documented layout."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import CONFIGS, make_image, run_cli

NEW_TOKENS = 16
ROUTERS = ("trained", "fitted", "attention")


def write_gamma_checkpoint(path, hidden: int, seed: int) -> dict[str, np.ndarray]:
    """gamma-MoD form: one d->2 router shared by every routed layer (selected MLP scaled by p by default)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {"shared.router.weight": rng.standard_normal((2, hidden)).astype(np.float32),
               "shared.router.bias": rng.standard_normal(2).astype(np.float32)}
    save_file(tensors, str(path))
    return tensors


def write_pmod_checkpoint(path, hidden: int, layers, seed: int) -> None:
    """p-MoD form: a d->1 router with bias per layer on the residual stream, TanhNorm on both sides."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for l in layers:
        tensors[f"layers.{l}.router.weight"] = (0.2 * rng.standard_normal((1, hidden))).astype(np.float32)
        tensors[f"layers.{l}.router.bias"] = np.array([0.1 * l], np.float32)
    save_file(tensors, str(path), metadata={"router_input": "residual", "selected_scale": "tanh_norm",
                                            "tanh_alpha": "0.3"})


def _options(config: str, router: str, work, spec):
    from mllm_deploy.calib.mod import ModOptions

    layers = spec.text.num_layers
    if router == "attention":  # layer 0 stays dense: it has no previous layer to rank with
        return ModOptions(plan="layers=" + ",".join(map(str, range(1, layers))), capacity=[0.5], router="attention")
    if router == "fitted":  # fitted routers; on gqa56 with the ARank plan (both from calibration data)
        plan = dict(plan="arank", dense_layers=1) if config == "gqa56" else dict(plan="layers=1,2")
        return ModOptions(router="fitted", data="builtin:synthetic:3", capacity=[0.4], **plan)
    if config == "gqa56":  # p-MoD: ratio-decay plan, TanhNorm on skipped and selected tokens
        from mllm_deploy.calib.arank import prd_plan

        path = work / "pmod.safetensors"
        write_pmod_checkpoint(path, spec.text.hidden_size, prd_plan(layers)[0], seed=4)
        return ModOptions(plan="prd", router="trained", router_file=str(path), skip="tanh_scale")
    path = work / "gamma.safetensors"  # gamma-MoD: shared router, layer 0 routed too
    write_gamma_checkpoint(path, spec.text.hidden_size, seed=5)
    return ModOptions(plan="layers=0,2", capacity=[0.5, 0.3], router="trained", router_file=str(path))


@pytest.fixture(scope="module")
def mod_recipes(tiny_model_dirs, tmp_path_factory):
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.formats.recipe import save_recipe
    from mllm_deploy.models.registry import load_spec

    out = {}
    for config in CONFIGS:
        spec = load_spec(str(tiny_model_dirs[config]))[1]
        for router in ROUTERS:
            work = tmp_path_factory.mktemp(f"mod-{config}-{router}")
            recipe = calibrate(str(tiny_model_dirs[config]), _options(config, router, work, spec), log=lambda m: None)
            path = work / "recipe.json"
            save_recipe(recipe, path)
            out[config, router] = path
    return out


@pytest.fixture(scope="module")
def mod_bundles(tiny_model_dirs, mod_recipes, tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("mod-bundles")
    cache = {}

    def get(config: str, router: str, routing: str):
        key = (config, router, routing)
        if key not in cache:
            cache[key] = export_bundle(str(tiny_model_dirs[config]), root / "-".join(key),
                                       ExportOptions(recipe=str(mod_recipes[config, router]), routing=routing),
                                       log=lambda m: None)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs):
    from transformers import LlavaForConditionalGeneration

    return {name: LlavaForConditionalGeneration.from_pretrained(tiny_model_dirs[name]).eval() for name in CONFIGS}


# ---- exported bundles == PyTorch reference --------------------------------------------------------
@pytest.mark.parametrize("routing", ["native", "plugin"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("graphs", ["portable", "onnxruntime"])
def test_mod_bundle_generates_like_reference(graphs, config, router, routing, mod_bundles, mod_recipes, hf_models, tmp_path):
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.runtime.pipeline import Pipeline

    recipe = load_recipe(mod_recipes[config, router])
    assert recipe.is_mod and recipe.mod.router == router and recipe.mod_layers
    bundle = mod_bundles(config, router, routing)
    image = make_image(tmp_path / "q.png", size=(83, 71), seed=11)
    if graphs == "onnxruntime" and config == "gqa70":  # head_dim 12: GroupQueryAttention needs a multiple of 8
        assert "prefill_ort" not in json.loads((bundle / "manifest.json").read_text())["graphs"]
        return
    with Pipeline.load(bundle, graphs=graphs) as pipe:
        ids = pipe.input_ids(prompt="Describe the picture in detail.")
        pixels = pipe.pixel_values(image)
        ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
    theirs = RecipeReference(hf_models[config], recipe).generate(torch.from_numpy(ids), torch.from_numpy(pixels), NEW_TOKENS)
    assert len(theirs) == NEW_TOKENS
    assert ours == theirs


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_mod_kv_lengths_are_capacity_plus_text(config, router, mod_bundles, mod_recipes, tmp_path):
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    recipe = load_recipe(mod_recipes[config, router])
    n = recipe.model.visual_tokens
    capacity = {l: round(c * n) for l, c in zip(recipe.mod.layers, recipe.mod.capacity)}
    bundle = mod_bundles(config, router, "native")
    manifest = json.loads((bundle / "manifest.json").read_text())
    outputs = {o["name"]: o["shape"] for o in manifest["graphs"]["prefill"]["outputs"]}
    assert len({outputs[f"present.{l}.key"][2] for l in range(recipe.num_layers)}) == recipe.num_layers
    with Pipeline.load(bundle) as pipe:
        ids = pipe.input_ids(prompt="What is this?")
        features = pipe.generator.encode_image(pipe.pixel_values(make_image(tmp_path / "k.png")))
        _, cache = pipe.generator.prefill(ids, features, capacity_extra=0)
    text = ids.shape[1] - n
    expected = [text + capacity.get(l, n) for l in range(recipe.num_layers)]
    assert [k.shape[2] for k in cache.keys] == expected == cache.lengths.tolist()
    assert any(length < text + n for length in expected)


def test_plugin_and_native_graphs(mod_bundles, mod_recipes):
    """Plugin MoD graphs route with TokenSelect + TokenScatter (and VisualScore for the attention
    router) only; native graphs with standard ops only; both pass the TensorRT parser checks."""
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.trt.check import check_bundle
    from mllm_deploy.plugins.schemas import register_schemas

    register_schemas()
    for router in ("attention", "fitted"):
        recipe = load_recipe(mod_recipes["gqa56", router])
        routed = len(recipe.mod_layers)
        plugin = mod_bundles("gqa56", router, "plugin")
        model = onnx.load(plugin / "prefill.onnx", load_external_data=False)
        custom = sorted(n.op_type for n in model.graph.node if n.domain == "mllm_deploy")
        ranks = routed if router == "attention" else 0  # one ranking per routed layer, in the layer before it
        scatters = routed + max(routed - 1, 0) * (router == "attention")  # running scores updated by routed layers
        assert custom == sorted(["TokenSelect"] * routed + ["TokenScatter"] * scatters + ["VisualScore"] * ranks)
        assert not [n for n in model.graph.node if n.op_type in ("TopK", "ScatterElements")]
        onnx.checker.check_model(str(plugin / "prefill.onnx"))
        native = onnx.load(mod_bundles("gqa56", router, "native") / "prefill.onnx", load_external_data=False)
        assert not [n for n in native.graph.node if n.domain == "mllm_deploy"]
        assert sum(n.op_type == "ScatterElements" for n in native.graph.node) == scatters
        for bundle in (plugin, mod_bundles("gqa56", router, "native")):
            for version in ("10.3", "11.4"):
                assert all(not f for f in check_bundle(bundle, version).values())


@pytest.mark.parametrize("router", ROUTERS)
def test_exact_flops_equal_mod_prefill_matmuls(router, mod_bundles, mod_recipes, tiny_model_dirs, tmp_path):
    from test_flops import matmul_flops_of_prefill

    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.models.registry import load_spec

    spec = load_spec(str(tiny_model_dirs["gqa56"]))[1]
    recipe = load_recipe(mod_recipes["gqa56", router], spec)
    measured = matmul_flops_of_prefill(mod_bundles("gqa56", router, "native"), 13, 4, tmp_path)
    report = prefill_cost(spec, recipe, text_tokens=13, formula="exact", prefix_tokens=4)
    assert report.recipe == measured and report.reduction > 0
    assert recipe.flops["reduction"] == pytest.approx(prefill_cost(spec, recipe, 64).reduction)


# ---- recipes and routers ----------------------------------------------------------------------------
def test_fitted_recipe_records_arank_and_fit_quality(mod_recipes):
    from mllm_deploy.formats.recipe import load_recipe

    recipe = load_recipe(mod_recipes["gqa56", "fitted"])
    table = recipe.mod.arank
    assert len(table["arank"]) == recipe.num_layers and table["dense_layers"] == 1
    dense = [l for l in range(recipe.num_layers) if l not in recipe.mod_layers]
    assert dense == [int(np.argmax(table["arank_per_token"]))]  # the highest-ARank layer stays dense
    quality = recipe.mod.fit_quality
    assert quality["target"] == "attention" and quality["held_out_samples"] == 1
    assert sorted(int(l) for l in quality["layers"]) == recipe.mod_layers
    for l, record in quality["layers"].items():
        for key in ("held_out", "train", "random"):
            assert 0.0 <= record[key] <= 1.0
        assert record["random"] == pytest.approx(recipe.visual_tokens[int(l)] / recipe.model.visual_tokens)
    assert (mod_recipes["gqa56", "fitted"].parent / recipe.mod.router_file).is_file()


def test_trained_checkpoint_round_trip(tiny_model_dirs, hf_models, tmp_path):
    """A gamma-MoD checkpoint in the documented layout, through calib-mllm: the recipe's router file holds
    W[1] - W[0], and the reference processes exactly the top-k tokens of gamma-MoD's p = softmax(W x)[1]."""
    from mllm_deploy.formats.routers import recipe_routers
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.core.errors import RecipeError
    from mllm_deploy.export.verify import sample_inputs
    from mllm_deploy.models.registry import load_spec

    model_dir = tiny_model_dirs["gqa56"]
    spec = load_spec(str(model_dir))[1]
    tensors = write_gamma_checkpoint(tmp_path / "ckpt.safetensors", spec.text.hidden_size, seed=7)
    proc = run_cli("calib-mllm", "--model", str(model_dir), "--method", "mod", "--plan", "layers=0,2", "--capacity",
                   "0.25", "--router", "trained", "--router-file", str(tmp_path / "ckpt.safetensors"),
                   "-o", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert "r.routers.safetensors" in proc.stdout
    recipe = load_recipe(tmp_path / "r.json", spec)
    assert recipe.mod.selected_scale == "sigmoid" and recipe.mod.router_input == "input_norm"
    weight, bias = tensors["shared.router.weight"], tensors["shared.router.bias"]
    for l, router in recipe_routers(recipe).items():
        np.testing.assert_allclose(router.weight, weight[1] - weight[0], rtol=1e-6)
        assert router.bias == pytest.approx(float(bias[1] - bias[0]), rel=1e-6)

    model = hf_models["gqa56"]
    ids, pixels = (torch.from_numpy(a) for a in sample_inputs(spec, seed=2))
    reference = RecipeReference(model, recipe)
    features = reference.image_features(pixels)
    kept = []
    reference.prefill(ids, features, observer=lambda l, q, k, positions, vs, n: kept.append(positions.clone()))
    with torch.no_grad():  # layer 0 sees the embeddings: gamma-MoD's own probability, computed here from the checkpoint
        x, start = reference.embed(ids, features)
        h = model.model.language_model.layers[0].input_layernorm(x[0, start:start + spec.visual_tokens])
        p = torch.softmax(h @ torch.from_numpy(weight).T + torch.from_numpy(bias), dim=-1)[:, 1]
    k = round(0.25 * spec.visual_tokens)
    expected = start + torch.sort(torch.topk(p, k).indices).values
    visual = kept[0][(kept[0] >= start) & (kept[0] < start + spec.visual_tokens)]
    assert visual.tolist() == expected.tolist()
    assert len(kept[0]) == ids.shape[1] - spec.visual_tokens + k and len(kept[1]) == ids.shape[1]

    (tmp_path / recipe.mod.router_file).write_bytes(b"altered")
    with pytest.raises(RecipeError, match="router_sha256"):
        RecipeReference(model, load_recipe(tmp_path / "r.json"))


@pytest.mark.parametrize("skip", ["identity", "tanh_scale"])
def test_skipped_tokens_pass_through_or_scale(skip, tiny_model_dirs, hf_models):
    """Skipped visual tokens leave a routed layer unchanged (identity) or times 1 + alpha tanh(score);
    they stay in the sequence; text rows are always processed."""
    from mllm_deploy.calib.mod import ModPlan, mod_recipe
    from mllm_deploy.calib.mod_reference import ModExecutor
    from mllm_deploy.formats.routers import LinearRouter
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.export.verify import sample_inputs
    from mllm_deploy.models.registry import load_spec

    spec = load_spec(str(tiny_model_dirs["gqa70"]))[1]
    recipe = mod_recipe(spec, ModPlan([1], [0.4], "layers"), "trained", skip=skip, tanh_alpha=0.5)
    router = LinearRouter(np.random.default_rng(0).standard_normal(spec.text.hidden_size).astype(np.float32), 0.0)
    reference = RecipeReference(hf_models["gqa70"], recipe, routers={1: router})
    executor = ModExecutor(reference, recipe, {1: router})
    ids, pixels = (torch.from_numpy(a) for a in sample_inputs(spec, seed=3))
    with torch.no_grad():
        run = executor.start(ids, reference.image_features(pixels))
        executor.step(0, run)
        before, scores = run.x.clone(), executor.scores(1, run)
        executor.step(1, run)
    vs, n = run.vis_start, spec.visual_tokens
    k = recipe.visual_tokens[1]
    chosen = torch.sort(torch.topk(scores, k).indices).values
    skipped = torch.tensor(sorted(set(range(n)) - set(chosen.tolist())))
    want = before[0, vs + skipped]
    if skip == "tanh_scale":
        want = want * (1 + 0.5 * torch.tanh(scores[skipped]))[:, None]
    torch.testing.assert_close(run.x[0, vs + skipped], want, rtol=0, atol=0)
    changed = lambda rows: (run.x[0, rows] - before[0, rows]).abs().amax(-1) > 0  # noqa: E731
    assert changed(vs + chosen).all() and changed(torch.arange(vs + n, ids.shape[1])).all()
    assert run.x.shape == before.shape  # nothing left the sequence
    assert run.state.kept[1].tolist() == list(range(vs)) + (vs + chosen).tolist() + list(range(vs + n, ids.shape[1]))


def test_recipe_validation(mod_recipes):
    from mllm_deploy.formats.recipe import Recipe
    from mllm_deploy.core.errors import RecipeError

    data = json.loads(mod_recipes["gqa56", "attention"].read_text())
    Recipe.from_dict(data)
    n = data["model"]["visual_tokens"]
    bad = [
        (lambda d: d["visual_tokens"].__setitem__(0, n - 1), "does not route"),
        (lambda d: d["visual_tokens"].__setitem__(1, n), "capacity"),
        (lambda d: (d["mod"].update(layers=[0, 1, 2, 3], capacity=[0.5] * 4), d["visual_tokens"].__setitem__(0, n // 2)),
         "layer 0 cannot be routed"),
        (lambda d: d["mod"].__setitem__("capacity", [0.5]), "one share per routed layer"),
        (lambda d: d["mod"].__setitem__("skip", "drop"), "mod.skip"),
        (lambda d: d["mod"].__setitem__("router", "fitted"), "router_file"),
        (lambda d: d.__setitem__("mod", None), "needs a 'mod' object"),
    ]
    for change, needle in bad:
        broken = json.loads(json.dumps(data))
        change(broken)
        with pytest.raises(RecipeError, match=needle):
            Recipe.from_dict(broken)


def test_mod_block_is_typed_with_the_same_json(mod_recipes):
    from mllm_deploy.core.errors import RecipeError
    from mllm_deploy.formats.recipe import ModBlock, Recipe

    for router in ROUTERS:
        data = json.loads(mod_recipes["gqa56", router].read_text())
        recipe = Recipe.from_dict(data)
        assert isinstance(recipe.mod, ModBlock) and recipe.to_dict() == data
    for change, needle in ((lambda m: m.__setitem__("routers", 1), "unknown keys 'routers'"),
                           (lambda m: m.__setitem__("capacity", ["half"]), "mod.capacity"),
                           (lambda m: m.__setitem__("tanh_alpha", "0.5"), "mod.tanh_alpha"),
                           (lambda m: m.__setitem__("fit_quality", [1]), "mod.fit_quality")):
        broken = json.loads(json.dumps(data))
        change(broken["mod"])
        with pytest.raises(RecipeError, match=needle):
            Recipe.from_dict(broken)


# ---- calib-mllm errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--method", "fastv", "--router", "fitted"], "only apply to --method mod"),
    (["--method", "mod", "--plan", "bogus"], "--plan must be"),
    (["--method", "mod", "--plan", "layers=1"], "needs --data"),
    (["--method", "mod", "--router", "trained", "--plan", "layers=1"], "needs --router-file"),
    (["--method", "mod", "--router", "attention", "--plan", "layers=0,1"], "layer 0 cannot be routed"),
    (["--method", "mod", "--router", "attention", "--plan", "layers=1", "--skip", "tanh_scale"], "--skip identity"),
    (["--method", "mod", "--router", "attention", "--plan", "prd", "--capacity", "0.5"], "own capacities"),
    (["--method", "mod", "--router", "attention", "--plan", "layers=1,2", "--capacity", "0.5,0.4,0.3"], "3 values"),
    (["--method", "mod", "--router", "attention", "--plan", "layers=1", "--capacity", "1.0"], "(0, 1)"),
    (["--method", "mod", "--router", "attention", "--plan", "layers=9"], "0..3"),
    (["--method", "mod", "--router", "attention", "--plan", "prd", "--dense-layers", "2"], "--plan arank only"),
    (["--method", "mod", "--router", "attention", "--router-file", "x.safetensors"], "--router trained"),
    (["--method", "mod", "--router", "trained", "--router-file", "missing.safetensors", "--plan", "layers=1"], "not found"),
    (["--method", "mod", "--router", "magic", "--plan", "layers=1"], "--router must be"),
])
def test_bad_mod_options(args, needle, tiny_model_dirs, tmp_path, capsys):
    from mllm_deploy.calib.cli import main

    out = tmp_path / "r.json"
    assert main(["--model", str(tiny_model_dirs["gqa56"]), "-o", str(out), *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calib-mllm: error:") and needle in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_checkpoint_missing_a_layer(tiny_model_dirs, tmp_path, capsys):
    from mllm_deploy.calib.cli import main

    write_pmod_checkpoint(tmp_path / "c.safetensors", 128, [1, 2], seed=0)
    assert main(["--model", str(tiny_model_dirs["gqa56"]), "-o", str(tmp_path / "r.json"), "--method", "mod",
                 "--router", "trained", "--router-file", str(tmp_path / "c.safetensors"), "--plan", "layers=1,3"]) == 1
    err = capsys.readouterr().err
    assert "no router for layer 3" in err and not (tmp_path / "r.json").exists()
