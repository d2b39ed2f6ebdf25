"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_deploy.core.errors import MllmError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MllmError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MllmError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MllmError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V] float32 for the next position."""
        if self.config.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.config.temperature
        order = np.argsort(-scaled, kind="stable")
        if self.config.top_k:
            order = order[: self.config.top_k]
        kept = scaled[order]
        probs = np.exp(kept - kept.max())
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            cutoff = int(np.searchsorted(np.cumsum(probs), self.config.top_p)) + 1
            order, probs = order[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
