"""flops-mllm: prefill FLOPs (or MACs) and KV-cache size of a model, dense and with a recipe.

Needs only the model's config.json: no weights, no torch. A LLaVA-NeXT model's visual tokens depend on the image;
the prompt is costed at the largest bucket's count unless --bucket or --visual-tokens (or a recipe, which is made
for one count) says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.core import cli

KV_DTYPE_BYTES = {"float16": 2, "float32": 4}


def build_parser() -> argparse.ArgumentParser:
    # The formula registry is plain data (no torch), so the choices come from it directly.
    from mllm_deploy.formats.flops import FORMULAS
    from mllm_deploy.models.registry import add_model_arguments

    p = argparse.ArgumentParser(prog="flops-mllm", description=__doc__)
    add_model_arguments(p, "local Hugging Face LLaVA directory (config.json is enough) or a built-in name")
    p.add_argument("--recipe", help="recipe.json to cost (default: dense only)")
    p.add_argument("--text-tokens", type=int, default=64,
                   help="non-visual prompt tokens: system prompt + question (default 64)")
    p.add_argument("--prefix-tokens", type=int, default=0,
                   help="of the text tokens, how many come before the image (default 0: all after it)")
    p.add_argument("--formula", default="exact", choices=list(FORMULAS),
                   help="exact: every matrix product of the prefill graph; fastv-eq5: FastV paper Eq. 5;"
                        " fitprune-macs: FitPrune code's MACs over visual tokens (default exact)")
    image = p.add_mutually_exclusive_group()
    image.add_argument("--visual-tokens", type=int, metavar="N",
                       help="LLaVA-NeXT: the image's visual tokens (its bucket's after unpadding; default: the"
                            " recipe's count, else the largest bucket's)")
    image.add_argument("--bucket", metavar="HxW",
                       help="LLaVA-NeXT: cost an image that fills this bucket (an image_grid_pinpoints entry,"
                            " height x width in pixels, e.g. 672x672)")
    p.add_argument("--kv-dtype", default="float16", choices=sorted(KV_DTYPE_BYTES), help="KV-cache element type")
    cli.add_json_argument(p, "the cost report (FLOPs, units, token counts, KV bytes)")
    return p


def _human(value: float) -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {suffix}"
    return f"{value:.4g} "


def _kv_summary(kv_bytes: list[int]) -> str:
    """Runs of equal layers, e.g. 'layers 0-1: 1.2 MB, layers 2-31: 0.7 MB'."""
    runs: list[tuple[int, int, int]] = []
    for l, b in enumerate(kv_bytes):
        if runs and runs[-1][2] == b:
            runs[-1] = (runs[-1][0], l, b)
        else:
            runs.append((l, l, b))
    parts = [f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {_human(v)}B" for a, b, v in runs]
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.core.errors import MllmError
    from mllm_deploy.models.registry import load_spec

    if args.text_tokens < 0:
        raise MllmError(f"--text-tokens must be 0 or more, got {args.text_tokens}")
    _, spec = load_spec(args.model, args.cache_dir)
    recipe = load_recipe(args.recipe) if args.recipe else None
    spec = _image_spec(spec, args, recipe)
    if recipe is not None:
        recipe.check_model(spec)
    report = prefill_cost(spec, recipe, text_tokens=args.text_tokens, formula=args.formula,
                          kv_dtype_bytes=KV_DTYPE_BYTES[args.kv_dtype], prefix_tokens=args.prefix_tokens)
    # everything the text output says: the counts it is for and the units it is in
    cli.emit_json(args, {**report.to_dict(), "units": report.units, "text_tokens": args.text_tokens,
                         "visual_tokens": spec.visual_tokens, "prefix_tokens": args.prefix_tokens,
                         "num_layers": spec.text.num_layers, "method": recipe.method_name if recipe else "dense",
                         "kv_dtype": args.kv_dtype, "kv_bytes": sum(report.kv_bytes_per_layer),
                         "llm_visual_tokens": recipe.llm_visual_tokens if recipe else spec.visual_tokens,
                         "skip_attention": list(recipe.skip_attention) if recipe else [],
                         **_bucket_fields(spec, args)}, indent=None)
    if cli.json_to_stdout(args):
        return 0
    units = report.units
    kv = report.kv_bytes_per_layer
    print(f"formula:   {report.formula}")
    stage = (f" ({recipe.llm_visual_tokens} enter the language model after {recipe.pre_llm.method})"
             if recipe is not None and recipe.pre_llm is not None else "")
    print(f"tokens:    {args.text_tokens} text + {spec.visual_tokens} visual{stage}, {spec.text.num_layers} layers")
    if spec.is_anyres:
        print(f"image:     {_image_line(spec, args, recipe)}")
    if recipe is not None and recipe.skip_attention:
        print(f"attention: removed in layers {', '.join(map(str, recipe.skip_attention))} (no KV there)")
    print(f"dense:     {_human(report.dense)}{units} ({report.dense:.6g})")
    label = recipe.method_name if recipe is not None else "dense"
    print(f"recipe:    {_human(report.recipe)}{units} ({report.recipe:.6g}) [{label}]")
    print(f"reduction: {report.reduction * 100:.2f}%")
    print(f"units:     {units}")
    print(f"kv cache:  {_human(sum(kv))}B total ({args.kv_dtype}); {_kv_summary(kv)}")
    return 0


def _parse_bucket(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.strip().isdigit() or not width.strip().isdigit():
        from mllm_deploy.core.errors import MllmError

        raise MllmError(f"--bucket must be HEIGHTxWIDTH in pixels, e.g. 672x672, got {text!r}")
    return int(height), int(width)


def _image_spec(spec, args: argparse.Namespace, recipe):
    """The spec at the visual-token count to cost: --bucket, --visual-tokens, the recipe's (a recipe counts tokens
    for one image size), or the model's largest; a LLaVA-1.5 model has one count and refuses --bucket."""
    if args.bucket is not None:
        return spec.for_bucket(*_parse_bucket(args.bucket))
    if args.visual_tokens is not None:
        return spec.with_image_tokens(args.visual_tokens)
    if recipe is not None and spec.is_anyres and recipe.model.fingerprint == spec.fingerprint:
        return spec.with_image_tokens(recipe.model.visual_tokens)  # another model's recipe: check_model says so
    return spec


def _bucket_fields(spec, args: argparse.Namespace) -> dict:
    """JSON fields for a LLaVA-NeXT model only (a LLaVA-1.5 report keeps its keys)."""
    if not spec.is_anyres:
        return {}
    return {"bucket": args.bucket, "max_visual_tokens": spec.max_visual_tokens,
            "bucket_visual_tokens": {f"{h}x{w}": n for (h, w), n in spec.bucket_visual_tokens.items()}}


def _image_line(spec, args: argparse.Namespace, recipe) -> str:
    buckets = ", ".join(f"{h}x{w}: {n}" for (h, w), n in spec.bucket_visual_tokens.items())
    if args.bucket is not None:
        which = f"an image filling bucket {args.bucket}"
    elif args.visual_tokens is not None:
        which = "from --visual-tokens"
    elif recipe is not None:
        which = "the recipe's count"
    else:
        which = "the largest bucket, nothing unpadded"
    return f"{spec.tower_visual_tokens} visual tokens ({which}); buckets (HxW: most tokens) {buckets}"


def main(argv=None) -> int:
    return cli.main("flops-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
