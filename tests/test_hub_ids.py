"""``--model ORG/NAME[@REVISION]``: looked up in huggingface_hub's local cache only, never the network.

The tests build caches in the layout huggingface_hub writes (``models--ORG--NAME/refs/<ref>`` holding a
commit, ``snapshots/<commit>/`` of links into ``blobs/``) and point HF_HUB_CACHE, HF_HOME or --cache-dir
at them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN, run_cli

from mllm_deploy.models.registry import parse_hub_id, resolve_model

pytest.importorskip("huggingface_hub")

CONFIG_7B = (Path(__file__).parent / "data" / "configs" / "llava-hf--llava-1.5-7b-hf.json").read_bytes()
CONFIG_13B = copy.deepcopy(json.loads(CONFIG_7B))
CONFIG_13B["text_config"].update(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                 num_hidden_layers=40, num_key_value_heads=40)
CONFIG_13B = json.dumps(CONFIG_13B, indent=2).encode()
REPO = "llava-hf/llava-1.5-7b-hf"
COMMIT_1 = "a272c74b2481d8aff3aa6fc2c4bf891fe57334fb"
COMMIT_2 = "8c85e9a4d626b7b908448be32c1ba5ad79b95e76"


def add_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs=("main",)) -> Path:
    """One commit of a model repo in huggingface_hub's cache layout; returns its snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hub_cache(tmp_path) -> Path:
    """REPO at two commits: main = the 7B config, tag v2 = a 13B geometry."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {"config.json": CONFIG_7B}, COMMIT_1, refs=("main",))
    add_snapshot(cache, REPO, {"config.json": CONFIG_13B}, COMMIT_2, refs=("v2",))
    return cache


def flops(*args: str, env: dict | None = None, cwd=None) -> dict:
    result = run_cli("flops-mllm", *args, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_id_resolves_through_hf_hub_cache(hub_cache):
    env = {"HF_HUB_CACHE": str(hub_cache)}
    assert flops("--model", REPO, env=env) == flops("--model", "llava-1.5-7b-shape")
    assert flops("--model", f"{REPO}@main", env=env) == flops("--model", "llava-1.5-7b-shape")


def test_revision_by_commit_or_ref(hub_cache):
    env = {"HF_HUB_CACHE": str(hub_cache)}
    thirteen = flops("--model", "llava-1.5-13b-shape")
    assert flops("--model", f"{REPO}@v2", env=env) == thirteen
    assert flops("--model", f"{REPO}@{COMMIT_2}", env=env) == thirteen
    assert flops("--model", f"{REPO}@{COMMIT_1}", env=env) == flops("--model", "llava-1.5-7b-shape")


def test_hf_home_and_cache_dir_are_honoured(hub_cache, tmp_path):
    # HF_HOME/hub when HF_HUB_CACHE is unset
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "hub").symlink_to(hub_cache)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["HF_HOME"] = str(home)
    result = subprocess.run([str(VENV_BIN / "flops-mllm"), "--model", f"{REPO}@v2", "--json"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == flops("--model", "llava-1.5-13b-shape")
    # --cache-dir wins over the environment
    elsewhere = {"HF_HUB_CACHE": str(tmp_path / "empty")}
    assert flops("--model", REPO, "--cache-dir", str(hub_cache), env=elsewhere) == flops("--model", "llava-1.5-7b-shape")


@pytest.mark.parametrize("model", ["someone/not-downloaded", f"{REPO}@v9", f"{REPO}@{'f' * 40}"])
def test_uncached_id_is_one_line(model, hub_cache):
    result = run_cli("flops-mllm", "--model", model, env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{model} is not in the local Hugging Face cache ({hub_cache})" in lines[0]
    assert "download it on a machine with network" in lines[0]


def test_local_directory_named_like_an_id_wins(hub_cache, tmp_path):
    work = tmp_path / "work"
    local = work / REPO
    local.mkdir(parents=True)
    (local / "config.json").write_bytes(CONFIG_13B)
    env = {"HF_HUB_CACHE": str(hub_cache)}
    assert flops("--model", REPO, env=env, cwd=work) == flops("--model", "llava-1.5-13b-shape")
    assert resolve_model("llava-1.5-7b-shape").name.startswith("llava-1.5-7b-shape")  # built-in names come first


def test_nothing_touches_the_network(hub_cache, monkeypatch, capsys):
    """In-process, with every socket connection recorded and refused: cached and uncached ids alike."""
    from mllm_deploy.calib import flops_cli

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert flops_cli.main(["--model", REPO, "--cache-dir", str(hub_cache), "--json"]) == 0
    assert flops_cli.main(["--model", "someone/elsewhere@main", "--cache-dir", str(hub_cache)]) == 1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert attempts == []


def test_what_counts_as_an_id():
    assert parse_hub_id("llava-hf/llava-1.5-7b-hf") == ("llava-hf/llava-1.5-7b-hf", None)
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in ("tiny-llava", "/abs/org/name", "./org/name", "org/name/extra", "org--x/name", "org/name@",
                      "org/name@../../etc", "-org/name", "org/name."):
        assert parse_hub_id(not_an_id) is None, not_an_id
    with pytest.raises(Exception, match="neither a directory nor a built-in name"):
        resolve_model("./org/name")


@pytest.mark.slow
def test_tiny_model_from_the_cache_calibrates_and_exports(tiny_model_dirs, tmp_path):
    """A whole model in the cache (weights, tokenizer, processor, as links into blobs) exports like its directory."""
    source = tiny_model_dirs["gqa56"]
    files = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    cache = tmp_path / "hub"
    add_snapshot(cache, "someone/tiny-llava", files, COMMIT_1)
    env = {"HF_HUB_CACHE": str(cache)}
    recipe = tmp_path / "fastv.json"
    calib = run_cli("calib-mllm", "--model", "someone/tiny-llava", "--method", "fastv", "-o", str(recipe), env=env)
    assert calib.returncode == 0, calib.stderr
    bundle = tmp_path / "bundle"
    export = run_cli("export-mllm", "--model", "someone/tiny-llava", "--recipe", str(recipe), "-o", str(bundle), env=env)
    assert export.returncode == 0, export.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source_model"] == "someone/tiny-llava"
