"""calib-mllm: each method's recipe on tiny models, the FitPrune search, determinism, bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_image, run_cli, write_config_only_model

PUBLISHED_FITPRUNE_50 = [3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0]


def calib(model_dir, out, *args):
    proc = run_cli("calib-mllm", "--model", str(model_dir), "-o", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.models.registry import load_spec

    return load_recipe(out, load_spec(str(model_dir))[1])


def test_static_recipes_validate(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["gqa56"]  # 4 layers, 64 visual tokens
    assert calib(model, tmp_path / "d.json", "--method", "dense").visual_tokens == [64] * 4
    fastv = calib(model, tmp_path / "f.json", "--method", "fastv", "--fastv-k", "2", "--fastv-r", "0.5")
    assert fastv.visual_tokens == [64, 64, 32, 32] and fastv.score.attention_layer_offset == -1
    pdrop = calib(model, tmp_path / "p.json", "--method", "pdrop", "--pdrop-layers", "1,3", "--pdrop-ratio", "0.5")
    assert pdrop.visual_tokens == [64, 32, 32, 16]
    assert 0 < fastv.flops["reduction"] < pdrop.flops["reduction"] < 1


@pytest.mark.slow
def test_vtw_recipe_follows_its_kl_curve(tiny_model_dirs, tmp_path):
    recipe = calib(tiny_model_dirs["gqa56"], tmp_path / "v.json", "--method", "vtw", "--data", "builtin:synthetic:4",
                   "--vtw-eta", "0.1")
    curve = {int(k): v for k, v in recipe.extra["kl_curve"].items()}
    layer = recipe.method["layer"]
    expected = next((k for k in sorted(curve) if curve[k] <= 0.1), 4)
    assert layer == expected
    assert recipe.visual_tokens == [64] * layer + [0] * (4 - layer)
    assert all(v >= 0 for v in curve.values())


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_fitprune_meets_budget(tiny_model_dirs, tmp_path, budget):
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.models.registry import load_spec

    model = tiny_model_dirs["gqa56"]
    recipe = calib(model, tmp_path / "fp.json", "--method", "fitprune", "--budget", str(budget),
                   "--data", "builtin:synthetic:8")
    spec = load_spec(str(model))[1]
    achieved = prefill_cost(spec, recipe, 64, "fitprune-macs").reduction
    assert achieved >= budget
    assert recipe.prune_stage == "after_attention" and 0 <= recipe.method["alpha"] <= 1
    assert recipe.extra["fitprune_macs_reduction"] == pytest.approx(achieved)


def test_fitprune_search_on_known_fixture():
    """Two visual tokens receive no attention at all in layer 0: FIT(0) already drops exactly them,
    and dropping them meets the budget, so alpha = 0 and the schedule is [2, 0, 0]."""
    from mllm_deploy.calib import fitprune

    n, layers, d, m = 6, 3, 8, 16
    block = np.full((layers, n, n), 1.0 / n, dtype=np.float32)
    cross = np.full((layers, n), 1.0 / n, dtype=np.float32)
    block[0][:, [1, 4]] = 0.0
    cross[0][[1, 4]] = 0.0
    stats = [fitprune.SampleStats(block, cross)]
    reachable = fitprune.schedule_reduction([2, 0, 0], n, d, m)
    search = fitprune.search_alpha(stats, budget=reachable - 1e-9, d=d, m=m)
    assert search.feasible and search.alpha == 0.0 and search.schedule == [2, 0, 0]
    removed, met = fitprune.fit_walk(stats[0], 0.0, reachable - 1e-9, d, m)
    assert removed == [2, 0, 0] and met
    # a budget beyond what zero-mass tokens give needs alpha > 0, found to 0.01
    harder = fitprune.search_alpha(stats, budget=reachable + 0.05, d=d, m=m)
    assert harder.feasible and 0.0 < harder.alpha <= 1.0 and harder.reduction >= reachable + 0.05
    lower = fitprune.averaged_schedule(stats, max(harder.alpha - 0.011, 0.0), reachable + 0.05, d, m)
    assert fitprune.schedule_reduction(lower, n, d, m) < reachable + 0.05


def test_largest_removable_keeps_required_mass():
    from mllm_deploy.calib.fitprune import largest_removable

    scores = np.array([0.4, 0.1, 0.3, 0.2])
    assert sorted(largest_removable(scores, 0.7).tolist()) == [1, 3]  # 1 - 0.3 = 0.7 kept
    assert largest_removable(scores, 1.0).tolist() == []
    assert len(largest_removable(scores, 0.0)) == 4


def test_published_schedule_from_config_only(tmp_path):
    model = write_config_only_model(tmp_path / "llava-1.5-7b")
    schedule = ",".join(map(str, PUBLISHED_FITPRUNE_50))
    recipe = calib(model, tmp_path / "pub.json", "--method", "fitprune", "--schedule", schedule)
    from mllm_deploy.calib.static_methods import removed_per_layer

    assert removed_per_layer(recipe) == PUBLISHED_FITPRUNE_50
    assert recipe.visual_tokens[0] == 576 and recipe.final_visual_tokens == 576 - sum(PUBLISHED_FITPRUNE_50)
    fastv = calib(model, tmp_path / "fv.json", "--method", "fastv")  # static methods need no weights either
    assert fastv.visual_tokens[2] == 288


def test_methods_registry_and_flags():
    """Each registered method: an options dataclass that extends the common one and names its method, a
    calibrate function; every flag belongs to one field (a flag two methods share, cls and dart's --keep, is the
    same field in both); flags map onto the chosen method's fields."""
    from dataclasses import fields

    from mllm_deploy.calib import methods
    from mllm_deploy.calib.common import CommonOptions
    from mllm_deploy.calib.static_methods import FastVOptions

    assert methods.names() == ["dense", "fastv", "pdrop", "vtw", "fitprune", "mod", "cls", "dart", "eas"]
    flags = {f.metadata["flag"]: f.name for f in fields(CommonOptions)}
    for name in methods.names():
        method = methods.get(name)
        assert issubclass(method.options, CommonOptions) and method.options.method == name and callable(method.calibrate)
        assert methods.method_of(method.options()) == method
        for f in fields(method.options):
            if f.name not in CommonOptions.__dataclass_fields__:
                assert flags.setdefault(f.metadata["flag"], f.name) == f.name, f.metadata["flag"]
    assert methods.options_from_flags("fastv", {"fastv_k": 3, "fastv_r": None, "seed": 7, "plan": "prd"}) == \
        FastVOptions(k=3, seed=7)
    with pytest.raises(TypeError, match="not the options class"):
        methods.method_of(CommonOptions())


@pytest.mark.slow
def test_calibration_is_deterministic(tiny_model_dirs, tmp_path):
    a = json.loads((lambda r: r.to_json())(calib(tiny_model_dirs["mha42"], tmp_path / "a.json", "--method", "fitprune",
                                                 "--budget", "0.4", "--data", "builtin:synthetic:4")))
    b = json.loads((lambda r: r.to_json())(calib(tiny_model_dirs["mha42"], tmp_path / "b.json", "--method", "fitprune",
                                                 "--budget", "0.4", "--data", "builtin:synthetic:4")))
    for recipe in (a, b):
        recipe["provenance"].pop("seconds"), recipe["provenance"].pop("seconds_per_sample")
    assert a == b


@pytest.mark.parametrize("name", ["gqa56", "mha42"])
def test_dense_reference_generates_like_hf(tiny_model_dirs, name):
    from transformers import LlavaForConditionalGeneration

    from mllm_deploy.formats.recipe import dense_recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.export.verify import sample_inputs
    from mllm_deploy.models.registry import load_spec

    spec = load_spec(str(tiny_model_dirs[name]))[1]
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dirs[name]).eval()
    ids, pixels = (torch.from_numpy(a) for a in sample_inputs(spec, seed=4))
    with torch.no_grad():
        hf = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    ours = RecipeReference(model, dense_recipe(spec)).generate(ids, pixels, 20)
    assert len(ours) == 20 and ours == hf.tolist()


# ---- bad data and mismatched recipes ----------------------------------------------------------

def _bad(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("calib-mllm: error:"), proc.stderr
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("line, needle", [
    ('{"image": "missing.png", "prompt": "q"}', "line 2"),
    ('{"image": "ok.png", "prompt": "  "}', "empty or missing 'prompt'"),
    ('not json at all', "not valid JSON"),
    ('{"image": "notimage.png", "prompt": "q"}', "notimage.png"),
])
def test_bad_calibration_lines(tiny_model_dirs, tmp_path, line, needle):
    make_image(tmp_path / "ok.png")
    (tmp_path / "notimage.png").write_text("text")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "ok.png", "prompt": "what?"}\n' + line + "\n")
    out = tmp_path / "r.json"
    _bad(run_cli("calib-mllm", "--model", str(tiny_model_dirs["gqa56"]), "--method", "fitprune", "--budget", "0.3",
                 "--data", str(data), "-o", str(out)), needle, "line 2")
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))


@pytest.mark.slow
def test_skip_bad_skips_and_reports(tiny_model_dirs, tmp_path):
    make_image(tmp_path / "ok.png")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "ok.png", "prompt": "what?"}\n{"image": "gone.png", "prompt": "q"}\n')
    proc = run_cli("calib-mllm", "--model", str(tiny_model_dirs["gqa56"]), "--method", "vtw", "--data", str(data),
                   "--skip-bad", "-o", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert "skipping data.jsonl line 2" in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["provenance"]["samples"] == 1


def test_mismatched_recipe_is_refused(tiny_model_dirs, tmp_path):
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.core.errors import RecipeError
    from mllm_deploy.models.registry import load_spec

    calib(tiny_model_dirs["gqa56"], tmp_path / "r.json", "--method", "fastv")
    with pytest.raises(RecipeError, match="model.fingerprint"):
        load_recipe(tmp_path / "r.json", load_spec(str(tiny_model_dirs["gqa70"]))[1])
    proc = run_cli("flops-mllm", "--model", str(tiny_model_dirs["mha42"]), "--recipe", str(tmp_path / "r.json"))
    assert proc.returncode == 1 and "does not match the model" in proc.stderr


def test_data_needed_for_data_methods(tiny_model_dirs, tmp_path):
    _bad(run_cli("calib-mllm", "--model", str(tiny_model_dirs["gqa56"]), "--method", "vtw", "-o", str(tmp_path / "r")),
         "needs --data")
    _bad(run_cli("calib-mllm", "--model", str(tiny_model_dirs["gqa56"]), "--method", "fastv", "--fastv-k", "9",
                 "-o", str(tmp_path / "r")), "--fastv-k")
