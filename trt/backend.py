"""TensorRT backend: runs ``BUNDLE/engines/<graph>.plan`` (written by build-mllm) behind the Runner interface.

Only tensorrt and cuda-python (``cuda.bindings``) are imported, and only at ``activate()``: no torch.
Per graph: the engine is refused unless its cache key still matches the bundle, the TensorRT
version and the GPU (``trt/engines.py``); the routing plugin library is loaded first when the
graph has plugin nodes (the copy build-mllm keeps in ``engines/``, or ``plugins=`` /
``$MLLM_DEPLOY_TRT_PLUGINS``); one execution context per optimisation profile; device buffers
grow to the largest shape seen and are reused; ``execute_async_v3`` on the runner's stream.

Inputs the engine keeps on the host (``get_tensor_location`` is HOST: the shape tensors, such as
prefill's ``image_start``) are bound to host arrays the runner owns, which stay alive and at the
same address while TensorRT may read them; every other tensor is bound to device memory. Their
values are checked against the profile's value range before TensorRT sees them.

Decode keeps every layer's KV buffers on the device at the profile's largest capacity. The
host cache (runtime/kv.py) only grows at the end between steps, so when the same host arrays
are fed again only the new slots are copied (``trt_plan.changed_rows``), not the whole cache.
With ``cuda_graph=True`` (or ``MLLM_DEPLOY_TRT_CUDA_GRAPH=1``) decode steps replay a captured
CUDA graph once the shapes of a generation have been seen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mllm_deploy.trt.engines import INDEX_FILE, check_fresh, engines_dir, map_tensors, read_index
from mllm_deploy.core.errors import BundleError, InputFileError, MllmError
from mllm_deploy.core.hashing import sha256_file
from mllm_deploy.core.jsonio import read_json
from mllm_deploy.runtime.backends.base import NP_DTYPES, Runner
from mllm_deploy.trt.plan import changed_rows, choose_profile, plan_kv_from_profile
from mllm_deploy.formats.manifest import parse_kv_name, past_name



def _values_key(name: str) -> str:
    """The profile entry of a shape tensor's values (beside the entries of input shapes)."""
    return f"{name} values"


def _profile_values(engine, name: str, profile: int):
    """A shape tensor's (min, opt, max) values on a profile. The bindings' function takes (profile_index, name)
    positionally although its documentation names them (name, profile_index): accept either order."""
    try:
        return engine.get_tensor_profile_values(profile, name)
    except TypeError:
        return engine.get_tensor_profile_values(name, profile)


class _DeviceBuffer:
    def __init__(self, runner: "TrtRunner", nbytes: int):
        self.ptr = runner._call(runner.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")
        self.nbytes = int(nbytes)


class TrtRunner(Runner):
    def __init__(self, graph_path, io, name, custom_ops: list[str] | None = None, plugins: str | None = None,
                 cuda_graph: bool | None = None, **_unused):
        super().__init__(graph_path, io, name)
        self.custom_ops = list(custom_ops or [])
        self.bundle_dir = Path(graph_path).resolve().parent
        self.plugins = plugins or os.environ.get("MLLM_DEPLOY_TRT_PLUGINS") or None
        env_graph = os.environ.get("MLLM_DEPLOY_TRT_CUDA_GRAPH", "") not in ("", "0")
        self.use_cuda_graph = (cuda_graph if cuda_graph is not None else env_graph) and name == "decode"
        self.trt = self.cudart = self.engine = None
        self.contexts: list = []
        self.profiles: list[dict] = []
        self.buffers: dict[str, _DeviceBuffer] = {}
        self._uploaded: dict[str, tuple[np.ndarray, int]] = {}  # past.* name -> (host array, slots on device)
        self._graphs: dict[tuple, object] = {}
        self._seen: set[tuple] = set()
        self.host_inputs: dict[str, np.ndarray] = {}  # shape-tensor inputs: host memory TensorRT reads
        self.stream = None
        self.kv_plan = None

    # ---- CUDA helpers ----------------------------------------------------------------------------------
    def _call(self, result, what: str):
        from mllm_deploy.trt.env import cuda_call

        return cuda_call(self.cudart, result, what)

    def _buffer(self, name: str, nbytes: int) -> _DeviceBuffer:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                self._call(self.cudart.cudaFree(buffer.ptr), "cudaFree")
            buffer = self.buffers[name] = _DeviceBuffer(self, nbytes)
            self._call(self.cudart.cudaMemsetAsync(buffer.ptr, 0, max(nbytes, 1), self.stream), "cudaMemset")
            self._uploaded.pop(name, None)
            self._graphs.clear()  # captured graphs hold the old addresses
        return buffer

    def _copy_in(self, buffer: _DeviceBuffer, array: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.cudart.cudaMemcpyAsync(buffer.ptr, array.ctypes.data, array.nbytes, kind, self.stream),
                   "copy to device")

    def _copy_kv_slots(self, buffer: _DeviceBuffer, array: np.ndarray, start: int, end: int) -> None:
        """Copy slots [start, end) of a [1, Hkv, C, Dh] host cache: one strided 2-D copy over the heads."""
        _, heads, capacity, head_dim = array.shape
        row = head_dim * array.itemsize
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.cudart.cudaMemcpy2DAsync(int(buffer.ptr) + start * row, capacity * row,
                                                 array.ctypes.data + start * row, capacity * row,
                                                 (end - start) * row, heads, kind, self.stream), "copy KV slots")

    # ---- Runner ----------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        from mllm_deploy.trt.env import import_cudart, import_tensorrt, query_gpu

        self.trt, self.cudart = import_tensorrt(), import_cudart()
        trt = self.trt
        manifest = read_json(self.bundle_dir / "manifest.json", BundleError, "manifest.json")
        index_path = engines_dir(self.bundle_dir) / INDEX_FILE
        if not index_path.is_file():
            raise BundleError(f"{self.bundle_dir} has no TensorRT engines; run build-mllm {self.bundle_dir} first")
        index = read_index(read_json(index_path, BundleError, "engines/index.json"), str(index_path))
        gpu, capability = query_gpu()
        plugins = self._plugin_library(index) if self.custom_ops else None
        entry = check_fresh(index, self.name, manifest, tensorrt=trt.__version__, gpu=gpu,
                            compute_capability=capability,
                            plugins_sha256=sha256_file(plugins) if plugins is not None else None)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if plugins is not None:
            from mllm_deploy.trt.env import load_plugin_library

            load_plugin_library(trt, runtime.get_plugin_registry(), plugins)
        self._runtime = runtime
        self.engine = runtime.deserialize_cuda_engine((engines_dir(self.bundle_dir) / entry["file"]).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT cannot deserialize engines/{entry['file']}; run build-mllm again")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        tensors = [(n, self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, self.engine.get_tensor_dtype(n).name)
                   for n in names]
        self.map = map_tensors(self.io, tensors, self.name)
        self.stream = self._call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        dynamic = [b.name for b in self.map.inputs if any(not isinstance(d, int) for d in b.shape)]
        on_host = [b.name for b in self.map.inputs if self.engine.get_tensor_location(b.name) == trt.TensorLocation.HOST]
        for name in on_host:
            if not all(isinstance(d, int) for d in self._inputs[name]["shape"]):
                raise BundleError(f"{self.name} input {name} is a shape tensor with a dynamic shape, which the runtime "
                                  "does not support; re-export the bundle")
        self.host_inputs = {name: np.zeros(tuple(self._inputs[name]["shape"]), NP_DTYPES[self._inputs[name]["dtype"]])
                            for name in on_host}
        for profile in range(self.engine.num_optimization_profiles):
            shapes = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, profile)) for n in dynamic}
            for name in on_host:  # a shape tensor's profile is a range of values
                shapes[_values_key(name)] = tuple(tuple(v) for v in _profile_values(self.engine, name, profile))
            self.profiles.append(shapes)
            context = self.engine.create_execution_context()
            if context is None:
                raise MllmError(f"TensorRT could not create an execution context for {self.name} (out of device memory?)")
            context.set_optimization_profile_async(profile, int(self.stream))
            self.contexts.append(context)
        if not self.contexts:  # an engine without profiles (all shapes static)
            self.profiles, self.contexts = [{}], [self.engine.create_execution_context()]
        if self.name == "decode" and self.profiles[0]:
            # every layer's KV on the device once, at the largest capacity the profile allows
            self.kv_plan = plan_kv_from_profile(manifest, {n: s[2] for n, s in self.profiles[0].items()})
            for layer in self.kv_plan.layers:
                for part in ("key", "value"):
                    self._buffer(past_name(layer.layer, part), layer.bytes // 2)

    def _plugin_library(self, index: dict) -> Path:
        if self.plugins:
            path = Path(self.plugins)
        elif index.get("plugins_file"):
            path = engines_dir(self.bundle_dir) / index["plugins_file"]
        else:
            raise MllmError(f"the {self.name} graph uses routing plugins ({', '.join(self.custom_ops)}) but the "
                            "engines carry no plugin library; rebuild with build-mllm --plugins LIB")
        if not path.is_file():
            raise InputFileError(f"plugin library not found: {path}")
        return path

    def deactivate_impl(self) -> None:
        if self.cudart is not None:
            for graph in self._graphs.values():
                self.cudart.cudaGraphExecDestroy(graph)
            if self.stream is not None:
                self.cudart.cudaStreamSynchronize(self.stream)
            for buffer in self.buffers.values():
                self.cudart.cudaFree(buffer.ptr)
            if self.stream is not None:
                self.cudart.cudaStreamDestroy(self.stream)
        self.buffers.clear()
        self.host_inputs.clear()
        self._uploaded.clear()
        self._graphs.clear()
        self._seen.clear()
        self.contexts, self.profiles, self.engine, self.stream = [], [], None, None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = list(self.map.inputs)
        shapes = {b.name: tuple(feed[b.name].shape) for b in inputs}
        shapes.update({_values_key(name): tuple(int(v) for v in feed[name].reshape(-1)) for name in self.host_inputs})
        profile = choose_profile(self.profiles, shapes)
        context = self.contexts[profile]
        lengths = feed.get("past_lengths")
        for binding in inputs:
            array = np.ascontiguousarray(feed[binding.name])
            if not context.set_input_shape(binding.name, array.shape):
                raise MllmError(f"{self.name}: TensorRT refused shape {array.shape} for {binding.name}")
            host = self.host_inputs.get(binding.name)
            if host is not None:  # a shape tensor: TensorRT reads it from this host array during the call
                host[...] = array
                context.set_tensor_address(binding.name, host.ctypes.data)
                continue
            buffer = self._buffer(binding.name, array.nbytes)
            kv = parse_kv_name(binding.name)
            if kv is not None and kv[0] == "past" and lengths is not None:
                self._upload_kv(binding.name, buffer, array, int(lengths[kv[1]]))
            elif array.nbytes:
                self._copy_in(buffer, array)
            context.set_tensor_address(binding.name, int(buffer.ptr))
        outputs = {}
        for binding in self.map.outputs:
            shape = tuple(context.get_tensor_shape(binding.name))
            if any(d < 0 for d in shape):
                raise MllmError(f"{self.name}: output {binding.name} has unresolved shape {shape}")
            outputs[binding.name] = np.empty(shape, dtype=NP_DTYPES[binding.dtype])
            buffer = self._buffer(binding.name, outputs[binding.name].nbytes)
            context.set_tensor_address(binding.name, int(buffer.ptr))
        self._execute(context, profile, shapes)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in outputs.items():
            if array.nbytes:
                self._call(self.cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name].ptr, array.nbytes, kind,
                                                       self.stream), "copy to host")
        self._call(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def _upload_kv(self, name: str, buffer: _DeviceBuffer, array: np.ndarray, length: int) -> None:
        previous = self._uploaded.get(name)
        same = previous is not None and previous[0] is array and previous[0].shape == array.shape
        start, end = changed_rows(previous[1] if previous else 0, length, same)
        if not same:
            self._copy_in(buffer, array)  # a new cache: all slots (the empty ones are zeros)
        elif end > start:
            self._copy_kv_slots(buffer, array, start, end)
        self._uploaded[name] = (array, length)  # holding the array keeps its identity meaningful

    def _execute(self, context, profile: int, shapes: dict) -> None:
        stream = int(self.stream)
        if not self.use_cuda_graph:
            if not context.execute_async_v3(stream):
                raise MllmError(f"TensorRT failed to run the {self.name} engine")
            return
        key = (profile, tuple(sorted(shapes.items())))
        graph = self._graphs.get(key)
        if graph is None and key in self._seen:  # shapes seen once already: capture them now
            cudart = self.cudart
            self._call(cudart.cudaStreamBeginCapture(self.stream,
                                                     cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                       "cudaStreamBeginCapture")
            ok = context.execute_async_v3(stream)
            captured = self._call(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if ok:
                graph = self._graphs[key] = self._call(cudart.cudaGraphInstantiate(captured, 0), "cudaGraphInstantiate")
            cudart.cudaGraphDestroy(captured)
        if graph is not None:
            self._call(self.cudart.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
            return
        self._seen.add(key)  # the first run after a shape change must be a plain enqueue
        if not context.execute_async_v3(stream):
            raise MllmError(f"TensorRT failed to run the {self.name} engine")
