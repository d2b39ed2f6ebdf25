"""The TensorRT backend's own logic (runtime/backends/trt.py) without TensorRT: engine loading and
staleness, profile choice, device buffers, output shapes, and the decode KV uploads that copy only
the new slots, checked end to end against ONNX Runtime.

``FakeTensorRT`` / ``FakeCudart`` stand in for the ``tensorrt`` and ``cuda.bindings.runtime``
calls the backend makes; "device memory" is host memory and an "engine" runs its ONNX graph with
ONNX Runtime on the tensors found at the addresses the backend bound. What this cannot check is
TensorRT itself (parsing, kernels, precision): that is build-mllm --verify's job on a target.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from mllm_deploy.core import trt_env
from mllm_deploy.core.engines import INDEX_FILE, engine_file, make_index
from mllm_deploy.core.errors import BundleError, MllmError
from mllm_deploy.export.trt_build import BuildOptions, planned_keys
from mllm_deploy.export.trt_profiles import PRESETS, graph_profile, profile_settings
from mllm_deploy.runtime.bundle import load_bundle

TRT_NAMES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}
FAKE_GPU = ("Fake GPU", "8.7")


class FakeCudart:
    """cuda-python's (err, value) conventions over host memory; counts host-to-device bytes."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.to_device_bytes = 0

    def cudaMalloc(self, nbytes):
        block = np.zeros(int(nbytes), np.uint8)
        self.blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, ptr):
        self.blocks.pop(int(ptr), None)
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        ctypes.memset(int(ptr), value, int(nbytes))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
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
        return 0, b"cudaErrorFake"


def _device_array(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_uint8 * max(count, 1)).from_address(int(ptr))
    return np.frombuffer(raw, np.uint8, count).view(dtype).reshape(shape).copy()


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.outputs = engine, {}, {}, None

    def set_optimization_profile_async(self, profile, stream):
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name], self.outputs = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)

    def _run(self):
        if self.outputs is None:  # TensorRT knows output shapes from input shapes; the fake runs the graph
            feed = {e["name"]: _device_array(self.addresses[e["name"]], self.shapes[e["name"]], self.engine.dtype(e))
                    for e in self.engine.io["inputs"]}
            names = [e["name"] for e in self.engine.io["outputs"]]
            self.outputs = dict(zip(names, self.engine.session.run(names, feed)))
        return self.outputs

    def get_tensor_shape(self, name):
        return self._run()[name].shape

    def execute_async_v3(self, stream):
        for name, value in self._run().items():
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.outputs = None
        return True


class FakeEngine:
    def __init__(self, bundle, graph):
        import onnxruntime as ort

        self.io, self.graph = bundle.graph_io(graph), graph
        self.session = ort.InferenceSession(str(bundle.graph_path(graph)), providers=["CPUExecutionProvider"])
        self.tensors = [(e["name"], True, e) for e in self.io["inputs"]] + [(e["name"], False, e) for e in self.io["outputs"]]
        settings = profile_settings(bundle.manifest, PRESETS["jetson-orin-nano"], max_new_tokens=16)
        self.profile = graph_profile(bundle.manifest, graph, settings)
        self.num_io_tensors = len(self.tensors)
        self.num_optimization_profiles = 1

    @staticmethod
    def dtype(entry):
        return NP[TRT_NAMES[entry["dtype"]]]

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def get_tensor_mode(self, name):
        return "INPUT" if next(t for t in self.tensors if t[0] == name)[1] else "OUTPUT"

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=TRT_NAMES[next(t for t in self.tensors if t[0] == name)[2]["dtype"]])

    def get_tensor_profile_shape(self, name, profile):
        return [list(s) for s in self.profile[name]]

    def create_execution_context(self):
        return FakeContext(self)


def fake_tensorrt(bundle):
    class Runtime:
        def __init__(self, logger):
            pass

        def get_plugin_registry(self):
            return SimpleNamespace(load_library=lambda path: None)

        def deserialize_cuda_engine(self, data):
            return FakeEngine(bundle, data.decode())

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    return SimpleNamespace(__version__="10.3.0.30", Builder=object, Runtime=Runtime, Logger=Logger,
                           TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))


@pytest.fixture()
def fake_target(tiny_bundles, tmp_path, monkeypatch):
    """A copy of a tiny bundle with 'engines' for the fake TensorRT, and the fakes patched in."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["gqa56"], path)
    bundle = load_bundle(path)
    keys, _ = planned_keys(bundle.manifest, BuildOptions(preset="jetson-orin-nano", max_new_tokens=16),
                           tensorrt="10.3.0.30", gpu=FAKE_GPU[0], compute_capability=FAKE_GPU[1], plugins_sha256=None)
    (path / "engines").mkdir()
    for key in keys:
        (path / "engines" / engine_file(key.graph)).write_text(key.graph)  # the fake engine is the graph's name
    (path / "engines" / INDEX_FILE).write_text(json.dumps(make_index(keys)))
    cudart = FakeCudart()
    trt = fake_tensorrt(bundle)
    monkeypatch.setattr(trt_env, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_env, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_env, "query_gpu", lambda device=0: FAKE_GPU)
    return SimpleNamespace(bundle=bundle, cudart=cudart, trt=trt)


def test_generation_matches_onnxruntime_and_decode_copies_only_new_slots(fake_target):
    from mllm_deploy.runtime.bench_worker import synthetic_inputs
    from mllm_deploy.runtime.generator import Generator

    bundle = fake_target.bundle
    ids, pixels = synthetic_inputs(bundle, bundle.visual_tokens + 12)
    with Generator(bundle, "onnxruntime") as ref:
        want = ref.generate(ids, pixels, 6, ignore_eos=True)
    with Generator(bundle, "tensorrt") as gen:
        decode = gen.runners["decode"]
        assert decode.kv_plan is not None and len(decode.kv_plan.layers) == bundle.num_layers
        got = gen.generate(ids, pixels, 6, ignore_eos=True)
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.first_logits, want.first_logits, rtol=1e-5, atol=1e-5)
        # one more decode step on the same cache: only one KV slot per layer and part travels
        features = gen.encode_image(pixels)
        _, cache = gen.prefill(ids, features, capacity_extra=4)
        gen.decode(want.tokens[0], ids.shape[1], cache)  # first step: the whole cache goes over
        before = fake_target.cudart.to_device_bytes
        gen.decode(want.tokens[1], ids.shape[1] + 1, cache)
        text = bundle.manifest["model"]["text"]
        slot = text["num_kv_heads"] * text["head_dim"] * 4
        small_inputs = 8 + 8 + 8 * bundle.num_layers  # input_ids, position_ids, past_lengths
        assert fake_target.cudart.to_device_bytes - before == 2 * bundle.num_layers * slot + small_inputs


def test_stale_engine_and_missing_engines_are_refused(fake_target, monkeypatch):
    from mllm_deploy.runtime.generator import Generator

    monkeypatch.setattr(trt_env, "query_gpu", lambda device=0: ("Other GPU", "9.0"))
    with pytest.raises(BundleError, match="stale.*gpu was 'Fake GPU', now 'Other GPU'"):
        Generator(fake_target.bundle, "tensorrt").__enter__()
    shutil.rmtree(fake_target.bundle.path / "engines")
    with pytest.raises(BundleError, match="run build-mllm"):
        Generator(fake_target.bundle, "tensorrt").__enter__()


def test_prompt_longer_than_the_profile_is_refused(fake_target):
    from mllm_deploy.runtime.bench_worker import synthetic_inputs
    from mllm_deploy.runtime.generator import Generator

    bundle = fake_target.bundle
    longest = bundle.visual_tokens + PRESETS["jetson-orin-nano"].max_text_tokens
    ids, pixels = synthetic_inputs(bundle, min(longest + 1, 2040))
    with Generator(bundle, "tensorrt") as gen:
        with pytest.raises(MllmError, match="outside the engine's optimisation profiles"):
            gen.prefill(ids, gen.encode_image(pixels), capacity_extra=1)


def test_verify_compares_benchmarks_and_reports(fake_target, monkeypatch):
    """build-mllm --verify's steps on the fake target: TensorRT (here ORT underneath) agrees with ONNX Runtime."""
    from mllm_deploy.export.trt_build import BuildResult
    from mllm_deploy.runtime import trt_verify

    monkeypatch.setattr(trt_verify, "check_kernels",
                        lambda plugins, log: trt_verify.Check("plugin kernels", "skip", "no plugins in this bundle"))
    bundle = fake_target.bundle
    build = BuildResult(bundle.path / "engines", keys=[], rebuilt=False, plugins=None)
    payload = trt_verify.verify(bundle, build, precision="float32", steps=3, repeats=1, log=lambda m: None)
    statuses = {c["name"]: c["status"] for c in payload["checks"]}
    assert statuses == {"plugin kernels": "skip", "vision": "pass", "prefill": "pass", "decode": "pass",
                        "greedy tokens": "pass", "benchmark": "pass"}
    assert payload["ok"] and payload["gpu"] == FAKE_GPU[0]
    report = (bundle.path / "engines" / "verify.md").read_text()
    assert "**PASS**" in report and "| prefill | pass | agree:" in report
    assert json.loads((bundle.path / "engines" / "verify.json").read_text())["checks"][-1]["data"]["backend"] == "tensorrt"
