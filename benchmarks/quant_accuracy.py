"""Accuracy of weight-only quantized bundles on shapes-vqa, alone and composed with pruning recipes.

    .venv/bin/python benchmarks/quant_accuracy.py [--questions 1000] [--calib 16] [--workdir out/quant-acc]

Every bundle is exported with verification (against the fake-quantized PyTorch model) and answers the same test
questions through the runtime (eval-mllm's code, ONNX Runtime on the CPU, where DequantizeLinear + MatMul runs as
MatMulNBits). Agreement and KL are against the first row, the float32 dense bundle. Writes a markdown table and
the eval JSON (results.json) into the work directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# (row name, recipe name from benchmarks/shapes_accuracy.recipes or None for dense, export quantization options)
# shapes-llava's MLP has 352 input features: of the int4 block sizes only 32 divides it (export refuses the others)
ROWS = [
    ("fp32 dense", None, {}),
    ("int8 dense", None, {"quantize": "int8"}),
    ("int4 b32 dense", None, {"quantize": "int4", "block_size": 32}),
    ("int4 b32 + lm_head dense", None, {"quantize": "int4", "block_size": 32, "quantize_lm_head": True}),
    ("fp32 mod fitted c=0.5", "mod fitted c=0.5", {}),
    ("int8 mod fitted c=0.5", "mod fitted c=0.5", {"quantize": "int8"}),
    ("int4 b32 mod fitted c=0.5", "mod fitted c=0.5", {"quantize": "int4", "block_size": 32}),
    ("fp32 fastv K=2 R=0.75", "fastv K=2 R=0.75", {}),
    ("int4 b32 fastv K=2 R=0.75", "fastv K=2 R=0.75", {"quantize": "int4", "block_size": 32}),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--calib", type=int, default=16, help="validation questions used to calibrate the recipes")
    p.add_argument("--workdir", default="out/quant-acc")
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shapes_accuracy import recipes

    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.formats.recipe import save_recipe
    from mllm_deploy.models.registry import load_spec
    from mllm_deploy.tools.evaluate import evaluate, load_eval_data

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _, spec = load_spec(args.model)
    plan = recipes(spec.text.num_layers, f"builtin:shapes-vqa:validation:{args.calib}")
    bundles = {}
    for name, recipe_name, quant in ROWS:
        slug = name.replace(" ", "_").replace("=", "").replace(",", "-").replace("+", "")
        bundle = work / f"bundle-{slug}"
        if not (bundle / "manifest.json").exists():
            recipe_path = None
            if recipe_name is not None:
                recipe_path = work / (recipe_name.replace(" ", "_").replace("=", "") + ".json")
                if not recipe_path.exists():
                    save_recipe(calibrate(args.model, plan[recipe_name], log=log), recipe_path)
            export_bundle(args.model, bundle, ExportOptions(recipe=str(recipe_path) if recipe_path else None,
                                                            force=True, **quant), log=log)
        bundles[name] = bundle
    items = load_eval_data(f"shapes-vqa:test:{args.questions}")
    t0 = time.perf_counter()
    results = evaluate([str(b) for b in bundles.values()], items)
    log(f"shapes-vqa test, {len(items)} questions, {len(bundles)} bundles, {time.perf_counter() - t0:.0f} s")
    rows = []
    print("| bundle | weights.bin | FLOPs reduction (exact) | accuracy (95% CI) | vs fp32 dense (points) |"
          " agreement with fp32 dense | KL vs fp32 dense |")
    print("|---|---|---|---|---|---|---|")
    base = results[0].accuracy
    for (name, bundle), r in zip(bundles.items(), results):
        size = (bundle / "weights.bin").stat().st_size
        rows.append({"bundle": name, "weights_bytes": size, **r.summary()})
        print(f"| {name} | {size / 2**20:.1f} MiB | {r.flops_reduction:.1%} | {r.accuracy:.1%}"
              f" ({r.ci_low:.1%}–{r.ci_high:.1%}) | {100 * (r.accuracy - base):+.1f} | {r.agreement:.1%} |"
              f" {r.mean_kl:.4f} |")
    (work / "results.json").write_text(json.dumps({"schema": "mllm-deploy/eval@1", "dataset": "shapes-vqa:test",
                                                   "questions": len(items), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
