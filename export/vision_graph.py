"""vision.onnx: pixel_values [1, 3, H, W] -> image_features [1, N, d] (CLIP tower + projector)."""

from __future__ import annotations

import numpy as np

from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.geometry import ModelSpec


def vision_layers_used(spec: ModelSpec) -> int:
    """hidden_states[i] is the output of i encoder layers; LLaVA selects vision_feature_layer."""
    layer = spec.vision_feature_layer
    return layer if layer >= 0 else spec.vision.num_layers + 1 + layer


def build_vision_graph(g: GraphBuilder, spec: ModelSpec, w: dict, ft: int) -> None:
    v = spec.vision
    dt = blocks.NP_FLOAT[ft]
    heads, head_dim = v.num_heads, v.hidden_size // v.num_heads
    pixels = g.input("pixel_values", ft, [1, v.num_channels, v.image_size, v.image_size])
    with g.scope("vision"):
        with g.scope("embeddings"):
            patches = g.op(
                "Conv",
                [pixels, g.const(w["vision.patch_embedding.weight"], name="vision.patch_embedding.weight")],
                kernel_shape=[v.patch_size, v.patch_size],
                strides=[v.patch_size, v.patch_size],
            )  # [1, dv, h, w]
            patches = g.transpose(g.reshape(patches, [1, v.hidden_size, -1]), [0, 2, 1])  # [1, P, dv]
            cls = g.reshape(g.const(w["vision.class_embedding"], name="vision.class_embedding"), [1, 1, v.hidden_size])
            x = g.op("Concat", [cls, patches], axis=1)
            x = g.op("Add", [x, g.const(w["vision.position_embedding"], name="vision.position_embedding")])
        x = blocks.layer_norm(g, x, w, "vision.pre_layrnorm", v.layer_norm_eps, "pre_layrnorm")
        for i in range(vision_layers_used(spec)):
            p = f"vision.layers.{i}"
            with g.scope(f"layers.{i}"):
                h = blocks.layer_norm(g, x, w, f"{p}.ln1", v.layer_norm_eps, "layer_norm1")
                with g.scope("attn"):
                    qkv = blocks.linear(g, h, w, f"{p}.attn.qkv", "qkv_proj")
                    qkv = g.transpose(g.reshape(qkv, [1, -1, 3, heads, head_dim]), [2, 0, 3, 1, 4])
                    q, k, val = (g.squeeze(t, [0]) for t in g.split(qkv, [1, 1, 1], axis=0))
                    scores = g.op("MatMul", [q, g.transpose(k, [0, 1, 3, 2])])
                    scores = g.op("Mul", [scores, g.scalar(head_dim**-0.5, dt)])
                    probs = blocks.softmax_f32(g, blocks.to_f32(g, scores, ft), ft)
                    ctx = g.reshape(g.transpose(g.op("MatMul", [probs, val]), [0, 2, 1, 3]), [1, -1, v.hidden_size])
                    x = g.op("Add", [x, blocks.linear(g, ctx, w, f"{p}.attn.o", "out_proj")])
                h = blocks.layer_norm(g, x, w, f"{p}.ln2", v.layer_norm_eps, "layer_norm2")
                with g.scope("mlp"):
                    h = blocks.activation(g, blocks.linear(g, h, w, f"{p}.mlp.fc1", "fc1"), v.hidden_act, ft)
                    x = g.op("Add", [x, blocks.linear(g, h, w, f"{p}.mlp.fc2", "fc2")])
        if spec.vision_feature_select_strategy == "default":  # drop the CLS position
            x = g.slice(x, g.ints([1]), g.ints([np.iinfo(np.int64).max]), axes=[1])
    with g.scope("projector"):
        x = blocks.linear(g, x, w, "projector.linear_1", "linear_1")
        x = blocks.activation(g, x, spec.projector_hidden_act, ft)
        x = blocks.linear(g, x, w, "projector.linear_2", "linear_2")
    g.output(x, "image_features", ft, [1, spec.visual_tokens, spec.text.hidden_size])
