"""The fused routing kernels (plugins/cuda) against the PyTorch ops they replace, on a GPU.

    .venv/bin/python benchmarks/plugin_kernels.py [--library LIB] [--dtype float16] [--repeats 7] [--json OUT]
                                                   [--n-vis 576] [--text 59]

Shapes are LLaVA-1.5-7B's: 576 visual tokens, 32 heads of 128, hidden 4096, a 640-token prompt
(--n-vis 2880 for LLaVA-NeXT's image, --text for a longer prompt: T = 5 + n_vis + text; the
PyTorch VisualScore holds [32, rows, T] float32 logits, 2 GB at T = 4,096 for FitPrune's rows).
Per op: the kernel through its C ABI (an nvcc build for this GPU, or --library, e.g. the TensorRT
plugin library) and the PyTorch spelling of the same step (TopK + sort + index_select for
TokenSelect; matmul, mask, softmax and reductions for VisualScore; mul + index_copy for
TokenScatter). Both are checked to agree first. Times are medians over repeats of N back-to-back
launches divided by N, so both sides include their Python launch overhead (ctypes for the kernel,
one dispatch per op for PyTorch). Needs torch with CUDA for the comparison; without it only the
kernels are timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mllm_deploy.plugins import ops
from mllm_deploy.plugins.kernels import RoutingKernels, build_cuda_library, build_host_library

HEADS, HEAD_DIM, HIDDEN, N_VIS, PREFIX, TEXT = 32, 128, 4096, 576, 5, 59
SEQ = PREFIX + N_VIS + TEXT


def set_sizes(n_vis: int, text: int) -> None:
    """Token counts of the benchmark (module-level: the PyTorch spellings below read them)."""
    global N_VIS, TEXT, SEQ
    N_VIS, TEXT = n_vis, text
    SEQ = PREFIX + N_VIS + TEXT


def time_launches(launch, sync, launches: int, repeats: int) -> float:
    """Median milliseconds per launch."""
    launch()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(launches):
            launch()
        sync()
        samples.append((time.perf_counter() - start) * 1e3 / launches)
    return statistics.median(samples)


def inputs(dtype, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "scores": rng.random(N_VIS).astype(np.float32),
        "vis_start": np.array([PREFIX], np.int64),
        "data": rng.standard_normal((1, SEQ, HIDDEN)).astype(dtype),
        "positions": np.arange(SEQ, dtype=np.int64)[None],
        "q_last": rng.standard_normal((1, HEADS, 1, HEAD_DIM)).astype(dtype),
        "q_all": rng.standard_normal((1, HEADS, SEQ, HEAD_DIM)).astype(dtype),
        "k": rng.standard_normal((1, HEADS, SEQ, HEAD_DIM)).astype(dtype),
        "skip_scale": rng.uniform(0.5, 1.5, (1, SEQ, 1)).astype(dtype),
    }


# ---- the PyTorch spellings ---------------------------------------------------------------------------------
def torch_token_select(torch, scores, data, positions, k):
    best = torch.topk(scores, k).indices
    kept = torch.sort(best).values + PREFIX
    rows = torch.cat([torch.arange(PREFIX, device=data.device), kept,
                      torch.arange(PREFIX + N_VIS, SEQ, device=data.device)])
    return data.index_select(1, rows), positions.index_select(1, rows), rows


def torch_visual_score(torch, q, k, positions, query_rows, head_reduction, combine, scale):
    first = {"last_text": SEQ - 1, "visual_and_text": PREFIX}[query_rows]
    q_rows = q[0, :, -(SEQ - first):].float()  # [H, R, Dh]
    logits = (q_rows @ k[0].float().transpose(1, 2)) * scale  # [H, R, T]
    pos = positions[0]
    logits = logits.masked_fill(pos[None, :] > pos[first:][:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)[:, :, PREFIX:PREFIX + N_VIS]
    reduced = probs.amax(0) if head_reduction == "max" else probs.mean(0)
    if combine == "single":
        return reduced.mean(0)
    return (reduced[:N_VIS].sum(0) / N_VIS) * (reduced[N_VIS:].sum(0) / max(reduced.shape[0] - N_VIS, 1))


def torch_token_scatter(torch, base, updates, rows, skip_scale):
    return (base * skip_scale).index_copy(1, rows, updates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", help="a build of the routing C ABI (default: nvcc build for this GPU)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--launches", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--n-vis", type=int, default=N_VIS, help="visual tokens (576: LLaVA-1.5, 2880: LLaVA-NeXT)")
    p.add_argument("--text", type=int, default=TEXT, help="text tokens after the image")
    p.add_argument("--host", action="store_true",
                   help="run the host reference build instead (checks this script without a GPU; CPU times)")
    args = p.parse_args()
    set_sizes(args.n_vis, args.text)
    if args.host:
        kernels = RoutingKernels(build_host_library())
    else:
        kernels = RoutingKernels(args.library or build_cuda_library(("native",)))
    if not args.host and (not kernels.is_cuda or kernels.device_count() < 1):
        print("no CUDA GPU (or not a CUDA build): nothing to measure", file=sys.stderr)
        return 1
    try:
        import torch

        if not args.host and not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    dtype = np.float16 if args.dtype == "float16" else np.float32
    x = inputs(dtype)
    k_keep = N_VIS // 2
    rows = (PREFIX + np.sort(np.random.default_rng(1).permutation(N_VIS)[:k_keep])).astype(np.int64)
    updates = np.random.default_rng(2).standard_normal((1, k_keep, HIDDEN)).astype(dtype)
    scale = HEAD_DIM ** -0.5
    cases = {
        f"TokenSelect k={k_keep}": (
            lambda: kernels.prepare_token_select(x["scores"], x["vis_start"], x["data"], x["positions"], k=k_keep, n_vis=N_VIS),
            lambda t, d: torch_token_select(t, d["scores"], d["data"], d["positions"], k_keep),
            lambda: ops.token_select(x["scores"], x["vis_start"], x["data"], x["positions"], k=k_keep, n_vis=N_VIS)),
        "VisualScore last_text/mean (FastV)": (
            lambda: kernels.prepare_visual_score(x["q_last"], x["k"], x["positions"], x["vis_start"], n_vis=N_VIS,
                                         query_rows="last_text", head_reduction="mean", combine="single", scale=scale),
            lambda t, d: torch_visual_score(t, d["q_last"], d["k"], d["positions"], "last_text", "mean", "single", scale),
            None),
        "VisualScore visual_and_text/max x (FitPrune)": (
            lambda: kernels.prepare_visual_score(x["q_all"], x["k"], x["positions"], x["vis_start"], n_vis=N_VIS,
                                         query_rows="visual_and_text", head_reduction="max",
                                         combine="self_times_cross", scale=scale),
            lambda t, d: torch_visual_score(t, d["q_all"], d["k"], d["positions"], "visual_and_text", "max",
                                            "self_times_cross", scale),
            None),
        f"TokenScatter rows={k_keep} scaled": (
            lambda: kernels.prepare_token_scatter(x["data"], updates, rows, x["skip_scale"]),
            lambda t, d: torch_token_scatter(t, d["data"], d["updates"], d["rows"], d["skip_scale"]),
            lambda: ops.token_scatter(x["data"], updates, rows, x["skip_scale"])),
    }
    device, where = {}, "cpu" if args.host else "cuda"  # --host checks the PyTorch spellings on the CPU
    if torch is not None:
        device = {name: torch.from_numpy(np.ascontiguousarray(v)).to(where) for name, v in x.items()}
        device["updates"], device["rows"] = torch.from_numpy(updates).to(where), torch.from_numpy(rows).to(where)
        torch_sync = torch.cuda.synchronize if where == "cuda" else (lambda: None)
    results = []
    for name, (prepare, torch_fn, reference) in cases.items():
        launch, collect = prepare()  # device buffers of this case only (freed below)
        launch()
        outputs = collect()
        if reference is not None:  # exact ops: the kernel must equal the NumPy reference
            for got, want in zip(outputs, reference()):
                np.testing.assert_array_equal(got, np.asarray(want))
        row = {"op": name, "dtype": args.dtype,
               "kernel_ms": time_launches(launch, kernels.synchronize, args.launches, args.repeats)}
        if torch is not None:
            torch_out = torch_fn(torch, device)
            first = torch_out[0] if isinstance(torch_out, tuple) else torch_out
            np.testing.assert_allclose(outputs[0].astype(np.float32), first.float().cpu().numpy(), rtol=2e-3, atol=1e-5)
            row["torch_ms"] = time_launches(lambda: torch_fn(torch, device), torch_sync, args.launches, args.repeats)
            row["speedup"] = row["torch_ms"] / row["kernel_ms"]
        results.append(row)
        kernels.free_all()
    if args.host:
        gpu = "the host reference build and PyTorch on the CPU (a check of this script, not a measurement)"
    else:
        gpu = torch.cuda.get_device_name() if torch is not None else "CUDA GPU"
    print(f"routing kernels vs PyTorch on {gpu}, {args.dtype}, LLaVA-1.5-7B heads (T={SEQ}, N={N_VIS})")
    print("| op | kernel ms | torch ms | torch / kernel |")
    print("|---|---|---|---|")
    for r in results:
        torch_ms = f"{r['torch_ms']:.4f}" if "torch_ms" in r else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"| {r['op']} | {r['kernel_ms']:.4f} | {torch_ms} | {speed} |")
    if args.json_out:
        report = {"gpu": gpu, "seq": SEQ, "n_vis": N_VIS, "results": results}
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
