"""The bundle manifest (``manifest.json``, schema ``mllm-deploy/bundle@1``): its tensor names, each graph's I/O
table and the field-by-field check that a manifest gives the runtime every value it reads.

One place for these facts: the graph builders (export/) name their inputs and outputs with the functions
here, the exporter writes the manifest, runtime/bundle.py loads it through ``check_manifest``, and the
TensorRT code maps engine tensors back to the same names.

``manifest.json`` is not covered by its own hashes, so its structure is checked field by field.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from mllm_deploy.core.errors import BundleError, MllmError

BUNDLE_SCHEMA = "mllm-deploy/bundle@1"
GRAPHS = ("vision", "prefill", "decode")  # the portable graphs: standard ONNX ops, what TensorRT builds
# The onnxruntime-target variants of prefill and decode (ONNX Runtime's fused ops, export/ort_fused.py), on the same
# weights file; a bundle may lack them. The ONNX Runtime backend prefers them, TensorRT never reads them.
ORT_GRAPHS = {"prefill": "prefill_ort", "decode": "decode_ort"}
DTYPES = ("float32", "float16")  # the bundle's float type
IO_DTYPES = ("float32", "float16", "int64", "int32", "bool")
QUANTIZED_DTYPES = ("int4", "int8")  # weights of --quantize bundles (export/quantize.py), never graph inputs
KV_PARTS = ("key", "value")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KV_NAME = re.compile(r"^(past|present|new)\.(\d+)\.(key|value)$")


# ---- tensor names ------------------------------------------------------------------------------------------
def past_name(layer: int, part: str) -> str:
    """decode input: layer ``layer``'s static KV buffer [1, Hkv, C_l, Dh]."""
    return f"past.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    """prefill output: the KV of the tokens layer ``layer`` processed [1, Hkv, T_l, Dh]."""
    return f"present.{layer}.{part}"


def new_name(layer: int, part: str) -> str:
    """decode output: the new token's KV [1, Hkv, 1, Dh], written at slot past_lengths[layer]."""
    return f"new.{layer}.{part}"


def parse_kv_name(name: str) -> tuple[str, int, str] | None:
    """("past" | "present" | "new", layer, "key" | "value"), or None for another tensor."""
    match = _KV_NAME.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def is_kv_name(name: str) -> bool:
    return parse_kv_name(name) is not None


def route_names(layer: int) -> tuple[str, str]:
    """prefill outputs of a routing layer: its ranking scores [n_vis] and kept visual indices [k] (for --verify)."""
    return f"route.{layer}.scores", f"route.{layer}.kept"


def graph_io(num_layers: int, skip_attention=()) -> dict[str, tuple[set[str], set[str]]]:
    """Per graph: the exact inputs the runtime feeds and the outputs it reads (a graph may output more). The
    onnxruntime decode writes each new entry into its past buffer in place: its ``present.{l}.*`` outputs are
    those buffers (bound as input and output), where the portable decode returns ``new.{l}.*`` for the runtime
    to write. Layers in ``skip_attention`` (EAS) have no KV: no tensors of theirs."""
    def kv(name) -> set[str]:
        return {name(layer, part) for layer in range(num_layers) if layer not in skip_attention for part in KV_PARTS}

    decode_inputs = {"input_ids", "position_ids", "past_lengths"} | kv(past_name)
    return {
        "vision": ({"pixel_values"}, {"image_features"}),
        "prefill": ({"input_ids", "image_features", "image_start"}, {"logits"} | kv(present_name)),
        "decode": (decode_inputs, {"logits"} | kv(new_name)),
        "prefill_ort": ({"input_ids", "image_features", "image_start"}, {"logits"} | kv(present_name)),
        "decode_ort": (decode_inputs, {"logits"} | kv(present_name)),
    }


def kv_in_place(outputs: list[dict]) -> bool:
    """Whether a decode graph updates its past buffers in place (outputs ``present.*``, not ``new.*``)."""
    return any((parse_kv_name(entry["name"]) or ("",))[0] == "present" for entry in outputs)


def bundle_graphs(manifest: dict) -> list[str]:
    """The graphs a bundle holds: the portable three and the onnxruntime variants it has."""
    return list(GRAPHS) + [g for g in ORT_GRAPHS.values() if g in manifest.get("graphs", {})]


# ---- manifest structure ---------------------------------------------------------------------------
def _relative_file(value: Any, where: str) -> str:
    """A path inside the bundle: relative, no '..', no empty parts."""
    if not isinstance(value, str) or not value or "\0" in value or "\\" in value:
        raise BundleError(f"manifest.json {where} must be a file name inside the bundle, got {value!r}")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or value != path.as_posix():
        raise BundleError(f"manifest.json {where} {value!r} is not a plain relative path inside the bundle")
    return value


def _integer(value: Any, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BundleError(f"manifest.json {where} must be an integer >= {minimum}, got {value!r}")
    return value


def _object(manifest: dict, key: str) -> dict:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise BundleError(f"manifest.json '{key}' must be an object, got {type(value).__name__}")
    return value


def _check_io(graph: str, entries: Any, kind: str) -> list[str]:
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"manifest.json graphs.{graph}.{kind} must be a non-empty list")
    names = []
    for entry in entries:
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or entry.get("dtype") not in IO_DTYPES
                or not isinstance(entry.get("shape"), list)
                or not all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or isinstance(d, str)
                           for d in entry["shape"])):
            raise BundleError(f"manifest.json graphs.{graph}.{kind} has a malformed entry {str(entry)[:80]!r}"
                              " (needs name, dtype, shape)")
        names.append(entry["name"])
    if len(set(names)) != len(names):
        raise BundleError(f"manifest.json graphs.{graph}.{kind} lists a name twice")
    return names


def _check_external(graph: str, entries: Any) -> None:
    """The external weights table: a file inside the bundle, offsets and lengths that fit dtype and shape."""
    where = f"graphs.{graph}.external_initializers"
    if not isinstance(entries, list):
        raise BundleError(f"manifest.json {where} must be a list")
    bits = {"float32": 32, "float16": 16, "int64": 64, "int32": 32, "bool": 8, "int8": 8, "int4": 4}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or entry.get("dtype") not in bits:
            raise BundleError(f"manifest.json {where} has a malformed entry {str(entry)[:80]!r}")
        _relative_file(entry.get("file"), f"{where}.file")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise BundleError(f"manifest.json {where}: {entry['name']} has a malformed shape")
        count = 1
        for dim in shape:
            count *= dim
        _integer(entry.get("offset"), f"{where}.offset", minimum=0)
        if _integer(entry.get("length"), f"{where}.length", minimum=0) != (count * bits[entry["dtype"]] + 7) // 8:
            raise BundleError(f"manifest.json {where}: {entry['name']} length does not match its dtype and shape")


def _check_model(manifest: dict) -> None:
    from mllm_deploy.formats.geometry import spec_from_manifest

    model = _object(manifest, "model")
    text = model.get("text")
    if not isinstance(text, dict) or not isinstance(model.get("vision"), dict):
        raise BundleError("manifest.json model needs 'text' and 'vision' objects; re-export the bundle")
    for key in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "max_position_embeddings"):
        _integer(text.get(key), f"model.text.{key}")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size", "num_channels"):
        _integer(model["vision"].get(key), f"model.vision.{key}")
    _integer(model.get("visual_tokens"), "model.visual_tokens")
    _integer(model.get("image_token_id"), "model.image_token_id", minimum=0)
    try:
        spec_from_manifest(model)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise BundleError(f"manifest.json model is malformed ({type(exc).__name__}: {exc}); re-export the bundle") from None


def _check_recipe(manifest: dict) -> None:
    from mllm_deploy.formats.recipe import Recipe

    try:
        recipe = Recipe.from_dict(manifest.get("recipe"))
    except MllmError as exc:
        raise BundleError(f"manifest.json recipe: {exc}") from None
    model = manifest["model"]
    if recipe.num_layers != model["text"]["num_layers"] or recipe.llm_visual_tokens != model["visual_tokens"]:
        raise BundleError(f"manifest.json recipe is for {recipe.num_layers} layers and {recipe.llm_visual_tokens}"
                          f" visual tokens, the model has {model['text']['num_layers']} and {model['visual_tokens']}")


def _check_graphs(manifest: dict) -> None:
    graphs = _object(manifest, "graphs")
    text = manifest["model"]["text"]
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    expected = graph_io(text["num_layers"], set(recipe.get("skip_attention", [])))
    for graph in bundle_graphs(manifest):
        entry = graphs.get(graph)
        if not isinstance(entry, dict):
            raise BundleError(f"manifest.json lists no '{graph}' graph; re-export the bundle")
        _relative_file(entry.get("file"), f"graphs.{graph}.file")
        custom_ops = entry.get("custom_ops", [])
        if not isinstance(custom_ops, list) or not all(isinstance(op, str) for op in custom_ops):
            raise BundleError(f"manifest.json graphs.{graph}.custom_ops must be a list of op names")
        inputs = set(_check_io(graph, entry.get("inputs"), "inputs"))
        shape_inputs = entry.get("shape_inputs", [])
        if not isinstance(shape_inputs, list) or not all(isinstance(n, str) and n in inputs for n in shape_inputs):
            raise BundleError(f"manifest.json graphs.{graph}.shape_inputs must list some of the graph's inputs")
        outputs = set(_check_io(graph, entry.get("outputs"), "outputs"))
        _check_external(graph, entry.get("external_initializers", []))
        want_in, want_out = expected[graph]
        if inputs != want_in or not want_out <= outputs:
            wrong = sorted(inputs ^ want_in) or sorted(want_out - outputs)
            raise BundleError(f"manifest.json graph {graph!r} does not have the inputs/outputs the runtime uses"
                              f" (first difference: {wrong[0]}); re-export the bundle")
        for io in entry["inputs"] + entry["outputs"]:
            name, shape = io["name"], io["shape"]
            if is_kv_name(name) and (
                    len(shape) != 4 or shape[1] != text["num_kv_heads"] or shape[3] != text["head_dim"]):
                raise BundleError(f"manifest.json graph {graph!r}: {name} has shape {shape}, the model's KV heads"
                                  f" are [1, {text['num_kv_heads']}, length, {text['head_dim']}]")
            # the runtime makes these in the bundle's dtype (logits may be float32 in a float16 bundle)
            in_bundle_dtype = name in ("pixel_values", "image_features") or is_kv_name(name)
            if in_bundle_dtype and io["dtype"] != manifest["dtype"]:
                raise BundleError(f"manifest.json graph {graph!r}: {name} is {io['dtype']} in a"
                                  f" {manifest['dtype']} bundle")


def _check_tokenizer(manifest: dict) -> None:
    tokenizer = _object(manifest, "tokenizer")
    _relative_file(tokenizer.get("file"), "tokenizer.file")
    _relative_file(tokenizer.get("chat_template"), "tokenizer.chat_template")
    special = tokenizer.get("special_tokens")
    if not isinstance(special, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in special.items()):
        raise BundleError("manifest.json tokenizer.special_tokens must map names to token strings")
    if not isinstance(tokenizer.get("image_token"), str) or not tokenizer["image_token"]:
        raise BundleError("manifest.json tokenizer.image_token must be a non-empty string")
    templates = tokenizer.get("prompt_templates", [])
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise BundleError("manifest.json tokenizer.prompt_templates must be a list of strings")
    eos = tokenizer.get("eos_token_ids")
    if not isinstance(eos, list) or not eos or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                                        for e in eos):
        raise BundleError(f"manifest.json tokenizer.eos_token_ids must be a non-empty list of token ids, got {eos!r}")


def _check_files(manifest: dict) -> None:
    files = _object(manifest, "files")
    for rel, digest in files.items():
        _relative_file(rel, "files entry")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"manifest.json files[{rel!r}] is not a sha256 hex digest")
    needed = [manifest["graphs"][g]["file"] for g in bundle_graphs(manifest)]
    needed += [manifest["tokenizer"]["file"], manifest["tokenizer"]["chat_template"]]
    if isinstance(manifest.get("weights"), str):
        needed.append(_relative_file(manifest["weights"], "weights"))
    unlisted = [f for f in needed if f not in files]
    if unlisted:
        raise BundleError(f"manifest.json has no sha256 for {unlisted[0]}; re-export the bundle")


def _check_quantization(manifest: dict) -> None:
    """The weight-only scheme, when the bundle has one: what the runtime, check-trt and reports read."""
    quant = manifest.get("quantization")
    if quant is None:
        return
    if not isinstance(quant, dict) or quant.get("weights") not in ("int4", "int8") or \
            quant.get("bits") != {"int4": 4, "int8": 8}[quant["weights"]]:
        raise BundleError("manifest.json quantization needs weights int4 or int8 and the matching bits")
    if quant["weights"] == "int4":
        _integer(quant.get("block_size"), "quantization.block_size")


def check_manifest(manifest: Any) -> dict[str, Any]:
    """Raise :class:`BundleError` naming the first field the runtime could not use."""
    if not isinstance(manifest, dict) or manifest.get("schema") != BUNDLE_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"manifest.json has schema {found!r}, expected {BUNDLE_SCHEMA!r}")
    for key in ("graphs", "files", "model", "recipe", "tokenizer", "image", "dtype"):
        if key not in manifest:
            raise BundleError(f"manifest.json lacks '{key}'; re-export the bundle")
    if manifest["dtype"] not in DTYPES:
        raise BundleError(f"manifest.json dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    _check_model(manifest)
    _check_quantization(manifest)
    _check_recipe(manifest)
    _check_graphs(manifest)
    _check_tokenizer(manifest)
    _check_files(manifest)
    from mllm_deploy.formats.image import ImagePreprocessConfig

    try:
        ImagePreprocessConfig.from_dict(manifest["image"]).output_size
    except MllmError as exc:
        raise BundleError(f"manifest.json image: {exc}") from None
    return manifest
