"""The packaged shapes-llava answers shapes-vqa through the ONNX Runtime bundle, and needs the image to.

The full 1000-question figure is in BENCHMARKS.md; here a fixed sample of the test split keeps CI short.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

QUESTIONS = 300
# majority answer per question kind scores ~41% on test (test_shapes_vqa): "near chance" is at most this
BLIND_CEILING = 0.50


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    # the export verifies ONNX Runtime against the PyTorch model and fails on disagreement
    return export_bundle("shapes-llava", tmp_path_factory.mktemp("shapes") / "dense", ExportOptions(), log=lambda m: None)


@pytest.fixture(scope="module")
def test_items():
    from mllm_deploy.tools.evaluate import load_eval_data

    return load_eval_data(f"shapes-vqa:test:{QUESTIONS}")


def test_packaged_model_is_a_small_hf_directory_with_its_training_log():
    from mllm_deploy.models.registry import load_spec
    from mllm_deploy.models.shapes_llava import PACKAGED_DIR

    model_dir, spec = load_spec("shapes-llava")
    assert model_dir == PACKAGED_DIR
    assert spec.visual_tokens >= 256
    weights = model_dir / "model.safetensors"
    assert weights.stat().st_size <= 25 * 1024 * 1024
    log = json.loads((model_dir / "training_log.json").read_text())
    assert log["seed"] == 0 and log["steps"] > 0 and log["history"]
    assert log["final_validation_accuracy"] >= 0.95


@pytest.mark.slow
def test_dense_bundle_answers_the_test_split(shapes_bundle, test_items):
    from mllm_deploy.tools.evaluate import evaluate

    [result] = evaluate([str(shapes_bundle)], test_items)
    assert result.accuracy >= 0.95, f"{result.accuracy:.1%} on {QUESTIONS} test questions"


@pytest.mark.slow
def test_a_blank_image_brings_accuracy_down_to_chance(shapes_bundle, test_items):
    """Same bundle, same questions, every image replaced by an empty background."""
    from PIL import Image

    from mllm_deploy.tools.evaluate import EvalItem, evaluate

    blank = Image.new("RGB", test_items[0].image.size, (208, 208, 208))
    items = [EvalItem(blank, item.question, item.answer, item.source) for item in test_items]
    [result] = evaluate([str(shapes_bundle)], items)
    assert result.accuracy <= BLIND_CEILING, f"{result.accuracy:.1%} without the image"


@pytest.mark.slow
def test_run_mllm_answers_a_test_scene_by_name(tmp_path, shapes_bundle):
    from mllm_deploy.scenes import shapes_vqa

    right = 0
    for index in range(6):  # one question of each kind
        example = shapes_vqa.example("test", index)
        image = tmp_path / f"scene{index}.png"
        example.image.save(image)
        proc = run_cli("run-mllm", str(shapes_bundle), "--image", str(image), "--prompt", example.question, "--json")
        assert proc.returncode == 0, proc.stderr
        right += json.loads(proc.stdout)["text"].strip() == example.answer
    assert right >= 5


def test_questions_off_its_templates_or_vocabulary_are_warned_about(tmp_path, shapes_bundle):
    """shapes-llava learnt fixed question templates over a small word vocabulary: a question outside them is
    answered, with one warning line naming questions it knows (issue 24); a template question gets none."""
    from mllm_deploy.scenes import shapes_vqa

    example = shapes_vqa.example("test", 0)
    image = tmp_path / "scene.png"
    example.image.save(image)
    manifest = json.loads((shapes_bundle / "manifest.json").read_text())
    assert len(manifest["tokenizer"]["prompt_templates"]) == sum(map(len, shapes_vqa.TEMPLATES.values()))
    for question, problem in (("what colour is the circle ?", "matches none of the templates"),
                              ("what is the colour of the sky ?", "vocabulary has no 'sky'"),
                              (example.question, None)):
        result = run_cli("run-mllm", str(shapes_bundle), "--image", str(image), "--prompt", question, "--json")
        assert result.returncode == 0, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "warning" in line]
        if problem is None:
            assert warnings == [], warnings
        else:
            assert len(warnings) == 1 and problem in warnings[0] and "what colour is the object in row" in warnings[0]
