"""Routing ops of the ``mllm_deploy`` ONNX domain (version 1): VisualScore, TokenSelect, TokenScatter.

- ``ops``: names, attribute specs and the NumPy references (the spec every kernel is tested against).
- ``schemas``: ONNX ``OpSchema`` registration (checker + shape inference) and ``make_node``.
- ``ort_kernels``: ONNX Runtime CPU kernels (onnxruntime-extensions PyOps) and ``create_session``.
- ``cuda/``: the CUDA kernels behind a C ABI (``routing_kernels.h``), their per-element rules
  (``routing_math.h``) and a host build of the same ABI (``routing_host.cpp``); ``kernels`` builds
  and calls them through ctypes, ``kernel_checks`` tests a build against the NumPy references.
- ``trt/``: the TensorRT IPluginV3 library (``CMakeLists.txt`` builds it on the target);
  ``trt_fields`` mirrors its creator fields in Python.

Nothing here imports torch, and this package's ``__init__`` imports nothing at all, so that
``runtime/`` can load only what it needs on images without onnx or onnxruntime-extensions.
"""
