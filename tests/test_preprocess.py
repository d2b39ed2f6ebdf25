"""runtime.preprocess must give the same pixel_values as transformers' PIL-backend image processors."""

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
from mllm_deploy.runtime.preprocess import ImagePreprocessConfig, load_image, preprocess

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5

# name -> (processor class name, kwargs)
HF_CONFIGS = {
    "clip56": ("CLIPImageProcessorPil", dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})),
    "clip64_crop48": ("CLIPImageProcessorPil", dict(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48})),
    "clip64_crop40x52": ("CLIPImageProcessorPil",
                         dict(size={"shortest_edge": 64}, crop_size={"height": 40, "width": 52})),
    "clip_hw_nocrop": ("CLIPImageProcessorPil", dict(size={"height": 40, "width": 72}, do_center_crop=False)),
    "clip_bilinear_raw": ("CLIPImageProcessorPil",
                          dict(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28}, resample=2,
                               do_rescale=False, do_normalize=False)),
    "clip_rescale_only": ("CLIPImageProcessorPil",
                          dict(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28}, do_normalize=False)),
    "llava15_336": ("CLIPImageProcessorPil",
                    dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    "llava_pad": ("LlavaImageProcessorPil",
                  dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_pad=True)),
    "llava_nopad": ("LlavaImageProcessorPil",
                    dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_pad=False)),
    "llava_pad_hw_nocrop": ("LlavaImageProcessorPil",
                            dict(size={"height": 48, "width": 32}, do_center_crop=False, do_pad=True)),
}


@lru_cache(maxsize=None)
def hf_processor(name: str):
    cls_name, kwargs = HF_CONFIGS[name]
    return getattr(transformers, cls_name)(**kwargs)


def hf_pixels(processor, image: Image.Image) -> np.ndarray:
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"])


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """Deterministic test images; alpha varies over the whole 0..255 range (0 and 255 included)."""
    rng = np.random.RandomState(seed)
    rgb = rng.randint(0, 256, (height, width, 3)).astype(np.uint8)
    alpha = rng.randint(0, 256, (height, width)).astype(np.uint8)
    alpha.flat[:2] = [0, 255][: alpha.size]
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "L":
        return Image.fromarray(rgb[..., 0])
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    if mode == "P":
        return Image.fromarray(rgb).quantize(colors=32)
    if mode == "P+transparency":  # palette image with a transparent index: composited on white
        image = Image.fromarray(rgb).quantize(colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "I;16":
        return Image.fromarray(rng.randint(0, 65536, (height, width)).astype(np.uint16))
    if mode in ("1", "CMYK", "YCbCr"):
        return Image.fromarray(rgb).convert(mode)
    raise ValueError(mode)


# HF handles every mode below (checked with transformers 5.23); if a future version errors on
# one, the comparison test skips that case (see `test_matches_hf`). "La" is left out because
# Pillow cannot even create it by conversion.
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "I;16", "1", "CMYK", "YCbCr"]
SIZES = [(90, 60), (50, 80), (64, 64), (30, 20), (20, 45), (3, 200), (200, 3), (1, 40), (1, 1)]
IMAGES = sorted({("RGB", w, h) for w, h in SIZES} | {("RGBA", w, h) for w, h in SIZES[:5]}
                | {(m, 90, 60) for m in MODES} | {(m, 50, 80) for m in ("RGBA", "LA", "P+transparency")})


@pytest.mark.parametrize("config_name", list(HF_CONFIGS))
@pytest.mark.parametrize("mode,width,height", IMAGES)
def test_matches_hf(config_name, mode, width, height):
    image = make_image(mode, width, height, seed=width * 1000 + height)
    processor = hf_processor(config_name)
    try:
        expected = hf_pixels(processor, image)
    except Exception as exc:  # a mode transformers itself cannot handle: nothing to match
        pytest.skip(f"transformers fails on mode {mode}: {exc}")
    config = ImagePreprocessConfig.from_hf_dict(processor.to_dict())
    ours = preprocess(image, config)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == expected.shape
    assert np.abs(ours - expected.astype(np.float32)).max(initial=0.0) <= TOL
    if config.do_center_crop or "height" in config.size or config.do_pad:
        assert ours.shape[2:] == config.output_size


def test_llava_pad_differs_from_no_pad():
    image = make_image("RGB", 90, 40)
    padded = preprocess(image, ImagePreprocessConfig.from_hf_dict(hf_processor("llava_pad").to_dict()))
    plain = preprocess(image, ImagePreprocessConfig.from_hf_dict(hf_processor("llava_nopad").to_dict()))
    assert np.abs(padded - plain).max() > 0.1


def test_output_size_needs_fixed_geometry():
    config = ImagePreprocessConfig.from_hf_dict({"size": {"shortest_edge": 32}, "do_center_crop": False})
    with pytest.raises(UnsupportedModelError):
        config.output_size
    padded = ImagePreprocessConfig.from_hf_dict({"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                                                 "size": {"shortest_edge": 32}, "do_center_crop": False})
    assert padded.output_size == (32, 32)
    assert preprocess(make_image("RGB", 70, 20), padded).shape == (1, 3, 32, 32)


def test_no_convert_rgb_rejects_other_modes():
    config = ImagePreprocessConfig.from_hf_dict({"do_convert_rgb": False})
    assert preprocess(make_image("RGB", 30, 30), config).shape == (1, 3, 224, 224)
    with pytest.raises(ImageError, match="mode L"):
        preprocess(make_image("L", 30, 30), config)


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config_name", list(HF_CONFIGS))
def test_config_round_trip(config_name):
    config = ImagePreprocessConfig.from_hf_dict(hf_processor(config_name).to_dict())
    data = json.loads(json.dumps(config.to_dict()))
    assert ImagePreprocessConfig.from_dict(data) == config
    assert config.do_pad == HF_CONFIGS[config_name][1].get("do_pad", False)


def test_hf_defaults_and_legacy_sizes():
    default = ImagePreprocessConfig.from_hf_dict({})
    hf_default = ImagePreprocessConfig.from_hf_dict(transformers.CLIPImageProcessorPil().to_dict())
    assert default == hf_default
    assert default.size == {"shortest_edge": 224} and default.output_size == (224, 224) and not default.do_pad
    legacy = ImagePreprocessConfig.from_hf_dict({"size": 336, "crop_size": 336, "image_mean": None})
    assert legacy.size == {"shortest_edge": 336} and legacy.crop_size == {"height": 336, "width": 336}
    assert legacy.image_mean == default.image_mean
    # do_pad only means pad-to-square for LLaVA's image processor.
    assert not ImagePreprocessConfig.from_hf_dict({"image_processor_type": "CLIPImageProcessor", "do_pad": True}).do_pad


@pytest.mark.parametrize("bad", [{"size": {"longest_edge": 3}}, {"crop_size": {"height": 0, "width": 4}},
                                 {"image_mean": [0.5, 0.5]}, {"resample": 9}, {"image_std": [1, 0, 1]}])
def test_bad_hf_configs_are_user_errors(bad):
    with pytest.raises(UnsupportedModelError):
        ImagePreprocessConfig.from_hf_dict(bad)


def test_from_dict_missing_keys():
    data = ImagePreprocessConfig.from_hf_dict({}).to_dict()
    del data["size"]
    with pytest.raises(MllmError, match="size"):
        ImagePreprocessConfig.from_dict(data)


def test_from_model_dir_clip_save_pretrained(tmp_path):
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48})
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    config = ImagePreprocessConfig.from_model_dir(tmp_path)
    assert config == ImagePreprocessConfig.from_hf_dict(processor.to_dict())
    assert config.output_size == (48, 48) and not config.do_pad
    image = make_image("RGBA", 77, 51)
    assert np.abs(preprocess(image, config) - hf_pixels(processor, image)).max() <= TOL


def _llava_processor(image_processor):
    from mllm_deploy.models.tiny import build_tokenizer

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(384), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("image_processor_cls,do_pad", [("LlavaImageProcessorPil", True),
                                                         ("LlavaImageProcessorPil", False),
                                                         ("CLIPImageProcessorPil", False)])
def test_from_model_dir_llava_processor(tmp_path, image_processor_cls, do_pad):
    kwargs = dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    if image_processor_cls.startswith("Llava"):
        kwargs["do_pad"] = do_pad
    image_processor = getattr(transformers, image_processor_cls)(**kwargs)
    _llava_processor(image_processor).save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((tmp_path / "processor_config.json").read_text())
    config = ImagePreprocessConfig.from_model_dir(tmp_path)
    assert config.do_pad is do_pad and config.output_size == (56, 56)
    for image in (make_image("RGB", 90, 40), make_image("P+transparency", 30, 70)):
        assert np.abs(preprocess(image, config) - hf_pixels(image_processor, image)).max() <= TOL


def test_from_model_dir_errors(tmp_path):
    def check(match):
        with pytest.raises(UnsupportedModelError, match=match) as info:
            ImagePreprocessConfig.from_model_dir(tmp_path)
        assert "\n" not in str(info.value)

    check("no image processor config")
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaProcessor"}))
    check("no image processor config")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    check("SiglipImageProcessor")
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    check("cannot read")


# --- loading ---------------------------------------------------------------------------------

def test_load_image_round_trip(tmp_path):
    source = make_image("RGBA", 33, 21)
    source.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGBA" and np.array_equal(np.asarray(loaded), np.asarray(source))
    config = ImagePreprocessConfig.from_hf_dict(hf_processor("clip56").to_dict())
    assert np.abs(preprocess(loaded, config) - hf_pixels(hf_processor("clip56"), source)).max() <= TOL


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    make_image("RGB", 64, 64).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "directory"])
def test_load_image_errors(tmp_path, kind):
    path = tmp_path / "x.png"
    if kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        path.write_bytes(_png_bytes()[:600])
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_import_without_torch():
    code = ("import sys\n"
            "sys.modules['torch'] = None\n"
            "sys.modules['transformers'] = None\n"
            "import mllm_deploy.runtime.preprocess as p\n"
            "from PIL import Image\n"
            "c = p.ImagePreprocessConfig.from_dict(p.ImagePreprocessConfig.from_hf_dict({}).to_dict())\n"
            "print(p.preprocess(Image.new('RGB', (40, 30)), c).shape)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 224, 224)"
