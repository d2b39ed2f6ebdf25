"""Image loading and CLIP/LLaVA preprocessing in NumPy + Pillow (no torch, no transformers).

Reproduces transformers' PIL-backend ``CLIPImageProcessorPil`` and ``LlavaImageProcessorPil``:
convert to RGB -> (LLaVA) pad to square -> resize -> center crop -> rescale -> normalize.
The same Pillow calls are used for colour conversion and resampling, so the uint8 pixels
match exactly; the float steps use the same dtypes as transformers, so the output does too.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from mllm_deploy.core.errors import ImageError, MllmError, UnsupportedModelError

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
MAX_IMAGE_PIXELS = 89_478_485


def load_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> "Image.Image":
    """Open and decode an image file; any problem with it is an :class:`ImageError` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the size
            with Image.open(path) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise ImageError(f"image {path} is empty ({width}x{height} pixels)")
                if width * height > max_pixels:
                    raise ImageError(f"image {path} declares {width}x{height} pixels, more than the limit of"
                                     f" {max_pixels} (a decompression bomb, or scale it down first)")
                image.load()  # decode now so truncated or corrupt data fails here, not later
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses above twice its limit, while opening
        raise ImageError(f"image {path} is a decompression bomb or too large ({exc})") from None
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"image path is a directory: {path}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not a recognised image file: {path}") from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"cannot read image {path}: {problem}") from None
    return image


def _to_rgb(image: "Image.Image") -> np.ndarray:
    # Like transformers: anything with an "A" band (note: LAB's "A" counts too) or a palette /
    # colour-key transparency is composited onto opaque white; everything else uses Pillow's convert.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _resize_target(height: int, width: int, size: dict) -> tuple[int, int]:
    if "height" in size:
        return size["height"], size["width"]
    short = size["shortest_edge"]
    # torchvision semantics: the short side becomes `short`, the long side is truncated (int()),
    # not rounded; a square counts as "width <= height".
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _pad_to_square(arr: np.ndarray, mean: tuple[float, ...]) -> np.ndarray:
    height, width = arr.shape[:2]
    if height == width:
        return arr
    side = max(height, width)
    # The background is the mean colour truncated to uint8 (int(), not round()).
    canvas = np.empty((side, side, 3), dtype=arr.dtype)
    canvas[:] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = arr
    return canvas


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    def span(n: int, target: int) -> tuple[int, int, int]:
        # (source start, destination start, length). A larger side is cut at floor((n - t) / 2);
        # a smaller side is zero-padded (before rescale/normalize) and placed at ceil((t - n) / 2).
        return ((n - target) // 2, 0, target) if n >= target else (0, (target - n + 1) // 2, n)

    sy, dy, ly = span(arr.shape[0], crop_h)
    sx, dx, lx = span(arr.shape[1], crop_w)
    out = np.zeros((crop_h, crop_w) + arr.shape[2:], dtype=arr.dtype)
    out[dy:dy + ly, dx:dx + lx] = arr[sy:sy + ly, sx:sx + lx]
    return out


def preprocess(image: "Image.Image", config: ImagePreprocessConfig) -> np.ndarray:
    """One PIL image -> float32 pixel_values [1, 3, H, W], as transformers' PIL backend makes them."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess takes a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image is empty ({image.width}x{image.height})")
    if config.do_convert_rgb:
        arr = _to_rgb(image)
    elif image.mode == "RGB":
        arr = np.asarray(image)
    else:  # transformers would carry 1 or 4 channels on and fail (or emit non-RGB pixel values)
        raise ImageError(f"image mode {image.mode} needs do_convert_rgb=True")
    if config.do_pad:
        arr = _pad_to_square(arr, config.image_mean)
    if config.do_resize:
        height, width = _resize_target(arr.shape[0], arr.shape[1], config.size)
        # Resampling is done by Pillow on the uint8 RGB image, exactly as transformers does.
        arr = np.asarray(Image.fromarray(arr).resize((width, height), resample=config.resample))
    if config.do_center_crop:
        arr = _center_crop(arr, config.crop_size["height"], config.crop_size["width"])
    if config.do_rescale:
        # transformers multiplies in float64 and then downcasts to float32.
        arr = (arr.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        # ... and normalizes in float32 with float32 mean/std.
        arr = arr.astype(np.float32, copy=False)
        arr = (arr - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return np.ascontiguousarray(arr.astype(np.float32, copy=False).transpose(2, 0, 1)[None])
