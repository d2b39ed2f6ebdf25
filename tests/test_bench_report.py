"""bench-mllm and report-mllm on tiny bundles: the bench@1 schema, field sanity, the torch baseline,
the report's files, the device table, bad input, and --help without torch."""

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


@pytest.mark.parametrize("make", ["other_schema", "missing", "not_json"])
def test_report_refuses_bad_input_with_one_line(tmp_path, make):
    path = tmp_path / "in.json"
    if make == "other_schema":
        path.write_text(json.dumps({"schema": "mllm-deploy/recipe@1", "results": []}))
    elif make == "not_json":
        path.write_text("{nope")
    proc = run_cli("report-mllm", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("report-mllm: error:"), proc.stderr
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
            "import mllm_deploy.tools.bench, mllm_deploy.tools.report\n"
            f"import {module} as m\n"
            "try:\n    m.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print([n for n in ('torch', 'transformers', 'onnxruntime', 'matplotlib') if sys.modules.get(n)])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"
