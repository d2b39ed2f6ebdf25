"""The layer arithmetic both PyTorch references share (calib/reference.py for pruning recipes,
calib/mod_reference.py for mixture-of-depths): the Hugging Face LLaVA's language model driven one
layer at a time over any subset of the tokens, by their original position ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillState:
    cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [1, Hkv, T_l, Dh]
    kept: list[torch.Tensor] = field(default_factory=list)  # per layer: original indices of its tokens
    prompt_len: int = 0


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def select_rows(x: torch.Tensor, positions: torch.Tensor, vis_start: int, n_vis: int, keep_vis: torch.Tensor):
    """Every text row and the kept visual rows (``keep_vis``: indices among the ``n_vis`` visual rows, ascending)."""
    rows = torch.cat([torch.arange(vis_start), vis_start + keep_vis, torch.arange(vis_start + n_vis, x.shape[1])])
    return x[:, rows], positions[rows]


class TextStack:
    """A LlavaForConditionalGeneration's vision tower and language model, as pieces: image features,
    embeddings, one layer's projections and attention, the LM head."""

    def __init__(self, model):
        self.model = model
        self.text = model.model.language_model
        cfg = self.text.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.image_token_id = model.config.image_token_id

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)).pooler_output
        return torch.stack(list(feats))  # [1, N, d]

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Token embeddings with the image features in the image tokens' rows, and where they start."""
        where = (input_ids[0] == self.image_token_id).nonzero().flatten()
        start = int(where[0])
        x = self.text.embed_tokens(input_ids).clone()
        x[:, start:start + features.shape[1]] = features.to(x.dtype)
        return x, start

    def project(self, layer, h: torch.Tensor, positions: torch.Tensor):
        """Post-RoPE q [1, H, T, Dh], k and v [1, Hkv, T, Dh] of ``layer`` for the normed hidden states ``h``."""
        attn = layer.self_attn
        t = h.shape[1]
        q = attn.q_proj(h).view(1, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.text.rotary_emb(h, positions[None])
        cos, sin = cos[:, None], sin[:, None]
        return rope(q, cos, sin), rope(k, cos, sin), v

    def repeat(self, x: torch.Tensor) -> torch.Tensor:
        """KV heads repeated to the query heads (GQA)."""
        return x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def attend(self, q, k, v, q_pos, k_pos) -> torch.Tensor:
        """Causal attention by original positions; returns [1, Tq, H*Dh]."""
        scores = q @ self.repeat(k).transpose(-1, -2) * self.head_dim**-0.5
        future = k_pos[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        ctx = probs @ self.repeat(v)
        return ctx.transpose(1, 2).reshape(1, q.shape[2], -1)

    def last_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the last row of the final hidden states: [1, V] float32."""
        return self.model.lm_head(self.text.norm(x[:, -1:]))[:, 0].float()
