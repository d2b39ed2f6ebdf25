"""Pure planning for the TensorRT backend: device KV buffers per layer, and which profile fits a shape.

The decode engine reads ``past.{l}.key|value [1, Hkv, C_l, Dh]`` with each layer's own capacity
``C_l = kv_len[l] + new tokens`` (pruned layers hold fewer tokens, that is the memory saving).
The backend allocates every layer's buffers once, at the largest capacity the engine's profile
allows, and reuses them for each generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mllm_deploy.core.errors import MllmError
from mllm_deploy.formats.manifest import past_name

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class KVLayerPlan:
    layer: int
    capacity: int  # token slots
    bytes: int  # key + value


@dataclass(frozen=True)
class KVPlan:
    num_kv_heads: int
    head_dim: int
    dtype: str
    layers: tuple[KVLayerPlan, ...]

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def layer_shape(self, layer: int) -> tuple[int, int, int, int]:
        """The buffer shape of decoder layer ``layer`` (layers without attention, EAS, have none)."""
        capacity = next(entry.capacity for entry in self.layers if entry.layer == layer)
        return (1, self.num_kv_heads, capacity, self.head_dim)


def kv_lengths(manifest: Mapping[str, Any], prompt_tokens: int) -> list[int]:
    """Tokens each layer caches after prefill (runtime/bundle.py's Bundle.kv_lengths, from a manifest)."""
    visual = int(manifest["model"]["visual_tokens"])
    text = prompt_tokens - visual
    if text < 1:
        raise MllmError(f"a prompt of {prompt_tokens} tokens leaves no text beside the {visual} image tokens")
    skipped = set(manifest["recipe"].get("skip_attention", []))  # EAS: no attention, no KV
    return [0 if layer in skipped else text + int(kept)
            for layer, kept in enumerate(manifest["recipe"]["visual_tokens"])]


def plan_kv(manifest: Mapping[str, Any], prompt_tokens: int, new_tokens: int) -> KVPlan:
    """Device KV buffers for prompts up to ``prompt_tokens`` and ``new_tokens`` generated tokens."""
    if new_tokens < 1:
        raise MllmError(f"new tokens must be at least 1, got {new_tokens}")
    text = manifest["model"]["text"]
    heads, head_dim, dtype = int(text["num_kv_heads"]), int(text["head_dim"]), str(manifest["dtype"])
    itemsize = ITEMSIZE[dtype]
    layers = tuple(KVLayerPlan(layer, n + new_tokens, 2 * heads * (n + new_tokens) * head_dim * itemsize)
                   for layer, n in enumerate(kv_lengths(manifest, prompt_tokens)) if n)
    return KVPlan(heads, head_dim, dtype, layers)


def plan_kv_from_profile(manifest: Mapping[str, Any], max_shapes: Mapping[str, Sequence[int]]) -> KVPlan:
    """The plan whose capacities are the decode profile's largest ``past.{l}.key`` shapes."""
    text = manifest["model"]["text"]
    heads, head_dim, dtype = int(text["num_kv_heads"]), int(text["head_dim"]), str(manifest["dtype"])
    layers = []
    skipped = set(manifest["recipe"].get("skip_attention", []))
    for layer in range(int(text["num_layers"])):
        if layer in skipped:  # EAS: the layer has no attention and no KV input
            continue
        shape = max_shapes.get(past_name(layer, "key"))
        if shape is None:
            raise MllmError(f"the decode engine has no profile for past.{layer}.key; run build-mllm again")
        capacity = int(shape[2])
        layers.append(KVLayerPlan(layer, capacity, 2 * heads * capacity * head_dim * ITEMSIZE[dtype]))
    return KVPlan(heads, head_dim, dtype, tuple(layers))


def choose_profile(profiles: Sequence[Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]],
                   shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the first profile whose [min, max] holds every given input shape; MllmError if none does."""
    for index, profile in enumerate(profiles):
        fits = True
        for name, (low, _, high) in profile.items():
            shape = shapes.get(name)
            if shape is None:
                continue
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                fits = False
                break
        if fits:
            return index
    described = "; ".join(f"{name} {list(shape)}" for name, shape in shapes.items()
                          if any(name in p for p in profiles))
    limits = "; ".join(f"{name} {list(lo)}..{list(hi)}" for p in profiles for name, (lo, _, hi) in p.items()
                       if name in shapes)
    raise MllmError(f"input shapes outside the engine's optimisation profiles ({described}; the engine takes "
                    f"{limits}); shorten the prompt or --max-new-tokens, or rebuild with larger "
                    "--max-prompt-tokens / --max-new-tokens")


def changed_rows(previous_length: int, current_length: int, same_buffer: bool) -> tuple[int, int]:
    """KV slots [start, end) to copy to the device before a decode step.

    Between decode steps the host cache only grows at the end (StaticKVCache.append), so when the
    same host buffer is fed again only the slots after those already on the device are copied.
    """
    if not same_buffer or current_length < previous_length:
        return 0, current_length
    return previous_length, current_length


def nbytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
