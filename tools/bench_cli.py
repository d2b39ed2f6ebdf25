"""bench-mllm: latency (vision, prefill, TTFT, decode), KV-cache memory, FLOPs, peak RSS and routing
share of bundles, each measured in its own process; speedups are ratios to the dense bundle of the
same run. Synthetic but valid input: filler text around the image-token run and a random image."""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-mllm", description=__doc__)
    p.add_argument("bundles", nargs="+", help="bundle directories (give the dense one too for speedups)")
    p.add_argument("--backend", dest="backends", action="append", choices=("onnxruntime", "torch", "tensorrt"),
                   help="onnxruntime (default), tensorrt (the engines build-mllm wrote into each bundle) or torch"
                        " (the PyTorch reference of the recipe: needs torch, transformers and the source model);"
                        " repeat to measure several")
    from mllm_deploy.runtime.cli import add_ort_arguments

    add_ort_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length in tokens, image included (default: visual tokens + 40)")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="tokens generated per run (the first from prefill, the rest from decode; EOS ignored)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per bundle (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    cli.add_json_argument(p, "the results (schema mllm-deploy/bench@1)")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.tools.bench import BenchSettings, markdown_table, run_bench

    backends = tuple(dict.fromkeys(args.backends or ["onnxruntime"]))  # repeated flags once each, in order
    ort = (("--provider", args.provider), ("--device-id", str(args.device_id)), ("--graphs", args.graphs),
           ("--weights", args.weights), ("--quant-activations", args.quant_activations))
    settings = BenchSettings(backends=backends, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                             repeats=args.repeats, warmup=args.warmup, ort=ort)
    payload = run_bench(args.bundles, settings)
    if not cli.json_to_stdout(args):
        print(markdown_table(payload))
    cli.emit_json(args, payload)
    return 0


def main(argv=None) -> int:
    return cli.main("bench-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
