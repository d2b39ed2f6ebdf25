"""vision -> prefill -> decode over a bundle's three graphs, with a static per-layer KV cache.

Short enough to read in one screen (gpt-fast's ``generate.py`` is the model): prompt ids and
pixel values in, token ids out, timings recorded. Every backend (onnxruntime, tensorrt, the PyTorch
reference) runs through this loop; runtime/timing.py repeats it for benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mllm_deploy.core.errors import NumericalError, PromptError
from mllm_deploy.runtime.backends import runner_class
from mllm_deploy.runtime.backends.base import NP_DTYPES
from mllm_deploy.runtime.bundle import Bundle
from mllm_deploy.runtime.kv import StaticKVCache
from mllm_deploy.runtime.sampling import Sampler, SamplingConfig
from mllm_deploy.formats.manifest import new_name, present_name


@dataclass
class Timings:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)  # wall time of each decode step
    total_ms: float = 0.0
    decode_backend_ms: list[float] = field(default_factory=list)  # of which inside the decode runner's infer()

    def to_dict(self) -> dict:
        """run-mllm's ``timings`` (the backend split is bench-mllm's, runtime/timing.py)."""
        return {"vision_ms": self.vision_ms, "prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms,
                "total_ms": self.total_ms}


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    timings: Timings
    stop_reason: str  # "eos" or "length"
    first_logits: np.ndarray | None = None  # [V] logits of the first generated token (accuracy checks)
    kv_tokens_per_layer: list[int] = field(default_factory=list)  # what each layer caches after prefill


def check_context(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    """Refuse a request longer than the positions the model (and its RoPE tables) was exported for."""
    if prompt_tokens + max_new_tokens > max_positions:
        raise PromptError(
            f"prompt ({prompt_tokens} tokens) plus --max-new-tokens ({max_new_tokens}) is {prompt_tokens + max_new_tokens}"
            f" tokens, more than the model's context of {max_positions} positions"
        )


def check_finite(logits: np.ndarray, step: str, num_layers: int, dtype: str) -> None:
    """NaN or Inf in the logits means every token from here on is garbage: stop and say where."""
    if not np.isfinite(logits).all():
        bad = "NaN" if np.isnan(logits).any() else "Inf"
        hint = "; float16 may have overflowed, try a float32 export" if dtype == "float16" else ""
        raise NumericalError(f"the model produced {bad} logits at {step} (a {num_layers}-layer {dtype} bundle);"
                             f" its weights may be corrupt{hint}")


class Generator:
    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", **backend_options):
        self.bundle = bundle
        self.backend = backend
        self.runners = runner_class(backend).for_bundle(bundle, **backend_options)
        model = bundle.manifest["model"]
        self.float_dtype = NP_DTYPES[bundle.dtype]
        self.num_kv_heads = int(model["text"]["num_kv_heads"])
        self.head_dim = int(model["text"]["head_dim"])
        self.max_positions = int(model["text"]["max_position_embeddings"])
        self.image_token_id = int(model["image_token_id"])
        self.eos_ids = set(bundle.manifest["tokenizer"]["eos_token_ids"])
        self._spare_cache: StaticKVCache | None = None  # generate()'s last cache, whose buffers the next one reuses

    def __enter__(self) -> "Generator":
        for runner in self.runners.values():
            runner.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    # ---- the three graphs -----------------------------------------------------------------
    def encode_image(self, pixel_values) -> np.ndarray:
        """[1, N, d] visual tokens; a LLaVA-NeXT image (runtime/anyres.AnyresPixels) runs the vision graph once per
        view and packs the views as the model does."""
        from mllm_deploy.runtime.anyres import AnyresPixels, pack_views

        if isinstance(pixel_values, AnyresPixels):
            views, newline = [], None
            for view in pixel_values.views:
                out = self.runners["vision"].infer({"pixel_values": view[None].astype(self.float_dtype, copy=False)})
                views.append(out["image_features"][0])
                newline = out["image_newline"]
            return pack_views(np.stack(views), pixel_values.layout, self.bundle.patch_grid, newline)[None]
        out = self.runners["vision"].infer({"pixel_values": pixel_values.astype(self.float_dtype, copy=False)})
        return out["image_features"]

    def image_start(self, input_ids: np.ndarray) -> int:
        """Index of the first image placeholder; the placeholder run must be exactly N long."""
        where = np.flatnonzero(input_ids[0] == self.image_token_id)
        n = self.bundle.visual_tokens
        if self.bundle.manifest["image"].get("image_grid_pinpoints"):  # LLaVA-NeXT: the image's own count
            n = len(where) if 0 < len(where) <= n else n
        if len(where) != n or (len(where) and where[-1] - where[0] != n - 1):
            raise PromptError(
                f"the prompt must hold one run of {n} image tokens (id {self.image_token_id}), found {len(where)}"
            )
        return int(where[0])

    def prefill(self, input_ids: np.ndarray, image_features: np.ndarray, capacity_extra: int) -> tuple[np.ndarray, StaticKVCache]:
        start = self.image_start(input_ids)
        run = int(np.count_nonzero(input_ids[0] == self.image_token_id))
        if image_features.shape[1] != run:  # LLaVA-NeXT: the prompt was expanded for another image
            raise PromptError(f"the prompt holds {run} image tokens but the image makes {image_features.shape[1]}"
                              " visual tokens; build the prompt with this image (Pipeline.input_ids(..., pixels=))")
        out = self.runners["prefill"].infer({
            "input_ids": input_ids.astype(np.int64, copy=False),
            "image_features": image_features,
            "image_start": np.array([start], dtype=np.int64),
        })
        kv_lengths = self.bundle.kv_lengths(input_ids.shape[1])
        cache = StaticKVCache(self.num_kv_heads, self.head_dim, [n + capacity_extra if n else 0 for n in kv_lengths],
                              self.float_dtype, reuse=self._spare_cache)
        self._spare_cache = None
        for layer in cache.layers:  # a layer without attention (EAS) has no KV
            cache.fill(layer, out[present_name(layer, "key")], out[present_name(layer, "value")])
        return out["logits"][0], cache

    def decode(self, token: int, position: int, cache: StaticKVCache) -> np.ndarray:
        feed = cache.decode_feed()
        feed["input_ids"] = np.array([[token]], dtype=np.int64)
        feed["position_ids"] = np.array([[position]], dtype=np.int64)
        runner = self.runners["decode"]
        cache.check_room()  # before the run: an in-place graph would write past the buffer's end
        out = runner.infer(feed)
        if not runner.kv_in_place:  # else the graph wrote the new entries into the cache's buffers itself
            for layer in cache.layers:
                cache.append(layer, out[new_name(layer, "key")], out[new_name(layer, "value")])
        cache.advance()
        return out["logits"][0]

    # ---- the loop --------------------------------------------------------------------------
    def generate(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        on_token: Callable[[int], None] | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedy or sampled generation; ``ignore_eos`` generates exactly max_new_tokens (benchmarks)."""
        prompt_len = int(input_ids.shape[1])
        check_context(prompt_len, max_new_tokens, self.max_positions)
        timings = Timings()
        sampler = Sampler(sampling)
        t0 = time.perf_counter()
        features = self.encode_image(pixel_values)
        t1 = time.perf_counter()
        logits, cache = self.prefill(input_ids, features, capacity_extra=max_new_tokens)
        t2 = time.perf_counter()
        timings.vision_ms, timings.prefill_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        check_finite(logits, "prefill", self.bundle.num_layers, self.bundle.dtype)
        first_logits, kv_tokens = logits, [int(n) for n in cache.lengths]
        tokens: list[int] = []
        stop_reason = "length"
        for step in range(max_new_tokens):
            token = sampler(logits)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in self.eos_ids and not ignore_eos:
                stop_reason = "eos"
                break
            if step == max_new_tokens - 1:
                break
            ts = time.perf_counter()
            # pruned tokens keep their original positions, so decode continues after the full prompt
            logits = self.decode(token, prompt_len + step, cache)
            timings.decode_ms.append((time.perf_counter() - ts) * 1e3)
            timings.decode_backend_ms.append(self.runners["decode"].last_inference_ms)
            check_finite(logits, f"decode step {step + 1}", self.bundle.num_layers, self.bundle.dtype)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        self._spare_cache = cache  # generate() owns this cache: its buffers serve the next request of this size
        return Generation(tokens=tokens, prompt_tokens=prompt_len, timings=timings, stop_reason=stop_reason,
                          first_logits=first_logits, kv_tokens_per_layer=kv_tokens)
