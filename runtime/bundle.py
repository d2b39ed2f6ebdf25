"""Load and check a bundle directory written by export-mllm (schema ``mllm-deploy/bundle@1``).

The manifest is checked field by field (formats/manifest.py) before any file is hashed: a manifest
that loads here gives the runtime every value it reads, with the right type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import BundleError
from mllm_deploy.core.hashing import sha256_file
from mllm_deploy.core.jsonio import read_json
from mllm_deploy.formats.manifest import QUANTIZED_DTYPES, bundle_graphs, check_manifest



@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def graph_io(self, graph: str) -> dict[str, list[dict]]:
        """Inputs and outputs; and where the graph's external weights lie, for runners that map them once."""
        entry = self.manifest["graphs"][graph]
        io = {"inputs": entry["inputs"], "outputs": entry["outputs"]}
        if entry.get("external_initializers"):
            io["external_initializers"] = entry["external_initializers"]
        return io

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
    def patch_grid(self) -> int:
        """Patches per side of one vision-tower input (LLaVA-NeXT: of one AnyRes view)."""
        vision = self.manifest["model"]["vision"]
        return int(vision["image_size"]) // int(vision["patch_size"])

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return [int(v) for v in self.manifest["recipe"]["visual_tokens"]]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def max_positions(self) -> int:
        return int(self.manifest["model"]["text"]["max_position_embeddings"])

    @property
    def skip_attention(self) -> set[int]:
        """Layers without attention (EAS recipes): they hold no KV cache."""
        return set(self.manifest["recipe"].get("skip_attention", []))

    def kv_lengths(self, prompt_tokens: int) -> list[int]:
        """Tokens each layer caches after prefill: text tokens plus the visual tokens it kept (0: no attention)."""
        text_tokens = prompt_tokens - self.visual_tokens
        skipped = self.skip_attention
        return [0 if l in skipped else text_tokens + kept for l, kept in enumerate(self.visual_tokens_per_layer)]

    def quantized_bytes(self) -> int:
        """Bytes of the weights file holding quantized weights (int4/int8 integers and their scales); 0 unless the
        bundle was exported with --quantize."""
        if not self.manifest.get("quantization"):
            return 0
        entries = {}
        for graph in self.manifest["graphs"].values():
            for entry in graph.get("external_initializers", []):
                entries[entry["name"]] = entry
        return sum(e["length"] for name, e in entries.items()
                   if e["dtype"] in QUANTIZED_DTYPES or name.endswith(".scale"))

    def weights_bytes(self) -> int:
        """Bytes of every file the graphs load (graphs and external weights), for memory estimates."""
        files = [self.manifest["graphs"][graph]["file"] for graph in bundle_graphs(self.manifest)]
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


VERIFIED_FILE = ".verified.json"  # sha256 checks already done: file -> (sha256, size, mtime_ns)
VERIFIED_SCHEMA = "mllm-deploy/verified@1"


def _stat_key(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _read_verified(path: Path) -> dict[str, dict]:
    try:
        data = json.loads((path / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("schema") == VERIFIED_SCHEMA else None
    return files if isinstance(files, dict) else {}


def record_verified(path: Path, hashes: dict[str, str]) -> None:
    """Remember that these files had these sha256 at their current size and mtime (best effort: a read-only
    bundle is simply hashed again next time)."""
    from mllm_deploy.core.fsutil import atomic_write_text

    entries = {}
    for rel, digest in sorted(hashes.items()):
        try:
            size, mtime_ns = _stat_key(path / rel)
        except OSError:
            continue
        entries[rel] = {"sha256": digest, "size": size, "mtime_ns": mtime_ns}
    try:
        atomic_write_text(path / VERIFIED_FILE, json.dumps({"schema": VERIFIED_SCHEMA, "files": entries}, indent=1))
    except OSError:
        pass


def check_files(path: Path, manifest: dict[str, Any], verify_all: bool = False) -> int:
    """Check every file against the manifest's sha256; returns how many were hashed.

    A file is hashed once: afterwards its size and mtime are recorded beside the bundle (``.verified.json``)
    and a file whose size and mtime are unchanged is trusted. Any write changes the mtime, so an altered or
    truncated file is hashed again and refused. ``verify_all`` hashes everything regardless.
    """
    verified = {} if verify_all else _read_verified(path)
    hashed: dict[str, str] = {}
    trusted: dict[str, str] = {}
    for rel, expected in sorted(manifest["files"].items()):
        file_path = path / rel
        if not file_path.is_file():
            raise BundleError(f"bundle file {rel} is missing from {path}; copy the whole bundle again")
        try:
            size, mtime_ns = _stat_key(file_path)
            entry = verified.get(rel)
            if (isinstance(entry, dict) and entry.get("sha256") == expected and entry.get("size") == size
                    and entry.get("mtime_ns") == mtime_ns):
                trusted[rel] = expected
                continue
            actual = sha256_file(file_path)
        except OSError as exc:
            raise BundleError(f"bundle file {rel} cannot be read: {exc.strerror or exc}") from None
        if actual != expected:
            raise BundleError(f"bundle file {rel} does not match its sha256 in manifest.json (altered or"
                              " truncated); copy or export the bundle again")
        hashed[rel] = actual
    if hashed:
        record_verified(path, {**trusted, **hashed})
    return len(hashed)


def load_bundle(path: str | Path, check_hashes: bool = True, verify_all: bool = False) -> Bundle:
    """Read and check the manifest and (by default) every file against its recorded sha256; files already
    verified at their current size and mtime are not hashed again unless ``verify_all``."""
    path = Path(path)
    manifest = _read_manifest(path)
    if check_hashes:
        check_files(path, manifest, verify_all)
    return Bundle(path=path, manifest=manifest)
