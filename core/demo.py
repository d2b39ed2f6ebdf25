"""demo-mllm: export the built-in tiny-llava, ask it one question about a generated image.

The tiny model has random weights, so its answer is not meaningful; the demo shows the
whole path (export with verification, torch-free runtime, timings) working end to end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo-mllm", description=__doc__)
    p.add_argument("--model", default="tiny-llava", help="model to export (default tiny-llava)")
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--workdir", default=None, help="where the bundle is written (default: the cache directory)")
    return p


def demo_image(path: Path) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 80), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle([8, 10, 40, 42], fill=(200, 30, 30))
    draw.ellipse([52, 30, 88, 66], fill=(30, 60, 200))
    image.save(path)
    return path


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.models.registry import cache_dir
    from mllm_deploy.runtime.pipeline import Pipeline

    workdir = Path(args.workdir) if args.workdir else cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = workdir / f"{Path(args.model).name}-bundle"
    export_bundle(args.model, bundle, ExportOptions(force=True), log=lambda m: print(m, file=sys.stderr))
    image = demo_image(workdir / "demo.png")
    with Pipeline.load(bundle) as pipe:
        answer = pipe.ask(image, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    t = answer.generation.timings
    per_token = sum(t.decode_ms) / len(t.decode_ms) if t.decode_ms else 0.0
    print(f"bundle:   {bundle}")
    print(f"image:    {image}")
    print(f"question: {args.prompt}")
    print(f"answer:   {answer.text!r}  ({len(answer.generation.tokens)} tokens, random weights)")
    print(f"timings:  vision {t.vision_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms "
          f"({answer.generation.prompt_tokens} prompt tokens) | decode {per_token:.2f} ms/token | total {t.total_ms:.1f} ms")
    return 0


def main(argv=None) -> int:
    return cli.main("demo-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
