"""Shared fixtures: tiny models made by code and their exported bundles (built once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllm_deploy.calib.fitprune import FitPruneOptions
from mllm_deploy.calib.static_methods import FastVOptions, PDropOptions
from mllm_deploy.calib.vtw import VtwOptions
from mllm_deploy.models.presets import LLAVA15_7B
from mllm_deploy.models.tiny import TinyLlavaConfig

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Three geometries: GQA and MHA, two image sizes / patch sizes, different layer counts.
TINY_CONFIGS = {
    "gqa56": TinyLlavaConfig(seed=1),
    "mha42": TinyLlavaConfig(seed=2, image_size=42, patch_size=7, text_heads=4, text_kv_heads=4, text_layers=2,
                             vision_layers=2, shortest_edge=48),
    "gqa70": TinyLlavaConfig(seed=3, image_size=70, patch_size=14, text_hidden=96, text_heads=8, text_kv_heads=2,
                             text_layers=3, text_intermediate=192),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in models materialise into a per-session cache, never the user's."""
    os.environ["MLLM_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("MLLM_DEPLOY_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    from mllm_deploy.models.tiny import write_tiny_llava

    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_llava(root / name, cfg) for name, cfg in TINY_CONFIGS.items()}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {name: export_bundle(str(d), root / name, ExportOptions(), log=lambda m: None)
            for name, d in tiny_model_dirs.items()}


@pytest.fixture()
def bundle_copy(tiny_bundles, tmp_path) -> Path:
    """A copy of the gqa56 bundle a test may alter."""
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["gqa56"], target)
    return target


def make_image(path: Path, size=(90, 70), mode="RGB", seed=0) -> Path:
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    image = Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle([5, 5, size[0] // 2, size[1] // 2], fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    image.convert(mode).save(path)
    return path


def run_cli(tool: str, *args: str, env: dict | None = None, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run an installed console script the way a user does."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(VENV_BIN / tool), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd)


# llava-hf/llava-1.5-7b-hf hyperparameters, written by tests as a bare config.json: no weights needed.
LLAVA15_7B_CONFIG = {k: v for k, v in LLAVA15_7B.items() if k != "mllm_deploy_preset"}


def write_config_only_model(path: Path, config: dict = LLAVA15_7B_CONFIG) -> Path:
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---- pruned recipes and bundles (FastV, PyramidDrop, VTW, FitPrune) on two tiny geometries ----
METHODS = {
    # name -> calibration options per tiny config
    "fastv": FastVOptions(k=2, r=0.5),
    "pdrop": PDropOptions(layers=[1, 2], ratio=0.5),
    "vtw": VtwOptions(data="builtin:synthetic:3", eta=10.0, first_layer=1),
    "fitprune": FitPruneOptions(data="builtin:synthetic:3", budget=0.5),
}
CONFIGS = ["gqa56", "gqa70"]


@pytest.fixture(scope="session")
def recipes(tiny_model_dirs, tmp_path_factory):
    from mllm_deploy.calib.calibrate import calibrate

    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for config in CONFIGS:
        for name, options in METHODS.items():
            recipe = calibrate(str(tiny_model_dirs[config]), options, log=lambda m: None)
            path = root / f"{config}-{name}.json"
            path.write_text(recipe.to_json())
            out[config, name] = path
    return out


@pytest.fixture(scope="session")
def pruned_bundles(tiny_model_dirs, recipes, tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("pruned")
    cache = {}

    def get(config: str, method: str, routing: str):
        key = (config, method, routing)
        if key not in cache:
            cache[key] = export_bundle(str(tiny_model_dirs[config]), root / "-".join(key),
                                       ExportOptions(recipe=str(recipes[config, method]), routing=routing),
                                       log=lambda m: None)
        return cache[key]

    return get
