"""One place that decides whether two runs agree (Polygraphy's comparator is the model).

A :class:`Tolerance` per output name (with a default), a chosen error statistic, and a
result that says which output failed and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0

    def limit(self, reference: np.ndarray) -> float:
        """Allowed max abs error: atol + rtol * the reference's largest magnitude."""
        return self.atol + self.rtol * float(np.max(np.abs(reference))) if reference.size else self.atol


# fp32 graphs must match the PyTorch model to 1e-4 in logits (issue 2); fp16 graphs are
# compared against the same fp32 PyTorch model, so their limit scales with the logit range.
DEFAULT_TOLERANCES = {
    "float32": Tolerance(atol=1e-4),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
}


@dataclass
class OutputComparison:
    name: str
    max_abs_error: float
    limit: float
    shape_ok: bool = True

    @property
    def ok(self) -> bool:
        return self.shape_ok and np.isfinite(self.max_abs_error) and self.max_abs_error <= self.limit


@dataclass
class Comparison:
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def worst(self) -> OutputComparison | None:
        failing = [o for o in self.outputs if not o.ok]
        pool = failing or self.outputs
        return max(pool, key=lambda o: o.max_abs_error / max(o.limit, 1e-30)) if pool else None

    def summary(self) -> str:
        worst = self.worst()
        if worst is None:
            return "nothing compared"
        verdict = "agree" if self.ok else "DISAGREE"
        return (f"{verdict}: {len(self.outputs)} outputs, worst {worst.name} max abs error "
                f"{worst.max_abs_error:.3g} (limit {worst.limit:.3g})")


def compare_outputs(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    tolerance: Tolerance,
    per_output: dict[str, Tolerance] | None = None,
) -> Comparison:
    result = Comparison()
    for name, ref in reference.items():
        tol = (per_output or {}).get(name, tolerance)
        out = candidate.get(name)
        if out is None or np.shape(out) != np.shape(ref):
            result.outputs.append(OutputComparison(name, float("inf"), tol.limit(np.asarray(ref)), shape_ok=False))
            continue
        ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        err = float(np.max(np.abs(ref64 - out64))) if ref64.size else 0.0
        if not np.all(np.isfinite(out64)):
            err = float("inf")
        result.outputs.append(OutputComparison(name, err, tol.limit(ref64)))
    return result


# ---- token selections ------------------------------------------------------------------------------------
@dataclass
class SelectionComparison:
    """How two backends' selections at one routing layer relate: "equal", "tie" (they kept different tokens,
    but every token only one kept scores within the tolerance of the boundary), or "mismatch"."""
    layer: int
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "mismatch"


def compare_selection(layer: int, kept_reference: np.ndarray, kept_candidate: np.ndarray,
                      scores_reference: np.ndarray, scores_candidate: np.ndarray,
                      tolerance: Tolerance) -> SelectionComparison:
    """Two backends may break a near-tie at the k-th place differently (summation order, FP16 tactics).

    That is a tie, not a failure, when both backends' scores agree within ``tolerance`` and every token kept
    by only one of them scores within ``tolerance`` of the k-th best score. Anything else is a mismatch.
    """
    ref_kept, cand_kept = np.asarray(kept_reference).ravel(), np.asarray(kept_candidate).ravel()
    ref_scores = np.asarray(scores_reference, np.float64).ravel()
    cand_scores = np.asarray(scores_candidate, np.float64).ravel()
    if ref_scores.shape != cand_scores.shape or ref_kept.shape != cand_kept.shape:
        return SelectionComparison(layer, "mismatch", f"layer {layer}: shapes differ ({ref_kept.shape[0]} vs "
                                   f"{cand_kept.shape[0]} kept of {ref_scores.shape[0]} vs {cand_scores.shape[0]})")
    limit = tolerance.limit(ref_scores)
    score_error = float(np.max(np.abs(ref_scores - cand_scores))) if ref_scores.size else 0.0
    if not np.isfinite(score_error) or score_error > limit:
        return SelectionComparison(layer, "mismatch", f"layer {layer}: ranking scores differ by {score_error:.3g} "
                                   f"(limit {limit:.3g})")
    if np.array_equal(ref_kept, cand_kept):
        return SelectionComparison(layer, "equal", f"layer {layer}: same {ref_kept.size} tokens")
    swapped = np.setxor1d(ref_kept, cand_kept)
    if swapped.size == 0 or np.any((swapped < 0) | (swapped >= ref_scores.size)):
        return SelectionComparison(layer, "mismatch", f"layer {layer}: kept indices differ in order or range")
    boundary = float(np.sort(ref_scores)[::-1][ref_kept.size - 1])  # the k-th best score
    distance = float(np.max(np.abs(ref_scores[swapped] - boundary)))
    if distance <= limit:
        return SelectionComparison(layer, "tie", f"tie at layer {layer}: {swapped.size // 2} token(s) swapped at the "
                                   f"k-th place, scores within {distance:.3g} of the boundary (limit {limit:.3g})")
    return SelectionComparison(layer, "mismatch", f"layer {layer}: {swapped.size // 2} kept token(s) differ, "
                               f"{distance:.3g} from the boundary score (limit {limit:.3g})")


# ---- quantized weights ----------------------------------------------------------------------------------------
# A weight-only quantized bundle is judged twice:
# - correctness, against the PyTorch model whose weights were replaced by their quantize-dequantize round trip
#   (export/quantize.fake_quantize_model), float32 with the float tolerance: export verification runs ONNX Runtime's
#   MatMulNBits with float activations (--quant-activations float), the quantized model's exact arithmetic, so a
#   wrong scale layout, a swapped nibble order or a corrupted scale shows as an error far above the limit.
#   Float16 bundles are compared with the float32 PyTorch model, and a random-weight model amplifies float16
#   rounding on top of int4's (gqa56 test model: 0.26 on logits of magnitude ~4): their limit is wider.
# - quality, against the float model: whether the first generated token is the same, and the KL divergence of its
#   distribution. Reported, not judged: a random-weight test model loses its argmax to int4 rounding while a
#   trained one does not, and eval-mllm measures what quantization (with the default int8 activations) costs.
QUANT_TOLERANCES = {"float32": DEFAULT_TOLERANCES["float32"], "float16": Tolerance(atol=1e-2, rtol=0.1)}


@dataclass
class QuantComparison:
    bits: int
    exact: Comparison  # against the fake-quantized PyTorch model
    first_token_same: bool
    first_token_kl: float  # nats, against the float model

    @property
    def ok(self) -> bool:
        return self.exact.ok

    def summary(self) -> str:
        worst = self.exact.worst()
        verdict = "agree" if self.ok else "DISAGREE"
        detail = (f"worst {worst.name} max abs error {worst.max_abs_error:.3g} (limit {worst.limit:.3g})"
                  if worst else "nothing compared")
        return (f"{verdict} with the int{self.bits}-rounded model: {len(self.exact.outputs)} outputs, {detail};"
                f" against the float model the first token is {'the same' if self.first_token_same else 'DIFFERENT'},"
                f" KL {self.first_token_kl:.3g} nats")


def kl_divergence(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """KL(softmax(reference) || softmax(candidate)) in nats, over the last axis (mean over leading rows)."""
    ref = np.asarray(reference_logits, np.float64)
    out = np.asarray(candidate_logits, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = out - out.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def compare_quantized(rounded: dict[str, np.ndarray], float_reference: dict[str, np.ndarray],
                      candidate: dict[str, np.ndarray], bits: int, dtype: str,
                      per_output: dict[str, Tolerance] | None = None) -> QuantComparison:
    """``candidate`` (the bundle, of float type ``dtype``) against ``rounded`` (the fake-quantized model's outputs)
    with QUANT_TOLERANCES[dtype], and its first token (prefill.logits) against the float model's."""
    exact = compare_outputs(rounded, candidate, QUANT_TOLERANCES[dtype], per_output)
    ref, out = float_reference["prefill.logits"], candidate.get("prefill.logits")
    if out is None or np.shape(out) != np.shape(ref):
        return QuantComparison(bits, exact, False, float("inf"))
    return QuantComparison(bits, exact, bool(np.array_equal(np.argmax(ref, -1), np.argmax(out, -1))),
                           kl_divergence(ref, out))
