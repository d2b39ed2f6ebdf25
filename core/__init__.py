"""Pieces every part of mllm-deploy shares: the user-error family, the CLI funnel, hashing.

Nothing here imports torch, onnx or onnxruntime at import time.
"""
