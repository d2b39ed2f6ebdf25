"""What every calibration method shares: the common options, the way an option becomes a
calib-mllm flag, and :class:`CalibRun` (the model, its calibration data, provenance, log).

Imports nothing heavy: calib-mllm builds its parser from the options dataclasses, and its --help
must not import torch. The data, the Hugging Face model and torch load when a method asks for them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def option(default: Any, flag: str, help: str | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is also a calib-mllm flag: ``parse`` is argparse's ``type``; a bool
    field is a ``store_true`` flag. The flag's value, when given, replaces the field's default."""
    metadata = {"flag": flag, "help": help, "parse": parse}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CommonOptions:
    """Options of every method; each method's options dataclass extends this one."""

    data: str | None = option(None, "--data", "calibration data: JSONL of {image, prompt} or builtin:synthetic:N")
    skip_bad: bool = option(False, "--skip-bad", "skip bad data lines instead of stopping")
    seed: int = option(0, "--seed", parse=int)
    text_tokens: int = option(64, "--text-tokens", "text tokens assumed for the recipe's FLOPs figures", int)
    pre_llm: str | None = option(
        None, "--pre-llm",
        "a cls or dart recipe.json: calibrate this method on the visual tokens it keeps; the recipe holds both stages")
    random_selection: bool = option(
        False, "--random-selection",
        "baseline: keep the method's token counts but a fixed random subset (seeded by --seed)")

    method: ClassVar[str] = ""  # the name it is registered under in calib/methods.py
    cli_group: ClassVar[str | None] = None  # the --help section of its flags
    # its flags given with another --method are an error (instead of being ignored)
    flags_only_for_this_method: ClassVar[bool] = False


def progress(total: int, desc: str, unit: str = "sample"):
    import sys

    from tqdm import tqdm

    from mllm_deploy.core.progress import bars_enabled

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not bars_enabled(sys.stderr), mininterval=0.1 if sys.stderr.isatty() else 1.0)


def model_inputs(model_dir: Path, samples) -> list:
    """(input_ids, pixel_values) per sample, built by the model's own Hugging Face processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    inputs = []
    for sample in samples:
        messages = [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                                 {"type": "text", "text": sample.prompt}]}]
        enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
        inputs.append((enc["input_ids"], enc["pixel_values"]))
    return inputs


@dataclass
class CalibRun:
    """One calibration: the model (its directory and geometry), where messages go, and the
    provenance the recipe records; loads the data and the weights only when a method asks."""

    model_dir: Path
    spec: Any  # formats.geometry.ModelSpec: as the language model sees it (fewer visual tokens under pre_llm)
    log: Callable[[str], None] = print
    provenance: dict[str, Any] = field(default_factory=dict)
    pre_llm: Any = None  # formats.recipe.PreLlmStage the method is calibrated under (--pre-llm), or None

    def inputs(self, options: CommonOptions) -> list:
        """The calibration samples as model inputs [(input_ids, pixel_values)], recorded in the provenance; under
        a pre_llm stage the image run of input_ids is cut to the tokens the language model sees."""
        from mllm_deploy.calib.data import data_hash, load_calibration_data

        samples = load_calibration_data(options.data, options.skip_bad, options.seed)
        self.provenance.update({"data": options.data, "data_sha256": data_hash(samples), "samples": len(samples)})
        inputs = model_inputs(self.model_dir, samples)
        if self.pre_llm is not None:
            from mllm_deploy.calib.pre_llm_reference import shrink_image_run

            inputs = [(shrink_image_run(ids, self.spec.image_token_id, self.pre_llm.keep), px) for ids, px in inputs]
        return inputs

    def hf_model(self):
        from mllm_deploy.models.loading import load_hf_model

        if getattr(self.spec, "is_anyres", False):
            from mllm_deploy.core.errors import UnsupportedModelError

            raise UnsupportedModelError("LLaVA-NeXT (AnyRes) models: calibration with data needs its PyTorch reference,"
                                        " which is not built yet; static methods (dense, fastv, pdrop, fitprune"
                                        " --schedule, cls, dart) work from config.json")

        return load_hf_model(self.model_dir)

    def dense_reference(self, model=None):
        """The PyTorch reference of the dense model (calibration statistics run on it)."""
        from mllm_deploy.calib.reference import RecipeReference
        from mllm_deploy.formats.recipe import dense_recipe

        return RecipeReference(self.hf_model() if model is None else model, dense_recipe(self.spec),
                                pre_llm=self.pre_llm)
