"""Train shapes-llava on shapes-vqa: ``python -m mllm_deploy.tools.shapes_train [--steps N] [--resume]``.

Seeded and resumable: batch b is scenes [b*B, (b+1)*B) of the train split, so a resumed run
sees exactly the data an uninterrupted one would.

Two stages. The first ``--vision-steps`` train only the vision tower and projector, on
training-only per-patch targets read off the scene (what the patch shows, whether an object's
centre is in it, its grid row and column), so the text model sees informative visual tokens
from its first step. Then the whole model trains on multi-turn conversations: the image and
its first question exactly as at inference, a question of every other kind (``--drill N``: N
more rounds of them), and last a "describe the image" turn whose caption names each object's
place and asks for its colour and shape (dense supervision for reading a place off the image;
it comes last so no answer can be copied from its text). Loss is on answer words, caption
colour/shape words and EOS, plus the per-patch loss at a lower weight.

Training-only auxiliary losses that supervise each step of a lookup at the position that
predicts an answer: ``--probe-weight`` (before the look layer the hidden state must say what the
question names; after it, what the named object is and where), ``--look-weight`` (two heads of
the look layer attend to the named objects' visual tokens; scores recomputed for those positions
only, so the model keeps its fused attention) and ``--cell-weight`` (each visual token also tells
the class of the object in its grid cell). Without the first stage and the caption the model stayed at
the image-blind accuracy for 900 steps on two CPU cores.

The defaults are the packaged model's recipe: seed 0, 2000 vision steps then 2500 text steps of 16
scenes, probes and look loss at weight 1, one thread (59 min on one core; a second run gave
bit-identical weights). What took the model past its earlier plateau near 72% was the RoPE base
(``shapes_llava.GEOMETRY``): with 10^6 instead of 10^4 the same recipe reached 90% at 800 text steps
instead of 69%. The longer vision stage (patch shape right 66% of the time after 500 steps alone, 99%
after 2500) speeds the first few hundred text steps.

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

from mllm_deploy.tools.shapes_batches import (  # noqa: F401 - the batch API is re-exported for callers
    IGNORE, AnswerSite, make_batch, make_conversation_batch, make_segment_batch, prompt_builder, query_sizes,
    query_targets, readout_sizes, readout_targets)


def answer_attention_logits(attn, hidden, position_embeddings, sites, heads=(0, 1), mask=None):
    """Pre-softmax scores [N, len(heads), T] of ``attn`` (a Llama attention module, given its input
    ``hidden`` [B, T, D] and rotary tables) from each site's answer-predicting position; keys after
    it (or outside ``mask``) are -inf. Recomputed for the few sites only, so training keeps the fused attention."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b_idx = torch.tensor([s.b for s in sites])
    pos = torch.tensor([s.pos for s in sites])
    batch, length, _ = hidden.shape
    d = attn.head_dim
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # [1, T, d] without position ids
    # queries only at the sites ([N, H, 1, d]); keys everywhere
    q = attn.q_proj(hidden[b_idx, pos]).view(len(sites), -1, 1, d)
    k = attn.k_proj(hidden).view(batch, length, -1, d).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[b_idx, pos][:, None], sin[b_idx, pos][:, None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    groups = attn.num_key_value_groups
    heads = list(heads)
    q_sel = q[:, heads, 0]  # [N, h, d]
    k_sel = k[b_idx][:, [h // groups for h in heads]]  # [N, h, T, d]
    scores = torch.einsum("nhd,nhtd->nht", q_sel, k_sel) * attn.scaling
    if mask is not None:  # [B, 1, T, T] additive: the keys each site's position may see
        hidden_keys = mask[b_idx, 0, pos] < 0
    else:
        hidden_keys = torch.arange(length)[None, :] > pos[:, None]
    return scores.masked_fill(hidden_keys[:, None, :], float("-inf"))


def look_loss(scores, ids, image_token_id: int, sites):
    """Training-only: at the position that predicts each answer, head 0 should put its attention on
    the visual tokens of the object asked about (role 1) and head 1 on the second object named
    (role 2): -log of the attention mass there, averaged. ``scores``: [N, 2, T] pre-softmax."""
    import torch

    roles = torch.zeros(len(sites), scores.shape[-1], dtype=torch.long)
    for i, site in enumerate(sites):
        roles[i, (ids[site.b] == image_token_id).nonzero().squeeze(-1)] = torch.from_numpy(site.roles)
    logp = torch.log_softmax(scores, dim=-1)
    terms = []
    for head, role in ((0, 1), (1, 2)):
        wanted = roles == role
        named = wanted.any(-1)
        if named.any():
            terms.append(-torch.logsumexp(logp[:, head].masked_fill(~wanted, float("-inf")), dim=-1)[named])
    return torch.cat(terms).mean() if terms else torch.zeros(())


class Probes:
    """Training-only linear probes at each answer-predicting position: before the look layer the
    hidden state should say what the question names (``query_targets``), after it what the named
    objects are and where (``readout_targets``) — dense supervision for each step of the lookup."""

    def __init__(self, hidden: int):
        import torch

        self.query_sizes = query_sizes()
        self.query = torch.nn.Linear(hidden, sum(self.query_sizes))
        self.readout_sizes = readout_sizes()
        self.readout = torch.nn.Linear(hidden, sum(self.readout_sizes))

    def parameters(self):
        return list(self.query.parameters()) + list(self.readout.parameters())

    def state_dict(self):
        return {"query": self.query.state_dict(), "readout": self.readout.state_dict()}

    def load_state_dict(self, state):
        self.query.load_state_dict(state["query"])
        self.readout.load_state_dict(state["readout"])

    @staticmethod
    def _slots(logits, targets, sizes):
        import torch.nn.functional as F

        losses, start = [], 0
        for i, size in enumerate(sizes):
            if (targets[:, i] != IGNORE).any():
                losses.append(F.cross_entropy(logits[:, start:start + size], targets[:, i], ignore_index=IGNORE))
            start += size
        return sum(losses) / max(1, len(losses))

    def loss(self, before, after, sites):
        import torch

        b_idx = torch.tensor([s.b for s in sites])
        pos = torch.tensor([s.pos for s in sites])
        query = torch.tensor([s.query for s in sites])
        readout = torch.tensor([s.readout for s in sites])
        return (self._slots(self.query(before[b_idx, pos]), query, self.query_sizes)
                + self._slots(self.readout(after[b_idx, pos]), readout, self.readout_sizes))


class PatchHeads:
    """Training-only heads on the projected visual tokens: what the patch shows (class), whether
    an object's centre is in it, and its grid row and column — so the visual tokens the text model
    reads already say what is where."""

    def __init__(self, hidden: int, patches_per_side: int, grid: int, cell_weight: float = 0.0):
        import torch

        from mllm_deploy.scenes import shapes_vqa

        self.classes = 1 + len(shapes_vqa.COLOURS) * len(shapes_vqa.SHAPES)
        self.cell_weight = cell_weight  # > 0: also the class of the object in the patch's grid cell
        extra = self.classes if cell_weight > 0 else 0
        self.head = torch.nn.Linear(hidden, self.classes + 2 + 2 * grid + extra)
        self.grid = grid
        cell = torch.arange(patches_per_side) * grid // patches_per_side
        self.rows = cell[:, None].expand(patches_per_side, patches_per_side).reshape(-1)
        self.cols = cell[None, :].expand(patches_per_side, patches_per_side).reshape(-1)
        self.class_weight = torch.ones(self.classes)
        self.class_weight[0] = 0.1  # most patches are background
        self.centre_weight = torch.tensor([0.1, 1.0])

    def loss(self, features, scenes):
        import numpy as np
        import torch
        import torch.nn.functional as F

        logits = self.head(features)  # [B, P, C]
        batch = logits.shape[0]
        classes = torch.from_numpy(np.stack([s.patch_classes for s in scenes])).reshape(-1)
        centres = torch.from_numpy(np.stack([s.patch_centres for s in scenes])).reshape(-1)
        c, g = self.classes, self.grid
        flat = logits.reshape(-1, logits.shape[-1])
        loss = (F.cross_entropy(flat[:, :c], classes, weight=self.class_weight)
                + F.cross_entropy(flat[:, c:c + 2], centres, weight=self.centre_weight)
                + F.cross_entropy(flat[:, c + 2:c + 2 + g], self.rows.repeat(batch))
                + F.cross_entropy(flat[:, c + 2 + g:c + 2 + 2 * g], self.cols.repeat(batch)))
        if self.cell_weight > 0:
            cells = torch.from_numpy(np.stack([s.cells for s in scenes])).reshape(-1)
            loss = loss + self.cell_weight * F.cross_entropy(flat[:, c + 2 + 2 * g:], cells, weight=self.class_weight)
        return loss


def answer_accuracy(model, examples, builder, image_config, eos_id: int, pad_id: int, batch: int = 64):
    """Exact match of the greedy first answer token (answers are one word): overall, and per kind."""
    import torch

    correct = 0
    per_kind: dict[str, list[int]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            ids, mask, target, pixels = make_batch(chunk, builder, image_config, eos_id, pad_id)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            for i, ex in enumerate(chunk):
                first = int((target[i] != IGNORE).nonzero()[0])  # position of the answer token
                guess = int(logits[i, first - 1].argmax())
                right = int(builder.tokenizer.id_to_token(guess) == ex.answer)
                correct += right
                per_kind.setdefault(ex.kind, []).append(right)
    model.train()
    return correct / len(examples), {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mllm_deploy.tools.shapes_train", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=16, help="scenes per step (about 6 questions each, more with --drill)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--vision-steps", type=int, default=2000,
                   help="first steps train only the vision tower and projector on the per-patch targets")
    p.add_argument("--qa-weight", type=float, default=1.0,
                   help="weight of a question's answer token against a caption word in the loss")
    p.add_argument("--drill", type=int, default=2,
                   help="extra rounds of questions (one of every kind) per image in a training row")
    p.add_argument("--look-weight", type=float, default=1.0,
                   help="auxiliary loss: the answer position attends to the objects the question names")
    p.add_argument("--look-layer", type=int, default=2, help="text layer whose heads 0 and 1 carry it")
    p.add_argument("--probe-weight", type=float, default=1.0,
                   help="auxiliary probes at each answer position: the question's content before the look "
                        "layer, the named objects' attributes after it")
    p.add_argument("--cell-weight", type=float, default=0.0,
                   help="auxiliary per-patch target: the class of the object in the patch's grid cell")
    p.add_argument("--patch-loss-weight", type=float, default=0.5, help="auxiliary per-patch loss (training only)")
    p.add_argument("--layout", choices=("segments", "conversation"), default="conversation",
                   help="segments: every question sees only the image and itself, as at inference; "
                        "conversation: one multi-turn conversation per image")
    p.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: shapes_llava.GEOMETRY)")
    p.add_argument("--rope-theta", type=float, default=None, help="RoPE base (default: shapes_llava.GEOMETRY)")
    p.add_argument("--eval-size", type=int, default=384)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as the packaged model was trained: another count changes "
                        "the float summation order, so the run is no longer bit-identical)")
    p.add_argument("--out", default=None, help="model directory to write (default: the packaged shapes-llava)")
    p.add_argument("--workdir", default="out/shapes-train", help="checkpoints and the initial model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from transformers import LlavaForConditionalGeneration

    from mllm_deploy.scenes import shapes_vqa
    from mllm_deploy.models.shapes_llava import GEOMETRY, PACKAGED_DIR, write_untrained
    from mllm_deploy.runtime.preprocess import ImagePreprocessConfig, preprocess

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    init_dir = work / "init"
    state_path = work / "state.pt"
    geometry = {k: v for k, v in (("text_layers", args.text_layers), ("rope_theta", args.rope_theta)) if v is not None}
    if not (init_dir / "config.json").is_file():
        write_untrained(init_dir, seed=args.seed, geometry=geometry)
    model = LlavaForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32).train()
    builder = prompt_builder(init_dir)
    image_config = ImagePreprocessConfig.from_model_dir(init_dir)
    eos_id, pad_id = model.config.text_config.eos_token_id, model.config.text_config.pad_token_id
    heads = PatchHeads(model.config.text_config.hidden_size, shapes_vqa.PATCHES_PER_SIDE, shapes_vqa.GRID,
                       args.cell_weight)
    probes = Probes(model.config.text_config.hidden_size)
    captured: dict = {}
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out))
    layers = model.model.language_model.layers
    layers[args.look_layer].self_attn.register_forward_pre_hook(
        lambda _m, _a, kw: captured.update(look_in=kw["hidden_states"], rope=kw["position_embeddings"]),
        with_kwargs=True)
    layers[args.look_layer - 1].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("before", out[0] if isinstance(out, tuple) else out))
    layers[args.look_layer].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("after", out[0] if isinstance(out, tuple) else out))
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.head.parameters()) + probes.parameters(),
                                  lr=args.lr,
                                  weight_decay=0.01, betas=(0.9, 0.98))
    text_steps = args.steps - args.vision_steps

    def lr_at(step: int) -> float:
        if step < args.vision_steps:  # stage 1: constant after a short warm-up
            return args.lr * min(1.0, (step + 1) / 50)
        step -= args.vision_steps
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, text_steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    history, step, elapsed = [], 0, 0.0
    # one entry per invocation: a run continued with other arguments (e.g. a longer --steps) is
    # reproduced by replaying these segments in order
    segments = [{"from_step": 0, "argv": list(argv if argv is not None else sys.argv[1:])}]
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        heads.head.load_state_dict(state["patch_heads"])
        if "probes" in state:
            probes.load_state_dict(state["probes"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        segments = state.get("segments", [{"from_step": 0, "argv": None}]) + [
            {"from_step": step, "argv": list(argv if argv is not None else sys.argv[1:])}]
        print(f"resumed at step {step}", file=sys.stderr)
    val = shapes_vqa.examples("validation", args.eval_size)
    started = time.perf_counter() - elapsed
    running = None
    while step < args.steps:
        scenes = [shapes_vqa.scene("train", i, args.drill) for i in range(step * args.batch, (step + 1) * args.batch)]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if step < args.vision_steps:
            pixels = torch.from_numpy(np.concatenate([preprocess(s.image, image_config) for s in scenes]))
            model.model.get_image_features(pixel_values=pixels)
            answer_loss = look = probe = torch.zeros(())
            patch_loss = heads.loss(captured["features"], scenes)
            loss = patch_loss
        else:
            position_ids = None
            if args.layout == "segments":
                ids, mask, position_ids, target, token_weight, pixels, sites = make_segment_batch(
                    scenes, builder, image_config, eos_id, pad_id, args.qa_weight)
            else:
                ids, mask, target, token_weight, pixels, sites = make_conversation_batch(
                    scenes, builder, image_config, eos_id, pad_id, args.qa_weight)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
                        labels=target if args.qa_weight == 1.0 else None)
            if args.qa_weight == 1.0:  # Hugging Face's own mean loss: runs recorded with it stay reproducible
                answer_loss = out.loss
            else:  # question answers weigh qa_weight times a caption word
                logits = out.logits[:, :-1]
                per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                              target[:, 1:].reshape(-1), ignore_index=IGNORE,
                                                              reduction="none")
                w = token_weight[:, 1:].reshape(-1)
                answer_loss = (per_token * w).sum() / w.sum()
            look = probe = torch.zeros(())
            if args.look_weight > 0:
                looks = [site for site in sites if site.roles.any()]
                scores = answer_attention_logits(layers[args.look_layer].self_attn, captured["look_in"],
                                                 captured["rope"], looks,
                                                 mask=mask if args.layout == "segments" else None)
                look = look_loss(scores, ids, model.config.image_token_id, looks)
            if args.probe_weight > 0:
                probe = probes.loss(captured["before"], captured["after"], sites)
            # auxiliary, training only: the projected visual tokens must tell what their patch shows
            # and where it is (without it the answer loss alone left the visual tokens
            # uninformative: the model sat at the question-prior accuracy)
            patch_loss = heads.loss(captured["features"], scenes)
            loss = (answer_loss + args.patch_loss_weight * patch_loss + args.look_weight * look
                    + args.probe_weight * probe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step > args.vision_steps:
            running = float(answer_loss) if running is None else 0.95 * running + 0.05 * float(answer_loss)
        if step % 25 == 0:
            print(f"step {step} answer loss {running or 0:.4f} patch loss {float(patch_loss):.4f}"
                  f" look loss {float(look):.4f} probe loss {float(probe):.4f} lr {lr_at(step):.2e}"
                  f" {time.perf_counter() - started:.0f}s",
                  file=sys.stderr, flush=True)
        if step > args.vision_steps and (step % args.eval_every == 0 or step == args.steps):
            acc, per_kind = answer_accuracy(model, val, builder, image_config, eos_id, pad_id)
            history.append({"step": step, "loss": round(running, 5), "val_accuracy": acc, "per_kind": per_kind,
                            "seconds": round(time.perf_counter() - started, 1)})
            print(f"eval step {step}: validation accuracy {acc:.3f} {per_kind}", file=sys.stderr, flush=True)
            torch.save({"model": model.state_dict(), "patch_heads": heads.head.state_dict(),
                        "probes": probes.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step,
                        "history": history, "elapsed": time.perf_counter() - started, "segments": segments,
                        "torch_rng": torch.get_rng_state()}, state_path)

    out = Path(args.out) if args.out else PACKAGED_DIR
    model.eval()
    write_untrained(out, seed=args.seed, geometry=geometry)  # tokenizer, processor, template, config
    model.save_pretrained(out)
    log = {"model": "shapes-llava", "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "warmup": args.warmup, "vision_steps": args.vision_steps, "qa_weight": args.qa_weight, "drill": args.drill, "layout": args.layout,
           "geometry": {**GEOMETRY, **geometry}, "look_weight": args.look_weight, "look_layer": args.look_layer,
           "probe_weight": args.probe_weight, "cell_weight": args.cell_weight, "patch_loss_weight": args.patch_loss_weight, "train_scenes_seen": args.steps * args.batch,
           "final_validation_accuracy": history[-1]["val_accuracy"] if history else None,
           "validation_examples": args.eval_size, "wall_seconds": round(time.perf_counter() - started, 1),
           "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "torch": torch.__version__, "segments": segments, "history": history}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {out}: validation accuracy {log['final_validation_accuracy']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
