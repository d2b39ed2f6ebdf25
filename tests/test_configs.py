"""config.json read the way transformers reads it: a checkpoint's geometry, defaults filled in, equals
what ``transformers.AutoConfig`` makes of the same file and what ``LlavaForConditionalGeneration``
builds from it (on the meta device: shapes without memory), for published configs kept verbatim in
tests/data/configs/, for configs that transformers itself writes, and for edge cases of the defaults.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from conftest import run_cli

from mllm_deploy.core.errors import DependencyError, RecipeError, UnsupportedModelError
from mllm_deploy.formats.geometry import TRANSFORMERS_DEFAULTS_VERSION, ModelSpec, read_config, spec_from_config

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent / "data" / "configs"
# Published config.json files, byte for byte (file name: the Hub id with '/' as '--'). Any file dropped
# in here is checked; those with a geometry preset must cost the same FLOPs as the preset.
VERBATIM = sorted(CONFIGS.glob("*.json"))
PRESET_OF = {"llava-hf--llava-1.5-7b-hf.json": "llava-1.5-7b-shape",
             "llava-hf--llava-1.5-13b-hf.json": "llava-1.5-13b-shape"}

LLAVA_7B = json.loads((CONFIGS / "llava-hf--llava-1.5-7b-hf.json").read_text())
# llava-hf/llava-1.5-13b-hf's config.json is NOT published here: no verbatim copy was at hand (the search
# corpora hold none), so the 13B case is a stand-in in the shape of llava-hf's (a partial text_config that
# leaves the rest to transformers' defaults), its values illustrative. A verbatim file dropped into
# tests/data/configs/ is checked automatically and is better.
LLAVA_13B_LIKE = copy.deepcopy(LLAVA_7B)
LLAVA_13B_LIKE["text_config"].update(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                     num_hidden_layers=40, num_key_value_heads=40)
# A Mistral-text LLaVA: the text_config is llava-hf/llava-v1.6-mistral-7b-hf's, as published (key for key,
# quoted in TensorRT-LLM's tests/unittest/_torch/modeling/test_modeling_llava_next.py), inside the 1.5
# wrapper (LLaVA-NeXT's own geometry: tests/test_next_geometry.py). It leaves hidden_size, the layer and head counts to
# MistralConfig's defaults and sets sliding_window to null.
MISTRAL_TEXT = copy.deepcopy(LLAVA_7B)
MISTRAL_TEXT["text_config"] = json.loads((CONFIGS / "text" / "llava-hf--llava-v1.6-mistral-7b-hf.text_config.json")
                                         .read_text())


def _edge(**changes) -> dict:
    """The 7B config with top-level keys replaced (None removes the key) or text_config keys updated."""
    cfg = copy.deepcopy(LLAVA_7B)
    cfg["text_config"].update(changes.pop("text", {}))
    cfg["vision_config"].update(changes.pop("vision", {}))
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


HAND_WRITTEN = {
    "llava-1.5-13b-like": LLAVA_13B_LIKE,
    "llava-v1.6-mistral-text": MISTRAL_TEXT,
    "mistral-no-sliding-window": _edge(text={"model_type": "mistral", "num_key_value_heads": 32, "sliding_window": None}),
    "bare-llava": {"model_type": "llava"},  # both sub-configs absent: LlavaConfig's sub_configs_defaults
    "no-architectures": _edge(architectures=None),
    "linear-rope-old-spelling": _edge(text={"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500000.0}),
    "linear-rope-new-spelling": _edge(text={"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 20000.0}}),
    "explicit-head-dim-and-gqa": _edge(text={"head_dim": 64, "num_key_value_heads": 8, "attention_bias": True}),
    "image-token-id-spelling": _edge(image_token_index=None, image_token_id=7),
    "tied-in-text-config": _edge(text={"tie_word_embeddings": True}),
    "full-strategy-and-other-layer": _edge(vision_feature_select_strategy="full", vision_feature_layer=-1,
                                           multimodal_projector_bias=False),
    "vision-defaults": _edge(vision_config={"model_type": "clip_vision_model"}),
}


def _saved_by_transformers(target: Path, **kwargs) -> Path:
    transformers.LlavaConfig(**kwargs).save_pretrained(target)
    return target


SAVED = {  # written by transformers.LlavaConfig(...).save_pretrained(): model_type llava, no architectures
    "saved-llama": dict(text_config={"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8,
                                     "num_key_value_heads": 2, "num_hidden_layers": 3, "intermediate_size": 512,
                                     "vocab_size": 1000},
                        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "num_attention_heads": 4,
                                       "image_size": 56, "patch_size": 7, "num_hidden_layers": 2,
                                       "intermediate_size": 128},
                        image_token_id=999),
    "saved-mistral": dict(text_config={"model_type": "mistral", "hidden_size": 256, "num_attention_heads": 8,
                                       "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 1000,
                                       "tie_word_embeddings": True}),
    "saved-defaults": dict(),
}


def model_dir_for(case: str, root: Path) -> Path:
    target = root / case
    if case in SAVED:
        return _saved_by_transformers(target, **SAVED[case])
    target.mkdir(parents=True)
    if case in HAND_WRITTEN:
        (target / "config.json").write_text(json.dumps(HAND_WRITTEN[case], indent=2))
    else:
        (target / "config.json").write_bytes((CONFIGS / case).read_bytes())
    return target


CASES = [p.name for p in VERBATIM] + list(HAND_WRITTEN) + list(SAVED)


# ---- what transformers makes of a config -------------------------------------------------------------
def transformers_geometry(model_dir: Path) -> dict:
    """Every ModelSpec field that has a transformers counterpart, read from AutoConfig."""
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "vision": {"hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
                   "num_layers": vision.num_hidden_layers, "num_heads": vision.num_attention_heads,
                   "image_size": vision.image_size, "patch_size": vision.patch_size,
                   "num_channels": vision.num_channels, "layer_norm_eps": vision.layer_norm_eps,
                   "hidden_act": vision.hidden_act},
        "text": {"model_type": text.model_type, "hidden_size": text.hidden_size,
                 "intermediate_size": text.intermediate_size, "num_layers": text.num_hidden_layers,
                 "num_heads": text.num_attention_heads, "num_kv_heads": text.num_key_value_heads,
                 "head_dim": text.head_dim, "vocab_size": text.vocab_size, "rms_norm_eps": text.rms_norm_eps,
                 "rope_theta": rope["rope_theta"],
                 "rope_scaling_factor": rope["factor"] if rope["rope_type"] == "linear" else 1.0,
                 "max_position_embeddings": text.max_position_embeddings, "hidden_act": text.hidden_act,
                 # MistralConfig has no bias fields: its layers are built without biases
                 "attention_bias": getattr(text, "attention_bias", False), "mlp_bias": getattr(text, "mlp_bias", False),
                 "tie_word_embeddings": config.tie_word_embeddings,
                 "sliding_window": text.sliding_window if text.model_type == "mistral" else None},
        "image_token_id": config.image_token_id,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": config.projector_hidden_act,
        "projector_bias": config.multimodal_projector_bias,
    }


def ours(spec: ModelSpec) -> dict:
    return {k: v for k, v in spec.to_dict().items() if k not in ("architecture", "fingerprint")}


def check_built_model(model_dir: Path, spec: ModelSpec) -> None:
    """The modules LlavaForConditionalGeneration builds (meta device: no memory) have the spec's shapes."""
    import torch

    from mllm_deploy.export.weights import llava_modules

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(config)
    vision, projector, text, lm_head = llava_modules(model)
    t, v = spec.text, spec.vision
    layer = text.layers[0]
    assert len(text.layers) == t.num_layers
    assert tuple(layer.self_attn.q_proj.weight.shape) == (t.num_heads * t.head_dim, t.hidden_size)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (t.num_kv_heads * t.head_dim, t.hidden_size)
    assert (layer.self_attn.q_proj.bias is not None) == t.attention_bias
    assert tuple(layer.mlp.gate_proj.weight.shape) == (t.intermediate_size, t.hidden_size)
    assert (layer.mlp.gate_proj.bias is not None) == t.mlp_bias
    assert layer.input_layernorm.variance_epsilon == t.rms_norm_eps
    assert tuple(text.embed_tokens.weight.shape) == (t.vocab_size, t.hidden_size)
    assert tuple(lm_head.weight.shape) == (t.vocab_size, t.hidden_size)
    assert (lm_head.weight is text.embed_tokens.weight) == t.tie_word_embeddings
    rotary = type(text.rotary_emb)(config=config.text_config)  # on the CPU: meta tensors hold no values
    inv_freq = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=torch.int64).float() / t.head_dim))
    assert torch.allclose(rotary.inv_freq, inv_freq / t.rope_scaling_factor)
    assert len(vision.encoder.layers) == v.num_layers
    assert tuple(vision.embeddings.patch_embedding.weight.shape) == (v.hidden_size, v.num_channels, v.patch_size,
                                                                   v.patch_size)
    assert vision.embeddings.position_embedding.weight.shape[0] == v.num_patches + 1
    assert tuple(vision.encoder.layers[0].mlp.fc1.weight.shape) == (v.intermediate_size, v.hidden_size)
    assert vision.encoder.layers[0].self_attn.num_heads == v.num_heads
    assert vision.encoder.layers[0].layer_norm1.eps == v.layer_norm_eps
    assert tuple(projector.linear_1.weight.shape) == (t.hidden_size, v.hidden_size)
    assert (projector.linear_1.bias is not None) == spec.projector_bias


@pytest.mark.parametrize("case", CASES)
def test_geometry_equals_transformers(case, tmp_path):
    model_dir = model_dir_for(case, tmp_path)
    spec = spec_from_config(read_config(model_dir))
    assert ours(spec) == transformers_geometry(model_dir)
    assert spec.architecture == "LlavaForConditionalGeneration"
    check_built_model(model_dir, spec)


def test_encoded_defaults_are_the_installed_transformers():
    """Each default table equals the installed config class's dataclass defaults, key by key (they were copied
    from transformers TRANSFORMERS_DEFAULTS_VERSION; another release may differ, and this says where)."""
    import dataclasses

    from mllm_deploy.formats import geometry

    print(f"defaults encoded from transformers {TRANSFORMERS_DEFAULTS_VERSION}; installed {transformers.__version__}")
    for table, cls in ((geometry.LLAMA_DEFAULTS, transformers.LlamaConfig),
                       (geometry.MISTRAL_DEFAULTS, transformers.MistralConfig),
                       (geometry.CLIP_VISION_DEFAULTS, transformers.CLIPVisionConfig),
                       (geometry.LLAVA_DEFAULTS, transformers.LlavaConfig)):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {key: fields[key] for key in table} == table, cls.__name__
        assert cls.default_theta == geometry.DEFAULT_ROPE_THETA
    subconfigs = getattr(transformers.LlavaConfig, "sub_configs_defaults", None)
    if subconfigs is not None:  # older releases spell them in __init__; the "bare-llava" case checks them there
        vision, text = subconfigs["vision_config"], subconfigs["text_config"]
        assert {"model_type": vision.model_type, **vision.init_kwargs} == geometry.LLAVA_ABSENT_VISION_CONFIG
        assert {"model_type": text.model_type, **text.init_kwargs} == geometry.LLAVA_ABSENT_TEXT_CONFIG


def test_saved_config_has_no_architectures(tmp_path):
    saved = json.loads((model_dir_for("saved-llama", tmp_path) / "config.json").read_text())
    assert saved["model_type"] == "llava" and not saved.get("architectures")


def test_verbatim_7b_is_kept_verbatim():
    """The published file itself, not a re-serialisation: llava-hf's partial text_config."""
    text = (CONFIGS / "llava-hf--llava-1.5-7b-hf.json").read_text()
    assert text.startswith('{\n  "architectures": [\n    "LlavaForConditionalGeneration"\n  ],\n')
    assert '"transformers_version": "4.36.0.dev0"' in text and "hidden_size\": 4096" not in text


# ---- the commands on these configs ---------------------------------------------------------------------
def _flops(model: str) -> dict:
    result = run_cli("flops-mllm", "--model", model, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


FLOPS_CASES = [(name, preset) for name, preset in PRESET_OF.items() if (CONFIGS / name).is_file()]
FLOPS_CASES.append(("llava-1.5-13b-like", "llava-1.5-13b-shape"))


@pytest.mark.parametrize("case,preset", FLOPS_CASES)
def test_flops_equal_the_preset(case, preset, tmp_path):
    assert _flops(str(model_dir_for(case, tmp_path))) == _flops(preset)


@pytest.mark.parametrize("case", ["llava-hf--llava-1.5-7b-hf.json", "llava-v1.6-mistral-text", "saved-llama"])
def test_static_calibration_from_config_alone(case, tmp_path):
    model_dir = model_dir_for(case, tmp_path)
    assert [p.name for p in model_dir.iterdir()] == ["config.json"]
    out = tmp_path / "fastv.json"
    result = run_cli("calib-mllm", "--model", str(model_dir), "--method", "fastv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    recipe = json.loads(out.read_text())
    spec = spec_from_config(read_config(model_dir))
    assert len(recipe["visual_tokens"]) == spec.text.num_layers
    assert recipe["visual_tokens"][:2] == [spec.visual_tokens] * 2
    assert recipe["visual_tokens"][2] == round(spec.visual_tokens * 0.5)


# ---- unsupported variants: one line naming the field ---------------------------------------------------
REFUSED = {
    "vision tower": (_edge(vision={"model_type": "siglip_vision_model"}), "vision_config.model_type 'siglip_vision_model'"),
    "text model": (_edge(text={"model_type": "qwen2"}), "text_config.model_type 'qwen2'"),
    "rope type": (_edge(text={"rope_scaling": {"type": "dynamic", "factor": 2.0}}), "text_config.rope_scaling type 'dynamic'"),
    "rope llama3": (_edge(text={"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
                    "text_config.rope_parameters type 'llama3'"),
    "rope per layer": (_edge(text={"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
                       "text_config.rope_parameters per layer type"),
    "feature layers": (_edge(vision_feature_layer=[-2, -5]), "vision_feature_layer"),
    "strategy": (_edge(vision_feature_select_strategy="cls"), "vision_feature_select_strategy 'cls'"),
    "llava-next without buckets": (_edge(architectures=None, model_type="llava_next"),
                                   "model_type 'llava_next' has no image_grid_pinpoints"),
    "wrong pair": (_edge(model_type="llava_next"), "model_type 'llava_next' is not supported with"),
    "activation": (_edge(text={"hidden_act": "swish2"}), "text_config.hidden_act 'swish2'"),
    "text not object": (_edge(text_config=[1, 2]), "text_config must be an object"),
    "mha split": (_edge(text={"hidden_size": 4100}), "text_config.hidden_size is not a multiple"),
    "mistral null kv heads": (_edge(text={"model_type": "mistral", "num_key_value_heads": None}),
                              "text_config.num_key_value_heads must be a positive integer, got None"),
    "heads zero": (_edge(text={"num_attention_heads": 0}), "text_config.num_attention_heads must be a positive integer"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_variant_is_one_line_naming_the_field(name, tmp_path, capsys):
    from mllm_deploy.calib import flops_cli

    cfg, field = REFUSED[name]
    with pytest.raises(UnsupportedModelError, match=field.replace("[", r"\[")):
        spec_from_config(cfg)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert flops_cli.main(["--model", str(model_dir)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines


def test_partial_7b_config_no_longer_fails_in_every_command(tmp_path):
    """The three commands that read a model: flops and calib from the config alone; export gets past the
    geometry (and says there are no weights, rather than 'text_config has no hidden_size')."""
    model_dir = model_dir_for("llava-hf--llava-1.5-7b-hf.json", tmp_path)
    export = run_cli("export-mllm", "--model", str(model_dir), "-o", str(tmp_path / "bundle"), "--max-memory", "1MB")
    assert export.returncode == 1 and "hidden_size" not in export.stderr, export.stderr
    assert len(export.stderr.strip().splitlines()) == 1, export.stderr


# ---- the transformers floor ------------------------------------------------------------------------------
def test_transformers_floor_is_declared_and_met():
    from conftest import REPO

    from mllm_deploy.models.loading import TRANSFORMERS_FLOOR, check_transformers_version

    declared = re.findall(r'"transformers>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert declared == [TRANSFORMERS_FLOOR]
    check_transformers_version(transformers.__version__)
    for new_enough in (TRANSFORMERS_FLOOR, f"{TRANSFORMERS_FLOOR}.0", "5.24.0", "6.0.0rc1"):
        check_transformers_version(new_enough)


@pytest.mark.parametrize("old", ["4.57.1", "5.5.4", "4.45.0.dev0", "unknown"])
def test_older_transformers_is_refused_in_one_line(old, monkeypatch, tmp_path):
    from mllm_deploy.models import loading

    with pytest.raises(DependencyError) as refused:
        loading.check_transformers_version(old)
    message = str(refused.value)
    assert "\n" not in message and f"transformers {old} is too old" in message
    assert f"transformers>={loading.TRANSFORMERS_FLOOR}" in message
    import transformers as current  # the module object in sys.modules now (transformers may swap its own)

    monkeypatch.setattr(current, "__version__", old)  # what load_hf_model sees
    with pytest.raises(DependencyError, match=f"needs transformers>={loading.TRANSFORMERS_FLOOR}"):
        loading.load_hf_model(tmp_path)


# ---- the recipe fingerprint ------------------------------------------------------------------------------
def test_fingerprint_is_the_resolved_geometry(tmp_path):
    """A hub config and transformers' save_pretrained() copy of it (every default written out, other names
    and versions) are one model: a recipe made from either fits the other. A changed geometry field does not."""
    hub = model_dir_for("llava-hf--llava-1.5-7b-hf.json", tmp_path)
    saved = tmp_path / "saved"
    transformers.AutoConfig.from_pretrained(hub, local_files_only=True).save_pretrained(saved)
    assert (saved / "config.json").read_text() != (hub / "config.json").read_text()
    out = tmp_path / "fastv.json"
    result = run_cli("calib-mllm", "--model", str(hub), "--method", "fastv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    from mllm_deploy.formats.recipe import load_recipe

    recipe = load_recipe(out)
    recipe.check_model(spec_from_config(read_config(saved)))  # raises on a mismatch
    for change in ({"rms_norm_eps": 1e-6}, {"rope_theta": 20000.0}, {"vocab_size": 32000}):
        other = spec_from_config(_edge(text=change))
        with pytest.raises(RecipeError, match="model.fingerprint"):
            recipe.check_model(other)
