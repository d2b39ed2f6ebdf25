"""eval-mllm: accuracy of bundles on shapes-vqa or your own JSONL, against the dense bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval-mllm", description=__doc__)
    p.add_argument("bundles", nargs="+", help="bundle directories (a dense one is the reference when given)")
    p.add_argument("--dataset", required=True,
                   help="shapes-vqa[:split][:N] (default test:500) or a JSONL of {image, question, answer}")
    p.add_argument("--max-new-tokens", type=int, default=4,
                   help="most tokens to generate per question (default 4: shapes-vqa answers are one or two words)")
    from mllm_deploy.runtime.cli import add_ort_arguments

    add_ort_arguments(p)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="onnxruntime (default) or tensorrt (the engines build-mllm wrote into each bundle)")
    cli.add_json_argument(p, "the results (schema mllm-deploy/eval@1, with every answer)")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.core.errors import MllmError
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.tools.evaluate import evaluate, load_eval_data

    if args.max_new_tokens < 1:
        raise MllmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for bundle in args.bundles:  # every bundle is checked before any work
        load_bundle(bundle)
    items = load_eval_data(args.dataset)
    from mllm_deploy.runtime.cli import ort_options

    results = evaluate(args.bundles, items, args.max_new_tokens, backend=args.backend, options=ort_options(args))
    if not cli.json_to_stdout(args):
        print(f"{args.dataset}: {len(items)} questions; reference {Path(results[0].reference).name}")
        print("| bundle | method | accuracy (95% CI) | agreement | KL vs dense | FLOPs reduction (exact formula,"
              " mean prompt) | prefill ms |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {Path(r.bundle).name} | {r.method} | {r.accuracy:.1%} ({r.ci_low:.1%}-{r.ci_high:.1%}) |"
                  f" {r.agreement:.1%} | {r.mean_kl:.4f} | {r.flops_reduction:.1%} | {r.prefill_ms_median:.1f} |")
        for r in results:
            if r.per_kind:
                print(f"{Path(r.bundle).name} per kind: " + ", ".join(f"{k} {v:.1%}" for k, v in r.per_kind.items()))
    cli.emit_json(args, {"schema": "mllm-deploy/eval@1", "dataset": args.dataset, "questions": len(items),
                         "results": [r.summary() for r in results],
                         "answers": {Path(r.bundle).name: r.answers for r in results},
                         "expected": [i.answer for i in items]})
    return 0


def main(argv=None) -> int:
    return cli.main("eval-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
