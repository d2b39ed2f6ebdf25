"""``shapes-llava``: a small LLaVA trained here on shapes-vqa, shipped in the repository.

Architecture: CLIP-style vision tower (64 px, patch 4: 256 visual tokens), MLP projector,
Llama text model, a word-level tokenizer over the dataset's vocabulary and a LLaVA-1.5 style
chat template. ``write_untrained`` makes the initial model directory the training script
starts from; the trained one lives in ``models/data/shapes-llava``.
"""

from __future__ import annotations

from pathlib import Path

from mllm_deploy.core.fsutil import atomic_directory
from mllm_deploy.models.tiny import SPECIAL_TOKENS

PACKAGED_DIR = Path(__file__).parent / "data" / "shapes-llava"

GEOMETRY = dict(
    image_size=64, patch_size=4, vision_hidden=96, vision_layers=3, vision_heads=4, vision_intermediate=256,
    text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=352,
    # a large RoPE base leaves more slowly rotating dimensions for content lookups across the
    # 256 visual tokens (10000 plateaued near 72%; see BENCHMARKS.md "shapes-llava training")
    rope_theta=1_000_000.0,
)


def build_word_tokenizer():
    """Word-level tokenizer over shapes-vqa's words and the chat template's words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from mllm_deploy.scenes.shapes_vqa import vocabulary

    words = SPECIAL_TOKENS + ["user", "assistant", ":"] + vocabulary()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return tok


# LLaVA's order: the image, then the question, then "assistant :". The answer position reads the
# question a few tokens back and looks the answer up among the visual tokens in one step. (A
# question-before-image order, tried to let visual tokens see the question, trained no faster:
# see BENCHMARKS.md "shapes-llava training".)
SHAPES_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'user : ' }}{%- else -%}{{ 'assistant : ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<image> ' }}{%- endif -%}{%- endfor -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ ' ' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant :' }}{%- endif -%}"
)


def write_untrained(target: str | Path, seed: int = 0, geometry: dict | None = None) -> Path:
    """The initial (random) model directory: config, weights, tokenizer, processor, chat template.
    ``geometry`` overrides entries of ``GEOMETRY``."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    g = {**GEOMETRY, **(geometry or {})}
    tok = build_word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=g["vision_hidden"], intermediate_size=g["vision_intermediate"],
                              num_hidden_layers=g["vision_layers"], num_attention_heads=g["vision_heads"],
                              image_size=g["image_size"], patch_size=g["patch_size"], projection_dim=g["vision_hidden"])
    text = LlamaConfig(hidden_size=g["text_hidden"], intermediate_size=g["text_intermediate"],
                       num_hidden_layers=g["text_layers"], num_attention_heads=g["text_heads"],
                       num_key_value_heads=g["text_kv_heads"], vocab_size=tok.get_vocab_size(),
                       max_position_embeddings=512, rope_theta=float(g["rope_theta"]), bos_token_id=tok.token_to_id("<s>"),
                       eos_token_id=tok.token_to_id("</s>"), pad_token_id=tok.token_to_id("<pad>"),
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.token_to_id("<image>"))
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": g["image_size"]},
                                              crop_size={"height": g["image_size"], "width": g["image_size"]}),
        tokenizer=fast, patch_size=g["patch_size"], vision_feature_select_strategy="default",
        chat_template=SHAPES_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(target)


def packaged_model(target=None) -> Path:
    """The trained model shipped in the repository (registry entry for ``shapes-llava``)."""
    if not (PACKAGED_DIR / "model.safetensors").is_file():
        from mllm_deploy.core.errors import MllmError

        raise MllmError(f"shapes-llava weights are missing from {PACKAGED_DIR}; train them with "
                        "`python -m mllm_deploy.tools.shapes_train`")
    return PACKAGED_DIR

