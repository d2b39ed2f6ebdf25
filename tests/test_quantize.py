"""Weight-only quantized bundles (export-mllm --quantize int4|int8): the stored form, what ONNX Runtime makes of it,
verification that catches a broken layout, every routing x a pruning method generating like the quantized model,
TensorRT's rules for the form, and one-line errors for bad flags."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import make_image, run_cli

NEW_TOKENS = 8


def _scheme(weights="int4", block=32, **kw):
    from mllm_deploy.export.quantize import QuantScheme

    return QuantScheme(weights=weights, block_size=block, **kw)


# ---- the stored form ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_round_trip_is_symmetric_rtn_with_positive_scales(weights):
    from mllm_deploy.export.quantize import dequantize, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    w[:32, 5] = 0.0  # an all-zero block (int4) keeps a positive scale
    scheme = _scheme(weights)
    stored, scale = quantize(w, scheme)
    assert np.all(scale > 0)
    restored = dequantize(stored, scale, w.shape, scheme)
    per_element = np.repeat(scale, 32, axis=0) if weights == "int4" else np.broadcast_to(scale, w.shape)
    assert np.all(np.abs(restored - w) <= per_element / 2 + 1e-6)  # round to nearest: at most half a step
    assert np.all(restored[:32, 5] == 0)
    if weights == "int4":
        assert stored.dtype == np.uint8 and stored.size == w.size // 2
        levels = np.rint(restored / per_element)
        assert levels.min() >= -8 and levels.max() <= 7
        assert np.array_equal(np.abs(w).max(0) > 0, np.abs(restored).max(0) > 0)
    else:
        assert stored.dtype == np.int8 and stored.shape == w.shape and np.abs(stored).max() == 127


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_onnx_runtime_reads_the_bytes_as_numpy_dequantize_does_and_fuses_them(weights, tmp_path):
    """The packing order (low nibble first, row-major [K, N]) and the DequantizeLinear attributes as ONNX Runtime
    reads them; and the CPU provider turns DequantizeLinear + MatMul into MatMulNBits (the fast decode path)."""
    import onnxruntime as ort

    from mllm_deploy.export import blocks
    from mllm_deploy.export.graph import GraphBuilder, WeightStore
    from mllm_deploy.export.quantize import dequantize, quantize

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    scheme = _scheme(weights)
    store = WeightStore(tmp_path / "weights.bin")
    g = GraphBuilder("q", 21, store, quant=scheme)
    x = g.input("x", TensorProto.FLOAT, ["T", 64])
    y = blocks.linear(g, x, {"text.layers.0.mlp.down.weight": w}, "text.layers.0.mlp.down", "down")
    g.output(y, "y", TensorProto.FLOAT, ["T", 40])
    store.close()
    onnx.save(g.make_model(), tmp_path / "q.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = rng.standard_normal((3, 64)).astype(np.float32)
    expected = inputs @ dequantize(*quantize(w, scheme), w.shape, scheme)
    got = session.run(None, {"x": inputs})[0]
    # MatMulNBits rounds the activations to int8 inside the product (accuracy level 4)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx", load_external_data=False).graph.node]
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops


def test_the_scale_follows_the_bundle_dtype():
    from mllm_deploy.export.quantize import quantize

    w = np.full((32, 4), 1e-9, np.float32)  # a scale below float16's range stays positive
    _, scale = quantize(w, _scheme(scale_dtype="float16"))
    assert scale.dtype == np.float16 and np.all(scale > 0)


# ---- bundles ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant_bundles(tiny_model_dirs, recipes, tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("quant")
    cache = {}

    def get(config: str, method: str, routing: str, weights: str, **extra):
        key = (config, method, routing, weights, *sorted(extra.items()))
        if key not in cache:
            recipe = None if method == "dense" else str(recipes[config, method])
            block = 32 if weights == "int4" else None
            cache[key] = export_bundle(str(tiny_model_dirs[config]), root / "-".join(map(str, key)),
                                       ExportOptions(recipe=recipe, routing=routing, quantize=weights,
                                                     block_size=block, **extra), log=lambda m: None)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs):
    from transformers import LlavaForConditionalGeneration

    return {name: LlavaForConditionalGeneration.from_pretrained(d).eval() for name, d in tiny_model_dirs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("method, routing", [("dense", "native"), ("fastv", "native"), ("fastv", "plugin"),
                                             ("pdrop", "native"), ("pdrop", "plugin")])  # dense has no routing ops
def test_quantized_bundle_generates_like_the_quantized_reference(method, routing, weights, quant_bundles, recipes,
                                                                 hf_models, tmp_path):
    """Exported (and so verified), then generation through the runtime equals the PyTorch reference of the recipe
    on the fake-quantized weights, token for token, on both graph sets."""
    import copy

    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.export.quantize import QuantScheme, fake_quantize_model
    from mllm_deploy.formats.recipe import Recipe
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = quant_bundles("gqa56", method, routing, weights)
    manifest = json.loads((bundle / "manifest.json").read_text())
    scheme = QuantScheme.from_dict(manifest["quantization"])
    assert (scheme.weights, manifest["graphs"]["prefill"]["opset"]) == (weights, 21)
    model = copy.deepcopy(hf_models["gqa56"])
    assert fake_quantize_model(model, scheme) == 7 * 4  # q, k, v, o, gate, up, down of the four layers
    recipe = Recipe.from_dict(manifest["recipe"])
    assert recipe.method_name == method
    image = make_image(tmp_path / "q.png", size=(77, 91), seed=3)
    for graphs in ("portable", "onnxruntime"):
        # float activations: the quantized model's own arithmetic (the default int8 activations of MatMulNBits
        # drift from it on random weights; eval-mllm measures them on shapes-vqa)
        with Pipeline.load(bundle, graphs=graphs, quant_activations="float") as pipe:
            ids = pipe.input_ids(prompt="Describe the picture in detail.")
            pixels = pipe.pixel_values(image)
            ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
        theirs = RecipeReference(model, recipe).generate(torch.from_numpy(ids), torch.from_numpy(pixels), NEW_TOKENS)
        assert ours == theirs, graphs


def test_quantized_bundle_is_smaller_and_records_its_scheme(quant_bundles, tiny_bundles):
    bundle = quant_bundles("gqa56", "dense", "native", "int4")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["weights"] == "int4" and manifest["quantization"]["block_size"] == 32
    entries = {e["name"]: e for e in manifest["graphs"]["decode"]["external_initializers"]}
    q = entries["text.layers.0.mlp.down.weight.q4"]
    assert q["dtype"] == "int4" and q["length"] == q["shape"][0] * q["shape"][1] // 2
    assert "text.layers.0.mlp.down.weight" not in entries  # no float copy beside the integers
    # the portable and the onnxruntime graphs read the same bytes
    ort_entries = {e["name"]: e for e in manifest["graphs"]["decode_ort"]["external_initializers"]}
    assert ort_entries["text.layers.0.mlp.down.weight.q4"]["offset"] == q["offset"]
    float_size = (tiny_bundles["gqa56"] / "weights.bin").stat().st_size
    assert (bundle / "weights.bin").stat().st_size < 0.75 * float_size  # the embeddings and vision stay float


def test_a_broken_scale_layout_fails_verification_and_writes_nothing(tiny_model_dirs, tmp_path, monkeypatch):
    """Scales written in the wrong order (what a wrong layout looks like) against a reference quantized correctly."""
    from mllm_deploy.core.errors import VerificationError
    from mllm_deploy.export import graph
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    write = graph.WeightStore.tensor

    def reversed_scales(self, name, array, data_type=None, shape=None):
        if name.endswith(".scale"):
            array = np.ascontiguousarray(np.asarray(array)[::-1])
        return write(self, name, array, data_type, shape)

    for weights, dtype in (("int4", "float32"), ("int8", "float32"), ("int4", "float16")):
        options = ExportOptions(quantize=weights, block_size=32 if weights == "int4" else None, dtype=dtype)
        target = tmp_path / f"{weights}-{dtype}"
        with monkeypatch.context() as patch:
            patch.setattr(graph.WeightStore, "tensor", reversed_scales)
            with pytest.raises(VerificationError, match="DISAGREE with the int"):
                export_bundle(str(tiny_model_dirs["gqa56"]), target, options, log=lambda m: None)
        assert not target.exists() and not list(tmp_path.glob(f".{target.name}*"))
        # and the same export with the scales as written passes
        export_bundle(str(tiny_model_dirs["gqa56"]), target, options, log=lambda m: None)


def test_verification_line_reports_the_float_model_comparison(tiny_model_dirs, tmp_path):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    lines = []
    export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b", ExportOptions(quantize="int8"), log=lines.append)
    verify = [line for line in lines if line.startswith("verify")]
    assert len(verify) == 2 and all("agree with the int8-rounded model" in line for line in verify)
    assert all("against the float model the first token is" in line and "KL" in line for line in verify)


# ---- TensorRT's rules ------------------------------------------------------------------------------------------
def _dq_model(data_type: int, block: int | None, opset: int = 21, zero_point: bool = False) -> onnx.ModelProto:
    k, n = 128, 8
    if data_type == TensorProto.INT4:
        q = helper.make_tensor("q", TensorProto.INT4, [k, n], np.zeros(k * n // 2, np.uint8).tobytes(), raw=True)
    else:
        q = numpy_helper.from_array(np.zeros((k, n), np.int8), "q")
    scale_shape = (k // block, n) if block else (n,)
    inits = [q, numpy_helper.from_array(np.ones(scale_shape, np.float32), "s")]
    inputs = ["q", "s"]
    if zero_point:
        inits.append(numpy_helper.from_array(np.ones(scale_shape, np.int8), "z"))
        inputs.append("z")
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", **attrs),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("version", ["10.16", "11.4"])
def test_check_trt_accepts_int4_blocks_of_64_and_128_and_int8_channels(version):
    from mllm_deploy.trt.check import check_graph

    assert check_graph(_dq_model(TensorProto.INT4, 64), version) == []
    assert check_graph(_dq_model(TensorProto.INT4, 128), version) == []
    assert check_graph(_dq_model(TensorProto.INT8, None), version) == []
    problems = [f.line() for f in check_graph(_dq_model(TensorProto.INT4, 32), version)]
    assert len(problems) == 1 and "blocks of 64 or 128" in problems[0]
    problems = [f.line() for f in check_graph(_dq_model(TensorProto.INT8, None, zero_point=True), version)]
    assert len(problems) == 1 and "zero point" in problems[0]


def test_check_trt_10_3_explains_that_int4_needs_a_newer_tensorrt():
    from mllm_deploy.trt.check import check_graph

    problems = [f.line() for f in check_graph(_dq_model(TensorProto.INT4, 64), "10.3")]
    assert len(problems) == 1
    assert "opset 21" in problems[0] and "10.16 or later" in problems[0] and "--quantize int8 --opset 20" in problems[0]
    assert check_graph(_dq_model(TensorProto.INT8, None, opset=20), "10.3") == []


def test_check_trt_on_a_quantized_bundle(tiny_model_dirs, tmp_path):
    """gqa56's widths (128, 256) take TensorRT's 64-blocks: the exported bundle passes 10.16 and 11.4; int8 at opset
    20 passes 10.3."""
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.trt.check import check_bundle

    b64 = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b64",
                        ExportOptions(quantize="int4", block_size=64, verify=False), log=lambda m: None)
    for version in ("10.16", "11.4"):
        assert all(not findings for findings in check_bundle(b64, version).values())
    assert any(findings for findings in check_bundle(b64, "10.3").values())
    b8 = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b8",
                       ExportOptions(quantize="int8", opset=20, verify=False), log=lambda m: None)
    assert all(not findings for findings in check_bundle(b8, "10.3").values())


# ---- flags -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8", "--block-size", "64"], "--block-size applies to int4 only"),
    (["--quantize", "int4", "--quant-method", "gptq"], "--quant-method gptq is not available yet"),
    (["--quantize", "int4", "--quant-method", "nope"], "--quant-method must be one of"),
    (["--quantize", "int4", "--opset", "17"], "--quantize int4 needs --opset 21"),
    (["--quantize-lm-head"], "need --quantize"),
    (["--quantize", "int4", "--block-size", "128"], "--block-size 128 does not divide the model's"),
])
def test_bad_quantization_flags_are_one_line(args, message, tiny_model_dirs, tmp_path):
    out = tmp_path / "never"
    result = run_cli("export-mllm", "--model", str(tiny_model_dirs["gqa70"]), "-o", str(out), *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_a_tampered_quantization_record_is_refused(bundle_copy):
    from mllm_deploy.core.errors import BundleError
    from mllm_deploy.formats.manifest import check_manifest

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["quantization"] = {"weights": "int3", "bits": 3}
    with pytest.raises(BundleError, match="quantization needs weights int4 or int8"):
        check_manifest(manifest)


def test_the_memory_estimate_counts_quantized_weights_per_session(quant_bundles, tiny_bundles):
    """The integers are resident as MatMulNBits buffers of each text session, not as one shared mapping, and such
    sessions always pre-pack: the estimate takes QUANTIZED_RESIDENT times their bytes and QUANTIZED_FLOAT_COPIES
    times the float rest, and stays below the pre-packed float bundle's."""
    from mllm_deploy.core.memory import QUANTIZED_FLOAT_COPIES, QUANTIZED_RESIDENT
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = quant_bundles("gqa56", "dense", "native", "int4")
    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = {e["name"]: e for g in manifest["graphs"].values() for e in g["external_initializers"]}
    quantized = sum(e["length"] for n, e in entries.items() if n.endswith((".q4", ".scale")))
    pipe = Pipeline.load(bundle, weights="shared")
    assert pipe.bundle.quantized_bytes() == quantized > 0
    stored = pipe.bundle.weights_bytes()  # the files the sessions load: graphs and weights.bin
    estimate = pipe.memory_estimate(100, 4)
    assert estimate.weights == int(QUANTIZED_FLOAT_COPIES * (stored - quantized) + QUANTIZED_RESIDENT * quantized)
    assert pipe.generator.runners["decode"].pack  # shared or not, MatMulNBits gets its packed buffers
    with Pipeline.load(tiny_bundles["gqa56"], weights="packed") as dense:  # as fast as a float bundle runs
        assert estimate.weights < dense.memory_estimate(100, 4).weights
    pipe.close()


def test_quantize_vision_and_lm_head_cover_those_layers_too(tiny_model_dirs, tmp_path):
    """--quantize-vision puts the CLIP tower's and the projector's linear layers through DequantizeLinear as well
    (the export then judges image features by the logits they lead to), --quantize-lm-head the LM head; both
    verify."""
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    bundle = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b",
                           ExportOptions(quantize="int8", quantize_vision=True, quantize_lm_head=True),
                           log=lambda m: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["vision"] and manifest["quantization"]["lm_head"]
    vision = onnx.load(bundle / "vision.onnx", load_external_data=False)
    dq = [n for n in vision.graph.node if n.op_type == "DequantizeLinear"]
    from mllm_deploy.export.vision_graph import vision_layers_used
    from mllm_deploy.formats.geometry import spec_from_manifest

    used = vision_layers_used(spec_from_manifest(manifest["model"]))
    assert used >= 2 and len(dq) == 4 * used + 2  # qkv, o, fc1, fc2 of every layer used, the projector's two
    decode = onnx.load(bundle / "decode.onnx", load_external_data=False)
    assert any(n.op_type == "DequantizeLinear" and n.name.startswith("/model/lm_head") for n in decode.graph.node)
