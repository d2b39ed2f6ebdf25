"""float16 bundles run on ONNX Runtime CPU and agree with float32 in the first generated tokens."""

from __future__ import annotations

import onnx

from conftest import make_image


def test_fp16_bundle_agrees_with_fp32(tiny_model_dirs, tiny_bundles, tmp_path):
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle
    from mllm_deploy.runtime.pipeline import Pipeline

    fp16 = export_bundle(str(tiny_model_dirs["gqa56"]), tmp_path / "fp16", ExportOptions(dtype="float16"), log=lambda m: None)
    prefill = onnx.load(fp16 / "prefill.onnx", load_external_data=False)
    assert {i.name: i.type.tensor_type.elem_type for i in prefill.graph.input}["image_features"] == onnx.TensorProto.FLOAT16
    from mllm_deploy.trt.check import check_bundle

    for version in ("10.16", "11.4"):  # TensorRT 11 networks are strongly typed: the graph itself is fp16
        assert all(not findings for findings in check_bundle(fp16, version).values())
    image = make_image(tmp_path / "a.png", size=(80, 80))
    with Pipeline.load(tiny_bundles["gqa56"]) as p32, Pipeline.load(fp16) as p16:
        for question in ["What is in the image?", "Describe the picture in detail."]:
            t32 = p32.ask(image, prompt=question, max_new_tokens=4).generation.tokens
            t16 = p16.ask(image, prompt=question, max_new_tokens=4).generation.tokens
            assert t16 == t32
