"""build-mllm and the TensorRT backend (trt/backend.py) against a TensorRT stand-in that refuses
what TensorRT refuses (tests/fake_tensorrt.py): profiles without values for a shape-tensor input, a shape
tensor bound to device memory, unbound inputs, a plugin library registered twice.

Every kind of bundle is built with the real build_engines code and then run by the real TensorRT
runner, whose answers must equal ONNX Runtime's. What this cannot check is TensorRT itself (parsing,
kernels, precision): that is build-mllm --verify's job on a target.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from fake_tensorrt import FakeCudart, FakeTensorRT, integer_shape_inputs
from mllm_deploy.trt import env as trt_env
from mllm_deploy.core.errors import BundleError, MllmError
from mllm_deploy.trt.build import TIMING_CACHE_FILE, BuildOptions, build_engines
from mllm_deploy.trt.profiles import PRESETS
from mllm_deploy.runtime.bundle import load_bundle

FAKE_GPU = ("Fake GPU", "8.7")
OPTIONS = BuildOptions(preset="jetson-orin-nano", max_new_tokens=16, opt_image_start=3)


@pytest.fixture()
def fake_trt(monkeypatch, tmp_path):
    """One fresh 'process': a TensorRT with an empty plugin registry, fake CUDA, and a plugin library file."""
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart)
    monkeypatch.setattr(trt_env, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_env, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_env, "query_gpu", lambda device=0: FAKE_GPU)
    library = tmp_path / "libmllm_deploy_trt_plugins.so"
    library.write_bytes(b"\x7fELF routing plugins")
    return SimpleNamespace(trt=trt, cudart=cudart, plugins=library)


@pytest.fixture(scope="module")
def mod_recipe(tiny_model_dirs, tmp_path_factory):
    """Mixture-of-depths with attention routers on layers 1-3 (no calibration data needed)."""
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.calib.mod import ModOptions
    from mllm_deploy.formats.recipe import save_recipe

    recipe = calibrate(str(tiny_model_dirs["gqa56"]), ModOptions(plan="layers=1,2,3", capacity=[0.5], router="attention"),
                       log=lambda m: None)
    path = tmp_path_factory.mktemp("mod-recipe") / "recipe.json"
    save_recipe(recipe, path)
    return path


@pytest.fixture(scope="module")
def mod_bundles(tiny_model_dirs, mod_recipe, tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("mod-bundles")
    return {routing: export_bundle(str(tiny_model_dirs["gqa56"]), root / routing,
                                   ExportOptions(recipe=str(mod_recipe), routing=routing), log=lambda m: None)
            for routing in ("native", "plugin")}


KINDS = ["dense", "fastv-native", "fastv-plugin", "pdrop-native", "fitprune-native", "vtw-native", "mod-native",
         "mod-plugin"]


def _bundle(kind, tiny_bundles, pruned_bundles, mod_bundles, tmp_path):
    if kind == "dense":
        source = tiny_bundles["gqa56"]
    elif kind.startswith("mod-"):
        source = mod_bundles[kind.split("-")[1]]
    else:
        method, routing = kind.split("-")
        source = pruned_bundles("gqa56", method, routing)
    path = tmp_path / kind
    shutil.copytree(source, path)
    return load_bundle(path)


def _build(bundle, fake, **changes):
    from dataclasses import replace

    changes.setdefault("plugins", fake.plugins if bundle.manifest["routing"] == "plugin" else None)
    options = replace(OPTIONS, **changes)
    logged: list[str] = []
    result = build_engines(bundle.path, bundle.manifest, options, log=logged.append)
    return result, logged


@pytest.mark.parametrize("kind", KINDS)
def test_every_bundle_builds_with_shape_values_and_runs_like_onnxruntime(kind, tiny_bundles, pruned_bundles,
                                                                        mod_bundles, tmp_path, fake_trt):
    from mllm_deploy.runtime.timing import synthetic_inputs
    from mllm_deploy.runtime.generator import Generator

    bundle = _bundle(kind, tiny_bundles, pruned_bundles, mod_bundles, tmp_path)
    # the manifest's shape tensors are the ones the (fake) parser finds on its own
    import onnx

    for graph in ("vision", "prefill", "decode"):
        found = integer_shape_inputs(onnx.load(str(bundle.graph_path(graph)), load_external_data=False))
        assert set(bundle.shape_inputs(graph)) == found, graph
    assert bundle.shape_inputs("prefill") == ["image_start"]
    result, logged = _build(bundle, fake_trt)
    prefill = next(k for k in result.keys if k.graph == "prefill").settings
    visual = bundle.visual_tokens
    longest = prefill["profile"]["input_ids"][2][1]
    assert prefill["shape_values"] == {"image_start": [[0], [3], [longest - visual]]}
    assert any("Building engine" in line for line in logged)  # the builder's progress is shown
    ids, pixels = synthetic_inputs(bundle, visual + 12)
    with Generator(bundle, "onnxruntime") as ref:
        want = ref.generate(ids, pixels, 5, ignore_eos=True)
    with Generator(bundle, "tensorrt") as gen:
        runner = gen.runners["prefill"]
        assert set(runner.host_inputs) == {"image_start"}  # from get_tensor_location, held by the runner
        got = gen.generate(ids, pixels, 5, ignore_eos=True)
        assert fake_trt.trt.loads == ([str(fake_trt.plugins)] if "plugin" in kind else [])  # loaded once
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.first_logits, want.first_logits, rtol=1e-5, atol=1e-5)


def test_todays_profile_and_binding_fail_on_the_stricter_fake(tiny_bundles, tmp_path, fake_trt):
    """The two defects of the first TensorRT path, reproduced: a prefill profile with dimensions only, and
    image_start bound to device memory. Both fail as TensorRT fails."""
    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    trt = fake_trt.trt
    logger_errors: list[str] = []
    logger = SimpleNamespace(log=lambda severity, message: logger_errors.append(message))
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse_from_file(str(bundle.graph_path("prefill")))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 57), (1, 80), (1, 300))  # what build-mllm used to give
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is None
    assert logger_errors == ["image_start: optimization profile is missing values for shape input"]

    from mllm_deploy.runtime.timing import synthetic_inputs
    from mllm_deploy.runtime.generator import Generator

    _build(bundle, fake_trt)
    ids, pixels = synthetic_inputs(bundle, bundle.visual_tokens + 12)
    with Generator(bundle, "tensorrt") as gen:
        runner = gen.runners["prefill"]
        runner.host_inputs.clear()  # what the runner used to do: every input in device memory
        with pytest.raises(MllmError, match="prefill"):
            gen.prefill(ids, gen.encode_image(pixels), capacity_extra=1)
        assert "image_start is a shape tensor: its address must be host memory" in runner.contexts[0].errors[-1]


def test_a_manifest_that_misnames_the_shape_tensors_is_refused_before_building(tiny_bundles, tmp_path, fake_trt):
    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["graphs"]["prefill"]["shape_inputs"] = []
    with pytest.raises(BundleError, match=r"TensorRT reads \['image_start'\] of the prefill graph as shape tensors"):
        build_engines(bundle.path, manifest, OPTIONS, log=lambda m: None)
    manifest["graphs"]["prefill"]["shape_inputs"] = ["input_ids", "image_start"]
    with pytest.raises(BundleError, match="input_ids is a TensorRT shape tensor.*knows no value range"):
        build_engines(bundle.path, manifest, OPTIONS, log=lambda m: None)
    del manifest["graphs"]["prefill"]["shape_inputs"]
    with pytest.raises(BundleError, match="re-export the bundle"):
        build_engines(bundle.path, manifest, OPTIONS, log=lambda m: None)
    assert not (bundle.path / "engines").exists()


def test_plugin_library_is_loaded_once_per_process(tmp_path, fake_trt, mod_bundles):
    """build then run in one process (build-mllm --verify): one registration; another library is refused."""
    from mllm_deploy.runtime.generator import Generator

    bundle = load_bundle(shutil.copytree(mod_bundles["plugin"], tmp_path / "b"))
    registry = fake_trt.trt.Builder(None).get_plugin_registry()
    assert registry.load_library("x") is not None and registry.load_library("x") is None  # the fake, like TensorRT
    fake_trt.trt.registered.clear()
    fake_trt.trt.loads.clear()
    _build(bundle, fake_trt)
    with Generator(bundle, "tensorrt"):  # the engines/ copy has the same content: not loaded again
        pass
    assert fake_trt.trt.loads == [str(fake_trt.plugins)]
    other = tmp_path / "other.so"
    other.write_bytes(b"\x7fELF another build")
    with pytest.raises(MllmError, match="another routing plugin library .* is already loaded in this process"):
        _build(bundle, fake_trt, plugins=other, force=True)


def test_timing_cache_is_kept_across_rebuilds(tiny_bundles, tmp_path, fake_trt):
    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    _build(bundle, fake_trt)
    cache = bundle.path / "engines" / TIMING_CACHE_FILE
    assert json.loads(cache.read_bytes()) == ["vision", "prefill", "decode"]
    _, logged = _build(bundle, fake_trt)
    assert any("up to date" in line for line in logged) and not any("timing cache" in line for line in logged)
    _, logged = _build(bundle, fake_trt, force=True)
    assert any("reusing the TensorRT timing cache" in line for line in logged)
    assert json.loads(cache.read_bytes()) == ["vision", "prefill", "decode"] * 2  # the builder got the old entries


def test_decode_copies_only_new_kv_slots(tiny_bundles, tmp_path, fake_trt):
    from mllm_deploy.runtime.timing import synthetic_inputs
    from mllm_deploy.runtime.generator import Generator

    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    _build(bundle, fake_trt)
    ids, pixels = synthetic_inputs(bundle, bundle.visual_tokens + 12)
    with Generator(bundle, "tensorrt") as gen:
        decode = gen.runners["decode"]
        assert decode.kv_plan is not None and len(decode.kv_plan.layers) == bundle.num_layers
        features = gen.encode_image(pixels)
        logits, cache = gen.prefill(ids, features, capacity_extra=4)
        token = int(np.argmax(logits))
        gen.decode(token, ids.shape[1], cache)  # first step: the whole cache goes over
        before = fake_trt.cudart.to_device_bytes
        gen.decode(token, ids.shape[1] + 1, cache)
        text = bundle.manifest["model"]["text"]
        slot = text["num_kv_heads"] * text["head_dim"] * 4
        small_inputs = 8 + 8 + 8 * bundle.num_layers  # input_ids, position_ids, past_lengths
        assert fake_trt.cudart.to_device_bytes - before == 2 * bundle.num_layers * slot + small_inputs


def test_stale_engine_and_missing_engines_are_refused(tiny_bundles, tmp_path, fake_trt, monkeypatch):
    from mllm_deploy.runtime.generator import Generator

    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    _build(bundle, fake_trt)
    monkeypatch.setattr(trt_env, "query_gpu", lambda device=0: ("Other GPU", "9.0"))
    with pytest.raises(BundleError, match="stale.*gpu was 'Fake GPU', now 'Other GPU'"):
        Generator(bundle, "tensorrt").__enter__()
    shutil.rmtree(bundle.path / "engines")
    with pytest.raises(BundleError, match="run build-mllm"):
        Generator(bundle, "tensorrt").__enter__()


def test_prompt_longer_than_the_profile_is_refused(tiny_bundles, tmp_path, fake_trt):
    from mllm_deploy.runtime.timing import synthetic_inputs
    from mllm_deploy.runtime.generator import Generator

    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    _build(bundle, fake_trt)
    longest = bundle.visual_tokens + PRESETS["jetson-orin-nano"].max_text_tokens
    ids, pixels = synthetic_inputs(bundle, min(longest + 1, 2040))
    with Generator(bundle, "tensorrt") as gen:
        with pytest.raises(MllmError, match="outside the engine's optimisation profiles"):
            gen.prefill(ids, gen.encode_image(pixels), capacity_extra=1)


def test_verify_compares_benchmarks_and_reports(tiny_bundles, tmp_path, fake_trt, monkeypatch):
    """build-mllm --verify's steps on the fake target: TensorRT (here ORT underneath) agrees with ONNX Runtime."""
    from mllm_deploy.trt import verify as trt_verify

    monkeypatch.setattr(trt_verify, "check_kernels",
                        lambda plugins, log: trt_verify.Check("plugin kernels", "skip", "no plugins in this bundle"))
    bundle = load_bundle(shutil.copytree(tiny_bundles["gqa56"], tmp_path / "b"))
    build, _ = _build(bundle, fake_trt)
    payload = trt_verify.verify(bundle, build, precision="float32", steps=3, repeats=1, log=lambda m: None)
    statuses = {c["name"]: c["status"] for c in payload["checks"]}
    assert statuses == {"plugin kernels": "skip", "vision": "pass", "prefill": "pass", "decode": "pass",
                        "greedy tokens": "pass", "benchmark": "pass"}
    assert payload["ok"] and payload["gpu"] == FAKE_GPU[0]
    report = (bundle.path / "engines" / "verify.md").read_text()
    assert "**PASS**" in report and "| prefill | pass | agree:" in report
    assert json.loads((bundle.path / "engines" / "verify.json").read_text())["checks"][-1]["data"]["backend"] == "tensorrt"


def test_a_plugin_library_built_for_another_tensorrt_major_is_refused(tmp_path, fake_trt, mod_bundles):
    """11.x changed the logger ABI: a library compiled against 11.x headers must not load into TensorRT 10."""
    import subprocess

    from mllm_deploy.trt.env import plugin_library_tensorrt_major

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    source = tmp_path / "major.c"
    source.write_text("int mllm_trt_plugins_tensorrt_major(void) { return 11; }\n")
    library = tmp_path / "libplugins11.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    assert plugin_library_tensorrt_major(library) == 11 and plugin_library_tensorrt_major(fake_trt.plugins) is None
    bundle = load_bundle(shutil.copytree(mod_bundles["plugin"], tmp_path / "b"))
    with pytest.raises(MllmError, match="compiled against TensorRT 11 headers and this is TensorRT 10.3.0.30"):
        _build(bundle, fake_trt, plugins=library)
    assert fake_trt.trt.loads == [] and not (bundle.path / "engines").exists()


# ---- near-ties: two backends may keep different tokens at the k-th place -----------------------------------
def test_selection_comparator_tells_a_tie_from_a_mismatch():
    from mllm_deploy.core.compare import DEFAULT_TOLERANCES, compare_selection

    tolerance = DEFAULT_TOLERANCES["float32"]  # atol 1e-4
    scores = np.array([0.30, 0.10, 0.25, 0.25, 0.05, 0.05], np.float32)  # two equal scores at the 2nd place
    same = compare_selection(3, np.array([0, 2]), np.array([0, 2]), scores, scores, tolerance)
    assert same.status == "equal" and same.ok
    tie = compare_selection(3, np.array([0, 2]), np.array([0, 3]), scores, scores + 2e-5, tolerance)
    assert tie.status == "tie" and tie.ok and tie.detail.startswith("tie at layer 3: 1 token(s) swapped")
    near = scores.copy()
    near[3] = 0.25 - 5e-5  # within the tolerance of the boundary: still a tie
    assert compare_selection(3, np.array([0, 2]), np.array([0, 3]), near, near, tolerance).status == "tie"
    far = compare_selection(3, np.array([0, 2]), np.array([0, 1]), scores, scores, tolerance)
    assert far.status == "mismatch" and not far.ok and "0.15 from the boundary" in far.detail
    drift = scores.copy()
    drift[4] += 1e-3  # the scores themselves disagree: never a tie
    assert "ranking scores differ" in compare_selection(3, np.array([0, 2]), np.array([0, 3]), scores, drift,
                                                        tolerance).detail
    assert compare_selection(3, np.array([0, 2]), np.array([0, 2, 3]), scores, scores, tolerance).status == "mismatch"


def test_verify_checks_token_selection_of_a_pruned_bundle(pruned_bundles, tmp_path, fake_trt, monkeypatch):
    from mllm_deploy.trt import verify as trt_verify

    monkeypatch.setattr(trt_verify, "check_kernels",
                        lambda plugins, log: trt_verify.Check("plugin kernels", "skip", "no plugins"))
    bundle = load_bundle(shutil.copytree(pruned_bundles("gqa56", "fitprune", "plugin"), tmp_path / "b"))
    assert any(o["name"].startswith("route.") for o in bundle.manifest["graphs"]["prefill"]["outputs"])
    build, _ = _build(bundle, fake_trt)
    payload = trt_verify.verify(bundle, build, precision="float32", steps=3, repeats=1, log=lambda m: None)
    selection = next(c for c in payload["checks"] if c["name"] == "token selection")
    assert selection["status"] == "pass" and selection["detail"].startswith("same tokens kept at layers")
    assert payload["ok"]


@pytest.mark.parametrize("kind", ["fastv-native", "fitprune-native", "mod-native"])
def test_fp16_builds_keep_ranking_layers_in_fp32(kind, tiny_bundles, pruned_bundles, mod_bundles, tmp_path, fake_trt):
    """--fp16 lets TensorRT lower any layer of a float32 network: the ranking layers are pinned to FP32 (and the
    constraint flag set, without which TensorRT ignores them); the layers that only move activations are not."""
    import onnx

    bundle = _bundle(kind, tiny_bundles, pruned_bundles, mod_bundles, tmp_path)
    result, _ = _build(bundle, fake_trt, fp16=True)
    plan = json.loads((bundle.path / "engines" / "prefill.plan").read_bytes())
    assert plan["fp16"]
    nodes = [n for n in onnx.load(str(bundle.graph_path("prefill")), load_external_data=False).graph.node]
    topk = {n.name for n in nodes if n.op_type == "TopK"}
    from fake_tensorrt import _inferred_types

    types = _inferred_types(onnx.load(str(bundle.graph_path("prefill")), load_external_data=False))
    scores = {n.name for n in nodes if ("/VisualScore/" in n.name or "/router/" in n.name)
              and any(types.get(out) in (1, 10) for out in n.output)}  # every score layer with a float output
    assert topk and topk <= set(plan["fp32_layers"]) and scores <= set(plan["fp32_layers"])
    assert not any("/mlp/" in name or name.endswith("/attn/qkv_proj/MatMul") for name in plan["fp32_layers"])
    index_math = {n.name for n in nodes if n.op_type in ("Range", "Squeeze") and "/TokenSelect/" in n.name}
    assert index_math and not index_math & set(plan["fp32_layers"])  # integer layers have no float precision
    plain, _ = _build(bundle, fake_trt, fp16=False, force=True)
    assert json.loads((bundle.path / "engines" / "prefill.plan").read_bytes())["fp32_layers"] == []
