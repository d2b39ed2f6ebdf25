"""Calibration data: a JSONL file of {"image", "prompt"} lines, or ``builtin:synthetic:N``.

Bad lines (invalid JSON, missing or unreadable image, empty prompt) are reported with their
line number; the run stops at the first one unless ``skip_bad`` is set.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from mllm_deploy.core.errors import MllmError

SYNTHETIC_PREFIX = "builtin:synthetic:"
SHAPES_PREFIX = "builtin:shapes-vqa:"  # builtin:shapes-vqa:SPLIT:N
SYNTHETIC_QUESTIONS = (
    "What colour is the largest shape?",
    "How many shapes are in the image?",
    "Is there a circle in the picture?",
    "Which shape is on the left?",
    "Describe the image.",
)


class CalibrationDataError(MllmError):
    """The calibration data cannot be read."""


@dataclass
class CalibSample:
    image: object  # PIL.Image.Image, fully loaded
    prompt: str
    source: str  # "file.jsonl:LINE" or "synthetic:I"


def synthetic_image(index: int, seed: int = 0, size: int = 96):
    """A few coloured shapes on a tinted background, deterministic in (seed, index)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    background = tuple(int(c) for c in rng.integers(150, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        extent = int(rng.integers(8, 40))
        box = [x0, y0, min(size - 1, x0 + extent), min(size - 1, y0 + extent)]
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


MAX_SAMPLES = 100_000  # a typo such as builtin:synthetic:1000000000 should fail, not fill the memory


def _count(text: str, spec: str) -> int:
    # plain ASCII digits only: int() would also take ' 3', '+3', '1_0' and other scripts' digits
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_SAMPLES:
        raise CalibrationDataError(f"'{spec}': N must be an integer from 1 to {MAX_SAMPLES}")
    return int(text)


def _synthetic(count_text: str, seed: int) -> list[CalibSample]:
    count = _count(count_text, SYNTHETIC_PREFIX + count_text)
    return [CalibSample(synthetic_image(i, seed), SYNTHETIC_QUESTIONS[i % len(SYNTHETIC_QUESTIONS)], f"synthetic:{i}")
            for i in range(count)]


def _shapes(rest: str) -> list[CalibSample]:
    from mllm_deploy.scenes import shapes_vqa

    split, _, count_text = rest.partition(":")
    if split not in shapes_vqa.SPLIT_SEEDS:
        raise CalibrationDataError(f"'{SHAPES_PREFIX}{rest}': expected SPLIT:N with SPLIT one of"
                                   f" {', '.join(shapes_vqa.SPLIT_SEEDS)} and N >= 1")
    count = _count(count_text, SHAPES_PREFIX + rest)
    return [CalibSample(e.image, e.question, f"shapes-vqa:{split}:{e.index}")
            for e in shapes_vqa.examples(split, count)]


def _jsonl(path: Path, skip_bad: bool) -> list[CalibSample]:
    from mllm_deploy.core.errors import ImageError
    from mllm_deploy.core.jsonio import parse_json
    from mllm_deploy.runtime.preprocess import load_image

    if not path.is_file():
        raise CalibrationDataError(f"calibration data not found: {path}")
    samples: list[CalibSample] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            entry = parse_json(line, CalibrationDataError, where)
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
                raise CalibrationDataError(f"{where}: needs an object with string fields 'image' and 'prompt'")
            prompt = entry.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise CalibrationDataError(f"{where}: empty or missing 'prompt'")
            try:
                image = load_image(path.parent / entry["image"])
            except ImageError as exc:
                raise CalibrationDataError(f"{where}: {exc}") from None
            samples.append(CalibSample(image, prompt, f"{path.name}:{number}"))
        except CalibrationDataError as exc:
            if not skip_bad:
                raise CalibrationDataError(f"{exc} (pass --skip-bad to skip bad lines)") from None
            print(f"calib-mllm: skipping {exc}", file=sys.stderr)
    if not samples:
        raise CalibrationDataError(f"{path} holds no usable samples")
    return samples


def load_calibration_data(spec: str, skip_bad: bool = False, seed: int = 0) -> list[CalibSample]:
    if spec.startswith(SYNTHETIC_PREFIX):
        return _synthetic(spec[len(SYNTHETIC_PREFIX):], seed)
    if spec.startswith(SHAPES_PREFIX):
        return _shapes(spec[len(SHAPES_PREFIX):])
    if spec.startswith("builtin:"):
        raise CalibrationDataError(f"unknown built-in data '{spec}'; use {SYNTHETIC_PREFIX}N or {SHAPES_PREFIX}SPLIT:N")
    return _jsonl(Path(spec), skip_bad)


def data_hash(samples: list[CalibSample]) -> str:
    """sha256 over every sample's pixels and prompt: the recipe's provenance of its data."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.image.convert("RGB").tobytes())
        digest.update(str(sample.image.size).encode())
        digest.update(sample.prompt.encode("utf-8"))
    return digest.hexdigest()
