"""The training-free stand-in for a removed attention (EAS recipes, ``recipe.pia``), and how it folds into the FFN.

EAS (seed paper "Not All Attention is Needed") removes a layer's multi-head attention and trains a propagation-of-
information adapter that is re-parameterised into the FFN. Without training, calib/eas.py fits two linear maps on
calibration activations by ridge least squares, both of which fold exactly into weights the layer already has, so
the stand-in costs nothing at run time:

- ``layers.{l}.input`` A [d, d]: the FFN input ``h = post_norm(x)`` becomes ``h @ A``, fitted to what the FFN saw
  with the attention present, ``post_norm(x + attn(x))``. Folded: gate and up weights ``W -> A @ W`` ([in, out]).
- ``layers.{l}.down`` E [m, d]: the FFN output gains ``z @ E`` (z: the SwiGLU product the down projection reads),
  fitted to the attention's own contribution to the residual stream. Folded: ``W_down -> W_down + E``.

The tensors live in a safetensors file beside the recipe (``pia.file``, its sha256 in ``pia.sha256``).
"""

from __future__ import annotations

import hashlib

import numpy as np

from mllm_deploy.core.errors import RecipeError


def input_key(layer: int) -> str:
    return f"layers.{layer}.input"


def down_key(layer: int) -> str:
    return f"layers.{layer}.down"


def fold(gate_io: np.ndarray, up_io: np.ndarray, down_io: np.ndarray, a: np.ndarray, e: np.ndarray):
    """Gate, up and down weights in [in, out] layout with the stand-in folded in (float64 products, then the
    weights' own dtype)."""
    dtype = gate_io.dtype
    a64 = np.asarray(a, np.float64)
    gate = (a64 @ gate_io.astype(np.float64)).astype(dtype)
    up = (a64 @ up_io.astype(np.float64)).astype(dtype)
    down = (down_io.astype(np.float64) + np.asarray(e, np.float64)).astype(dtype)
    return gate, up, down


def recipe_pia(recipe) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (A, E)} of an EAS recipe's stand-in: its in-memory tensors or its file (sha256 checked); {} without."""
    if not recipe.pia:
        return {}
    tensors = recipe.pia_tensors
    if tensors is None:
        path = recipe.pia_path()
        if path is None or not path.is_file():
            raise RecipeError(f"stand-in file {path} named by the recipe (pia.file) is missing; keep it beside"
                              " recipe.json")
        data = path.read_bytes()
        expected = recipe.pia.get("sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise RecipeError(f"stand-in file {path.name} does not match pia.sha256 in the recipe (altered or replaced)")
        from safetensors.numpy import load

        tensors = load(data)
    d = recipe.model.hidden_size
    out = {}
    for layer in recipe.skip_attention:
        if input_key(layer) not in tensors or down_key(layer) not in tensors:
            raise RecipeError(f"the recipe's stand-in has no tensors for layer {layer} ({input_key(layer)},"
                              f" {down_key(layer)})")
        a, e = np.asarray(tensors[input_key(layer)]), np.asarray(tensors[down_key(layer)])
        if a.shape != (d, d) or e.ndim != 2 or e.shape[1] != d:
            raise RecipeError(f"the recipe's stand-in for layer {layer} has shapes {list(a.shape)} and {list(e.shape)},"
                              f" expected [{d}, {d}] and [intermediate, {d}]")
        out[layer] = (a, e)
    return out


class FoldedWeights:
    """A read-only view of an exporter's weights (dict or streaming mapping) with the stand-in folded into the
    skipped layers' gate, up and down matrices (canonical names of export/weights.py, [in, out])."""

    def __init__(self, weights, pia: dict[int, tuple[np.ndarray, np.ndarray]]):
        self._weights, self._pia, self._folded = weights, pia, {}
        self._layer_of = {f"text.layers.{layer}.mlp.{part}.weight": layer for layer in pia
                          for part in ("gate", "up", "down")}

    def _array(self, name: str) -> np.ndarray:
        value = self._weights[name]
        return value.load() if hasattr(value, "load") else value  # a streaming checkpoint's LazyWeight

    def __getitem__(self, name: str):
        layer = self._layer_of.get(name)
        if layer is None:
            return self._weights[name]
        if name not in self._folded:  # folded once per layer, when a graph first asks
            p = f"text.layers.{layer}.mlp"
            gate, up, down = fold(self._array(f"{p}.gate.weight"), self._array(f"{p}.up.weight"),
                                  self._array(f"{p}.down.weight"), *self._pia[layer])
            self._folded.update({f"{p}.gate.weight": gate, f"{p}.up.weight": up, f"{p}.down.weight": down})
        return self._folded[name]

    def __contains__(self, name) -> bool:
        return name in self._weights

    def __len__(self) -> int:
        return len(self._weights)

    def __iter__(self):
        return iter(self._weights)

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __getattr__(self, name: str):  # anything else a streaming mapping offers (close, ...)
        return getattr(self._weights, name)
