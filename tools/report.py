"""report-mllm's work: bench and eval results -> report.md, a self-contained report.html and PNGs.

The report is built once as a list of blocks (headings, paragraphs, lists, tables, figures) and
rendered twice, so the Markdown and the HTML cannot drift apart. Device estimates are a roofline
over the peak figures in ``devices.json`` and are labelled as estimates everywhere they appear; the bytes
each weight scheme stores and reads per token come from tools/device_estimates.py.
The module is longer than 400 lines because its sections (bench and eval tables, plots, device roofline) all
feed that one list of blocks.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mllm_deploy.core.errors import InputFileError, MllmError
from mllm_deploy.core.jsonio import read_json
from mllm_deploy.tools.bench import BENCH_SCHEMA, speedups, visual_summary, weights_scheme

EVAL_SCHEMA = "mllm-deploy/eval@1"
DEVICES_FILE = Path(__file__).with_name("devices.json")
Block = tuple  # ("h1"|"h2"|"p", text) | ("ul", [items]) | ("table", headers, rows) | ("img", file, alt)
REQUIRED = {  # per result, what the report reads
    BENCH_SCHEMA: ("name", "backend", "method", "visual_tokens", "prompt_tokens", "new_tokens", "vision_ms",
                   "prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "kv_cache_bytes",
                   "kv_tokens_per_layer", "prefill_flops", "dense_prefill_flops", "flops_reduction", "peak_rss_mb",
                   "model"),
    EVAL_SCHEMA: ("bundle", "method", "visual_tokens", "accuracy", "ci_low", "ci_high", "flops_reduction"),
}
WEIGHT_SCHEMES = ("float32", "float16", "int8", "int4")  # a bench result's weights_scheme, widest first


def check_optional_bench_fields(result: dict) -> str | None:
    """What is wrong with the fields bench@1 results gained with weight-only quantization (results written before
    carry none of them, and are read as float bundles), or None."""
    scheme = result.get("weights_scheme")
    if scheme is not None and scheme not in WEIGHT_SCHEMES:
        return f"weights_scheme {scheme!r} is not one of {', '.join(WEIGHT_SCHEMES)}"
    quantization = result.get("quantization")
    if quantization is not None and (not isinstance(quantization, dict)
                                     or quantization.get("weights") not in ("int8", "int4")
                                     or (scheme is not None and quantization["weights"] != scheme)):
        return "quantization must be null or an object whose weights (int8 or int4) is the weights_scheme"
    for key in ("bundle_bytes", "weight_bytes"):
        value = result.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key} must be null or a number of bytes, got {value!r}"
    return None


# ---- inputs -------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    bench: list[tuple[Path, dict]]
    eval: list[tuple[Path, dict]]


def load_inputs(paths: list[str]) -> Inputs:
    inputs = Inputs([], [])
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise InputFileError(f"results file not found: {path}")
        payload = read_json(path, MllmError, "results file")
        schema = payload.get("schema") if isinstance(payload, dict) else None
        if schema not in (BENCH_SCHEMA, EVAL_SCHEMA):
            raise MllmError(f"{path} has schema {schema!r}; report-mllm reads {BENCH_SCHEMA} (bench-mllm --json)"
                            f" and {EVAL_SCHEMA} (eval-mllm --json)")
        if not isinstance(payload.get("results"), list) or not payload["results"]:
            raise MllmError(f"{path} holds no results")
        for number, result in enumerate(payload["results"]):
            missing = [key for key in REQUIRED[schema] if not isinstance(result, dict) or key not in result]
            if missing:
                raise MllmError(f"{path}: result {number} lacks {', '.join(missing)}")
            problem = check_optional_bench_fields(result) if schema == BENCH_SCHEMA else None
            if problem:
                raise MllmError(f"{path}: result {number}: {problem}")
        (inputs.bench if schema == BENCH_SCHEMA else inputs.eval).append((path, payload))
    return inputs


# ---- devices and roofline estimates -------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    id: str
    name: str
    mode: str
    peak_flops: float  # dense FP16/BF16 tensor FLOP/s
    bandwidth: float  # bytes/s
    memory_bytes: float
    entry: dict  # the devices.json entry, for its sources and notes


def load_devices(path: str | Path = DEVICES_FILE) -> list[Device]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return [Device(d["id"], d["name"], d.get("mode", ""), float(d["peak_fp16_dense_tflops"]["value"]) * 1e12,
                       float(d["memory_bandwidth_gbs"]["value"]) * 1e9, float(d["memory_gb"]["value"]) * 1e9, d)
                for d in data["devices"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MllmError(f"device table {path} is unreadable: {type(exc).__name__}: {exc}") from None


@dataclass
class Estimate:
    prefill_ms: float
    prefill_bound: str  # "compute" or "memory"
    decode_ms: float
    decode_bound: str
    resident_gb: float  # text weights + KV at the end of decoding
    fits: bool
    weights_read_gb: float = 0.0  # text weights one decode step reads, as the result's weight scheme stores them
    context_gb: float | None = None  # weights + KV cache + activations at a CONTEXT_TOKENS context (needs the geometry)
    context_fits: bool | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return 1e3 / self.decode_ms


def result_weights(result: dict, dtype_bytes: int) -> tuple[int, int]:
    """(text weight bytes one decode step reads, text weight bytes stored) of a bench result, floats in
    ``dtype_bytes`` bytes: from its geometry and weight scheme where it records them (tools/device_estimates.py:
    quantized layers at their stored size), else, as for results written before, from its parameter counts."""
    model = result["model"]
    if "spec" not in model and not result.get("quantization"):
        return model["text_params_read_per_pass"] * dtype_bytes, model["text_params"] * dtype_bytes
    from mllm_deploy.formats.geometry import spec_from_manifest
    from mllm_deploy.tools.device_estimates import scheme_of, weight_bytes

    weights = weight_bytes(spec_from_manifest(model["spec"]), scheme_of(result.get("quantization")), dtype_bytes)
    return weights.text_read, weights.text_stored


def roofline(result: dict, device: Device, dtype_bytes: int) -> Estimate:
    """Lower-bound times: each phase takes at least its FLOPs at peak and its bytes at full bandwidth. Weights
    are read as the result's scheme stores them (a quantized layer at its quantized size); FLOPs do not change."""
    model = result["model"]
    per_token = 2 * model["num_kv_heads"] * model["head_dim"] * dtype_bytes  # K and V, one layer
    kv_prefill = sum(result["kv_tokens_per_layer"]) * per_token
    cached_layers = sum(1 for n in result["kv_tokens_per_layer"] if n)  # a layer without attention (EAS) caches none
    kv_end = kv_prefill + result["new_tokens"] * cached_layers * per_token
    weights, stored = result_weights(result, dtype_bytes)
    prefill = (result["prefill_flops"] / device.peak_flops, (weights + kv_prefill) / device.bandwidth)
    decode = (2 * model["text_params_read_per_pass"] / device.peak_flops, (weights + kv_end) / device.bandwidth)
    resident = stored + kv_end
    context_gb = context_fits = None
    if "spec" in model:
        from mllm_deploy.formats.geometry import spec_from_manifest
        from mllm_deploy.tools.device_estimates import on_device, scheme_of

        fit = on_device(spec_from_manifest(model["spec"]), scheme_of(result.get("quantization")), dtype_bytes, device,
                        visual_kept=result["visual_tokens"])
        context_gb, context_fits = fit.needed / 1e9, fit.fits
    return Estimate(max(prefill) * 1e3, "compute" if prefill[0] >= prefill[1] else "memory",
                    max(decode) * 1e3, "compute" if decode[0] >= decode[1] else "memory",
                    resident / 1e9, resident <= device.memory_bytes, weights / 1e9, context_gb, context_fits)


# ---- sections -----------------------------------------------------------------------------------------
def _f(value, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def machine_line(payload: dict) -> str:
    m, s = payload["machine"], payload["settings"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    threads = f", threads per session: {m['threads']}" if m.get("threads") else ""
    prompts = ", ".join(str(n) for n in sorted({r["prompt_tokens"] for r in payload["results"]}))
    default = "" if s["prompt_tokens"] else " (visual tokens + 40)"
    return (f"Machine: {m['processor']} ({m['cpu_count']} CPUs{threads}{gpu}), {m['platform']}, onnxruntime"
            f" {m['onnxruntime']}. Settings: {s['repeats']} repeats after {s['warmup']} warm-up, {s['new_tokens']}"
            f" new tokens per run, prompt {prompts} tokens{default}. Absolute times hold for this machine only;"
            " compare recipes by the ratios, measured in the same run.")


def float_reference(result: dict, results: list[dict]) -> dict | None:
    """The unquantized bundle (same float type) of the same model, recipe, backend and prompt in the same run."""
    if not result.get("quantization"):
        return None
    for other in results:
        if (not other.get("quantization") and other["backend"] == result["backend"]
                and other["method"] == result["method"] and other["visual_tokens"] == result["visual_tokens"]
                and other["prompt_tokens"] == result["prompt_tokens"]
                and other["model"]["fingerprint"] == result["model"]["fingerprint"]
                and other["model"]["bundle_dtype"] == result["model"]["bundle_dtype"]):
            return other
    return None


def scheme_rows(results: list[dict]) -> list[list[str]]:
    """Weights, memory and decode speed by weight scheme, each model's schemes next to each other (widest first)."""
    def order(r: dict) -> tuple:
        scheme = weights_scheme(r)
        return (r["model"]["fingerprint"], r["method"], str(r["visual_tokens"]), r["backend"], r["prompt_tokens"],
                WEIGHT_SCHEMES.index(scheme) if scheme in WEIGHT_SCHEMES else len(WEIGHT_SCHEMES))

    rows = []
    for r in sorted(results, key=order):
        ref = float_reference(r, results)
        weights, decode = r.get("weight_bytes"), r["decode_ms_per_token"]["median"]
        weight_ratio = weights / ref["weight_bytes"] if ref and weights and ref.get("weight_bytes") else None
        speedup = ref["decode_ms_per_token"]["median"] / decode if ref else None
        rows.append([r["name"], r["backend"], r["method"], weights_scheme(r),
                     _f(r.get("bundle_bytes"), "{:,}"), _f(weights, "{:,}"), _f(weight_ratio, "{:.2f}×"),
                     f"{r['peak_rss_mb']:.0f}", f"{decode:.3f}", f"{1000.0 / decode:.1f}", _f(speedup, "{:.2f}×")])
    return rows


def bench_section(path: Path, payload: dict, out_dir: Path, suffix: str) -> list[Block]:
    from mllm_deploy.tools import report_plots as plots

    results = payload["results"]
    latency, cost = [], []
    for r in results:
        s = speedups(r, results) or {}
        p = r["prefill_ms"]
        latency.append([r["name"], r["backend"], r["method"], visual_summary(r["visual_tokens"]),
                        f"{r['vision_ms']['median']:.1f}", f"{p['median']:.1f} ({p['min']:.1f}–{p['max']:.1f})",
                        f"{r['ttft_ms']['median']:.1f}", f"{r['decode_ms_per_token']['median']:.2f}",
                        f"{r['tokens_per_s']:.1f}", _f(s.get("prefill"), "{:.2f}×"), _f(s.get("flops"), "{:.2f}×"),
                        _f(s.get("efficiency"), "{:.2f}")])
        cost.append([r["name"], r["backend"], f"{r['kv_cache_bytes'] / 2**20:.3f}", f"{r['prefill_flops'] / 1e9:.3f}",
                     f"{r['flops_reduction']:.1%}", f"{r['peak_rss_mb']:.0f}", _f(r.get("peak_device_mb"), "{:.0f}"),
                     _f(r.get("routing_share"), "{:.1%}"), _f(r.get("decode_overhead_share"), "{:.1%}")])
    subtitle = f"{payload['machine']['processor']}, {payload['machine']['cpu_count']} CPUs ({path.name})"
    figures = [
        ("Prefill latency", plots.prefill_latency(results, out_dir / f"prefill_latency{suffix}.png", subtitle)),
        ("Speedup vs FLOPs", plots.speedup_vs_flops(results, out_dir / f"speedup_vs_flops{suffix}.png", subtitle)),
        ("Decode throughput", plots.decode_throughput(results, out_dir / f"decode_throughput{suffix}.png", subtitle)),
        ("KV-cache memory", plots.kv_cache(results, out_dir / f"kv_cache{suffix}.png", subtitle)),
    ]
    blocks: list[Block] = [
        ("h2", f"Measured latency and memory ({path.name})"), ("p", machine_line(payload)),
        ("table", ["bundle", "backend", "method", "visual tokens", "vision ms", "prefill ms median (min–max)",
                   "TTFT ms", "decode ms/token", "tokens/s", "prefill speedup vs dense", "FLOPs speedup",
                   "measured / FLOPs"], latency),
        ("table", ["bundle", "backend", "KV MiB after prefill", "prefill GFLOPs", "FLOPs reduction", "peak RSS MB",
                   "peak device MB", "routing share of prefill", "decode runtime overhead"], cost),
        ("p", "By weight scheme (float32/float16: float weights; int8/int4: weight-only quantized text linear"
              " layers, export-mllm --quantize): bundle size is every file of the bundle directory, weight bytes the"
              " weights file alone; ratios are to the float bundle of the same model, recipe, backend and prompt"
              " measured in the same run."),
        ("table", ["bundle", "backend", "method", "scheme", "bundle bytes", "weight bytes", "weights vs float",
                   "peak RSS MB", "decode ms/token", "decode tokens/s", "decode speedup vs float"],
         scheme_rows(results)),
        ("p", "Speedups are ratios to the dense bundle of the same model, backend and prompt measured in the same"
              " run; measured / FLOPs is the headline efficiency of a recipe on a backend (1.0: the saving in"
              " FLOPs became an equal saving in time). Routing share: kernel time of the ranking and selection"
              " nodes in one profiled prefill. Decode runtime overhead: share of a decode step spent outside the"
              " inference session (feeds, KV-cache writes)."),
    ]
    if figures[1][1] is None:
        blocks.append(("p", "No dense bundle was measured in this run, so there is no speedup figure."))
    blocks += [("img", fig.name, alt) for alt, fig in figures if fig is not None]
    return blocks


def eval_section(inputs: Inputs, out_dir: Path) -> list[Block]:
    from mllm_deploy.tools import report_plots as plots

    blocks: list[Block] = [("h2", "Accuracy")]
    series = []
    for path, payload in inputs.eval:
        rows = [[Path(r["bundle"]).name, r["method"], visual_summary(r["visual_tokens"]),
                 f"{r['accuracy']:.1%} ({r['ci_low']:.1%}–{r['ci_high']:.1%})", _f(r.get("agreement"), "{:.1%}"),
                 _f(r.get("mean_kl"), "{:.4f}"), f"{r['flops_reduction']:.1%}"] for r in payload["results"]]
        blocks += [("p", f"{path.name}: dataset {payload.get('dataset', '?')}, {payload.get('questions', '?')} questions."),
                   ("table", ["bundle", "method", "visual tokens", "accuracy (95% CI)", "agreement with dense",
                              "KL vs dense", "FLOPs reduction"], rows)]
        series.append((f"{payload.get('dataset', path.stem)} ({path.name})", payload["results"]))
    figure = plots.accuracy_vs_flops(series, out_dir / "accuracy_vs_flops.png")
    return blocks + [("img", figure.name, "Accuracy vs FLOPs reduction")]


def device_section(inputs: Inputs, devices: list[Device], dtype_bytes: int, devices_path: Path) -> list[Block]:
    from mllm_deploy.tools.device_estimates import CONTEXT_TOKENS

    recipes: dict[tuple, dict] = {}
    for _path, payload in inputs.bench:  # estimates depend on the recipe, scheme and prompt, not on the backend
        for r in payload["results"]:
            recipes.setdefault((r["name"], r["prompt_tokens"], r["model"]["fingerprint"], weights_scheme(r)), r)
    rows = []
    for r in recipes.values():
        for device in devices:
            e = roofline(r, device, dtype_bytes)
            context_fits = None if e.context_fits is None else ("yes" if e.context_fits else "NO")
            rows.append([r["name"], weights_scheme(r), str(r["prompt_tokens"]), device.name, f"{e.prefill_ms:.3g}",
                         e.prefill_bound, f"{e.weights_read_gb:.3g}", f"{e.decode_ms:.3g}",
                         f"{e.decode_tokens_per_s:.3g}", e.decode_bound, f"{e.resident_gb:.3g}",
                         "yes" if e.fits else "NO", _f(e.context_gb, "{:.3g}"), _f(context_fits, "{}")])
    device_rows = [[d.name, d.mode, f"{d.peak_flops / 1e12:g}", f"{d.bandwidth / 1e9:g}", f"{d.memory_bytes / 1e9:g}"]
                   for d in devices]
    sources = []
    for d in devices:
        parts = [f"{label}: {d.entry[key]['source']['document']} <{d.entry[key]['source']['url']}>"
                 for key, label in (("peak_fp16_dense_tflops", "FLOP/s"), ("memory_bandwidth_gbs", "bandwidth"),
                                    ("memory_gb", "memory"))]
        derivation = d.entry['peak_fp16_dense_tflops']['derivation'].rstrip('.')
        sources.append(f"{d.name}: {derivation}. Sources: " + "; ".join(parts))
    return [
        ("h2", "Device estimates (roofline, not measurements)"),
        ("p", "These numbers are NOT measured: they are lower bounds from vendor peak figures, for the text model"
              " of each measured recipe at its benchmarked prompt length. Real engines reach a fraction of peak."),
        ("ul", ["prefill time ≥ max(prefill FLOPs / peak FLOP/s, (weight bytes + KV bytes after prefill) / bandwidth)",
                "decode time per token ≥ max(2 × weights read per token / peak FLOP/s, (weight bytes + KV bytes at"
                " the end of decoding) / bandwidth)",
                f"float weights and KV cache in {dtype_bytes}-byte elements (--device-dtype-bytes), whatever the"
                " bundle's dtype; weights read per token = text-model weights less the input-embedding table (a lookup"
                " reads one row); in an int8/int4 bundle its quantized linear layers count at their stored size"
                f" (integers and scales, the scales in {dtype_bytes}-byte elements), the LM head and the embeddings"
                " stay float unless quantized",
                "decode tokens/s (est.) = 1000 / decode ms per token (est.): an upper bound",
                "prefill FLOPs from the exact FLOPs model (every matrix product of the prefill graph); the vision"
                " tower, norms, softmax and attention FLOPs of decode are not counted",
                "peak FLOP/s is dense FP16/BF16 tensor-core throughput; several figures are derived from sparse"
                " INT8/FP4 ratings (see the device table)",
                "'fits' compares text weights + final KV cache with the device memory; 'fits at"
                f" {CONTEXT_TOKENS} tokens' compares all weights as stored (text and vision tower) + the KV cache of a"
                f" {CONTEXT_TOKENS}-token context + the activations of its prefill (core/memory.py's estimate); on"
                " Jetson that memory is shared with the CPU and the OS, so the real margin is smaller",
                f"device figures: {devices_path.name} (sources below)"]),
        ("table", ["recipe", "scheme", "prompt tokens", "device", "prefill ms (est.)", "prefill bound",
                   "weights read per token [GB] (est.)", "decode ms/token (est.)", "decode tokens/s (est.)",
                   "decode bound", "text weights + KV [GB]", "fits",
                   f"weights + KV + activations at {CONTEXT_TOKENS} tokens [GB] (est.)",
                   f"fits at {CONTEXT_TOKENS} tokens (est.)"], rows),
        ("table", ["device", "mode", "dense FP16 TFLOP/s", "bandwidth GB/s", "memory GB"], device_rows),
        ("p", f"Where each figure comes from (and how it was checked: see 'checked' in {devices_path.name}):"),
        ("ul", sources),
    ]


def llava7b_section(devices: list[Device]) -> list[Block]:
    """LLaVA-1.5-7B by weight scheme on every device: what quantization buys, from the geometry alone."""
    from mllm_deploy.tools.device_estimates import LLAVA7B_NOTE, llava7b_headers, llava7b_rows

    return [("h2", "LLaVA-1.5-7B by weight scheme (estimates, bandwidth bound, not measurements)"),
            ("p", LLAVA7B_NOTE), ("table", llava7b_headers(), llava7b_rows(devices))]


# ---- rendering ----------------------------------------------------------------------------------------
def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
            out.append("\n".join([cells(block[1]), "|" + "---|" * len(block[1])] + [cells(r) for r in block[2]]))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;"
       "text-align:left}th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}"
       "img{max-width:100%;display:block;margin:1em 0;border:1px solid #eee}h2{border-bottom:1px solid #ddd}"
       "p,li{line-height:1.45}")


def _links(escaped: str) -> str:
    """``&lt;https://...&gt;`` in already escaped text as an anchor (the URL itself stays escaped)."""
    import re

    return re.sub(r"&lt;(https?://[^\s&]+(?:&amp;[^\s&]+)*)&gt;", r'<a href="\1">\1</a>', escaped)


def to_html(blocks: list[Block], out_dir: Path, title: str) -> str:
    e = html.escape
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "ul":  # a source's <https://...> becomes a link
            body.append("<ul>" + "".join(f"<li>{_links(e(item))}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":  # embedded, so the one file can be mailed or attached to an issue
            data = base64.b64encode((out_dir / block[1]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{e(block[2])}" src="data:image/png;base64,{data}">')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(paths: list[str], out_dir: str | Path, dtype_bytes: int = 2,
                 devices_path: Path = DEVICES_FILE) -> list[Path]:
    """Write report.md, report.html and the PNGs into ``out_dir``; returns the files written."""
    if dtype_bytes not in (1, 2, 4):
        raise MllmError(f"--device-dtype-bytes must be 1, 2 or 4, got {dtype_bytes}")
    inputs = load_inputs(paths)
    devices = load_devices(devices_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputFileError(f"-o {out} is a file; give a directory for the report")
    # Built in a temporary directory beside the target and moved in file by file at the end, so a
    # failure leaves neither a half report nor an empty directory; other files in -o are left alone.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    try:
        try:
            names = _render(paths, inputs, devices, dtype_bytes, devices_path, tmp)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as exc:
            files = ", ".join(Path(p).name for p in paths)
            raise MllmError(f"results in {files} are malformed ({type(exc).__name__}: {exc}); give files written"
                            " by bench-mllm --json or eval-mllm --json") from exc
        out.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names]


def _render(paths: list[str], inputs: Inputs, devices: list[Device], dtype_bytes: int, devices_path: Path,
            out: Path) -> list[str]:
    """Write the report's files into ``out``; returns their names (report.md, report.html, figures)."""
    title = "mllm-deploy report"
    blocks: list[Block] = [("h1", title), ("p", "Made by report-mllm from " + ", ".join(Path(p).name for p in paths) + ".")]
    for index, (path, payload) in enumerate(inputs.bench):
        blocks += bench_section(path, payload, out, "" if len(inputs.bench) == 1 else f"_{index + 1}")
    if inputs.eval:
        blocks += eval_section(inputs, out)
    if inputs.bench:
        blocks += device_section(inputs, devices, dtype_bytes, devices_path)
    else:
        blocks.append(("p", "No bench-mllm results were given, so there are no device estimates for measured"
                            " bundles."))
    blocks += llava7b_section(devices)
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, out, title), encoding="utf-8")
    return ["report.md", "report.html"] + [b[1] for b in blocks if b[0] == "img"]
