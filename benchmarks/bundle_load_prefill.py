"""Load a bundle with the torch-free runtime and time one long prefill: what a user of a large bundle waits for.

    python benchmarks/bundle_load_prefill.py BUNDLE [--prompt-tokens 616] [--repeats 3] [--new-tokens 4]
        [--weights auto|shared|fast|packed]

Prints one JSON object: load seconds (manifest and file checks, sessions), resident memory after load and
its peak (VmRSS / VmHWM), the runtime's memory estimate for the request, prefill medians over the repeats
(a synthetic prompt of that many tokens around the image run), and decode ms/token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def memory_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--prompt-tokens", type=int, default=616)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default="auto", choices=("auto", "shared", "fast", "packed"),
                        help="how the sessions hold the weights (run-mllm --weights; auto resolves as run-mllm does)")
    args = parser.parse_args(argv)

    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.timing import synthetic_inputs

    start = time.perf_counter()
    pipe = Pipeline.load(args.bundle, weights=args.weights)
    from mllm_deploy.core.memory import available_memory

    # as run-mllm: resolves auto, refuses what would not fit
    pipe.check_request(args.prompt_tokens, args.new_tokens, available=available_memory())
    estimate = pipe.memory_estimate(args.prompt_tokens, args.new_tokens)  # for the weights mode that will run
    generator = pipe.generator
    load_s = time.perf_counter() - start
    after_load = memory_mb("VmRSS")
    ids, pixels = synthetic_inputs(pipe.bundle, args.prompt_tokens)
    prefill, decode = [], []
    for _ in range(args.repeats):
        result = generator.generate(ids, pixels, args.new_tokens, ignore_eos=True)
        prefill.append(result.timings.prefill_ms)
        decode.append(statistics.median(result.timings.decode_ms))
    print(json.dumps({
        "bundle": args.bundle, "prompt_tokens": args.prompt_tokens, "weights": pipe.weights_mode,
        "load_s": round(load_s, 2),
        "rss_after_load_mb": round(after_load), "peak_rss_mb": round(memory_mb("VmHWM")),
        "estimate_mb": round(estimate.total / 2**20), "estimate": estimate.describe(),
        "prefill_ms_median": round(statistics.median(prefill)), "prefill_ms": [round(p) for p in prefill],
        "decode_ms_per_token_median": round(statistics.median(decode), 1),
    }))
    pipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
