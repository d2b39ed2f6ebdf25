"""Resolve ``--model``: a built-in name, a local Hugging Face directory, or a Hugging Face id.

Built-in models are made by code (or shipped in the package) and materialised once into
a cache directory. The registry holds ``"module:function"`` strings so that listing the
names imports nothing heavy.

A Hugging Face id (``ORG/NAME`` or ``ORG/NAME@REVISION``, a branch, tag or commit) is looked up
in huggingface_hub's local cache only (``HF_HUB_CACHE`` / ``HF_HOME``, or ``--cache-dir``), never
over the network: deployment machines are often offline, and a command that sometimes downloads
gigabytes is not one to script. A built-in name, then an existing local path, win over an id.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from pathlib import Path

from mllm_deploy.core.errors import DependencyError, InputFileError
from mllm_deploy.formats.geometry import ModelSpec, read_config, spec_from_config

GENERATED_MODELS: dict[str, str] = {
    # name -> "module:function(target_dir)" that writes a complete HF model directory
    "tiny-llava": "mllm_deploy.models.tiny:write_tiny_llava",
    "small-llava": "mllm_deploy.models.tiny:write_small_llava",
    # geometry only (config.json, no weights): FLOPs, KV-memory and recipe planning
    "llava-1.5-7b-shape": "mllm_deploy.models.presets:write_llava15_7b_shape",
    "llava-1.5-13b-shape": "mllm_deploy.models.presets:write_llava15_13b_shape",
    "llava-v1.6-vicuna-7b-shape": "mllm_deploy.models.presets:write_llava16_vicuna_7b_shape",
    "llava-v1.6-mistral-7b-shape": "mllm_deploy.models.presets:write_llava16_mistral_7b_shape",
}
PACKAGED_MODELS: dict[str, str] = {
    # name -> "module:function()" returning a model directory shipped in the repository
    "shapes-llava": "mllm_deploy.models.shapes_llava:packaged_model",
}
BUILTIN_MODELS = {**GENERATED_MODELS, **PACKAGED_MODELS}

# huggingface_hub's repo-id rule (letters, digits, '-', '_', '.'; no '--' or '..'; not starting or
# ending in '-' or '.'), with the namespace required: ORG/NAME. After the first '@' comes the revision.
_ID_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
HUB_REPO_ID = re.compile(rf"^{_ID_PART}/{_ID_PART}$")


def cache_dir() -> Path:
    root = os.environ.get("MLLM_DEPLOY_CACHE") or os.path.join(Path.home(), ".cache", "mllm-deploy")
    return Path(root)


def add_model_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--model and --cache-dir, the same on every command that takes a model; ``what`` says which
    local directories or built-in names the command accepts."""
    parser.add_argument("--model", required=True,
                        help=f"{what}; or a Hugging Face id ORG/NAME[@REVISION] already in the local cache")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="Hugging Face cache to look ids up in (default: HF_HUB_CACHE, else HF_HOME/hub);"
                             " nothing is ever downloaded")


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


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``text`` is spelt like ``ORG/NAME[@REVISION]``, else None."""
    repo_id, at, revision = text.partition("@")
    if not HUB_REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        return None
    if at and (not revision.strip() or ".." in revision or revision.startswith("/")):  # a ref, not a path
        return None
    return repo_id, revision or None


def _from_hub_cache(repo_id: str, revision: str | None, hub_cache: str | Path | None) -> Path:
    """The cached snapshot of ``repo_id`` at ``revision`` (default branch: main); never the network."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise DependencyError(f"{repo_id} looks like a Hugging Face id, and looking it up needs huggingface_hub"
                              " (pip install huggingface_hub); or pass a local model directory") from None
    where = Path(hub_cache if hub_cache is not None else constants.HF_HUB_CACHE).expanduser()
    name = f"{repo_id}@{revision}" if revision else repo_id
    try:
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=str(where), local_files_only=True)
    except (LocalEntryNotFoundError, ValueError) as exc:  # ValueError: a revision that is not a valid ref name
        incomplete = type(exc).__name__ == "IncompleteSnapshotError"
        raise InputFileError(
            f"{name} is {'only partly' if incomplete else 'not'} in the local Hugging Face cache ({where}); download it"
            f" on a machine with network (hf download {repo_id}{f' --revision {revision}' if revision else ''})"
            " and copy the cache over, or pass --cache-dir DIR or a local model directory") from None
    return Path(snapshot)


def resolve_model(name_or_path: str, hub_cache: str | Path | None = None) -> Path:
    """Return the model directory for a built-in name, a local path or a cached Hugging Face id."""
    if name_or_path in BUILTIN_MODELS:
        return _materialise_builtin(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        hub_id = parse_hub_id(name_or_path)
        if hub_id is not None:
            return _from_hub_cache(*hub_id, hub_cache)
        raise InputFileError(
            f"model '{name_or_path}' is neither a directory nor a built-in name"
            f" (built-in: {', '.join(sorted(BUILTIN_MODELS))})"
        )
    if not path.is_dir():
        raise InputFileError(f"model path {name_or_path} is a file; pass the Hugging Face model directory")
    return path


def load_spec(name_or_path: str, hub_cache: str | Path | None = None) -> tuple[Path, ModelSpec]:
    model_dir = resolve_model(name_or_path, hub_cache)
    return model_dir, spec_from_config(read_config(model_dir))
