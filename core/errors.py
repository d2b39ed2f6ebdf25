"""The user-error family.

Anything a user can cause (a missing file, a model we do not support, an altered bundle,
a bad prompt) raises a subclass of :class:`MllmError`. CLIs turn it into one line on stderr
and exit code 1 (see :mod:`mllm_deploy.core.cli`); anything else is a bug and keeps its
traceback.
"""


class MllmError(Exception):
    """A problem with the user's input, files or environment; the message says what to do."""


class InputFileError(MllmError):
    """A file or directory the user named is missing or unreadable."""


class UnsupportedModelError(MllmError):
    """The model directory is not an architecture mllm-deploy can export."""


class BundleError(MllmError):
    """A bundle is missing files, has altered files, or its manifest is malformed."""


class PromptError(MllmError):
    """The prompt cannot be turned into model input (placeholder missing or repeated, too long)."""


class ImageError(MllmError):
    """The image cannot be read or decoded."""


class VerificationError(MllmError):
    """An exported graph disagrees with its PyTorch reference beyond tolerance."""


class RecipeError(MllmError):
    """A recipe is malformed or does not match the model it is applied to."""


class DependencyError(MllmError):
    """An optional dependency needed for this command is not installed."""


class MemoryLimitError(MllmError):
    """The estimated memory exceeds the --max-memory budget or the memory available."""


class NumericalError(MllmError):
    """The model produced NaN or Inf (corrupt weights, float16 overflow) instead of logits."""
