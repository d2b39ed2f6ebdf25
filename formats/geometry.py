"""What mllm-deploy knows about a model, read from ``config.json`` alone (no weights, no torch).

The same :class:`ModelSpec` drives the exporter, the FLOPs model and the manifest, so a
7B geometry can be described on any machine from its config file.

A Hugging Face ``config.json`` holds only what differs from its config classes' defaults:
llava-hf/llava-1.5-7b-hf's ``text_config`` has no hidden size, layer or head count at all, and
transformers fills them in from ``LlamaConfig``. To read such a file the way transformers does,
without importing it, the defaults of the classes involved are copied below as data. They are
those of transformers ``TRANSFORMERS_DEFAULTS_VERSION`` (defaults have changed between releases;
tests/test_configs.py checks every field against the installed transformers' ``AutoConfig``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import InputFileError, UnsupportedModelError
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
SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
LLAVA_MODEL_TYPE = "llava"  # a config saved by LlavaConfig.save_pretrained() may have no architectures
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

    @property
    def tower_visual_tokens(self) -> int:
        """Visual tokens the vision tower and projector make per image."""
        extra = 0 if self.vision_feature_select_strategy == "default" else 1
        return self.vision.num_patches + extra

    @property
    def visual_tokens(self) -> int:
        """Visual tokens in the language model's prompt: the tower's, or fewer after a pre-LLM selection."""
        return self.tower_visual_tokens if self.llm_visual_tokens is None else self.llm_visual_tokens

    def tower(self) -> "ModelSpec":
        """The spec without a pre-LLM selection (the model as published)."""
        return replace(self, llm_visual_tokens=None) if self.llm_visual_tokens is not None else self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["llm_visual_tokens"] is None:
            del d["llm_visual_tokens"]
        return d


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
    for name, value in (("vision_config.layer_norm_eps", spec.vision.layer_norm_eps),
                        ("text_config.rms_norm_eps", spec.text.rms_norm_eps),
                        ("text_config.rope_theta", spec.text.rope_theta),
                        ("text_config.rope_scaling factor", spec.text.rope_scaling_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UnsupportedModelError(f"config.json {name} must be a positive number, got {value!r}")


def _architecture(cfg: dict) -> str:
    """The model class: ``architectures[0]``, or LLaVA's when a config saved by ``LlavaConfig`` has none."""
    archs, model_type = cfg.get("architectures"), cfg.get("model_type")
    if archs:
        if not isinstance(archs, list):
            raise UnsupportedModelError(f"config.json architectures must be a list, got {archs!r}")
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"config.json architectures '{archs[0]}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                f" (vision: {', '.join(SUPPORTED_VISION)}; text: {', '.join(SUPPORTED_TEXT)})")
        if model_type not in (None, LLAVA_MODEL_TYPE):
            raise UnsupportedModelError(f"config.json model_type '{model_type}' is not supported with {archs[0]};"
                                        f" supported: {LLAVA_MODEL_TYPE}")
        return archs[0]
    if model_type == LLAVA_MODEL_TYPE:
        return SUPPORTED_ARCHITECTURES[0]
    raise UnsupportedModelError(
        f"config.json model_type '{model_type}' is not supported and names no architectures; supported: model_type"
        f" '{LLAVA_MODEL_TYPE}' or architectures {', '.join(SUPPORTED_ARCHITECTURES)}")


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
    )
    return replace(spec, fingerprint=geometry_fingerprint(spec))


def geometry_fingerprint(spec: ModelSpec) -> str:
    """sha256 of the geometry as transformers resolves it (every field, defaults filled), so a hub config, its
    save_pretrained() copy and a hand-filled config of the same model get one fingerprint; names, dtypes and
    other fields that do not change the graphs do not enter it."""
    fields = {key: value for key, value in spec.to_dict().items() if key not in ("fingerprint", "llm_visual_tokens")}
    return sha256_text(canonical_json(fields))


def spec_from_manifest(model: dict) -> ModelSpec:
    """Rebuild the ModelSpec a bundle's manifest recorded (``manifest["model"]``)."""
    fields = {k: v for k, v in model.items() if k not in ("vision", "text", "visual_tokens")}
    return ModelSpec(vision=VisionSpec(**model["vision"]), text=TextSpec(**model["text"]), **fields)
