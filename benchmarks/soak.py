"""Soak test: many consecutive generations on one loaded pipeline, checking that memory stays flat.

    .venv/bin/python benchmarks/soak.py [--bundle DIR] [--generations 1000] [--warmup 100] [--json OUT]

Loads one bundle (default: tiny-llava, exported into a temporary directory) and asks it
``--generations`` questions in a row after ``--warmup`` ones (the first of them the largest
request), each with a random prompt (1-40 random words) and a random image (random size 8-512 px,
random colours and shapes), greedy, 1 to ``--max-new-tokens`` new tokens.
Resident memory (VmRSS) is read after the warm-up and after the last generation; the run passes
when no generation failed and RSS grew by at most ``--max-growth`` percent (default 5) after the
warm-up. Prints a summary (RSS after warm-up, final RSS, growth, failures, generations/s) and exits
1 when the run did not pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("what", "colour", "is", "the", "shape", "left", "of", "circle", "square", "triangle", "how", "many",
         "are", "there", "describe", "image", "red", "blue", "green", "above", "below", "a", "an", "which",
         "object", "big", "small", "count", "picture", "where", "<b>", "émoji 🙂", "数", "?", "!", "...")


def rss_mb() -> float:
    """Current resident set size (Linux: VmRSS); elsewhere the peak, which can only over-report growth."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def random_request(rng: np.random.Generator, largest: bool = False):
    """A random prompt and image; ``largest``: the longest prompt and the largest image there can be."""
    from PIL import Image, ImageDraw

    words = [" ".join(WORDS[-6:])] * 40 if largest else rng.choice(WORDS, size=int(rng.integers(1, 41)))
    prompt = " ".join(str(w) for w in words)
    width, height = (512, 512) if largest else (int(v) for v in rng.integers(8, 513, 2))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 6))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(1, width + 1)), y0 + int(rng.integers(1, height + 1))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return prompt, image


def export_tiny(target: Path) -> Path:
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    print(f"soak: exporting tiny-llava to {target}", file=sys.stderr)
    return export_bundle("tiny-llava", target, ExportOptions(), log=lambda m: None)


def soak(bundle: Path, generations: int, warmup: int, max_new_tokens: int, seed: int) -> dict:
    from mllm_deploy.core.progress import Progress
    from mllm_deploy.runtime.pipeline import Pipeline

    rng = np.random.default_rng(seed)
    failures: list[str] = []
    tokens = 0
    checkpoints: list[tuple[int, float]] = []
    with Pipeline.load(bundle) as pipe:
        with Progress(warmup, "warm-up", "gen") as bar:
            for index in range(warmup):
                # the largest request first, so the runtime's buffers reach their high-water mark in the warm-up
                prompt, image = random_request(rng, largest=index == 0)
                pipe.ask(image, prompt=prompt, max_new_tokens=max_new_tokens)
                bar.update()
        gc.collect()  # RSS is read after a collection at both ends, so only memory still referenced counts
        rss_warm = rss_mb()
        peak = rss_warm
        every = max(generations // 10, 1)
        start = time.perf_counter()
        with Progress(generations, "soak", "gen") as bar:
            for index in range(1, generations + 1):
                prompt, image = random_request(rng)
                try:
                    answer = pipe.ask(image, prompt=prompt, max_new_tokens=int(rng.integers(1, max_new_tokens + 1)))
                    tokens += len(answer.generation.tokens)
                except Exception as exc:  # noqa: BLE001 - a soak counts failures of any kind and goes on
                    failures.append(f"generation {index}: {type(exc).__name__}: {exc}")
                rss = rss_mb()
                peak = max(peak, rss)
                if index % every == 0 or index == generations:
                    checkpoints.append((index, round(rss, 1)))
                bar.update()
        seconds = time.perf_counter() - start
        gc.collect()
        rss_final = rss_mb()
    return {
        "schema": "mllm-deploy/soak@1", "bundle": str(bundle), "method": pipe.bundle.manifest["recipe"]["method"]["name"],
        "generations": generations, "warmup": warmup, "max_new_tokens": max_new_tokens, "seed": seed,
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_final_mb": round(rss_final, 1), "rss_peak_mb": round(peak, 1),
        "growth_pct": round((rss_final - rss_warm) / rss_warm * 100, 2), "rss_checkpoints_mb": checkpoints,
        "failures": len(failures), "first_failures": failures[:5], "seconds": round(seconds, 2),
        "generations_per_s": round(generations / seconds, 2), "tokens_per_generation": round(tokens / generations, 2),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle directory (default: tiny-llava, exported to a temporary directory)")
    p.add_argument("--generations", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100,
                   help="generations before the reference RSS is read, the largest request first (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="each request asks for 1..N tokens (default 16)")
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result to this file")
    args = p.parse_args()
    if args.generations < 1 or args.warmup < 0 or args.max_new_tokens < 1:
        p.error("--generations and --max-new-tokens must be at least 1, --warmup at least 0")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or export_tiny(Path(tmp) / "tiny-llava")
        result = soak(bundle, args.generations, args.warmup, args.max_new_tokens, args.seed)
    passed = result["failures"] == 0 and result["growth_pct"] <= args.max_growth
    result["passed"] = passed
    print(f"soak: {result['generations']} generations on {Path(result['bundle']).name} ({result['method']}) after"
          f" {result['warmup']} warm-up, 1-{result['max_new_tokens']} new tokens each, random prompts and images")
    print(f"RSS after warm-up {result['rss_after_warmup_mb']:.1f} MB, final {result['rss_final_mb']:.1f} MB,"
          f" growth {result['growth_pct']:+.2f}% (limit {args.max_growth:g}%), peak {result['rss_peak_mb']:.1f} MB")
    print(f"failures: {result['failures']}" + (f" (first: {result['first_failures'][0]})" if result["failures"] else ""))
    print(f"{result['generations_per_s']:.2f} generations/s ({result['seconds']:.1f} s,"
          f" {result['tokens_per_generation']:.1f} tokens per generation)")
    print(f"result: {'PASS' if passed else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
