"""ONNX Runtime backend (CPU by default; CUDA when the provider is installed and asked for).

Weights: the prefill and decode graphs use the same LLM weights from one ``weights.bin``. The runner maps the
weights file once per process (``np.memmap``, read-only, shared by every runner of the bundle) and hands each
session those arrays as initializers (``SessionOptions.add_initializer``: no copy). What ONNX Runtime then does
with them is the ``weights`` option:

- ``"shared"``: pre-packing off in every session, so the weights are resident once and only the pages a graph
  touches are read. The least memory.
- ``"fast"``: the decode session pre-packs its MatMul weights, the others read the mapping.
- ``"packed"``: every session pre-packs (ONNX Runtime's own loading). On this project's 2-core CPU the decode
  step is ~30% faster pre-packed (MLAS re-packs an unpacked weight on every call; BENCHMARKS.md); prefill does
  not separate from "shared" beyond the machine's noise. The resident memory measured one more copy of the text
  weights for "fast" and "packed" alike (small-llava: 2.06 GB against 1.25 GB shared).

``runtime.pipeline.Pipeline`` takes "packed" when its memory estimate fits and "shared" otherwise, when asked for
"auto" (its default).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mllm_deploy.core.errors import BundleError, DependencyError
from mllm_deploy.formats.manifest import (GRAPHS, ORT_GRAPHS, QUANTIZED_DTYPES, kv_in_place, parse_kv_name,
                                         present_name)
from mllm_deploy.runtime.backends.base import NP_DTYPES, Runner


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "bool": "tensor(bool)"}


_NP_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
_MAPS: dict[tuple, np.memmap] = {}  # (path, size, mtime_ns) -> the process's one mapping of a weights file
_MAPS_LOCK = threading.Lock()


def mapped_file(path: Path) -> np.memmap:
    """One read-only mapping per weights file and process (a changed file gets a new mapping)."""
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    with _MAPS_LOCK:
        if key not in _MAPS:
            _MAPS[key] = np.memmap(path, dtype=np.uint8, mode="r")
        return _MAPS[key]


def shared_initializers(graph_dir: Path, entries: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(name, array view into the mapped weights file) for every float external initializer of a graph. Quantized
    weights (int4/int8) are left to ONNX Runtime: its CPU provider rewrites them with their DequantizeLinear into
    MatMulNBits' own packed copy when the session loads, so a shared mapping of them would only stay unused."""
    views = []
    for entry in entries:
        if entry["dtype"] in QUANTIZED_DTYPES:
            continue
        data = mapped_file(graph_dir / entry["file"])
        start, length = int(entry["offset"]), int(entry["length"])
        if start + length > data.shape[0]:
            raise BundleError(f"{entry['file']} is shorter than the manifest says ({entry['name']} ends at byte "
                              f"{start + length}); copy or export the bundle again")
        views.append((entry["name"], data[start:start + length].view(_NP_TYPES[entry["dtype"]])
                      .reshape(entry["shape"])))
    return views


GRAPH_SETS = ("auto", "onnxruntime", "portable")
WEIGHT_MODES = ("shared", "fast", "packed")
PROVIDERS = ("cpu", "cuda")
# Quantized weights: ONNX Runtime's CPU provider runs DequantizeLinear + MatMul as MatMulNBits, which by default
# rounds the activations to int8 inside each product (its accuracy level 4: the fast path, and onnxruntime-genai's
# default for int4 on CPU); "float" (accuracy level 1) keeps them float: the quantized model's exact arithmetic.
QUANT_ACTIVATIONS = ("int8", "float")


def provider_list(provider: str, device_id: int = 0) -> list:
    """ONNX Runtime's providers for --provider cpu|cuda (CUDA falls back to the CPU for ops it lacks)."""
    if provider not in PROVIDERS:
        raise BundleError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]


def _provider_names(providers) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


class OrtRunner(Runner):
    @classmethod
    def for_bundle(cls, bundle, graphs: str = "auto", **options) -> dict[str, "OrtRunner"]:
        """The bundle's onnxruntime-target prefill and decode (ONNX Runtime's fused ops) when it has them and
        ``graphs`` is "auto" or "onnxruntime"; its portable graphs (the ones TensorRT builds) otherwise."""
        if graphs not in GRAPH_SETS:
            raise BundleError(f"graphs must be one of {', '.join(GRAPH_SETS)}, got {graphs!r}")
        available = all(key in bundle.manifest["graphs"] for key in ORT_GRAPHS.values())
        cpu = options.get("provider", "cpu") == "cpu" and \
            _provider_names(options.get("providers") or ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
        if graphs == "onnxruntime" and not available:
            raise BundleError(f"{bundle.path} has no onnxruntime-target graphs; export it again (export-mllm writes"
                              " them unless --no-ort-graphs)")
        use = available and graphs != "portable" and cpu
        keys = {role: ORT_GRAPHS[role] if use and role in ORT_GRAPHS else role for role in GRAPHS}
        return {role: cls(bundle.graph_path(key), bundle.graph_io(key), role,
                          custom_ops=bundle.manifest["graphs"][key].get("custom_ops", []), **options)
                for role, key in keys.items()}

    def __init__(self, graph_path, io, name, providers: list[str] | None = None, threads: int | None = None,
                 profile: bool = False, custom_ops: list[str] | None = None, weights: str = "shared",
                 share_weights: bool | None = None, provider: str = "cpu", device_id: int = 0,
                 quant_activations: str = "int8"):
        super().__init__(graph_path, io, name)
        if quant_activations not in QUANT_ACTIVATIONS:
            raise BundleError(f"quant_activations must be one of {', '.join(QUANT_ACTIVATIONS)}, got"
                              f" {quant_activations!r}")
        self.quant_activations = quant_activations
        providers = providers or provider_list(provider, device_id)
        on_cpu = _provider_names(providers) == ["CPUExecutionProvider"]
        if share_weights is not None:  # the older spelling: False was ONNX Runtime's own loading
            weights = "shared" if share_weights else "packed"
        if weights not in WEIGHT_MODES:
            raise BundleError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
        # weights through the one mapping (CPU only: other providers copy initializers to their device anyway)
        self.share_weights = weights != "packed" and bool(io.get("external_initializers")) and on_cpu
        # ONNX Runtime pre-packs. Always where the graph holds quantized weights: MatMulNBits without its packed
        # buffers falls back to a path ~100x slower (measured on the 7B-geometry int4 bundle: 16.6 s per decode
        # step instead of 0.12 s), and those integers are not shared through the mapping anyway
        self.quantized = any(e["dtype"] in QUANTIZED_DTYPES for e in io.get("external_initializers", []))
        self.pack = weights == "packed" or (weights == "fast" and name == "decode") or self.quantized
        self._shared_values: list = []
        self.custom_ops = list(custom_ops or [])
        self.providers = providers
        self.threads = threads
        self.profile = profile
        self.session = None
        self._output_names = [entry["name"] for entry in io["outputs"]]
        # decode runs through IO binding: the KV buffers are bound once (their OrtValues wrap the runtime's own
        # arrays, which it updates in place) and the outputs go to buffers allocated once
        self.kv_in_place = name == "decode" and kv_in_place(io["outputs"])
        self.io_binding = name == "decode" and not self.custom_ops and on_cpu \
            and all(isinstance(d, int) for entry in self._fresh_outputs() for d in entry["shape"])
        if self.kv_in_place and not self.io_binding:
            raise BundleError(f"{graph_path.name} updates its KV buffers in place, which needs IO binding on the CPU"
                              " provider; use the bundle's portable graphs (graphs='portable')")
        self._binding = None
        self._bound: dict[str, tuple[np.ndarray, object]] = {}  # input name -> (array, its OrtValue)
        self._output_buffers: dict[str, np.ndarray] = {}
        self.kv_values_created = 0  # OrtValues made for past.* inputs (tests: once per buffer, not per step)

    def _fresh_outputs(self) -> list[dict]:
        """The outputs bound to buffers of their own (in-place KV outputs are bound to their past buffers)."""
        return [entry for entry in self.io["outputs"]
                if not (self.kv_in_place and (parse_kv_name(entry["name"]) or ("",))[0] == "present")]

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DependencyError("onnxruntime is not installed; pip install 'mllm-deploy[cpu]' (or [gpu] for"
                                  " onnxruntime-gpu)") from None
        wanted = [p for p in _provider_names(self.providers) if p != "CPUExecutionProvider"]
        missing = [p for p in wanted if p not in ort.get_available_providers()]
        if missing:
            raise DependencyError(f"this onnxruntime has no {missing[0]} (it has"
                                  f" {', '.join(ort.get_available_providers())}); on a machine with CUDA install"
                                  " 'mllm-deploy[gpu]' (onnxruntime-gpu) in place of onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        elif os.environ.get("MLLM_DEPLOY_THREADS"):
            options.intra_op_num_threads = int(os.environ["MLLM_DEPLOY_THREADS"])
        options.enable_profiling = self.profile
        options.log_severity_level = 3
        if self.quant_activations == "float":
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if self.share_weights:
            if not self.pack:
                options.add_session_config_entry("session.disable_prepacking", "1")  # packed copies are per session
            for name, array in shared_initializers(self.graph_path.parent, self.io["external_initializers"]):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._shared_values.append(value)  # the session reads this memory: keep it alive with the runner
                options.add_initializer(name, value)
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
        self._shared_values.clear()
        self._binding = None
        self._bound.clear()
        self._output_buffers.clear()

    def _infer_bound(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run through IO binding. An input array seen before (the same object: the KV cache's buffers) keeps
        its binding, so a decode step wraps only the three small inputs; outputs land in buffers made once."""
        import onnxruntime as ort

        if self._binding is None:
            self._binding = self.session.io_binding()
            for entry in self._fresh_outputs():
                buffer = np.empty(entry["shape"], NP_DTYPES[entry["dtype"]])
                self._output_buffers[entry["name"]] = buffer
                self._binding.bind_ortvalue_output(entry["name"], ort.OrtValue.ortvalue_from_numpy(buffer))
        for name, array in feed.items():
            bound = self._bound.get(name)
            if bound is not None and bound[0] is array:
                continue
            array = np.ascontiguousarray(array)  # the same object when it already is: then it is matched next step
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._bound[name] = (array, value)
            self._binding.bind_ortvalue_input(name, value)
            kv = parse_kv_name(name)
            self.kv_values_created += int(kv is not None)
            if kv is not None and self.kv_in_place:  # the graph writes the new entry into this very buffer
                self._binding.bind_ortvalue_output(present_name(kv[1], kv[2]), value)
        self.session.run_with_iobinding(self._binding)
        # KV outputs are copied into the cache by the caller; logits are kept by callers across steps: a copy
        return {name: buffer.copy() if parse_kv_name(name) is None else buffer
                for name, buffer in self._output_buffers.items()}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.io_binding:
            return self._infer_bound(feed)
        values = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, values))

    def end_profiling(self) -> str | None:
        return self.session.end_profiling() if self.profile and self.session is not None else None
