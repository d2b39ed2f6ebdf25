"""mllm-deploy: static visual-token pruning recipes for LLaVA-style models, exported to ONNX and TensorRT."""

__version__ = "0.1.0"
