"""Write a LLaVA-1.5-7B-geometry checkpoint with random float16 weights in the llava-hf layout.

    python benchmarks/llava7b_checkpoint.py OUT_DIR [--shards 3] [--seed 0]

What a user downloads from llava-hf/llava-1.5-7b-hf, without the download: the verbatim partial
``config.json`` (tests/data/configs/llava-hf--llava-1.5-7b-hf.json), ``model-0000k-of-0000n.safetensors``
shards with ``model.safetensors.index.json`` and llava-hf's key names (``language_model.model.layers.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.lm_head.weight``), a
tokenizer with the 32,064-entry vocabulary (``<image>`` = 32000, ``<pad>`` = 32001; a word-level stand-in
for the SentencePiece one), LLaVA-1.5's chat template, CLIP's 336 px image processor and a generation
config. Weights are drawn tensor by tensor and written straight into their shard: the script never
holds more than one tensor (the 262 MB embedding table is the largest), so it runs on any machine with
~15 GB of free disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "data" / "configs" / "llava-hf--llava-1.5-7b-hf.json"
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: "
                 "{% endif %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
                 "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
                 "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tensors(hidden=4096, intermediate=11008, layers=32, vocab=32064, vision_hidden=1024, vision_layers=24,
            vision_intermediate=4096, image=336, patch=14) -> list[tuple[str, tuple[int, ...]]]:
    """(llava-hf key, shape) of every tensor, in the order the shards hold them."""
    out: list[tuple[str, tuple[int, ...]]] = [("language_model.model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)), (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    out += [("language_model.model.norm.weight", (hidden,)), ("language_model.lm_head.weight", (vocab, hidden))]
    v = "vision_tower.vision_model."
    patches = (image // patch) ** 2 + 1
    out += [(v + "embeddings.class_embedding", (vision_hidden,)),
            (v + "embeddings.patch_embedding.weight", (vision_hidden, 3, patch, patch)),
            (v + "embeddings.position_embedding.weight", (patches, vision_hidden)),
            (v + "pre_layrnorm.weight", (vision_hidden,)), (v + "pre_layrnorm.bias", (vision_hidden,))]
    for i in range(vision_layers):
        p = f"{v}encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            out += [(p + f"self_attn.{n}_proj.weight", (vision_hidden, vision_hidden)),
                    (p + f"self_attn.{n}_proj.bias", (vision_hidden,))]
        out += [(p + "mlp.fc1.weight", (vision_intermediate, vision_hidden)), (p + "mlp.fc1.bias", (vision_intermediate,)),
                (p + "mlp.fc2.weight", (vision_hidden, vision_intermediate)), (p + "mlp.fc2.bias", (vision_hidden,))]
        out += [(p + f"layer_norm{k}.{w}", (vision_hidden,)) for k in (1, 2) for w in ("weight", "bias")]
    out += [(v + "post_layernorm.weight", (vision_hidden,)), (v + "post_layernorm.bias", (vision_hidden,))]
    out += [("multi_modal_projector.linear_1.weight", (hidden, vision_hidden)),
            ("multi_modal_projector.linear_1.bias", (hidden,)),
            ("multi_modal_projector.linear_2.weight", (hidden, hidden)), ("multi_modal_projector.linear_2.bias", (hidden,))]
    return out


def draw(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random float16 values of a sensible scale: norms near 1, biases small, matrices ~N(0, 0.02)."""
    if "norm" in key and key.endswith("weight"):
        return (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    scale = 0.002 if key.endswith("bias") else 0.02
    return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)


def write_shards(out: Path, shards: int, seed: int) -> int:
    """The safetensors shards and their index, one tensor in memory at a time; returns the bytes written."""
    entries = tensors()
    sizes = [int(np.prod(shape)) * 2 for _, shape in entries]
    target = sum(sizes) / shards
    groups: list[list[int]] = [[]]
    filled = 0
    for index, size in enumerate(sizes):
        if filled >= target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(index)
        filled += size
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for index in group:
            key, shape = entries[index]
            header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + sizes[index]]}
            offset += sizes[index]
            weight_map[key] = name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((-len(text)) % 8)  # the data section starts 8-byte aligned
        with open(out / name, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little"))
            handle.write(text)
            for index in group:
                key, shape = entries[index]
                handle.write(draw(key, shape, rng).data)
        total += offset
        print(f"  {name}: {offset / 2**30:.2f} GiB", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, GenerationConfig, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
    vocab.update({f"w{i}": i for i in range(3, 32064) if i not in (32000, 32001)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=32001).save_pretrained(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shards", type=int, default=3, help="llava-hf's 7B has 3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    shutil.copyfile(CONFIG, args.out / "config.json")  # verbatim: the partial text_config users have
    write_tokenizer(args.out)
    total = write_shards(args.out, args.shards, args.seed)
    print(f"{args.out}: {total / 2**30:.2f} GiB of float16 weights in {args.shards} shards", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
