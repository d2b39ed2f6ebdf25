"""Memory limits: a ``--max-memory`` budget, the memory available, and an estimate to check them against.

The estimate is weights + KV cache + activations, from the model geometry alone (a ``ModelSpec``,
or the manifest's copy of it), so a model that cannot fit is refused before anything is loaded.
It is an estimate, not a measurement: it counts the large tensors and leaves out the interpreter,
the libraries and allocator slack.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mllm_deploy.core.errors import MemoryLimitError, MllmError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


class Size(int):
    """A number of bytes that remembers how the user wrote it (``1MB``), so messages echo that, not ``976.56 KiB``."""

    text: str = ""

    def __new__(cls, value: int, text: str = "") -> "Size":
        size = super().__new__(cls, value)
        size.text = text
        return size


def describe_budget(size: int) -> str:
    """A --max-memory budget as the user wrote it (``1MB``), else in binary units."""
    return getattr(size, "text", "") or format_size(size)


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """Bytes in ``4GiB``, ``512MB``, ``2G`` (binary, as docker and free read it), ``1.5GiB`` or ``1000000``."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) and text.isascii() else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise MllmError(f"{flag} {text!r} is not a size; write e.g. 4GiB, 512MB, 2G or a number of bytes")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise MllmError(f"{flag} {text!r} must be at least one byte")
    return Size(int(value), text)


def format_size(n: float) -> str:
    for scale, suffix in ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{int(n)} B"


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable (what can be allocated without swapping), else free physical pages; None if unknown."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        return (f"{format_size(self.total)} (weights {format_size(self.weights)} + KV cache"
                f" {format_size(self.kv_cache)} + activations {format_size(self.activations)})")


def check_memory(estimate: MemoryEstimate, what: str, max_memory: int | None,
                 available: int | None = None) -> None:
    """Refuse ``what`` when its estimate exceeds the ``--max-memory`` budget or the available memory."""
    if max_memory is not None and estimate.total > max_memory:
        raise MemoryLimitError(f"{what} needs an estimated {estimate.describe()}, more than --max-memory"
                               f" {describe_budget(max_memory)}")
    if available is not None and estimate.total > available:
        raise MemoryLimitError(f"{what} needs an estimated {estimate.describe()}, more than the"
                               f" {format_size(available)} of memory available (MemAvailable); free memory or use"
                               " a float16 or pruned bundle or fewer tokens")


# ---- the estimate, from the geometry ---------------------------------------------------------------
def text_parameters(text) -> int:
    """Llama/Mistral decoder parameters: embeddings, layers, final norm, LM head (once if tied)."""
    d, inter, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    q, kv = text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    attention = d * q + 2 * d * kv + q * d + ((q + 2 * kv + d) if text.attention_bias else 0)
    mlp = 3 * d * inter + ((2 * inter + d) if text.mlp_bias else 0)
    per_layer = attention + mlp + 2 * d
    return vocab * d * (1 if text.tie_word_embeddings else 2) + text.num_layers * per_layer + d


def vision_parameters(spec) -> int:
    """CLIP tower (every layer, an upper bound on the layers exported) and the two-layer projector."""
    v, d = spec.vision, spec.text.hidden_size
    dv, inter = v.hidden_size, v.intermediate_size
    embeddings = v.num_channels * v.patch_size**2 * dv + dv + (v.num_patches + 1) * dv + 4 * dv  # + pre/post norms
    per_layer = 4 * (dv * dv + dv) + 2 * dv * inter + inter + dv + 4 * dv
    projector = dv * d + d + d * d + d
    return embeddings + v.num_layers * per_layer + projector


def kv_cache_bytes(text, kv_tokens_per_layer: list[int], dtype_bytes: int) -> int:
    return sum(2 * text.num_kv_heads * text.head_dim * int(n) * dtype_bytes for n in kv_tokens_per_layer)


def activation_bytes(spec, prompt_tokens: int, dtype_bytes: int) -> int:
    """Peak live tensors of one prefill (the larger of the vision tower and one decoder layer):
    hidden states, q/k/v, the attention map [H, T, T] with its softmax, the MLP's three [T, I]."""
    t, v = spec.text, spec.vision
    tokens = max(int(prompt_tokens), 1)
    text = (4 * tokens * t.hidden_size + tokens * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
            + 2 * t.num_heads * tokens * tokens + 3 * tokens * t.intermediate_size + t.vocab_size)
    patches = v.num_patches + 1
    vision = 4 * patches * v.hidden_size + 2 * v.num_heads * patches * patches + 2 * patches * v.intermediate_size
    return max(text, vision) * dtype_bytes


# Quantized weights on ONNX Runtime's CPU provider: every session that uses a quantized layer reads its integers
# from the file and rewrites them (with the DequantizeLinear) into MatMulNBits' own pre-packed buffers, so they are
# resident about once per text session plus what the rewrite keeps; pre-packing is always on for such graphs
# (runtime/backends/ort.py), so the float rest (LM head, embeddings, vision tower) also gets its packed copy.
# Measured (benchmarks/bundle_load_prefill.py, 616-token prompt): the 7B-geometry int4 bundles' peaks 16,256 MiB
# (dense), 14,778 (FastV) and 16,288 (FitPrune) against 16,374, 16,104 and 16,101 MiB estimated with these factors;
# small-llava's int4/int8 bundles 703/1011 MiB against ~580/820 (the rest is the Python process, as for float).
QUANTIZED_RESIDENT = 3.2
QUANTIZED_FLOAT_COPIES = 2


def runtime_estimate(spec, dtype_bytes: int, kv_tokens_per_layer: list[int], prompt_tokens: int,
                     weights_file_bytes: int | None = None, shared_weights: bool = True,
                     float16_on_cpu: bool = False, packed_copies: int | None = None,
                     quantized_bytes: int = 0) -> MemoryEstimate:
    """A loaded bundle answering one request. With shared weights (the weights file mapped once,
    runtime/backends/ort.py) every weight is resident once; each session that pre-packs (``packed_copies`` of
    them: 1 in the runtime's "fast" mode, the decode session; otherwise the prefill and the decode session) adds
    its own copy of the text model's weights. ``float16_on_cpu``: ONNX Runtime's CPU
    provider has no float16 GEMM on x86 and runs those MatMuls in float32 behind Casts whose float32 weights
    stay resident, one copy per session (measured: prefill and decode each add 2x the text weights' float16
    bytes). ``quantized_bytes``: the part of the weights file that is quantized (int4/int8 integers and their
    scales), resident QUANTIZED_RESIDENT times, the float rest QUANTIZED_FLOAT_COPIES times, whatever the weights
    mode (such sessions always pre-pack)."""
    text = text_parameters(spec.text) * dtype_bytes
    stored = weights_file_bytes if weights_file_bytes is not None else text + vision_parameters(spec) * dtype_bytes
    copies = packed_copies if packed_copies is not None else (0 if shared_weights else 1)
    if quantized_bytes:
        float_part = max(stored - quantized_bytes, 0)
        weights = QUANTIZED_FLOAT_COPIES * float_part + QUANTIZED_RESIDENT * quantized_bytes
        text = float_part  # float16_on_cpu below: only float weights get float32 copies
    else:
        weights = stored + copies * min(text, stored)
    if float16_on_cpu and dtype_bytes == 2:
        weights += 2 * 2 * min(text, stored)
    return MemoryEstimate(
        weights=int(weights),
        kv_cache=kv_cache_bytes(spec.text, kv_tokens_per_layer, dtype_bytes),
        activations=activation_bytes(spec, prompt_tokens, dtype_bytes),
    )


def export_estimate(spec, dtype_bytes: int, prompt_tokens: int, new_tokens: int = 4, verify: bool = True,
                    streaming: bool = False) -> MemoryEstimate:
    """export-mllm. Streaming from safetensors (export/checkpoint.py) holds about one fused tensor at a time (the
    largest of the embedding table and a layer's gate+up projection, plus its source pieces); otherwise the PyTorch
    model in float32 and its weights copied to the export dtype. Verification adds the PyTorch model in float32
    and the bundle's ONNX Runtime sessions (weights mapped once) next to it."""
    params = text_parameters(spec.text) + vision_parameters(spec)
    t = spec.text
    largest = max(t.vocab_size * t.hidden_size, 2 * t.hidden_size * t.intermediate_size)
    weights = largest * (dtype_bytes + 4) if streaming else params * 4 + params * dtype_bytes
    kv_cache = activations = 0
    if verify:
        sessions = runtime_estimate(spec, dtype_bytes, [prompt_tokens + new_tokens] * t.num_layers, prompt_tokens,
                                    weights_file_bytes=params * dtype_bytes)
        weights += (params * 4 if streaming else 0) + sessions.weights
        kv_cache = sessions.kv_cache + kv_cache_bytes(t, [prompt_tokens + new_tokens] * t.num_layers, 4)
        activations = sessions.activations + activation_bytes(spec, prompt_tokens, 4)
    return MemoryEstimate(weights=weights, kv_cache=kv_cache, activations=activations)
