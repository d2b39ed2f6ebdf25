"""vision.onnx: pixel_values [1, 3, H, W] -> image_features [1, N, d] (CLIP tower + projector).

With a recipe's ``pre_llm`` stage (export/pre_llm.py) the graph keeps ``keep`` of the N tokens and outputs
image_features [1, keep, d] and ``pre_llm.kept`` [keep]."""

from __future__ import annotations

import numpy as np

from mllm_deploy.export import blocks
from mllm_deploy.export.graph import GraphBuilder
from mllm_deploy.formats.geometry import ModelSpec


def vision_layers_used(spec: ModelSpec) -> int:
    """hidden_states[i] is the output of i encoder layers; LLaVA selects vision_feature_layer."""
    layer = spec.vision_feature_layer
    return layer if layer >= 0 else spec.vision.num_layers + 1 + layer


def build_vision_graph(graph: GraphBuilder, spec: ModelSpec, weights: dict, float_type: int, pre_llm=None,
                       routing_name: str = "native") -> None:
    """``spec``: the model as published (the tower's N tokens); ``pre_llm``: a recipe's PreLlmStage or None."""
    from mllm_deploy.export import pre_llm as selection
    from mllm_deploy.export.routing import routing_by_name

    spec = spec.tower()
    vision = spec.vision
    probs = None
    dtype = blocks.NP_FLOAT[float_type]
    heads, head_dim = vision.num_heads, vision.hidden_size // vision.num_heads
    pixels = graph.input("pixel_values", float_type, [1, vision.num_channels, vision.image_size, vision.image_size])
    with graph.scope("vision"):
        with graph.scope("embeddings"):
            patch_weight = graph.const(weights["vision.patch_embedding.weight"], name="vision.patch_embedding.weight")
            patches = graph.op(
                "Conv",
                [pixels, patch_weight],
                kernel_shape=[vision.patch_size, vision.patch_size],
                strides=[vision.patch_size, vision.patch_size],
            )  # [1, dv, h, w]
            patches = graph.transpose(graph.reshape(patches, [1, vision.hidden_size, -1]), [0, 2, 1])  # [1, P, dv]
            cls = graph.reshape(graph.const(weights["vision.class_embedding"], name="vision.class_embedding"),
                                [1, 1, vision.hidden_size])
            x = graph.op("Concat", [cls, patches], axis=1)
            position_embedding = graph.const(weights["vision.position_embedding"], name="vision.position_embedding")
            x = graph.op("Add", [x, position_embedding])
        x = blocks.layer_norm(graph, x, weights, "vision.pre_layrnorm", vision.layer_norm_eps, "pre_layrnorm")
        for layer in range(vision_layers_used(spec)):
            prefix = f"vision.layers.{layer}"
            with graph.scope(f"layers.{layer}"):
                hidden = blocks.layer_norm(graph, x, weights, f"{prefix}.ln1", vision.layer_norm_eps, "layer_norm1")
                with graph.scope("attn"):
                    qkv = blocks.linear(graph, hidden, weights, f"{prefix}.attn.qkv", "qkv_proj")
                    qkv = graph.transpose(graph.reshape(qkv, [1, -1, 3, heads, head_dim]), [2, 0, 3, 1, 4])
                    q, k, v = (graph.squeeze(part, [0]) for part in graph.split(qkv, [1, 1, 1], axis=0))
                    scores = graph.op("MatMul", [q, graph.transpose(k, [0, 1, 3, 2])])
                    scores = graph.op("Mul", [scores, graph.scalar(head_dim**-0.5, dtype)])
                    probs = blocks.softmax_f32(graph, blocks.to_f32(graph, scores, float_type), float_type)
                    ctx = graph.reshape(graph.transpose(graph.op("MatMul", [probs, v]), [0, 2, 1, 3]),
                                        [1, -1, vision.hidden_size])
                    x = graph.op("Add", [x, blocks.linear(graph, ctx, weights, f"{prefix}.attn.o", "out_proj")])
                hidden = blocks.layer_norm(graph, x, weights, f"{prefix}.ln2", vision.layer_norm_eps, "layer_norm2")
                with graph.scope("mlp"):
                    hidden = blocks.activation(graph, blocks.linear(graph, hidden, weights, f"{prefix}.mlp.fc1", "fc1"),
                                               vision.hidden_act, float_type)
                    x = graph.op("Add", [x, blocks.linear(graph, hidden, weights, f"{prefix}.mlp.fc2", "fc2")])
        if spec.vision_feature_select_strategy == "default":  # drop the CLS position
            x = graph.slice(x, graph.ints([1]), graph.ints([np.iinfo(np.int64).max]), axes=[1])
    n = kept = spec.base_visual_tokens  # one view (LLaVA-NeXT runs the graph per view; LLaVA-1.5 has one)
    if pre_llm is not None and pre_llm.method == "cls":  # select before the projector (it works per token)
        x = selection.select(graph, routing_by_name(routing_name), selection.cls_scores(graph, probs, float_type), x,
                             n, pre_llm.keep)
        kept = pre_llm.keep
    with graph.scope("projector"):
        x = blocks.linear(graph, x, weights, "projector.linear_1", "linear_1")
        x = blocks.activation(graph, x, spec.projector_hidden_act, float_type)
        x = blocks.linear(graph, x, weights, "projector.linear_2", "linear_2")
    if pre_llm is not None and pre_llm.method == "dart":  # DART ranks the projected features (embedding level)
        x = selection.select(graph, routing_by_name(routing_name), selection.dart_scores(graph, x, n, pre_llm, float_type),
                             x, n, pre_llm.keep)
        kept = pre_llm.keep
    graph.output(x, "image_features", float_type, [1, kept, spec.text.hidden_size])
    if spec.is_anyres:  # LLaVA-NeXT: the graph runs once per view; the runtime packs the views (runtime/anyres.py)
        graph.output(graph.op("Identity", [graph.const(weights["image_newline"], name="image_newline.weight")]), "image_newline",
                     float_type,
                     [spec.text.hidden_size])
