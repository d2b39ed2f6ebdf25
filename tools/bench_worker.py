"""One bench-mllm measurement in its own process, so that peak host RSS belongs to this bundle alone.

    python -m mllm_deploy.tools.bench_worker BUNDLE --backend onnxruntime --prompt-tokens N ...

Every backend (onnxruntime, tensorrt, and torch: the PyTorch reference as a runner, calib/torch_runner.py)
is timed by the runtime's one loop (runtime/timing.py); this module adds ONNX Runtime's routing share (a
profiled prefill, kept out of the timings). Prints one JSON line (a result of schema ``mllm-deploy/bench@1``)
on stdout; progress ticks go to stderr as ``PROGRESS_MARK`` lines that the parent turns into its progress
bar. Errors follow the CLI funnel (one line on stderr, exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from mllm_deploy.core import cli
from mllm_deploy.core.errors import MllmError

PROGRESS_MARK = "@@bench-progress"
ROUTING_SCOPES = ("/route/", "/rank/")  # node-name scopes of the routing subgraphs (export/pruned_prefill.py)
ROUTING_OPS = ("VisualScore", "TokenSelect", "TokenScatter")  # the plugin-routed forms


# ---- ONNX Runtime's routing share ------------------------------------------------------------------
PROFILED_RUNS = 4  # the first is a warm-up (first-touch allocations); the share is the median of the rest


def routing_share_of_profile(events: list[dict]) -> float:
    """Median over profiled runs (after the first) of the share of prefill kernel time spent in
    routing nodes, from an ONNX Runtime JSON profile."""
    spans = sorted((float(e.get("ts") or 0), float(e.get("ts") or 0) + float(e.get("dur") or 0)) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(spans) < 2:
        return _routing_share(events)
    shares = [_routing_share([e for e in events if start <= float(e.get("ts") or 0) <= end]) for start, end in spans[1:]]
    return float(np.median(shares))


def _routing_share(events: list[dict]) -> float:
    total = routing = 0.0
    for event in events:
        if event.get("cat") != "Node":
            continue
        args = event.get("args") or {}
        name = str(args.get("node_name") or event.get("name") or "")
        duration = float(event.get("dur") or 0)
        total += duration
        if any(scope in name for scope in ROUTING_SCOPES) or args.get("op_name") in ROUTING_OPS:
            routing += duration
    return routing / total if total else 0.0


def profiled_routing_share(bundle, feed: dict[str, np.ndarray]) -> float:
    """Extra prefills in a profiling session (profiling slows every node, so it is kept out of the timings)."""
    from mllm_deploy.runtime.backends import runner_class

    from mllm_deploy.formats.manifest import ORT_GRAPHS

    graph = ORT_GRAPHS["prefill"] if ORT_GRAPHS["prefill"] in bundle.manifest["graphs"] else "prefill"  # what ran
    entry = bundle.manifest["graphs"][graph]
    runner = runner_class("onnxruntime")(bundle.graph_path(graph).resolve(), bundle.graph_io(graph), "prefill",
                                         profile=True, custom_ops=entry.get("custom_ops", []))
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mllm-bench-profile-") as scratch:
        os.chdir(scratch)  # ONNX Runtime writes its profile into the working directory
        try:
            with runner:
                for _ in range(PROFILED_RUNS):
                    runner.infer(feed)
                profile_file = runner.end_profiling()
            events = json.loads(Path(profile_file).read_text()) if profile_file else []
        finally:
            os.chdir(here)
    return routing_share_of_profile(events)


def prefill_feed(generator, input_ids: np.ndarray, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids, "image_features": generator.encode_image(pixel_values),
            "image_start": np.array([generator.image_start(input_ids)], np.int64)}


def _gpu_name() -> str:
    """The TensorRT runner does not report its device (Runner.device_facts), so ask the GPU here."""
    from mllm_deploy.trt.env import query_gpu

    name, capability = query_gpu()
    return f"{name} (sm_{capability.replace('.', '')})"


# ---- the worker entry point ---------------------------------------------------------------------------
def measure(bundle_path: str, backend: str, prompt_tokens: int | None, new_tokens: int, repeats: int,
            warmup: int, tick: Callable[[], None] = lambda: None, options: dict | None = None) -> dict:
    """The runtime's timed loop (runtime/timing.py) on ``backend``, plus ONNX Runtime's routing share."""
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.timing import bench_result, peak_rss_mb, synthetic_inputs, time_generation

    bundle = load_bundle(Path(bundle_path).resolve(), check_hashes=False)  # the parent checked them
    prompt_tokens = prompt_tokens if prompt_tokens is not None else bundle.visual_tokens + 40
    ids, pixels = synthetic_inputs(bundle, prompt_tokens)
    if prompt_tokens + new_tokens > bundle.max_positions:
        raise MllmError(f"--prompt-tokens {prompt_tokens} plus --new-tokens {new_tokens} exceeds the model's context")
    with Pipeline(bundle, backend, **(options or {})) as pipe:  # the runtime's choices unless flags say otherwise
        generator = pipe.generator
        result = bench_result(generator, time_generation(generator, ids, pixels, new_tokens, repeats, warmup, tick))
        result["weights_mode"] = pipe.weights_mode
        if backend == "onnxruntime":  # the only backend with a profiler that names the routing nodes
            result["routing_share"] = profiled_routing_share(bundle, prefill_feed(generator, ids, pixels))
    if backend == "tensorrt":
        result["device"] = _gpu_name()
    result["peak_rss_mb"] = peak_rss_mb()  # the profiling session included, as before
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-mllm-worker", description="one bench-mllm measurement (internal)")
    p.add_argument("bundle")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    from mllm_deploy.runtime.cli import add_ort_arguments

    add_ort_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    def tick() -> None:
        print(PROGRESS_MARK, file=sys.stderr, flush=True)

    from mllm_deploy.runtime.cli import ort_options

    result = measure(args.bundle, args.backend, args.prompt_tokens, args.new_tokens, args.repeats, args.warmup, tick,
                     ort_options(args))
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    return cli.main("bench-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
