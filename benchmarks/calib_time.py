"""Wall time of a full FitPrune calibration, as a user runs it.

    .venv/bin/python benchmarks/calib_time.py [--model tiny-llava] [--data builtin:synthetic:16] [--repeats 3]

Runs `calib-mllm --method fitprune --budget 0.5` as a subprocess (so process start, imports
and model loading count) and reports the median wall time and the tool's own seconds per sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--data", default="builtin:synthetic:16")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tool = Path(sys.executable).parent / "calib-mllm"
    walls, per_sample, recipes = [], [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"r{i}.json"
            t0 = time.perf_counter()
            subprocess.run([str(tool), "--model", args.model, "--method", "fitprune", "--budget", args.budget,
                            "--data", args.data, "-o", str(out)], check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
            recipe = json.loads(out.read_text())
            per_sample.append(recipe["provenance"]["seconds_per_sample"])
            recipes.add(json.dumps(recipe["visual_tokens"]))
    print(f"model {args.model}, data {args.data}, budget {args.budget}: wall median {statistics.median(walls):.1f} s"
          f" (min {min(walls):.1f}, max {max(walls):.1f}); calibration {statistics.median(per_sample) * 1e3:.0f} ms/sample"
          f" (tool's own timing, model load included); identical recipes: {len(recipes) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
