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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calib-mllm", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face LLaVA directory (config.json alone for static methods) or built-in name")
    p.add_argument("--method", required=True, choices=["dense", "fastv", "pdrop", "vtw", "fitprune"])
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
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.calib.calibrate import CalibOptions, calibrate
    from mllm_deploy.core.fsutil import atomic_write_text

    output = Path(args.output)
    if output.is_dir():
        raise MllmError(f"-o {output} is a directory; give a file name such as recipe.json")
    options = CalibOptions(
        method=args.method, data=args.data, skip_bad=args.skip_bad, seed=args.seed, fastv_k=args.fastv_k,
        fastv_r=args.fastv_r, pdrop_layers=args.pdrop_layers, pdrop_ratio=args.pdrop_ratio, vtw_eta=args.vtw_eta,
        vtw_first_layer=args.vtw_first_layer, budget=args.budget, schedule=args.schedule, text_tokens=args.text_tokens,
        random_selection=args.random_selection,
    )
    recipe = calibrate(args.model, options, log=lambda m: print(m, file=sys.stderr))
    atomic_write_text(output, recipe.to_json())
    flops = recipe.flops or {}
    prov = recipe.provenance
    per_sample = f", {prov['seconds_per_sample'] * 1e3:.0f} ms/sample" if "seconds_per_sample" in prov else ""
    print(f"{recipe.method_name}: visual tokens per layer {recipe.visual_tokens}; FLOPs reduction "
          f"{flops.get('reduction', 0.0):.1%} (exact, {flops.get('text_tokens')} text tokens); "
          f"{prov.get('seconds', 0):.1f} s{per_sample} -> {output}")
    return 0


def main(argv=None) -> int:
    return cli.main("calib-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
