"""demo-mllm: shapes-llava dense, with mixture-of-depths (fitted routers) and with FitPrune, side by side.

Calibrates a mixture-of-depths recipe (fitted routers on layers 1 and up, --capacity of the visual tokens each)
and FitPrune at a FLOPs budget on a few validation questions, exports a dense and the two reduced bundles (each
verified against PyTorch), asks all three the same question about a generated test scene, evaluates them on
test questions through the torch-free runtime and prints a table: answer, prefill time, prefill FLOPs (exact
formula), accuracy. MoD leads: on this model it keeps dense accuracy at ~40% fewer FLOPs, where FitPrune's
attention-based pruning loses ~20 points (BENCHMARKS.md, issue 7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli
from mllm_deploy.core.progress import info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo-mllm", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava", help="model to export (default shapes-llava)")
    p.add_argument("--capacity", type=float, default=0.5,
                   help="mixture-of-depths: share of the visual tokens each routed layer processes (default 0.5)")
    p.add_argument("--budget", type=float, default=0.5, help="FitPrune FLOPs budget (default 0.5)")
    p.add_argument("--calib", type=int, default=8, help="validation questions to calibrate on (default 8)")
    p.add_argument("--questions", type=int, default=100, help="test questions for the accuracy column (default 100)")
    p.add_argument("--scene", type=int, default=0,
                   help="which of the evaluated test questions to show (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=4,
                   help="most tokens to generate per question (default 4: shapes-vqa answers are one or two words)")
    p.add_argument("--workdir", default=None, help="where recipe and bundles are written (default: the cache directory)")
    return p


def _check(args: argparse.Namespace) -> None:
    from mllm_deploy.core.errors import MllmError

    if not 0.0 < args.budget < 1.0:
        raise MllmError(f"--budget {args.budget}: must be between 0 and 1")
    if not 0.0 < args.capacity <= 1.0:
        raise MllmError(f"--capacity {args.capacity}: must be above 0 and at most 1")
    for flag in ("calib", "questions", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise MllmError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.scene < args.questions:
        raise MllmError(f"--scene {args.scene}: must be one of the evaluated test questions, 0 to {args.questions - 1}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.calib.fitprune import FitPruneOptions
    from mllm_deploy.calib.mod import ModOptions
    from mllm_deploy.formats.recipe import save_recipe
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.models.registry import cache_dir, load_spec
    from mllm_deploy.tools.evaluate import evaluate, load_eval_data

    log = info  # on stderr unless --quiet; the table goes to stdout

    _, spec = load_spec(args.model)  # an unknown or unsupported model fails here, before anything is written
    workdir = Path(args.workdir) if args.workdir else cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name
    data = f"builtin:shapes-vqa:validation:{args.calib}"
    routed = ",".join(map(str, range(1, spec.text.num_layers)))
    methods = {  # label -> calibration options
        f"mod fitted {args.capacity:g}": ModOptions(plan=f"layers={routed}", capacity=[args.capacity], router="fitted",
                                                   data=data),
        f"fitprune {args.budget:g}": FitPruneOptions(budget=args.budget, data=data),
    }
    bundles = {"dense": export_bundle(args.model, workdir / f"{name}-dense", ExportOptions(force=True), log=log)}
    for label, options in methods.items():
        slug = label.split()[0]
        recipe_path = workdir / f"{name}-{slug}.json"
        save_recipe(calibrate(args.model, options, log=log), recipe_path)
        bundles[label] = export_bundle(args.model, workdir / f"{name}-{slug}",
                                       ExportOptions(recipe=str(recipe_path), force=True), log=log)

    # the scene asked about is one of the evaluated questions: its answers come from the same run
    items = load_eval_data(f"shapes-vqa:test:{args.questions}")
    example = items[args.scene]
    image = workdir / f"test-scene-{args.scene}.png"
    example.image.save(image)
    results = evaluate([str(b) for b in bundles.values()], items, max_new_tokens=args.max_new_tokens)

    print(f"image:    {image}")
    print(f"question: {example.question}   (expected: {example.answer})")
    print()
    # prefill time is the median over the evaluated questions: one cold call says little
    print(f"| bundle | answer | prefill ms (median of {args.questions}) | prefill FLOPs (exact formula) |"
          f" accuracy on {args.questions} test questions |")
    print("|---|---|---|---|---|")
    for label, result in zip(bundles, results):
        flops = "100%" if label == "dense" else f"{1 - result.flops_reduction:.0%} (-{result.flops_reduction:.1%})"
        print(f"| {label} | {result.answers[args.scene].strip()!r} | {result.prefill_ms_median:.1f} | {flops} |"
              f" {result.accuracy:.1%} ({result.ci_low:.1%}-{result.ci_high:.1%}) |")
    print()
    for label, result in list(zip(bundles, results))[1:]:
        print(f"{label}: {','.join(map(str, result.visual_tokens))} visual tokens per layer, agreement with dense"
              f" {result.agreement:.1%}")
    print(f"bundles:  {'  '.join(str(b) for b in bundles.values())}")
    return 0


def main(argv=None) -> int:
    return cli.main("demo-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
