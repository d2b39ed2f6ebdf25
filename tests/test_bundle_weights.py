"""A bundle at run time: its LLM weights resident once although prefill and decode both use them, and its
files hashed once (then trusted while their size and mtime are unchanged), an altered file still refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mllm_deploy.core.errors import BundleError
from mllm_deploy.runtime.bundle import VERIFIED_FILE, check_files, load_bundle


def test_files_are_hashed_once_and_an_altered_file_is_still_refused(bundle_copy):
    manifest = load_bundle(bundle_copy, check_hashes=False).manifest
    (bundle_copy / VERIFIED_FILE).unlink(missing_ok=True)
    assert check_files(bundle_copy, manifest) == len(manifest["files"])  # first load: every file
    assert check_files(bundle_copy, manifest) == 0  # then trusted by size and mtime
    assert check_files(bundle_copy, manifest, verify_all=True) == len(manifest["files"])  # --verify-hashes
    weights = bundle_copy / "weights.bin"
    with open(weights, "r+b") as handle:  # flip one byte in place: same size, new mtime
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="weights.bin does not match its sha256"):
        load_bundle(bundle_copy)
    with open(weights, "r+b") as handle:
        handle.seek(1000)
        handle.write(byte)
    assert check_files(bundle_copy, manifest) == 1  # restored: hashed again, then trusted
    # a record that lies about a file's digest is not trusted
    record = json.loads((bundle_copy / VERIFIED_FILE).read_text())
    record["files"]["weights.bin"]["sha256"] = "0" * 64
    (bundle_copy / VERIFIED_FILE).write_text(json.dumps(record))
    assert check_files(bundle_copy, manifest) == 1


def test_a_read_only_bundle_still_loads(bundle_copy):
    (bundle_copy / VERIFIED_FILE).unlink(missing_ok=True)
    os.chmod(bundle_copy, 0o555)
    try:
        assert load_bundle(bundle_copy).path == bundle_copy  # hashed, nothing recorded
        assert not (bundle_copy / VERIFIED_FILE).exists() or os.geteuid() == 0
    finally:
        os.chmod(bundle_copy, 0o755)


def test_the_export_records_its_hashes(bundle_copy):
    manifest = load_bundle(bundle_copy, check_hashes=False).manifest
    record = json.loads((bundle_copy / VERIFIED_FILE).read_text())["files"]
    assert {rel: entry["sha256"] for rel, entry in record.items()} == manifest["files"]


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.generator import Generator
    from mllm_deploy.runtime.timing import synthetic_inputs

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    bundle = load_bundle(sys.argv[1])
    ids, pixels = synthetic_inputs(bundle, bundle.visual_tokens + 12)
    before = rss_mb()
    with Generator(bundle, "onnxruntime", share_weights=sys.argv[2] == "shared") as generator:
        tokens = generator.generate(ids, pixels, 3, ignore_eos=True).tokens
        print(json.dumps({"grown_mb": rss_mb() - before, "tokens": tokens}))
""")


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory):
    """A model whose weights (~150 MB) dwarf the interpreter's own memory, so resident copies can be counted."""
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.models.tiny import TinyLlavaConfig, write_tiny_llava

    root = tmp_path_factory.mktemp("wide")
    model = write_tiny_llava(root / "model", TinyLlavaConfig(seed=7, text_hidden=768, text_layers=4, text_heads=12,
                                                              text_kv_heads=4, text_intermediate=3072))
    return export_bundle(str(model), root / "bundle", ExportOptions(verify=False), log=lambda m: None)


@pytest.mark.slow
def test_prefill_and_decode_share_one_resident_copy_of_the_weights(wide_bundle):
    weights_mb = (wide_bundle / "weights.bin").stat().st_size / 2**20
    assert weights_mb > 100

    def run(mode):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(wide_bundle), mode], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "MLLM_DEPLOY_THREADS": "2"})
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    shared, separate = run("shared"), run("separate")
    assert shared["tokens"] == separate["tokens"]
    # each session pre-packs its own copy when left alone (measured: 2.3x the file); mapped once, the weights are
    # resident once plus activations and ONNX Runtime's arenas (measured: 1.3x)
    assert separate["grown_mb"] > 1.8 * weights_mb, separate
    assert shared["grown_mb"] < 1.5 * weights_mb, shared
    assert separate["grown_mb"] - shared["grown_mb"] > 0.6 * weights_mb


def test_float16_on_the_cpu_provider_is_estimated_with_its_float32_copies(tiny_model_dirs, tmp_path):
    """ONNX Runtime's CPU provider runs float16 MatMuls in float32 and keeps float32 weights per session; the
    estimate says so, so that a 7B float16 bundle is refused on a 24 GB machine instead of being killed."""
    from mllm_deploy.core.memory import text_parameters
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.formats.geometry import spec_from_manifest
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "half", ExportOptions(dtype="float16"),
                           log=lambda m: None)
    cpu = Pipeline.load(bundle).memory_estimate(80, 4)
    gpu = Pipeline.load(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).memory_estimate(80, 4)
    text_half = text_parameters(spec_from_manifest(load_bundle(bundle).manifest["model"]).text) * 2
    assert cpu.weights - gpu.weights == 4 * text_half


def test_decode_through_io_binding_binds_the_kv_buffers_once(tiny_bundles):
    """Decode binds each layer's KV buffer once per generation (the cache is updated in place) and writes its
    outputs into buffers made once; the tokens equal those of plain session.run."""
    from mllm_deploy.runtime.generator import Generator
    from mllm_deploy.runtime.timing import synthetic_inputs

    bundle = load_bundle(tiny_bundles["gqa56"])
    ids, pixels = synthetic_inputs(bundle, bundle.visual_tokens + 12)
    with Generator(bundle, "onnxruntime", graphs="portable") as generator:  # (the in-place decode: test_ort_target)
        decode = generator.runners["decode"]
        assert decode.io_binding
        bound = generator.generate(ids, pixels, 8, ignore_eos=True)
        assert decode.kv_values_created == 2 * bundle.num_layers  # 7 decode steps, one binding per buffer
        outputs = {name: buffer.ctypes.data for name, buffer in decode._output_buffers.items()}
        generator.generate(ids, pixels, 4, ignore_eos=True)  # a new generation: a new cache, bound once more
        assert decode.kv_values_created == 4 * bundle.num_layers
        assert {name: buffer.ctypes.data for name, buffer in decode._output_buffers.items()} == outputs
        decode.io_binding = False
        plain = generator.generate(ids, pixels, 8, ignore_eos=True)
    assert bound.tokens == plain.tokens
    np.testing.assert_array_equal(bound.first_logits, plain.first_logits)


def test_auto_weights_pre_pack_only_when_the_estimate_fits(tiny_bundles):
    """weights="auto": ONNX Runtime pre-packs ("packed", one more copy of the text weights) when the estimate
    with that copy fits --max-memory and the memory available; otherwise the one shared copy."""
    from mllm_deploy.core.memory import text_parameters
    from mllm_deploy.formats.geometry import spec_from_manifest
    from mllm_deploy.runtime.pipeline import Pipeline

    bundle = load_bundle(tiny_bundles["gqa56"])
    shared = Pipeline(bundle, weights="shared").memory_estimate(100, 20).total
    for mode in ("packed", "fast"):
        packed = Pipeline(bundle, weights=mode).memory_estimate(100, 20).total
        assert packed - shared == text_parameters(spec_from_manifest(bundle.manifest["model"]).text) * 4
    roomy, tight = Pipeline(bundle), Pipeline(bundle)
    roomy.check_request(100, 20, max_memory=packed + 1, available=10 * packed)
    tight.check_request(100, 20, max_memory=packed - 1, available=10 * packed)
    assert (roomy.weights_mode, tight.weights_mode) == ("packed", "shared")
    with tight:
        assert not any(r.pack for r in tight.generator.runners.values())
    with roomy:
        assert all(r.pack and not r.share_weights for r in roomy.generator.runners.values())
    with Pipeline(bundle, weights="fast") as fast:
        runners = fast.generator.runners
        assert runners["decode"].pack and not runners["prefill"].pack and runners["prefill"].share_weights


def test_bundle_and_result_files_have_normal_modes(tiny_model_dirs, tmp_path):
    """A bundle is copied to its target and shared: files 0666 and directories 0777 less the umask, as mkdir and
    open give, not the 0600/0700 of temporary files (issue 24)."""
    import os
    import stat

    from mllm_deploy.core.fsutil import atomic_write_text
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    old = os.umask(0o022)
    try:
        bundle = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b", ExportOptions(verify=False,
                                                                                           ort_graphs=False),
                               log=lambda m: None)
        atomic_write_text(tmp_path / "result.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in bundle.iterdir() if p.is_file()} == {0o644}
