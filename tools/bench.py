"""bench-mllm's work: latency, memory and FLOPs of bundles, each measured in its own process.

One child process per (bundle, backend) runs :mod:`mllm_deploy.tools.bench_worker`, so peak
host RSS is that bundle's alone and one bundle's allocator state cannot slow the next; every
backend is timed by the runtime's one loop (runtime/timing.py). Results
follow schema ``mllm-deploy/bench@1``; speedups are ratios to the dense bundle measured in the
same run on the same backend (DESIGN.md, measurement rules). Importing this module imports no
torch and no onnxruntime.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mllm_deploy.core.errors import MllmError

BENCH_SCHEMA = "mllm-deploy/bench@1"
BACKENDS = ("onnxruntime", "torch", "tensorrt")


@dataclass(frozen=True)
class BenchSettings:
    backends: tuple[str, ...] = ("onnxruntime",)
    prompt_tokens: int | None = None  # None: each bundle's visual tokens + 40
    new_tokens: int = 32  # tokens generated; the first comes from prefill, the rest from decode steps
    repeats: int = 5
    warmup: int = 1
    ort: tuple[tuple[str, str], ...] = ()  # the onnxruntime backend's flags (run-mllm's add_ort_arguments)

    def validate(self) -> None:
        for backend in self.backends:
            if backend not in BACKENDS:
                raise MllmError(f"unknown --backend '{backend}'; choose from {', '.join(BACKENDS)}")
        if self.new_tokens < 2:
            raise MllmError(f"--new-tokens must be at least 2 (one decode step), got {self.new_tokens}")
        if self.repeats < 1:
            raise MllmError(f"--repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise MllmError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise MllmError(f"--prompt-tokens must be positive, got {self.prompt_tokens}")


def _processor_name() -> str:
    name = platform.processor()
    try:  # platform.processor() is often empty or just the architecture on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def _gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, without importing torch or a CUDA library."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ort_version = version("onnxruntime")
    except PackageNotFoundError:
        ort_version = None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "processor": _processor_name(),
            "onnxruntime": ort_version, "gpu": _gpu_name(), "python": platform.python_version(),
            "threads": os.environ.get("MLLM_DEPLOY_THREADS")}


def run_worker(bundle: str, backend: str, settings: BenchSettings, tick: Callable[[], None]) -> dict:
    """Measure one bundle on one backend in a child process; its stderr ticks drive the progress bar."""
    from mllm_deploy.tools.bench_worker import PROGRESS_MARK

    command = [sys.executable, "-m", "mllm_deploy.tools.bench_worker", str(bundle), "--backend", backend,
               "--new-tokens", str(settings.new_tokens), "--repeats", str(settings.repeats),
               "--warmup", str(settings.warmup)]
    if settings.prompt_tokens is not None:
        command += ["--prompt-tokens", str(settings.prompt_tokens)]
    if backend == "onnxruntime":
        command += [arg for flag, value in settings.ort for arg in (flag, value)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        other: list[str] = []
        for line in proc.stderr:  # the result (one short line) waits in the stdout pipe meanwhile
            if line.strip() == PROGRESS_MARK:
                tick()
            elif line.strip():
                other.append(line.strip())
        stdout = proc.stdout.read()
        code = proc.wait()
    if code != 0:
        last = other[-1] if other else f"exit status {code}"
        last = last.removeprefix("bench-mllm: error: ")
        raise MllmError(f"{Path(bundle).name} ({backend}): {last}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise MllmError(f"{Path(bundle).name} ({backend}): the measurement printed no result") from None


def run_bench(bundles: list[str], settings: BenchSettings, show_progress: bool = True) -> dict:
    """Every bundle on every backend; returns the ``mllm-deploy/bench@1`` payload."""
    from mllm_deploy.core.progress import Progress
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.timing import PREFIX_TOKENS

    settings.validate()
    for bundle in bundles:  # every bundle is checked (hashes included) before any work
        load_bundle(bundle)
    results = []
    total = len(bundles) * len(settings.backends) * settings.repeats
    stream = sys.stderr if show_progress else open(os.devnull, "w")
    try:
        with Progress(total, "bench", "run", stream=stream) as bar:
            for backend in settings.backends:
                for bundle in bundles:
                    results.append(run_worker(bundle, backend, settings, bar.update))
    finally:
        if stream is not sys.stderr:
            stream.close()
    return {"schema": BENCH_SCHEMA, "machine": machine_info(),
            "settings": {**asdict(settings), "backends": list(settings.backends), "prefix_tokens": PREFIX_TOKENS,
                         "decode_steps": settings.new_tokens - 1, "flops_formula": "exact"},
            "results": results}


# ---- comparisons ------------------------------------------------------------------------------------
def weights_scheme(result: dict) -> str:
    """float32/float16/int8/int4: how the result's bundle stores its weights (results written before weight-only
    quantization carry no weights_scheme: their bundle dtype)."""
    return result.get("weights_scheme") or result["model"]["bundle_dtype"]


def dense_reference(result: dict, results: list[dict]) -> dict | None:
    """The dense bundle of the same model, weight scheme, backend and prompt length measured in the same run."""
    for other in results:
        if (other["method"] == "dense" and other["backend"] == result["backend"]
                and other["prompt_tokens"] == result["prompt_tokens"]
                and weights_scheme(other) == weights_scheme(result)
                and other["model"]["fingerprint"] == result["model"]["fingerprint"]):
            return other
    return None


def speedups(result: dict, results: list[dict]) -> dict | None:
    """Measured prefill/TTFT speedup vs dense, the FLOPs model's speedup, and their ratio (efficiency)."""
    dense = dense_reference(result, results)
    if dense is None:
        return None
    flops = result["dense_prefill_flops"] / result["prefill_flops"] if result["prefill_flops"] else None
    prefill = dense["prefill_ms"]["median"] / result["prefill_ms"]["median"]
    return {"prefill": prefill, "ttft": dense["ttft_ms"]["median"] / result["ttft_ms"]["median"],
            "flops": flops, "efficiency": prefill / flops if flops else None}


def _fmt(value, pattern: str = "{:.1f}", missing: str = "–") -> str:
    return missing if value is None else pattern.format(value)


def visual_summary(visual_tokens: list[int]) -> str:
    """'576' for dense, '576→288' for a pruned recipe (first layer → last layer)."""
    first, last = visual_tokens[0], visual_tokens[-1]
    return str(first) if first == last and min(visual_tokens) == first else f"{first}→{last}"


def markdown_table(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, onnxruntime {m['onnxruntime']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + (f"; {m['threads']} threads" if m.get("threads") else ""),
             "",
             "FLOPs: prefill, exact formula (formats/flops.py; flops-mllm --formula exact) at the benchmark's prompt",
             "",
             "| bundle | backend | method | weights | visual tokens | TTFT ms | prefill ms median (min–max)"
             " | decode ms/token | tokens/s | KV MiB | prefill GFLOPs | FLOPs reduction | prefill speedup vs dense"
             " | FLOPs speedup | measured/FLOPs | peak RSS MB | routing share | decode overhead | bundle MiB"
             " | weights MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        s = speedups(r, payload["results"]) or {}
        p = r["prefill_ms"]
        scheme = weights_scheme(r)
        sizes = [_fmt(r.get(key) and r[key] / 2**20, "{:.2f}") for key in ("bundle_bytes", "weight_bytes")]
        lines.append(
            f"| {r['name']} | {r['backend']} | {r['method']} | {scheme} | {visual_summary(r['visual_tokens'])} |"
            f" {r['ttft_ms']['median']:.1f} | {p['median']:.1f} ({p['min']:.1f}–{p['max']:.1f}) |"
            f" {r['decode_ms_per_token']['median']:.2f} | {r['tokens_per_s']:.1f} | {r['kv_cache_bytes'] / 2**20:.2f} |"
            f" {r['prefill_flops'] / 1e9:.3f} | {r['flops_reduction']:.1%} | {_fmt(s.get('prefill'), '{:.2f}x')} |"
            f" {_fmt(s.get('flops'), '{:.2f}x')} | {_fmt(s.get('efficiency'), '{:.2f}')} | {r['peak_rss_mb']:.0f} |"
            f" {_fmt(r['routing_share'], '{:.1%}')} | {_fmt(r['decode_overhead_share'], '{:.1%}')} |"
            f" {sizes[0]} | {sizes[1]} |")
    return "\n".join(lines)
