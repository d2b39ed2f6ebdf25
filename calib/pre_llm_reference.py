"""The PyTorch reference of a recipe's pre_llm stage (calib/pre_llm.py says what each method does): what the
vision graph of export/pre_llm.py must reproduce token for token. Imports torch inside the functions only."""

from __future__ import annotations

COSINE_EPS = 1e-8


def vision_layers_used(config) -> int:
    """hidden_states[i] is the output of i tower layers; LLaVA feeds hidden_states[vision_feature_layer]."""
    layer = config.vision_feature_layer
    layer = layer if isinstance(layer, int) else layer[-1]
    total = config.vision_config.num_hidden_layers
    return layer if layer >= 0 else total + 1 + layer


def cls_attention(model, pixel_values):
    """[P] float32: the attention the [CLS] query pays each patch in the last tower layer used, heads averaged."""
    import torch

    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    used = vision_layers_used(model.config)
    with torch.no_grad():
        out = tower(pixel_values.to(model.dtype), output_hidden_states=True)
        layer = tower.encoder.layers[used - 1]
        h = layer.layer_norm1(out.hidden_states[used - 1])
        attn = layer.self_attn
        heads = attn.num_heads
        head_dim = h.shape[-1] // heads

        def split(x):
            return x.view(1, -1, heads, head_dim).transpose(1, 2)

        q, k = split(attn.q_proj(h)), split(attn.k_proj(h))
        probs = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * head_dim**-0.5, dim=-1)
        return probs[0, :, 0, 1:].mean(dim=0)  # [P]


def dart_quota(keep: int, pivots: int, sharers: int | None = None) -> list[int]:
    """Tokens each pivot adds, in pivot order: the ``keep - pivots`` non-pivot tokens spread over ``sharers`` pivots
    (all pivots; inside the LLM the text pivots share too), the first ones one more."""
    sharers = pivots if sharers is None else sharers
    base, extra = divmod(keep - pivots, sharers)
    return [base + (1 if i < extra else 0) for i in range(sharers)]


def _top(values, k: int):
    """Indices of the k largest values, ties to the lower index (ONNX TopK's rule)."""
    import torch

    return torch.sort(values, descending=True, stable=True).indices[:k]


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def duplication_select(norms, unit, keep: int, pivots: int, text_rows=None):
    """Indices (ascending) among the n visual tokens that DART keeps: the ``pivots`` largest ``norms`` [n], then each
    pivot row (those, then ``text_rows`` [Pt, d]) in turn takes its quota of the free tokens least cosine-similar
    to it. ``unit``: the visual tokens' unit vectors [n, d]."""
    import torch

    n = unit.shape[0]
    chosen = _top(norms, pivots)
    rows = unit[chosen] if text_rows is None else torch.cat([unit[chosen], text_rows])
    similarity = rows @ unit.T  # [pivots (+ text pivots), n]
    taken = torch.zeros(n, dtype=torch.bool)
    taken[chosen] = True
    for i, quota in enumerate(dart_quota(keep, pivots, rows.shape[0])):
        if quota:
            free = torch.where(taken, torch.tensor(torch.finfo(torch.float32).min), -similarity[i])
            taken[_top(free, quota)] = True
    return taken.nonzero().flatten()


def dart_keep(features, keep: int, pivots: int):
    """Embedding-level DART on projected features [1, N, d]: pivots by L1 norm, cosine duplication."""
    x = features[0].float()
    return duplication_select(x.abs().sum(dim=-1), _unit(x), keep, pivots)


def dart_in_llm_keep(keys, normed, vis_start: int, n_vis: int, keep: int, pivots: int, text_pivots: int):
    """DART inside the language model, at the input of the pruning layer: pivots are the ``pivots`` visual and the
    ``text_pivots`` text tokens (after the image) with the largest L1 norm of the previous layer's keys ``keys``
    [1, Hkv, T, Dh]; similarity is cosine on ``normed`` [1, T, d], the layer input after the final norm. Fewer text
    tokens than text pivots: the missing pivots have zero rows (their quota goes to the lowest free indices)."""
    import torch

    l1 = keys[0].float().abs().sum(dim=(0, 2))  # [T]
    end = vis_start + n_vis
    unit = _unit(normed[0].float())
    text_l1 = torch.cat([l1[end:], torch.full((text_pivots,), torch.finfo(torch.float32).min)])
    text_unit = torch.cat([unit[end:], torch.zeros(text_pivots, unit.shape[1])])
    text_rows = text_unit[_top(text_l1, text_pivots)]
    return duplication_select(l1[vis_start:end], unit[vis_start:end], keep, pivots, text_rows)


def select_features(model, stage, pixel_values, features):
    """(features [1, keep, d], kept indices [keep]) of a pre_llm stage (formats/recipe.PreLlmStage), from the
    tower's features [1, N, d]."""
    if stage.method == "cls":
        kept = _top(cls_attention(model, pixel_values), stage.keep).sort().values
    else:
        kept = dart_keep(features, stage.keep, stage.pivots)
    return features[:, kept], kept


def shrink_image_run(input_ids, image_token_id: int, keep: int):
    """input_ids [1, T] with its run of image tokens cut to ``keep`` (the prompt the language model sees)."""
    import torch

    ids = input_ids[0]
    where = (ids == image_token_id).nonzero().flatten()
    if len(where) <= keep:
        return input_ids
    start = int(where[0])
    return torch.cat([ids[:start + keep], ids[start + len(where):]])[None]
