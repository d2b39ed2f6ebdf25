"""Image preprocessing config (torch-free): what a bundle records so the runtime reproduces the model's
Hugging Face image processor (CLIP / LLaVA: resize, pad or crop, rescale, normalise; LLaVA-NeXT: AnyRes
tiles) without transformers.

The AnyRes arithmetic (which grid an image gets, how many visual tokens the language model then sees)
lives here rather than in the runtime because the exporter and the FLOPs model need it too, and those
layers may import formats/ but not runtime/.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

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
_LLAVA_NEXT_TYPES = ("LlavaNextImageProcessor",)
# LlavaNextImageProcessor's class default, used when its config leaves the grid out (LLaVA-1.6's grid).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


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


def _pinpoints(value) -> tuple[tuple[int, int], ...]:
    # A JSON list of [height, width] pairs; kept as tuples so configs compare and hash by value.
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_positive_int(v) for v in p)
                       for p in value)):
        raise UnsupportedModelError(f"image_grid_pinpoints must be a list of [height, width] pairs of positive "
                                    f"integers, got {value!r}")
    return tuple((p[0], p[1]) for p in value)


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
    # LLaVA-NeXT AnyRes: the (height, width) canvases an image may be tiled into; None for one view.
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

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
        if self.image_grid_pinpoints is not None:
            object.__setattr__(self, "image_grid_pinpoints", _pinpoints(self.image_grid_pinpoints))
            self._check_anyres()

    def _check_anyres(self):
        # AnyRes resizes the base view to `size` even when do_resize is off, so size must be usable.
        if set(self.size) not in ({"shortest_edge"}, {"height", "width"}) or not all(
                _positive_int(v) for v in self.size.values()):
            raise UnsupportedModelError(f"AnyRes needs a positive 'shortest_edge' or 'height'+'width' size, "
                                        f"got {self.size}")
        if self.do_pad:
            raise UnsupportedModelError("AnyRes configs never pad to a square (do_pad must be false)")
        tile = self.tile_size
        if not _positive_int(tile):
            raise UnsupportedModelError(f"AnyRes tile size (crop_size height) must be a positive integer, got {tile!r}")
        # The model folds the tile features into a (rows, cols) grid by floor division while the
        # processor cuts ceil(side / tile) tiles; only exact multiples agree on both sides.
        odd = [list(p) for p in self.image_grid_pinpoints if p[0] % tile or p[1] % tile]
        if odd:
            raise UnsupportedModelError(f"image_grid_pinpoints {odd} are not multiples of the {tile}-pixel tile")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ImagePreprocessConfig":
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"image processor config must be a JSON object, got {type(d).__name__}")
        # HF treats an explicit null like a missing key: the class default applies.
        v = {k: (d[k] if d.get(k) is not None else default) for k, default in _HF_DEFAULTS.items()}
        # Only LlavaImageProcessor pads to a square; CLIP's generic do_pad pads a batch to its
        # largest image, which is a no-op for the single image we process.
        is_llava = _processor_type(d).startswith(_LLAVA_TYPES)
        # LLaVA-NeXT's do_pad pads a batch to its largest tile count: nothing to do for one image.
        # Its grid is the only field it adds (aspect_ratio_setting is ignored by transformers too).
        pinpoints = None
        if _processor_type(d).startswith(_LLAVA_NEXT_TYPES):
            raw = d.get("image_grid_pinpoints")
            pinpoints = _pinpoints(raw if raw is not None else LLAVA_NEXT_PINPOINTS)
        if d.get("use_square_size"):  # KOSMOS-2's CLIP variant; it ignores the stored size
            raise UnsupportedModelError("image processors with use_square_size are not supported")
        return cls(
            do_convert_rgb=bool(v["do_convert_rgb"]), do_resize=bool(v["do_resize"]),
            size=_size_dict(v["size"], square=False), resample=v["resample"],
            do_center_crop=bool(v["do_center_crop"]), crop_size=_size_dict(v["crop_size"], square=True),
            do_rescale=bool(v["do_rescale"]), rescale_factor=v["rescale_factor"],
            do_normalize=bool(v["do_normalize"]), image_mean=_channels(v["image_mean"], "image_mean"),
            image_std=_channels(v["image_std"], "image_std"), do_pad=bool(v["do_pad"]) and is_llava,
            image_grid_pinpoints=pinpoints,
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
        if not kind.startswith(_CLIP_TYPES + _LLAVA_TYPES + _LLAVA_NEXT_TYPES):
            raise UnsupportedModelError(f"{root}: image processor {kind or '(unnamed)'!r} is not supported "
                                        "(only CLIP, LLaVA and LLaVA-NeXT image processors)")
        return cls.from_hf_dict(d)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(size=dict(self.size), crop_size=dict(self.crop_size),
                   image_mean=list(self.image_mean), image_std=list(self.image_std))
        # Left out for single-view configs, so LLaVA-1.5 manifests stay byte-for-byte what they were.
        if self.image_grid_pinpoints is None:
            del out["image_grid_pinpoints"]
        else:
            out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocessConfig":
        names = [f.name for f in fields(cls) if f.name != "image_grid_pinpoints"]
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
        if d.get("image_grid_pinpoints") is not None:
            v["image_grid_pinpoints"] = _pinpoints(d["image_grid_pinpoints"])
        return cls(**v)

    @property
    def is_anyres(self) -> bool:
        """True for LLaVA-NeXT configs: an image becomes a base view plus a grid of tiles."""
        return self.image_grid_pinpoints is not None

    @property
    def tile_size(self) -> int:
        """The side of one AnyRes tile, chosen as transformers does: crop height, else size height, else
        shortest_edge. The model's vision tower must take exactly this size."""
        return self.crop_size.get("height") or self.size.get("height") or self.size.get("shortest_edge")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of pixel_values, when it does not depend on the input image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        # Square after padding (LLaVA), or square views (AnyRes), so shortest_edge fixes both sides.
        if self.do_resize and (self.do_pad or self.is_anyres):
            return self.size["shortest_edge"], self.size["shortest_edge"]
        raise UnsupportedModelError("the image output size depends on the input (no center crop, no fixed resize)")


# --- LLaVA-NeXT AnyRes arithmetic ---------------------------------------------------------------
# Pure integer/float arithmetic shared by the runtime (which tiles to cut), the exporter (how many
# visual tokens a bucket's static graphs must hold) and the FLOPs model. Each step follows
# transformers' float expressions operation for operation, because its truncations (int(), //,
# round(x, 7)) decide token counts and any reordering could move a count by one.

class AnyresLayout(NamedTuple):
    """Where one image lands: its canvas, tile grid, unpadded feature grid and visual-token count."""
    resolution: tuple[int, int]  # the chosen pinpoint, (height, width) in pixels
    rows: int  # tiles down
    cols: int  # tiles across
    feature_height: int  # rows of grid features kept after unpadding (each gets one image_newline)
    feature_width: int  # columns of grid features kept after unpadding
    base_tokens: int  # the base view: patch_grid ** 2
    num_tokens: int  # base_tokens + feature_height * (feature_width + 1): what the LLM sees

    @property
    def num_views(self) -> int:
        """Images through the vision tower: the base view plus every tile."""
        return self.rows * self.cols + 1


class AnyresBucket(NamedTuple):
    """One pinpoint as a static shape: its views through the vision tower and the most visual tokens."""
    resolution: tuple[int, int]
    rows: int
    cols: int
    num_views: int  # rows * cols + 1 (base view first)
    max_tokens: int  # with nothing unpadded: an image of exactly this aspect ratio reaches it


def _image_hw(image_size) -> tuple[int, int]:
    try:
        height, width = (operator.index(v) for v in image_size)
    except (TypeError, ValueError):
        height = width = 0
    if height < 1 or width < 1:
        raise ImageError(f"image size must be two positive integers (height, width), got {image_size!r}")
    return height, width


def select_best_resolution(image_size, pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) transformers picks for an image of ``image_size`` (height, width).

    Each candidate scales the image to fit inside it; the winner keeps the most original pixels
    (scaled sides truncated with int(), capped at the original area, so upscaling earns nothing),
    ties going to the least canvas area left empty, and remaining ties to the earliest entry. An
    image so thin that every candidate keeps 0 pixels still gets one (the smallest canvas).
    """
    height, width = _image_hw(image_size)
    best, best_kept, best_wasted = None, 0, math.inf
    for target_h, target_w in _pinpoints(pinpoints):
        scale = min(target_w / width, target_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_w * target_h - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (target_h, target_w), kept, wasted
    return best


def _grid(resolution: tuple[int, int], tile_size: int) -> tuple[int, int]:
    if resolution[0] % tile_size or resolution[1] % tile_size:
        raise UnsupportedModelError(f"pinpoint {list(resolution)} is not a multiple of the {tile_size}-pixel tile")
    return resolution[0] // tile_size, resolution[1] // tile_size


def anyres_feature_layout(image_size, pinpoints, tile_size: int = 336, patch_grid: int = 24) -> AnyresLayout:
    """The grid and visual-token count LLaVA-NeXT's packing gives an image of ``image_size`` (height, width).

    The tile features form a (rows * patch_grid, cols * patch_grid) map of the padded canvas; the
    rows (or columns) that only saw padding are cut away, and each remaining row ends with one
    image_newline token. The cut is computed from the original size, not from the resized pixels:
    the kept side is int(round(side * scale, 7)), and the same number of feature rows is dropped on
    both ends, so an odd difference keeps one padding row (the kept side is that value + 1).
    """
    resolution = select_best_resolution(image_size, pinpoints)
    rows, cols = _grid(resolution, tile_size)
    height, width = _image_hw(image_size)
    feat_h, feat_w = rows * patch_grid, cols * patch_grid
    if width / height > feat_w / feat_h:  # wider than the canvas: padding above and below
        kept = int(round(height * (feat_w / width), 7))
        feat_h -= (feat_h - kept) // 2 * 2
    else:  # taller (or the same shape): padding left and right
        kept = int(round(width * (feat_h / height), 7))
        feat_w -= (feat_w - kept) // 2 * 2
    base = patch_grid * patch_grid
    return AnyresLayout(resolution, rows, cols, feat_h, feat_w, base, base + feat_h * (feat_w + 1))


def anyres_buckets(pinpoints, tile_size: int = 336, patch_grid: int = 24) -> list[AnyresBucket]:
    """One static shape per pinpoint, in config order: the vision batch and the largest token count.

    Within a bucket the token count still varies with the aspect ratio (unpadding only removes
    rows or columns), so a static prefill realised at ``max_tokens`` covers every image in it.
    """
    buckets = []
    for resolution in _pinpoints(pinpoints):
        rows, cols = _grid(resolution, tile_size)
        grid_tokens = rows * patch_grid * (cols * patch_grid + 1)
        buckets.append(AnyresBucket(resolution, rows, cols, rows * cols + 1, patch_grid * patch_grid + grid_tokens))
    return buckets

