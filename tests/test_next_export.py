"""LLaVA-NeXT (AnyRes) exported dense: the bundle's vision graph runs per view, the runtime packs the views as the
model does (runtime/anyres.py) into as many visual tokens as the image makes, and greedy generation equals
transformers' LlavaNextForConditionalGeneration on images of several aspect ratios in different buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest

PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # tiles of 56 px: 1x2, 2x1 and 2x2 grids
NEW_TOKENS = 16
# (width, height): a wide, a tall, a square image and a wide one in the 2x2 bucket whose grid is unpadded
IMAGES = [(100, 45), (45, 100), (90, 90), (110, 80)]


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from conftest import TINY_CONFIGS

    from mllm_deploy.models.tiny import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("next") / "m", TINY_CONFIGS["gqa56"], next_pinpoints=PINPOINTS)


@pytest.fixture(scope="module")
def next_bundle(next_model, tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    return export_bundle(str(next_model), tmp_path_factory.mktemp("next-bundle") / "b", ExportOptions(),
                         log=lambda m: None)


def test_dense_next_generates_like_transformers(next_model, next_bundle):
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mllm_deploy.runtime.pipeline import Pipeline

    model = LlavaNextForConditionalGeneration.from_pretrained(next_model).eval()
    processor = AutoProcessor.from_pretrained(next_model)
    question = "Describe the picture in detail."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    seen = set()
    unpadded = False
    with Pipeline.load(next_bundle) as pipe:
        for width, height in IMAGES:
            image = Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3),
                                                                                 dtype=np.uint8))
            pixels = pipe.pixel_values(image)
            ids = pipe.input_ids(prompt=question, pixels=pixels)
            ours = pipe.generator.generate(ids, pixels, NEW_TOKENS, ignore_eos=True).tokens
            inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=image,
                               return_tensors="pt")
            assert inputs["input_ids"].tolist() == ids.tolist(), (width, height)  # same visual-token count
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            assert ours == out[0, inputs["input_ids"].shape[1]:].tolist(), (width, height)
            seen.add(pixels.layout.resolution)
            bucket_max = 64 + pixels.layout.rows * 8 * (pixels.layout.cols * 8 + 1)
            unpadded |= pixels.visual_tokens < bucket_max
    assert len(seen) == 3 and unpadded  # every bucket, and one image whose padded rows were cut


def test_next_bundle_records_anyres_and_passes_tensorrt_checks(next_bundle):
    from mllm_deploy.trt.check import check_bundle

    manifest = json.loads((next_bundle / "manifest.json").read_text())
    assert manifest["image"]["image_grid_pinpoints"] == PINPOINTS
    assert manifest["model"]["visual_tokens"] == 336  # the largest bucket's count: what the prefill must hold
    assert "image_newline" in {o["name"] for o in manifest["graphs"]["vision"]["outputs"]}
    prefill_features = next(i for i in manifest["graphs"]["prefill"]["inputs"] if i["name"] == "image_features")
    assert prefill_features["shape"][1] == "visual_len"
    for version in ("10.16", "11.4"):
        findings = check_bundle(next_bundle, version)
        assert all(not f for f in findings.values()), findings


def test_pruned_next_recipe_is_refused(next_model, tmp_path):
    from conftest import run_cli

    recipe = tmp_path / "fastv.json"
    made = run_cli("calib-mllm", "--model", str(next_model), "--method", "fastv", "-o", str(recipe))
    assert made.returncode == 0, made.stderr
    export = run_cli("export-mllm", "--model", str(next_model), "--recipe", str(recipe), "-o", str(tmp_path / "b"))
    assert export.returncode == 1 and "exports dense; recipes per grid bucket are not built yet" in export.stderr
    assert not (tmp_path / "b").exists()


def test_run_mllm_uses_the_images_own_count(next_bundle, tmp_path):
    """run-mllm on a NeXT bundle counts the image's own visual tokens (a wide image: fewer than the bundle's
    largest bucket) and answers."""
    from PIL import Image

    from conftest import run_cli

    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (45, 100, 3), dtype=np.uint8)).save(image)
    proc = run_cli("run-mllm", str(next_bundle), "--image", str(image), "--prompt", "Describe the picture in detail.",
                   "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert len(answer["tokens"]) >= 1 and answer["prompt_tokens"] < 336  # 200 visual tokens + the text


def test_prompt_built_for_another_image_is_refused(next_bundle):
    """A prompt expanded for a square image (336 tokens) with a wide image's features (200) is a one-line error,
    not a silently misplaced image."""
    from PIL import Image

    from mllm_deploy.core.errors import PromptError
    from mllm_deploy.runtime.pipeline import Pipeline

    square, wide = (Image.fromarray(np.zeros((h, w, 3), np.uint8)) for w, h in ((90, 90), (100, 45)))
    with Pipeline.load(next_bundle) as pipe:
        ids = pipe.input_ids(prompt="hi", pixels=pipe.pixel_values(square))
        with pytest.raises(PromptError, match="image tokens but the image makes 200"):
            pipe.generator.generate(ids, pipe.pixel_values(wide), 2)


def test_bench_mllm_runs_a_next_bundle(next_bundle):
    """bench-mllm's synthetic prompt holds the synthetic image's own count of visual tokens."""
    from conftest import run_cli

    proc = run_cli("bench-mllm", str(next_bundle), "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["results"][0]
    assert result["prefill_ms"]["median"] > 0 and len(result["kv_tokens_per_layer"]) == 4


def test_tensorrt_profiles_size_the_image_run(next_bundle):
    """build-mllm's profiles give the prefill's visual_len the range a NeXT image can take: from the base view alone
    (every grid row unpadded away) to the largest bucket, and prompts as short as that."""
    from mllm_deploy.trt.profiles import PRESETS, all_profiles, profile_settings

    manifest = json.loads((next_bundle / "manifest.json").read_text())
    settings = profile_settings(manifest, PRESETS["datacenter"])
    profiles = all_profiles(manifest, settings)
    low, opt, high = profiles["prefill"]["image_features"]
    assert (low[1], opt[1], high[1]) == (64, 336, 336)  # 8x8 patches per view; 336 in the 2x2 bucket
    assert settings.min_prompt_tokens == 65
    from mllm_deploy.trt.profiles import graph_shape_values

    assert graph_shape_values(manifest, "prefill", settings)["image_start"][2] == (settings.max_prompt_tokens - 64,)
