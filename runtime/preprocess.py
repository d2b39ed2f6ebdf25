"""Image loading and CLIP/LLaVA/LLaVA-NeXT preprocessing in NumPy + Pillow (no torch, no transformers).

Reproduces transformers' PIL-backend ``CLIPImageProcessorPil`` and ``LlavaImageProcessorPil``:
convert to RGB -> (LLaVA) pad to square -> resize -> center crop -> rescale -> normalize.
The same Pillow calls are used for colour conversion and resampling, so the uint8 pixels
match exactly; the float steps use the same dtypes as transformers, so the output does too.

``preprocess_anyres`` reproduces ``LlavaNextImageProcessorPil`` (LLaVA-NeXT's AnyRes): the image
is fitted into the best pinpoint canvas and cut into tiles, and a squashed base view goes first;
every view then takes the same resize -> crop -> rescale -> normalize steps as above. The grid and
token arithmetic it shares with the exporter lives in :mod:`mllm_deploy.formats.image`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from PIL import Image

from mllm_deploy.core.errors import ImageError, UnsupportedModelError
from mllm_deploy.formats.image import (  # noqa: F401  (the AnyRes arithmetic, re-exported for the runtime)
    AnyresBucket,
    AnyresLayout,
    ImagePreprocessConfig,
    anyres_buckets,
    anyres_feature_layout,
    select_best_resolution,
)

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


def _rgb_array(image: "Image.Image", config: ImagePreprocessConfig) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess takes a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image is empty ({image.width}x{image.height})")
    if config.do_convert_rgb:
        return _to_rgb(image)
    if image.mode == "RGB":
        return np.asarray(image)
    # transformers would carry 1 or 4 channels on and fail (or emit non-RGB pixel values)
    raise ImageError(f"image mode {image.mode} needs do_convert_rgb=True")


def _resize(arr: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    # Resampling is done by Pillow on the uint8 RGB image, exactly as transformers does (a resize
    # to the same size is a plain copy in Pillow, so it cannot blur an already-sized tile).
    return np.asarray(Image.fromarray(arr).resize((width, height), resample=resample))


def _finish(arr: np.ndarray, config: ImagePreprocessConfig) -> np.ndarray:
    """uint8 HWC -> float32 CHW: the resize, crop, rescale and normalize steps every view takes."""
    if config.do_resize:
        arr = _resize(arr, *_resize_target(arr.shape[0], arr.shape[1], config.size), config.resample)
    if config.do_center_crop:
        arr = _center_crop(arr, config.crop_size["height"], config.crop_size["width"])
    if config.do_rescale:
        # transformers multiplies in float64 and then downcasts to float32.
        arr = (arr.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        # ... and normalizes in float32 with float32 mean/std.
        arr = arr.astype(np.float32, copy=False)
        arr = (arr - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return arr.astype(np.float32, copy=False).transpose(2, 0, 1)


def preprocess(image: "Image.Image", config: ImagePreprocessConfig) -> np.ndarray:
    """One PIL image -> float32 pixel_values [1, 3, H, W], as transformers' PIL backend makes them."""
    if config.is_anyres:  # one view would silently drop the tiles and image_sizes the model needs
        raise UnsupportedModelError("this image config is LLaVA-NeXT AnyRes; use preprocess_anyres")
    arr = _rgb_array(image, config)
    if config.do_pad:
        arr = _pad_to_square(arr, config.image_mean)
    return np.ascontiguousarray(_finish(arr, config)[None])


def _fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    # The side that limits the scale fills the canvas; the other is rounded UP (math.ceil) and
    # capped, unlike select_best_resolution, which truncates when it scores the same fit.
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def preprocess_anyres(image: "Image.Image", config: ImagePreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """One PIL image -> (pixel_values [rows * cols + 1, 3, H, W] float32, image_sizes [height, width] int64).

    View 0 is the whole image squashed (not padded) to ``size``; tiles follow row-major over the
    canvas of the pinpoint that :func:`select_best_resolution` picks, where the image sits centred
    on black (zeros before normalization, not the mean colour LLaVA-1.5 pads with). image_sizes is
    the original size, which the model needs to cut the padding back out of the tile features.
    """
    if not config.is_anyres:
        raise UnsupportedModelError("this image config has no image_grid_pinpoints; use preprocess")
    arr = _rgb_array(image, config)
    height, width = arr.shape[:2]
    target_h, target_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    fit_h, fit_w = _fit_inside(height, width, target_h, target_w)
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    top, left = (target_h - fit_h) // 2, (target_w - fit_w) // 2  # an odd remainder goes below / right
    canvas[top:top + fit_h, left:left + fit_w] = _resize(arr, fit_h, fit_w, config.resample)
    tile = config.tile_size
    size = config.size
    base_h, base_w = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    views = [_resize(arr, base_h, base_w, config.resample)]
    views += [canvas[y:y + tile, x:x + tile] for y in range(0, target_h, tile) for x in range(0, target_w, tile)]
    pixel_values = np.stack([_finish(view, config) for view in views])
    return np.ascontiguousarray(pixel_values), np.array([height, width], dtype=np.int64)
