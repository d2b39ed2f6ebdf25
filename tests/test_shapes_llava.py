"""The packaged shapes-llava: small enough to ship, accurate through our own bundle, and blind
without its image."""

from __future__ import annotations

import json

import pytest

from mllm_deploy.models.shapes_llava import PACKAGED_DIR

QUESTIONS = 300  # a fixed sample of the test split (deterministic); the 1000-question figure is in BENCHMARKS.md
CHANCE = 0.42  # best image-blind answerer: the most frequent training answer for each question text


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    return export_bundle("shapes-llava", tmp_path_factory.mktemp("shapes") / "dense", ExportOptions(), log=lambda m: None)


def test_packaged_model_is_small_and_has_its_training_log():
    weights = PACKAGED_DIR / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    log = json.loads((PACKAGED_DIR / "training_log.json").read_text())
    assert log["final_validation_accuracy"] >= 0.95 and log["seed"] == 0
    config = json.loads((PACKAGED_DIR / "config.json").read_text())
    assert (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2 >= 256


def test_dense_bundle_accuracy(shapes_bundle):
    from mllm_deploy.runtime.evaluate import evaluate, load_eval_data

    result = evaluate([str(shapes_bundle)], load_eval_data(f"shapes-vqa:test:{QUESTIONS}"))[0]
    assert result.accuracy >= 0.95, result.summary()


def test_blank_image_scores_near_chance(shapes_bundle):
    """The same questions with the image replaced by a blank one: the task needs the image."""
    from PIL import Image

    from mllm_deploy.runtime.evaluate import EvalItem, evaluate, load_eval_data

    items = load_eval_data(f"shapes-vqa:test:{QUESTIONS}")
    blank = Image.new("RGB", (64, 64), (200, 200, 200))
    blind = [EvalItem(blank, i.question, i.answer, i.source) for i in items]
    result = evaluate([str(shapes_bundle)], blind)[0]
    assert result.accuracy <= CHANCE + 0.08, result.summary()
