"""Routing ops: NumPy references against the PyTorch semantics, ONNX schemas, ONNX Runtime kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mllm_deploy.calib import scoring
from mllm_deploy.formats.recipe import ScoreSpec
from mllm_deploy.calib.reference import RecipeReference
from mllm_deploy.export.graph import GraphBuilder, WeightStore
from mllm_deploy.plugins import ort_kernels
from mllm_deploy.plugins.ops import COMBINES, DOMAIN, HEAD_REDUCTIONS, OP_NAMES, QUERY_ROWS, REFERENCES, VERSION
from mllm_deploy.plugins.schemas import make_node, node_attributes, register_schemas

ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
GEOMETRIES = [  # (T, vis_start, n_vis): text rows after the image = T - vs - n_vis
    (12, 3, 6),
    (9, 0, 8),  # image first, one text row
    (21, 5, 10),
    (7, 2, 4),  # one text row
]


def _positions(rng: np.random.Generator, seq_len: int) -> np.ndarray:
    """Ascending, gapped ids, as after an earlier pruning layer (tokens keep their original ids)."""
    return np.sort(rng.choice(3 * seq_len, seq_len, replace=False)).astype(np.int64)


def _qk(rng, heads, kv_heads, seq_len, head_dim=16, dtype=np.float32):
    q = (rng.standard_normal((1, heads, seq_len, head_dim)) * 2).astype(dtype)
    k = (rng.standard_normal((1, kv_heads, seq_len, head_dim)) * 2).astype(dtype)
    return q, k


def _torch_scores(q, k, positions, vs, n_vis, query_rows, head_reduction, combine) -> np.ndarray:
    groups = q.shape[1] // k.shape[1]
    k_rep = torch.from_numpy(k).repeat_interleave(groups, dim=1)  # scoring takes k already repeated
    spec = ScoreSpec(query_rows=query_rows, head_reduction=head_reduction, combine=combine)
    out = scoring.visual_scores(spec, torch.from_numpy(q), k_rep, torch.from_numpy(positions), vs, n_vis)
    return out.numpy()


def _np_scores(q, k, positions, vs, n_vis, **attrs) -> np.ndarray:
    attrs.setdefault("scale", q.shape[-1] ** -0.5)
    return REFERENCES["VisualScore"](q, k, positions[None], np.array([vs], np.int64), n_vis=n_vis, **attrs)[0]


# ---- NumPy references against calib/scoring.py and RecipeReference ---------------------------
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_visual_score_matches_torch(heads, kv_heads, geometry, dtype):
    seq_len, vs, n_vis = geometry
    rng = np.random.default_rng(seq_len * 100 + heads)
    q, k = _qk(rng, heads, kv_heads, seq_len, dtype=dtype)
    positions = _positions(rng, seq_len)
    for query_rows in QUERY_ROWS:
        for head_reduction in HEAD_REDUCTIONS:
            for combine in COMBINES:
                expected = _torch_scores(q, k, positions, vs, n_vis, query_rows, head_reduction, combine)
                got = _np_scores(q, k, positions, vs, n_vis, query_rows=query_rows, head_reduction=head_reduction,
                                 combine=combine)
                assert got.dtype == np.float32 and got.shape == (n_vis,)
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6,
                                           err_msg=f"{query_rows}/{head_reduction}/{combine}")


def test_visual_score_accepts_the_last_query_rows_only():
    """The exporter projects only the rows it ranks with: a suffix of q gives the same scores."""
    rng = np.random.default_rng(4)
    seq_len, vs, n_vis = 16, 3, 8
    q, k = _qk(rng, 8, 2, seq_len)
    positions = _positions(rng, seq_len)
    for query_rows, q_len in (("last_text", 1), ("text", seq_len - vs - n_vis)):
        attrs = dict(query_rows=query_rows, head_reduction="mean", combine="single")
        np.testing.assert_array_equal(_np_scores(q[:, :, -q_len:], k, positions, vs, n_vis, **attrs),
                                      _np_scores(q, k, positions, vs, n_vis, **attrs))
    with pytest.raises(ValueError, match="last 4 of 16"):
        _np_scores(q[:, :, -4:], k, positions, vs, n_vis, query_rows="text", head_reduction="mean", combine="single")


def test_visual_score_rows_are_causal():
    """The first text row must not see the last text key, which would otherwise take all its attention."""
    seq_len, vs, n_vis, head_dim = 7, 1, 3, 8
    q = np.zeros((1, 1, seq_len, head_dim), np.float32)
    k = np.zeros((1, 1, seq_len, head_dim), np.float32)
    k[0, 0, 1:4, 0] = [1.0, 2.0, 3.0]  # visual keys, distinguishable
    q[0, 0, 4:, 0] = 1.0
    q[0, 0, 4:, 1] = 10.0
    k[0, 0, 6, 1] = 10.0  # the last key: 100 * scale ahead of everything for every text row that sees it
    positions = np.arange(seq_len, dtype=np.int64)
    attrs = dict(query_rows="text", head_reduction="mean", combine="single", scale=head_dim**-0.5)
    got = _np_scores(q, k, positions, vs, n_vis, **attrs)
    # brute force, one row at a time over only the keys at or before it
    rows = []
    for row in range(vs + n_vis, seq_len):
        logits = (k[0, 0, : row + 1] @ q[0, 0, row]) * np.float32(head_dim**-0.5)
        probs = np.exp(logits - logits.max())
        rows.append((probs / probs.sum())[vs:vs + n_vis])
    np.testing.assert_allclose(got, np.mean(rows, axis=0), rtol=1e-6, atol=1e-7)
    no_mask = _np_scores(q, k, np.zeros(seq_len, np.int64), vs, n_vis, **attrs)  # equal ids: nothing masked
    assert got.min() > 0.05 and no_mask.max() < 0.02  # the mask matters by orders of magnitude
    np.testing.assert_allclose(got, _torch_scores(q, k, positions, vs, n_vis, "text", "mean", "single"), atol=1e-6)


@pytest.mark.parametrize("n_vis,vs,text", [(8, 3, 4), (6, 0, 1), (5, 2, 0)])
def test_token_select_matches_reference_select(n_vis, vs, text):
    rng = np.random.default_rng(n_vis)
    seq_len, dim = vs + n_vis + text, 5
    data = rng.standard_normal((1, seq_len, dim)).astype(np.float32)
    positions = _positions(rng, seq_len)
    for scores in (rng.standard_normal(n_vis).astype(np.float32),
                   rng.integers(0, 3, n_vis).astype(np.float32),  # many ties
                   np.zeros(n_vis, np.float32)):  # all tied: the lowest indices win
        for keep in range(1, n_vis + 1):
            got_data, got_pos, rows = REFERENCES["TokenSelect"](scores, np.array([vs]), data, positions[None],
                                                                k=keep, n_vis=n_vis)
            kept = scoring.select_top(torch.from_numpy(scores), keep)
            want_data, want_pos = RecipeReference._select(torch.from_numpy(data), torch.from_numpy(positions),
                                                          vs, n_vis, kept)
            np.testing.assert_array_equal(got_data, want_data.numpy())
            np.testing.assert_array_equal(got_pos[0], want_pos.numpy())
            np.testing.assert_array_equal(positions[rows], want_pos.numpy())
            assert rows.dtype == np.int64 and rows.shape == (seq_len - n_vis + keep,)
        zero_rows = REFERENCES["TokenSelect"](np.zeros(n_vis, np.float32), np.array([vs]), data, positions[None],
                                              k=2, n_vis=n_vis)[2]
        assert list(zero_rows[vs:vs + 2]) == [vs, vs + 1]


def test_token_scatter_reference():
    base = np.arange(2 * 6, dtype=np.float32).reshape(1, 6, 2)
    updates = -np.ones((1, 2, 2), np.float32)
    out = REFERENCES["TokenScatter"](base, updates, np.array([1, 4]))[0]
    assert out[0, :, 0].tolist() == [0, -1, 4, 6, -1, 10]
    scale = np.full((1, 6, 1), 0.5, np.float32)
    out = REFERENCES["TokenScatter"](base, updates, np.array([1, 4]), scale)[0]
    assert out[0, :, 0].tolist() == [0, -1, 2, 3, -1, 5]
    with pytest.raises(ValueError):
        REFERENCES["TokenScatter"](base, updates, np.array([1, 1]))


# ---- one-node ONNX models ---------------------------------------------------------------------
def _model(node: onnx.NodeProto, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]],
           initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)])
    model.ir_version = 9
    return model


def _check(model: onnx.ModelProto, expected: dict[str, tuple[int, list]]) -> None:
    """Checker and strict shape inference pass and give each output the expected dtype and dims."""
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for name, (elem, dims) in expected.items():
        assert types[name].elem_type == elem, name
        got = [d.dim_value if d.HasField("dim_value") else None for d in types[name].shape.dim]
        assert got == dims, (name, got, dims)


def _run(model: onnx.ModelProto, tmp_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return ort_kernels.create_session(path).run(None, feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("query_rows,head_reduction,combine", [("last_text", "mean", "single"),
                                                                ("text", "max", "single"),
                                                                ("visual_and_text", "mean", "self_times_cross")])
def test_visual_score_node(tmp_path, dtype, query_rows, head_reduction, combine):
    heads, kv_heads, seq_len, head_dim, vs, n_vis = 8, 2, 15, 24, 2, 9
    rng = np.random.default_rng(7)
    q, k = _qk(rng, heads, kv_heads, seq_len, head_dim, dtype)
    positions = _positions(rng, seq_len)[None]
    attrs = dict(n_vis=n_vis, query_rows=query_rows, head_reduction=head_reduction, combine=combine,
                 scale=head_dim**-0.5)  # 0.2041241452...: more digits than a PyOp float attribute carries
    node = make_node("VisualScore", ["q", "k", "positions", "vis_start"], ["scores"], "score", **attrs)
    assert node_attributes(node)["plugin_namespace"] == "mllm_deploy" and node.domain == DOMAIN
    elem = ELEM[dtype]
    model = _model(node, [("q", elem, [1, heads, "T", head_dim]), ("k", elem, [1, kv_heads, "T", head_dim]),
                          ("positions", TensorProto.INT64, [1, "T"]), ("vis_start", TensorProto.INT64, [1])],
                   [("scores", TensorProto.FLOAT, [n_vis])])
    _check(model, {"scores": (TensorProto.FLOAT, [n_vis])})
    vis_start = np.array([vs], np.int64)
    (got,) = _run(model, tmp_path, {"q": q, "k": k, "positions": positions, "vis_start": vis_start})
    want = REFERENCES["VisualScore"](q, k, positions, vis_start, **node_attributes(node))[0]
    np.testing.assert_array_equal(got, want)  # same float32 math, so bit-exact (scale included)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_token_select_node(tmp_path, dtype):
    seq_len, dim, vs, n_vis = 14, 6, 3, 8
    rng = np.random.default_rng(3)
    data = rng.standard_normal((1, seq_len, dim)).astype(dtype)
    positions = _positions(rng, seq_len)[None]
    scores = rng.integers(0, 4, n_vis).astype(np.float32)  # ties
    vis_start = np.array([vs], np.int64)
    elem = ELEM[dtype]
    for keep in range(1, n_vis + 1):
        kept = seq_len - n_vis + keep
        node = make_node("TokenSelect", ["scores", "vis_start", "data", "positions"], ["y", "pos", "rows"], "sel",
                         k=keep, n_vis=n_vis)
        model = _model(node, [("scores", TensorProto.FLOAT, [n_vis]), ("vis_start", TensorProto.INT64, [1]),
                              ("data", elem, [1, seq_len, dim]), ("positions", TensorProto.INT64, [1, seq_len])],
                       [("y", elem, [1, kept, dim]), ("pos", TensorProto.INT64, [1, kept]),
                        ("rows", TensorProto.INT64, [kept])])
        _check(model, {"y": (elem, [1, kept, dim]), "pos": (TensorProto.INT64, [1, kept]),
                       "rows": (TensorProto.INT64, [kept])})
        got = _run(model, tmp_path, {"scores": scores, "vis_start": vis_start, "data": data, "positions": positions})
        want = REFERENCES["TokenSelect"](scores, vis_start, data, positions, k=keep, n_vis=n_vis)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
        if keep == n_vis:  # keeping every visual token changes nothing
            np.testing.assert_array_equal(got[0], data)
            np.testing.assert_array_equal(got[1], positions)
            np.testing.assert_array_equal(got[2], np.arange(seq_len))


def test_token_select_symbolic_length_shape():
    node = make_node("TokenSelect", ["s", "vs", "x", "p"], ["y", "py", "r"], k=2, n_vis=4)
    model = _model(node, [("s", TensorProto.FLOAT, [4]), ("vs", TensorProto.INT64, [1]),
                          ("x", TensorProto.FLOAT16, [1, "T", 8]), ("p", TensorProto.INT64, [1, "T"])],
                   [("y", TensorProto.FLOAT16, [1, None, 8]), ("py", TensorProto.INT64, [1, None]),
                    ("r", TensorProto.INT64, [None])])
    _check(model, {"y": (TensorProto.FLOAT16, [1, None, 8]), "py": (TensorProto.INT64, [1, None]),
                   "r": (TensorProto.INT64, [None])})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_token_scatter_node(tmp_path, dtype, with_scale):
    seq_len, dim = 11, 4
    rng = np.random.default_rng(5)
    base = rng.standard_normal((1, seq_len, dim)).astype(dtype)
    skip_scale = rng.uniform(0.1, 1.0, (1, seq_len, 1)).astype(dtype)
    elem = ELEM[dtype]
    for count in range(1, seq_len + 1):
        rows = np.sort(rng.choice(seq_len, count, replace=False)).astype(np.int64)
        updates = rng.standard_normal((1, count, dim)).astype(dtype)
        names = ["base", "updates", "rows"] + (["skip_scale"] if with_scale else [])
        inputs = [("base", elem, [1, seq_len, dim]), ("updates", elem, [1, count, dim]),
                  ("rows", TensorProto.INT64, [count])] + ([("skip_scale", elem, [1, seq_len, 1])] if with_scale else [])
        model = _model(make_node("TokenScatter", names, ["out"], "scatter"), inputs,
                       [("out", elem, [1, seq_len, dim])])
        _check(model, {"out": (elem, [1, seq_len, dim])})
        feeds = {"base": base, "updates": updates, "rows": rows, **({"skip_scale": skip_scale} if with_scale else {})}
        (got,) = _run(model, tmp_path, feeds)
        want = REFERENCES["TokenScatter"](*feeds.values())[0]
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)


# ---- graphs -----------------------------------------------------------------------------------
def test_chain_fp16_through_ort(tmp_path):
    """Score -> select -> scatter back in float16: dtypes after a custom node come from our schemas."""
    heads, seq_len, head_dim, dim, vs, n_vis, keep = 4, 10, 8, 6, 2, 5, 3
    rng = np.random.default_rng(11)
    q, k = _qk(rng, heads, heads, seq_len, head_dim, np.float16)
    x = rng.standard_normal((1, seq_len, dim)).astype(np.float16)
    scale = rng.uniform(0.5, 1.0, (1, seq_len, 1)).astype(np.float16)
    positions, vis_start = np.arange(seq_len, dtype=np.int64)[None], np.array([vs], np.int64)
    g = GraphBuilder("chain", 17)
    g.custom_domains[DOMAIN] = VERSION
    for name, elem, shape in [("q", TensorProto.FLOAT16, [1, heads, seq_len, head_dim]),
                              ("k", TensorProto.FLOAT16, [1, heads, seq_len, head_dim]),
                              ("positions", TensorProto.INT64, [1, seq_len]), ("vis_start", TensorProto.INT64, [1]),
                              ("x", TensorProto.FLOAT16, [1, seq_len, dim]),
                              ("scale", TensorProto.FLOAT16, [1, seq_len, 1])]:
        g.input(name, elem, shape)
    attrs = dict(n_vis=n_vis, query_rows="last_text", head_reduction="max", combine="single", scale=head_dim**-0.5)
    g.nodes += [make_node("VisualScore", ["q", "k", "positions", "vis_start"], ["s"], "score", **attrs),
                make_node("TokenSelect", ["s", "vis_start", "x", "positions"], ["y", "p", "rows"], "sel",
                          k=keep, n_vis=n_vis),
                make_node("TokenScatter", ["x", "y", "rows", "scale"], ["out"], "scatter")]
    g.output("out", "out_final", TensorProto.FLOAT16, [1, seq_len, dim])
    model = g.make_model()
    _check(model, {"out_final": (TensorProto.FLOAT16, [1, seq_len, dim])})
    assert ort_kernels.has_plugin_nodes(model)
    rewritten = ort_kernels.to_ort_model(model)
    assert not ort_kernels.has_plugin_nodes(rewritten)
    assert {o.domain for o in rewritten.opset_import} == {"", "ai.onnx.contrib"}
    assert sorted(n.op_type for n in rewritten.graph.node if n.domain == "ai.onnx.contrib") == [
        "mllm_deploy_TokenScatter_f32_4", "mllm_deploy_TokenSelect_f32", "mllm_deploy_VisualScore_f32"]
    (got,) = _run(model, tmp_path, {"q": q, "k": k, "positions": positions, "vis_start": vis_start, "x": x,
                                    "scale": scale})
    scores = REFERENCES["VisualScore"](q, k, positions, vis_start, **attrs)[0]
    y, _, rows = REFERENCES["TokenSelect"](scores, vis_start, x, positions, k=keep, n_vis=n_vis)
    np.testing.assert_array_equal(got, REFERENCES["TokenScatter"](x, y, rows, scale)[0])
    skipped = np.setdiff1d(np.arange(seq_len), rows)
    assert skipped.size == n_vis - keep and not np.array_equal(got[0, skipped], x[0, skipped])


def test_external_data_initializers(tmp_path):
    """Scores and data come from weights.bin beside the graph; the session is made from bytes elsewhere."""
    seq_len, dim, vs, n_vis, keep = 40, 16, 4, 30, 12
    rng = np.random.default_rng(2)
    scores = rng.standard_normal(n_vis).astype(np.float32)
    data = rng.standard_normal((1, seq_len, dim)).astype(np.float32)
    store = WeightStore(tmp_path / "weights.bin")
    g = GraphBuilder("ext", 17, weights=store)
    g.custom_domains[DOMAIN] = VERSION
    g.initializers += [store.tensor("scores", scores), store.tensor("data", data)]
    store.close()
    g.input("positions", TensorProto.INT64, [1, seq_len])
    g.input("vis_start", TensorProto.INT64, [1])
    g.nodes.append(make_node("TokenSelect", ["scores", "vis_start", "data", "positions"], ["y", "p", "r"], "sel",
                             k=keep, n_vis=n_vis))
    kept = seq_len - n_vis + keep
    g.output("y", "y_out", TensorProto.FLOAT, [1, kept, dim])
    model = g.make_model()
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.save(model, tmp_path / "graph.onnx")
    positions, vis_start = np.arange(seq_len, dtype=np.int64)[None], np.array([vs], np.int64)
    (got,) = ort_kernels.create_session(tmp_path / "graph.onnx").run(None, {"positions": positions,
                                                                            "vis_start": vis_start})
    np.testing.assert_array_equal(got, REFERENCES["TokenSelect"](scores, vis_start, data, positions,
                                                                 k=keep, n_vis=n_vis)[0])


def test_session_options_reused_and_schemas_idempotent(tmp_path):
    import onnxruntime as ort

    register_schemas()
    register_schemas()
    assert all(onnx.defs.has(op, VERSION, DOMAIN) for op in OP_NAMES)
    node = make_node("TokenScatter", ["b", "u", "r"], ["o"])
    model = _model(node, [("b", TensorProto.FLOAT, [1, 3, 2]), ("u", TensorProto.FLOAT, [1, 1, 2]),
                          ("r", TensorProto.INT64, [1])], [("o", TensorProto.FLOAT, [1, 3, 2])])
    onnx.save(model, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    for _ in range(2):  # prefill and decode of one bundle share options
        sess = ort_kernels.create_session(tmp_path / "m.onnx", options)
        out = sess.run(None, {"b": np.zeros((1, 3, 2), np.float32), "u": np.ones((1, 1, 2), np.float32),
                              "r": np.array([2])})[0]
        assert out[0, :, 0].tolist() == [0, 0, 1]


def test_make_node_validates():
    with pytest.raises(ValueError, match="missing"):
        make_node("TokenSelect", ["a", "b", "c", "d"], ["x", "y", "z"], k=1)
    with pytest.raises(ValueError, match="query_rows"):
        make_node("VisualScore", ["a", "b", "c", "d"], ["s"], n_vis=2, query_rows="all", head_reduction="mean",
                  combine="single", scale=1)
    with pytest.raises(ValueError, match="unknown routing op"):
        make_node("TokenGather", ["a"], ["b"])
    node = make_node("VisualScore", ["a", "b", "c", "d"], ["s"], n_vis=2, query_rows="text", head_reduction="max",
                     combine="single", scale=1)
    assert node.attribute[[a.name for a in node.attribute].index("scale")].type == onnx.AttributeProto.FLOAT
    assert node_attributes(node)["plugin_version"] == "1"


def test_kernel_error_raises_instead_of_aborting(tmp_path):
    """An exception inside a PyOp would std::terminate the process: run it in a child to be safe.
    The child also checks that importing the kernels leaves torch unimported."""
    import subprocess
    import sys

    node = make_node("TokenSelect", ["s", "vs", "x", "p"], ["y", "py", "r"], k=2, n_vis=4)
    model = _model(node, [("s", TensorProto.FLOAT, [4]), ("vs", TensorProto.INT64, [1]),
                          ("x", TensorProto.FLOAT, [1, "T", 3]), ("p", TensorProto.INT64, [1, "T"])],
                   [("y", TensorProto.FLOAT, [1, None, 3])])
    onnx.save(model, tmp_path / "m.onnx")
    code = f"""
import os, sys
os.environ.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
import numpy as np
from mllm_deploy.plugins.ort_kernels import create_session
# onnxruntime_extensions' own __init__ would pull in torch and set this variable (ort_kernels blocks both)
assert "torch" not in sys.modules and "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION" not in os.environ
sess = create_session({str(tmp_path / "m.onnx")!r})
feeds = {{"s": np.zeros(4, np.float32), "x": np.zeros((1, 6, 3), np.float32), "p": np.zeros((1, 6), np.int64)}}
try:
    sess.run(None, {{**feeds, "vs": np.array([9])}})
except ValueError as exc:
    print("raised:", exc)
print("then ok:", sess.run(None, {{**feeds, "vs": np.array([1])}})[0].shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "raised: visual span [9, 13)" in proc.stdout and "then ok: (1, 4, 3)" in proc.stdout
