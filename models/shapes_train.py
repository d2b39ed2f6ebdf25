"""Train shapes-llava on shapes-vqa: ``python -m mllm_deploy.models.shapes_train [--steps N] [--resume]``.

Seeded and resumable: batch b is scenes [b*B, (b+1)*B) of the train split, so a resumed run
sees exactly the data an uninterrupted one would. Each scene is one multi-turn conversation
(its first question exactly as at inference, then one question of every other kind), so the
image is encoded once for ~6 supervised answers. Loss is on the answer words and EOS only.
The result is a Hugging Face model directory (safetensors, tokenizer, processor, chat template)
plus ``training_log.json``; by default it is written to the packaged location used by
``--model shapes-llava``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

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


def make_conversation_batch(scenes, builder, image_config, eos_id: int, pad_id: int):
    """Multi-turn rows: the image and its first question as at inference, then more questions
    about the same image; every answer word and EOS is supervised."""
    import numpy as np
    import torch

    from mllm_deploy.runtime.preprocess import preprocess

    rows, labels = [], []
    for _image, qas, _labels in scenes:
        row = builder.encode(builder.render_chat(qas[0][0]))[0].tolist()
        label = [IGNORE] * len(row)
        for turn, (question, answer, _kind) in enumerate(qas):
            if turn:
                follow = builder.tokenizer.encode(f"user : {question} assistant :", add_special_tokens=False).ids
                row += follow
                label += [IGNORE] * len(follow)
            target = builder.tokenizer.encode(answer, add_special_tokens=False).ids + [eos_id]
            row += target
            label += target
        rows.append(row)
        labels.append(label)
    ids, mask, target = _pad(rows, labels, pad_id)
    pixels = torch.from_numpy(np.concatenate([preprocess(image, image_config) for image, _, _ in scenes]))
    patch_targets = torch.from_numpy(np.stack([labels for _, _, labels in scenes]))
    return ids, mask, target, pixels, patch_targets


def answer_accuracy(model, examples, builder, image_config, eos_id: int, pad_id: int, batch: int = 64) -> float:
    """Exact match of the greedy first answer token (answers are one word)."""
    import torch

    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            ids, mask, target, pixels = make_batch(chunk, builder, image_config, eos_id, pad_id)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            for i, ex in enumerate(chunk):
                first = int((target[i] != IGNORE).nonzero()[0])  # position of the answer token
                guess = int(logits[i, first - 1].argmax())
                correct += int(builder.tokenizer.id_to_token(guess) == ex.answer)
    model.train()
    return correct / len(examples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mllm_deploy.models.shapes_train", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=24, help="scenes per step (about 6 questions each)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--patch-loss-weight", type=float, default=0.5, help="auxiliary per-patch class loss (training only)")
    p.add_argument("--eval-size", type=int, default=384)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="model directory to write (default: the packaged shapes-llava)")
    p.add_argument("--workdir", default="out/shapes-train", help="checkpoints and the initial model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    args = p.parse_args(argv)

    import torch
    from transformers import LlavaForConditionalGeneration

    from mllm_deploy.datasets import shapes_vqa
    from mllm_deploy.models.shapes_llava import PACKAGED_DIR, write_untrained
    from mllm_deploy.runtime.preprocess import ImagePreprocessConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    init_dir = work / "init"
    state_path = work / "state.pt"
    if not (init_dir / "config.json").is_file():
        write_untrained(init_dir, seed=args.seed)
    model = LlavaForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32).train()
    builder = prompt_builder(init_dir)
    image_config = ImagePreprocessConfig.from_model_dir(init_dir)
    eos_id, pad_id = model.config.text_config.eos_token_id, model.config.text_config.pad_token_id
    patch_classes = 1 + len(shapes_vqa.COLOURS) * len(shapes_vqa.SHAPES)
    patch_head = torch.nn.Linear(model.config.text_config.hidden_size, patch_classes)
    class_weight = torch.ones(patch_classes)
    class_weight[0] = 0.1  # most patches are background
    captured: dict = {}
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out))
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(patch_head.parameters()), lr=args.lr,
                                  weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    history, step, elapsed = [], 0, 0.0
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        patch_head.load_state_dict(state["patch_head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        print(f"resumed at step {step}", file=sys.stderr)
    val = shapes_vqa.examples("validation", args.eval_size)
    started = time.perf_counter() - elapsed
    running = None
    while step < args.steps:
        scenes = [shapes_vqa.scene_questions("train", i) for i in range(step * args.batch, (step + 1) * args.batch)]
        ids, mask, target, pixels, patch_targets = make_conversation_batch(scenes, builder, image_config, eos_id, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        answer_loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=target).loss
        # auxiliary, training only: the projected visual tokens must tell what their patch shows
        # (without it the answer loss alone left the visual tokens uninformative: the model sat at
        # the question-prior accuracy and its loss did not change when images were shuffled)
        patch_logits = patch_head(captured["features"]).reshape(-1, patch_classes)
        patch_loss = torch.nn.functional.cross_entropy(patch_logits, patch_targets.reshape(-1), weight=class_weight)
        loss = answer_loss + args.patch_loss_weight * patch_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        running = float(answer_loss) if running is None else 0.95 * running + 0.05 * float(answer_loss)
        if step % 25 == 0:
            print(f"step {step} answer loss {running:.4f} patch loss {float(patch_loss):.4f} lr {lr_at(step):.2e}"
                  f" {time.perf_counter() - started:.0f}s",
                  file=sys.stderr, flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = answer_accuracy(model, val, builder, image_config, eos_id, pad_id)
            history.append({"step": step, "loss": round(running, 5), "val_accuracy": acc,
                            "seconds": round(time.perf_counter() - started, 1)})
            print(f"eval step {step}: validation accuracy {acc:.3f}", file=sys.stderr, flush=True)
            torch.save({"model": model.state_dict(), "patch_head": patch_head.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step,
                        "history": history, "elapsed": time.perf_counter() - started,
                        "torch_rng": torch.get_rng_state()}, state_path)

    out = Path(args.out) if args.out else PACKAGED_DIR
    model.eval()
    write_untrained(out, seed=args.seed)  # tokenizer, processor, template, config
    model.save_pretrained(out)
    log = {"model": "shapes-llava", "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "warmup": args.warmup, "patch_loss_weight": args.patch_loss_weight, "train_scenes_seen": args.steps * args.batch,
           "final_validation_accuracy": history[-1]["val_accuracy"] if history else None,
           "validation_examples": args.eval_size, "wall_seconds": round(time.perf_counter() - started, 1),
           "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "torch": torch.__version__, "history": history}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {out}: validation accuracy {log['final_validation_accuracy']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
