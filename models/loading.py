"""Loading a Hugging Face LLaVA model's weights (torch and transformers imported on call)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mllm_deploy.core.errors import DependencyError, UnsupportedModelError

# The oldest transformers the code works with (pyproject's export extra says the same; a test checks).
# 5.4 brought CLIPImageProcessorPil, the built-in models' image processor (5.3 cannot import it); 5.4 and
# 5.5 save LLaVA weights as model.language_model.model.*, a layout export/checkpoint.py (which reads the
# safetensors keys itself) does not know, so the built-in models they write do not export. The other APIs used
# (from_pretrained's dtype=, get_image_features(...).pooler_output, rope_parameters) are older.
# tests/test_generate_matches_hf.py passes on 5.6.0 and 5.24.0.
TRANSFORMERS_FLOOR = "5.6"


def _release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a version string such as '5.24.0' or '5.4.0.dev0'; None if it has none."""
    match = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(part or 0) for part in match.groups()) if match else None


def check_transformers_version(version: str) -> None:
    """Refuse a transformers release older than TRANSFORMERS_FLOOR, in one line that names the floor."""
    release, floor = _release(version), _release(TRANSFORMERS_FLOOR)
    if release is None or release < floor:
        raise DependencyError(f"transformers {version} is too old: mllm-deploy needs transformers>={TRANSFORMERS_FLOOR}"
                              f" (pip install 'transformers>={TRANSFORMERS_FLOOR}')")


def require_transformers():
    """The transformers module, once its version is known to be new enough."""
    try:
        import transformers
    except ImportError:
        raise DependencyError(f"this command needs torch and transformers>={TRANSFORMERS_FLOOR}"
                              " (pip install 'mllm-deploy[export]')") from None
    check_transformers_version(transformers.__version__)
    import sys

    from mllm_deploy.core.progress import bars_enabled

    # transformers' own bars ("Loading weights") follow --progress/--quiet and stay out of pipes, like ours
    if bars_enabled(sys.stderr):
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    return transformers


def load_hf_model(model_dir: str | Path, dtype=None, attn_implementation: str | None = None):
    """LlavaForConditionalGeneration (or LlavaNextForConditionalGeneration, as its config.json says) from a local
    directory, offline, in eval mode; a directory
    whose weights cannot be loaded is a user error with a one-line message."""
    import torch

    transformers = require_transformers()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model_class = transformers.LlavaForConditionalGeneration
    try:
        if "LlavaNextForConditionalGeneration" in json.loads((Path(model_dir) / "config.json").read_text()).get(
                "architectures", []):
            model_class = transformers.LlavaNextForConditionalGeneration
    except (OSError, ValueError):
        pass  # from_pretrained names the problem below
    try:
        model = model_class.from_pretrained(
            model_dir, dtype=dtype or torch.float32, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot load weights from {model_dir}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_hf_model_truncated(model_dir: str | Path, num_layers: int, attn_implementation: str | None = None):
    """The same checkpoint with only its first ``num_layers`` decoder layers (the rest are never read): what
    export-mllm --verify-layers compares a truncated bundle with."""
    import torch

    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        config.text_config.num_hidden_layers = num_layers
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the unread layers would be listed one warning line each
        try:
            model = transformers.LlavaForConditionalGeneration.from_pretrained(
                model_dir, config=config, dtype=torch.float32, local_files_only=True, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot load weights from {model_dir}: {str(exc).splitlines()[0]}") from None
    return model.eval()
