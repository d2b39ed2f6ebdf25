"""run-mllm: answer a question about an image with an exported bundle (no PyTorch needed)."""

from __future__ import annotations

import argparse
import json
import sys

from mllm_deploy.core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run-mllm", description=__doc__)
    p.add_argument("bundle", help="bundle directory written by export-mllm")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="the user's question; goes through the chat template with the image")
    group.add_argument("--raw-prompt", help="the model input verbatim; must contain the image placeholder once")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--backend", default="onnxruntime", help="runtime backend (default onnxruntime)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        from mllm_deploy.core.errors import MllmError

        raise MllmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    with Pipeline.load(args.bundle, backend=args.backend) as pipe:
        # read the image before any output so a bad image prints nothing but the error
        pixels_source = pipe.pixel_values(args.image)

        def stream(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        answer = pipe.ask(pixels_source, prompt=args.prompt, raw_prompt=args.raw_prompt,
                          max_new_tokens=args.max_new_tokens, sampling=sampling,
                          on_text=None if args.json else stream)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        t = answer.generation.timings
        sys.stdout.write("\n")
        per_token = sum(t.decode_ms) / len(t.decode_ms) if t.decode_ms else 0.0
        print(f"[{len(answer.generation.tokens)} tokens; vision {t.vision_ms:.1f} ms, prefill {t.prefill_ms:.1f} ms,"
              f" decode {per_token:.2f} ms/token, total {t.total_ms:.1f} ms]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli.main("run-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
