"""run-mllm on an exported bundle generates exactly what transformers' generate() does, and the PyTorch
reference run as a backend (calib/torch_runner.py) generates what onnxruntime does."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIGS, make_image, run_cli

NEW_TOKENS = 20
QUESTIONS = {"gqa56": "What is in the image?", "mha42": "How many objects are there?",
             "gqa70": "Describe the picture in detail."}


def hf_generate(model_dir, image_path, prompt=None, raw_prompt=None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    image = Image.open(image_path)
    if prompt is not None:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
    else:
        inputs = processor(text=raw_prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("mode", ["prompt", "raw"])
def test_greedy_tokens_equal_hf_generate(name, mode, tiny_model_dirs, tiny_bundles, tmp_path):
    image = make_image(tmp_path / "img.png", size=(97, 61) if mode == "raw" else (64, 90), seed=len(name))
    question = QUESTIONS[name]
    if mode == "prompt":
        kwargs, cli_args = {"prompt": question}, ["--prompt", question]
    else:
        raw = f"Image: <image>\nQuestion: {question} Answer:"
        kwargs, cli_args = {"raw_prompt": raw}, ["--raw-prompt", raw]
    hf_ids, hf_tokens = hf_generate(tiny_model_dirs[name], image, **kwargs)

    proc = run_cli("run-mllm", str(tiny_bundles[name]), "--image", str(image), *cli_args,
                   "--max-new-tokens", str(NEW_TOKENS), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["prompt_tokens"] == len(hf_ids)
    assert len(hf_tokens) >= 16, "the reference stopped early; pick another prompt so the test keeps its strength"
    assert result["tokens"] == hf_tokens
    assert set(result["timings"]) == {"vision_ms", "prefill_ms", "decode_ms", "total_ms"}
    assert len(result["timings"]["decode_ms"]) == len(hf_tokens) - 1


def test_prompt_ids_equal_hf_processor(tiny_model_dirs, tiny_bundles, tmp_path):
    from transformers import AutoProcessor

    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.prompt import PromptBuilder

    name = "gqa56"
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[name])
    builder = PromptBuilder.from_bundle(load_bundle(tiny_bundles[name]))
    image = Image.open(make_image(tmp_path / "i.png"))
    for text in ["hi", "Count the shapes: one, two.", "ünïcödé ✓ text\nwith lines"]:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        hf = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ours = builder.encode(builder.render_chat(text))
        assert ours[0].tolist() == list(hf["input_ids"][0] if hasattr(hf["input_ids"][0], "__len__") else hf["input_ids"])


@pytest.mark.parametrize("method", ["dense", "fastv"])
def test_torch_backend_generates_what_onnxruntime_generates(method, tiny_bundles, pruned_bundles):
    """The same Generator over the PyTorch reference's runners: same tokens, same KV lengths; a second
    generation (fresh KV buffers) uploads its cache anew and repeats the first."""
    import numpy as np

    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.generator import Generator
    from mllm_deploy.runtime.timing import synthetic_inputs

    path = tiny_bundles["gqa56"] if method == "dense" else pruned_bundles("gqa56", method, "native")
    bundle = load_bundle(path)
    ids, pixels = synthetic_inputs(bundle, bundle.visual_tokens + 12)
    with Generator(bundle, "onnxruntime") as graphs:
        want = graphs.generate(ids, pixels, NEW_TOKENS, ignore_eos=True)
    with Generator(bundle, "torch") as reference:
        got = reference.generate(ids, pixels, NEW_TOKENS, ignore_eos=True)
        again = reference.generate(ids, pixels, NEW_TOKENS, ignore_eos=True)
        assert reference.runners["decode"].device_facts()["run_dtype"] in ("float32", "float16")
    assert got.tokens == want.tokens == again.tokens
    assert got.kv_tokens_per_layer == want.kv_tokens_per_layer == bundle.kv_lengths(ids.shape[1])
    np.testing.assert_allclose(got.first_logits, want.first_logits, rtol=1e-4, atol=1e-4)
