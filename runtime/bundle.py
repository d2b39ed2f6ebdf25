"""Load and check a bundle directory written by export-mllm (schema ``mllm-deploy/bundle@1``).

The manifest is checked field by field (formats/manifest.py) before any file is hashed: a manifest
that loads here gives the runtime every value it reads, with the right type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import BundleError
from mllm_deploy.core.hashing import sha256_file
from mllm_deploy.core.jsonio import read_json
from mllm_deploy.formats.manifest import GRAPHS, check_manifest



@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def graph_io(self, graph: str) -> dict[str, list[dict]]:
        entry = self.manifest["graphs"][graph]
        return {"inputs": entry["inputs"], "outputs": entry["outputs"]}

    def shape_inputs(self, graph: str) -> list[str] | None:
        """Inputs TensorRT reads as shape tensors (trt/shape_inputs.py); None for bundles that predate the field."""
        found = self.manifest["graphs"][graph].get("shape_inputs")
        return None if found is None else list(found)

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

    @property
    def max_positions(self) -> int:
        return int(self.manifest["model"]["text"]["max_position_embeddings"])

    def kv_lengths(self, prompt_tokens: int) -> list[int]:
        """Tokens each layer caches after prefill: text tokens plus the visual tokens it kept."""
        text_tokens = prompt_tokens - self.visual_tokens
        return [text_tokens + kept for kept in self.visual_tokens_per_layer]

    def weights_bytes(self) -> int:
        """Bytes of every file the graphs load (graphs and external weights), for memory estimates."""
        files = [self.manifest["graphs"][graph]["file"] for graph in GRAPHS]
        weights = self.manifest.get("weights")
        files += [weights] if isinstance(weights, str) and (self.path / weights).is_file() else []
        return sum((self.path / f).stat().st_size for f in files)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no manifest.json; is it a bundle written by export-mllm?")
    manifest = read_json(manifest_path, BundleError, "manifest.json", "; re-export the bundle")
    try:
        return check_manifest(manifest)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None


def load_bundle(path: str | Path, check_hashes: bool = True) -> Bundle:
    """Read and check the manifest and (by default) every file against its recorded sha256."""
    path = Path(path)
    manifest = _read_manifest(path)
    if check_hashes:
        for rel, expected in sorted(manifest["files"].items()):
            file_path = path / rel
            if not file_path.is_file():
                raise BundleError(f"bundle file {rel} is missing from {path}; copy the whole bundle again")
            try:
                actual = sha256_file(file_path)
            except OSError as exc:
                raise BundleError(f"bundle file {rel} cannot be read: {exc.strerror or exc}") from None
            if actual != expected:
                raise BundleError(f"bundle file {rel} does not match its sha256 in manifest.json (altered or"
                                  " truncated); copy or export the bundle again")
    return Bundle(path=path, manifest=manifest)
