"""Mixture-of-depths router weights: the safetensors layout, trained checkpoints, the file beside a recipe.

Layout (docs/mod.md has the full description). A router of layer ``l`` is linear:
``score = u @ W.T + b`` over the layer's visual tokens, ``u`` being the layer's input RMSNorm
output (``router_input = input_norm``, gamma-MoD) or the raw residual stream (``residual``, p-MoD).

- ``layers.{l}.router.weight``  float [out, hidden], out = 1 or 2
- ``layers.{l}.router.bias``    float [out] (optional, zero when absent)
- ``shared.router.weight``      float [2, hidden] (gamma-MoD: one router shared by every routed layer)
- ``shared.router.bias``        float [2] (optional)

With out = 2 (gamma-MoD's d->2 router) the score is the logit difference ``logit[1] - logit[0]``:
it ranks exactly as gamma-MoD's ``p = softmax(logits)[1]`` and ``p = sigmoid(score)``, without
the ties that a saturated p would give TopK. A per-layer entry wins over the shared one.
Optional ``__metadata__`` strings of a trained checkpoint: ``router_input`` (default
``input_norm``), ``selected_scale`` (``none`` | ``sigmoid`` | ``tanh_norm``; default ``sigmoid``
for the shared form, ``none`` otherwise) and ``tanh_alpha`` (default ``0.2``, p-MoD's TanhNorm
``w = 1 + alpha * tanh(score)``).

The file written beside a recipe (``<stem>.routers.safetensors``) is always the canonical form:
one ``layers.{l}.router.weight [1, hidden]`` and ``.bias [1]`` per routed layer, float32, with
``__metadata__ = {"format": "mllm-deploy/mod-routers@1"}``; the recipe records its sha256 and
the router settings. Only NumPy and safetensors are imported here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm_deploy.core.errors import InputFileError, RecipeError

ROUTER_FORMAT = "mllm-deploy/mod-routers@1"
MOD_SELECTED_SCALES = ("none", "sigmoid", "tanh_norm")  # selected visual tokens' MLP output: as is, *p, *w
MOD_ROUTER_INPUTS = ("input_norm", "residual")  # what a linear router reads: the layer's input RMSNorm output or x
DEFAULT_TANH_ALPHA = 0.2  # p-MoD: w = 0.2 * tanh(r) + 1


@dataclass(frozen=True)
class LinearRouter:
    weight: np.ndarray  # [hidden] float32
    bias: float


def weight_key(layer: int) -> str:
    return f"layers.{layer}.router.weight"


def bias_key(layer: int) -> str:
    return f"layers.{layer}.router.bias"


def canonical_tensors(routers: dict[int, LinearRouter]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for layer, router in sorted(routers.items()):
        out[weight_key(layer)] = np.asarray(router.weight, np.float32).reshape(1, -1)
        out[bias_key(layer)] = np.array([router.bias], np.float32)
    return out


def router_file_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())},
                metadata={"format": ROUTER_FORMAT})


def routers_from_tensors(tensors: dict[str, np.ndarray], layers: list[int], hidden: int, where: str) -> dict[int, LinearRouter]:
    """One linear d->1 router per layer from per-layer or shared entries (out = 1 or 2, see the module doc)."""
    routers = {}
    for layer in layers:
        for prefix in (f"layers.{layer}.router", "shared.router"):
            if f"{prefix}.weight" in tensors:
                break
        else:
            raise RecipeError(f"{where} has no router for layer {layer} (expected {weight_key(layer)} or shared.router.weight)")
        weight = np.asarray(tensors[f"{prefix}.weight"], np.float64)
        if weight.ndim == 1:
            weight = weight[None]
        out = weight.shape[0]
        if weight.ndim != 2 or out not in (1, 2) or weight.shape[1] != hidden:
            raise RecipeError(f"{where}: {prefix}.weight has shape {list(weight.shape)}, expected [1 or 2, {hidden}]")
        bias = np.asarray(tensors.get(f"{prefix}.bias", np.zeros(out)), np.float64).reshape(-1)
        if bias.shape != (out,):
            raise RecipeError(f"{where}: {prefix}.bias has shape {list(bias.shape)}, expected [{out}]")
        if out == 2:  # gamma-MoD's d->2: rank by the logit difference (module doc)
            weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
        routers[layer] = LinearRouter(weight[0].astype(np.float32), float(np.float32(bias[0])))
    return routers


@dataclass(frozen=True)
class TrainedCheckpoint:
    routers: dict[int, LinearRouter]
    router_input: str
    selected_scale: str
    tanh_alpha: float
    source_sha256: str


def read_trained_checkpoint(path: str | Path, layers: list[int], hidden: int) -> TrainedCheckpoint:
    """Routers of a trained checkpoint in the documented layout, for the plan's routed layers."""
    from safetensors import safe_open


    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"router file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for any malformed header
        raise InputFileError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    shared = "shared.router.weight" in tensors
    router_input = metadata.get("router_input", "input_norm")
    selected = metadata.get("selected_scale", "sigmoid" if shared else "none")
    if router_input not in MOD_ROUTER_INPUTS:
        raise RecipeError(f"{path.name}: metadata router_input {router_input!r} is not one of {', '.join(MOD_ROUTER_INPUTS)}")
    if selected not in MOD_SELECTED_SCALES:
        raise RecipeError(f"{path.name}: metadata selected_scale {selected!r} is not one of {', '.join(MOD_SELECTED_SCALES)}")
    try:
        alpha = float(metadata.get("tanh_alpha", DEFAULT_TANH_ALPHA))
    except ValueError:
        raise RecipeError(f"{path.name}: metadata tanh_alpha {metadata['tanh_alpha']!r} is not a number") from None
    routers = routers_from_tensors(tensors, layers, hidden, path.name)
    return TrainedCheckpoint(routers, router_input, selected, alpha, hashlib.sha256(path.read_bytes()).hexdigest())


def recipe_routers(recipe) -> dict[int, LinearRouter]:
    """The linear routers of a MoD recipe: its in-memory tensors, or its router file (sha256 checked)."""
    layers, hidden = recipe.mod_layers, recipe.model.hidden_size
    if recipe.routers is not None:
        return routers_from_tensors(recipe.routers, layers, hidden, "the recipe's routers")
    path = recipe.router_path()
    if path is None:
        raise RecipeError(f"recipe mod.router {recipe.mod.router!r} needs mod.router_file")
    if not path.is_file():
        raise RecipeError(f"router file {path} named by the recipe is missing; keep it beside recipe.json")
    data = path.read_bytes()
    expected = recipe.mod.router_sha256
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise RecipeError(f"router file {path.name} does not match mod.router_sha256 in the recipe (altered or replaced)")
    from safetensors.numpy import load

    return routers_from_tensors(load(data), layers, hidden, path.name)
