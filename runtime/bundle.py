"""Load and check a bundle directory written by export-mllm (schema ``mllm-deploy/bundle@1``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import BundleError
from mllm_deploy.core.hashing import sha256_file
from mllm_deploy.core.jsonio import read_json

BUNDLE_SCHEMA = "mllm-deploy/bundle@1"
GRAPHS = ("vision", "prefill", "decode")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def graph_io(self, graph: str) -> dict[str, list[dict]]:
        entry = self.manifest["graphs"][graph]
        return {"inputs": entry["inputs"], "outputs": entry["outputs"]}

    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["text"]["num_layers"])

    @property
    def visual_tokens(self) -> int:
        return int(self.manifest["model"]["visual_tokens"])

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return [int(v) for v in self.manifest["recipe"]["visual_tokens"]]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def kv_lengths(self, prompt_tokens: int) -> list[int]:
        """Tokens each layer caches after prefill: text tokens plus the visual tokens it kept."""
        text_tokens = prompt_tokens - self.visual_tokens
        return [text_tokens + kept for kept in self.visual_tokens_per_layer]


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no manifest.json; is it a bundle written by export-mllm?")
    manifest = read_json(manifest_path, BundleError, "manifest.json", "; re-export the bundle")
    if not isinstance(manifest, dict) or manifest.get("schema") != BUNDLE_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{manifest_path} has schema {found!r}, expected {BUNDLE_SCHEMA!r}")
    for key in ("graphs", "files", "model", "recipe", "tokenizer", "image", "dtype"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks '{key}'; re-export the bundle")
    for graph in GRAPHS:
        if graph not in manifest["graphs"]:
            raise BundleError(f"{manifest_path} lists no '{graph}' graph; re-export the bundle")
    return manifest


def load_bundle(path: str | Path, check_hashes: bool = True) -> Bundle:
    """Read the manifest and (by default) check every file against its recorded sha256."""
    path = Path(path)
    manifest = _read_manifest(path)
    if check_hashes:
        for rel, expected in sorted(manifest["files"].items()):
            file_path = path / rel
            if not file_path.is_file():
                raise BundleError(f"bundle file {rel} is missing from {path}; copy the whole bundle again")
            if sha256_file(file_path) != expected:
                raise BundleError(f"bundle file {rel} does not match its sha256 in manifest.json (altered or truncated)")
    return Bundle(path=path, manifest=manifest)
