"""Routing ops of the ``mllm_deploy`` ONNX domain (version 1): VisualScore, TokenSelect, TokenScatter.

- ``ops``: names, attribute specs and the NumPy references (the spec every kernel is tested against).
- ``schemas``: ONNX ``OpSchema`` registration (checker + shape inference) and ``make_node``.
- ``ort_kernels``: ONNX Runtime CPU kernels (onnxruntime-extensions PyOps) and ``create_session``.

Nothing here imports torch, and this package's ``__init__`` imports nothing at all, so that
``runtime/`` can load only what it needs on images without onnx or onnxruntime-extensions.
"""
