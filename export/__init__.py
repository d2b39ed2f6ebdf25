"""Hugging Face LLaVA model -> ONNX graphs (vision, prefill, decode) with a recipe applied."""
