"""Prefill of shape-accurate random-weight models through the PyTorch reference, on a GPU.

    python benchmarks/gpu_shape_prefill.py [--model llava-1.5-7b-shape] [--device cuda] [--dtype float16]
                                           [--text-tokens 64] [--repeats 20] [--warmup 5] [--json OUT]

The geometry presets (``llava-1.5-7b-shape``, ``-13b-shape``) ship a config.json only; this
script materialises random weights directly on the device in the run dtype (no download, no
CPU copy of 14 GB), then times the prefill of dense, FastV (K=2, R=0.5) and FitPrune with the
authors' published 50%-budget schedule for LLaVA-1.5-7B (METHODS.md) through
``RecipeReference`` — the eager research-code baseline — and prints measured speedup against
the exact FLOPs model's prediction. Timing does not depend on the weights' values: every
recipe keeps a constant number of tokens per layer. Weights are random, so answers are not.

On a machine without CUDA, ``--device cpu --model tiny-llava`` exercises the same code path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# FitPrune's published removal schedule at a 50% budget for LLaVA-1.5-7B (32 layers, 576 tokens):
# tokens removed after each layer's attention (METHODS.md, FitPrune).
PUBLISHED_FITPRUNE_50 = [3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1,
                         0, 0, 1, 1, 2, 0, 0, 0]


def recipes(spec) -> dict:
    from mllm_deploy.calib import static_methods

    out = {"dense": static_methods.dense_recipe(spec), "fastv K=2 R=0.5": static_methods.fastv_recipe(spec, 2, 0.5)}
    if spec.text.num_layers == len(PUBLISHED_FITPRUNE_50) and spec.visual_tokens == 576:
        out["fitprune 0.5 (published schedule)"] = static_methods.fitprune_from_schedule(spec, PUBLISHED_FITPRUNE_50)
    else:  # another geometry: the same shape of schedule, scaled to its depth and token count
        layers, tokens = spec.text.num_layers, spec.visual_tokens
        scaled = [round(PUBLISHED_FITPRUNE_50[i * 32 // layers] * tokens / 576 * 32 / layers) for i in range(layers)]
        out["fitprune 0.5 (scaled schedule)"] = static_methods.fitprune_from_schedule(spec, scaled)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llava-1.5-7b-shape")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.models.registry import load_spec

    model_dir, spec = load_spec(args.model)
    dtype = getattr(torch, args.dtype)
    config = LlavaConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration(config).eval()  # random weights, made on the device
    torch.set_default_dtype(previous)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    n_vis = spec.visual_tokens
    size = config.vision_config.image_size
    text = torch.randint(3, min(config.text_config.vocab_size, 1000), (args.text_tokens,))
    ids = torch.cat([text[:1], torch.full((n_vis,), config.image_token_id), text[1:]])[None].to(args.device)
    pixels = torch.randn(1, 3, size, size, dtype=dtype, device=args.device)
    rows = []
    with torch.inference_mode(), torch.device(args.device):
        for name, recipe in recipes(spec).items():
            reference = RecipeReference(model, recipe)
            features = reference.image_features(pixels)
            times = []
            for run in range(args.warmup + args.repeats):
                sync()
                t0 = time.perf_counter()
                reference.prefill(ids, features)
                sync()
                if run >= args.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            cost = prefill_cost(spec, recipe, text_tokens=args.text_tokens, prefix_tokens=1)
            rows.append({"recipe": name, "prefill_ms_median": statistics.median(times), "prefill_ms_min": min(times),
                         "prefill_ms_max": max(times), "flops_reduction": cost.reduction})
            print(f"{name}: {statistics.median(times):.2f} ms", file=sys.stderr)
    dense = rows[0]["prefill_ms_median"]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"{args.model}, {args.dtype}, {device}, prompt = 1 + {n_vis} visual + {args.text_tokens - 1} text tokens,"
          f" median of {args.repeats} after {args.warmup} warm-up")
    print("| recipe | prefill ms median (min–max) | measured speedup | FLOPs speedup (exact) | realised / predicted |")
    print("|---|---|---|---|---|")
    for row in rows:
        measured = dense / row["prefill_ms_median"]
        predicted = 1.0 / (1.0 - row["flops_reduction"])
        row.update(measured_speedup=measured, predicted_speedup=predicted, realised_over_predicted=measured / predicted)
        print(f"| {row['recipe']} | {row['prefill_ms_median']:.2f} ({row['prefill_ms_min']:.2f}–{row['prefill_ms_max']:.2f})"
              f" | {measured:.2f}x | {predicted:.2f}x | {measured / predicted:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "device": device,
                                               "text_tokens": args.text_tokens, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
