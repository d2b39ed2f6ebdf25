"""Our ONNX Runtime bundles against onnxruntime-genai on the same text model, interleaved, on this CPU.

    python benchmarks/ort_genai_compare.py WORKDIR [--rounds 10] [--prompt-tokens 616] [--new-tokens 16]
        [--threads 2] [--bundle NAME=PATH ...] [--model small-llava] [--genai fp32 --genai int4 ...]

Setup (once, cached in WORKDIR; needs torch and transformers): the LLaVA model's text decoder is saved as a
LlamaForCausalLM and built with onnxruntime-genai's model builder for the CPU in each --genai precision (fp32 by
default; int4 is its MatMulNBits build, the builder's defaults: blocks of 32, accuracy level 4) with its own graphs
(GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding); our dense float32 bundle is exported
unless --bundle names bundles already made (a fused one, a FastV one, an int4 one, ...). Ratios are to genai-fp32;
a quantized bundle of ours also gets the ratios to genai's build of the same width (genai-int4 for int4).
Each worker reports its process's peak RSS; the table gives every system's size on disk.

Measurement: every system runs in its own fresh process per round (--warmup generations, default 2, then one
measured: our sessions' second run can still be 30-50% slower than the third, so one warm-up measured a transient),
round robin, the order reversed every other round; each process uses --threads intra-op threads. Prefill is the
time to process the whole prompt (ours: image features in, the vision tower is not timed, since genai's text
model has none; genai: the prompt's token ids), decode the median ms per generated token. A MatMul worker measures
ONNX Runtime's float32 GEMM rate in the same rounds: a prefill's MatMul FLOPs divided by its time, over that
rate, is its share of the peak. Ratios are medians of the per-round ratios (paired rounds).

Prints one JSON object and a table; --json PATH writes the object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GENAI = "genai-fp32"


# ---- setup ---------------------------------------------------------------------------------------------
def text_model_dir(model_dir: Path, target: Path) -> Path:
    """The LLaVA model's language model and LM head as a LlamaForCausalLM directory, with the tokenizer."""
    import shutil

    import torch
    import transformers

    if (target / "config.json").is_file():
        return target
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                                       local_files_only=True)
    config = llava.config.text_config
    causal = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    causal.model.load_state_dict(llava.model.language_model.state_dict())
    causal.lm_head.load_state_dict(llava.lm_head.state_dict())
    causal.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, target / name)
    return target


def build_genai(text_dir: Path, target: Path, threads: int, precision: str = "fp32") -> Path:
    if not (target / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(text_dir), "-o",
                        str(target), "-p", precision, "-e", "cpu", "-c", str(target.parent / "genai-cache")],
                       check=True, stdout=subprocess.DEVNULL)
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    config_path.write_text(json.dumps(config, indent=2))
    return target


def setup(args) -> dict[str, tuple[str, str]]:
    from mllm_deploy.models.registry import resolve_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    systems = {}
    if not args.bundle:
        bundle = work / "ours-dense"
        if not (bundle / "manifest.json").is_file():
            from mllm_deploy.export.llava_export import ExportOptions, export_bundle

            export_bundle(args.model, bundle, ExportOptions(force=True), log=lambda m: print(m, file=sys.stderr))
        args.bundle = [f"dense={bundle}"]
    for item in args.bundle:
        name, _, path = item.partition("=")
        kind = "ours-portable" if name in (args.portable or []) else "ours"
        weights = dict(item.split("=", 1) for item in args.weights or []).get(name, "auto")
        systems[name] = (kind if weights == "auto" else f"{kind}:{weights}", path)
    text_dir = text_model_dir(model_dir, work / "text-model")
    for precision in dict.fromkeys(["fp32", *(args.genai or [])]):
        name = f"genai-{precision}"
        systems[name] = ("genai", str(build_genai(text_dir, work / name, args.threads, precision)))
    return systems


# ---- workers (one measurement each, in a fresh process) -----------------------------------------------
def worker_ours(path: str, prompt_tokens: int, new_tokens: int, threads: int, graphs: str = "auto",
                weights: str = "auto", warmup: int = 2) -> dict:
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.timing import synthetic_inputs

    pipe = Pipeline.load(path, threads=threads, graphs=graphs, weights=weights)
    ids, pixels = synthetic_inputs(pipe.bundle, prompt_tokens)
    for _ in range(warmup):
        pipe.generator.generate(ids, pixels, new_tokens, ignore_eos=True)
    result = pipe.generator.generate(ids, pixels, new_tokens, ignore_eos=True)
    return {"prefill_ms": result.timings.prefill_ms, "decode_ms": statistics.median(result.timings.decode_ms),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    from mllm_deploy.runtime.timing import peak_rss_mb as peak

    return peak()


def worker_genai(path: str, prompt_tokens: int, new_tokens: int, threads: int, warmup: int = 2) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(path)
    vocab = json.loads((Path(path) / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = np.random.default_rng(0).integers(3, min(vocab, 32000), size=prompt_tokens).astype(np.int32)

    def once() -> dict:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)  # the prompt's forward pass
        prefill = (time.perf_counter() - start) * 1000
        steps = []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append((time.perf_counter() - start) * 1000)
        return {"prefill_ms": prefill, "decode_ms": statistics.median(steps)}

    for _ in range(warmup):
        once()
    return {**once(), "peak_rss_mb": peak_rss_mb()}


def worker_matmul(rows: int, inner: int, cols: int, threads: int) -> dict:
    """ONNX Runtime's float32 MatMul rate for a prefill-shaped product (tokens x hidden @ hidden x intermediate)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((inner, cols), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])], [weight])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((rows, inner), dtype=np.float32)
    session.run(None, {"x": x})
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return {"gflops": 2 * rows * inner * cols / statistics.median(times) / 1e9}


def run_worker(kind: str, path: str, args) -> dict:
    command = [sys.executable, __file__, args.workdir, "--worker", kind, path, "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
               "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MLLM_DEPLOY_THREADS": str(args.threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker on {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the interleaved run -------------------------------------------------------------------------------
def matmul_shape(path: str, prompt_tokens: int) -> tuple[int, int, int]:
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    text = manifest["model"]["text"]
    return prompt_tokens, text["hidden_size"], 2 * text["intermediate_size"]  # the fused gate/up product


def prefill_matmul_flops(path: str, prompt_tokens: int) -> float:
    """MatMul FLOPs of a prefill (projections, attention products, the last position's LM head): the exact
    formula of formats/flops.py for the bundle's recipe."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.geometry import spec_from_manifest
    from mllm_deploy.formats.recipe import Recipe
    from mllm_deploy.runtime.timing import PREFIX_TOKENS

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    spec = spec_from_manifest(manifest["model"])
    cost = prefill_cost(spec, Recipe.from_dict(manifest["recipe"]), text_tokens=prompt_tokens - spec.visual_tokens,
                        formula="exact", prefix_tokens=PREFIX_TOKENS)
    return float(cost.recipe)


def measure(args, systems: dict[str, tuple[str, str]]) -> dict:
    names = list(systems)
    first_ours = next(path for kind, path in systems.values() if kind != "genai")
    shape = matmul_shape(first_ours, args.prompt_tokens)
    rounds = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        row = {name: run_worker(systems[name][0], systems[name][1], args) for name in order}
        row["matmul"] = run_worker("matmul", ",".join(map(str, shape)), args)
        rounds.append(row)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {row[n]['prefill_ms']:.0f}/{row[n]['decode_ms']:.1f}" for n in names)
              + f", matmul {row['matmul']['gflops']:.0f} GFLOP/s", file=sys.stderr)
    result = {"machine": args.machine, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "warmup": args.warmup,
              "threads": args.threads, "rounds": args.rounds, "systems": {}, "matmul_gflops":
              statistics.median(r["matmul"]["gflops"] for r in rounds)}
    for name in names:
        kind, path = systems[name]
        entry = {"kind": kind, "path": path,
                 "prefill_ms": statistics.median(r[name]["prefill_ms"] for r in rounds),
                 "decode_ms": statistics.median(r[name]["decode_ms"] for r in rounds),
                 "peak_rss_mb": statistics.median(r[name]["peak_rss_mb"] for r in rounds),
                 "disk_bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())}
        if kind != "genai":
            weights = json.loads((Path(path) / "manifest.json").read_text()).get("quantization", {}).get("weights")
            peer = f"genai-{weights}" if weights else None
            if peer in systems:
                entry["peer"] = peer
                entry["prefill_ratio_to_peer"] = statistics.median(r[name]["prefill_ms"] / r[peer]["prefill_ms"]
                                                                   for r in rounds)
                entry["decode_ratio_to_peer"] = statistics.median(r[name]["decode_ms"] / r[peer]["decode_ms"]
                                                                  for r in rounds)
        if kind != "genai":
            entry["prefill_ratio_to_genai"] = statistics.median(r[name]["prefill_ms"] / r[GENAI]["prefill_ms"]
                                                                for r in rounds)
            entry["decode_ratio_to_genai"] = statistics.median(r[name]["decode_ms"] / r[GENAI]["decode_ms"]
                                                               for r in rounds)
            flops = prefill_matmul_flops(path, args.prompt_tokens)
            entry["prefill_gflops"] = flops / entry["prefill_ms"] / 1e6
            entry["prefill_share_of_matmul_peak"] = statistics.median(
                flops / r[name]["prefill_ms"] / 1e6 / r["matmul"]["gflops"] for r in rounds)
        result["systems"][name] = entry
    dense = "dense" if "dense" in systems else None
    for name, entry in result["systems"].items():
        if dense and name not in (dense, GENAI) and entry["kind"] == systems[dense][0] and entry["path"] != systems[dense][1]:
            # a recipe's realised prefill speedup over dense against its FLOPs speedup (same graph set)
            entry["realised_speedup"] = statistics.median(r[dense]["prefill_ms"] / r[name]["prefill_ms"]
                                                          for r in rounds)
            entry["flops_speedup"] = (prefill_matmul_flops(systems[dense][1], args.prompt_tokens)
                                      / prefill_matmul_flops(entry["path"], args.prompt_tokens))
            entry["realised_over_flops"] = entry["realised_speedup"] / entry["flops_speedup"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--model", default="small-llava")
    parser.add_argument("--bundle", action="append", metavar="NAME=PATH", help="our bundle to compare (repeatable)")
    parser.add_argument("--portable", action="append", metavar="NAME",
                        help="run bundle NAME on its portable graphs (the ones TensorRT builds), not its onnxruntime ones")
    parser.add_argument("--weights", action="append", metavar="NAME=MODE",
                        help="how bundle NAME's sessions hold the weights: shared, fast, packed (default: auto)")
    parser.add_argument("--genai", action="append", metavar="PRECISION",
                        help="also onnxruntime-genai's build in this precision (int4, int8, fp16; fp32 always)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="generations before the measured one, per process")
    parser.add_argument("--prompt-tokens", type=int, default=616)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--machine", default=os.environ.get("MLLM_MACHINE", "unnamed"))
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, path = args.worker
        if kind == "matmul":
            out = worker_matmul(*map(int, path.split(",")), args.threads)
        elif kind == "genai":
            out = worker_genai(path, args.prompt_tokens, args.new_tokens, args.threads, args.warmup)
        else:
            kind, _, weights = kind.partition(":")
            out = worker_ours(path, args.prompt_tokens, args.new_tokens, args.threads,
                              "portable" if kind == "ours-portable" else "auto", weights or "auto", args.warmup)
        print(json.dumps(out))
        return 0
    result = measure(args, setup(args))
    print(json.dumps(result, indent=2))
    for name, entry in result["systems"].items():
        extra = ("" if entry["kind"] == "genai" else f"  ratio prefill {entry['prefill_ratio_to_genai']:.3f} decode"
                 f" {entry['decode_ratio_to_genai']:.3f}, {entry['prefill_share_of_matmul_peak']:.0%} of MatMul peak")
        if "peer" in entry:
            extra += (f"; to {entry['peer']}: prefill {entry['prefill_ratio_to_peer']:.3f} decode"
                      f" {entry['decode_ratio_to_peer']:.3f}")
        print(f"{name:>16}: prefill {entry['prefill_ms']:.0f} ms, decode {entry['decode_ms']:.1f} ms/token,"
              f" peak RSS {entry['peak_rss_mb']:.0f} MB, {entry['disk_bytes'] / 2**20:.0f} MiB on disk{extra}",
              file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
