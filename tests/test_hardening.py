"""Runtime robustness and limits: NaN/Inf logits are caught with the step named, Ctrl-C leaves a
pipeline reusable (and the CLI exits 130 with one line), repeated requests on one pipeline give
identical results, the context length and a memory budget are checked before anything loads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import VENV_BIN, make_image, run_cli
from mllm_deploy.core.errors import MemoryLimitError, MllmError, NumericalError, PromptError

PROMPTS = ("Why?", "What is this?", "Describe the image.", "a", "count")


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["gqa56"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    return [make_image(root / f"{i}.png", size=(40 + 17 * i, 70 - 9 * i), seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def pipe(bundle):
    from mllm_deploy.runtime.pipeline import Pipeline

    with Pipeline.load(bundle) as pipeline:
        yield pipeline


# ---- NaN / Inf ------------------------------------------------------------------------------------------
def poison_rope(source: Path, target: Path, positions: list[int]) -> Path:
    """A copy of ``source`` whose RoPE cos table holds NaN at ``positions`` (real weights, real graphs);
    the manifest's sha256 is updated so the bundle loads and the NaN reaches the logits."""
    import onnx

    from mllm_deploy.core.hashing import sha256_file

    shutil.copytree(source, target)
    tables = []  # the portable graphs' table and the onnxruntime graphs' half-width cache
    for name, table_name in (("decode.onnx", "rope.cos"), ("decode.ort.onnx", "rope.cos_cache")):
        if (target / name).is_file():
            graph = onnx.load(str(target / name), load_external_data=False)
            tables.append(next(t for t in graph.graph.initializer if t.name == table_name))
    assert len(tables) == 2  # the test bundle has both graph sets: both must see the NaN
    for table in tables:
        where = {e.key: e.value for e in table.external_data}
        assert table.data_type == onnx.TensorProto.FLOAT
        width = table.dims[1]
        with open(target / where["location"], "r+b") as handle:
            for position in positions:
                handle.seek(int(where["offset"]) + position * width * 4)
                handle.write(np.full(width, np.nan, np.float32).tobytes())
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"][where["location"]] = sha256_file(target / where["location"])
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_nan_in_prefill_is_reported(bundle, images, tmp_path):
    from mllm_deploy.runtime.pipeline import Pipeline

    with Pipeline.load(poison_rope(bundle, tmp_path / "nan", [0])) as poisoned:
        with pytest.raises(NumericalError, match=r"NaN logits at prefill \(a 4-layer float32 bundle\)"):
            poisoned.ask(images[0], prompt="Why?", max_new_tokens=4)


def test_nan_at_a_decode_step_is_reported(bundle, images, pipe, tmp_path):
    from mllm_deploy.runtime.pipeline import Pipeline

    prompt_tokens = int(pipe.input_ids(prompt="Why?").shape[1])
    clean = pipe.ask(images[0], prompt="Why?", max_new_tokens=6).generation
    assert clean.stop_reason == "length"  # no EOS before the poisoned step
    # decode step n runs at position prompt_tokens + n - 1: poison step 3 only
    with Pipeline.load(poison_rope(bundle, tmp_path / "nan", [prompt_tokens + 2])) as poisoned:
        streamed: list[str] = []
        with pytest.raises(NumericalError, match="NaN logits at decode step 3 .a 4-layer float32 bundle"):
            poisoned.ask(images[0], prompt="Why?", max_new_tokens=6, on_text=streamed.append)
        # the tokens before the NaN were the clean ones; nothing after it was emitted
        assert "".join(streamed) == poisoned.prompt.decode(clean.tokens[:3])[: len("".join(streamed))]


def test_nan_cli_is_one_line(bundle, images, tmp_path):
    poisoned = poison_rope(bundle, tmp_path / "nan", [0])
    proc = run_cli("run-mllm", str(poisoned), "--image", str(images[0]), "--prompt", "Why?", "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "run-mllm: error: the model produced NaN logits at prefill (a 4-layer float32 bundle); its weights may be corrupt"]


def test_check_finite_names_inf_and_fp16_hint():
    from mllm_deploy.runtime.generator import check_finite

    check_finite(np.zeros(8, np.float16), "prefill", 2, "float16")
    logits = np.zeros(8, np.float16)
    logits[3] = np.inf
    with pytest.raises(NumericalError, match="Inf logits at decode step 7 .a 2-layer float16 bundle.*float32 export"):
        check_finite(logits, "decode step 7", 2, "float16")


# ---- repeated requests and Ctrl-C ------------------------------------------------------------------------
def test_repeated_requests_are_identical(pipe, bundle, images):
    from mllm_deploy.runtime.pipeline import Pipeline

    requests = [(images[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(6)]
    first = [pipe.ask(image, prompt=p, max_new_tokens=10).generation for image, p in requests]
    again = [pipe.ask(image, prompt=p, max_new_tokens=10).generation for image, p in reversed(requests)][::-1]
    for a, b in zip(first, again):
        assert a.tokens == b.tokens
        assert np.array_equal(a.first_logits, b.first_logits)
    assert len({tuple(g.tokens) for g in first}) > 1  # the requests really differ
    with Pipeline.load(bundle) as fresh:  # and a fresh pipeline agrees with the long-lived one
        assert fresh.ask(requests[4][0], prompt=requests[4][1], max_new_tokens=10).generation.tokens == first[4].tokens


def test_interrupted_generation_leaves_the_pipeline_reusable(pipe, images):
    reference = pipe.ask(images[1], prompt="What is this?", max_new_tokens=12).generation.tokens
    generator = pipe.generator
    seen: list[str] = []

    def interrupt(delta: str) -> None:
        seen.append(delta)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.ask(images[1], prompt="What is this?", max_new_tokens=12, on_text=interrupt)
    assert pipe.generator is generator and all(r.is_active for r in generator.runners.values())
    assert pipe.ask(images[1], prompt="What is this?", max_new_tokens=12).generation.tokens == reference
    pipe.close()  # closing frees every session; the next request loads them again
    assert not any(r.is_active for r in generator.runners.values())
    assert pipe.ask(images[1], prompt="What is this?", max_new_tokens=12).generation.tokens == reference


def test_ignore_eos_generates_exactly_the_requested_tokens(bundle, images):
    proc = subprocess.run([str(VENV_BIN / "run-mllm"), str(bundle), "--image", str(images[0]), "--prompt", PROMPTS[0],
                           "--max-new-tokens", "40", "--ignore-eos", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 40


def test_ctrl_c_during_generation_exits_130_with_one_line(bundle, images):
    # --ignore-eos with 1900 new tokens: about a second of streaming on an idle CPU, so the signal
    # sent after the first streamed byte lands mid-generation
    proc = subprocess.Popen([str(VENV_BIN / "run-mllm"), str(bundle), "--image", str(images[0]), "--prompt", PROMPTS[0],
                             "--max-new-tokens", "1900", "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a terminal's Ctrl-C: the child gets default SIGINT handling even when this test
                            # runs in a background job, where the shell starts children with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.read(1), "no token was streamed"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr.decode()
    assert stderr.decode().strip().splitlines() == ["run-mllm: interrupted"]
    assert stdout.decode("utf-8", "replace").endswith("\n")  # the half-streamed line was ended


# ---- the context length ------------------------------------------------------------------------------------
def test_context_is_checked_before_any_session_loads(bundle, images):
    from mllm_deploy.runtime.pipeline import Pipeline

    with Pipeline.load(bundle) as fresh:
        prompt_tokens = int(fresh.input_ids(prompt="Why?").shape[1])
        limit = fresh.bundle.max_positions
        with pytest.raises(PromptError, match=rf"prompt \({prompt_tokens} tokens\) plus --max-new-tokens"
                                              rf" \({limit - prompt_tokens + 1}\) is {limit + 1} tokens.*context of {limit}"):
            fresh.ask(images[0], prompt="Why?", max_new_tokens=limit - prompt_tokens + 1)
        assert fresh._generator is None  # refused before the sessions were created
        fresh.check_request(prompt_tokens, limit - prompt_tokens)  # exactly at the limit is fine


# ---- memory -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * 2**30), ("4G", 4 * 2**30), ("4GB", 4 * 10**9), ("512MB", 512 * 10**6), ("512mib", 512 * 2**20),
    ("1.5GiB", 3 * 2**29), (" 2 TiB ", 2 * 2**40), ("1000000", 10**6), ("64k", 65536), ("7b", 7), (".5K", 512),
])
def test_parse_size(text, expected):
    from mllm_deploy.core.memory import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "4 XB", "-1GB", "0", "0.1", "1e9", "nan", "inf", "4GiBs", "4 G B", "٤GB",
                                  "1" * 400 + "TB"])
def test_parse_size_refuses_with_one_line(text):
    from mllm_deploy.core.memory import parse_size

    with pytest.raises(MllmError, match="--max-memory") as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_available_memory_reads_meminfo(tmp_path):
    from mllm_deploy.core.memory import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert available_memory(meminfo) == 8000000 * 1024
    assert available_memory(tmp_path / "absent") > 0  # falls back to sysconf


def test_estimate_terms(pipe):
    from mllm_deploy.core.memory import MemoryEstimate, kv_cache_bytes, text_parameters
    from mllm_deploy.formats.geometry import spec_from_manifest

    spec = spec_from_manifest(pipe.bundle.manifest["model"])
    t = spec.text
    # tiny-llava's text model by hand: embeddings and LM head, 4 layers of attention + MLP + 2 norms, final norm
    per_layer = 2 * t.hidden_size * t.num_heads * t.head_dim + 2 * t.hidden_size * t.num_kv_heads * t.head_dim \
        + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
    assert text_parameters(t) == 2 * t.vocab_size * t.hidden_size + t.num_layers * per_layer + t.hidden_size
    assert kv_cache_bytes(t, [10, 20], 2) == 2 * t.num_kv_heads * t.head_dim * 30 * 2
    estimate = pipe.memory_estimate(prompt_tokens=100, max_new_tokens=20)
    kv = [n + 20 for n in pipe.bundle.kv_lengths(100)]
    assert estimate.kv_cache == kv_cache_bytes(t, kv, 4)
    weights_file = (pipe.bundle.path / "weights.bin").stat().st_size
    # the weights file is mapped once and shared by the sessions (runtime/backends/ort.py): counted once, plus the
    # pre-packed copy of the text weights when ONNX Runtime packs (the "packed" mode auto takes when it fits)
    packed = text_parameters(t) * 4 if pipe.weights_mode in ("fast", "packed") else 0
    assert pipe.weights_mode in ("packed", "shared")
    assert weights_file + packed <= estimate.weights <= weights_file + packed + 2**20
    assert estimate.total == estimate.weights + estimate.kv_cache + estimate.activations
    assert MemoryEstimate(3 * 2**30, 2**29, 2**20).describe() == \
        "3.50 GiB (weights 3.00 GiB + KV cache 512.00 MiB + activations 1.00 MiB)"


def test_memory_budget_refuses_before_loading(pipe):
    from mllm_deploy.core.memory import check_memory

    estimate = pipe.memory_estimate(90, 32)
    check_memory(estimate, "x", max_memory=estimate.total, available=estimate.total)  # equal is fine
    with pytest.raises(MemoryLimitError, match=r"needs an estimated .* more than --max-memory 1.00 KiB"):
        check_memory(estimate, "x", max_memory=1024)
    with pytest.raises(MemoryLimitError, match=r"more than the 1.00 MiB of memory available"):
        check_memory(estimate, "x", max_memory=None, available=2**20)


def test_export_refuses_over_budget_and_writes_nothing(tiny_model_dirs, tmp_path):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    with pytest.raises(MemoryLimitError, match=r"exporting .*gqa56 \(float32\) needs an estimated"):
        export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b", ExportOptions(max_memory=2**20), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_export_memory_estimate_grows_with_the_model():
    from mllm_deploy.core.memory import export_estimate
    from mllm_deploy.models.registry import load_spec

    small = export_estimate(load_spec("llava-1.5-7b-shape")[1], 2, 600)
    large = export_estimate(load_spec("llava-1.5-13b-shape")[1], 2, 600)
    assert 7e9 * 4 < small.weights < large.weights  # at least the float32 PyTorch model
    # streamed from safetensors without verification: about one fused tensor, not the model
    streamed = export_estimate(load_spec("llava-1.5-7b-shape")[1], 2, 600, verify=False, streaming=True)
    assert streamed.total < 1 * 2**30


# ---- report-mllm writes all or nothing -------------------------------------------------------------------
def test_failed_report_leaves_an_existing_directory_untouched(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"schema": "mllm-deploy/bench@1", "machine": {}, "settings": {},
                               "results": [{k: "x" for k in ("name", "backend", "method", "visual_tokens",
                                                             "prompt_tokens", "new_tokens", "vision_ms", "prefill_ms",
                                                             "ttft_ms", "decode_ms_per_token", "tokens_per_s",
                                                             "kv_cache_bytes", "kv_tokens_per_layer", "prefill_flops",
                                                             "dense_prefill_flops", "flops_reduction", "peak_rss_mb",
                                                             "model")}]}))
    proc = run_cli("report-mllm", str(bad), "-o", str(out))
    assert proc.returncode == 1 and "malformed" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "report"]  # no temporary directory left
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_interrupted_atomic_write_leaves_nothing(tmp_path):
    from mllm_deploy.core.fsutil import atomic_directory

    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "bundle") as tmp:
            (tmp / "weights.bin").write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_soak_script_runs(tmp_path, bundle):
    """benchmarks/soak.py end to end on a few generations (the 1,000-generation figure is in BENCHMARKS.md)."""
    from conftest import REPO

    started = time.perf_counter()
    proc = subprocess.run([str(VENV_BIN / "python"), str(REPO / "benchmarks" / "soak.py"), "--bundle", str(bundle),
                           "--generations", "12", "--warmup", "4", "--max-growth", "1000", "--json", str(tmp_path / "soak.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["generations"] == 12 and result["failures"] == 0
    assert result["rss_after_warmup_mb"] > 0 and "growth" in proc.stdout
    assert time.perf_counter() - started < 300
