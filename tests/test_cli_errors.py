"""Bad input: exit code 1, one line naming the problem, nothing else printed or left behind."""

from __future__ import annotations

import json

import pytest

from conftest import make_image, run_cli


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""


def test_export_unknown_model(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_cli("export-mllm", "--model", str(tmp_path / "nope"), "-o", str(out)),
                      "neither a directory nor a built-in name", "tiny-llava")
    assert not out.exists()


def test_export_unsupported_architecture(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    out = tmp_path / "out"
    assert_user_error(run_cli("export-mllm", "--model", str(model), "-o", str(out)),
                      "'BertModel' is not supported", "LlavaForConditionalGeneration")
    assert not out.exists() and list(tmp_path.iterdir()) == [model]


def test_export_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("export-mllm", "--model", str(tmp_path / "empty"), "-o", str(tmp_path / "o")),
                      "has no config.json")


def test_export_refuses_to_overwrite(tiny_bundles, tiny_model_dirs):
    assert_user_error(run_cli("export-mllm", "--model", str(tiny_model_dirs["gqa56"]), "-o", str(tiny_bundles["gqa56"])),
                      "already exists", "--force")


def test_run_missing_bundle(tmp_path):
    image = make_image(tmp_path / "i.png")
    assert_user_error(run_cli("run-mllm", str(tmp_path / "nobundle"), "--image", str(image), "--prompt", "x"),
                      "bundle directory not found")


def test_run_bundle_with_missing_file(bundle_copy, tmp_path):
    (bundle_copy / "decode.onnx").unlink()
    image = make_image(tmp_path / "i.png")
    assert_user_error(run_cli("run-mllm", str(bundle_copy), "--image", str(image), "--prompt", "x"),
                      "decode.onnx", "missing")


def test_run_bundle_with_altered_file(bundle_copy, tmp_path):
    with open(bundle_copy / "weights.bin", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    image = make_image(tmp_path / "i.png")
    assert_user_error(run_cli("run-mllm", str(bundle_copy), "--image", str(image), "--prompt", "x"),
                      "weights.bin", "sha256")


def test_run_bundle_with_broken_manifest(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").write_text("{not json")
    image = make_image(tmp_path / "i.png")
    assert_user_error(run_cli("run-mllm", str(bundle_copy), "--image", str(image), "--prompt", "x"),
                      "manifest.json", "not valid JSON")


def test_run_unreadable_image(tiny_bundles, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("this is not an image")
    assert_user_error(run_cli("run-mllm", str(tiny_bundles["gqa56"]), "--image", str(fake), "--prompt", "x"),
                      "photo.png")


def test_run_missing_image(tiny_bundles, tmp_path):
    assert_user_error(run_cli("run-mllm", str(tiny_bundles["gqa56"]), "--image", str(tmp_path / "none.jpg"),
                              "--prompt", "x"), "none.jpg")


@pytest.mark.parametrize("raw, found", [("no placeholder here", "found 0"), ("<image> and <image>", "found 2")])
def test_raw_prompt_needs_exactly_one_placeholder(tiny_bundles, tmp_path, raw, found):
    image = make_image(tmp_path / "i.png")
    assert_user_error(run_cli("run-mllm", str(tiny_bundles["gqa56"]), "--image", str(image), "--raw-prompt", raw),
                      "<image>", found)


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("run-mllm", str(tmp_path / "nobundle"), "--image", "x.png", "--prompt", "x", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_failed_verification_leaves_no_bundle(tiny_model_dirs, tmp_path, monkeypatch):
    """A graph that disagrees with PyTorch fails the export and nothing is left behind."""
    from mllm_deploy.core.errors import VerificationError
    from mllm_deploy.export import text_graphs
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    original = text_graphs.causal_mask

    def no_mask(g, positions):  # a real bug: attention that can see the future
        mask = original(g, positions)
        return g.op("Mul", [mask, g.scalar(0.0, "float32")])

    monkeypatch.setattr(text_graphs, "causal_mask", no_mask)
    with pytest.raises(VerificationError, match="disagree"):
        export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "bad", ExportOptions(), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
