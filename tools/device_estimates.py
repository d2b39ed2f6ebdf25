"""Bytes a model stores and reads per generated token under each weight scheme, and what that means on the
devices of devices.json: bandwidth-bound decode rates and whether the model fits (ESTIMATES, not measurements).

A decode step at batch 1 is bound by memory bandwidth: it reads every weight of the decoder once (all but the
input-embedding table, of which it gathers one row) and the KV cache. Weight-only quantization shrinks the text
linear layers (export/quantize.TEXT_LINEARS: attn.qkv, attn.o, mlp.gate, mlp.up, mlp.down of every layer) to
``quantized_bytes`` (the bytes export-mllm writes: integers and one scale per block or output channel); the
embeddings, norms and, unless quantized too, the LM head and the vision tower stay float.

``llava7b_estimates`` applies this to the LLaVA-1.5-7B geometry (models/presets.py) in FP16, INT8 and INT4
(blocks of 64, FP16 scales) on every device: decode tokens/s <= bandwidth / bytes read per token, and
weights + KV cache + activations at a 1024-token context against the device memory.

    python -m mllm_deploy.tools.device_estimates_cli     # the LLaVA-1.5-7B table, as report-mllm prints it

Imports neither torch nor onnxruntime (export/quantize.py imports numpy alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_deploy.core.memory import activation_bytes, kv_cache_bytes, text_parameters, vision_parameters
from mllm_deploy.export.quantize import QuantScheme, quantized_bytes

CONTEXT_TOKENS = 1024  # the context of the memory-fit estimate: a LLaVA-1.5 prompt (576 image tokens) and answer
# the schemes the 7B table compares: FP16 weights, and the exporter's two weight-only forms with FP16 scales
SCHEMES_7B = (("FP16", None), ("INT8", QuantScheme("int8", scale_dtype="float16")),
              ("INT4", QuantScheme("int4", block_size=64, scale_dtype="float16")))


# ---- bytes by scheme ----------------------------------------------------------------------------------
def text_linears(text) -> list[tuple[str, int, int]]:
    """(canonical prefix, K, N) of every [K, N] linear weight of the decoder (export/weights.py's names)."""
    d, q, kv, inter = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim, \
        text.intermediate_size
    per_layer = (("attn.qkv", d, q + 2 * kv), ("attn.o", q, d), ("mlp.gate", d, inter), ("mlp.up", d, inter),
                 ("mlp.down", inter, d))
    layers = [(f"text.layers.{i}.{name}", k, n) for i in range(text.num_layers) for name, k, n in per_layer]
    return layers + [("lm_head", d, text.vocab_size)]


def vision_linears(spec) -> list[tuple[str, int, int]]:
    """The CLIP tower's (every layer, as core/memory.vision_parameters counts) and the projector's linear weights."""
    v, d = spec.vision, spec.text.hidden_size
    per_layer = (("attn.qkv", v.hidden_size, 3 * v.hidden_size), ("attn.o", v.hidden_size, v.hidden_size),
                 ("mlp.fc1", v.hidden_size, v.intermediate_size), ("mlp.fc2", v.intermediate_size, v.hidden_size))
    layers = [(f"vision.layers.{i}.{name}", k, n) for i in range(v.num_layers) for name, k, n in per_layer]
    return layers + [("projector.linear_1", v.hidden_size, d), ("projector.linear_2", d, d)]


@dataclass(frozen=True)
class WeightBytes:
    text_stored: int  # the decoder as stored: embeddings, layers, final norm, LM head
    text_read: int  # what one decode step reads: all of it but the input-embedding table (one row is gathered)
    vision_stored: int  # the vision tower and the projector

    @property
    def stored(self) -> int:
        return self.text_stored + self.vision_stored


def _quantized(linears: list[tuple[str, int, int]], scheme: QuantScheme | None, float_bytes: int) -> tuple[int, int]:
    """(parameters that ``scheme`` quantizes, their stored bytes, scales in ``float_bytes``-byte elements)."""
    chosen = [(k, n) for prefix, k, n in linears if scheme is not None and scheme.applies(prefix)]
    return sum(k * n for k, n in chosen), sum(quantized_bytes(k, n, scheme, float_bytes) for k, n in chosen)


def weight_bytes(spec, scheme: QuantScheme | None, float_bytes: int) -> WeightBytes:
    """Bytes of a model's weights under ``scheme`` (None: all float), float parts and scales in ``float_bytes``.

    Counted from the geometry (core/memory.py's parameter counts), so small tables the exporter adds (RoPE
    caches) are left out; a tied LM head quantized apart is stored besides the float embedding table."""
    text = spec.text
    linears = text_linears(text)
    tied_head = text.tie_word_embeddings and scheme is not None and scheme.lm_head
    quantized_params, quantized = _quantized(linears, scheme, float_bytes)
    float_params = text_parameters(text) - quantized_params + (text.vocab_size * text.hidden_size if tied_head else 0)
    text_stored = float_params * float_bytes + quantized
    embedding = text.vocab_size * text.hidden_size * float_bytes
    text_read = text_stored - (0 if text.tie_word_embeddings and not tied_head else embedding)
    vision_params, vision_quantized = _quantized(vision_linears(spec), scheme, float_bytes)
    vision_stored = (vision_parameters(spec) - vision_params) * float_bytes + vision_quantized
    return WeightBytes(int(text_stored), int(text_read), int(vision_stored))


def scheme_of(quantization: dict | None) -> QuantScheme | None:
    """The QuantScheme of a manifest's (or a bench result's) ``quantization`` entry; None for float weights.
    (weight_bytes counts its scales in the estimate's float type, whatever ``scale_dtype`` the bundle used.)"""
    return QuantScheme.from_dict(quantization) if quantization else None


# ---- on a device ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceFit:
    read_per_token: int  # decoder weights + KV cache at the context, bytes
    tokens_per_s: float  # upper bound: bandwidth / read_per_token
    weights: int  # stored bytes, text and vision
    kv_cache: int
    activations: int
    memory: float  # the device's, bytes
    text_weights: int = 0  # stored bytes of the decoder alone

    @property
    def needed(self) -> int:
        """With the decoder's weights held once (one engine, or engines sharing them)."""
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.needed <= self.memory

    @property
    def needed_as_built(self) -> int:
        """As build-mllm builds today: separate prefill and decode engines, each with its own copy of the decoder's
        weights (TensorRT engines do not share weights)."""
        return self.needed + self.text_weights

    @property
    def fits_as_built(self) -> bool:
        return self.needed_as_built <= self.memory


def context_kv_tokens(spec, visual_kept: list[int] | None = None, context: int = CONTEXT_TOKENS) -> list[int]:
    """Tokens each layer caches at ``context`` positions; a pruned recipe (visual tokens kept per layer) holds fewer."""
    if visual_kept is None:
        return [context] * spec.text.num_layers
    return [max(context - spec.visual_tokens + int(kept), 0) for kept in visual_kept]


def on_device(spec, scheme: QuantScheme | None, float_bytes: int, device, context: int = CONTEXT_TOKENS,
              visual_kept: list[int] | None = None) -> DeviceFit:
    """Decode rate and memory of ``spec`` under ``scheme`` at a ``context``-token context on ``device`` (anything
    with ``bandwidth`` in bytes/s and ``memory_bytes``); KV cache and activations in ``float_bytes`` elements."""
    weights = weight_bytes(spec, scheme, float_bytes)
    kv = kv_cache_bytes(spec.text, context_kv_tokens(spec, visual_kept, context), float_bytes)
    read = weights.text_read + kv
    return DeviceFit(read_per_token=read, tokens_per_s=device.bandwidth / read, weights=weights.stored, kv_cache=kv,
                     activations=activation_bytes(spec, context, float_bytes), memory=device.memory_bytes,
                     text_weights=weights.text_stored)


def llava7b_spec():
    from mllm_deploy.formats.geometry import spec_from_config
    from mllm_deploy.models.presets import LLAVA15_7B

    return spec_from_config(LLAVA15_7B)


def llava7b_estimates(devices, context: int = CONTEXT_TOKENS) -> list[tuple[object, str, DeviceFit]]:
    """(device, scheme label, estimate) of LLaVA-1.5-7B in FP16, INT8 and INT4 on every device (FP16 elements
    for everything float: embeddings, norms, LM head, vision tower, scales, KV cache, activations)."""
    spec = llava7b_spec()
    check_context(context)
    return [(device, label, on_device(spec, scheme, 2, device, context))
            for device in devices for label, scheme in SCHEMES_7B]


def check_context(context: int) -> int:
    from mllm_deploy.core.errors import MllmError

    if not isinstance(context, int) or context < 1:
        raise MllmError(f"--context must be a positive number of tokens, got {context}")
    return context


def llava7b_rows(devices, context: int = CONTEXT_TOKENS) -> list[list[str]]:
    rows = []
    for device, label, e in llava7b_estimates(devices, context):
        rows.append([device.name, label, f"{e.weights / 1e9:.2f}", f"{e.read_per_token / 1e9:.2f}",
                     f"{e.tokens_per_s:.1f}", f"{e.needed / 1e9:.2f}", f"{e.memory / 1e9:g}",
                     "yes" if e.fits else "NO", f"{e.needed_as_built / 1e9:.2f}",
                     "yes" if e.fits_as_built else "NO"])
    return rows


LLAVA7B_NOTE = ("LLaVA-1.5-7B (geometry of llava-hf/llava-1.5-7b-hf) by weight scheme: ESTIMATES, not measurements."
                " Decode tokens/s is an upper bound, bandwidth / bytes read per token (text weights, of which the"
                " input embeddings only one row, plus the KV cache at the context); memory is stored weights (text"
                " and vision tower) + KV cache + prefill activations, FP16 for everything float; INT4 has blocks of"
                " 64 input rows, INT8 one scale per output channel, FP16 scales; the LM head and the vision tower"
                " stay FP16. On Jetson the memory is shared with the CPU and the OS, so the real margin is smaller."
                " 'Fits' holds the decoder's weights once (one engine, or engines sharing them: not built yet);"
                " 'as built' adds the second copy today's separate prefill and decode engines hold.")


def llava7b_headers(context: int = CONTEXT_TOKENS) -> list[str]:
    return ["device", "weights", "stored weights [GB]", "read per token [GB] (est.)",
            "decode tokens/s (est., upper bound)", f"weights + KV + activations at {context} tokens [GB] (est.)",
            "device memory [GB]", f"fits ({context} tokens, est.)", "as built: two engines [GB] (est.)",
            "fits as built"]
