"""Weights read tensor by tensor from a checkpoint's safetensors files, never the whole model at once.

A LLaVA checkpoint is one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
:class:`StreamingWeights` is a mapping from our canonical weight names (the ones the graph builders
ask for, see ``export/weights.py``) to :class:`LazyWeight` handles; ``GraphBuilder.const`` loads a
handle only when the weights file does not hold that name yet, converts it to the export dtype,
writes it and lets it go. The peak memory of an export is then about the largest fused tensor
(a layer's gate+up projection, or the embedding table), not the model.

The key names of a checkpoint depend on the transformers release that saved it (``language_model.
model.layers.0...`` before 4.52, ``model.language_model.layers.0...`` after; CLIP towers with or
without ``vision_model.``): each part's prefix is found by probing the keys that exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from mllm_deploy.core.errors import UnsupportedModelError
from mllm_deploy.formats.geometry import ModelSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# candidate prefixes of each part, newest layout last
_TEXT_ROOTS = ("language_model.model.", "model.language_model.", "language_model.")
_HEAD_ROOTS = ("language_model.lm_head.", "lm_head.", "model.lm_head.")
_VISION_ROOTS = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower.")
_PROJECTOR_ROOTS = ("multi_modal_projector.", "model.multi_modal_projector.")


def has_safetensors(model_dir: Path) -> bool:
    return (model_dir / INDEX_FILE).is_file() or (model_dir / SINGLE_FILE).is_file()


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data section) of one safetensors file."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size < 100 * 2**20:
            raise UnsupportedModelError(f"{path} is not a safetensors file (header size {size})")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsCheckpoint:
    """Key -> tensor of a (possibly sharded) safetensors checkpoint, read one tensor at a time with plain file
    reads: no memory mapping, so the pages of tensors already written do not stay resident in this process."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UnsupportedModelError(f"{index} is not a safetensors index ({exc!r})") from None
            files = sorted({self.model_dir / name for name in weight_map.values()})
        elif (self.model_dir / SINGLE_FILE).is_file():
            files = [self.model_dir / SINGLE_FILE]
        else:
            raise UnsupportedModelError(f"{self.model_dir} has no {SINGLE_FILE} or {INDEX_FILE}")
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise UnsupportedModelError(f"{self.model_dir} lacks the shard {missing[0]} its index lists")
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # key -> (file, data offset, header entry)
        for path in files:
            header, data_offset = _read_header(path)
            for key, entry in header.items():
                self.entries[key] = (path, data_offset, entry)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> Iterator[str]:
        return iter(self.entries)

    def tensor(self, key: str, dtype: np.dtype) -> np.ndarray:
        """One tensor, converted to ``dtype`` (bfloat16 widened to float32 first, as PyTorch's .float() does)."""
        if key not in self.entries:
            raise UnsupportedModelError(f"the checkpoint in {self.model_dir} has no tensor {key}")
        path, data_offset, entry = self.entries[key]
        start, end = (int(x) for x in entry["data_offsets"])
        kind, shape = entry["dtype"], [int(d) for d in entry["shape"]]
        if kind == "BF16":
            raw = np.empty(max(end - start, 0) // 2, np.uint16)
        elif kind in _ST_DTYPES:
            raw = np.empty(max(end - start, 0) // np.dtype(_ST_DTYPES[kind]).itemsize, _ST_DTYPES[kind])
        else:
            raise UnsupportedModelError(f"{path.name}: tensor {key} has dtype {kind}, which export cannot read")
        with open(path, "rb") as handle:
            handle.seek(data_offset + start)
            if handle.readinto(raw.view(np.uint8)) != end - start:
                raise UnsupportedModelError(f"{path.name} is truncated (tensor {key})")
        if kind == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.reshape(shape).astype(dtype, copy=False)

    def prefix(self, candidates: tuple[str, ...], probe: str, part: str) -> str:
        for candidate in candidates:
            if candidate + probe in self.entries:
                return candidate
        raise UnsupportedModelError(f"the checkpoint in {self.model_dir} has no {part} weights (looked for "
                                    f"{' or '.join(c + probe for c in candidates)})")


@dataclass(frozen=True)
class LazyWeight:
    """A weight not read yet: ``load()`` reads its source tensors and builds the array."""
    name: str
    load: Callable[[], np.ndarray]


class StreamingWeights(Mapping[str, LazyWeight]):
    """Canonical weight name -> LazyWeight, for every weight the three graphs use (export/weights.py's names and
    layouts: linear weights transposed to [in, out], q/k/v and gate/up fused along the output dimension)."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, spec: ModelSpec, dtype: np.dtype, num_vision_layers: int,
                 tie_word_embeddings: bool = False):
        self.checkpoint, self.dtype = checkpoint, np.dtype(dtype)
        text = checkpoint.prefix(_TEXT_ROOTS, "embed_tokens.weight", "text model")
        vision = checkpoint.prefix(_VISION_ROOTS, "embeddings.patch_embedding.weight", "vision tower")
        projector = checkpoint.prefix(_PROJECTOR_ROOTS, "linear_1.weight", "projector")
        recipes: dict[str, Callable[[], np.ndarray]] = {}

        def plain(name: str, key: str) -> None:
            recipes[name] = lambda: self._get(key)

        def linear(name: str, keys: list[str]) -> None:
            recipes[f"{name}.weight"] = lambda: np.concatenate([self._get(k + ".weight").T for k in keys], axis=1)
            if keys[0] + ".bias" in checkpoint:
                recipes[f"{name}.bias"] = lambda: np.concatenate([self._get(k + ".bias") for k in keys])

        plain("vision.patch_embedding.weight", vision + "embeddings.patch_embedding.weight")
        plain("vision.class_embedding", vision + "embeddings.class_embedding")
        plain("vision.position_embedding", vision + "embeddings.position_embedding.weight")
        plain("vision.pre_layrnorm.weight", vision + "pre_layrnorm.weight")
        plain("vision.pre_layrnorm.bias", vision + "pre_layrnorm.bias")
        for i in range(num_vision_layers):
            src, dst = f"{vision}encoder.layers.{i}.", f"vision.layers.{i}"
            for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
                plain(f"{dst}.{ours}.weight", f"{src}{theirs}.weight")
                plain(f"{dst}.{ours}.bias", f"{src}{theirs}.bias")
            linear(f"{dst}.attn.qkv", [f"{src}self_attn.{p}_proj" for p in "qkv"])
            linear(f"{dst}.attn.o", [f"{src}self_attn.out_proj"])
            linear(f"{dst}.mlp.fc1", [f"{src}mlp.fc1"])
            linear(f"{dst}.mlp.fc2", [f"{src}mlp.fc2"])
        linear("projector.linear_1", [projector + "linear_1"])
        linear("projector.linear_2", [projector + "linear_2"])
        plain("text.embed_tokens", text + "embed_tokens.weight")
        for i in range(spec.text.num_layers):
            src, dst = f"{text}layers.{i}.", f"text.layers.{i}"
            plain(f"{dst}.input_norm.weight", f"{src}input_layernorm.weight")
            plain(f"{dst}.post_norm.weight", f"{src}post_attention_layernorm.weight")
            linear(f"{dst}.attn.qkv", [f"{src}self_attn.{p}_proj" for p in "qkv"])
            linear(f"{dst}.attn.o", [f"{src}self_attn.o_proj"])
            linear(f"{dst}.mlp.gate", [f"{src}mlp.gate_proj"])  # two products: no Split of a fused one
            linear(f"{dst}.mlp.up", [f"{src}mlp.up_proj"])
            linear(f"{dst}.mlp.down", [f"{src}mlp.down_proj"])
        plain("text.norm.weight", text + "norm.weight")
        if getattr(spec, "is_anyres", False):  # LLaVA-NeXT: the vector closing each grid row of visual tokens
            newline = next((k for k in ("image_newline", "model.image_newline") if k in checkpoint), None)
            if newline is None:
                raise UnsupportedModelError(f"the LLaVA-NeXT checkpoint in {checkpoint.model_dir} has no image_newline")
            plain("image_newline", newline)
        head = next((root + "weight" for root in _HEAD_ROOTS if root + "weight" in checkpoint), None)
        if head is None and not tie_word_embeddings:
            raise UnsupportedModelError(f"the checkpoint in {checkpoint.model_dir} has no lm_head weight and "
                                        "tie_word_embeddings is false")
        head = head or text + "embed_tokens.weight"
        recipes["lm_head.weight"] = lambda: np.ascontiguousarray(self._get(head).T)
        self._recipes = recipes

    def _get(self, key: str) -> np.ndarray:
        return self.checkpoint.tensor(key, self.dtype)

    def __getitem__(self, name: str) -> LazyWeight:
        return LazyWeight(name, self._recipes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)
