"""Dense, FastV, FitPrune (published 50% schedule) and MoD bundles of one checkpoint on ONNX Runtime, against the
PyTorch reference of each recipe: realised against FLOPs speedups, and decode against the memory-bandwidth bound.

    python benchmarks/ort_recipes_on_device.py WORKDIR --model CHECKPOINT [--layers N] [--provider cuda]
        [--dtype float16] [--prompt-tokens 616] [--new-tokens 32] [--repeats 5] [--bandwidth-gbs 4800]
        [--json OUT]

Meant for a GPU: CHECKPOINT is the LLaVA-1.5-7B-geometry checkpoint of benchmarks/llava7b_checkpoint.py (random
float16 weights in llava-hf's layout), ``--provider cuda`` runs the bundles on the CUDA execution provider
(``mllm-deploy[gpu]``) and the reference runs on the same device in the same dtype. ``--layers N`` keeps the first N
decoder layers (a depth-truncated copy reading the same shards: a device with less disk than four 13 GB bundles,
or a quick look); the FitPrune schedule is then scaled to that depth.

On a machine without a GPU, ``--model tiny-llava --provider cpu --dtype float32`` runs the same code (the test
suite does). Prints a table and one JSON object (``--json`` writes it); bundles and recipes stay in WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_shape_prefill import recipes as static_recipes  # noqa: E402 - the published FitPrune schedule lives there


def truncated_model(model_dir: Path, layers: int, work: Path) -> Path:
    """A directory whose config keeps the first ``layers`` decoder layers, its other files linked to the originals."""
    target = work / f"model-{layers}l"
    if target.exists():
        return target
    target.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (target / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config.setdefault("text_config", {})["num_hidden_layers"] = layers
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def make_recipes(model: str, spec, work: Path) -> dict[str, Path]:
    """dense, FastV K=2 R=0.5, FitPrune's published 50% schedule (gpu_shape_prefill.py) and MoD with the attention
    router at capacity 0.5 on every layer after the first two: the static recipes need no data."""
    from mllm_deploy.calib.calibrate import calibrate
    from mllm_deploy.calib.mod import ModOptions
    from mllm_deploy.formats.recipe import save_recipe

    out = {}
    for name, recipe in static_recipes(spec).items():
        out[name] = work / f"recipe-{name.split()[0]}.json"
        out[name].write_text(recipe.to_json())
    layers = ",".join(map(str, range(2, spec.text.num_layers)))
    mod = calibrate(model, ModOptions(plan=f"layers={layers}", capacity=[0.5], router="attention"), log=lambda m: None)
    out["mod attention 0.5"] = work / "recipe-mod.json"
    save_recipe(mod, out["mod attention 0.5"])
    return out


def reference_prefill_ms(model_dir: Path, spec, recipes: dict[str, Path], prompt_tokens: int, device: str,
                         dtype: str, repeats: int) -> dict[str, float]:
    """Median prefill of each recipe's PyTorch reference (the research-code baseline), on ``device``."""
    import torch

    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.models.loading import load_hf_model

    model = load_hf_model(model_dir, dtype=getattr(torch, dtype), attn_implementation="eager").to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_vis, size = spec.visual_tokens, spec.vision.image_size
    text = torch.randint(3, min(spec.text.vocab_size, 1000), (prompt_tokens - n_vis,))
    ids = torch.cat([text[:5], torch.full((n_vis,), spec.image_token_id), text[5:]])[None].to(device)
    pixels = torch.randn(1, 3, size, size, dtype=getattr(torch, dtype), device=device)
    out = {}
    with torch.inference_mode():
        for name, path in recipes.items():
            reference = RecipeReference(model, load_recipe(path))
            features = reference.image_features(pixels)
            times = []
            for run in range(repeats + 1):
                sync()
                start = time.perf_counter()
                reference.prefill(ids, features)
                sync()
                if run:
                    times.append((time.perf_counter() - start) * 1e3)
            out[name] = statistics.median(times)
    del model
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--model", required=True, help="checkpoint directory or built-in name")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    p.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--prompt-tokens", type=int, default=616)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="device memory bandwidth for the decode bound (default: H100/H200 SXM 3350/4800 by name)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.models.registry import load_spec
    from mllm_deploy.runtime.timing import PREFIX_TOKENS, text_params
    from mllm_deploy.tools.bench_worker import measure

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir, spec = load_spec(args.model)
    model = args.model
    if args.layers is not None and args.layers < spec.text.num_layers:
        model_dir = truncated_model(model_dir, args.layers, work)
        model, spec = str(model_dir), load_spec(str(model_dir))[1]
    recipes = make_recipes(model, spec, work)
    device = "cuda" if args.provider == "cuda" else "cpu"
    rows = []
    for name, path in recipes.items():
        bundle = work / f"bundle-{path.stem.removeprefix('recipe-')}"
        if not (bundle / "manifest.json").is_file():
            print(f"export {name} ...", file=sys.stderr)
            small = spec.text.num_layers * spec.text.hidden_size < 10_000  # verify only what PyTorch holds here
            export_bundle(model, bundle, ExportOptions(dtype=args.dtype, recipe=str(path), force=True, verify=small),
                          log=lambda m: print(m, file=sys.stderr))
        result = measure(str(bundle), "onnxruntime", args.prompt_tokens, args.new_tokens, args.repeats, 1,
                         options={"provider": args.provider})
        cost = prefill_cost(spec, load_recipe(path), text_tokens=args.prompt_tokens - spec.visual_tokens,
                            formula="exact", prefix_tokens=PREFIX_TOKENS)
        rows.append({"recipe": name, "bundle": str(bundle), "prefill_ms": result["prefill_ms"]["median"],
                     "decode_ms_per_token": result["decode_ms_per_token"]["median"],
                     "flops_speedup": 1.0 / (1.0 - cost.reduction)})
        print(f"{name}: prefill {rows[-1]['prefill_ms']:.1f} ms, decode {rows[-1]['decode_ms_per_token']:.2f} ms/token",
              file=sys.stderr)
    torch_ms = reference_prefill_ms(model_dir, spec, recipes, args.prompt_tokens, device, args.dtype, args.repeats)
    bytes_per_weight = 2 if args.dtype == "float16" else 4
    read_per_token = text_params(json.loads((Path(rows[0]["bundle"]) / "manifest.json").read_text())["model"]["text"])[1]
    if device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(0)
    else:
        import platform

        device_name = f"cpu ({platform.processor() or platform.machine()})"
    bandwidth = args.bandwidth_gbs or (4800.0 if "H200" in device_name else 3350.0 if "H100" in device_name else None)
    bound = read_per_token * bytes_per_weight / (bandwidth * 1e9) * 1e3 if bandwidth else None
    dense = rows[0]["prefill_ms"]
    print(f"{args.model} ({spec.text.num_layers} layers), {args.dtype}, {args.provider} on {device_name},"
          f" {args.prompt_tokens}-token prompt, median of {args.repeats}")
    print("| recipe | ORT prefill ms | PyTorch prefill ms | ORT realised speedup | FLOPs speedup | realised / FLOPs"
          " | decode ms/token | bandwidth bound ms |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["torch_prefill_ms"] = torch_ms[row["recipe"]]
        row["realised_speedup"] = dense / row["prefill_ms"]
        row["realised_over_flops"] = row["realised_speedup"] / row["flops_speedup"]
        row["decode_bound_ms"] = bound
        print(f"| {row['recipe']} | {row['prefill_ms']:.1f} | {row['torch_prefill_ms']:.1f} |"
              f" {row['realised_speedup']:.2f}x | {row['flops_speedup']:.2f}x | {row['realised_over_flops']:.2f} |"
              f" {row['decode_ms_per_token']:.2f} | {'n/a' if bound is None else f'{bound:.2f}'} |")
    payload = {"model": args.model, "layers": spec.text.num_layers, "dtype": args.dtype, "provider": args.provider,
               "device": device_name, "prompt_tokens": args.prompt_tokens, "bandwidth_gbs": bandwidth, "rows": rows}
    print(json.dumps(payload))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
