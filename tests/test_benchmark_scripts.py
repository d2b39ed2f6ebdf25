"""The benchmark scripts that need hardware this machine lacks run their CPU path here, so the GPU run is one
command away (issue 19: the CUDA-EP table of the 7B geometry is run when a GPU is lent)."""

from __future__ import annotations

import pytest

import json
import math
import subprocess
import sys

from conftest import REPO


@pytest.mark.slow
def test_recipes_on_device_runs_its_cpu_path(tmp_path):
    script = REPO / "benchmarks" / "ort_recipes_on_device.py"
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "work"), "--model", "tiny-llava", "--provider",
                           "cpu", "--dtype", "float32", "--prompt-tokens", "80", "--new-tokens", "3", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [row["recipe"].split()[0] for row in result["rows"]] == ["dense", "fastv", "fitprune", "mod"]
    for row in result["rows"]:
        for key in ("prefill_ms", "torch_prefill_ms", "decode_ms_per_token", "flops_speedup", "realised_speedup"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["recipe"], key)
        manifest = json.loads((tmp_path / "work" / row["bundle"].split("/")[-1] / "manifest.json").read_text())
        assert manifest["recipe"]["method"]["name"] == row["recipe"].split()[0]
    assert result["rows"][0]["flops_speedup"] == 1.0 and all(r["flops_speedup"] > 1.1 for r in result["rows"][1:])
    assert "| mod attention 0.5 |" in proc.stdout
