"""A TensorRT and CUDA stand-in that refuses what the real ones refuse, for the builder and backend tests.

TensorRT cannot be installed on our build machines, so build-mllm and the TensorRT backend are tested
against this fake. It used to accept everything (it treated all memory as host memory and had no
builder), and so it hid two defects that made every prefill engine unbuildable. It now enforces the
rules of the real API (TensorRT 10.3-11.x Python bindings, NvInferRuntime.h):

- the ONNX parser marks an input a *shape tensor* when its integer values reach a shape slot; the
  fake decides this on its own, by plain integer dataflow over ONNX shape inference, not with the
  product's analysis (trt/shape_inputs.py), so the two can disagree in a test;
- ``build_serialized_network`` fails, with TensorRT's message, when a profile gives no dimensions for a
  dynamic input or no values for a shape-tensor input (``set_shape_input``), or values out of order;
- the parser finds a routing plugin only when a library registering it was loaded; loading plugin
  creators that are already registered fails (``load_library`` returns None, as IPluginRegistry does);
- an engine's shape-tensor inputs are ``TensorLocation.HOST`` and must be bound to host memory;
  every other tensor must be bound to memory from ``cudaMalloc``;
- ``execute_async_v3`` fails when an input has no address or a shape value is outside the profile;
- ``get_tensor_profile_values`` takes ``(profile_index, name)`` positionally, as the bindings do
  (their documentation says the opposite), and raises for a tensor that is not a shape input.

"Device memory" is host memory that FakeCudart handed out; an engine runs its ONNX graph with ONNX
Runtime on the tensors found at the bound addresses.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TRT_NAMES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 9: "BOOL"}
PLUGIN_CREATORS = ("TokenSelect", "TokenScatter", "VisualScore")  # what libmllm_deploy_trt_plugins.so registers
# TensorRT's ONNX importers read these input slots as shape tensors
SHAPE_SLOTS = {"Slice": {1, 2, 3, 4}, "Range": {0, 1, 2}, "Reshape": {1}, "Expand": {1}, "Tile": {1}, "TopK": {1},
               "Pad": {1, 3}, "ConstantOfShape": {0}, "Squeeze": {1}, "Unsqueeze": {1}, "Split": {1}, "OneHot": {1},
               "Resize": {2, 3}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1}}
_INTEGER_TYPES = {6, 7, 9}  # INT32, INT64, BOOL


class FakeCudart:
    """cuda-python's (err, value) conventions over host memory; knows which addresses it allocated."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.to_device_bytes = 0

    def is_device(self, ptr: int, nbytes: int = 1) -> bool:
        return any(start <= ptr and ptr + nbytes <= start + block.nbytes for start, block in self.blocks.items())

    def cudaMalloc(self, nbytes):
        block = np.zeros(int(nbytes), np.uint8)
        self.blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, ptr):
        self.blocks.pop(int(ptr), None)
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        assert self.is_device(int(ptr), int(nbytes)), "cudaMemset on memory that is not the device's"
        ctypes.memset(int(ptr), value, int(nbytes))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device = dst if kind == 1 else src
        if nbytes and not self.is_device(int(device), int(nbytes)):
            return (1,)  # cudaErrorInvalidValue: the "device" side is not device memory
        self.to_device_bytes += int(nbytes) if kind == 1 else 0
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.to_device_bytes += int(width) * int(height) if kind == 1 else 0
        for row in range(int(height)):
            ctypes.memmove(int(dst) + row * dpitch, int(src) + row * spitch, int(width))
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorInvalidValue"


def _read(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_uint8 * max(count, 1)).from_address(int(ptr))
    return np.frombuffer(raw, np.uint8, count).view(dtype).reshape(shape).copy()


# ---- what the parser sees --------------------------------------------------------------------------------------
def _inferred_types(model) -> dict[str, int]:
    """tensor name -> ONNX element type, from ONNX shape inference (plugin outputs may be missing)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return {v.name: v.type.tensor_type.elem_type for v in
            list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}


def integer_shape_inputs(model) -> set[str]:
    """Inputs whose values reach a shape slot through integer tensors (the fake parser's own rule)."""
    types = _inferred_types(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))
    found = set()
    for value in model.graph.input:
        frontier, seen = [value.name], {value.name}
        while frontier and value.name not in found:
            tensor = frontier.pop()
            for node, slot in consumers.get(tensor, []):
                if node.domain not in ("", "ai.onnx") or node.op_type in ("Shape", "Size"):
                    continue  # plugin outputs are execution tensors; Shape/Size read no values
                if slot in SHAPE_SLOTS.get(node.op_type, ()):
                    found.add(value.name)
                    break
                for out in node.output:
                    if out and out not in seen and types.get(out) in _INTEGER_TYPES:
                        seen.add(out)
                        frontier.append(out)
    return found


class FakeTensor:
    def __init__(self, name, dtype_name, shape, is_shape_tensor=False):
        self.name, self.shape, self.is_shape_tensor = name, tuple(shape), is_shape_tensor
        self.dtype = SimpleNamespace(name=dtype_name)


class FakeLayer:
    """A parsed layer named after its ONNX node; records precision constraints."""

    def __init__(self, name, output_types):
        self.name, self.output_types, self.precision_is_set = name, list(output_types), False
        self._precision = "FLOAT"

    num_outputs = property(lambda self: len(self.output_types))

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, value):
        self._precision, self.precision_is_set = value, True

    def get_output_type(self, slot):
        return self.output_types[slot]

    def set_output_type(self, slot, value):
        self.output_types[slot] = value


class FakeNetwork:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs, self.path, self.plugins = flags, [], [], None, []
        self.layers: list[FakeLayer] = []

    num_layers = property(lambda self: len(self.layers))

    def get_layer(self, i):
        return self.layers[i]

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


def _tensors(values, shape_inputs=()):
    out = []
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        out.append(FakeTensor(v.name, ONNX_TO_TRT[v.type.tensor_type.elem_type], dims, v.name in shape_inputs))
    return out


class FakeProfile:
    def __init__(self):
        self.shapes, self.values = {}, {}

    def set_shape(self, name, low, opt, high):
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise RuntimeError(f"{name}: min <= opt <= max does not hold")
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    def set_shape_input(self, name, low, opt, high):
        if not all(isinstance(v, (int, np.integer)) for v in (*low, *opt, *high)):
            raise TypeError("set_shape_input takes lists of ints")
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise RuntimeError("min input provided for shape tensor is inconsistent with other inputs.")
        self.values[name] = (tuple(low), tuple(opt), tuple(high))


class FakeTimingCache:
    def __init__(self, data: bytes):
        self.entries = json.loads(data.decode()) if data else []

    def serialize(self):
        return json.dumps(self.entries).encode()


class FakeConfig:
    def __init__(self):
        self.profiles, self.flags, self.pool, self.cache, self.progress_monitor = [], set(), {}, None, None

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class FakeTensorRT:
    """One process's TensorRT: a module-like object with one plugin registry (see the module doc)."""

    __version__ = "10.3.0.30"

    def __init__(self, cudart: FakeCudart, version: str = "10.3.0.30"):
        self.__version__ = version
        self.cudart = cudart
        self.registered: dict[str, str] = {}  # plugin creator -> library path
        self.loads: list[str] = []
        self.builds: list[str] = []
        fake = self

        class ILogger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

            def __init__(self, *args):
                pass

        class Logger(ILogger):
            def __init__(self, level=2):
                self.level = level

            def log(self, severity, msg):
                pass

        class IProgressMonitor:
            def __init__(self):
                pass

        class Registry:
            def load_library(self, path):
                fake.loads.append(str(path))
                if any(name in fake.registered for name in PLUGIN_CREATORS):
                    return None  # "The call will fail and return nullptr if any of the plugins are already registered"
                fake.registered.update({name: str(path) for name in PLUGIN_CREATORS})
                return SimpleNamespace(path=str(path))

        registry = Registry()

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def get_plugin_registry(self):
                return registry

            def create_network(self, flags=0):
                return FakeNetwork(flags)

            def create_builder_config(self):
                return FakeConfig()

            def create_optimization_profile(self):
                return FakeProfile()

            def build_serialized_network(self, network, config):
                error = fake.validate(network, config)
                if error:
                    self.logger.log(ILogger.ERROR, error)
                    return None
                if config.progress_monitor is not None:
                    config.progress_monitor.phase_start("Building engine", None, 1)
                    config.progress_monitor.step_complete("Building engine", 0)
                    config.progress_monitor.phase_finish("Building engine")
                config.cache.entries.append(Path(network.path).stem)
                fake.builds.append(Path(network.path).stem)
                pinned = [layer.name for layer in network.layers if layer.precision_is_set]
                if pinned and "obey" not in config.flags and "prefer" not in config.flags:
                    self.logger.log(ILogger.WARNING, "precision constraints are ignored without a constraint flag")
                    pinned = []
                profiles = [{"shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()},
                             "values": {k: [list(s) for s in v] for k, v in p.values.items()}} for p in config.profiles]
                return json.dumps({"onnx": str(network.path), "profiles": profiles, "plugins": network.plugins,
                                   "shape_inputs": [t.name for t in network.inputs if t.is_shape_tensor],
                                   "fp16": "fp16" in config.flags, "fp32_layers": pinned}).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.logger, self.errors = network, logger, []

            num_errors = property(lambda self: len(self.errors))

            def get_error(self, i):
                return SimpleNamespace(desc=lambda: self.errors[i])

            def parse_from_file(self, path):
                import onnx

                model = onnx.load(str(path), load_external_data=False)
                plugins = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
                missing = [op for op in plugins if op not in fake.registered]
                if missing:
                    self.errors.append(f"Plugin not found, are the plugin name, version, and namespace correct? "
                                       f"({missing[0]})")
                    return False
                shape_inputs = integer_shape_inputs(model)
                self.network.path, self.network.plugins = str(path), plugins
                self.network.inputs = _tensors(model.graph.input, shape_inputs)
                self.network.outputs = _tensors(model.graph.output)
                types = _inferred_types(model)  # a layer's output types, as the parser gives them
                self.network.layers = [FakeLayer(n.name, [ONNX_TO_TRT.get(types.get(out), "FLOAT") for out in n.output])
                                       for n in model.graph.node]
                return True

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def get_plugin_registry(self):
                return registry

            def deserialize_cuda_engine(self, data):
                plan = json.loads(bytes(data).decode())
                if any(op not in fake.registered for op in plan["plugins"]):
                    self.logger.log(ILogger.ERROR, "getPluginCreator could not find plugin")
                    return None
                return FakeEngine(fake, plan)

        self.ILogger, self.Logger, self.IProgressMonitor = ILogger, Logger, IProgressMonitor
        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = SimpleNamespace(FP16="fp16", TF32="tf32", OBEY_PRECISION_CONSTRAINTS="obey",
                                           PREFER_PRECISION_CONSTRAINTS="prefer")
        self.float32, self.float16 = "FLOAT", "HALF"
        self.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.TensorLocation = SimpleNamespace(DEVICE="DEVICE", HOST="HOST")

    @staticmethod
    def validate(network, config) -> str | None:
        """The build-time checks of TensorRT's builder that concern profiles."""
        dynamic = [t for t in network.inputs if any(d < 0 for d in t.shape)]
        shape_tensors = [t for t in network.inputs if t.is_shape_tensor]
        if (dynamic or shape_tensors) and not config.profiles:
            return "Network has dynamic or shape inputs, but no optimization profile has been defined."
        for index, profile in enumerate(config.profiles):
            for tensor in dynamic:
                if tensor.name not in profile.shapes:
                    return f"{tensor.name}: dynamic input is missing dimensions in profile {index}."
            for tensor in shape_tensors:
                if tensor.name not in profile.values:
                    return f"{tensor.name}: optimization profile is missing values for shape input"
                if any(len(v) != int(np.prod(tensor.shape)) for v in profile.values[tensor.name]):
                    return f"{tensor.name}: shape input values do not match its volume"
            for name in profile.values:
                if name not in {t.name for t in shape_tensors}:
                    return f"{name}: values were set for an input that is not a shape tensor"
        return None


class FakeEngine:
    def __init__(self, fake: FakeTensorRT, plan: dict):
        import onnx

        self.fake, self.plan = fake, plan
        model = onnx.load(plan["onnx"], load_external_data=False)
        self.inputs, self.outputs = _tensors(model.graph.input, plan["shape_inputs"]), _tensors(model.graph.output)
        self.tensors = {t.name: (t, True) for t in self.inputs} | {t.name: (t, False) for t in self.outputs}
        self.names = [t.name for t in self.inputs + self.outputs]
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(plan["profiles"])
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.plan["plugins"]:
                from mllm_deploy.plugins.ort_kernels import create_session

                self._session = create_session(self.plan["onnx"], options, ["CPUExecutionProvider"])
            else:
                self._session = ort.InferenceSession(self.plan["onnx"], options, providers=["CPUExecutionProvider"])
        return self._session

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if self.tensors[name][1] else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.tensors[name][0].dtype

    def get_tensor_location(self, name):
        tensor, is_input = self.tensors[name]
        return "HOST" if is_input and tensor.is_shape_tensor else "DEVICE"

    def get_tensor_profile_shape(self, name, profile_index):
        return [list(s) for s in self.plan["profiles"][profile_index]["shapes"][name]]

    def get_tensor_profile_values(self, profile_index, name):
        if not isinstance(profile_index, int) or not isinstance(name, str):
            raise TypeError("get_tensor_profile_values(): incompatible function arguments (int, str)")
        if name not in self.plan["shape_inputs"]:
            raise RuntimeError("Binding index does not correspond to an input shape tensor.")
        return [list(v) for v in self.plan["profiles"][profile_index]["values"][name]]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses, self.profile, self.errors = engine, {}, {}, 0, []
        self.outputs = None  # TensorRT infers output shapes from input shapes; the fake runs the graph once

    def set_optimization_profile_async(self, profile, stream):
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        profiles = self.engine.plan["profiles"]
        low, _, high = (profiles[self.profile]["shapes"] if profiles else {}).get(name, (shape, shape, shape))
        if len(shape) != len(low) or any(not a <= s <= b for s, a, b in zip(shape, low, high)):
            return False
        self.shapes[name], self.outputs = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr):
        if self.engine.tensors[name][1]:
            self.outputs = None
        self.addresses[name] = int(ptr)
        return True

    def _feed(self) -> dict | str:
        feed = {}
        for tensor in self.engine.inputs:
            ptr = self.addresses.get(tensor.name)
            if ptr is None:
                return f"address of input tensor {tensor.name} is not set"
            shape = self.shapes.get(tensor.name, tensor.shape)
            nbytes = int(np.prod(shape)) * np.dtype(NP[tensor.dtype.name]).itemsize
            on_device = self.engine.fake.cudart.is_device(ptr, max(nbytes, 1))
            if tensor.is_shape_tensor and on_device:
                return f"{tensor.name} is a shape tensor: its address must be host memory (TensorLocation.HOST)"
            if not tensor.is_shape_tensor and not on_device:
                return f"{tensor.name}: address is not device memory"
            feed[tensor.name] = _read(ptr, shape, NP[tensor.dtype.name])
            if tensor.is_shape_tensor:
                low, _, high = self.engine.plan["profiles"][self.profile]["values"][tensor.name]
                if any(not a <= v <= b for v, a, b in zip(feed[tensor.name].reshape(-1), low, high)):
                    return f"{tensor.name}: shape input values are outside the optimization profile"
        return feed

    def get_tensor_shape(self, name):
        feed = self._feed()
        if isinstance(feed, str):
            self.errors.append(feed)
            return (-1,) * len(self.engine.tensors[name][0].shape)
        return self._run(feed)[name].shape

    def _run(self, feed):
        if self.outputs is None:
            names = [t.name for t in self.engine.outputs]
            self.outputs = dict(zip(names, self.engine.session.run(names, feed)))
        return self.outputs

    def execute_async_v3(self, stream):
        feed = self._feed()
        if isinstance(feed, str):
            self.errors.append(feed)
            return False
        for name, value in self._run(feed).items():
            ptr = self.addresses.get(name)
            value = np.ascontiguousarray(value)
            if ptr is None or not self.engine.fake.cudart.is_device(ptr, max(value.nbytes, 1)):
                self.errors.append(f"output {name} is not bound to device memory")
                return False
            ctypes.memmove(ptr, value.ctypes.data, value.nbytes)
        self.outputs = None
        return True
