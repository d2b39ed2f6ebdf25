"""Exported graphs vs the PyTorch model: vision features, prefill logits, a few decode steps.

The ONNX side runs through the runtime's own Generator, so what is verified is the code
path users run, not a separate harness.
"""

from __future__ import annotations

import numpy as np

from mllm_deploy.core.compare import DEFAULT_TOLERANCES, compare_outputs, compare_quantized
from mllm_deploy.formats.geometry import ModelSpec

DECODE_STEPS = 3


def sample_inputs(spec: ModelSpec, seed: int = 0, text_before: int = 5, text_after: int = 7):
    """A deterministic prompt (ids around one image-token run) and random pixel values."""
    rng = np.random.default_rng(seed)
    vocab = spec.text.vocab_size
    low = min(8, vocab - 1)

    def words(n: int) -> list[int]:
        ids = rng.integers(low, vocab, size=n).tolist()
        return [i if i != spec.image_token_id else low for i in ids]

    v = spec.vision
    if getattr(spec, "is_anyres", False):  # LLaVA-NeXT: random views of an image filling the first bucket
        from mllm_deploy.formats.image import anyres_feature_layout
        from mllm_deploy.runtime.anyres import AnyresPixels

        size = tuple(spec.image_grid_pinpoints[0])
        layout = anyres_feature_layout(size, spec.image_grid_pinpoints, tile_size=v.image_size,
                                       patch_grid=v.image_size // v.patch_size)
        views = rng.standard_normal((layout.num_views, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
        ids = words(text_before) + [spec.image_token_id] * layout.num_tokens + words(text_after)
        return np.array([ids], dtype=np.int64), AnyresPixels(views, size, layout)
    ids = words(text_before) + [spec.image_token_id] * spec.visual_tokens + words(text_after)
    pixels = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return np.array([ids], dtype=np.int64), pixels


def recipe_reference(model, recipe, input_ids: np.ndarray, pixels: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """The same quantities from the PyTorch reference of a (pruned) recipe."""
    import torch

    from mllm_deploy.calib.reference import RecipeReference

    reference = RecipeReference(model, recipe)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        features = reference.image_features(torch.from_numpy(pixels))
        out["image_features"] = features.float().numpy()
        logits, state = reference.prefill(torch.from_numpy(input_ids), features)
        out["prefill.logits"] = logits.numpy()
        for l, entry in enumerate(state.cache):  # None: a layer without attention (EAS) caches nothing
            out[f"kv_len.{l}"] = np.array([0 if entry is None else entry[0].shape[2]], dtype=np.float64)
        for step in range(steps):
            token = int(logits.argmax(-1))
            logits = reference.decode(token, input_ids.shape[1] + step, state)
            out[f"decode.{step}.logits"] = logits.numpy()
    return out


def torch_reference(model, input_ids: np.ndarray, pixels: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """Image features, prefill logits and greedy decode logits from the Hugging Face model."""
    import warnings

    import transformers

    verbosity = transformers.logging.get_verbosity()
    # transformers' deprecation notices for past_key_values (a FutureWarning and a logged line), once per export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        transformers.logging.set_verbosity_error()
        try:
            return _torch_reference(model, input_ids, pixels, steps)
        finally:
            transformers.logging.set_verbosity(verbosity)


def _torch_reference(model, input_ids: np.ndarray, pixels: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    import torch

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        ids = torch.from_numpy(input_ids)
        extra = {}
        if hasattr(pixels, "views"):  # LLaVA-NeXT (runtime/anyres.AnyresPixels): views and the original size
            pv = torch.from_numpy(pixels.views)[None].to(model.dtype)
            extra["image_sizes"] = torch.tensor([list(pixels.image_size)])
        else:
            pv = torch.from_numpy(pixels).to(model.dtype)
        feats = model.model.get_image_features(pixel_values=pv, **extra).pooler_output
        out["image_features"] = torch.stack(list(feats)).float().numpy()
        res = model(input_ids=ids, pixel_values=pv, use_cache=True, **extra)
        logits, cache = res.logits[:, -1].float(), res.past_key_values
        out["prefill.logits"] = logits.numpy()
        for step in range(steps):
            token = logits.argmax(-1, keepdim=True)
            res = model(input_ids=token, past_key_values=cache, use_cache=True)
            logits, cache = res.logits[:, -1].float(), res.past_key_values
            out[f"decode.{step}.logits"] = logits.numpy()
    return out


def onnx_outputs(generator, input_ids: np.ndarray, pixels: np.ndarray, reference: dict, steps: int) -> dict:
    """The same quantities from the bundle; decode feeds the reference's greedy tokens."""
    out = {}
    features = generator.encode_image(pixels)
    out["image_features"] = features
    logits, cache = generator.prefill(input_ids, features, capacity_extra=steps)
    out["prefill.logits"] = logits[None]
    for l, length in enumerate(cache.lengths):
        out[f"kv_len.{l}"] = np.array([length], dtype=np.float64)
    previous = reference["prefill.logits"]
    for step in range(steps):
        token = int(np.argmax(previous[0]))
        logits = generator.decode(token, input_ids.shape[1] + step, cache)
        out[f"decode.{step}.logits"] = logits[None]
        previous = reference[f"decode.{step}.logits"]
    return out


def verify_bundle(bundle_dir, model, spec: ModelSpec, dtype: str, recipe=None) -> dict:
    """Each graph set of the bundle (portable, and onnxruntime when exported) against one reference: dense
    bundles against transformers' own forward, pruned ones against the PyTorch reference of their recipe
    (which equals transformers for a dense recipe). Returns {graph set: comparison}."""
    from mllm_deploy.core.compare import Tolerance
    from mllm_deploy.formats.manifest import ORT_GRAPHS
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.generator import Generator

    input_ids, pixels = sample_inputs(spec)
    bundle = load_bundle(bundle_dir)
    quant = bundle.manifest.get("quantization")

    def reference_of(torch_model):
        if recipe is None or recipe.method_name == "dense":
            return torch_reference(torch_model, input_ids, pixels, DECODE_STEPS)
        return recipe_reference(torch_model, recipe, input_ids, pixels, DECODE_STEPS)

    reference = reference_of(model)
    float_reference = reference
    if quant:  # the model the bundle computes: the same weights after the quantize-dequantize round trip
        import copy

        from mllm_deploy.export.quantize import QuantScheme, fake_quantize_model

        rounded = copy.deepcopy(model)
        fake_quantize_model(rounded, QuantScheme.from_dict(quant))
        reference = reference_of(rounded)
        del rounded
    sets = ["portable"] + (["onnxruntime"] if all(g in bundle.manifest["graphs"] for g in ORT_GRAPHS.values()) else [])
    exact = {name: Tolerance(atol=0.0) for name in reference if name.startswith("kv_len.")}
    if quant and not quant.get("vision"):
        exact["image_features"] = DEFAULT_TOLERANCES[dtype]  # the vision tower kept its float weights
    results = {}
    for graphs in sets:
        # a quantized bundle runs with float activations here: the quantized model's exact arithmetic, so that the
        # check can be as tight as for float bundles (the default int8 activations are measured by eval-mllm)
        options = {"quant_activations": "float"} if quant else {}
        with Generator(bundle, graphs=graphs, **options) as generator:
            candidate = onnx_outputs(generator, input_ids, pixels, reference, DECODE_STEPS)
        if quant:
            results[graphs] = compare_quantized(reference, float_reference, candidate, int(quant["bits"]), dtype,
                                                exact)
        else:
            results[graphs] = compare_outputs(reference, candidate, DEFAULT_TOLERANCES[dtype], per_output=exact)
    return results
