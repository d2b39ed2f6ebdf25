"""build-mllm and the TensorRT backend: every pure function on real exported bundles, and the
one-line refusals where TensorRT is absent. The TensorRT paths themselves run only where it is
installed (the last tests; skipped here)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image, run_cli
from mllm_deploy.trt.engines import (ENGINES_SCHEMA, INDEX_FILE, TRT_DTYPES, check_fresh, engine_key, make_index,
                                      map_tensors, read_index, stale_fields)
from mllm_deploy.core.errors import BundleError, MllmError
from mllm_deploy.trt.build import (BuildOptions, check_plugins, planned_keys, plugin_graphs, precision_plan,
                                          up_to_date)
from mllm_deploy.trt.profiles import (PRESETS, all_profiles, all_shape_values, dim_ranges, graph_profile,
                                             profile_settings)
from mllm_deploy.runtime.bundle import load_bundle
from mllm_deploy.trt.plan import changed_rows, choose_profile, kv_lengths, plan_kv, plan_kv_from_profile

MACHINE = dict(tensorrt="10.3.0.30", gpu="Orin", compute_capability="8.7")


@pytest.fixture(scope="module")
def bundles(tiny_model_dirs, tiny_bundles, tmp_path_factory) -> dict[str, Path]:
    """Dense, FastV (plugin routing: VisualScore + TokenSelect) and PyramidDrop (native, three KV lengths)."""
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.calib.static_methods import FastVOptions, PDropOptions
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("trt-bundles")
    out = {"dense": tiny_bundles["gqa56"]}
    for name, options, routing in (("fastv-plugin", FastVOptions(k=2, r=0.5), "plugin"),
                                   ("pdrop-native", PDropOptions(layers=[1, 2], ratio=0.5),
                                    "native")):
        recipe = calibrate(str(tiny_model_dirs["gqa56"]), options, log=lambda m: None)
        path = root / f"{name}.json"
        path.write_text(recipe.to_json())
        out[name] = export_bundle(str(tiny_model_dirs["gqa56"]), root / name,
                                  ExportOptions(recipe=str(path), routing=routing, verify=False), log=lambda m: None)
    return out


def manifest(bundles, name) -> dict:
    return load_bundle(bundles[name]).manifest


# ---- profiles -------------------------------------------------------------------------------------------
def test_profiles_of_a_dense_bundle(bundles):
    m = manifest(bundles, "dense")
    visual, layers = m["model"]["visual_tokens"], m["model"]["text"]["num_layers"]
    settings = profile_settings(m, PRESETS["jetson-orin-nano"])
    assert settings.min_prompt_tokens == visual + 1
    assert settings.max_prompt_tokens == min(visual + 512, m["model"]["text"]["max_position_embeddings"] - 256)
    profiles = all_profiles(m, settings)
    assert profiles["vision"] == {}  # static
    # image_start is a shape tensor: values from "image first" to "all text before the image"
    latest = settings.max_prompt_tokens - visual
    assert all_shape_values(m, settings) == {"vision": {}, "prefill": {"image_start": ((0,), (0,), (latest,))},
                                             "decode": {}}
    typical = profile_settings(m, PRESETS["jetson-orin-nano"], opt_image_start=5)
    assert all_shape_values(m, typical)["prefill"]["image_start"][1] == (5,)
    assert profiles["prefill"] == {"input_ids": ((1, settings.min_prompt_tokens), (1, settings.opt_prompt_tokens),
                                                 (1, settings.max_prompt_tokens))}
    decode = profiles["decode"]
    assert set(decode) == {f"past.{l}.{p}" for l in range(layers) for p in ("key", "value")}  # input_ids is [1, 1]
    low, opt, high = decode["past.0.key"]
    heads, dim = m["model"]["text"]["num_kv_heads"], m["model"]["text"]["head_dim"]
    assert low == (1, heads, visual + 2, dim)  # the image, one text token, one decode slot
    assert high == (1, heads, settings.max_prompt_tokens + settings.max_new_tokens, dim)
    assert low[2] <= opt[2] <= high[2]


def test_pruned_layers_get_their_own_kv_ranges(bundles):
    m = manifest(bundles, "pdrop-native")
    kept = m["recipe"]["visual_tokens"]
    assert len(set(kept)) == 3  # 64 -> 32 -> 16: three different KV lengths
    settings = profile_settings(m, PRESETS["jetson-agx-orin"], max_prompt_tokens=m["model"]["visual_tokens"] + 100,
                                max_new_tokens=20)
    ranges = dim_ranges(m, settings)
    visual = m["model"]["visual_tokens"]
    for layer, k in enumerate(kept):
        low, opt, high = ranges[f"past_len_{layer}"]
        assert low == 1 + k + 1 and high == 100 + k + 20
        assert low <= opt <= high
    profile = graph_profile(m, "decode", settings)
    assert profile["past.3.value"][2][2] == 100 + kept[3] + 20 < profile["past.0.key"][2][2] == 100 + visual + 20


def test_profile_settings_clamp_to_the_context_and_refuse_what_cannot_fit(bundles):
    m = manifest(bundles, "dense")
    context = m["model"]["text"]["max_position_embeddings"]
    settings = profile_settings(m, PRESETS["datacenter"], max_prompt_tokens=10**6, max_new_tokens=30)
    assert settings.max_prompt_tokens == context - 30
    with pytest.raises(MllmError, match="no room for a prompt"):
        profile_settings(m, PRESETS["datacenter"], max_new_tokens=context)
    with pytest.raises(MllmError, match="at least 1"):
        profile_settings(m, PRESETS["datacenter"], max_new_tokens=0)


def test_unknown_symbolic_dim_is_refused(bundles):
    m = json.loads(json.dumps(manifest(bundles, "dense")))
    m["graphs"]["prefill"]["inputs"][0]["shape"] = [1, "batch_len"]
    with pytest.raises(BundleError, match="batch_len"):
        graph_profile(m, "prefill", profile_settings(m, PRESETS["datacenter"]))


# ---- precision, plugins, cache keys ------------------------------------------------------------------------
def test_precision_plan():
    assert precision_plan("float16", 10, False).to_dict() == {"strongly_typed": True, "fp16_flag": False,
                                                              "precision": "float16"}
    assert precision_plan("float32", 10, True).fp16_flag and not precision_plan("float32", 10, True).strongly_typed
    assert precision_plan("float32", 11, False).name == "float32"
    with pytest.raises(MllmError, match="strongly typed.*--dtype float16"):
        precision_plan("float32", 11, True)
    assert precision_plan("float16", 11, True).name == "float16"  # already FP16: nothing to lower
    # quantized weights build strongly typed; --fp16's weakly typed network is refused rather than built wrong
    assert precision_plan("float32", 10, False, quantized=True).strongly_typed
    assert precision_plan("float16", 10, True, quantized=True).strongly_typed
    with pytest.raises(MllmError, match="quantized weights"):
        precision_plan("float32", 10, True, quantized=True)


def test_plugin_graphs_need_the_library(bundles, tmp_path):
    plugin_manifest = manifest(bundles, "fastv-plugin")
    assert plugin_graphs(plugin_manifest) == {"prefill": ["TokenSelect", "VisualScore"]}
    assert plugin_graphs(manifest(bundles, "pdrop-native")) == {}
    with pytest.raises(MllmError, match="--plugins"):
        check_plugins(plugin_manifest, None)
    with pytest.raises(MllmError, match="not found"):
        check_plugins(plugin_manifest, tmp_path / "missing.so")
    library = tmp_path / "lib.so"
    library.write_bytes(b"x")
    assert check_plugins(plugin_manifest, library) == library
    assert check_plugins(manifest(bundles, "pdrop-native"), library) is None  # not needed: not loaded


def test_cache_key_is_stable_and_changes_with_each_input(bundles):
    m = manifest(bundles, "fastv-plugin")
    options = BuildOptions(preset="jetson-orin-nano")
    keys, extra = planned_keys(m, options, **MACHINE, plugins_sha256="ab" * 32)
    again, _ = planned_keys(json.loads(json.dumps(m)), options, **MACHINE, plugins_sha256="ab" * 32)
    assert [k.digest for k in keys] == [k.digest for k in again]
    by_graph = {k.graph: k for k in keys}
    assert by_graph["prefill"].plugins_sha256 == "ab" * 32 and by_graph["decode"].plugins_sha256 is None
    assert by_graph["prefill"].graph_sha256 == m["files"]["prefill.onnx"]
    assert extra["precision"]["precision"] == "float32"
    base = tuple(k.digest for k in keys)

    def digest(manifest_=m, options_=options, **machine):  # every graph's digest: a change shows in one of them
        ks, _ = planned_keys(manifest_, options_, **{**MACHINE, **machine}, plugins_sha256="ab" * 32)
        return tuple(k.digest for k in ks)

    changed_graph = json.loads(json.dumps(m))
    changed_graph["files"]["prefill.onnx"] = "0" * 64
    changed_recipe = json.loads(json.dumps(m))
    changed_recipe["recipe"]["visual_tokens"][-1] -= 1
    variants = [digest(changed_graph), digest(changed_recipe), digest(tensorrt="10.16.0.1"), digest(gpu="Thor"),
                digest(compute_capability="11.0"), digest(options_=replace(options, max_new_tokens=64)),
                digest(options_=replace(options, preset="jetson-thor"))]
    assert base not in variants and len(set(variants)) == len(variants)
    keys_other_plugin, _ = planned_keys(m, options, **MACHINE, plugins_sha256="cd" * 32)
    assert [k.digest for k in keys_other_plugin] != list(base)
    # a longer decode range changes the decode engine only: the prefill range stays within the context
    longer = digest(options_=replace(options, max_new_tokens=64))
    assert [a == b for a, b in zip(longer, base)] == [True, True, False]


def test_stale_engines_are_refused_with_the_field_named(bundles):
    m = manifest(bundles, "dense")
    key = engine_key(m, "decode", **MACHINE, settings={"precision": "float32"})
    index = read_index(json.loads(json.dumps(make_index([key]))))
    assert check_fresh(index, "decode", m, **MACHINE)["file"] == "decode.plan"
    with pytest.raises(BundleError, match=r"stale \(tensorrt was '10.3.0.30', now '10.16.0.1'\)"):
        check_fresh(index, "decode", m, **{**MACHINE, "tensorrt": "10.16.0.1"})
    with pytest.raises(BundleError, match="gpu was 'Orin'"):
        check_fresh(index, "decode", m, **{**MACHINE, "gpu": "NVIDIA H100"})
    with pytest.raises(BundleError, match="compute_capability"):
        check_fresh(index, "decode", m, **{**MACHINE, "compute_capability": "9.0"})
    reexported = json.loads(json.dumps(m))
    reexported["files"]["weights.bin"] = "f" * 64
    with pytest.raises(BundleError, match="weights_sha256"):
        check_fresh(index, "decode", reexported, **MACHINE)
    with pytest.raises(BundleError, match="no TensorRT engine for the 'vision' graph"):
        check_fresh(index, "vision", m, **MACHINE)
    plugin_key = engine_key(m, "prefill", **MACHINE, plugins_sha256="ab" * 32)
    with pytest.raises(BundleError, match="another plugin library"):
        check_fresh(make_index([plugin_key]), "prefill", m, **MACHINE, plugins_sha256="cd" * 32)
    assert stale_fields(key.to_dict(), {"tensorrt": None, "gpu": "Orin"}) == []  # None: not checked
    for bad in ({}, {"schema": ENGINES_SCHEMA, "engines": []}, {"schema": ENGINES_SCHEMA, "engines": {"x": {}}}):
        with pytest.raises(BundleError, match="run build-mllm again"):
            read_index(bad)


def test_up_to_date_compares_digests_and_files(bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["dense"], bundle)
    m = load_bundle(bundle).manifest
    keys, _ = planned_keys(m, BuildOptions(), **MACHINE, plugins_sha256=None)
    assert not up_to_date(bundle, keys)
    (bundle / "engines").mkdir()
    (bundle / "engines" / INDEX_FILE).write_text(json.dumps(make_index(keys)))
    assert not up_to_date(bundle, keys)  # plans missing
    for key in keys:
        (bundle / "engines" / f"{key.graph}.plan").write_bytes(b"plan")
    assert up_to_date(bundle, keys)
    newer, _ = planned_keys(m, BuildOptions(), **{**MACHINE, "tensorrt": "10.4.0"}, plugins_sha256=None)
    assert not up_to_date(bundle, newer)


# ---- manifest <-> engine tensor names ------------------------------------------------------------------------
def _engine_tensors(io, dtype_names=None, drop=(), extra=()):
    inverse = {v: k for k, v in TRT_DTYPES.items()}
    tensors = [(e["name"], True, inverse[e["dtype"]]) for e in io["inputs"] if e["name"] not in drop]
    tensors += [(e["name"], False, inverse[e["dtype"]]) for e in io["outputs"] if e["name"] not in drop]
    return [(n, i, (dtype_names or {}).get(n, d)) for n, i, d in tensors] + list(extra)


@pytest.mark.parametrize("name", ["dense", "fastv-plugin", "pdrop-native"])
def test_engine_tensor_mapping(bundles, name):
    bundle = load_bundle(bundles[name])
    for graph in ("vision", "prefill", "decode"):
        io = bundle.graph_io(graph)
        mapped = map_tensors(io, _engine_tensors(io), graph)
        assert [b.name for b in mapped.inputs] == [e["name"] for e in io["inputs"]]
        assert [b.name for b in mapped.outputs] == [e["name"] for e in io["outputs"]]
        assert mapped.unused_inputs == ()
    io = bundle.graph_io("decode")
    dropped = map_tensors(io, _engine_tensors(io, drop=("position_ids",)), "decode")
    assert dropped.unused_inputs == ("position_ids",)  # an input TensorRT pruned: not fed, not an error
    with pytest.raises(BundleError, match="output logits is missing"):
        map_tensors(io, _engine_tensors(io, drop=("logits",)), "decode")
    with pytest.raises(BundleError, match="past.0.key is float16 in the engine"):
        map_tensors(io, _engine_tensors(io, {"past.0.key": "HALF"}), "decode")
    with pytest.raises(BundleError, match="stray is not in the manifest"):
        map_tensors(io, _engine_tensors(io, extra=[("stray", False, "FLOAT")]), "decode")


# ---- KV planning and profile choice -----------------------------------------------------------------------
def test_kv_plan_follows_the_recipe(bundles):
    dense, pruned = manifest(bundles, "dense"), manifest(bundles, "pdrop-native")
    visual = dense["model"]["visual_tokens"]
    prompt, new = visual + 30, 16
    assert kv_lengths(dense, prompt) == [prompt] * dense["model"]["text"]["num_layers"]
    assert kv_lengths(pruned, prompt) == [30 + k for k in pruned["recipe"]["visual_tokens"]]
    assert kv_lengths(pruned, prompt) == load_bundle(bundles["pdrop-native"]).kv_lengths(prompt)  # runtime's formula
    plan_dense, plan_pruned = plan_kv(dense, prompt, new), plan_kv(pruned, prompt, new)
    text = pruned["model"]["text"]
    per_slot = 2 * text["num_kv_heads"] * text["head_dim"] * 4  # key + value, float32
    assert [l.bytes for l in plan_pruned.layers] == [(30 + k + new) * per_slot for k in pruned["recipe"]["visual_tokens"]]
    assert plan_pruned.total_bytes < plan_dense.total_bytes
    assert plan_pruned.layer_shape(3) == (1, text["num_kv_heads"], 30 + pruned["recipe"]["visual_tokens"][3] + new,
                                          text["head_dim"])
    half = json.loads(json.dumps(pruned))
    half["dtype"] = "float16"
    assert plan_kv(half, prompt, new).total_bytes * 2 == plan_pruned.total_bytes
    with pytest.raises(MllmError, match="no text"):
        plan_kv(dense, visual, new)


def test_kv_plan_from_the_decode_profile_matches_the_largest_generation(bundles):
    m = manifest(bundles, "pdrop-native")
    settings = profile_settings(m, PRESETS["jetson-orin-nano"])
    decode = graph_profile(m, "decode", settings)
    from_profile = plan_kv_from_profile(m, {name: shapes[2] for name, shapes in decode.items()})
    assert from_profile == plan_kv(m, settings.max_prompt_tokens, settings.max_new_tokens)
    with pytest.raises(MllmError, match="past.0.key"):
        plan_kv_from_profile(m, {})


def test_choose_profile_and_its_refusal():
    profiles = [{"input_ids": ((1, 10), (1, 20), (1, 30))}, {"input_ids": ((1, 31), (1, 40), (1, 90))}]
    assert choose_profile(profiles, {"input_ids": (1, 10)}) == 0
    assert choose_profile(profiles, {"input_ids": (1, 90), "image_start": (1,)}) == 1
    with pytest.raises(MllmError, match=r"input_ids \[1, 91\].*rebuild"):
        choose_profile(profiles, {"input_ids": (1, 91)})
    assert choose_profile([{}], {"pixel_values": (1, 3, 8, 8)}) == 0  # static engine


def test_changed_rows_copies_only_new_slots():
    assert changed_rows(0, 40, same_buffer=False) == (0, 40)
    assert changed_rows(40, 41, same_buffer=True) == (40, 41)
    assert changed_rows(41, 41, same_buffer=True) == (41, 41)
    assert changed_rows(41, 12, same_buffer=True) == (0, 12)  # shrank: a new generation in the same buffer


# ---- the commands without TensorRT -----------------------------------------------------------------------------
NO_TRT = {"MLLM_DEPLOY_NO_TENSORRT": "1"}


def test_build_mllm_without_tensorrt_is_one_line_and_writes_nothing(bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["fastv-plugin"], bundle)
    proc = run_cli("build-mllm", str(bundle), "--preset", "jetson-orin-nano", env=NO_TRT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("build-mllm: error: TensorRT is not installed") and proc.stderr.count("\n") == 1
    assert not (bundle / "engines").exists() and not list(tmp_path.glob(".b*"))


@pytest.mark.parametrize("tool", ["run-mllm", "bench-mllm", "eval-mllm"])
def test_backend_tensorrt_without_tensorrt_is_one_line(bundles, tmp_path, tool):
    image = make_image(tmp_path / "x.png")
    args = {"run-mllm": [str(bundles["dense"]), "--image", str(image), "--prompt", "hi", "--backend", "tensorrt"],
            "bench-mllm": [str(bundles["dense"]), "--backend", "tensorrt", "--repeats", "1", "--new-tokens", "2"],
            "eval-mllm": [str(bundles["dense"]), "--dataset", "shapes-vqa:2", "--backend", "tensorrt"]}[tool]
    proc = run_cli(tool, *args, env=NO_TRT)
    assert proc.returncode == 1, proc.stdout
    assert "TensorRT is not installed" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


@pytest.mark.slow
def test_check_trt_passes_plugin_routed_bundles_with_plugins_recognised(bundles):
    for version in ("10.3", "10.16", "11.4"):
        proc = run_cli("check-trt-mllm", str(bundles["fastv-plugin"]), "--trt", version, "--json")
        assert proc.returncode == 0, proc.stdout
        report = json.loads(proc.stdout)
        assert report["ok"] and report["plugins"] == ["TokenSelect", "VisualScore"]


# ---- on a machine with TensorRT -----------------------------------------------------------------------------
def _tensorrt_or_skip():
    from mllm_deploy.core.errors import DependencyError
    from mllm_deploy.trt.env import import_tensorrt, query_gpu

    try:
        import_tensorrt()
        query_gpu()
    except DependencyError as exc:
        pytest.skip(f"needs TensorRT and a GPU: {exc}")


@pytest.mark.gpu
def test_build_verify_and_run_on_tensorrt(bundles, tmp_path):
    _tensorrt_or_skip()
    bundle = tmp_path / "dense"
    shutil.copytree(bundles["dense"], bundle)
    proc = run_cli("build-mllm", str(bundle), "--preset", "jetson-orin-nano", "--verify", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((bundle / "engines" / "verify.json").read_text())["ok"]
    again = run_cli("build-mllm", str(bundle), "--preset", "jetson-orin-nano")
    assert again.returncode == 0 and "kept in" in again.stdout
    image = make_image(tmp_path / "x.png")
    answers = [json.loads(run_cli("run-mllm", str(bundle), "--image", str(image), "--prompt", "hi", "--json",
                                  "--backend", backend, "--max-new-tokens", "4").stdout)["tokens"]
               for backend in ("onnxruntime", "tensorrt")]
    assert answers[0] == answers[1]
    np.testing.assert_equal(len(answers[0]), 4)


# ---- plugin fields of the exported routing nodes ------------------------------------------------------------
def test_every_routing_node_of_a_plugin_bundle_becomes_creator_fields_and_back(bundles):
    import onnx

    from mllm_deploy.plugins.schemas import node_attributes
    from mllm_deploy.plugins.trt_fields import FIELD_TYPES, decode_fields, encode_fields, plugin_key

    model = onnx.load(str(Path(bundles["fastv-plugin"]) / "prefill.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "mllm_deploy"]
    assert {n.op_type for n in nodes} == {"TokenSelect", "VisualScore"}
    for node in nodes:
        attrs = node_attributes(node)
        assert plugin_key(node.op_type, attrs) == (node.op_type, "1", "mllm_deploy")
        fields = encode_fields(node.op_type, attrs)
        assert [(f.name, f.type) for f in fields] == list(FIELD_TYPES[node.op_type])
        decoded = decode_fields(node.op_type, fields)
        for name, value in decoded.items():
            want = attrs[name]
            assert value == (float(np.float32(want)) if isinstance(want, float) else want), (node.name, name)
