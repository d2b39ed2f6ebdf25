"""This machine's memory read bandwidth, the bound a decode step cannot beat (weights read per token / bandwidth).

    python benchmarks/memory_bandwidth.py

Two readings of 1 GiB: numpy's single-threaded sum, and ONNX Runtime's MatMul of one row by a 1 GiB float32 weight
on 2 intra-op threads (what a decode step does), with and without pre-packing; medians of 8 runs after one warm-up.
"""
import time, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto as TP
n = 256 * 1024 * 1024  # 1 GiB of float32
x = np.ones(n, np.float32)
best = 0
for _ in range(5):
    t = time.perf_counter(); x.sum(); dt = time.perf_counter() - t; best = max(best, x.nbytes / dt / 1e9)
print("numpy sum 1 thread GB/s", round(best, 1))
# ORT MatMul GEMV over a 1 GiB weight (what decode does), 2 threads, pre-packed and not
w = np.random.default_rng(0).standard_normal((8192, 32768), dtype=np.float32)  # 1 GiB
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 8192])],
                      [helper.make_tensor_value_info("y", TP.FLOAT, [1, 32768])], [helper.make_tensor("w", TP.FLOAT, w.shape, w.tobytes(), raw=True)])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
for pack in (True, False):
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    if not pack: o.add_session_config_entry("session.disable_prepacking", "1")
    s = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
    xi = np.ones((1, 8192), np.float32); s.run(None, {"x": xi})
    ts = []
    for _ in range(8):
        t = time.perf_counter(); s.run(None, {"x": xi}); ts.append(time.perf_counter() - t)
    print("ORT GEMV over 1 GiB, 2 threads, prepack", pack, "GB/s median", round(w.nbytes / sorted(ts)[4] / 1e9, 1), "best", round(w.nbytes / min(ts) / 1e9, 1))
