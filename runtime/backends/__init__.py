"""Backends are runners (STYLE.md): one per graph, validated ``infer()`` around ``infer_impl()``.

The registry holds ``"module:Class"`` strings so choosing a backend imports only that one: the runtime never
imports trt/ or calib/ itself, and listing the backends imports nothing heavy.
"""

from __future__ import annotations

import importlib

from mllm_deploy.core.errors import MllmError

BACKENDS = {
    "onnxruntime": "mllm_deploy.runtime.backends.ort:OrtRunner",
    "tensorrt": "mllm_deploy.trt.backend:TrtRunner",
    "torch": "mllm_deploy.calib.torch_runner:TorchRunner",  # the PyTorch reference of the recipe
}


def runner_class(name: str):
    if name not in BACKENDS:
        raise MllmError(f"unknown backend '{name}'; available: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
