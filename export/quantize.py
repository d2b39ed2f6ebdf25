"""Weight-only quantization of the exported linear layers: INT4 block-wise or INT8 per-channel.

One form serves every target: a signed, symmetric integer weight ``[K, N]`` (the ``x @ W`` layout of
export/weights.py) and positive float scales, dequantized by a standard ``DequantizeLinear`` (opset 21)
feeding the ``MatMul``:

- **int4**: one scale per block of ``block_size`` consecutive input rows of one output column (scale
  ``[K / block_size, N]``, ``axis=0, block_size=B``), values in [-8, 7];
- **int8**: one scale per output column (scale ``[N]``, ``axis=1``), values in [-127, 127].

Why this form and not ONNX Runtime's own ``MatMulNBits`` quantizer output:
- TensorRT's ONNX parser refuses a zero point that is not all zeros and a scale that is not positive
  (onnx-tensorrt ``QuantDequantLinearHelper``: "TensorRT only supports symmetric quantization",
  "Scale coefficients must all be positive"); its documented INT4 scheme is
  ``x_q = roundWithTiesToEven(clip(x / s, -8, 7))`` with per-block scales (TensorRT "Quantization Schemes").
  ONNX Runtime's symmetric 4-bit kernel (``quantize_qdq_matmul_4bits``) maps each block's extreme value to -8
  and so gives negative scales for half the blocks: TensorRT would refuse them.
- ONNX Runtime's CPU provider rewrites ``DequantizeLinear`` (int4 blocks or int8 columns, constant) +
  ``MatMul`` into its own ``MatMulNBits`` when the session loads (measured with ONNX Runtime 1.32: both forms
  fuse), so the onnxruntime target runs its fast kernel from the same bytes, and one ``weights.bin`` serves
  the portable, the onnxruntime and the TensorRT graphs.

Rounding is round-half-to-even (``np.rint``), as TensorRT's definition; an all-zero block gets scale 1 (its
values are 0 either way) so that every scale stays positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128)
METHODS = ("rtn",)  # round-to-nearest; see the note of quant_method_error for the others
DEFAULT_BLOCK_SIZE = 64  # TensorRT's INT4 blocks are 64 or 128 (its "Quantization Schemes" page); 64 is the finer
TRT_INT4_BLOCK_SIZES = (64, 128)
TEXT_LINEARS = ("attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def quant_method_error(method: str) -> str | None:
    """Why a --quant-method is not offered, or None. Data-aware methods change which weights are rounded which
    way, never the stored form; they are left for later and say so rather than silently running RTN."""
    if method in METHODS:
        return None
    if method in ("awq", "gptq", "hqq"):
        return (f"--quant-method {method} is not available yet: only rtn (round-to-nearest, symmetric; the form"
                " TensorRT and ONNX Runtime both run) is implemented")
    return f"--quant-method must be one of rtn, awq, gptq, hqq; got {method!r}"


@dataclass(frozen=True)
class QuantScheme:
    weights: str  # "int4" or "int8"
    block_size: int = DEFAULT_BLOCK_SIZE  # int4 only; int8 is per output channel
    method: str = "rtn"
    lm_head: bool = False
    vision: bool = False  # the CLIP tower's and the projector's linear layers too
    scale_dtype: str = "float32"  # the bundle's float type: DequantizeLinear's output type is its scale's

    @property
    def bits(self) -> int:
        return BITS[self.weights]

    def applies(self, prefix: str) -> bool:
        """Whether the linear layer ``prefix`` (export/weights.py's canonical names) is quantized."""
        if prefix == "lm_head":
            return self.lm_head
        if prefix.startswith("text.layers."):
            return prefix.split(".", 3)[3] in TEXT_LINEARS
        if prefix.startswith(("vision.layers.", "projector.")):
            return self.vision
        return False

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "bits": self.bits,
            "block_size": self.block_size if self.bits == 4 else None,
            "granularity": f"blocks of {self.block_size} input rows" if self.bits == 4 else "per output channel",
            "method": self.method,
            "symmetric": True,
            "lm_head": self.lm_head,
            "vision": self.vision,
            "scale_dtype": self.scale_dtype,
            "format": "DequantizeLinear (opset 21, signed, no zero point) + MatMul",
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantScheme:
        return cls(weights=data["weights"], block_size=int(data.get("block_size") or DEFAULT_BLOCK_SIZE),
                   method=data.get("method", "rtn"), lm_head=bool(data.get("lm_head")),
                   vision=bool(data.get("vision")), scale_dtype=data.get("scale_dtype", "float32"))


def check_scheme(weights: str, block_size: int | None, method: str) -> QuantScheme:
    """The scheme of export-mllm's flags, or a one-line error."""
    from mllm_deploy.core.errors import MllmError

    if weights not in BITS:
        raise MllmError(f"--quantize must be int8 or int4, got {weights!r}")
    reason = quant_method_error(method)
    if reason:
        raise MllmError(reason)
    if block_size is not None and weights == "int8":
        raise MllmError("--block-size applies to int4 only (int8 has one scale per output channel)")
    block = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if block not in BLOCK_SIZES:
        raise MllmError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}")
    return QuantScheme(weights=weights, block_size=block, method=method)


def check_geometry(spec, scheme: QuantScheme) -> None:
    """Refuse, before any work, an int4 block size that does not divide every quantized layer's input features,
    naming the block sizes that would."""
    from mllm_deploy.core.errors import MllmError

    if scheme.bits != 4:
        return
    t, v = spec.text, spec.vision
    inputs = {"hidden size": t.hidden_size, "attention width": t.num_heads * t.head_dim,
              "MLP width": t.intermediate_size}
    if scheme.vision:
        inputs.update({"vision hidden size": v.hidden_size, "vision MLP width": v.intermediate_size})
    bad = {name: k for name, k in inputs.items() if k % scheme.block_size}
    if bad:
        fits = [b for b in BLOCK_SIZES if all(k % b == 0 for k in inputs.values())]
        raise MllmError(f"--block-size {scheme.block_size} does not divide the model's "
                        + ", ".join(f"{name} {k}" for name, k in bad.items())
                        + (f"; use --block-size {' or '.join(map(str, fits))}" if fits else
                           "; no int4 block size fits this model, use --quantize int8"))


def check_shape(prefix: str, k: int, scheme: QuantScheme) -> None:
    from mllm_deploy.core.errors import UnsupportedModelError

    if scheme.bits == 4 and k % scheme.block_size:
        raise UnsupportedModelError(f"{prefix}: {k} input features is not a multiple of --block-size"
                                    f" {scheme.block_size}; choose a block size that divides it")


def _scales(absmax: np.ndarray, levels: float, dtype: str) -> np.ndarray:
    """Positive scales in the stored float type (a scale that rounds to 0 there becomes its smallest positive
    value); the integers are then computed against the stored scale, so nothing is lost to its rounding."""
    scale = (absmax / levels).astype(dtype)
    scale[(scale <= 0) & (absmax > 0)] = np.finfo(dtype).smallest_subnormal
    scale[absmax == 0] = 1
    return scale


def quantize(weight: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(stored integers, scales) of a [K, N] float weight: int4 packed two per byte in row-major [K, N] order
    (first element in the low nibble, as ONNX stores INT4), int8 as int8 [K, N]; scales in scheme.scale_dtype."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    if scheme.bits == 4:
        blocks = w.reshape(k // scheme.block_size, scheme.block_size, n)
        scale = _scales(np.abs(blocks).max(axis=1), 7.0, scheme.scale_dtype)  # [K/B, N]
        q = np.clip(np.rint(blocks / scale[:, None, :].astype(np.float32)), -8, 7).astype(np.int8).reshape(-1)
        nibbles = (q & 0x0F).astype(np.uint8)
        return nibbles[0::2] | (nibbles[1::2] << 4), scale
    scale = _scales(np.abs(w).max(axis=0), 127.0, scheme.scale_dtype)  # [N]
    return np.clip(np.rint(w / scale.astype(np.float32)), -127, 127).astype(np.int8), scale


def dequantize(stored: np.ndarray, scale: np.ndarray, shape: tuple[int, int], scheme: QuantScheme) -> np.ndarray:
    """The float32 weight the graph computes with (tests and the accuracy checks use it)."""
    k, n = shape
    if scheme.bits == 4:
        q = np.empty(k * n, dtype=np.int8)
        q[0::2] = (stored & 0x0F).astype(np.int8)
        q[1::2] = (stored >> 4).astype(np.int8)
        q = np.where(q > 7, q - 16, q).reshape(k // scheme.block_size, scheme.block_size, n)
        return (q * scale[:, None, :].astype(np.float32)).reshape(k, n)
    return stored.astype(np.float32) * scale[None, :].astype(np.float32)


def quantized_bytes(k: int, n: int, scheme: QuantScheme, scale_bytes: int = 4) -> int:
    """Bytes one [K, N] weight takes in weights.bin (integers and scales)."""
    if scheme.bits == 4:
        return (k * n + 1) // 2 + (k // scheme.block_size) * n * scale_bytes
    return k * n + n * scale_bytes


def fake_quantize_model(model, scheme: QuantScheme) -> int:
    """Replace, in place, the weight of every nn.Linear of a Hugging Face LLaVA model that ``scheme`` covers by its
    quantize-dequantize round trip: the float model the quantized graphs compute exactly (quantization acts per
    output column, so q/k/v and gate/up quantized apart equal the fused matrices quantized at once). Returns how
    many layers were replaced."""
    import torch

    from mllm_deploy.export.weights import linear_groups, llava_modules

    done = 0
    with torch.no_grad():
        for prefix, modules in linear_groups(model, len(llava_modules(model)[0].encoder.layers)):
            if not scheme.applies(prefix):
                continue
            for module in modules:
                weight = module.weight.detach().float().numpy().T  # [K, N] as exported
                check_shape(prefix, weight.shape[0], scheme)
                restored = dequantize(*quantize(weight, scheme), weight.shape, scheme)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(restored.T)).to(module.weight.dtype))
                done += 1
    return done
