"""ONNX Runtime backend (CPU by default; CUDA when the provider is installed and asked for)."""

from __future__ import annotations

import os

import numpy as np

from mllm_deploy.core.errors import BundleError, DependencyError
from mllm_deploy.runtime.backends.base import Runner


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "bool": "tensor(bool)"}


class OrtRunner(Runner):
    def __init__(self, graph_path, io, name, providers: list[str] | None = None, threads: int | None = None,
                 profile: bool = False, custom_ops: list[str] | None = None):
        super().__init__(graph_path, io, name)
        self.custom_ops = list(custom_ops or [])
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.profile = profile
        self.session = None
        self._output_names = [entry["name"] for entry in io["outputs"]]

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - a core dependency
            raise DependencyError("onnxruntime is not installed; pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        elif os.environ.get("MLLM_DEPLOY_THREADS"):
            options.intra_op_num_threads = int(os.environ["MLLM_DEPLOY_THREADS"])
        options.enable_profiling = self.profile
        options.log_severity_level = 3
        try:
            if self.custom_ops:
                self.session = self._plugin_session(options)
            else:
                self.session = ort.InferenceSession(str(self.graph_path), options, providers=self.providers)
        except DependencyError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"onnxruntime cannot load {self.graph_path.name}: {first_line}") from None
        self._check_io()

    def _check_io(self) -> None:
        """The graph file must have the inputs and outputs the manifest promises (an edited manifest
        passes the hash check, since manifest.json is not hashed): refuse now, not at the first request."""
        graph = {"inputs": {a.name: a for a in self.session.get_inputs()},
                 "outputs": {a.name: a for a in self.session.get_outputs()}}
        for kind in ("inputs", "outputs"):
            for meta in self.io[kind]:
                arg = graph[kind].get(meta["name"])
                if arg is None:
                    raise BundleError(f"{self.graph_path.name} has no {kind[:-1]} {meta['name']!r} that manifest.json"
                                      " lists; re-export the bundle")
                static = [(d, s) for d, s in zip(meta["shape"], arg.shape) if isinstance(d, int) and isinstance(s, int)]
                if arg.type != _ORT_TYPES[meta["dtype"]] or len(arg.shape) != len(meta["shape"]) or \
                        any(d != s for d, s in static):
                    raise BundleError(f"{self.graph_path.name}: {meta['name']} is {arg.type} {arg.shape} in the graph,"
                                      f" {meta['dtype']} {meta['shape']} in manifest.json; re-export the bundle")
        extra = sorted(set(graph["inputs"]) - {meta["name"] for meta in self.io["inputs"]})
        if extra:
            raise BundleError(f"{self.graph_path.name} has input {extra[0]!r} that manifest.json does not list;"
                              " re-export the bundle")

    def _plugin_session(self, options):
        """Graphs with mllm_deploy routing ops run through our ONNX Runtime kernels."""
        try:
            from mllm_deploy.plugins.ort_kernels import create_session
        except ImportError as exc:
            raise DependencyError(
                f"{self.graph_path.name} uses routing plugins ({', '.join(self.custom_ops)}); running it on ONNX Runtime"
                f" needs onnx and onnxruntime-extensions (pip install 'mllm-deploy[ort-plugins]'): {exc}"
            ) from None
        return create_session(self.graph_path, options, self.providers)

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, values))

    def end_profiling(self) -> str | None:
        return self.session.end_profiling() if self.profile and self.session is not None else None
