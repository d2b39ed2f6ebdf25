"""Image preprocessing config (torch-free): what a bundle records so the runtime reproduces the model's
Hugging Face image processor (CLIP / LLaVA: resize, pad or crop, rescale, normalise) without transformers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from mllm_deploy.core.errors import MllmError, UnsupportedModelError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The class attributes of CLIPImageProcessorPil (LlavaImageProcessorPil has the same, plus do_pad=False).
_HF_DEFAULTS = {
    "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD, "do_pad": False,
}
_CLIP_TYPES = ("CLIPImageProcessor", "CLIPFeatureExtractor")
_LLAVA_TYPES = ("LlavaImageProcessor",)  # also matches the ...Fast / ...Pil variants


def _processor_type(d: dict) -> str:
    return str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size_dict(value, square: bool) -> dict:
    # Legacy configs store sizes as an int or a (height, width) pair; HF's get_size_dict turns an
    # int into {"shortest_edge": n} for `size` (CLIP sets default_to_square=False) but into a
    # square for `crop_size`.
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict):
        return dict(value)
    raise UnsupportedModelError(f"image size must be a number, a pair or a dict, got {value!r}")


def _channels(value, name: str) -> tuple[float, ...]:
    values = (value,) * 3 if isinstance(value, (int, float)) else value
    if (not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise UnsupportedModelError(f"{name} must have 3 numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class ImagePreprocessConfig:
    do_convert_rgb: bool
    do_resize: bool
    size: dict  # {"shortest_edge": n} or {"height": h, "width": w}
    resample: int  # PIL resampling code as HF stores it (3 = bicubic)
    do_center_crop: bool
    crop_size: dict  # {"height": h, "width": w}
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_pad: bool  # LLaVA pad-to-square (before resizing)

    def __post_init__(self):
        if self.do_resize and set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise UnsupportedModelError(f"image size needs 'shortest_edge' or 'height'+'width', got {self.size}")
        if self.do_resize and not all(_positive_int(v) for v in self.size.values()):
            raise UnsupportedModelError(f"image size values must be positive integers, got {self.size}")
        if self.do_center_crop and (set(self.crop_size) != {"height", "width"}
                                    or not all(_positive_int(v) for v in self.crop_size.values())):
            raise UnsupportedModelError(f"crop_size must be positive 'height' and 'width', got {self.crop_size}")
        if self.resample not in (0, 1, 2, 3, 4, 5) or isinstance(self.resample, bool):
            raise UnsupportedModelError(f"resample must be a PIL resampling code 0-5, got {self.resample!r}")
        if not isinstance(self.rescale_factor, (int, float)) or 0.0 in self.image_std:
            raise UnsupportedModelError(f"bad rescale_factor {self.rescale_factor!r} or image_std {self.image_std}")
        flags = ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad")
        if not all(isinstance(getattr(self, name), bool) for name in flags):
            raise UnsupportedModelError(f"{', '.join(flags)} must be true or false")
        if not all(math.isfinite(v) for v in (self.rescale_factor, *self.image_mean, *self.image_std)):
            raise UnsupportedModelError("rescale_factor, image_mean and image_std must be finite numbers")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ImagePreprocessConfig":
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"image processor config must be a JSON object, got {type(d).__name__}")
        # HF treats an explicit null like a missing key: the class default applies.
        v = {k: (d[k] if d.get(k) is not None else default) for k, default in _HF_DEFAULTS.items()}
        # Only LlavaImageProcessor pads to a square; CLIP's generic do_pad pads a batch to its
        # largest image, which is a no-op for the single image we process.
        is_llava = _processor_type(d).startswith(_LLAVA_TYPES)
        if d.get("use_square_size"):  # KOSMOS-2's CLIP variant; it ignores the stored size
            raise UnsupportedModelError("image processors with use_square_size are not supported")
        return cls(
            do_convert_rgb=bool(v["do_convert_rgb"]), do_resize=bool(v["do_resize"]),
            size=_size_dict(v["size"], square=False), resample=v["resample"],
            do_center_crop=bool(v["do_center_crop"]), crop_size=_size_dict(v["crop_size"], square=True),
            do_rescale=bool(v["do_rescale"]), rescale_factor=v["rescale_factor"],
            do_normalize=bool(v["do_normalize"]), image_mean=_channels(v["image_mean"], "image_mean"),
            image_std=_channels(v["image_std"], "image_std"), do_pad=bool(v["do_pad"]) and is_llava,
        )

    @classmethod
    def from_model_dir(cls, path) -> "ImagePreprocessConfig":
        root = Path(path)
        d = None
        # transformers 5 saves a processor's image processor nested in processor_config.json.
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            file = root / name
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UnsupportedModelError(f"cannot read {file}: {exc}") from None
            d = data.get(key) if key and isinstance(data, dict) else data
            if d is not None:
                break
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"{root}: no image processor config (preprocessor_config.json or "
                                        "processor_config.json 'image_processor')")
        kind = _processor_type(d)
        if not kind.startswith(_CLIP_TYPES + _LLAVA_TYPES):
            raise UnsupportedModelError(f"{root}: image processor {kind or '(unnamed)'!r} is not supported "
                                        "(only CLIP and LLaVA image processors)")
        return cls.from_hf_dict(d)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(size=dict(self.size), crop_size=dict(self.crop_size),
                   image_mean=list(self.image_mean), image_std=list(self.image_std))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocessConfig":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if not isinstance(d, dict) or n not in d]
        if missing:
            raise MllmError(f"image preprocessing config is missing {', '.join(missing)}")
        v = {n: d[n] for n in names}
        if not isinstance(v["resample"], int) or isinstance(v["resample"], bool):
            raise MllmError(f"image preprocessing config: resample must be a PIL resampling code, got {v['resample']!r}")
        for n in ("size", "crop_size"):
            if not isinstance(v[n], dict):
                raise MllmError(f"image preprocessing config: {n} must be an object, got {v[n]!r}")
            v[n] = dict(v[n])
        v["image_mean"] = _channels(v["image_mean"], "image_mean")
        v["image_std"] = _channels(v["image_std"], "image_std")
        return cls(**v)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of pixel_values, when it does not depend on the input image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        if self.do_resize and self.do_pad:  # square after padding, so shortest_edge fixes both sides
            return self.size["shortest_edge"], self.size["shortest_edge"]
        raise UnsupportedModelError("the image output size depends on the input (no center crop, no fixed resize)")


# Pillow's own bomb limit (it warns above it and refuses above twice it); we refuse above it,
# before a single pixel is decoded, so a small file that declares a huge image costs nothing.
