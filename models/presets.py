"""Geometry presets: LLaVA-1.5-7B and -13B, and LLaVA-NeXT (1.6) 7B with Vicuna and with Mistral text, as
config.json alone, for FLOPs, KV-memory and recipe planning on any machine (`flops-mllm`, static `calib-mllm`
methods, report estimates).

They carry no weights: a 7B model with random weights needs 28 GB in fp32, more than our build
machines have. Exporting one says so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from mllm_deploy.core.fsutil import atomic_directory

_LLAVA15_VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# llava-hf/llava-1.5-7b-hf and -13b-hf hyperparameters (their config.json files)
LLAVA15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    "vision_config": _LLAVA15_VISION,
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "mllm_deploy_preset": "geometry only: no weights",
}
LLAVA15_13B = copy.deepcopy(LLAVA15_7B)
LLAVA15_13B["text_config"].update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40)

# LLaVA-NeXT's five buckets at 336 px, [height, width] (the llava-hf 1.6 configs and LlavaNextConfig's default)
LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_LLAVA16_VISION = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                   "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                   "vocab_size": 32000}
# llava-hf/llava-v1.6-mistral-7b-hf's config.json, key for key and value for value as NVIDIA/TensorRT-LLM quotes it
# (tests/unittest/_torch/modeling/test_modeling_llava_next.py, LLAVA_NEXT_7B_CONFIG), except two edits that test
# makes: vision_config.num_hidden_layers is the published 24 (the test cuts it to 2, saying so), and the test's
# top-level _name_or_path (a local path of theirs) is left out. Its text_config is the one in
# tests/data/configs/text/. Not a byte-for-byte copy of the file: key order and spacing are ours.
LLAVA16_MISTRAL_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100, "image_grid_pinpoints": LLAVA16_PINPOINTS,
    "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                    "torch_dtype": "bfloat16", "vocab_size": 32064},
    "torch_dtype": "float16", "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": True,
    "vision_config": _LLAVA16_VISION, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
    "mllm_deploy_preset": "geometry only: no weights",
}
# llava-hf/llava-v1.6-vicuna-7b-hf's config.json WRITTEN FROM FACTS, not copied (no copy of the file was at hand):
# - its keys are those huggingface/candle's llava example requires of that file (candle-transformers
#   src/models/llava/config.rs, HFLLaVAConfig and HFLLaVATextConfig, "config from llava-v1.6-vicuna-7b-hf"), which
#   are the Mistral sibling's top-level keys; the file may hold more that candle ignores (transformers_version at
#   least, left out here because its value is not known);
# - the top level and vision_config take the sibling's values (both were converted by the same llava-hf script
#   from the same CLIP ViT-L/14-336 tower and the same 336-px buckets);
# - text_config is lmsys/vicuna-7b-v1.5 as llava-hf records it for LLaVA-1.5-7B (tests/data/configs/), plus the
#   pad_token_id key candle requires here, with vicuna-7b-v1.5's own value 0.
# The sizes a wrong guess could change are not written at all: LlamaConfig's defaults fill them, as for
# llava-hf/llava-1.5-7b-hf. A verbatim copy of the published file should replace this one.
LLAVA16_VICUNA_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100, "image_grid_pinpoints": LLAVA16_PINPOINTS,
    "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "torch_dtype": "float16", "use_image_newline_parameter": True,
    "vision_config": _LLAVA16_VISION, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
    "mllm_deploy_preset": "geometry only: no weights (config written from facts, not a copy: models/presets.py)",
}
PRESETS = {"llava-1.5-7b-shape": LLAVA15_7B, "llava-1.5-13b-shape": LLAVA15_13B,
           "llava-v1.6-vicuna-7b-shape": LLAVA16_VICUNA_7B, "llava-v1.6-mistral-7b-shape": LLAVA16_MISTRAL_7B}


def is_geometry_preset(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "config.json"
    return path.is_file() and "mllm_deploy_preset" in json.loads(path.read_text())


def _write(target: Path, config: dict) -> Path:
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(target)


def write_llava15_7b_shape(target: str | Path) -> Path:
    return _write(Path(target), LLAVA15_7B)


def write_llava15_13b_shape(target: str | Path) -> Path:
    return _write(Path(target), LLAVA15_13B)


def write_llava16_vicuna_7b_shape(target: str | Path) -> Path:
    return _write(Path(target), LLAVA16_VICUNA_7B)


def write_llava16_mistral_7b_shape(target: str | Path) -> Path:
    return _write(Path(target), LLAVA16_MISTRAL_7B)
