"""The one timed loop: bench-mllm (every backend) and build-mllm --verify measure generation here.

``time_generation`` runs the runtime's own ``Generator.generate`` (greedy, EOS ignored, so every run makes
exactly ``new_tokens`` tokens: the first from prefill, the rest from decode steps) ``warmup`` times
unmeasured, then ``repeats`` times measured. The Generator times each stage itself: vision, prefill, every
decode step and the decode runner's own part of it. The backend is the Generator's, so onnxruntime,
tensorrt and the PyTorch reference are timed by the same code.

``bench_result`` turns the runs into one result of schema ``mllm-deploy/bench@1`` (medians and min-max
spreads, KV-cache memory, FLOPs, model size, weight scheme, bundle and weights-file bytes, peak RSS, the
device): the fields bench-mllm and report-mllm read. ``synthetic_inputs`` is the valid prompt both measure.
"""

from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mllm_deploy.core.errors import MllmError
from mllm_deploy.runtime.backends.base import NP_DTYPES
from mllm_deploy.runtime.bundle import VERIFIED_FILE, Bundle
from mllm_deploy.runtime.generator import Generation, Generator

PREFIX_TOKENS = 5  # filler tokens before the image run, like a chat template's "USER: " prefix


# ---- inputs ---------------------------------------------------------------------------------------
def synthetic_inputs(bundle: Bundle, prompt_tokens: int, seed: int = 0) -> tuple[np.ndarray, object]:
    """Valid model input: filler text ids around one image-token run, and a preprocessed random image.

    Filler ids are non-special tokenizer ids (no BOS, no image token), so every id is one the
    model would see from real text; the image goes through the bundle's own preprocessing.
    """
    from PIL import Image
    from tokenizers import Tokenizer

    from mllm_deploy.formats.image import ImagePreprocessConfig
    from mllm_deploy.runtime.preprocess import preprocess

    config = ImagePreprocessConfig.from_dict(bundle.manifest["image"])
    height, width = 480, 640  # a photo-sized image so that resizing and cropping run as they would for a real one
    if config.is_anyres:  # LLaVA-NeXT: the image's own count of visual tokens, from its size
        from mllm_deploy.formats.image import anyres_feature_layout

        visual = anyres_feature_layout((height, width), config.image_grid_pinpoints, tile_size=config.tile_size,
                                       patch_grid=bundle.patch_grid).num_tokens
    else:
        visual = bundle.visual_tokens
    if prompt_tokens < visual + PREFIX_TOKENS + 1:
        raise MllmError(f"--prompt-tokens must be at least {visual + PREFIX_TOKENS + 1} for this bundle"
                        f" ({PREFIX_TOKENS} tokens before the {visual} image tokens and one after), got {prompt_tokens}")
    model = bundle.manifest["model"]
    if prompt_tokens > bundle.max_positions:
        raise MllmError(f"--prompt-tokens {prompt_tokens} exceeds the model's context of {bundle.max_positions}"
                        " positions")
    tokenizer = Tokenizer.from_file(str(bundle.path / bundle.manifest["tokenizer"]["file"]))
    special = set(tokenizer.get_added_tokens_decoder())
    vocab_size = int(model["text"]["vocab_size"])
    image_id = int(model["image_token_id"])
    candidates = sorted(i for i in tokenizer.get_vocab(with_added_tokens=True).values()
                        if i not in special and i != image_id and i < vocab_size)
    if not candidates:
        raise MllmError(f"{bundle.path}: the tokenizer has no non-special tokens to build a prompt from")
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.array(candidates, dtype=np.int64), size=prompt_tokens)
    ids[PREFIX_TOKENS:PREFIX_TOKENS + visual] = image_id
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
    if config.is_anyres:
        from mllm_deploy.runtime.anyres import anyres_pixels

        return ids[None], anyres_pixels(image, config, bundle.patch_grid)
    return ids[None], preprocess(image, config)


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class TimedRuns:
    """The measured runs of one bundle on one backend: milliseconds per run (vision, prefill) and per
    decode step (all steps of all runs), each step's share spent outside the decode runner, and what
    each layer's KV cache held after prefill."""

    prompt_tokens: int
    new_tokens: int
    vision_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    decode_overhead_shares: list[float] = field(default_factory=list)
    kv_tokens_per_layer: list[int] = field(default_factory=list)

    def add(self, generation: Generation) -> None:
        timings = generation.timings
        self.vision_ms.append(timings.vision_ms)
        self.prefill_ms.append(timings.prefill_ms)
        self.decode_ms.extend(timings.decode_ms)
        self.decode_overhead_shares.extend(max(wall - inside, 0.0) / wall for wall, inside
                                           in zip(timings.decode_ms, timings.decode_backend_ms) if wall > 0)
        self.kv_tokens_per_layer = list(generation.kv_tokens_per_layer)


def time_generation(generator: Generator, input_ids: np.ndarray, pixel_values: np.ndarray, new_tokens: int,
                    repeats: int, warmup: int, on_run: Callable[[], None] = lambda: None) -> TimedRuns:
    """``warmup`` unmeasured runs (first-touch allocations, lazy initialisation), then ``repeats`` measured
    ones; ``on_run`` after each measured run (a progress bar)."""
    runs = TimedRuns(prompt_tokens=int(input_ids.shape[1]), new_tokens=new_tokens)
    for run in range(warmup + repeats):
        generation = generator.generate(input_ids, pixel_values, new_tokens, ignore_eos=True)
        if run >= warmup:
            runs.add(generation)
            on_run()
    return runs


# ---- the bench@1 result ---------------------------------------------------------------------------
def spread(values: list[float]) -> dict | None:
    return None if not values else {"median": statistics.median(values), "min": min(values), "max": max(values)}


def text_params(text: dict, attention_skipped: int = 0) -> tuple[int, int]:
    """(all text-model parameters, those read per forward pass): the input embedding table is only
    gathered (one row per token), so it is left out of the second count unless tied to the LM head. Layers whose
    attention an EAS recipe removed (``attention_skipped`` of them) have no attention weights or input norm."""
    d, heads, kv_heads, dh, inter, vocab = (text["hidden_size"], text["num_heads"], text["num_kv_heads"],
                                            text["head_dim"], text["intermediate_size"], text["vocab_size"])
    per_layer = d * (heads + 2 * kv_heads) * dh + heads * dh * d + 3 * d * inter + 2 * d
    if text.get("attention_bias"):
        per_layer += (heads + 2 * kv_heads) * dh + d
    if text.get("mlp_bias"):
        per_layer += 2 * inter + d
    embed = vocab * d
    head = 0 if text.get("tie_word_embeddings") else vocab * d
    attention = d * (heads + 2 * kv_heads) * dh + heads * dh * d + d
    if text.get("attention_bias"):
        attention += (heads + 2 * kv_heads) * dh + d
    total = embed + text["num_layers"] * per_layer - attention_skipped * attention + d + head
    return total, total - (0 if text.get("tie_word_embeddings") else embed)


def bundle_sizes(bundle: Bundle) -> tuple[int, int | None]:
    """(bytes of every file in the bundle directory, bytes of its weights file or None when the graphs hold the
    weights themselves). The runtime's own hash cache (.verified.json) is not part of the bundle and is left out."""
    files = [f for f in bundle.path.rglob("*")
             if f.is_file() and f.relative_to(bundle.path).as_posix() != VERIFIED_FILE]
    weights = bundle.manifest.get("weights")
    weights_file = bundle.path / weights if isinstance(weights, str) else None
    return (sum(f.stat().st_size for f in files),
            weights_file.stat().st_size if weights_file is not None and weights_file.is_file() else None)


def static_facts(bundle: Bundle, prompt_tokens: int) -> dict:
    """Fields that follow from the bundle alone: recipe, FLOPs, model size, weight scheme and file sizes."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.geometry import spec_from_manifest
    from mllm_deploy.formats.recipe import Recipe

    manifest = bundle.manifest
    spec = spec_from_manifest(manifest["model"])
    recipe = Recipe.from_dict(manifest["recipe"])
    flops = prefill_cost(spec, recipe, text_tokens=prompt_tokens - spec.visual_tokens, formula="exact",
                         prefix_tokens=PREFIX_TOKENS)
    total, read = text_params(manifest["model"]["text"], len(recipe.skip_attention))
    text = manifest["model"]["text"]
    quantization = manifest.get("quantization")
    bundle_bytes, weight_bytes = bundle_sizes(bundle)
    return {
        "bundle": str(bundle.path), "name": bundle.path.name, "method": recipe.method_name,
        "visual_tokens": list(recipe.visual_tokens), "prompt_tokens": prompt_tokens,
        "prefill_flops": flops.recipe, "dense_prefill_flops": flops.dense, "flops_reduction": flops.reduction,
        # the stored weights: "int4"/"int8" for a weight-only quantized bundle (its scheme in "quantization"),
        # else the bundle's float type
        "weights_scheme": quantization["weights"] if quantization else manifest["dtype"],
        "quantization": quantization, "bundle_bytes": bundle_bytes, "weight_bytes": weight_bytes,
        "model": {"fingerprint": spec.fingerprint, "source_model": manifest.get("source_model"),
                  "bundle_dtype": manifest["dtype"], "num_layers": text["num_layers"],
                  "num_kv_heads": text["num_kv_heads"], "head_dim": text["head_dim"],
                  "text_params": total, "text_params_read_per_pass": read,
                  "spec": manifest["model"]},  # the geometry (formats/geometry.spec_from_manifest) for estimates
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss survives execve, so a worker started
    from a larger parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def bench_result(generator: Generator, runs: TimedRuns) -> dict:
    """One result of schema ``mllm-deploy/bench@1``. ``routing_share`` is left None: it comes from a
    profiler (ONNX Runtime's), which the caller runs outside the timings when its backend has one."""
    bundle, decode_runner = generator.bundle, generator.runners["decode"]
    device = decode_runner.device_facts()
    run_dtype = device["run_dtype"] or bundle.dtype
    text = bundle.manifest["model"]["text"]
    # keys and values of the entries each layer holds after prefill, in the type the backend computes in
    entry_bytes = 2 * int(text["num_kv_heads"]) * int(text["head_dim"]) * np.dtype(NP_DTYPES[run_dtype]).itemsize
    kv_bytes = [n * entry_bytes for n in runs.kv_tokens_per_layer]
    ttft = [vision + prefill for vision, prefill in zip(runs.vision_ms, runs.prefill_ms)]
    decode = spread(runs.decode_ms)
    overhead = runs.decode_overhead_shares if decode_runner.infer_time_is_backend_time else []
    return {
        **static_facts(bundle, runs.prompt_tokens), "backend": generator.backend, "new_tokens": runs.new_tokens,
        "vision_ms": spread(runs.vision_ms), "prefill_ms": spread(runs.prefill_ms), "ttft_ms": spread(ttft),
        "decode_ms_per_token": decode, "tokens_per_s": 1000.0 / decode["median"] if decode else None,
        "kv_cache_bytes": sum(kv_bytes), "kv_cache_bytes_per_layer": kv_bytes,
        "kv_tokens_per_layer": list(runs.kv_tokens_per_layer), "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": device["peak_device_mb"], "routing_share": None,
        "decode_overhead_share": statistics.median(overhead) if overhead else None, "device": device["device"],
        "run_dtype": run_dtype,
    }
