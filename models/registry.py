"""Resolve ``--model``: a local Hugging Face directory or a built-in name.

Built-in models are made by code (or shipped in the package) and materialised once into
a cache directory. The registry holds ``"module:function"`` strings so that listing the
names imports nothing heavy.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from mllm_deploy.core.errors import InputFileError
from mllm_deploy.formats.geometry import ModelSpec, read_config, spec_from_config

GENERATED_MODELS: dict[str, str] = {
    # name -> "module:function(target_dir)" that writes a complete HF model directory
    "tiny-llava": "mllm_deploy.models.tiny:write_tiny_llava",
    "small-llava": "mllm_deploy.models.tiny:write_small_llava",
    # geometry only (config.json, no weights): FLOPs, KV-memory and recipe planning
    "llava-1.5-7b-shape": "mllm_deploy.models.presets:write_llava15_7b_shape",
    "llava-1.5-13b-shape": "mllm_deploy.models.presets:write_llava15_13b_shape",
}
PACKAGED_MODELS: dict[str, str] = {
    # name -> "module:function()" returning a model directory shipped in the repository
    "shapes-llava": "mllm_deploy.models.shapes_llava:packaged_model",
}
BUILTIN_MODELS = {**GENERATED_MODELS, **PACKAGED_MODELS}


def cache_dir() -> Path:
    root = os.environ.get("MLLM_DEPLOY_CACHE") or os.path.join(Path.home(), ".cache", "mllm-deploy")
    return Path(root)


def _materialise_builtin(name: str) -> Path:
    module_name, func_name = BUILTIN_MODELS[name].split(":")
    module = importlib.import_module(module_name)
    if name in PACKAGED_MODELS:
        return Path(getattr(module, func_name)())
    version = getattr(module, "BUILTIN_VERSION", "1")
    target = cache_dir() / "models" / f"{name}-v{version}"
    if (target / "config.json").is_file():
        return target
    getattr(module, func_name)(target)
    return target


def resolve_model(name_or_path: str) -> Path:
    """Return the model directory for a built-in name or a local path."""
    if name_or_path in BUILTIN_MODELS:
        return _materialise_builtin(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        raise InputFileError(
            f"model '{name_or_path}' is neither a directory nor a built-in name"
            f" (built-in: {', '.join(sorted(BUILTIN_MODELS))})"
        )
    if not path.is_dir():
        raise InputFileError(f"model path {name_or_path} is a file; pass the Hugging Face model directory")
    return path


def load_spec(name_or_path: str) -> tuple[Path, ModelSpec]:
    model_dir = resolve_model(name_or_path)
    return model_dir, spec_from_config(read_config(model_dir))
