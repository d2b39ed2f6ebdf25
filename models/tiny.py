"""``tiny-llava``: a random-weight LLaVA made by code from a seed, with a real tokenizer.

It is a complete Hugging Face model directory (config, safetensors weights, a byte-level
BPE tokenizer trained here on a fixed corpus, a chat template and a CLIP image processor)
so every tool and test runs with no download. Weights are drawn with a larger spread than
Hugging Face's default so that greedy decoding has clear winners instead of near-ties.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mllm_deploy.core.fsutil import atomic_directory

BUILTIN_VERSION = "1"

# A LLaVA-1.5 style template; the processor and the runtime both render it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{%- else -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ ' ' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_CORPUS = """
What is in the image? Describe the picture in detail. How many objects are there?
The image shows a red square on the left and a blue circle on the right of a green field.
A small yellow triangle sits above a large purple rectangle near the top of the picture.
Is there a cat in this photo? Yes, there is a black cat sitting next to a white dog.
What colour is the car? The car is orange. Where is the person standing? Near the door.
Count the shapes: one, two, three, four, five, six, seven, eight, nine, ten.
Answer the question with a single word or phrase. The answer is no. The answer is yes.
"""


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Geometry of a tiny model; tests make several (MHA/GQA, image sizes, layer counts)."""

    seed: int = 0
    image_size: int = 56
    patch_size: int = 7
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int = 384
    init_std: float = 0.15
    shortest_edge: int | None = None  # resize target; defaults to image_size
    extra: dict = field(default_factory=dict)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on a fixed corpus: deterministic, handles any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in _CORPUS.strip().splitlines()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama tokenizers: BOS is prepended when special tokens are added.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tok


def write_tiny_llava(target: str | Path, config: TinyLlavaConfig | None = None,
                     next_pinpoints: list[list[int]] | None = None) -> Path:
    """Write a complete tiny LLaVA model directory to ``target`` (atomically). ``next_pinpoints``: a LLaVA-NeXT
    (AnyRes) model instead, with these [height, width] buckets (multiples of ``image_size``)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    config = config or TinyLlavaConfig()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(config.vocab_size)
    vocab = tok.get_vocab_size()
    image_token_id = tok.token_to_id("<image>")

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 4,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
        initializer_range=config.init_std,
    )
    text = LlamaConfig(
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        initializer_range=config.init_std,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
        tie_word_embeddings=False,
    )
    if next_pinpoints is None:
        llava = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
        llava.architectures = ["LlavaForConditionalGeneration"]
        model_class = LlavaForConditionalGeneration
    else:
        llava = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                image_grid_pinpoints=[list(p) for p in next_pinpoints])
        llava.architectures = ["LlavaNextForConditionalGeneration"]
        model_class = LlavaNextForConditionalGeneration

    torch.manual_seed(config.seed)
    model = model_class(llava).eval()
    with torch.no_grad():  # HF init draws Normal(0, initializer_range); norms start at 1
        gen = torch.Generator().manual_seed(config.seed)
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2 or name.endswith("class_embedding"):
                param.copy_(torch.randn(param.shape, generator=gen) * config.init_std)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    edge = config.shortest_edge or config.image_size
    if next_pinpoints is not None:  # AnyRes: tiles of image_size, the base view squashed to it
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": config.image_size},
            crop_size={"height": config.image_size, "width": config.image_size},
            image_grid_pinpoints=[list(p) for p in next_pinpoints],
        )
        processor_class = LlavaNextProcessor
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": edge},
            crop_size={"height": config.image_size, "width": config.image_size},
        )
        processor_class = LlavaProcessor
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=config.patch_size,
        vision_feature_select_strategy=llava.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS position of a CLIP tower
    )

    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "mllm_deploy_builtin.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
    return target


SMALL_LLAVA = TinyLlavaConfig(
    # LLaVA-1.5's visual geometry (336 px, patch 14: 576 visual tokens) in front of a ~200M
    # parameter Llama (hidden 1024, 16 layers): big enough that prefill is dominated by matrix
    # products, small enough to benchmark on two CPU cores. The vision tower is kept small.
    seed=0, image_size=336, patch_size=14, vision_hidden=256, vision_layers=2, vision_heads=4,
    text_hidden=1024, text_layers=16, text_heads=16, text_kv_heads=16, text_intermediate=2816, init_std=0.02,
)


def write_small_llava(target: str | Path) -> Path:
    return write_tiny_llava(target, SMALL_LLAVA)
