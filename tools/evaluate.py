"""eval-mllm's work: exact-match accuracy of bundles on a VQA set, against the dense bundle.

Per bundle: accuracy with a 95% Wilson interval, agreement with the dense bundle's answers,
the mean KL(p_bundle || p_dense) of the first generated token, the prefill FLOPs reduction of
its recipe (exact formula, at the evaluated prompts' mean length) and the median prefill time.
"""

from __future__ import annotations

import math
import statistics
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mllm_deploy.core.errors import MllmError

DEFAULT_SHAPES_COUNT = 500


@dataclass
class EvalItem:
    image: object  # PIL image or path
    question: str
    answer: str
    source: str
    kind: str | None = None  # question kind (shapes-vqa), for the per-kind breakdown


@dataclass
class BundleResult:
    bundle: str
    method: str
    visual_tokens: list[int]
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    agreement: float
    mean_kl: float
    flops_reduction: float
    prefill_ms_median: float
    reference: str
    kv_bytes: int = 0  # KV cache after prefill at the mean prompt, the bundle's float type (0 for layers without)
    per_kind: dict[str, float] = field(default_factory=dict)  # accuracy per question kind, where items have one
    answers: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("answers")
        return out


def load_eval_data(spec: str) -> list[EvalItem]:
    """``shapes-vqa[:split][:N]`` (default split test, N 500) or a JSONL of image/question/answer."""
    if spec.split(":")[0] == "shapes-vqa":
        from mllm_deploy.scenes import shapes_vqa

        parts = spec.split(":")[1:]
        split, count = "test", DEFAULT_SHAPES_COUNT
        for part in parts:
            if part.isdigit():
                count = int(part)
            elif part in shapes_vqa.SPLIT_SEEDS:
                split = part
            else:
                raise MllmError(f"--dataset {spec}: '{part}' is neither a split ({', '.join(shapes_vqa.SPLIT_SEEDS)})"
                                " nor a count")
        if count < 1:
            raise MllmError(f"--dataset {spec}: the count must be at least 1")
        return [EvalItem(e.image, e.question, e.answer, f"{split}:{e.index}", e.kind)
                for e in shapes_vqa.examples(split, count)]
    path = Path(spec)
    if not path.is_file():
        raise MllmError(f"evaluation data not found: {spec} (use shapes-vqa[:split][:N] or a JSONL file)")
    from mllm_deploy.core.jsonio import parse_json

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MllmError(f"cannot read {path} as UTF-8 text: {exc}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        entry = parse_json(line, MllmError, f"{path.name} line {number}")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry.get(k).strip()
                                                  for k in ("image", "question", "answer")):
            raise MllmError(f"{path.name} line {number}: needs non-empty string fields image, question, answer")
        image = path.parent / entry["image"]
        if not image.is_file():
            raise MllmError(f"{path.name} line {number}: image not found: {image}")
        items.append(EvalItem(image, entry["question"], entry["answer"], f"{path.name}:{number}"))
    if not items:
        raise MllmError(f"{path} holds no examples")
    return items


def normalise(text: str) -> str:
    """Lower case, no surrounding punctuation or whitespace, single spaces."""
    return " ".join(text.lower().strip().strip(string.punctuation + " ").split())


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - np.logaddexp.reduce(x)


def _flops_reduction(manifest: dict, prompt_tokens: float, image_start: float):
    """The exact FLOPs report of the bundle's recipe at this prompt (its reduction, its KV bytes per layer)."""
    from mllm_deploy.formats.flops import prefill_cost
    from mllm_deploy.formats.recipe import Recipe
    from mllm_deploy.formats.geometry import spec_from_manifest

    spec = spec_from_manifest(manifest["model"])
    recipe = Recipe.from_dict(manifest["recipe"])
    text = max(int(round(prompt_tokens)) - spec.visual_tokens, 0)
    prefix = min(int(round(image_start)), text)
    return prefill_cost(spec, recipe, text_tokens=text, formula="exact", prefix_tokens=prefix,
                        kv_dtype_bytes=2 if manifest["dtype"] == "float16" else 4)


def _run(pipe, items, max_new_tokens: int, label: str):
    from mllm_deploy.core.progress import Progress

    answers, logprobs, prefill_ms, lengths, starts = [], [], [], [], []
    with Progress(len(items), label, "q") as bar:
        for item in items:
            pixels = pipe.pixel_values(item.image)
            ids = pipe.input_ids(prompt=item.question, pixels=pixels)  # a LLaVA-NeXT image sets its own count
            generation = pipe.generator.generate(ids, pixels, max_new_tokens)
            answers.append(pipe.prompt.decode(generation.tokens))
            logprobs.append(_log_softmax(generation.first_logits))
            prefill_ms.append(generation.timings.prefill_ms)
            lengths.append(ids.shape[1])
            starts.append(pipe.generator.image_start(ids))
            bar.update()
    return answers, logprobs, prefill_ms, float(np.mean(lengths)), float(np.mean(starts))


def evaluate(bundles: list[str], items: list[EvalItem], max_new_tokens: int = 4,
             backend: str = "onnxruntime", options: dict | None = None) -> list[BundleResult]:
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.pipeline import Pipeline

    loaded = [load_bundle(b) for b in bundles]
    methods = [b.manifest["recipe"]["method"]["name"] for b in loaded]
    ref_index = methods.index("dense") if "dense" in methods else 0
    order = [ref_index] + [i for i in range(len(loaded)) if i != ref_index]
    runs = {}
    for i in order:
        with Pipeline(loaded[i], backend, **(options or {})) as pipe:
            runs[i] = _run(pipe, items, max_new_tokens, f"eval {Path(bundles[i]).name}")
    ref_answers, ref_logprobs = runs[ref_index][0], runs[ref_index][1]
    results = []
    for i, bundle in enumerate(loaded):
        answers, logprobs, prefill_ms, mean_len, mean_start = runs[i]
        right = [normalise(a) == normalise(item.answer) for a, item in zip(answers, items)]
        correct = sum(right)
        by_kind: dict[str, list[bool]] = {}
        for ok, item in zip(right, items):
            if item.kind is not None:
                by_kind.setdefault(item.kind, []).append(ok)
        low, high = wilson_interval(correct, len(items))
        agree = sum(normalise(a) == normalise(r) for a, r in zip(answers, ref_answers)) / len(items)
        kl = float(np.mean([np.sum(np.exp(p) * (p - q)) for p, q in zip(logprobs, ref_logprobs)]))
        flops = _flops_reduction(bundle.manifest, mean_len, mean_start)
        results.append(BundleResult(
            bundle=str(bundles[i]), method=methods[i], visual_tokens=bundle.visual_tokens_per_layer, n=len(items),
            accuracy=correct / len(items), ci_low=low, ci_high=high, agreement=agree, mean_kl=max(kl, 0.0),
            flops_reduction=flops.reduction, kv_bytes=sum(flops.kv_bytes_per_layer),
            prefill_ms_median=statistics.median(prefill_ms), reference=str(bundles[ref_index]),
            per_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())}, answers=answers,
        ))
    return results
