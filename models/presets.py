"""Geometry presets: LLaVA-1.5-7B and -13B as config.json alone, for FLOPs, KV-memory and recipe
planning on any machine (`flops-mllm`, static `calib-mllm` methods, report estimates).

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
PRESETS = {"llava-1.5-7b-shape": LLAVA15_7B, "llava-1.5-13b-shape": LLAVA15_13B}


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
