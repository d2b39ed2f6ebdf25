"""Weights of a loaded Hugging Face LLaVA model under our own canonical names.

Linear weights are stored transposed ([in, out]) so the graph multiplies ``x @ W``;
Q/K/V and gate/up projections are fused into one matrix each (one GEMM instead of three).
Modules are reached through attributes rather than state-dict keys, whose spelling has
changed between transformers releases.
"""

from __future__ import annotations

import numpy as np


def _np(tensor, dtype) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy().astype(dtype)


def _linear(prefix: str, modules, dtype, out: dict[str, np.ndarray]) -> None:
    """Fuse the given nn.Linear modules along the output dimension."""
    out[f"{prefix}.weight"] = np.concatenate([_np(m.weight, dtype).T for m in modules], axis=1)
    if modules[0].bias is not None:
        out[f"{prefix}.bias"] = np.concatenate([_np(m.bias, dtype) for m in modules])


def llava_modules(model):
    """(vision transformer, projector, text decoder, lm_head) of a LlavaForConditionalGeneration."""
    core = model.model
    vision = core.vision_tower
    vision = getattr(vision, "vision_model", vision)
    return vision, core.multi_modal_projector, core.language_model, model.lm_head


def linear_groups(model, num_vision_layers: int) -> list[tuple[str, list]]:
    """(canonical prefix, the nn.Linear modules fused under it) of every linear layer the graphs use, in export
    order: the vision tower's first ``num_vision_layers`` layers, the projector, every decoder layer, the LM head."""
    vision, projector, text, lm_head = llava_modules(model)
    groups: list[tuple[str, list]] = []
    for i, layer in enumerate(vision.encoder.layers[:num_vision_layers]):
        p, att = f"vision.layers.{i}", layer.self_attn
        groups += [(f"{p}.attn.qkv", [att.q_proj, att.k_proj, att.v_proj]), (f"{p}.attn.o", [att.out_proj]),
                   (f"{p}.mlp.fc1", [layer.mlp.fc1]), (f"{p}.mlp.fc2", [layer.mlp.fc2])]
    groups += [("projector.linear_1", [projector.linear_1]), ("projector.linear_2", [projector.linear_2])]
    for i, layer in enumerate(text.layers):
        p, att, mlp = f"text.layers.{i}", layer.self_attn, layer.mlp
        groups += [(f"{p}.attn.qkv", [att.q_proj, att.k_proj, att.v_proj]), (f"{p}.attn.o", [att.o_proj]),
                   (f"{p}.mlp.gate", [mlp.gate_proj]), (f"{p}.mlp.up", [mlp.up_proj]),  # two products, no Split
                   (f"{p}.mlp.down", [mlp.down_proj])]
    return groups + [("lm_head", [lm_head])]


def collect_weights(model, dtype: np.dtype, num_vision_layers: int) -> dict[str, np.ndarray]:
    """Canonical-name -> array for every weight the three graphs use."""
    vision, projector, text, lm_head = llava_modules(model)
    w: dict[str, np.ndarray] = {}
    emb = vision.embeddings
    w["vision.patch_embedding.weight"] = _np(emb.patch_embedding.weight, dtype)
    w["vision.class_embedding"] = _np(emb.class_embedding, dtype)
    w["vision.position_embedding"] = _np(emb.position_embedding.weight, dtype)
    w["vision.pre_layrnorm.weight"] = _np(vision.pre_layrnorm.weight, dtype)
    w["vision.pre_layrnorm.bias"] = _np(vision.pre_layrnorm.bias, dtype)
    for i, layer in enumerate(vision.encoder.layers[:num_vision_layers]):
        for ln_name, ln in (("ln1", layer.layer_norm1), ("ln2", layer.layer_norm2)):
            w[f"vision.layers.{i}.{ln_name}.weight"] = _np(ln.weight, dtype)
            w[f"vision.layers.{i}.{ln_name}.bias"] = _np(ln.bias, dtype)
    w["text.embed_tokens"] = _np(text.embed_tokens.weight, dtype)
    for i, layer in enumerate(text.layers):
        w[f"text.layers.{i}.input_norm.weight"] = _np(layer.input_layernorm.weight, dtype)
        w[f"text.layers.{i}.post_norm.weight"] = _np(layer.post_attention_layernorm.weight, dtype)
    w["text.norm.weight"] = _np(text.norm.weight, dtype)
    if getattr(model.model, "image_newline", None) is not None:  # LLaVA-NeXT
        w["image_newline"] = _np(model.model.image_newline, dtype)
    for prefix, modules in linear_groups(model, num_vision_layers):
        _linear(prefix, modules, dtype, w)
    return w


def rope_tables(head_dim: int, theta: float, scaling_factor: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim] computed the way Llama's rotary embedding does."""
    import torch

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = inv_freq / scaling_factor
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().numpy(), emb.sin().numpy()
