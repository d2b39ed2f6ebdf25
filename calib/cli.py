"""calib-mllm: derive a static recipe (visual tokens kept per layer) for a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli
from mllm_deploy.core.progress import info
from mllm_deploy.core.errors import MllmError


def _method_fields(options_class) -> list:
    """The fields a method adds to the common options (its own flags)."""
    from dataclasses import fields

    from mllm_deploy.calib.common import CommonOptions

    common = {f.name for f in fields(CommonOptions)}
    return [f for f in fields(options_class) if f.name not in common]


def _add_flags(parser, option_fields, seen: set | None = None) -> None:
    """One flag per options field (flag, help and parser in the field's metadata; a bool is store_true).
    Every flag defaults to None, "not given", so that the dataclass holds the one default. A flag two methods
    share (cls and dart's --keep, --ratio) is added once (``seen``)."""
    for f in option_fields:
        flag, help_text, parse = f.metadata["flag"], f.metadata["help"], f.metadata["parse"]
        if seen is not None:
            if flag in seen:
                continue
            seen.add(flag)
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=parse, help=help_text)
        if flag == "--seed":  # where -o has always been in --help
            parser.add_argument("-o", "--output", required=True, help="recipe.json to write")


def build_parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    from mllm_deploy.calib import methods
    from mllm_deploy.calib.common import CommonOptions
    from mllm_deploy.models.registry import add_model_arguments

    p = argparse.ArgumentParser(prog="calib-mllm", description=__doc__)
    add_model_arguments(p, "Hugging Face LLaVA directory (config.json alone for static methods) or built-in name")
    p.add_argument("--method", required=True, choices=methods.names())
    _add_flags(p, fields(CommonOptions))
    seen: set = set()
    for name in methods.names():
        options_class = methods.options_class(name)
        if options_class.cli_group is not None:
            _add_flags(p.add_argument_group(options_class.cli_group), _method_fields(options_class), seen)
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.calib import methods
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.formats.recipe import save_recipe

    output = Path(args.output)
    if output.is_dir():
        raise MllmError(f"-o {output} is a directory; give a file name such as recipe.json")
    given = vars(args)
    for name in methods.names():
        options_class = methods.options_class(name)
        if name != args.method and options_class.flags_only_for_this_method:
            stray = [f.metadata["flag"] for f in _method_fields(options_class)
                     if given.get(methods.flag_dest(f)) is not None]
            if stray:
                raise MllmError(f"{', '.join(stray)} only apply to --method {name}")
    options = methods.options_from_flags(args.method, given)
    recipe = calibrate(args.model, options, log=info, cache_dir=args.cache_dir)
    save_recipe(recipe, output)
    flops = recipe.flops or {}
    prov = recipe.provenance
    per_sample = f", {prov['seconds_per_sample'] * 1e3:.0f} ms/sample" if "seconds_per_sample" in prov else ""
    what = "visual tokens processed per layer" if recipe.is_mod else "visual tokens per layer"
    router_file = f" (+ {recipe.mod.router_file})" if recipe.is_mod and recipe.mod.router_file else ""
    print(f"{recipe.method_name}: {what} {recipe.visual_tokens}; FLOPs reduction "
          f"{flops.get('reduction', 0.0):.1%} (exact, {flops.get('text_tokens')} text tokens); "
          f"{prov.get('seconds', 0):.1f} s{per_sample} -> {output}{router_file}")
    return 0


def main(argv=None) -> int:
    return cli.main("calib-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
