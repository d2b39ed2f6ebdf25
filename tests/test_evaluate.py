"""eval-mllm's statistics and data loading, and the CLI on tiny bundles."""

from __future__ import annotations

import json

import pytest

from conftest import make_image, run_cli
from mllm_deploy.core.errors import MllmError
from mllm_deploy.tools.evaluate import load_eval_data, normalise, wilson_interval


def test_wilson_interval_known_values():
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8883, abs=1e-3) and high == pytest.approx(0.9785, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_normalise():
    assert normalise("  Yes. ") == "yes" and normalise("Two  circles!") == "two circles"


def test_dataset_spec_parsing():
    items = load_eval_data("shapes-vqa:validation:7")
    assert len(items) == 7 and items[0].source == "validation:0"
    assert len(load_eval_data("shapes-vqa:3")) == 3
    with pytest.raises(MllmError, match="neither a split"):
        load_eval_data("shapes-vqa:dev")


def test_jsonl_data_and_its_errors(tmp_path):
    make_image(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "yes"}) + "\n")
    assert load_eval_data(str(good))[0].answer == "yes"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "question": "q?"}) + "\n")
    with pytest.raises(MllmError, match="line 1"):
        load_eval_data(str(bad))


def test_eval_cli_reports_against_the_dense_bundle(tiny_bundles, pruned_bundles, tmp_path):
    out = tmp_path / "eval.json"
    dense, fastv = tiny_bundles["gqa56"], pruned_bundles("gqa56", "fastv", "native")
    proc = run_cli("eval-mllm", str(fastv), str(dense), "--dataset", "shapes-vqa:validation:12", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    by_method = {r["method"]: r for r in result["results"]}
    assert by_method["dense"]["agreement"] == 1.0 and by_method["dense"]["mean_kl"] == 0.0
    assert by_method["dense"]["flops_reduction"] == 0.0 and 0 < by_method["fastv"]["flops_reduction"] < 1
    assert by_method["fastv"]["reference"].endswith("gqa56") and by_method["fastv"]["mean_kl"] >= 0
    assert result["questions"] == 12 and len(result["answers"]) == 2
    assert "| fastv |" in proc.stdout.replace(f"| {fastv.name} ", "| ")
    # per-kind breakdown: 12 questions cycle through the six kinds twice; it averages back to the accuracy
    for r in result["results"]:
        assert set(r["per_kind"]) == {"colour_at", "count", "left_of", "above", "exists", "shape_of_colour"}
        assert sum(r["per_kind"].values()) / 6 == pytest.approx(r["accuracy"])
    assert f"{dense.name} per kind: above" in proc.stdout


def test_eval_cli_bad_input(tiny_bundles, tmp_path):
    proc = run_cli("eval-mllm", str(tiny_bundles["gqa56"]), "--dataset", str(tmp_path / "none.jsonl"))
    assert proc.returncode == 1 and "evaluation data not found" in proc.stderr
    proc = run_cli("eval-mllm", str(tmp_path / "nobundle"), "--dataset", "shapes-vqa:2")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
