"""The runner interface every backend implements, and how a backend makes the runners of one bundle."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from mllm_deploy.formats.manifest import GRAPHS

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class Runner(ABC):
    """Runs one graph. ``infer`` checks the feed against the manifest's metadata first.

    Runners are context managers: ``activate`` loads (session, engine), ``deactivate`` frees.
    """

    # True when infer()'s own time is the backend's compute, so a decode step's wall time outside it is the
    # runtime's overhead (bench-mllm's decode_overhead_share). Not so for eager PyTorch, whose Python dispatch
    # runs inside infer(): the split would say nothing there.
    infer_time_is_backend_time = True
    # True when the decode graph writes each new KV entry into its past buffer itself (the onnxruntime target's
    # decode): the caller then only advances the cache lengths
    kv_in_place = False

    def __init__(self, graph_path: Path, io: dict[str, list[dict]], name: str):
        self.graph_path = Path(graph_path)
        self.io = io
        self.name = name
        self.is_active = False
        self.last_inference_ms = 0.0
        self._inputs = {entry["name"]: entry for entry in io["inputs"]}

    @classmethod
    def for_bundle(cls, bundle, **options) -> dict[str, "Runner"]:
        """One runner per graph of ``bundle`` (a ``runtime.bundle.Bundle``), none activated yet. A backend
        whose runners share one loaded model (the PyTorch reference) overrides this."""
        return {graph: cls(bundle.graph_path(graph), bundle.graph_io(graph), graph,
                           custom_ops=bundle.manifest["graphs"][graph].get("custom_ops", []), **options)
                for graph in GRAPHS}

    def device_facts(self) -> dict:
        """Where this runner computes, for benchmark results: the device, the float type it computes in
        (None: the bundle's) and its peak device memory in MiB (None: not measured)."""
        return {"device": "cpu", "run_dtype": None, "peak_device_mb": None}

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} used before activate()")
        missing = set(self._inputs) - set(feed)
        extra = set(feed) - set(self._inputs)
        if missing or extra:
            raise ValueError(f"{self.name}: feed mismatch, missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, array in feed.items():
            meta = self._inputs[name]
            if array.dtype != NP_DTYPES[meta["dtype"]]:
                raise ValueError(f"{self.name}: input {name} has dtype {array.dtype}, graph wants {meta['dtype']}")
            shape = meta["shape"]
            if len(shape) != array.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape, array.shape)):
                raise ValueError(f"{self.name}: input {name} has shape {array.shape}, graph wants {shape}")
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return outputs

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
