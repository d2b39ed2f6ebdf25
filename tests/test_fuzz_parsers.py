"""Fuzzing the parsers of user input: every malformed recipe, bundle manifest, calibration JSONL or
image raises the project's user error (an ``MllmError``) with a message, never another exception.

Inputs are structurally plausible but broken: a valid document with one field replaced by any JSON
value (wrong type, NaN, huge or negative numbers), a key deleted or added, truncated or random
bytes, bad UTF-8, deep nesting; for images every Pillow mode and format, truncated, bit-flipped,
empty and bomb-sized headers. Whatever a parser accepts must also be usable by the code after it.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import io
import json
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mllm_deploy.core.errors import MllmError

# Pillow warns about some corrupt files it still decodes (and about deprecated formats): not our finding
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="mllm-fuzz-"))  # one scratch directory for every example
atexit.register(shutil.rmtree, WORK, ignore_errors=True)

# ---- generic JSON mutations -------------------------------------------------------------------------
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "float32", "dense", "mllm-deploy/recipe@1", "mllm-deploy/bundle@1", "../x", "/etc"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)


def _paths(value, prefix=()):
    """Every key path into nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _set(doc, path, value):
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(doc, path):
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


@st.composite
def mutated(draw, base: dict, protect: tuple = ()):
    """``base`` with 1-3 mutations: a value replaced by any JSON, a key deleted, a key added,
    a list shortened or lengthened. ``protect`` lists top-level keys left alone."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p and p[0] not in protect]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "list"]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if kind == "replace":
            _set(doc, path, draw(JSON))
        elif kind == "delete" and isinstance(parent, dict):
            _delete(doc, path)
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        elif kind == "list" and isinstance(parent[path[-1]], list):
            items = parent[path[-1]]
            parent[path[-1]] = items[: draw(st.integers(0, len(items)))] + draw(st.lists(SCALARS, max_size=3))
        else:
            _set(doc, path, draw(SCALARS))
    return doc


def _broken_text(valid: str):
    """Bytes that are not a valid document: truncated, spliced, random, bad UTF-8, deeply nested."""
    data = valid.encode()
    return st.one_of(
        st.integers(0, max(len(data) - 1, 0)).map(lambda n: data[:n]),
        st.tuples(st.integers(0, len(data)), st.binary(max_size=16)).map(lambda t: data[:t[0]] + t[1] + data[t[0]:]),
        st.binary(max_size=200),
        st.just(b"\xff\xfe" + data), st.just(data.replace(b'"', b"\xc3", 1)),
        st.integers(1000, 100_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(4400, 6000).map(lambda n: b'{"x": ' + b"9" * n + b"}"),
        st.sampled_from([b"", b"null", b"[]", b"NaN", b'"text"', b"{}", b"1e999"]),
    )


# ---- recipes -----------------------------------------------------------------------------------------
def _recipes() -> list[dict]:
    from mllm_deploy.formats.recipe import ModelRef, Recipe, ScoreSpec

    model = ModelRef("LlavaForConditionalGeneration", 4, 128, 64, "f" * 64)
    dense = Recipe(model, {"name": "dense"}, [64] * 4)
    fastv = Recipe(model, {"name": "fastv", "k": 2, "r": 0.5}, [64, 64, 32, 32],
                   score=ScoreSpec(attention_layer_offset=-1), flops={"reduction": 0.3}, provenance={"seed": 0})
    fitprune = Recipe(model, {"name": "fitprune", "budget": 0.5}, [64, 60, 40, 20], prune_stage="after_attention",
                      final_visual_tokens=10, score=ScoreSpec(query_rows="text", head_reduction="max",
                                                              combine="self_times_cross"), extra={"alpha": 0.1})
    return [r.to_dict() for r in (dense, fastv, fitprune)]


RECIPES = _recipes()


def _use_recipe(recipe) -> None:
    """What exporters, flops-mllm and the runtime read from an accepted recipe."""
    from mllm_deploy.formats.recipe import Recipe

    assert recipe.prune_layers is not None and len(recipe.mlp_visual_tokens()) == recipe.num_layers
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


@FUZZ
@given(st.sampled_from(RECIPES).flatmap(lambda base: mutated(base)))
def test_recipe_from_dict_mutations(doc):
    from mllm_deploy.formats.recipe import Recipe

    try:
        recipe = Recipe.from_dict(doc)
    except MllmError as exc:
        assert str(exc).strip()
        return
    _use_recipe(recipe)


@FUZZ
@given(JSON)
def test_recipe_from_any_json(doc):
    from mllm_deploy.formats.recipe import Recipe

    with pytest.raises(MllmError, match=r"\S"):
        Recipe.from_dict(doc)


@FUZZ
@given(st.sampled_from(RECIPES).flatmap(lambda base: _broken_text(json.dumps(base))))
def test_recipe_file_bytes(data):
    from mllm_deploy.formats.recipe import load_recipe

    path = WORK / "recipe.json"
    path.write_bytes(data)
    try:
        recipe = load_recipe(path)
    except MllmError as exc:
        assert str(exc).strip()
        return
    _use_recipe(recipe)


# ---- model config.json ---------------------------------------------------------------------------
def _tiny_config() -> dict:
    from mllm_deploy.models.registry import resolve_model
    from mllm_deploy.formats.geometry import read_config

    return read_config(resolve_model("tiny-llava"))


CONFIG = _tiny_config()


@FUZZ
@given(mutated(CONFIG) | JSON)
def test_model_config_mutations(doc):
    """A config.json of the wrong shape is refused as an unsupported model, whatever is wrong."""
    from mllm_deploy.formats.geometry import spec_from_config

    try:
        spec = spec_from_config(doc)
    except MllmError as exc:
        assert str(exc).strip()
        return
    assert spec.visual_tokens >= 1 and spec.text.num_layers >= 1


# ---- bundle manifests -------------------------------------------------------------------------------
def _manifest_dir() -> tuple[Path, dict]:
    """A bundle directory with small stand-in files and a manifest that passes every check."""
    from mllm_deploy.formats.image import ImagePreprocessConfig

    root = WORK / "bundle"
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    files = {"vision.onnx": b"v", "prefill.onnx": b"p", "decode.onnx": b"d", "weights.bin": b"\0" * 64,
             "tokenizer/tokenizer.json": b"{}", "tokenizer/chat_template.jinja": b"{{ x }}"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    layers, kv_heads, head_dim, visual, hidden = 2, 2, 8, 16, 32

    def io(name, dtype, shape):
        return {"name": name, "dtype": dtype, "shape": shape}

    kv = lambda prefix, length: [io(f"{prefix}.{l}.{k}", "float32", [1, kv_heads, f"{length}_{l}", head_dim])  # noqa: E731
                                 for l in range(layers) for k in ("key", "value")]
    graphs = {
        "vision": {"file": "vision.onnx", "custom_ops": [], "inputs": [io("pixel_values", "float32", [1, 3, 28, 28])],
                   "outputs": [io("image_features", "float32", [1, visual, hidden])]},
        "prefill": {"file": "prefill.onnx", "custom_ops": [],
                    "inputs": [io("input_ids", "int64", [1, "T"]), io("image_features", "float32", [1, visual, hidden]),
                               io("image_start", "int64", [1])],
                    "outputs": [io("logits", "float32", [1, 64])] + kv("present", "kv_len")},
        "decode": {"file": "decode.onnx", "custom_ops": [],
                   "inputs": [io("input_ids", "int64", [1, 1]), io("position_ids", "int64", [1, 1]),
                              io("past_lengths", "int64", [layers])] + kv("past", "past_len"),
                   "outputs": [io("logits", "float32", [1, 64])] + kv("new", "one")},
    }
    model = {"architecture": "LlavaForConditionalGeneration",
             "vision": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "image_size": 28,
                        "patch_size": 7, "num_channels": 3, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
             "text": {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 64, "num_layers": layers,
                      "num_heads": 4, "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": 64,
                      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling_factor": 1.0,
                      "max_position_embeddings": 128, "hidden_act": "silu", "attention_bias": False,
                      "mlp_bias": False, "tie_word_embeddings": False, "sliding_window": None},
             "image_token_id": 4, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
             "projector_hidden_act": "gelu", "projector_bias": True, "fingerprint": "f" * 64, "visual_tokens": visual}
    recipe = {"schema": "mllm-deploy/recipe@1", "model": {"architecture": "LlavaForConditionalGeneration",
                                                          "num_layers": layers, "hidden_size": hidden,
                                                          "visual_tokens": visual, "fingerprint": "f" * 64},
              "method": {"name": "fastv"}, "visual_tokens": [visual, visual // 2]}
    image = ImagePreprocessConfig.from_hf_dict({"size": {"shortest_edge": 28},
                                                "crop_size": {"height": 28, "width": 28}}).to_dict()
    manifest = {
        "schema": "mllm-deploy/bundle@1", "dtype": "float32", "model": model, "recipe": recipe, "graphs": graphs,
        "weights": "weights.bin", "image": image,
        "tokenizer": {"file": "tokenizer/tokenizer.json", "chat_template": "tokenizer/chat_template.jinja",
                      "special_tokens": {"bos_token": "<s>"}, "image_token": "<image>", "eos_token_ids": [2]},
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()},
    }
    return root, manifest


BUNDLE_DIR, MANIFEST = _manifest_dir()


def _use_bundle(bundle) -> None:
    """What the runtime reads from an accepted manifest before and while it loads the graphs."""
    from mllm_deploy.formats.image import ImagePreprocessConfig

    assert bundle.num_layers == len(bundle.visual_tokens_per_layer)
    assert len(bundle.kv_lengths(bundle.visual_tokens + 3)) == bundle.num_layers
    for graph in ("vision", "prefill", "decode"):
        assert bundle.graph_path(graph).is_file() and bundle.graph_io(graph)["inputs"]
    ImagePreprocessConfig.from_dict(bundle.manifest["image"]).output_size
    assert bundle.weights_bytes() > 0


def _load(manifest_bytes: bytes):
    from mllm_deploy.runtime.bundle import load_bundle

    (BUNDLE_DIR / "manifest.json").write_bytes(manifest_bytes)
    return load_bundle(BUNDLE_DIR)


def test_manifest_base_is_valid():
    _use_bundle(_load(json.dumps(MANIFEST).encode()))


@FUZZ
@given(mutated(MANIFEST))
def test_manifest_mutations(doc):
    try:
        bundle = _load(json.dumps(doc).encode())
    except MllmError as exc:
        assert str(exc).strip()
        return
    _use_bundle(bundle)


@FUZZ
@given(_broken_text(json.dumps(MANIFEST)) | JSON.map(lambda doc: json.dumps(doc).encode()))
def test_manifest_bytes(data):
    try:
        bundle = _load(data)
    except MllmError as exc:
        assert str(exc).strip()
        return
    _use_bundle(bundle)


# ---- calibration JSONL ------------------------------------------------------------------------------
DATA_DIR = WORK / "calib"
DATA_DIR.mkdir()
Image.new("RGB", (12, 9), (200, 30, 30)).save(DATA_DIR / "ok.png")
(DATA_DIR / "text.png").write_text("not an image")
(DATA_DIR / "empty.jpg").write_bytes(b"")
(DATA_DIR / "subdir").mkdir()

GOOD_LINE = {"image": "ok.png", "prompt": "What colour is it?"}
LINE = st.one_of(
    st.just(json.dumps(GOOD_LINE)),
    mutated(GOOD_LINE).map(json.dumps),
    st.fixed_dictionaries({"image": st.sampled_from(["ok.png", "missing.png", "text.png", "empty.jpg", "subdir", "",
                                                     "/", "../calib/ok.png", "ok.png\0x", "x" * 5000]),
                           "prompt": st.sampled_from(["q", "", "  ", "\u2028", "é" * 3])}).map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=30),
    st.sampled_from(["[" * 5000, '{"image": 1e999, "prompt": NaN}', '{"image": "ok.png"', "   "]),
)


@FUZZ
@given(st.lists(LINE, max_size=6), st.booleans(), st.sampled_from(["\n", "\r\n", "\u2028", "\x1c"]),
       st.one_of(st.none(), st.binary(max_size=8)))
@pytest.mark.slow
def test_calibration_jsonl(lines, skip_bad, newline, garbage):
    from mllm_deploy.calib.data import load_calibration_data

    data = newline.join(lines).encode("utf-8", "surrogatepass")
    if garbage is not None:
        data += garbage
    path = DATA_DIR / "data.jsonl"
    path.write_bytes(data)
    try:
        samples = load_calibration_data(str(path), skip_bad=skip_bad)
    except MllmError as exc:
        assert str(exc).strip()
        return
    assert samples and all(s.image.size == (12, 9) and s.prompt.strip() for s in samples)


@FUZZ
@given(st.sampled_from(["builtin:synthetic:", "builtin:shapes-vqa:", "builtin:shapes-vqa:test:", "builtin:"]),
       st.text(max_size=12).filter(lambda t: not (t.isascii() and t.isdigit())))
def test_calibration_builtin_spec(prefix, rest):
    from mllm_deploy.calib.data import load_calibration_data

    with pytest.raises(MllmError, match=r"\S"):
        load_calibration_data(prefix + rest)


# ---- images -------------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F", "La"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO", "TGA", "PCX", "IM", "SGI"]


@st.composite
def image_bytes(draw) -> bytes:
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    try:
        image = image.convert(mode)
    except (ValueError, OSError):
        image = Image.new(mode, (width, height))
    out = io.BytesIO()
    try:
        image.save(out, format=draw(st.sampled_from(FORMATS)))
    except (OSError, ValueError, KeyError, TypeError):  # this format cannot hold this mode
        assume(False)
    return out.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def declared_size_png(draw) -> bytes:
    """A PNG header declaring any size (zero, huge: a decompression bomb) over a little data."""
    width, height = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
    colour = draw(st.sampled_from([(8, 0), (8, 2), (8, 6), (16, 2), (1, 0), (8, 3)]))
    ihdr = struct.pack(">IIBBBBB", width, height, colour[0], colour[1], 0, 0, 0)
    data = zlib.compress(draw(st.binary(max_size=64)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


@st.composite
def broken(draw, source) -> bytes:
    data = draw(source)
    kind = draw(st.sampled_from(["as is", "truncate", "flip", "splice", "header only"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=32)) + data[at:]
    if kind == "header only":
        return data[:draw(st.integers(8, 64))]
    return data


IMAGES = st.one_of(broken(image_bytes()), declared_size_png(), broken(declared_size_png()), st.binary(max_size=300),
                   st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00"]))
PREPROCESS = {"clip": {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}},
              "llava_pad": {"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                            "size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}},
              "no_convert": {"do_convert_rgb": False, "size": {"height": 20, "width": 24}, "do_center_crop": False}}


@pytest.mark.slow
@FUZZ
@given(IMAGES, st.sampled_from(sorted(PREPROCESS)))
def test_image_loader(data, config_name):
    from mllm_deploy.runtime.preprocess import ImagePreprocessConfig, load_image, preprocess

    config = ImagePreprocessConfig.from_hf_dict(PREPROCESS[config_name])
    path = WORK / "image.bin"
    path.write_bytes(data)
    try:
        pixels = preprocess(load_image(path), config)
    except MllmError as exc:
        assert str(exc).strip()
        return
    assert pixels.shape == (1, 3, *config.output_size) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
