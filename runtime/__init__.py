"""The torch-free runtime: load a bundle, preprocess, prefill/decode, sample, time.

Importing this package imports neither torch nor onnxruntime; backends are loaded when a
pipeline is created.
"""
