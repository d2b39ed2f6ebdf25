"""One bench-mllm measurement in its own process, so that peak host RSS belongs to this bundle alone.

    python -m mllm_deploy.tools.bench_worker BUNDLE --backend onnxruntime --prompt-tokens N ...

Prints one JSON line (a result of schema ``mllm-deploy/bench@1``) on stdout; progress ticks go to
stderr as ``PROGRESS_MARK`` lines that the parent turns into its progress bar. Errors follow the
CLI funnel (one line on stderr, exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mllm_deploy.core import cli
from mllm_deploy.core.errors import MllmError

PROGRESS_MARK = "@@bench-progress"
PREFIX_TOKENS = 5  # filler tokens before the image run, like a chat template's "USER: " prefix
ROUTING_SCOPES = ("/route/", "/rank/")  # node-name scopes of the routing subgraphs (export/pruned_prefill.py)
ROUTING_OPS = ("VisualScore", "TokenSelect", "TokenScatter")  # the plugin-routed forms


# ---- inputs ---------------------------------------------------------------------------------------
def synthetic_inputs(bundle, prompt_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Valid model input: filler text ids around one image-token run, and a preprocessed random image.

    Filler ids are non-special tokenizer ids (no BOS, no image token), so every id is one the
    model would see from real text; the image goes through the bundle's own preprocessing.
    """
    from PIL import Image
    from tokenizers import Tokenizer

    from mllm_deploy.runtime.preprocess import ImagePreprocessConfig, preprocess

    visual = bundle.visual_tokens
    if prompt_tokens < visual + PREFIX_TOKENS + 1:
        raise MllmError(f"--prompt-tokens must be at least {visual + PREFIX_TOKENS + 1} for this bundle"
                        f" ({PREFIX_TOKENS} tokens before the {visual} image tokens and one after), got {prompt_tokens}")
    model = bundle.manifest["model"]
    limit = int(model["text"]["max_position_embeddings"])
    if prompt_tokens > limit:
        raise MllmError(f"--prompt-tokens {prompt_tokens} exceeds the model's context of {limit} positions")
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
    # a photo-sized image so that resizing and cropping run as they would for a real one
    pixels_u8 = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    config = ImagePreprocessConfig.from_dict(bundle.manifest["image"])
    return ids[None], preprocess(Image.fromarray(pixels_u8, "RGB"), config)


# ---- statistics and model facts -------------------------------------------------------------------
def spread(values: list[float]) -> dict | None:
    return None if not values else {"median": statistics.median(values), "min": min(values), "max": max(values)}


def text_params(text: dict) -> tuple[int, int]:
    """(all text-model parameters, those read per forward pass): the input embedding table is only
    gathered (one row per token), so it is left out of the second count unless tied to the LM head."""
    d, heads, kv_heads, dh, inter, vocab = (text["hidden_size"], text["num_heads"], text["num_kv_heads"],
                                            text["head_dim"], text["intermediate_size"], text["vocab_size"])
    per_layer = d * (heads + 2 * kv_heads) * dh + heads * dh * d + 3 * d * inter + 2 * d
    if text.get("attention_bias"):
        per_layer += (heads + 2 * kv_heads) * dh + d
    if text.get("mlp_bias"):
        per_layer += 2 * inter + d
    embed = vocab * d
    head = 0 if text.get("tie_word_embeddings") else vocab * d
    total = embed + text["num_layers"] * per_layer + d + head
    return total, total - (0 if text.get("tie_word_embeddings") else embed)


def static_facts(bundle, prompt_tokens: int) -> dict:
    """Fields that follow from the manifest alone: recipe, FLOPs, model size."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import Recipe
    from mllm_deploy.formats.geometry import spec_from_manifest

    manifest = bundle.manifest
    spec = spec_from_manifest(manifest["model"])
    recipe = Recipe.from_dict(manifest["recipe"])
    flops = prefill_cost(spec, recipe, text_tokens=prompt_tokens - spec.visual_tokens, formula="exact",
                         prefix_tokens=PREFIX_TOKENS)
    total, read = text_params(manifest["model"]["text"])
    text = manifest["model"]["text"]
    return {
        "bundle": str(bundle.path), "name": bundle.path.name, "method": recipe.method_name,
        "visual_tokens": list(recipe.visual_tokens), "prompt_tokens": prompt_tokens,
        "prefill_flops": flops.recipe, "dense_prefill_flops": flops.dense, "flops_reduction": flops.reduction,
        "model": {"fingerprint": spec.fingerprint, "source_model": manifest.get("source_model"),
                  "bundle_dtype": manifest["dtype"], "num_layers": text["num_layers"],
                  "num_kv_heads": text["num_kv_heads"], "head_dim": text["head_dim"],
                  "text_params": total, "text_params_read_per_pass": read},
    }


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ---- the onnxruntime measurement --------------------------------------------------------------------
PROFILED_RUNS = 4  # the first is a warm-up (first-touch allocations); the share is the median of the rest


def routing_share_of_profile(events: list[dict]) -> float:
    """Median over profiled runs (after the first) of the share of prefill kernel time spent in
    routing nodes, from an ONNX Runtime JSON profile."""
    spans = sorted((float(e.get("ts") or 0), float(e.get("ts") or 0) + float(e.get("dur") or 0)) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(spans) < 2:
        return _routing_share(events)
    shares = [_routing_share([e for e in events if start <= float(e.get("ts") or 0) <= end]) for start, end in spans[1:]]
    return float(np.median(shares))


def _routing_share(events: list[dict]) -> float:
    total = routing = 0.0
    for event in events:
        if event.get("cat") != "Node":
            continue
        args = event.get("args") or {}
        name = str(args.get("node_name") or event.get("name") or "")
        duration = float(event.get("dur") or 0)
        total += duration
        if any(scope in name for scope in ROUTING_SCOPES) or args.get("op_name") in ROUTING_OPS:
            routing += duration
    return routing / total if total else 0.0


def profiled_routing_share(bundle, feed: dict[str, np.ndarray]) -> float:
    """Extra prefills in a profiling session (profiling slows every node, so it is kept out of the timings)."""
    from mllm_deploy.runtime.backends import runner_class

    entry = bundle.manifest["graphs"]["prefill"]
    runner = runner_class("onnxruntime")(bundle.graph_path("prefill").resolve(), bundle.graph_io("prefill"), "prefill",
                                         profile=True, custom_ops=entry.get("custom_ops", []))
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mllm-bench-profile-") as scratch:
        os.chdir(scratch)  # ONNX Runtime writes its profile into the working directory
        try:
            with runner:
                for _ in range(PROFILED_RUNS):
                    runner.infer(feed)
                profile_file = runner.end_profiling()
            events = json.loads(Path(profile_file).read_text()) if profile_file else []
        finally:
            os.chdir(here)
    return routing_share_of_profile(events)


def measure_onnxruntime(bundle, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, repeats: int, warmup: int,
                        tick: Callable[[], None], backend: str = "onnxruntime") -> dict:
    """The runtime's own loop (Generator) on ``backend``: onnxruntime, or tensorrt (no ORT profile then)."""
    from mllm_deploy.runtime.generator import Generator

    prompt_len = int(ids.shape[1])
    vision, prefill, decode, overhead = [], [], [], []
    kv_tokens: list[int] = []
    kv_bytes: list[int] = []
    with Generator(bundle, backend) as gen:
        decode_runner = gen.runners["decode"]
        for run in range(warmup + repeats):
            t0 = time.perf_counter()
            features = gen.encode_image(pixels)
            t1 = time.perf_counter()
            logits, cache = gen.prefill(ids, features, capacity_extra=new_tokens)
            t2 = time.perf_counter()
            # what the cache holds after prefill, not its decode headroom
            kv_tokens = [int(n) for n in cache.lengths]
            kv_bytes = [2 * cache.keys[l][:, :, :n].nbytes for l, n in enumerate(kv_tokens)]
            steps, shares = [], []
            token = int(np.argmax(logits))
            for step in range(new_tokens - 1):  # the first token comes from prefill, as in Generator.generate
                ts = time.perf_counter()
                logits = gen.decode(token, prompt_len + step, cache)  # ignore_eos: always the full count
                wall_ms = (time.perf_counter() - ts) * 1e3
                steps.append(wall_ms)
                if wall_ms > 0:
                    shares.append(max(wall_ms - decode_runner.last_inference_ms, 0.0) / wall_ms)
                token = int(np.argmax(logits))
            if run >= warmup:
                vision.append((t1 - t0) * 1e3)
                prefill.append((t2 - t1) * 1e3)
                decode.extend(steps)
                overhead.extend(shares)
                tick()
        image_start = gen.image_start(ids)
        feed = {"input_ids": ids, "image_features": features, "image_start": np.array([image_start], np.int64)}
    on_trt = backend == "tensorrt"  # routing share comes from ONNX Runtime's profiler only
    return {"vision": vision, "prefill": prefill, "decode": decode, "kv_tokens": kv_tokens, "kv_bytes": kv_bytes,
            "routing_share": None if on_trt else profiled_routing_share(bundle, feed),
            "decode_overhead_share": statistics.median(overhead) if overhead else None, "peak_device_mb": None,
            "device": _gpu_name() if on_trt else "cpu", "run_dtype": bundle.dtype}


def _gpu_name() -> str:
    from mllm_deploy.trt.env import query_gpu

    name, capability = query_gpu()
    return f"{name} (sm_{capability.replace('.', '')})"


# ---- the worker entry point ---------------------------------------------------------------------------
def measure(bundle_path: str, backend: str, prompt_tokens: int | None, new_tokens: int, repeats: int,
            warmup: int, tick: Callable[[], None] = lambda: None) -> dict:
    from mllm_deploy.runtime.bundle import load_bundle

    bundle = load_bundle(Path(bundle_path).resolve(), check_hashes=False)  # the parent checked them
    prompt_tokens = prompt_tokens if prompt_tokens is not None else bundle.visual_tokens + 40
    ids, pixels = synthetic_inputs(bundle, prompt_tokens)
    if prompt_tokens + new_tokens > int(bundle.manifest["model"]["text"]["max_position_embeddings"]):
        raise MllmError(f"--prompt-tokens {prompt_tokens} plus --new-tokens {new_tokens} exceeds the model's context")
    if backend in ("onnxruntime", "tensorrt"):
        raw = measure_onnxruntime(bundle, ids, pixels, new_tokens, repeats, warmup, tick, backend)
    elif backend == "torch":
        from mllm_deploy.tools.bench_torch import measure_torch  # the only path that imports torch

        raw = measure_torch(bundle, ids, pixels, new_tokens, repeats, warmup, tick)
    else:
        raise MllmError(f"unknown --backend '{backend}'; choose onnxruntime, tensorrt or torch")
    ttft = [v + p for v, p in zip(raw["vision"], raw["prefill"])]
    decode = spread(raw["decode"])
    return {
        **static_facts(bundle, prompt_tokens), "backend": backend, "new_tokens": new_tokens,
        "vision_ms": spread(raw["vision"]), "prefill_ms": spread(raw["prefill"]), "ttft_ms": spread(ttft),
        "decode_ms_per_token": decode, "tokens_per_s": 1000.0 / decode["median"] if decode else None,
        "kv_cache_bytes": sum(raw["kv_bytes"]), "kv_cache_bytes_per_layer": raw["kv_bytes"],
        "kv_tokens_per_layer": raw["kv_tokens"], "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": raw["peak_device_mb"], "routing_share": raw["routing_share"],
        "decode_overhead_share": raw["decode_overhead_share"], "device": raw["device"], "run_dtype": raw["run_dtype"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-mllm-worker", description="one bench-mllm measurement (internal)")
    p.add_argument("bundle")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p


def run(args: argparse.Namespace) -> int:
    def tick() -> None:
        print(PROGRESS_MARK, file=sys.stderr, flush=True)

    result = measure(args.bundle, args.backend, args.prompt_tokens, args.new_tokens, args.repeats, args.warmup, tick)
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    return cli.main("bench-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
