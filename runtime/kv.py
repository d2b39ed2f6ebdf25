"""Per-layer static KV cache: one preallocated buffer per layer, its own capacity each.

After prefill, layer ``l`` holds ``kv_len[l]`` entries (pruned layers hold fewer); each
decode step writes one new entry per layer in place. Nothing is ever re-concatenated. A layer of
capacity 0 has no attention (EAS): no buffer bytes, no graph tensors, never filled or checked.
"""

from __future__ import annotations

import numpy as np

from mllm_deploy.formats.manifest import past_name


class StaticKVCache:
    def __init__(self, num_kv_heads: int, head_dim: int, capacities: list[int], dtype: np.dtype,
                 reuse: "StaticKVCache | None" = None):
        """``reuse``: a finished cache of the same shapes whose buffers to take over (a generator keeps its last
        one: fresh buffers cost a first touch of every page at each prefill, 25-60 ms for small-llava's 80 MB);
        ``fill`` then clears what the previous generation left past the new entries."""
        self.capacities = list(capacities)
        shape = lambda cap: (1, num_kv_heads, cap, head_dim)  # noqa: E731 - [1, Hkv, C_l, Dh]
        if reuse is not None and reuse.fits(num_kv_heads, head_dim, self.capacities, dtype):
            self.keys, self.values = reuse.keys, reuse.values
            reuse.keys, reuse.values = [], []  # one owner at a time
        else:
            # zeros, not empty: masked slots are multiplied by exactly 0 and must not hold NaN/Inf
            self.keys = [np.zeros(shape(c), dtype=dtype) for c in capacities]
            self.values = [np.zeros(shape(c), dtype=dtype) for c in capacities]
        self.lengths = np.zeros(len(capacities), dtype=np.int64)

    def fits(self, num_kv_heads: int, head_dim: int, capacities: list[int], dtype: np.dtype) -> bool:
        """Whether this cache's buffers have exactly these shapes and type."""
        return (len(self.keys) == len(capacities) and list(self.capacities) == list(capacities)
                and all(k.shape == (1, num_kv_heads, c, head_dim) and k.dtype == np.dtype(dtype)
                        for k, c in zip(self.keys, capacities)))

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def fill(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Copy a layer's prefill KV ([1, Hkv, n, Dh]) into the front of its buffer."""
        n = key.shape[2]
        if n > self.capacities[layer]:
            raise ValueError(f"layer {layer}: {n} prefill entries exceed capacity {self.capacities[layer]}")
        self.keys[layer][:, :, :n] = key
        self.values[layer][:, :, :n] = value
        self.keys[layer][:, :, n:] = 0  # a reused buffer: nothing of the previous generation past the entries
        self.values[layer][:, :, n:] = 0
        self.lengths[layer] = n

    @property
    def layers(self) -> list[int]:
        """The layers that hold a cache (capacity > 0)."""
        return [layer for layer, capacity in enumerate(self.capacities) if capacity > 0]

    def check_room(self) -> None:
        """Every layer with a cache has a free slot for one more entry."""
        for layer, (length, capacity) in enumerate(zip(self.lengths, self.capacities)):
            if capacity and length >= capacity:
                raise ValueError(f"layer {layer}: KV cache full ({capacity} entries)")

    def append(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Write one decode step's entry ([1, Hkv, 1, Dh]) at the layer's next free slot."""
        slot = int(self.lengths[layer])
        if slot >= self.capacities[layer]:
            raise ValueError(f"layer {layer}: KV cache full ({self.capacities[layer]} entries)")
        self.keys[layer][:, :, slot] = key[:, :, 0]
        self.values[layer][:, :, slot] = value[:, :, 0]

    def advance(self) -> None:
        self.lengths += 1

    def decode_feed(self) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {"past_lengths": self.lengths.copy()}
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if not self.capacities[layer]:
                continue
            feed[past_name(layer, "key")] = k
            feed[past_name(layer, "value")] = v
        return feed
