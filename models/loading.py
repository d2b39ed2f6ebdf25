"""Loading a Hugging Face LLaVA model's weights (torch and transformers imported on call)."""

from __future__ import annotations

from pathlib import Path

from mllm_deploy.core.errors import UnsupportedModelError


def load_hf_model(model_dir: str | Path, dtype=None, attn_implementation: str | None = None):
    """LlavaForConditionalGeneration from a local directory, offline, in eval mode; a directory
    whose weights cannot be loaded is a user error with a one-line message."""
    import torch
    from transformers import LlavaForConditionalGeneration

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype or torch.float32, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot load weights from {model_dir}: {str(exc).splitlines()[0]}") from None
    return model.eval()
