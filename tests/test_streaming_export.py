"""Export streams the weights from the checkpoint's safetensors files (export/checkpoint.py): the same bytes
whether the checkpoint is sharded or not and as from the loaded PyTorch model, and a peak memory that grows
with the largest layer, not with the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mllm_deploy.core.hashing import sha256_file


def _export(model_dir, out, **options):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    return export_bundle(str(model_dir), out, ExportOptions(**options), log=lambda m: None)


def test_sharded_unsharded_and_loaded_model_exports_are_identical(tiny_model_dirs, tmp_path, monkeypatch):
    import shutil

    from mllm_deploy.export import checkpoint, llava_export
    from mllm_deploy.models.loading import load_hf_model

    source = tiny_model_dirs["gqa56"]
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    (sharded / "model.safetensors").unlink()
    load_hf_model(source).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 3 and (sharded / checkpoint.INDEX_FILE).is_file()
    one = _export(source, tmp_path / "one", verify=False)
    many = _export(sharded, tmp_path / "many")  # verified against the PyTorch model, as usual
    monkeypatch.setattr(checkpoint, "has_safetensors", lambda model_dir: False)  # the loaded-model path
    monkeypatch.setattr(llava_export, "_check_memory", lambda *args: None)
    loaded = _export(source, tmp_path / "loaded", verify=False)
    for name in ("weights.bin", "vision.onnx", "prefill.onnx", "decode.onnx"):
        digests = {sha256_file(bundle / name) for bundle in (one, many, loaded)}
        assert len(digests) == 1, name


def test_a_shard_the_index_lists_must_exist(tiny_model_dirs, tmp_path):
    import shutil

    from mllm_deploy.core.errors import UnsupportedModelError
    from mllm_deploy.export.checkpoint import INDEX_FILE, SafetensorsCheckpoint

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dirs["gqa56"], model)
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UnsupportedModelError, match="lacks the shard model-00002-of-00002.safetensors"):
        SafetensorsCheckpoint(model)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child would report the test process's peak
PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    export_bundle(sys.argv[1], sys.argv[2], ExportOptions(verify=False), log=lambda m: None)
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
""")


@pytest.mark.slow
def test_export_peak_memory_grows_with_the_largest_layer_not_the_model(tmp_path):
    from mllm_deploy.models.tiny import TinyLlavaConfig, write_tiny_llava

    hidden, intermediate = 1024, 4096
    layer_mb = (4 * hidden * hidden + 3 * hidden * intermediate) * 4 / 2**20  # float32: 64 MiB
    peaks = {}
    for layers in (2, 8):
        model = write_tiny_llava(tmp_path / f"m{layers}", TinyLlavaConfig(
            seed=3, text_hidden=hidden, text_layers=layers, text_heads=16, text_kv_heads=16,
            text_intermediate=intermediate))
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model), str(tmp_path / f"b{layers}")],
                              capture_output=True, text=True, timeout=900, env=os.environ.copy())
        assert proc.returncode == 0, proc.stderr
        peaks[layers] = int(proc.stdout.split()[-1])
    weights_mb = {n: (tmp_path / f"b{n}" / "weights.bin").stat().st_size / 2**20 for n in peaks}
    assert weights_mb[8] - weights_mb[2] > 5 * layer_mb  # six more layers were written
    assert peaks[8] - peaks[2] < layer_mb, (peaks, layer_mb)  # but held one tensor at a time


@pytest.mark.parametrize("method,layers", [("dense", 2), ("fastv", 3), ("pdrop", 2)])
def test_verification_on_a_depth_truncated_copy(tiny_model_dirs, recipes, tmp_path, method, layers):
    """--verify-layers N: the whole bundle is written, and its first N layers, exported the same way from the same
    checkpoint, are compared with the same-depth PyTorch model; the output says so."""
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    messages = []
    recipe = None if method == "dense" else str(recipes["gqa56", method])
    out = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "b",
                        ExportOptions(recipe=recipe, verify_layers=layers), log=messages.append)
    assert any(f"depth-truncated copy ({layers} of 4 decoder layers" in m for m in messages), messages
    verdict = [m for m in messages if m.startswith(f"verify ({layers} layers) (")]
    assert len(verdict) == 2, messages  # the portable and the onnxruntime graphs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["text"]["num_layers"] == 4 and len(manifest["recipe"]["visual_tokens"]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # the scratch bundle is gone


def test_truncated_verification_refuses_a_disagreeing_export(tiny_model_dirs, tmp_path, monkeypatch):
    """The comparison is real: a PyTorch reference whose first layer differs fails it, and no bundle is left."""
    import torch

    from mllm_deploy.core.errors import VerificationError
    from mllm_deploy.models import loading

    real = loading.load_hf_model_truncated

    def perturbed(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(loading, "load_hf_model_truncated", perturbed)
    with pytest.raises(VerificationError, match=r"\(2 layers\)"):
        _export(tiny_model_dirs["gqa56"], tmp_path / "b", verify_layers=2)
    assert not (tmp_path / "b").exists()


def test_verify_layers_bad_values(tiny_model_dirs, recipes, tmp_path):
    from mllm_deploy.core.errors import MllmError

    with pytest.raises(MllmError, match="--verify-layers must be at least 1"):
        _export(tiny_model_dirs["gqa56"], tmp_path / "b", verify_layers=0)
    assert not (tmp_path / "b").exists()
