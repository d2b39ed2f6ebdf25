"""What mllm-deploy knows about a model, read from ``config.json`` alone (no weights, no torch).

The same :class:`ModelSpec` drives the exporter, the FLOPs model and the manifest, so a
7B geometry can be described on any machine from its config file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import InputFileError, UnsupportedModelError
from mllm_deploy.core.hashing import canonical_json, sha256_text

# Supported pieces, as data. Adding a family means adding its name here and its
# graph builder in export/ (the builders only need the fields of ModelSpec).
SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
SUPPORTED_VISION = ("clip_vision_model",)
SUPPORTED_TEXT = ("llama", "mistral")
SUPPORTED_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "relu")
SUPPORTED_ROPE = ("default", "linear")


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

    @property
    def visual_tokens(self) -> int:
        extra = 0 if self.vision_feature_select_strategy == "default" else 1
        return self.vision.num_patches + extra

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _need(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise UnsupportedModelError(f"{where} has no '{key}'; is this a Hugging Face LLaVA config.json?")
    return cfg[key]


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


def _rope_settings(text: dict) -> tuple[float, float]:
    """(theta, linear scaling factor) from the old and new Hugging Face spellings."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type not in SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"RoPE type '{rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE)}"
        )
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(theta), factor


def spec_from_config(cfg: dict) -> ModelSpec:
    """The model geometry from a parsed config.json; a config of the wrong shape (a list where an
    object belongs, a string where a number does) is a user error, not a crash."""
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    try:
        spec = _spec_from_config(cfg)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise UnsupportedModelError(f"config.json is malformed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    _check_geometry(spec)
    return spec


def _check_geometry(spec: ModelSpec) -> None:
    """Sizes are positive integers that fit together; eps and rope theta positive and finite."""
    import math

    counts = {f"vision_config.{k}": getattr(spec.vision, k) for k in (
        "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size", "num_channels")}
    counts.update({f"text_config.{k}": getattr(spec.text, k) for k in (
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
    if spec.text.num_heads % spec.text.num_kv_heads:
        raise UnsupportedModelError("config.json text_config.num_attention_heads is not a multiple of num_key_value_heads")
    for name, value in (("vision_config.layer_norm_eps", spec.vision.layer_norm_eps),
                        ("text_config.rms_norm_eps", spec.text.rms_norm_eps),
                        ("text_config.rope_theta", spec.text.rope_theta),
                        ("text_config.rope_scaling factor", spec.text.rope_scaling_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UnsupportedModelError(f"config.json {name} must be a positive number, got {value!r}")


def _spec_from_config(cfg: dict) -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else cfg.get("model_type", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            f" (vision: {', '.join(SUPPORTED_VISION)}; text: {', '.join(SUPPORTED_TEXT)})"
        )
    vis = _need(cfg, "vision_config", "config.json")
    text = _need(cfg, "text_config", "config.json")
    vtype = vis.get("model_type", "clip_vision_model")
    ttype = text.get("model_type", "llama")
    if vtype not in SUPPORTED_VISION:
        raise UnsupportedModelError(f"vision tower '{vtype}' is not supported; supported: {', '.join(SUPPORTED_VISION)}")
    if ttype not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"text model '{ttype}' is not supported; supported: {', '.join(SUPPORTED_TEXT)}")
    feature_layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise UnsupportedModelError("a list of vision_feature_layer values is not supported; use a single layer")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UnsupportedModelError(f"vision_feature_select_strategy '{strategy}' is not supported")
    for act in (vis.get("hidden_act", "quick_gelu"), text.get("hidden_act", "silu"), cfg.get("projector_hidden_act", "gelu")):
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"activation '{act}' is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")

    vision = VisionSpec(
        hidden_size=int(vis.get("hidden_size", 768)),
        intermediate_size=int(vis.get("intermediate_size", 3072)),
        num_layers=int(vis.get("num_hidden_layers", 12)),
        num_heads=int(vis.get("num_attention_heads", 12)),
        image_size=int(vis.get("image_size", 224)),
        patch_size=int(vis.get("patch_size", 32)),
        num_channels=int(vis.get("num_channels", 3)),
        layer_norm_eps=float(vis.get("layer_norm_eps", 1e-5)),
        hidden_act=vis.get("hidden_act", "quick_gelu"),
    )
    hidden = int(_need(text, "hidden_size", "text_config"))
    heads = int(_need(text, "num_attention_heads", "text_config"))
    theta, factor = _rope_settings(text)
    text_spec = TextSpec(
        model_type=ttype,
        hidden_size=hidden,
        intermediate_size=int(_need(text, "intermediate_size", "text_config")),
        num_layers=int(_need(text, "num_hidden_layers", "text_config")),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        vocab_size=int(_need(text, "vocab_size", "text_config")),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        hidden_act=text.get("hidden_act", "silu"),
        attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        sliding_window=text.get("sliding_window") if ttype == "mistral" else None,
    )
    if text_spec.num_heads % text_spec.num_kv_heads:
        raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")
    image_token_id = cfg.get("image_token_id", cfg.get("image_token_index"))
    if image_token_id is None:
        raise UnsupportedModelError("config.json has no image_token_id (or image_token_index)")
    return ModelSpec(
        architecture=arch,
        vision=vision,
        text=text_spec,
        image_token_id=int(image_token_id),
        vision_feature_layer=int(feature_layer),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        fingerprint=sha256_text(canonical_json(text)),
    )


def spec_from_manifest(model: dict) -> ModelSpec:
    """Rebuild the ModelSpec a bundle's manifest recorded (``manifest["model"]``)."""
    fields = {k: v for k, v in model.items() if k not in ("vision", "text", "visual_tokens")}
    return ModelSpec(vision=VisionSpec(**model["vision"]), text=TextSpec(**model["text"]), **fields)
