"""Memory traffic, FLOPs and time lower bounds of the VisualScore kernel, from its own tiling.

    .venv/bin/python benchmarks/visual_score_cost.py [--n-vis 576] [--seq 3000] [--prefix 35] [--heads 32]
                                                      [--kv-heads 32] [--head-dim 128] [--json OUT]

No GPU needed: the figures are counted, not measured. The tiling comes from
plugins/cuda/routing_kernels.h (MLLM_VISUAL_SCORE_*) and the per-thread register tile from
routing_kernels.cu, so the estimate follows the kernel when they change. Default geometry:
LLaVA-1.5-7B (32 heads, 32 kv heads, head_dim 128, FP16), FitPrune's query rows (the N visual rows and
the X text rows after them, R = N + X = T - prefix), N = 576, T = 3000, a 35-token prefix before the
image (assumed), positions 0..T-1.

Counted per scheme:
- tiled (now): pass 1 streams every live key tile for each (row tile, head), pass 2 every live
  visual key tile; a tile is live unless all of its pairs are in the rows' future (causal skip).
  "loads" are the global loads the blocks issue (K and Q tiles, positions) plus the partial slab
  written and read back by the combine kernel; FLOPs are the FMAs executed on whole 32 x 64 tiles.
- per-row (before): one block per query row and head step reads the whole of K and its q row,
  keeps T logits in shared memory and read-modify-writes the row's [N] reduction for every head.
Time bounds: DRAM (compulsory bytes: Q, K, positions and the [R, N] partial once each), FP32
CUDA-core peak (the kernel converts FP16 to FP32 and accumulates in FP32), and the shared-memory
ceiling of the tiled kernel's inner loop (per FMA it loads (a + b) / (a b) words for an a x b
register tile; an SM serves 32 words per clock and issues 128 FP32 FMAs). "all loads from DRAM" is
the time if the L2 cache caught no reuse at all (an upper reference, not a bound). The per-row
kernel's inner loop read one shared word (q) and one global element (K) per FMA.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mllm_deploy.plugins.kernels import CUDA_DIR, CUDA_SOURCE, header_constants

# (name, DRAM GB/s, FP32 CUDA-core TFLOPS, note)
DEVICES = (
    ("Jetson AGX Orin 64GB", 204.8, 5.32,
     "NVIDIA Jetson AGX Orin Series Technical Brief v1.2: 16 SMs, 2048 CUDA cores at 1.3 GHz, 5.3 FP32 TFLOPS"),
    ("Jetson Orin Nano 8GB", 68.0, 1.28,
     "assumed: 1024 CUDA cores x 2 x 625 MHz (datasheet GPU clock; JetPack 6.1 'Super' mode: 1020 MHz, 102 GB/s)"),
)
SMEM_WORDS_PER_CLOCK, FMA_LANES_PER_CLOCK = 32, 128  # per SM, Ampere


@dataclass
class Cost:
    scheme: str
    flops: float  # executed (multiply + add = 2)
    exps: float
    loads: float  # bytes the blocks load or store through L2
    dram: float  # compulsory DRAM bytes
    smem_words_per_fma: float  # shared-memory words loaded per FMA in the inner loop


def register_tile() -> tuple[int, int]:
    text = (CUDA_DIR / CUDA_SOURCE).read_text()
    rows = int(re.search(r"kRowsPerThread\s*=\s*(\d+)", text).group(1))
    keys = int(re.search(r"kKeysPerThread\s*=\s*(\d+)", text).group(1))
    return rows, keys


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def heads_per_split(heads: int, rows: int, q_len: int, row_tile: int, target: int, spare: int) -> int:
    """mllm::visual_heads_per_split (routing_math.h)."""
    if rows <= 0:
        return heads
    splits = max(1, min(ceil_div(target, ceil_div(rows, row_tile)), (q_len + spare) // rows, heads))
    return ceil_div(heads, splits)


def tiled_cost(heads: int, kv_heads: int, seq: int, head_dim: int, n_vis: int, prefix: int, elem: int) -> Cost:
    c = header_constants()
    row_tile, key_tile, spare = c["ROW_TILE"], c["KEY_TILE"], c["SPARE_ROWS"]
    rows = seq - prefix  # FitPrune: the visual rows and every text row after them
    splits = ceil_div(heads, heads_per_split(heads, rows, seq, row_tile, c["TARGET_BLOCKS"], spare))
    flops = exps = loads = 0.0
    for tile in range(ceil_div(rows, row_tile)):
        rows_here = min(row_tile, rows - tile * row_tile)
        last_position = prefix + tile * row_tile + rows_here - 1  # positions 0..T-1: the tile's latest row
        # pass 1: every key tile; live if its first key is not after the tile's last row
        for key0 in range(0, seq, key_tile):
            keys = min(key_tile, seq - key0)
            loads += heads * keys * 8  # key positions (each head looks again)
            if key0 <= last_position:
                flops += heads * 2 * row_tile * key_tile * head_dim
                exps += heads * row_tile * key_tile
                loads += heads * (keys + rows_here) * head_dim * elem  # K tile and the rows' q, per chunk
        # pass 2: the visual key tiles, recomputed and normalised
        for v0 in range(0, n_vis, key_tile):
            keys = min(key_tile, n_vis - v0)
            loads += keys * 8
            if prefix + v0 <= last_position:
                flops += heads * 2 * row_tile * key_tile * head_dim
                exps += heads * row_tile * key_tile
                loads += heads * (keys + rows_here) * head_dim * elem
    partial = splits * rows * n_vis * 4
    loads += 2 * partial + n_vis * 4  # slab written once, read once by the combine kernel
    dram = heads * rows * head_dim * elem + kv_heads * seq * head_dim * elem + seq * 8 + 2 * partial + n_vis * 4
    a, b = register_tile()
    return Cost("tiled, two-pass (now)", flops, exps, loads, dram, (a + b) / (a * b))


def per_row_cost(heads: int, kv_heads: int, seq: int, head_dim: int, n_vis: int, prefix: int, elem: int) -> Cost:
    rows = seq - prefix
    flops = rows * heads * 2 * seq * head_dim  # every key, no causal skip
    exps = rows * heads * (seq + n_vis)
    per_row_head = seq * head_dim * elem + head_dim * elem + seq * 8 + 2 * n_vis * 4  # K, q row, positions, reduction
    loads = rows * heads * per_row_head + 2 * rows * n_vis * 4 + n_vis * 4
    dram = (heads * rows * head_dim * elem + kv_heads * seq * head_dim * elem + seq * 8 + 2 * rows * n_vis * 4
            + n_vis * 4)
    # inner loop: one shared q word per FMA, and K straight from global memory (no shared tile)
    return Cost("one block per row (before)", flops, exps, loads, dram, 1.0)


def bounds(cost: Cost, bandwidth_gbs: float, tflops: float) -> dict[str, float]:
    dram_ms = cost.dram / (bandwidth_gbs * 1e9) * 1e3
    compute_ms = cost.flops / (tflops * 1e12) * 1e3
    smem_fraction = min(1.0, SMEM_WORDS_PER_CLOCK / (cost.smem_words_per_fma * FMA_LANES_PER_CLOCK))
    smem_ms = compute_ms / smem_fraction
    return {"dram_ms": dram_ms, "fp32_ms": compute_ms, "smem_ms": smem_ms,
            "lower_bound_ms": max(dram_ms, compute_ms, smem_ms),
            "all_loads_from_dram_ms": cost.loads / (bandwidth_gbs * 1e9) * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-vis", type=int, default=576)
    p.add_argument("--seq", type=int, default=3000)
    p.add_argument("--prefix", type=int, default=35, help="tokens before the image (LLaVA-1.5's system prompt)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--elem-bytes", type=int, default=2, help="2: FP16 q and k, 4: FP32")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args()
    geometry = (args.heads, args.kv_heads, args.seq, args.head_dim, args.n_vis, args.prefix, args.elem_bytes)
    costs = [tiled_cost(*geometry), per_row_cost(*geometry)]
    rows = args.seq - args.prefix
    print(f"VisualScore, FitPrune rows (R = {rows} = {args.n_vis} visual + {rows - args.n_vis} text), T = {args.seq}, "
          f"{args.heads} heads / {args.kv_heads} kv heads x {args.head_dim}, {8 * args.elem_bytes}-bit q and k; "
          f"tiling {header_constants()}")
    print("| scheme | GFLOP | exp (M) | loads through L2 (GB) | compulsory DRAM (MB) |")
    print("|---|---|---|---|---|")
    for c in costs:
        print(f"| {c.scheme} | {c.flops / 1e9:.1f} | {c.exps / 1e6:.0f} | {c.loads / 1e9:.2f} | {c.dram / 1e6:.1f} |")
    print()
    print("| device | scheme | DRAM ms | FP32 peak ms | smem ceiling ms | lower bound ms | all loads from DRAM ms |")
    print("|---|---|---|---|---|---|---|")
    report = {"geometry": vars(args), "tiling": header_constants(), "costs": [asdict(c) for c in costs], "devices": []}
    for name, bandwidth, tflops, note in DEVICES:
        for c in costs:
            b = bounds(c, bandwidth, tflops)
            print(f"| {name} | {c.scheme} | {b['dram_ms']:.2f} | {b['fp32_ms']:.1f} | {b['smem_ms']:.1f} | "
                  f"{b['lower_bound_ms']:.1f} | {b['all_loads_from_dram_ms']:.0f} |")
            report["devices"].append({"device": name, "scheme": c.scheme, **b})
    print()
    for name, bandwidth, tflops, note in DEVICES:
        print(f"{name}: {bandwidth} GB/s, {tflops} FP32 TFLOPS ({note})")
    print("smem ceiling: (a + b) / (a b) shared words per FMA for the tiled kernel's a x b register tile; the per-row "
          "kernel read one shared q word and one global K element per FMA (its L1/L2 limit is not modelled).")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
