"""What mllm-deploy knows about a model, read from ``config.json`` alone (no weights, no torch).

The same :class:`ModelSpec` drives the exporter, the FLOPs model and the manifest, so a
7B geometry can be described on any machine from its config file. The module is longer than 400 lines because the
spec, the default tables and the reader that fills one from the other change together: a new family or field
touches all three, and kept apart they would drift.

A Hugging Face ``config.json`` holds only what differs from its config classes' defaults:
llava-hf/llava-1.5-7b-hf's ``text_config`` has no hidden size, layer or head count at all, and
transformers fills them in from ``LlamaConfig``. To read such a file the way transformers does,
without importing it, the defaults of the classes involved are copied below as data. They are
those of transformers ``TRANSFORMERS_DEFAULTS_VERSION`` (defaults have changed between releases;
tests/test_configs.py checks every field against the installed transformers' ``AutoConfig``).

LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "AnyRes") is the same tower, projector and language model with
a variable number of visual tokens: the image is resized into one of ``image_grid_pinpoints`` (its bucket), cut into
tower-sized tiles, and the tiles' features are packed after the whole image's (the base) as a grid whose rows each end
in a learned newline embedding. The spec records the buckets and costs a prompt at one visual-token count, by default
the largest bucket's (:attr:`ModelSpec.max_visual_tokens`); :meth:`ModelSpec.for_bucket` and
:meth:`ModelSpec.with_image_tokens` choose another.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import InputFileError, MllmError, UnsupportedModelError
from mllm_deploy.core.hashing import canonical_json, sha256_text

TRANSFORMERS_DEFAULTS_VERSION = "5.24.0"

# The defaults of each config class, for the fields ModelSpec reads, from
# transformers/models/<family>/configuration_<family>.py. Vicuna checkpoints are Llama.
LLAMA_DEFAULTS: dict[str, Any] = {  # LlamaConfig
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False,
}
MISTRAL_DEFAULTS: dict[str, Any] = {  # MistralConfig: 8 KV heads by default; its layers have no biases
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "sliding_window": 4096,
}
CLIP_VISION_DEFAULTS: dict[str, Any] = {  # CLIPVisionConfig (openai/clip-vit-base-patch32)
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
LLAVA_DEFAULTS: dict[str, Any] = {  # LlavaConfig
    "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2, "multimodal_projector_bias": True, "tie_word_embeddings": False,
}
# LlavaConfig.sub_configs_defaults: what an absent (or null) vision_config / text_config becomes.
# A vision_config that is present gets CLIPVisionConfig's own defaults, not these.
LLAVA_ABSENT_VISION_CONFIG: dict[str, Any] = {
    "model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
    "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 32000, "projection_dim": 768,
}
LLAVA_ABSENT_TEXT_CONFIG: dict[str, Any] = {"model_type": "llama"}
DEFAULT_ROPE_THETA = 10000.0  # RotaryEmbeddingConfigMixin.default_theta

# Supported pieces, as data. Adding a family means adding its defaults here and its
# graph builder in export/ (the builders only need the fields of ModelSpec).
# architecture -> the model_type its config class writes; a config saved by save_pretrained() has no architectures,
# and its model_type names the class. LlavaNextConfig's defaults (and sub-config defaults) equal LlavaConfig's, so one
# table serves both; it adds image_grid_pinpoints (below).
ARCHITECTURE_MODEL_TYPES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_MODEL_TYPES)
LLAVA_MODEL_TYPE = "llava"
LLAVA_NEXT_MODEL_TYPE = "llava_next"
LLAVA_NEXT = "LlavaNextForConditionalGeneration"
VISION_DEFAULTS = {"clip_vision_model": CLIP_VISION_DEFAULTS}
TEXT_DEFAULTS = {"llama": LLAMA_DEFAULTS, "mistral": MISTRAL_DEFAULTS}
SUPPORTED_VISION = tuple(VISION_DEFAULTS)
SUPPORTED_TEXT = tuple(TEXT_DEFAULTS)
SUPPORTED_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "relu")
SUPPORTED_ROPE = ("default", "linear")
SUPPORTED_FEATURE_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float
    max_position_embeddings: int
    hidden_act: str
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vision: VisionSpec
    text: TextSpec
    image_token_id: int
    vision_feature_layer: int
    vision_feature_select_strategy: str  # "default" drops CLS, "full" keeps it
    projector_hidden_act: str
    projector_bias: bool
    fingerprint: str  # sha256 of the canonical text config (the recipe's model fingerprint)
    # A recipe that prunes before the LLM (cls, dart: formats/recipe.PreLlmStage) gives the language model fewer
    # visual tokens than the tower makes: this spec is then "the model as its prefill and decode graphs see it".
    # Not part of the geometry (the fingerprint) and absent from to_dict() when None.
    llm_visual_tokens: int | None = None
    # LLaVA-NeXT only (None for LLaVA-1.5, and then absent from to_dict(), so 1.5 specs and their fingerprints are
    # what they were). The buckets, (height, width) in pixels in config order, each a whole number of tower tiles;
    # and whether a learned newline embedding (the checkpoint's image_newline) closes each row of grid features:
    # transformers' LlavaNextModel always adds it (a config's use_image_newline_parameter is not read). Both change
    # the prompt's length, so they are geometry and enter the fingerprint.
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    image_newline: bool | None = None
    # The visual tokens the one image of the prompt being costed makes (LLaVA-NeXT: set by its bucket and, below the
    # bucket's maximum, by unpadding); None is the largest bucket's maximum. A choice of prompt, not geometry: out of
    # the fingerprint like llm_visual_tokens, absent from to_dict() when None. Set it with for_bucket/with_image_tokens.
    image_visual_tokens: int | None = None

    @property
    def is_anyres(self) -> bool:
        """LLaVA-NeXT: the visual-token count depends on the image (its bucket and aspect ratio)."""
        return self.image_grid_pinpoints is not None

    @property
    def base_visual_tokens(self) -> int:
        """Visual tokens of one tower pass over one tile: LLaVA-1.5's whole image, LLaVA-NeXT's base image."""
        extra = 0 if self.vision_feature_select_strategy == "default" else 1
        return self.vision.num_patches + extra

    @property
    def tower_visual_tokens(self) -> int:
        """Visual tokens the vision tower and projector make per image (LLaVA-NeXT: for the image being costed)."""
        if not self.is_anyres:
            return self.base_visual_tokens
        return self.max_visual_tokens if self.image_visual_tokens is None else self.image_visual_tokens

    @property
    def visual_tokens(self) -> int:
        """Visual tokens in the language model's prompt: the tower's, or fewer after a pre-LLM selection."""
        return self.tower_visual_tokens if self.llm_visual_tokens is None else self.llm_visual_tokens

    def bucket_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of grid features of bucket ``height`` x ``width``: its tiles, each ``image_size //
        patch_size`` features a side (LlavaNextModel.pack_image_features views them so)."""
        if not self.is_anyres or (height, width) not in self.image_grid_pinpoints:
            raise MllmError(f"{height}x{width} is not a bucket of this model; buckets (height x width):"
                            f" {_bucket_names(self) or 'none (not a LLaVA-NeXT model)'}")
        side = self.vision.image_size // self.vision.patch_size
        return height // self.vision.image_size * side, width // self.vision.image_size * side

    def bucket_tokens(self, height: int, width: int) -> int:
        """The most visual tokens an image in bucket ``height`` x ``width`` makes: one of that exact aspect ratio,
        which unpadding leaves whole. In prompt order (transformers' pack_image_features): the base image's features,
        then the grid row by row, ``columns`` features and, with image_newline, one newline token per row. An image
        of another aspect ratio loses the padded rows (or columns) and their newlines."""
        rows, columns = self.bucket_grid(height, width)
        return self.base_visual_tokens + rows * (columns + (1 if self.image_newline else 0))

    @property
    def bucket_visual_tokens(self) -> dict[tuple[int, int], int]:
        """{(height, width): bucket_tokens} per bucket, in config order; empty for LLaVA-1.5."""
        return {(h, w): self.bucket_tokens(h, w) for h, w in self.image_grid_pinpoints or ()}

    @property
    def max_visual_tokens(self) -> int:
        """The most visual tokens one image can make: what a static prefill must hold."""
        return max(self.bucket_visual_tokens.values()) if self.is_anyres else self.base_visual_tokens

    def with_image_tokens(self, visual_tokens: int) -> "ModelSpec":
        """The spec costed for an image of ``visual_tokens`` tokens (LLaVA-NeXT: between the base image alone, all
        grid rows unpadded away, and the largest bucket's maximum; LLaVA-1.5: only its fixed count)."""
        if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int):
            raise MllmError(f"visual tokens must be an integer, got {visual_tokens!r}")
        if not self.is_anyres:
            if visual_tokens != self.base_visual_tokens:
                raise MllmError(f"this model makes a fixed {self.base_visual_tokens} visual tokens per image, not"
                                f" {visual_tokens}; only a LLaVA-NeXT model's count varies with the image")
            return self
        low, high = self.base_visual_tokens, self.max_visual_tokens
        if not low <= visual_tokens <= high:
            raise MllmError(f"visual tokens must be between {low} (the base image alone) and {high} (the largest"
                            f" bucket, nothing unpadded), got {visual_tokens}")
        return replace(self, image_visual_tokens=visual_tokens, llm_visual_tokens=None)

    def for_bucket(self, height: int, width: int) -> "ModelSpec":
        """The spec costed for an image that fills bucket ``height`` x ``width`` (its most visual tokens)."""
        return self.with_image_tokens(self.bucket_tokens(height, width))

    def tower(self) -> "ModelSpec":
        """The spec without a pre-LLM selection (the model as published, for the image being costed)."""
        return replace(self, llm_visual_tokens=None) if self.llm_visual_tokens is not None else self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in _UNSET_ABSENT:
            if d[key] is None:
                del d[key]
        return d


# ModelSpec fields left out of to_dict() while None: the LLaVA-1.5 dict (and fingerprint) predates them
_UNSET_ABSENT = ("llm_visual_tokens", "image_grid_pinpoints", "image_newline", "image_visual_tokens")
# ModelSpec fields that describe a prompt, not the model: never in the fingerprint
_NOT_GEOMETRY = ("fingerprint", "llm_visual_tokens", "image_visual_tokens")


def _bucket_names(spec: ModelSpec) -> str:
    return ", ".join(f"{h}x{w}" for h, w in spec.image_grid_pinpoints or ())


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise InputFileError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise UnsupportedModelError(
            f"{model_dir} has no config.json; pass a Hugging Face model directory or a built-in name"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"{path} is not valid JSON ({exc})") from None


def spec_from_config(cfg: dict) -> ModelSpec:
    """The model geometry from a parsed config.json, defaults filled in as transformers fills them; a
    config of the wrong shape (a list where an object belongs, a string where a number does) is a user
    error, not a crash."""
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    try:
        spec = _spec_from_config(cfg)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, ArithmeticError) as exc:
        raise UnsupportedModelError(f"config.json is malformed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    _check_geometry(spec)
    return spec


# ModelSpec names that config.json spells differently, for messages that name the field to fix
_JSON_NAME = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}


def _check_geometry(spec: ModelSpec) -> None:
    """Sizes are positive integers that fit together; eps and rope theta positive and finite."""
    counts = {f"vision_config.{_JSON_NAME.get(k, k)}": getattr(spec.vision, k) for k in (
        "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size", "num_channels")}
    counts.update({f"text_config.{_JSON_NAME.get(k, k)}": getattr(spec.text, k) for k in (
        "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
        "max_position_embeddings")})
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedModelError(f"config.json {name} must be a positive integer, got {value!r}")
    if spec.vision.patch_size > spec.vision.image_size:
        raise UnsupportedModelError(f"config.json vision_config.patch_size {spec.vision.patch_size} is larger than"
                                    f" image_size {spec.vision.image_size}")
    if spec.vision.hidden_size % spec.vision.num_heads:
        raise UnsupportedModelError("config.json vision_config.hidden_size is not a multiple of num_attention_heads")
    if spec.text.model_type == "llama" and spec.text.hidden_size % spec.text.num_heads:
        # LlamaConfig.validate_architecture refuses it too, even with an explicit head_dim
        raise UnsupportedModelError("config.json text_config.hidden_size is not a multiple of num_attention_heads")
    if spec.text.num_heads % spec.text.num_kv_heads:
        raise UnsupportedModelError("config.json text_config.num_attention_heads is not a multiple of num_key_value_heads")
    sliding = spec.text.sliding_window
    if sliding is not None and (isinstance(sliding, bool) or not isinstance(sliding, int) or sliding < 1):
        raise UnsupportedModelError(f"config.json text_config.sliding_window must be a positive integer or null, got {sliding!r}")
    for height, width in spec.image_grid_pinpoints or ():
        # pack_image_features folds the tile features into a (h // image_size, w // image_size) grid while the image
        # processor cuts ceil(side / tile) tiles: the two agree only for whole tiles
        if height < 1 or width < 1 or height % spec.vision.image_size or width % spec.vision.image_size:
            raise UnsupportedModelError(f"config.json image_grid_pinpoints [{height}, {width}] is not a whole number of"
                                        f" vision_config.image_size ({spec.vision.image_size}) tiles")
    for name, value in (("vision_config.layer_norm_eps", spec.vision.layer_norm_eps),
                        ("text_config.rms_norm_eps", spec.text.rms_norm_eps),
                        ("text_config.rope_theta", spec.text.rope_theta),
                        ("text_config.rope_scaling factor", spec.text.rope_scaling_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UnsupportedModelError(f"config.json {name} must be a positive number, got {value!r}")


def _architecture(cfg: dict) -> str:
    """The model class: ``architectures[0]``, or the one its ``model_type`` names when a config saved by
    ``save_pretrained()`` has none."""
    archs, model_type = cfg.get("architectures"), cfg.get("model_type")
    if archs:
        if not isinstance(archs, list):
            raise UnsupportedModelError(f"config.json architectures must be a list, got {archs!r}")
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"config.json architectures '{archs[0]}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                f" (vision: {', '.join(SUPPORTED_VISION)}; text: {', '.join(SUPPORTED_TEXT)})")
        expected = ARCHITECTURE_MODEL_TYPES[archs[0]]
        if model_type not in (None, expected):
            raise UnsupportedModelError(f"config.json model_type '{model_type}' is not supported with {archs[0]};"
                                        f" supported: {expected}")
        return archs[0]
    for arch, arch_model_type in ARCHITECTURE_MODEL_TYPES.items():
        if model_type == arch_model_type:
            return arch
    raise UnsupportedModelError(
        f"config.json model_type '{model_type}' is not supported and names no architectures; supported: model_type"
        f" {' or '.join(repr(t) for t in ARCHITECTURE_MODEL_TYPES.values())} or architectures"
        f" {', '.join(SUPPORTED_ARCHITECTURES)}")


def _pinpoints(cfg: dict) -> tuple[tuple[int, int], ...]:
    """A LLaVA-NeXT config's buckets as (height, width) pairs. Required, although LlavaNextConfig would fill in the
    LLaVA-1.6 list: every published NeXT config and every save_pretrained() copy writes them out, so a NeXT config
    without them is far likelier a relabelled LLaVA-1.5 config than one meaning those defaults, and the buckets set
    the length of every prompt. Their sizes are checked against the tower in _check_geometry."""
    value = cfg.get("image_grid_pinpoints")
    if value is None:
        raise UnsupportedModelError(f"config.json model_type '{LLAVA_NEXT_MODEL_TYPE}' has no image_grid_pinpoints:"
                                    " a LLaVA-NeXT config names its [height, width] buckets")
    if (not isinstance(value, list) or not value or not all(
            isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair) for pair in value)):
        raise UnsupportedModelError(f"config.json image_grid_pinpoints must be a list of [height, width] integer pairs,"
                                    f" got {value!r}")
    return tuple((pair[0], pair[1]) for pair in value)


def _sub_config(cfg: dict, key: str, absent: dict, families: dict[str, dict]) -> tuple[str, dict]:
    """(model_type, fields with the family's defaults filled in) of ``vision_config`` / ``text_config``."""
    given = cfg.get(key)
    if given is None:
        given = absent
    if not isinstance(given, dict):
        raise UnsupportedModelError(f"config.json {key} must be an object, got {type(given).__name__}")
    model_type = given.get("model_type", absent["model_type"])
    if not isinstance(model_type, str) or model_type not in families:
        raise UnsupportedModelError(
            f"config.json {key}.model_type '{model_type}' is not supported; supported: {', '.join(families)}")
    return model_type, {**families[model_type], **given}


def _rope_settings(text: dict) -> tuple[float, float]:
    """(theta, linear scaling factor) as transformers standardises them: the old ``rope_scaling`` wins
    over ``rope_parameters``, and a ``rope_theta`` inside that dict over the top-level one."""
    key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    params = text.get(key) or {}
    if not isinstance(params, dict):
        raise UnsupportedModelError(f"config.json text_config.{key} must be an object, got {type(params).__name__}")
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModelError(f"config.json text_config.{key} per layer type is not supported; use one RoPE")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"config.json text_config.{key} type '{rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE)}")
    theta = params.get("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA))
    if rope_type != "linear":
        return float(theta), 1.0
    if "factor" not in params:
        raise UnsupportedModelError(f"config.json text_config.{key} of type linear has no 'factor'")
    return float(theta), float(params["factor"])


def _quotient(hidden: Any, heads: Any) -> Any:
    """hidden // heads where both are positive integers; else None, for _check_geometry to name the bad field."""
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads))
    return hidden // heads if valid else None


def _spec_from_config(cfg: dict) -> ModelSpec:
    arch = _architecture(cfg)
    top = {**LLAVA_DEFAULTS, **cfg}
    vtype, vis = _sub_config(cfg, "vision_config", LLAVA_ABSENT_VISION_CONFIG, VISION_DEFAULTS)
    ttype, text = _sub_config(cfg, "text_config", LLAVA_ABSENT_TEXT_CONFIG, TEXT_DEFAULTS)
    feature_layer = top["vision_feature_layer"]
    if isinstance(feature_layer, list):
        raise UnsupportedModelError("config.json vision_feature_layer: a list of layers is not supported; use one layer")
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise UnsupportedModelError(f"config.json vision_feature_layer must be an integer, got {feature_layer!r}")
    strategy = top["vision_feature_select_strategy"]
    if strategy not in SUPPORTED_FEATURE_STRATEGIES:
        raise UnsupportedModelError(f"config.json vision_feature_select_strategy '{strategy}' is not supported;"
                                    f" supported: {', '.join(SUPPORTED_FEATURE_STRATEGIES)}")
    pinpoints = _pinpoints(cfg) if arch == LLAVA_NEXT else None
    if pinpoints is not None and strategy != "default":
        # pack_image_features views each tile's features as a square grid; the CLS token 'full' keeps breaks it
        raise UnsupportedModelError(f"config.json vision_feature_select_strategy '{strategy}' is not supported with"
                                    f" {LLAVA_NEXT}; supported: default")
    for name, act in (("vision_config.hidden_act", vis["hidden_act"]), ("text_config.hidden_act", text["hidden_act"]),
                      ("projector_hidden_act", top["projector_hidden_act"])):
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"config.json {name} '{act}' is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")

    vision = VisionSpec(
        hidden_size=vis["hidden_size"],
        intermediate_size=vis["intermediate_size"],
        num_layers=vis["num_hidden_layers"],
        num_heads=vis["num_attention_heads"],
        image_size=vis["image_size"],
        patch_size=vis["patch_size"],
        num_channels=vis["num_channels"],
        layer_norm_eps=float(vis["layer_norm_eps"]),
        hidden_act=vis["hidden_act"],
    )
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    theta, factor = _rope_settings(text)
    text_spec = TextSpec(
        model_type=ttype,
        hidden_size=hidden,
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        # LlamaConfig: null (its default) means as many as the attention heads; MistralConfig refuses null
        num_kv_heads=heads if text["num_key_value_heads"] is None and ttype == "llama" else text["num_key_value_heads"],
        head_dim=_quotient(hidden, heads) if text["head_dim"] is None else text["head_dim"],
        vocab_size=text["vocab_size"],
        rms_norm_eps=float(text["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=text["max_position_embeddings"],
        hidden_act=text["hidden_act"],
        attention_bias=bool(text.get("attention_bias", False)) if ttype == "llama" else False,
        mlp_bias=bool(text.get("mlp_bias", False)) if ttype == "llama" else False,
        # LlavaConfig.__post_init__: tied when either the LLaVA config or its text config says so
        tie_word_embeddings=bool(top["tie_word_embeddings"]) or bool(text["tie_word_embeddings"]),
        sliding_window=text["sliding_window"] if ttype == "mistral" else None,
    )
    # LlavaConfig.attribute_map: image_token_id is another name for image_token_index, and wins
    image_token_id = cfg.get("image_token_id", top["image_token_index"])
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int) or image_token_id < 0:
        raise UnsupportedModelError(f"config.json image_token_index must be a token id, got {image_token_id!r}")
    spec = ModelSpec(
        architecture=arch,
        vision=vision,
        text=text_spec,
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=top["projector_hidden_act"],
        projector_bias=bool(top["multimodal_projector_bias"]),
        fingerprint="",
        image_grid_pinpoints=pinpoints,
        image_newline=True if pinpoints is not None else None,
    )
    return replace(spec, fingerprint=geometry_fingerprint(spec))


def geometry_fingerprint(spec: ModelSpec) -> str:
    """sha256 of the geometry as transformers resolves it (every field, defaults filled), so a hub config, its
    save_pretrained() copy and a hand-filled config of the same model get one fingerprint; names, dtypes and
    other fields that do not change the graphs do not enter it."""
    fields = {key: value for key, value in spec.to_dict().items() if key not in _NOT_GEOMETRY}
    return sha256_text(canonical_json(fields))


def spec_from_manifest(model: dict) -> ModelSpec:
    """Rebuild the ModelSpec a bundle's manifest recorded (``manifest["model"]``)."""
    fields = {k: v for k, v in model.items() if k not in ("vision", "text", "visual_tokens")}
    if fields.get("image_grid_pinpoints") is not None:  # JSON lists back to the tuples the spec compares by
        fields["image_grid_pinpoints"] = tuple(tuple(pair) for pair in fields["image_grid_pinpoints"])
    return ModelSpec(vision=VisionSpec(**model["vision"]), text=TextSpec(**model["text"]), **fields)
