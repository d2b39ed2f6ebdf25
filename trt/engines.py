"""The contract between build-mllm and the TensorRT runtime: where engines live, what makes one stale,
and how a manifest's tensors map onto an engine's.

``BUNDLE/engines/`` holds one ``<graph>.plan`` per graph and ``index.json`` (schema
``mllm-deploy/engines@1``) with, per engine, its cache key: the graph and weights sha256 (from the
manifest), the recipe's sha256, the TensorRT version, the GPU name and compute capability, the
plugin library's sha256, and the build settings (precision, profiles). An engine is used only if
every field that describes the machine and the bundle still matches; anything else is refused
with the field named. Pure functions: no TensorRT here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mllm_deploy.core.errors import BundleError
from mllm_deploy.core.hashing import canonical_json, sha256_text

ENGINES_DIR = "engines"
INDEX_FILE = "index.json"
ENGINES_SCHEMA = "mllm-deploy/engines@1"
# Fields that must still describe this bundle and this machine when an engine is loaded.
IDENTITY_FIELDS = ("graph_sha256", "weights_sha256", "recipe_sha256", "tensorrt", "gpu", "compute_capability")
# TensorRT DataType names (trt.DataType.X.name) -> manifest dtype strings
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool",
              "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8"}


@dataclass(frozen=True)
class EngineKey:
    graph: str
    graph_sha256: str
    weights_sha256: str | None
    recipe_sha256: str
    tensorrt: str
    gpu: str
    compute_capability: str  # "8.7"
    plugins_sha256: str | None = None  # None: the graph has no routing plugin nodes
    settings: Mapping[str, Any] = field(default_factory=dict)  # precision, profiles, strongly typed, ...

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["settings"] = dict(self.settings)
        return out

    @property
    def digest(self) -> str:
        """sha256 of the whole key: equal digests mean the same engine would be built."""
        return sha256_text(canonical_json(self.to_dict()))


def engine_file(graph: str) -> str:
    return f"{graph}.plan"


def engines_dir(bundle_dir: str | Path) -> Path:
    return Path(bundle_dir) / ENGINES_DIR


def bundle_identity(manifest: Mapping[str, Any], graph: str) -> dict[str, str | None]:
    """The bundle's part of a key: sha256 of the graph file, its weights file and the canonical recipe."""
    graphs = manifest.get("graphs", {})
    if graph not in graphs:
        raise BundleError(f"the manifest lists no '{graph}' graph; re-export the bundle")
    files = manifest.get("files", {})
    graph_file = graphs[graph]["file"]
    if graph_file not in files:
        raise BundleError(f"the manifest records no sha256 for {graph_file}; re-export the bundle")
    weights = manifest.get("weights")
    return {"graph_sha256": files[graph_file], "weights_sha256": files.get(weights) if weights else None,
            "recipe_sha256": sha256_text(canonical_json(manifest.get("recipe")))}


def engine_key(manifest: Mapping[str, Any], graph: str, *, tensorrt: str, gpu: str, compute_capability: str,
               plugins_sha256: str | None = None, settings: Mapping[str, Any] | None = None) -> EngineKey:
    return EngineKey(graph=graph, **bundle_identity(manifest, graph), tensorrt=tensorrt, gpu=gpu,
                     compute_capability=compute_capability, plugins_sha256=plugins_sha256,
                     settings=dict(settings or {}))


def make_index(keys: Sequence[EngineKey], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"schema": ENGINES_SCHEMA, **dict(extra or {}),
            "engines": {key.graph: {"file": engine_file(key.graph), "key": key.to_dict(), "digest": key.digest}
                        for key in keys}}


def read_index(index: Any, source: str = INDEX_FILE) -> dict[str, Any]:
    """Validate a parsed index.json; BundleError says how to fix a bad one."""
    if not isinstance(index, dict) or index.get("schema") != ENGINES_SCHEMA or not isinstance(index.get("engines"), dict):
        raise BundleError(f"{source} is not an engine index ({ENGINES_SCHEMA}); run build-mllm again")
    for graph, entry in index["engines"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), dict) or "file" not in entry:
            raise BundleError(f"{source}: the entry for '{graph}' is malformed; run build-mllm again")
    return index


def stale_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The identity fields whose recorded value differs from the current one (current None: not checked)."""
    return [name for name in IDENTITY_FIELDS
            if current.get(name) is not None and recorded.get(name) != current.get(name)]


def check_fresh(index: Mapping[str, Any], graph: str, manifest: Mapping[str, Any], *, tensorrt: str,
                gpu: str | None = None, compute_capability: str | None = None,
                plugins_sha256: str | None = None) -> dict[str, Any]:
    """The index entry of ``graph`` if its engine was built for this bundle, TensorRT and GPU; else BundleError."""
    entry = index.get("engines", {}).get(graph)
    if entry is None:
        raise BundleError(f"no TensorRT engine for the '{graph}' graph; run build-mllm on this bundle")
    recorded = entry["key"]
    current = {**bundle_identity(manifest, graph), "tensorrt": tensorrt, "gpu": gpu,
               "compute_capability": compute_capability}
    stale = stale_fields(recorded, current)
    if stale:
        what = "; ".join(f"{name} was {recorded.get(name)!r}, now {current[name]!r}" for name in stale)
        raise BundleError(f"engines/{entry['file']} is stale ({what}); run build-mllm again on this machine")
    if plugins_sha256 is not None and recorded.get("plugins_sha256") not in (None, plugins_sha256):
        raise BundleError(f"engines/{entry['file']} was built with another plugin library (sha256 "
                          f"{str(recorded.get('plugins_sha256'))[:12]}..., given {plugins_sha256[:12]}...); "
                          "pass the same --plugins library or rebuild")
    return dict(entry)


# ---- tensor names ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorBinding:
    name: str
    is_input: bool
    dtype: str  # manifest dtype string
    shape: tuple  # manifest shape (ints and symbolic names)


@dataclass(frozen=True)
class TensorMap:
    inputs: tuple[TensorBinding, ...]
    outputs: tuple[TensorBinding, ...]
    unused_inputs: tuple[str, ...]  # manifest inputs the engine dropped (never read): not fed


def map_tensors(io: Mapping[str, Sequence[Mapping[str, Any]]], engine_tensors: Sequence[tuple[str, bool, str]],
                graph: str) -> TensorMap:
    """Match the manifest's inputs/outputs with an engine's (name, is_input, TensorRT dtype name) list.

    TensorRT keeps the ONNX names; it may drop a graph input nothing reads. Any other difference
    (missing output, extra tensor, other dtype, input/output swapped) means the engine is not this graph's.
    """
    engine = {name: (is_input, TRT_DTYPES.get(dtype, dtype.lower())) for name, is_input, dtype in engine_tensors}
    problems: list[str] = []
    inputs, outputs, unused = [], [], []
    for is_input, entries in ((True, io["inputs"]), (False, io["outputs"])):
        for entry in entries:
            name = entry["name"]
            if name not in engine:
                if is_input:
                    unused.append(name)
                else:
                    problems.append(f"output {name} is missing")
                continue
            engine_is_input, engine_dtype = engine.pop(name)
            if engine_is_input != is_input:
                problems.append(f"{name} is an {'input' if engine_is_input else 'output'} of the engine")
            elif engine_dtype != entry["dtype"]:
                problems.append(f"{name} is {engine_dtype} in the engine, {entry['dtype']} in the manifest")
            else:
                binding = TensorBinding(name, is_input, entry["dtype"], tuple(entry["shape"]))
                (inputs if is_input else outputs).append(binding)
    problems += [f"{name} is not in the manifest" for name in sorted(engine)]
    if problems:
        raise BundleError(f"engines/{engine_file(graph)} does not match the {graph} graph of the manifest: "
                          + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "") + "; run build-mllm again")
    return TensorMap(tuple(inputs), tuple(outputs), tuple(unused))
