"""Training batches of shapes-llava (tools/shapes_train.py): conversations and packed segments over
shapes-vqa scenes, with the answer sites and the probe targets the auxiliary losses read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


IGNORE = -100


def prompt_builder(model_dir: Path):
    from tokenizers import Tokenizer

    from mllm_deploy.runtime.prompt import PromptBuilder

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    template = (model_dir / "chat_template.jinja").read_text()
    patches = (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    return PromptBuilder(tokenizer, template, {"bos_token": "<s>", "eos_token": "</s>"}, "<image>",
                         int(config.get("image_token_id", config.get("image_token_index"))), patches)


def _pad(rows: list[list[int]], labels: list[list[int]], pad_id: int):
    """Right-padded input ids, attention mask and labels."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        target[i, :len(label)] = torch.tensor(label)
    return ids, mask, target


def make_batch(examples, builder, image_config, eos_id: int, pad_id: int):
    """input_ids, attention_mask, labels, pixel_values for a list of shapes-vqa examples."""
    import numpy as np
    import torch

    from mllm_deploy.runtime.preprocess import preprocess

    rows, labels = [], []
    for ex in examples:
        prompt = builder.encode(builder.render_chat(ex.question))[0].tolist()
        answer = builder.tokenizer.encode(ex.answer, add_special_tokens=False).ids + [eos_id]
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    ids, mask, target = _pad(rows, labels, pad_id)
    pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, image_config) for ex in examples]))
    return ids, mask, target, pixels


QUERY_SLOTS = ("kind", "colour", "shape", "colour2", "shape2", "row", "column")


def query_sizes():
    from mllm_deploy.scenes import shapes_vqa as sv

    # one extra class per slot for "the question does not name it"
    return (len(sv.QUESTION_TYPES), len(sv.COLOURS) + 1, len(sv.SHAPES) + 1, len(sv.COLOURS) + 1,
            len(sv.SHAPES) + 1, sv.GRID + 1, sv.GRID + 1)


def readout_sizes():
    from mllm_deploy.scenes import shapes_vqa as sv

    # asked-about object: colour, shape, row, column; second object: row, column
    return (len(sv.COLOURS), len(sv.SHAPES), sv.GRID, sv.GRID, sv.GRID, sv.GRID)


def query_targets(question: str, kind: str) -> list[int]:
    """What the question names, read off its words: kind, first and second colour and shape, grid
    row and column (the last class of each slot: not named). Target of the training-only query probe."""
    from mllm_deploy.scenes import shapes_vqa as sv

    words = question.split()
    colours = [list(sv.COLOURS).index(w) for w in words if w in sv.COLOURS]
    shapes = [sv.SHAPES.index(w.rstrip("s")) for w in words if w.rstrip("s") in sv.SHAPES]
    sizes = query_sizes()

    def at(items, i, none):
        return items[i] if len(items) > i else none

    def after(word):
        return sv.ORDINALS.index(words[words.index(word) + 1]) if word in words else sv.GRID

    return [sv.QUESTION_TYPES.index(kind), at(colours, 0, sizes[1] - 1), at(shapes, 0, sizes[2] - 1),
            at(colours, 1, sizes[3] - 1), at(shapes, 1, sizes[4] - 1), after("row"), after("column")]


def readout_targets(refs) -> list[int]:
    """Attributes of the object a question asks about (when it names exactly one) and the grid place
    of the second object named (IGNORE where there is none): target of the readout probe."""
    from mllm_deploy.scenes import shapes_vqa as sv

    first = [o for o, role in refs if role == 1]
    second = [o for o, role in refs if role == 2]
    out = [IGNORE] * len(readout_sizes())
    if len(first) == 1:
        o = first[0]
        out[:4] = [list(sv.COLOURS).index(o.colour), sv.SHAPES.index(o.shape), o.row, o.col]
    if len(second) == 1:
        out[4:] = [second[0].row, second[0].col]
    return out


class AnswerSite(NamedTuple):
    """Where a question's answer is predicted, and the training-only targets there."""

    b: int  # row of the batch
    pos: int  # position whose logits predict the answer
    roles: object  # np.ndarray: per-patch role of the named objects (shapes_vqa.relevance)
    query: list[int]  # query_targets
    readout: list[int]  # readout_targets


def _site(b: int, position: int, scene, turn: int, question: str, kind: str) -> AnswerSite:
    """The answer site of question ``turn`` of a scene, at the position that predicts its answer."""
    refs = scene.refs[turn] if scene.refs else []
    return AnswerSite(b, position, scene.relevance[turn], query_targets(question, kind), readout_targets(refs))


def _append_answer(row, label, weight, answer, w: float, eos_id: int, encode) -> None:
    """Answer words (supervised ones labelled, at weight ``w``) and EOS onto a training row."""
    for word, supervised in answer:
        token = encode(word)
        row += token
        label += token if supervised else [IGNORE] * len(token)
        weight += [w if supervised else 0.0] * len(token)
    row.append(eos_id)
    label.append(eos_id)
    weight.append(w)


def make_conversation_batch(scenes, builder, image_config, eos_id: int, pad_id: int, qa_weight: float = 1.0):
    """Multi-turn rows: the image and its first question as at inference, then more questions
    about the same image, then the caption turn last (so no answer can be read off its text);
    every answer word, caption colour/shape word and EOS is supervised. Also returns one
    ``AnswerSite`` per question, for the training-only attention and probe losses."""
    import numpy as np
    import torch

    from mllm_deploy.scenes.shapes_vqa import CAPTION_PROMPT
    from mllm_deploy.runtime.preprocess import preprocess

    def ids(text: str) -> list[int]:
        return builder.tokenizer.encode(text, add_special_tokens=False).ids

    rows, labels, weights, sites = [], [], [], []
    for b, scene in enumerate(scenes):
        row = builder.encode(builder.render_chat(scene.qas[0][0]))[0].tolist()
        label = [IGNORE] * len(row)
        weight = [0.0] * len(row)
        qas = scene.qas + scene.drill
        turns = [(q, [(a, True)]) for q, a, _kind in qas] + [(CAPTION_PROMPT, scene.caption)]
        for turn, (question, answer) in enumerate(turns):
            if turn:
                follow = ids(f"user : {question} assistant :")
                row += follow
                label += [IGNORE] * len(follow)
                weight += [0.0] * len(follow)
            w = 1.0 if turn == len(turns) - 1 else qa_weight  # the caption turn is last
            if turn < len(qas):
                sites.append(_site(b, len(row) - 1, scene, turn, question, qas[turn][2]))
            _append_answer(row, label, weight, answer, w, eos_id, ids)
        rows.append(row)
        labels.append(label)
        weights.append(weight)
    ids_, mask, target = _pad(rows, labels, pad_id)
    token_weight = torch.zeros(target.shape)
    for i, weight in enumerate(weights):
        token_weight[i, :len(weight)] = torch.tensor(weight)
    pixels = torch.from_numpy(np.concatenate([preprocess(scene.image, image_config) for scene in scenes]))
    return ids_, mask, target, token_weight, pixels, sites


def make_segment_batch(scenes, builder, image_config, eos_id: int, pad_id: int, qa_weight: float = 1.0):
    """Rows that share one image among many independent questions: the image prefix, then one
    segment per question (and the caption turn), each attending only to the prefix and itself and
    numbered from the same position. Every segment computes exactly what the inference prompt of
    its question computes, yet the image is encoded once per row. Returns input ids, a 4-D additive
    attention mask, position ids, labels, loss weights, pixels and one ``AnswerSite`` per question."""
    import numpy as np
    import torch

    from mllm_deploy.scenes.shapes_vqa import CAPTION_PROMPT
    from mllm_deploy.runtime.preprocess import preprocess

    image_id = builder.image_token_id
    rows, labels, weights, positions, segs, sites = [], [], [], [], [], []
    for b, scene in enumerate(scenes):
        qas = scene.qas + scene.drill
        turns = [(q, [(a, True)]) for q, a, _kind in qas] + [(CAPTION_PROMPT, scene.caption)]
        row = label = weight = pos = seg = None
        for turn, (question, answer) in enumerate(turns):
            prompt = builder.encode(builder.render_chat(question))[0].tolist()
            split = max(i for i, t in enumerate(prompt) if t == image_id) + 1
            if row is None:  # the shared prefix: everything up to the last image token
                row, pos, seg = prompt[:split], list(range(split)), [0] * split
                label, weight = [IGNORE] * split, [0.0] * split
            elif prompt[:split] != row[:split]:
                raise ValueError("chat template puts question text before the image; segments need it after")
            part = prompt[split:]
            w = 1.0 if turn == len(turns) - 1 else qa_weight  # the caption turn is last
            start = len(row)
            row += part
            label += [IGNORE] * len(part)
            weight += [0.0] * len(part)
            if turn < len(qas):
                sites.append(_site(b, len(row) - 1, scene, turn, question, qas[turn][2]))
            _append_answer(row, label, weight, answer, w, eos_id,
                           lambda word: builder.tokenizer.encode(word, add_special_tokens=False).ids)
            pos += list(range(split, split + len(row) - start))
            seg += [turn + 1] * (len(row) - start)
        rows.append(row)
        labels.append(label)
        weights.append(weight)
        positions.append(pos)
        segs.append(seg)
    ids, _padding, target = _pad(rows, labels, pad_id)  # the 4-D mask below replaces the padding mask
    width = ids.shape[1]
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    token_weight = torch.zeros(target.shape)
    for i in range(len(rows)):
        position_ids[i, :len(positions[i])] = torch.tensor(positions[i])
        segment[i, :len(segs[i])] = torch.tensor(segs[i])
        token_weight[i, :len(weights[i])] = torch.tensor(weights[i])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    to_prefix = (segment[:, None, :] == 0) & (segment[:, :, None] >= 0)
    allowed = causal[None] & (same | to_prefix)
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself: no empty softmax
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pixels = torch.from_numpy(np.concatenate([preprocess(scene.image, image_config) for scene in scenes]))
    return ids, mask[:, None], position_ids, target, token_weight, pixels, sites
