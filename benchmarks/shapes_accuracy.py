"""Accuracy vs FLOPs of every recipe on shapes-vqa, with random-selection baselines.

    .venv/bin/python benchmarks/shapes_accuracy.py [--questions 1000] [--calib 16] [--workdir out/shapes-acc]
        [--set all|seeds]

Recipes are calibrated on the validation split (builtin:shapes-vqa:validation:N), bundles are
exported fp32 with native routing, and every bundle answers the same test questions through
the runtime (eval-mllm's code). Writes a markdown table and the eval JSON.
MoD rows route layers 1..L-1 with fitted or attention routers at two capacities. ``--set seeds`` is issue 21's
table: the existing recipes without the random baselines, and cls/dart before the language model at 50%/75%,
cls 50% then FastV, EAS removing 1 and 2 attentions with and without the fitted stand-in.
PyramidDrop's default stages (8, 16, 24 of 32 layers) are scaled to the model's depth (L/4, L/2, 3L/4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def seed_recipes(num_layers: int, calib: str) -> dict:
    """Issue 21's table: the existing recipes (no random baselines) and the pre-LLM and EAS seeds. A value's
    ``pre_llm`` names another entry (the recipe it composes with)."""
    from mllm_deploy.calib.eas import EasOptions
    from mllm_deploy.calib.pre_llm import ClsOptions, DartOptions
    from mllm_deploy.calib.static_methods import FastVOptions

    out = {name: options for name, options in recipes(num_layers, calib).items()
           if not name.startswith("random") and name not in ("fitprune 0.3", "fitprune 0.7")}
    for ratio in (0.5, 0.75):
        out[f"cls {ratio}"] = ClsOptions(ratio=ratio)
    for ratio in (0.5, 0.75):
        out[f"dart {ratio}"] = DartOptions(ratio=ratio)
    for ratio in (0.5, 0.75):  # the authors' form: at layer 2's input (of 4 here; of 32 in LLaVA-1.5-7B)
        out[f"dart L2 {ratio}"] = DartOptions(ratio=ratio, dart_layer=min(2, num_layers - 1))
    out["cls 0.5 + fastv K=2 R=0.5"] = FastVOptions(k=2, r=0.5, pre_llm="cls 0.5")
    for skip in (1, 2):
        out[f"eas skip {skip}"] = EasOptions(skip=skip, data=calib)
        out[f"eas skip {skip} + pia"] = EasOptions(skip=skip, pia=True, data=calib)
    return out


def slug(name: str) -> str:
    return (name.replace(" + ", "+").replace(" ", "_").replace("=", "").replace(",", "-").replace("@", "at"))


def recipes(num_layers: int, calib: str) -> dict:
    """name -> the calibration options (a method's options dataclass from calib/methods.py)."""
    from dataclasses import replace

    from mllm_deploy.calib.fitprune import FitPruneOptions
    from mllm_deploy.calib.mod import ModOptions
    from mllm_deploy.calib.static_methods import DenseOptions, FastVOptions, PDropOptions
    from mllm_deploy.calib.vtw import VtwOptions

    quarter = [max(1, num_layers * k // 4) for k in (1, 2, 3)]
    out = {
        "dense": DenseOptions(),
        "fastv K=2 R=0.5": FastVOptions(k=2, r=0.5),
        "fastv K=2 R=0.75": FastVOptions(k=2, r=0.75),
        f"pdrop {','.join(map(str, quarter))} x0.5": PDropOptions(layers=quarter, ratio=0.5),
        "vtw eta=0.003": VtwOptions(eta=0.003, first_layer=1, data=calib),
    }
    for budget in (0.3, 0.5, 0.7):
        out[f"fitprune {budget}"] = FitPruneOptions(budget=budget, data=calib)
    # mixture-of-depths on every layer after the first (the attention router reads the previous
    # layer): capacity 2/3 matches FastV K=2 R=0.5's FLOPs, 1/2 matches R=0.75's
    routed = list(range(1, num_layers))
    for router in ("fitted", "attention"):
        for capacity in (0.67, 0.5):
            out[f"mod {router} c={capacity}"] = ModOptions(plan="layers=" + ",".join(map(str, routed)),
                                                           capacity=[capacity], router=router, data=calib)
    for name in list(out):
        if name.startswith(("fastv", "fitprune")):
            out[f"random @ {name}"] = replace(out[name], random_selection=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--calib", type=int, default=16, help="validation questions used to calibrate")
    p.add_argument("--workdir", default="out/shapes-acc")
    p.add_argument("--set", default="all", choices=["all", "seeds"], help="all recipes, or issue 21's table")
    p.add_argument("--only", default=None, help="comma-separated recipe names of the set to run (dense always runs:"
                                                " it is the agreement reference)")
    args = p.parse_args()

    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.formats.recipe import save_recipe
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.models.registry import load_spec
    from mllm_deploy.tools.evaluate import evaluate, load_eval_data

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _, spec = load_spec(args.model)
    calib = f"builtin:shapes-vqa:validation:{args.calib}"
    plan = (seed_recipes if args.set == "seeds" else recipes)(spec.text.num_layers, calib)
    if args.only:
        wanted = {"dense", *(name.strip() for name in args.only.split(","))}
        unknown = wanted - set(plan)
        if unknown:
            p.error(f"--only: unknown recipes {sorted(unknown)}; the set has {', '.join(plan)}")
        pre = {getattr(plan[name], "pre_llm", None) for name in wanted} - {None}
        plan = {name: options for name, options in plan.items() if name in wanted | pre}
    bundles = {}
    for name, options in plan.items():
        bundle = work / f"bundle-{slug(name)}"
        if not (bundle / "manifest.json").exists():
            if getattr(options, "pre_llm", None):  # composed: the pre-LLM stage's recipe, written just before
                from dataclasses import replace

                options = replace(options, pre_llm=str(work / f"{slug(options.pre_llm)}.json"))
            recipe = calibrate(args.model, options, log=lambda m: print(m, file=sys.stderr))
            save_recipe(recipe, work / f"{slug(name)}.json")  # MoD and EAS recipes also write their tensors
            export_bundle(args.model, bundle, ExportOptions(recipe=str(work / f"{slug(name)}.json"), force=True),
                          log=lambda m: print(m, file=sys.stderr))
        bundles[name] = bundle
    items = load_eval_data(f"shapes-vqa:test:{args.questions}")
    t0 = time.perf_counter()
    results = evaluate([str(b) for b in bundles.values()], items)
    print(f"shapes-vqa test, {len(items)} questions, {len(bundles)} bundles, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    print("| recipe | visual tokens per layer | FLOPs reduction (exact) | KV KiB (fp32) | accuracy (95% CI) |"
          " agreement with dense | KL vs dense |")
    print("|---|---|---|---|---|---|---|")
    for name, r in zip(bundles, results):
        rows.append({"recipe": name, **r.summary()})
        print(f"| {name} | {','.join(map(str, r.visual_tokens))} | {r.flops_reduction:.1%} | {r.kv_bytes / 1024:.0f} |"
              f" {r.accuracy:.1%} ({r.ci_low:.1%}–{r.ci_high:.1%}) | {r.agreement:.1%} | {r.mean_kl:.3f} |")
    (work / "results.json").write_text(json.dumps({"schema": "mllm-deploy/eval@1", "dataset": "shapes-vqa:test",
                                                   "questions": len(items), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
