"""bench-mllm --backend torch: the PyTorch reference of the bundle's recipe, the baseline a user of
the research code would have (Hugging Face modules run layer by layer with the recipe applied).

The only runtime module that imports torch, and only when that backend is asked for; the
onnxruntime path never loads it (DESIGN.md: Jetson images often have no PyTorch).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from mllm_deploy.core.errors import BundleError, DependencyError


def _load_reference(bundle, device: str, dtype):
    from mllm_deploy.formats.recipe import Recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.models.loading import load_hf_model
    from mllm_deploy.models.registry import resolve_model
    from mllm_deploy.formats.geometry import read_config, spec_from_config

    source = bundle.manifest.get("source_model")
    if not source:
        raise BundleError(f"{bundle.path} records no source_model; --backend torch needs the Hugging Face model")
    model_dir = resolve_model(source)
    # the weights must be the ones the bundle was exported from, or the baseline compares other models
    fingerprint = spec_from_config(read_config(model_dir)).fingerprint
    if fingerprint != bundle.manifest["model"]["fingerprint"]:
        raise BundleError(f"the model at {model_dir} is not the one {bundle.path.name} was exported from"
                          " (config fingerprint differs)")
    model = load_hf_model(model_dir, dtype=dtype)
    # base_dir: a mixture-of-depths recipe's router file travels inside the bundle
    return RecipeReference(model.to(device).eval(), Recipe.from_dict(bundle.manifest["recipe"], base_dir=bundle.path))


def measure_torch(bundle, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, repeats: int, warmup: int,
                  tick: Callable[[], None]) -> dict:
    try:
        import torch
        import transformers  # noqa: F401 - checked here for a clear message
    except ImportError:
        raise DependencyError("--backend torch needs torch and transformers (pip install 'mllm-deploy[export]')") from None

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if not cuda and os.environ.get("MLLM_DEPLOY_THREADS"):
        torch.set_num_threads(int(os.environ["MLLM_DEPLOY_THREADS"]))  # same thread budget as onnxruntime
    reference = _load_reference(bundle, device, dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prompt_len = int(ids.shape[1])
    vision, prefill, decode = [], [], []
    kv_tokens: list[int] = []
    kv_bytes: list[int] = []
    # RecipeReference makes its index tensors with torch.arange/torch.tensor; the device context puts
    # them beside the weights without touching the reference code
    with torch.device(device), torch.inference_mode():
        input_ids = torch.from_numpy(ids).to(device)
        pixel_values = torch.from_numpy(pixels).to(device)
        for run in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            features = reference.image_features(pixel_values)
            sync()
            t1 = time.perf_counter()
            logits, state = reference.prefill(input_ids, features)
            sync()
            t2 = time.perf_counter()
            kv_tokens = [int(k.shape[2]) for k, _ in state.cache]
            kv_bytes = [k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in state.cache]
            steps = []
            token = int(logits.argmax(-1))
            for step in range(new_tokens - 1):
                ts = time.perf_counter()
                logits = reference.decode(token, prompt_len + step, state)
                sync()
                steps.append((time.perf_counter() - ts) * 1e3)
                token = int(logits.argmax(-1))  # outside the step time, as on the onnxruntime path
            if run >= warmup:
                vision.append((t1 - t0) * 1e3)
                prefill.append((t2 - t1) * 1e3)
                decode.extend(steps)
                tick()
    return {
        "vision": vision, "prefill": prefill, "decode": decode, "kv_tokens": kv_tokens, "kv_bytes": kv_bytes,
        "routing_share": None,  # no graph profile: the reference has no separately named routing kernels
        "decode_overhead_share": None,  # no session.run to subtract; eager PyTorch is all "overhead"
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "run_dtype": "float16" if cuda else "float32",
    }
