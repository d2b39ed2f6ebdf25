"""LLaVA-NeXT's packing of per-view features into the visual tokens the language model sees, in NumPy.

The vision graph runs once per view (the base image, then the grid tiles row by row, as
runtime/preprocess.preprocess_anyres orders them) and gives ``patch_grid²`` projected features each. The
language model sees: the base view's features, then the tiles' features laid out as one
(rows·patch_grid) × (cols·patch_grid) map of the padded canvas, cut to the rows (or columns) the original image
covers (formats/image.anyres_feature_layout: the same symmetric cut transformers' unpad_image makes), each map
row followed by the model's ``image_newline`` vector. This module is that layout; the exporter and runtime of
NeXT bundles build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AnyresPixels:
    """One LLaVA-NeXT image ready for the vision graph: its views [1 + rows·cols, 3, T, T] (runtime/preprocess.
    preprocess_anyres) and its original [height, width], which decides the packing (``layout``)."""

    views: np.ndarray
    image_size: tuple[int, int]
    layout: object  # formats/image.AnyresLayout

    @property
    def visual_tokens(self) -> int:
        return int(self.layout.num_tokens)


def anyres_pixels(image, config, patch_grid: int) -> AnyresPixels:
    """Preprocess a PIL image for a LLaVA-NeXT bundle (``config``: its ImagePreprocessConfig)."""
    from mllm_deploy.formats.image import anyres_feature_layout
    from mllm_deploy.runtime.preprocess import preprocess_anyres

    views, sizes = preprocess_anyres(image, config)
    size = (int(sizes[0]), int(sizes[1]))
    layout = anyres_feature_layout(size, config.image_grid_pinpoints, tile_size=config.tile_size, patch_grid=patch_grid)
    return AnyresPixels(views, size, layout)


def pack_views(views: np.ndarray, layout, patch_grid: int, newline: np.ndarray) -> np.ndarray:
    """[N, d] visual tokens from per-view features ``views`` [1 + rows·cols, patch_grid², d] of one image whose
    layout is ``layout`` (formats/image.AnyresLayout) and the model's ``newline`` [d]."""
    views = np.asarray(views)
    rows, cols, g = layout.rows, layout.cols, patch_grid
    if views.ndim != 3 or views.shape[0] != 1 + rows * cols or views.shape[1] != g * g:
        raise ValueError(f"expected [{1 + rows * cols}, {g * g}, d] view features for a {rows}x{cols} grid, got"
                         f" {list(views.shape)}")
    d = views.shape[2]
    canvas = views[1:].reshape(rows, cols, g, g, d).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    top = (rows * g - layout.feature_height) // 2
    left = (cols * g - layout.feature_width) // 2
    kept = canvas[top:top + layout.feature_height, left:left + layout.feature_width]
    ends = np.broadcast_to(np.asarray(newline, views.dtype).reshape(1, 1, d), (layout.feature_height, 1, d))
    grid = np.concatenate([kept, ends], axis=1).reshape(-1, d)
    return np.concatenate([views[0], grid], axis=0)
