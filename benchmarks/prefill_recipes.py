"""Prefill time of dense vs FastV vs FitPrune vs mixture-of-depths bundles on one backend, beside the FLOPs model.

    .venv/bin/python benchmarks/prefill_recipes.py [--model small-llava] [--repeats 7] [--workdir DIR]
        [--recipes dense,fastv-k2-r0.5,...] [--routing native|plugin]

Calibrates the recipes (FastV K=2 R=0.5 static; FitPrune budget 0.5 on builtin:synthetic:4; MoD with
p-MoD's ratio-decay plan and the attention router or routers fitted on builtin:synthetic:8; cls and dart before
the language model at 50%/75%, cls 50% then FastV; EAS removing 1 or 2 attentions, with and without the stand-in,
on builtin:synthetic:4),
exports fp32 bundles (reused when present), then times the prefill graph
alone on ONNX Runtime CPU: warm-up, then repeats taken round-robin across bundles so drift
hits all alike. Reports medians, min/max and speedups measured in the same run, beside the
speedup the `exact` FLOPs model predicts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mllm_deploy.calib.eas import EasOptions
from mllm_deploy.calib.fitprune import FitPruneOptions
from mllm_deploy.calib.mod import ModOptions
from mllm_deploy.calib.pre_llm import ClsOptions, DartOptions
from mllm_deploy.calib.static_methods import DenseOptions, FastVOptions

RECIPES = {  # name -> calibration options (a method's options dataclass from calib/methods.py)
    "dense": DenseOptions(),
    "fastv-k2-r0.5": FastVOptions(k=2, r=0.5),
    "fitprune-0.5": FitPruneOptions(budget=0.5, data="builtin:synthetic:4"),
    "mod-prd-attention": ModOptions(plan="prd", router="attention"),
    "mod-prd-fitted": ModOptions(plan="prd", router="fitted", data="builtin:synthetic:8"),
    "cls-0.5": ClsOptions(ratio=0.5),
    "cls-0.75": ClsOptions(ratio=0.75),
    "dart-0.5": DartOptions(ratio=0.5),
    "dart-0.75": DartOptions(ratio=0.75),
    "dart-L2-0.5": DartOptions(ratio=0.5, dart_layer=2),
    "cls-0.5+fastv-k2-r0.5": FastVOptions(k=2, r=0.5, pre_llm="cls-0.5"),  # pre_llm: a recipe name of this table
    "eas-1": EasOptions(skip=1, data="builtin:synthetic:4"),
    "eas-2": EasOptions(skip=2, data="builtin:synthetic:4"),
    "eas-1+pia": EasOptions(skip=1, pia=True, data="builtin:synthetic:4"),
    "eas-2+pia": EasOptions(skip=2, pia=True, data="builtin:synthetic:4"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-llava")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--text-before", type=int, default=5)
    p.add_argument("--text-after", type=int, default=35)
    p.add_argument("--workdir", default="out/bench-prefill")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {', '.join(RECIPES)}"
                   " (dense is always included: speedups are against it)")
    p.add_argument("--routing", default="native", choices=["native", "plugin"])
    p.add_argument("--profile", action="store_true",
                   help="instead of the round-robin timing: ONNX Runtime's profile of each bundle's prefill, --repeats"
                        " runs back to back after the warm-up, node times summed per op type")
    args = p.parse_args()
    chosen = ["dense"] + [name for name in args.recipes.split(",") if name and name != "dense"]
    for name in list(chosen):  # a composed recipe needs its pre-LLM stage's recipe first
        pre = getattr(RECIPES.get(name), "pre_llm", None)
        if pre and pre not in chosen[:chosen.index(name)]:
            chosen.insert(chosen.index(name), pre)
    chosen = list(dict.fromkeys(chosen))
    unknown = [name for name in chosen if name not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")

    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import load_recipe, save_recipe
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.models.registry import load_spec
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.generator import Generator

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _, spec = load_spec(args.model)
    bundles, recipes = {}, {}
    for name in chosen:
        recipe_path = work / f"{name}.json"
        if not recipe_path.exists():
            t0 = time.perf_counter()
            options = RECIPES[name]
            if getattr(options, "pre_llm", None):
                from dataclasses import replace

                options = replace(options, pre_llm=str(work / f"{options.pre_llm}.json"))
            save_recipe(calibrate(args.model, options, log=print), recipe_path)
            print(f"{name}: calibrated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        bundle = work / (f"bundle-{name}" if args.routing == "native" else f"bundle-{name}-plugin")
        if not (bundle / "manifest.json").exists():
            t0 = time.perf_counter()
            export_bundle(args.model, bundle, ExportOptions(recipe=str(recipe_path), routing=args.routing, force=True),
                          log=print)
            print(f"{name}: exported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        bundles[name] = bundle
        recipes[name] = load_recipe(recipe_path, spec)

    text = args.text_before + args.text_after
    rng = np.random.default_rng(0)
    words = rng.integers(8, spec.text.vocab_size - 8, size=text)

    def inputs(n: int):
        """The same text around an image run of n tokens (a pre-LLM stage leaves the language model fewer)."""
        ids = np.concatenate([words[:args.text_before], np.full(n, spec.image_token_id), words[args.text_before:]])
        features = np.random.default_rng(1).standard_normal((1, n, spec.text.hidden_size)).astype(np.float32)
        return ids[None].astype(np.int64), features

    if args.profile:
        return profile(bundles, inputs, args.warmup, args.repeats)
    generators = {name: Generator(load_bundle(b)).__enter__() for name, b in bundles.items()}
    feeds = {name: inputs(gen.bundle.visual_tokens) for name, gen in generators.items()}
    pixels = np.random.default_rng(2).standard_normal(
        (1, spec.vision.num_channels, spec.vision.image_size, spec.vision.image_size)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in bundles}
    vision: dict[str, list[float]] = {name: [] for name in bundles}
    for _ in range(args.warmup):
        for name, gen in generators.items():
            gen.prefill(*feeds[name], capacity_extra=1)
            gen.encode_image(pixels)
    for _ in range(args.repeats):
        for name, gen in generators.items():
            gen.prefill(*feeds[name], capacity_extra=1)
            times[name].append(gen.runners["prefill"].last_inference_ms)
            gen.encode_image(pixels)
            vision[name].append(gen.runners["vision"].last_inference_ms)

    dense_ms = statistics.median(times["dense"])
    rows = []
    for name in bundles:
        flops = prefill_cost(spec, recipes[name], text_tokens=text, formula="exact", prefix_tokens=args.text_before)
        med = statistics.median(times[name])
        predicted = flops.dense / flops.recipe
        measured = dense_ms / med
        rows.append({"recipe": name, "visual_tokens": recipes[name].visual_tokens, "prefill_ms_median": med,
                     "prefill_ms_min": min(times[name]), "prefill_ms_max": max(times[name]),
                     "vision_ms_median": statistics.median(vision[name]),
                     "kv_bytes": sum(flops.kv_bytes_per_layer), "kv_bytes_per_layer": flops.kv_bytes_per_layer,
                     "gflops": flops.recipe / 1e9, "flops_speedup": predicted, "measured_speedup": measured,
                     "efficiency": measured / predicted})
    print("| recipe | prefill ms median (min-max) | vision ms | GFLOPs (exact) | FLOPs speedup | measured speedup |"
          " measured/FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['prefill_ms_median']:.0f} ({r['prefill_ms_min']:.0f}-{r['prefill_ms_max']:.0f}) |"
              f" {r['vision_ms_median']:.0f} | {r['gflops']:.1f} | {r['flops_speedup']:.2f}x |"
              f" {r['measured_speedup']:.2f}x | {r['efficiency']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "prompt_tokens": text + spec.visual_tokens,
                                               "routing": args.routing, "repeats": args.repeats, "rows": rows}, indent=2))
    return 0


def profile(bundles: dict, inputs, warmup: int, repeats: int) -> int:
    """Per bundle: the mean ONNX Runtime node time per prefill, in total and by op type (largest first)."""
    import collections
    import os

    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.generator import Generator

    dense_ms = None
    for name, path in bundles.items():
        with Generator(load_bundle(path), profile=True) as gen:
            feed = inputs(gen.bundle.visual_tokens)
            for _ in range(warmup + repeats):
                gen.prefill(*feed, capacity_extra=1)
            trace = gen.runners["prefill"].session.end_profiling()
            for role, runner in gen.runners.items():  # every session profiles: leave no trace files behind
                if role != "prefill" and getattr(runner, "session", None) is not None:
                    os.remove(runner.session.end_profiling())
        events = json.loads(Path(trace).read_text())
        os.remove(trace)
        runs = [e["dur"] / 1e3 for e in events if e.get("name") == "model_run"][warmup:]
        by_op: collections.Counter = collections.Counter()
        nodes = [e for e in events if e.get("cat") == "Node"]
        per_run = len(nodes) // (warmup + repeats)
        for e in nodes[warmup * per_run:]:
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / repeats
        total = sum(by_op.values())
        dense_ms = total if dense_ms is None else dense_ms
        ops = ", ".join(f"{op} {ms:.1f}" for op, ms in by_op.most_common(4))
        print(f"{name}: node time {total:.0f} ms per prefill (model_run median {statistics.median(runs):.0f} ms);"
              f" dense/this {dense_ms / total:.2f}x; {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
