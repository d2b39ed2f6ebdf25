"""bench-mllm and report-mllm on tiny bundles: the bench@1 schema, field sanity, the torch baseline,
the report's files, the device table, weight schemes side by side and the LLaVA-1.5-7B estimates by scheme,
bad input, and --help without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPREADS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")
RESULT_FIELDS = {"bundle", "name", "backend", "method", "visual_tokens", "prompt_tokens", "new_tokens", *SPREADS,
                 "tokens_per_s", "kv_cache_bytes", "kv_cache_bytes_per_layer", "prefill_flops", "flops_reduction",
                 "peak_rss_mb", "peak_device_mb", "routing_share", "decode_overhead_share"}
FAST = ["--repeats", "2", "--warmup", "1", "--new-tokens", "4"]


@pytest.fixture(scope="module")
def bench_run(tiny_bundles, pruned_bundles, tmp_path_factory):
    """One bench of the dense and the FastV bundle of the same tiny model, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    dense, fastv = tiny_bundles["gqa56"], pruned_bundles("gqa56", "fastv", "native")
    proc = run_cli("bench-mllm", str(dense), str(fastv), *FAST, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def check_result(r: dict, backend: str) -> None:
    assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
    assert r["backend"] == backend and r["new_tokens"] == 4
    for key in SPREADS:
        assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"], key
    assert r["ttft_ms"]["median"] >= r["prefill_ms"]["median"]
    assert r["tokens_per_s"] == pytest.approx(1000 / r["decode_ms_per_token"]["median"])
    assert r["kv_cache_bytes"] == sum(r["kv_cache_bytes_per_layer"]) > 0
    assert len(r["kv_cache_bytes_per_layer"]) == len(r["visual_tokens"])
    assert r["prefill_flops"] > 0 and 0 <= r["flops_reduction"] < 1 and r["peak_rss_mb"] > 10


@pytest.mark.slow
def test_bench_json_schema_and_sanity(bench_run):
    proc, payload = bench_run
    assert payload["schema"] == "mllm-deploy/bench@1"
    assert {"platform", "cpu_count", "processor", "onnxruntime", "gpu"} <= set(payload["machine"])
    assert payload["settings"]["repeats"] == 2 and payload["settings"]["new_tokens"] == 4
    dense, fastv = payload["results"]
    for r in (dense, fastv):
        check_result(r, "onnxruntime")
        assert r["prompt_tokens"] == r["visual_tokens"][0] + 40  # the default prompt length
        assert 0 <= r["decode_overhead_share"] <= 1
        assert r["peak_device_mb"] is None  # no GPU on the onnxruntime CPU path
    assert (dense["method"], fastv["method"]) == ("dense", "fastv")
    assert fastv["kv_cache_bytes"] < dense["kv_cache_bytes"]
    assert fastv["prefill_flops"] < dense["prefill_flops"] and dense["flops_reduction"] == 0
    assert dense["routing_share"] == 0
    assert 0 < fastv["routing_share"] <= 1
    # the printed table names the machine and gives the dense bundle's own ratio
    assert payload["machine"]["processor"] in proc.stdout
    assert "| 1.00x |" in proc.stdout and "prefill speedup vs dense" in proc.stdout


@pytest.mark.slow
def test_bench_torch_backend_gives_the_same_schema(tiny_bundles, tmp_path):
    out = tmp_path / "torch.json"
    proc = run_cli("bench-mllm", str(tiny_bundles["gqa56"]), "--backend", "torch", *FAST, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload["schema"] == "mllm-deploy/bench@1"
    (r,) = payload["results"]
    check_result(r, "torch")
    assert r["routing_share"] is None and r["decode_overhead_share"] is None
    on_gpu = r["device"] != "cpu"  # the reference runs on CUDA in float16 when torch sees a GPU
    assert r["run_dtype"] == ("float16" if on_gpu else "float32")
    assert (r["peak_device_mb"] > 0) if on_gpu else r["peak_device_mb"] is None


@pytest.fixture(scope="module")
def scheme_bench(tiny_model_dirs, tmp_path_factory):
    """The gqa56 tiny model exported as float32 and as int4 (not verified: export-mllm's own tests verify it),
    measured in one bench-mllm run."""
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("schemes")
    bundles = {name: export_bundle(str(tiny_model_dirs["gqa56"]), root / name,
                                   ExportOptions(verify=False, quantize=quantize), log=lambda m: None)
               for name, quantize in (("float32", None), ("int4", "int4"))}
    out = root / "bench.json"
    proc = run_cli("bench-mllm", *(str(b) for b in bundles.values()), *FAST, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text()), bundles


def tiny_linears(text: dict) -> list[tuple[int, int]]:
    """[K, N] of the quantized linear weights of one decoder layer (qkv, o, gate, up, down), written out here
    rather than taken from tools/device_estimates.py, which the tests check."""
    d, q, kv, inter = text["hidden_size"], text["num_heads"] * text["head_dim"], \
        text["num_kv_heads"] * text["head_dim"], text["intermediate_size"]
    return [(d, q + 2 * kv), (q, d), (d, inter), (d, inter), (inter, d)]


def test_bench_result_carries_weight_scheme_and_sizes(scheme_bench):
    proc, payload, bundles = scheme_bench
    by_scheme = {r["weights_scheme"]: r for r in payload["results"]}
    assert sorted(by_scheme) == ["float32", "int4"]
    for scheme, r in by_scheme.items():
        check_result(r, "onnxruntime")
        path = bundles[scheme]
        manifest = json.loads((path / "manifest.json").read_text())
        assert r["quantization"] == manifest.get("quantization")
        assert r["weight_bytes"] == (path / "weights.bin").stat().st_size
        files = [f for f in path.rglob("*") if f.is_file() and f.name != ".verified.json"]
        assert r["bundle_bytes"] == sum(f.stat().st_size for f in files) > r["weight_bytes"]
        assert r["model"]["spec"] == manifest["model"] and r["model"]["bundle_dtype"] == "float32"
    float32, int4 = by_scheme["float32"], by_scheme["int4"]
    assert float32["quantization"] is None
    assert int4["quantization"]["weights"] == "int4" and int4["quantization"]["block_size"] == 64
    # the int4 file is smaller by exactly the text linear layers: float32 -> half a byte each + a float32 scale
    # per block of 64 input rows
    text = int4["model"]["spec"]["text"]
    saved = text["num_layers"] * sum(k * n * 4 - (k * n // 2 + k // 64 * n * 4) for k, n in tiny_linears(text))
    assert float32["weight_bytes"] - int4["weight_bytes"] == saved
    # bench-mllm's own table names the scheme of each row
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| float32", "| int4"))]
    assert [row.split(" | ")[3] for row in rows] == ["float32", "int4"]


def report_table(md: str, first_headers: str) -> list[dict]:
    """The rows of the Markdown table whose header line starts with ``first_headers``, as dicts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_headers))
    headers = [h.strip() for h in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, [c.strip() for c in line.strip("|").split(" | ")])))
    return rows


def test_report_compares_weight_schemes(scheme_bench, tmp_path):
    _, payload, _ = scheme_bench
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(payload))
    proc = run_cli("report-mllm", str(bench), "-o", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| scheme | bundle bytes | weight bytes |" in md
    by_scheme = {r["weights_scheme"]: r for r in payload["results"]}
    rows = report_table(md, "| bundle | backend | method | scheme |")
    assert [row["scheme"] for row in rows] == ["float32", "int4"]  # the model's schemes next to each other
    for row in rows:
        r = by_scheme[row["scheme"]]
        assert row["bundle bytes"] == f"{r['bundle_bytes']:,}" and row["weight bytes"] == f"{r['weight_bytes']:,}"
        assert row["peak RSS MB"] == f"{r['peak_rss_mb']:.0f}"
        assert row["decode tokens/s"] == f"{1000 / r['decode_ms_per_token']['median']:.1f}"
    float32, int4 = by_scheme["float32"], by_scheme["int4"]
    assert rows[1]["weights vs float"] == f"{int4['weight_bytes'] / float32['weight_bytes']:.2f}×"
    assert rows[1]["decode speedup vs float"] == (
        f"{float32['decode_ms_per_token']['median'] / int4['decode_ms_per_token']['median']:.2f}×")
    assert rows[0]["weights vs float"] == "–"
    # device estimates read the int4 layers at their quantized size: FP16 floats and scales, blocks of 64
    text = int4["model"]["spec"]["text"]
    linears = tiny_linears(text)
    quantized = text["num_layers"] * sum(k * n for k, n in linears)
    read_float = int4["model"]["text_params_read_per_pass"] * 2
    read_int4 = read_float - 2 * quantized + text["num_layers"] * sum(k * n // 2 + k // 64 * n * 2 for k, n in linears)
    estimates = {(row["scheme"], row["device"]): row
                 for row in report_table(md, "| recipe | scheme | prompt tokens | device |")}
    for scheme, expected in (("float32", read_float), ("int4", read_int4)):
        row = estimates[scheme, "Jetson Orin Nano 8GB (Super mode)"]
        assert row["weights read per token [GB] (est.)"] == f"{expected / 1e9:.3g}"
        assert float(row["decode tokens/s (est.)"]) == pytest.approx(1000 / float(row["decode ms/token (est.)"]),
                                                                     rel=1e-2)  # both printed to 3 digits
        assert row["fits at 1024 tokens (est.)"] == "yes"
    assert float(estimates["int4", "Jetson Orin Nano 8GB (Super mode)"]["decode tokens/s (est.)"]) > \
        1.5 * float(estimates["float32", "Jetson Orin Nano 8GB (Super mode)"]["decode tokens/s (est.)"])
    # and the LLaVA-1.5-7B table by scheme, labelled as estimates
    assert "LLaVA-1.5-7B by weight scheme (estimates, bandwidth bound, not measurements)" in md
    llava = {(row["device"], row["weights"]): row for row in report_table(md, "| device | weights |")}
    assert llava["Jetson Orin Nano 8GB (Super mode)", "INT4"]["fits (1024 tokens, est.)"] == "yes"
    assert llava["Jetson Orin Nano 8GB (Super mode)", "FP16"]["fits (1024 tokens, est.)"] == "NO"
    assert {device for device, _ in llava} >= {"Jetson Orin Nano 8GB (Super mode)", "Jetson AGX Orin 64GB",
                                               "Jetson AGX Thor (T5000 module)"}


def test_llava7b_int4_fits_an_orin_nano_and_decodes_over_3x_faster_than_fp16():
    from mllm_deploy.tools.device_estimates import llava7b_estimates
    from mllm_deploy.tools.report import load_devices

    devices = {d.id: d for d in load_devices()}
    estimates = {(d.id, label): e for d, label, e in llava7b_estimates(list(devices.values()))}
    nano = "jetson-orin-nano-8gb-super"
    assert estimates[nano, "INT4"].fits and not estimates[nano, "FP16"].fits
    assert not estimates[nano, "INT8"].fits  # 7.65 GB of weights + 1k-token KV + activations: just over 8 GB
    # today's separate prefill and decode engines each hold the decoder: INT4 then needs the 16 GB Orin NX
    int4 = estimates[nano, "INT4"]
    assert int4.needed_as_built == int4.needed + int4.text_weights and not int4.fits_as_built
    assert estimates["jetson-orin-nx-16gb", "INT4"].fits_as_built
    for device in ("jetson-orin-nano-8gb-super", "jetson-agx-orin-64gb", "jetson-agx-thor-t5000"):
        fp16, int8, int4 = (estimates[device, label] for label in ("FP16", "INT8", "INT4"))
        assert fp16.tokens_per_s == pytest.approx(devices[device].bandwidth / fp16.read_per_token)
        assert 3 < int4.tokens_per_s / fp16.tokens_per_s < 4  # the text weights dominate what a token reads
        assert fp16.tokens_per_s < int8.tokens_per_s < int4.tokens_per_s
    fp16, int4 = estimates[nano, "FP16"], estimates[nano, "INT4"]
    # 32 layers x (qkv 4096x12288 + o 4096x4096 + gate, up, down 3x4096x11008) = 6,476,005,376 weights, each
    # 2 bytes in FP16 and 0.5 byte + one 2-byte scale per 64 in INT4: 1.46875 bytes less; the rest stays FP16
    assert fp16.read_per_token - int4.read_per_token == fp16.weights - int4.weights == 9_511_632_896
    kv_1k = 32 * 2 * 4096 * 2 * 1024  # K and V of 32 layers, FP16, 1024 tokens
    assert fp16.kv_cache == int4.kv_cache == kv_1k
    embeddings = 32064 * 4096 * 2  # the input table, gathered (one row per token), is not read per token
    vision = fp16.weights - fp16.read_per_token + kv_1k - embeddings
    assert 0.6e9 < vision < 0.7e9  # CLIP ViT-L/14-336 and the projector: about 0.32 B parameters in FP16
    assert int4.needed == int4.weights + kv_1k + int4.activations < 8e9 < fp16.needed


def test_device_estimates_cli_prints_the_7b_table_and_refuses_a_bad_context():
    proc = subprocess.run([sys.executable, "-m", "mllm_deploy.tools.device_estimates_cli", "--context", "2048"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ESTIMATES, not measurements" in proc.stdout and "at 2048 tokens" in proc.stdout
    assert proc.stdout.count("| INT4 |") == 5 and proc.stdout.count("| FP16 |") == 5
    bad = subprocess.run([sys.executable, "-m", "mllm_deploy.tools.device_estimates_cli", "--context", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["device-estimates: error: --context must be a positive number of"
                                               " tokens, got 0"]


def test_routing_share_of_a_profile():
    from mllm_deploy.tools.bench_worker import routing_share_of_profile

    events = [
        {"cat": "Node", "name": "/model/layers.1/rank/VisualScore/Softmax_kernel_time", "dur": 10, "args": {}},
        {"cat": "Node", "name": "x", "dur": 20, "args": {"node_name": "/model/layers.2/route/TopK", "op_name": "TopK"}},
        {"cat": "Node", "name": "/model/layers.2/Select_kernel_time", "dur": 5, "args": {"op_name": "TokenSelect"}},
        {"cat": "Node", "name": "/model/layers.0/attn/MatMul_kernel_time", "dur": 65, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "dur": 1000},
    ]
    assert routing_share_of_profile(events) == pytest.approx(0.35)
    assert routing_share_of_profile([]) == 0.0


def write_eval_json(path, bundles) -> None:
    rows = [("dense", 0.80, 0.0), ("fastv", 0.76, 0.17), ("vtw", 0.60, 0.41)]
    path.write_text(json.dumps({
        "schema": "mllm-deploy/eval@1", "dataset": "shapes-vqa:test:50", "questions": 50,
        "results": [{"bundle": f"{bundles}/{name}", "method": name, "visual_tokens": [49, 49, 24, 24], "n": 50,
                     "accuracy": acc, "ci_low": acc - 0.1, "ci_high": min(acc + 0.1, 1.0), "agreement": 0.9,
                     "mean_kl": 0.01, "flops_reduction": red, "prefill_ms_median": 3.0, "reference": "dense"}
                    for name, acc, red in rows]}))


def check_report_dir(out, pngs: set[str]) -> str:
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert {p.name for p in out.glob("*.png")} == pngs
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1024, png.name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "<img" in html and 'src="prefill' not in html  # embedded, not linked
    return (out / "report.md").read_text()


def test_report_from_bench_and_eval(bench_run, tmp_path):
    _, payload = bench_run
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(payload))
    evaluation = tmp_path / "eval.json"
    write_eval_json(evaluation, tmp_path)
    proc = run_cli("report-mllm", str(bench), str(evaluation), "-o", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    md = check_report_dir(tmp_path / "report", {"prefill_latency.png", "speedup_vs_flops.png",
                                                "decode_throughput.png", "kv_cache.png", "accuracy_vs_flops.png"})
    assert "Device estimates (roofline, not measurements)" in md
    assert payload["machine"]["processor"] in md  # absolute times are quoted with their machine
    assert "Jetson AGX Orin 64GB" in md and "devices.json" in md
    assert "80.0% (70.0%–90.0%)" in md  # the eval table shows the file's accuracy and interval
    page = (tmp_path / "report" / "report.html").read_text()
    assert '<a href="https://www.nvidia.com/' in page and "&lt;https://" not in page  # sources are links


def test_report_from_eval_alone(tmp_path):
    evaluation = tmp_path / "eval.json"
    write_eval_json(evaluation, tmp_path)
    proc = run_cli("report-mllm", str(evaluation), "-o", str(tmp_path / "only-eval"))
    assert proc.returncode == 0, proc.stderr
    md = check_report_dir(tmp_path / "only-eval", {"accuracy_vs_flops.png"})
    assert "no device estimates" in md


def test_devices_table_has_numbers_and_sources():
    from mllm_deploy.tools.report import DEVICES_FILE, load_devices

    devices = load_devices()
    assert {d.id for d in devices} == {"jetson-orin-nano-8gb-super", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
                                       "jetson-agx-thor-t5000", "h100-sxm"}
    for d in devices:
        assert d.peak_flops > 1e12 and d.bandwidth > 1e10 and d.memory_bytes > 1e9, d.id
        for key in ("peak_fp16_dense_tflops", "memory_bandwidth_gbs", "memory_gb"):
            figure = d.entry[key]
            assert isinstance(figure["value"], (int, float)) and figure["value"] > 0
            assert figure["source"]["document"] and figure["source"]["url"].startswith("https://"), (d.id, key)
            assert figure["checked"], (d.id, key)
        assert d.entry["peak_fp16_dense_tflops"]["derivation"]
    assert json.loads(DEVICES_FILE.read_text())["schema"] == "mllm-deploy/devices@1"


def test_roofline_takes_the_slower_of_compute_and_memory():
    from mllm_deploy.tools.report import Device, roofline

    result = {"prefill_flops": 2e12, "new_tokens": 10, "kv_tokens_per_layer": [100, 50],
              "model": {"num_kv_heads": 1, "head_dim": 4, "num_layers": 2, "text_params": 2e9,
                        "text_params_read_per_pass": 1e9}}
    device = Device("d", "d", "", peak_flops=1e12, bandwidth=1e9, memory_bytes=3e9, entry={})
    e = roofline(result, device, dtype_bytes=2)
    kv_prefill, kv_end = 150 * 16, (150 + 20) * 16
    assert e.prefill_ms == pytest.approx(max(2.0, (2e9 + kv_prefill) / 1e9) * 1e3) and e.prefill_bound == "memory"
    assert e.decode_ms == pytest.approx((2e9 + kv_end) / 1e9 * 1e3) and e.decode_bound == "memory"
    assert not e.fits  # 4 GB of weights do not fit in 3 GB


@pytest.mark.parametrize("make", ["other_schema", "missing", "not_json", "bad_scheme"])
def test_report_refuses_bad_input_with_one_line(tmp_path, make):
    from mllm_deploy.tools.report import REQUIRED

    path = tmp_path / "in.json"
    if make == "bad_scheme":
        result = {**{key: 1 for key in REQUIRED["mllm-deploy/bench@1"]}, "weights_scheme": "int3"}
        path.write_text(json.dumps({"schema": "mllm-deploy/bench@1", "machine": {}, "settings": {},
                                    "results": [result]}))
    elif make == "other_schema":
        path.write_text(json.dumps({"schema": "mllm-deploy/recipe@1", "results": []}))
    elif make == "not_json":
        path.write_text("{nope")
    proc = run_cli("report-mllm", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("report-mllm: error:"), proc.stderr
    assert make != "bad_scheme" or "weights_scheme 'int3' is not one of" in lines[0]
    assert not (tmp_path / "out" / "report.md").exists()


def test_bench_refuses_bad_input_with_one_line(tmp_path, tiny_bundles):
    for args in ([str(tmp_path / "no-bundle")], [str(tiny_bundles["gqa56"]), "--new-tokens", "1"],
                 [str(tiny_bundles["gqa56"]), "--prompt-tokens", "10"]):
        proc = run_cli("bench-mllm", *args)
        assert proc.returncode == 1, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bench-mllm: error:"), proc.stderr


@pytest.mark.parametrize("module", ["mllm_deploy.tools.bench_cli", "mllm_deploy.tools.report_cli"])
def test_help_imports_no_torch(module):
    code = ("import sys; sys.modules['torch'] = None\n"
            "import mllm_deploy.tools.bench, mllm_deploy.tools.report, mllm_deploy.tools.device_estimates as d\n"
            "d.llava7b_estimates(mllm_deploy.tools.report.load_devices())\n"
            f"import {module} as m\n"
            "try:\n    m.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print([n for n in ('torch', 'transformers', 'onnxruntime', 'matplotlib') if sys.modules.get(n)])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"
