"""LLaVA-NeXT AnyRes: our torch-free tiling and token arithmetic against real transformers objects.

Three independent witnesses must agree with runtime.preprocess / formats.image:
the PIL-backend LlavaNextImageProcessorPil (pixel_values, image_sizes), LlavaNextProcessor (how many
<image> tokens it writes into the prompt) and a tiny random LlavaNextForConditionalGeneration (how
many features pack_image_features emits, and that a forward pass accepts both).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_deploy.core.errors import ImageError, MllmError, UnsupportedModelError
from mllm_deploy.runtime.preprocess import (
    ImagePreprocessConfig,
    anyres_buckets,
    anyres_feature_layout,
    preprocess,
    preprocess_anyres,
    select_best_resolution,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # as tests/test_preprocess.py; in practice the match is exact
LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# name -> (tile = vision image_size = crop, vision patch size, pinpoints). "llava16" is LLaVA-1.6's
# real geometry (24x24 patches per tile); "tiny56" has 4x4 patches per tile, where unpadding's
# rounding bites more often, and a 3x3 and a 1x4 grid.
GEOMETRIES = {
    "llava16": (336, 14, LLAVA16_PINPOINTS),
    "tiny56": (56, 14, [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168], [168, 168], [56, 224]]),
}

# (mode, width, height): >= 8 aspect ratios, every LLaVA-1.6 bucket (checked below), odd sizes,
# upscaled small images, RGBA and grayscale.
IMAGES = [
    ("RGB", 1200, 200),  # very wide
    ("RGB", 150, 900),  # very tall
    ("RGB", 500, 500),  # square
    ("RGB", 40, 30),  # small: upscaled
    ("RGB", 1500, 1400),  # large
    ("RGB", 333, 517),  # odd, tall-ish
    ("RGB", 517, 333),  # odd, wide-ish
    ("RGBA", 700, 350),  # exactly 2:1
    ("L", 350, 700),  # grayscale, exactly 1:2
    ("RGB", 1001, 333),
    ("P", 97, 301),
    ("LA", 1, 3),
    ("RGB", 3001, 2),  # so thin that unpadding keeps 0 grid rows: the base view's tokens only
]


def make_image(mode: str, width: int, height: int) -> Image.Image:
    """test_preprocess.py's deterministic images, seeded by the size so every size gets its own."""
    from test_preprocess import make_image as seeded

    return seeded(mode, width, height, seed=width * 7919 + height)


@lru_cache(maxsize=None)
def hf_image_processor(geometry: str):
    tile, _, pinpoints = GEOMETRIES[geometry]
    return transformers.LlavaNextImageProcessorPil(size={"shortest_edge": tile},
                                                   crop_size={"height": tile, "width": tile},
                                                   image_grid_pinpoints=pinpoints)


@lru_cache(maxsize=None)
def our_config(geometry: str) -> ImagePreprocessConfig:
    return ImagePreprocessConfig.from_hf_dict(hf_image_processor(geometry).to_dict())


@lru_cache(maxsize=None)
def hf_processor(geometry: str):
    from mllm_deploy.models.tiny import build_tokenizer

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(384), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    # LLaVA-1.6's settings: CLS counted, then dropped by the "default" feature selection.
    return transformers.LlavaNextProcessor(image_processor=hf_image_processor(geometry), tokenizer=tokenizer,
                                           patch_size=GEOMETRIES[geometry][1], vision_feature_select_strategy="default",
                                           num_additional_image_tokens=1)


@lru_cache(maxsize=None)
def hf_model(geometry: str):
    tile, patch, pinpoints = GEOMETRIES[geometry]
    processor = hf_processor(geometry)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=tile, patch_size=patch)
    text = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=len(processor.tokenizer),
                                    max_position_embeddings=4096)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                          image_token_id=processor.image_token_id,
                                          vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    return transformers.LlavaNextForConditionalGeneration(config).eval()


def patch_grid(geometry: str) -> int:
    tile, patch, _ = GEOMETRIES[geometry]
    return tile // patch


def our_layout(geometry: str, height: int, width: int):
    tile, _, pinpoints = GEOMETRIES[geometry]
    return anyres_feature_layout((height, width), pinpoints, tile_size=tile, patch_grid=patch_grid(geometry))


# --- pixels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("mode,width,height", IMAGES)
def test_pixels_match_hf(geometry, mode, width, height):
    image = make_image(mode, width, height)
    expected = hf_image_processor(geometry)(images=image, return_tensors="np")
    pixels, image_sizes = preprocess_anyres(image, our_config(geometry))
    tile = GEOMETRIES[geometry][0]
    layout = our_layout(geometry, height, width)
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    assert pixels.shape == (layout.num_views, 3, tile, tile) == expected["pixel_values"].shape[1:]
    np.testing.assert_allclose(pixels, expected["pixel_values"][0], rtol=0, atol=TOL)
    assert image_sizes.dtype == np.int64 and image_sizes.tolist() == [height, width]
    assert expected["image_sizes"][0].tolist() == [height, width]


def test_images_cover_every_llava16_bucket():
    chosen = {select_best_resolution((h, w), LLAVA16_PINPOINTS) for _, w, h in IMAGES}
    assert chosen == {tuple(p) for p in LLAVA16_PINPOINTS}


def test_view_order_is_base_then_row_major_tiles():
    """The base view is the whole image squashed; tiles follow row by row (checked on a 2x2 grid)."""
    config = our_config("llava16")
    quadrants = np.zeros((672, 672, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for i, colour in enumerate(colours):
        quadrants[(i // 2) * 336:(i // 2 + 1) * 336, (i % 2) * 336:(i % 2 + 1) * 336] = colour
    pixels, _ = preprocess_anyres(Image.fromarray(quadrants), config)
    assert pixels.shape[0] == 5
    mean, std = np.asarray(config.image_mean), np.asarray(config.image_std)
    for view, colour in zip(pixels[1:], colours):
        np.testing.assert_allclose(view[:, 168, 168], (np.asarray(colour) / 255 - mean) / std, atol=1e-5)
    base_tl = pixels[0][:, 10, 10]  # the base view still holds all four colours, shrunk
    np.testing.assert_allclose(base_tl, (np.asarray(colours[0]) / 255 - mean) / std, atol=1e-5)


# --- token counts: ours, the processor's and the model's -----------------------------------------

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("mode,width,height", IMAGES)
def test_token_count_matches_processor_and_model(geometry, mode, width, height):
    image = make_image(mode, width, height)
    layout = our_layout(geometry, height, width)
    processor = hf_processor(geometry)
    inputs = processor(text="Look: <image> now", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == layout.num_tokens

    model = hf_model(geometry)
    pixels, image_sizes = preprocess_anyres(image, our_config(geometry))
    pixel_values, sizes = torch.from_numpy(pixels)[None], torch.from_numpy(image_sizes)[None]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
        assert len(features) == 1 and features[0].shape[0] == layout.num_tokens
        # The whole model takes our pixels with the processor's prompt (it checks tokens == features).
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values,
              image_sizes=sizes, logits_to_keep=1)


def _sweep_sizes() -> list[tuple[int, int]]:
    """(height, width) pairs around every rounding edge: tile multiples +-1, primes, extreme ratios."""
    edges = [1, 2, 3, 13, 55, 56, 57, 100, 111, 167, 168, 169, 223, 335, 336, 337, 500, 517, 671, 672, 673,
             1007, 1008, 1009, 2016, 3001]
    rng = np.random.RandomState(22)
    random_sizes = [tuple(int(v) for v in rng.randint(1, 2500, 2)) for _ in range(300)]
    return sorted({(h, w) for h in edges for w in edges} | set(random_sizes))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_token_count_sweep(geometry):
    """Hundreds of sizes through the processor's count and the model's packing (no vision tower)."""
    tile, _, pinpoints = GEOMETRIES[geometry]
    grid = patch_grid(geometry)
    processor, model = hf_processor(geometry), hf_model(geometry)
    buckets = {b.resolution: b for b in anyres_buckets(pinpoints, tile_size=tile, patch_grid=grid)}
    hidden = model.config.text_config.hidden_size
    for height, width in _sweep_sizes():
        layout = our_layout(geometry, height, width)
        counted = processor._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"][0]
        features = torch.zeros(layout.num_views, grid * grid, hidden)
        with torch.no_grad():
            _, lens = model.model.pack_image_features([features], torch.tensor([[height, width]]),
                                                            "default", image_newline=model.model.image_newline)
        assert (counted, int(lens[0])) == (layout.num_tokens,) * 2, (height, width)
        assert layout.num_views == transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches(
            (height, width), pinpoints, tile)
        assert layout.base_tokens == grid * grid
        assert layout.num_tokens == grid * grid + layout.feature_height * (layout.feature_width + 1)
        bucket = buckets[layout.resolution]
        assert (bucket.rows, bucket.cols, bucket.num_views) == (layout.rows, layout.cols, layout.num_views)
        assert layout.num_tokens <= bucket.max_tokens


# --- best resolution and buckets -----------------------------------------------------------------

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_select_best_resolution_matches_hf(geometry):
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pinpoints = GEOMETRIES[geometry][2]
    for height, width in _sweep_sizes():
        assert select_best_resolution((height, width), pinpoints) == tuple(hf_select((height, width), pinpoints))
    # Equal fits go to the first entry; when every fit keeps 0 pixels, the smallest canvas still wins.
    assert select_best_resolution((10, 10), [[336, 672], [672, 336]]) == (336, 672)
    assert select_best_resolution((1, 5000), [[672, 336], [336, 336]]) == (336, 336)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_buckets(geometry):
    """Each pinpoint's bucket: its view count, and an image of exactly its shape reaches max_tokens."""
    tile, _, pinpoints = GEOMETRIES[geometry]
    grid = patch_grid(geometry)
    buckets = anyres_buckets(pinpoints, tile_size=tile, patch_grid=grid)
    assert [list(b.resolution) for b in buckets] == pinpoints
    processor = hf_processor(geometry)
    for bucket in buckets:
        height, width = bucket.resolution
        assert (bucket.rows, bucket.cols, bucket.num_views) == (height // tile, width // tile,
                                                                 height // tile * (width // tile) + 1)
        layout = our_layout(geometry, height, width)
        assert layout.resolution == bucket.resolution and layout.num_tokens == bucket.max_tokens
        counted = processor._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"][0]
        assert counted == bucket.max_tokens
    if geometry == "llava16":  # the numbers a static LLaVA-1.6 recipe is sized by
        # e.g. 336x672 (h x w): 576 base + 24 rows * (48 features + 1 newline) = 1752
        assert [(b.num_views, b.max_tokens) for b in buckets] == [(3, 1752), (3, 1776), (5, 2928), (4, 2376),
                                                                  (4, 2328)]


def test_layout_rejects_pinpoints_off_the_tile():
    with pytest.raises(UnsupportedModelError, match="multiple"):
        anyres_feature_layout((100, 100), [[336, 600]])
    with pytest.raises(UnsupportedModelError, match="multiple"):
        anyres_buckets([[336, 600]])
    with pytest.raises(ImageError):
        anyres_feature_layout((0, 100), LLAVA16_PINPOINTS)


# --- configs -----------------------------------------------------------------------------------

def test_config_from_hf_and_round_trip():
    config = our_config("llava16")
    assert config.is_anyres and config.tile_size == 336 and not config.do_pad and config.output_size == (336, 336)
    assert config.image_grid_pinpoints == tuple(tuple(p) for p in LLAVA16_PINPOINTS)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["image_grid_pinpoints"] == LLAVA16_PINPOINTS
    assert ImagePreprocessConfig.from_dict(data) == config
    # The class default grid (LLaVA-1.6's) applies when the config leaves it out ...
    sized = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    default = ImagePreprocessConfig.from_hf_dict({"image_processor_type": "LlavaNextImageProcessor", **sized})
    assert default == ImagePreprocessConfig.from_hf_dict(transformers.LlavaNextImageProcessorPil(**sized).to_dict())
    assert default == config
    # ... but not with the class's own 224 crop, which does not divide 336-multiple pinpoints.
    with pytest.raises(UnsupportedModelError, match="not multiples of the 224-pixel tile"):
        ImagePreprocessConfig.from_hf_dict(transformers.LlavaNextImageProcessorPil().to_dict())


def test_llava15_manifest_unchanged():
    """Single-view configs keep exactly the keys they had, and old manifests still load."""
    config = ImagePreprocessConfig.from_hf_dict({"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                                                 "size": {"shortest_edge": 336}, "crop_size": 336,
                                                 "image_grid_pinpoints": LLAVA16_PINPOINTS})
    data = config.to_dict()
    assert set(data) == {"do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size",
                         "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad"}
    assert not config.is_anyres and ImagePreprocessConfig.from_dict(data) == config
    with pytest.raises(UnsupportedModelError, match="no image_grid_pinpoints"):
        preprocess_anyres(make_image("RGB", 30, 20), config)
    with pytest.raises(UnsupportedModelError, match="preprocess_anyres"):
        preprocess(make_image("RGB", 30, 20), our_config("llava16"))


def test_real_llava16_preprocessor_config(tmp_path):
    """The layout llava-hf/llava-v1.6-* ship (aspect_ratio_setting is ignored, as transformers does)."""
    hf = hf_image_processor("llava16").to_dict()
    hf.update(image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor",
              aspect_ratio_setting="anyres")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf))
    assert ImagePreprocessConfig.from_model_dir(tmp_path) == our_config("llava16")


@pytest.mark.parametrize("how", ["image_processor", "processor"])
def test_from_model_dir_save_pretrained(tmp_path, how):
    saver = hf_image_processor("tiny56") if how == "image_processor" else hf_processor("tiny56")
    saver.save_pretrained(tmp_path)
    config = ImagePreprocessConfig.from_model_dir(tmp_path)
    assert config == our_config("tiny56")
    image = make_image("RGBA", 150, 61)
    pixels, _ = preprocess_anyres(image, config)
    np.testing.assert_allclose(pixels, hf_image_processor("tiny56")(images=image, return_tensors="np")
                               ["pixel_values"][0], rtol=0, atol=TOL)


@pytest.mark.parametrize("bad,match", [
    ({"image_grid_pinpoints": [[336, 600]]}, "not multiples"),
    ({"image_grid_pinpoints": [[336]]}, "pairs"),
    ({"image_grid_pinpoints": []}, "pairs"),
    ({"image_grid_pinpoints": [[336, -672]]}, "pairs"),
])
def test_bad_anyres_configs(bad, match):
    d = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 336}, "crop_size": 336, **bad}
    with pytest.raises(UnsupportedModelError, match=match) as info:
        ImagePreprocessConfig.from_hf_dict(d)
    assert "\n" not in str(info.value)
    data = our_config("llava16").to_dict()
    data.update(bad)
    with pytest.raises(MllmError, match=match):
        ImagePreprocessConfig.from_dict(data)


def test_anyres_without_torch():
    code = ("import sys, json\n"
            "sys.modules['torch'] = None\n"
            "sys.modules['transformers'] = None\n"
            "import mllm_deploy.runtime.preprocess as p\n"
            "from PIL import Image\n"
            f"c = p.ImagePreprocessConfig.from_dict(json.loads({json.dumps(json.dumps(our_config('llava16').to_dict()))}))\n"
            "pixels, sizes = p.preprocess_anyres(Image.new('RGB', (700, 300)), c)\n"
            "print(pixels.shape, sizes.tolist(), p.anyres_feature_layout(tuple(sizes), c.image_grid_pinpoints).num_tokens)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    layout = our_layout("llava16", 300, 700)
    assert result.stdout.strip() == f"({layout.num_views}, 3, 336, 336) [300, 700] {layout.num_tokens}"


# --- packing the per-view features (runtime/anyres.py) against the model's own ---------------------

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("mode,width,height", IMAGES)
def test_packing_matches_the_model(geometry, mode, width, height):
    """Our NumPy packing of the per-view features equals LlavaNextModel's, newline rows and unpadding included."""
    from mllm_deploy.runtime.anyres import pack_views

    model = hf_model(geometry)
    pixels, image_sizes = preprocess_anyres(make_image(mode, width, height), our_config(geometry))
    with torch.no_grad():
        theirs = model.model.get_image_features(pixel_values=torch.from_numpy(pixels)[None],
                                                image_sizes=torch.from_numpy(image_sizes)[None]).pooler_output[0]
        hidden = model.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1]
        views = model.model.multi_modal_projector(hidden[:, 1:]).numpy()  # "default": the CLS position dropped
        newline = model.model.image_newline.numpy()
    ours = pack_views(views, our_layout(geometry, height, width), patch_grid(geometry), newline)
    assert ours.shape == tuple(theirs.shape)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)
