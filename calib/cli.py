"""calib-mllm: derive a static recipe (visual tokens kept per layer) for a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli
from mllm_deploy.core.errors import MllmError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


MOD_FLAGS = ("plan", "capacity", "dense_layers", "router", "router_file", "skip", "fit_target")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calib-mllm", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face LLaVA directory (config.json alone for static methods) or built-in name")
    p.add_argument("--method", required=True, choices=["dense", "fastv", "pdrop", "vtw", "fitprune", "mod"])
    p.add_argument("--data", help="calibration data: JSONL of {image, prompt} or builtin:synthetic:N")
    p.add_argument("--skip-bad", action="store_true", help="skip bad data lines instead of stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="recipe.json to write")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens assumed for the recipe's FLOPs figures")
    p.add_argument("--random-selection", action="store_true",
                   help="baseline: keep the method's token counts but a fixed random subset (seeded by --seed)")
    g = p.add_argument_group("fastv")
    g.add_argument("--fastv-k", type=int, default=2, help="first pruned layer (default 2)")
    g.add_argument("--fastv-r", type=float, default=0.5, help="share of visual tokens dropped (default 0.5)")
    g = p.add_argument_group("pdrop")
    g.add_argument("--pdrop-layers", type=_int_list, default=[8, 16, 24], help="stage layers (default 8,16,24)")
    g.add_argument("--pdrop-ratio", type=float, default=0.5, help="keep ratio per stage (default 0.5)")
    g = p.add_argument_group("vtw")
    g.add_argument("--vtw-eta", type=float, default=0.003, help="KL threshold (default 0.003, LLaVA-1.5-7B)")
    g.add_argument("--vtw-first-layer", type=int, default=5, help="first candidate layer (default 5)")
    g = p.add_argument_group("fitprune")
    g.add_argument("--budget", type=float, help="FLOPs reduction target, e.g. 0.5")
    g.add_argument("--schedule", type=_int_list, help="published tokens removed after each layer, e.g. 3,7,49,...")
    g = p.add_argument_group("mod (mixture-of-depths, docs/mod.md)")
    g.add_argument("--plan", help="routed layers: arank (default; needs --data), prd (p-MoD decay) or layers=L1,L2,...")
    g.add_argument("--capacity", type=_float_list,
                   help="share of visual tokens a routed layer processes: one value or one per routed layer (default 0.5)")
    g.add_argument("--dense-layers", type=int, help="arank: highest-ARank layers kept dense (default 4)")
    g.add_argument("--router", help="fitted (default; needs --data), attention, or trained (needs --router-file)")
    g.add_argument("--router-file", help="trained router checkpoint (safetensors, layout in docs/mod.md)")
    g.add_argument("--skip", help="skipped visual tokens: identity (default) or tanh_scale (p-MoD; trained routers)")
    g.add_argument("--fit-target", help="fitted routers regress onto: attention (default) or update_norm")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.calib.calibrate import CalibOptions, calibrate
    from mllm_deploy.formats.recipe import save_recipe

    output = Path(args.output)
    if output.is_dir():
        raise MllmError(f"-o {output} is a directory; give a file name such as recipe.json")
    given = [f"--{name.replace('_', '-')}" for name in MOD_FLAGS if getattr(args, name) is not None]
    if args.method != "mod" and given:
        raise MllmError(f"{', '.join(given)} only apply to --method mod")
    mod = {f"mod_{name}": getattr(args, name) for name in MOD_FLAGS if getattr(args, name) is not None}
    options = CalibOptions(
        method=args.method, data=args.data, skip_bad=args.skip_bad, seed=args.seed, fastv_k=args.fastv_k,
        fastv_r=args.fastv_r, pdrop_layers=args.pdrop_layers, pdrop_ratio=args.pdrop_ratio, vtw_eta=args.vtw_eta,
        vtw_first_layer=args.vtw_first_layer, budget=args.budget, schedule=args.schedule, text_tokens=args.text_tokens,
        random_selection=args.random_selection, **mod,
    )
    recipe = calibrate(args.model, options, log=lambda m: print(m, file=sys.stderr))
    save_recipe(recipe, output)
    flops = recipe.flops or {}
    prov = recipe.provenance
    per_sample = f", {prov['seconds_per_sample'] * 1e3:.0f} ms/sample" if "seconds_per_sample" in prov else ""
    what = "visual tokens processed per layer" if recipe.is_mod else "visual tokens per layer"
    router_file = f" (+ {recipe.mod['router_file']})" if recipe.is_mod and recipe.mod.get("router_file") else ""
    print(f"{recipe.method_name}: {what} {recipe.visual_tokens}; FLOPs reduction "
          f"{flops.get('reduction', 0.0):.1%} (exact, {flops.get('text_tokens')} text tokens); "
          f"{prov.get('seconds', 0):.1f} s{per_sample} -> {output}{router_file}")
    return 0


def main(argv=None) -> int:
    return cli.main("calib-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
