"""export-mllm: Hugging Face LLaVA model -> ONNX bundle."""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.core import cli
from mllm_deploy.core.progress import info


def build_parser() -> argparse.ArgumentParser:
    from mllm_deploy.models.registry import add_model_arguments

    p = argparse.ArgumentParser(prog="export-mllm", description=__doc__)
    add_model_arguments(p, "local Hugging Face LLaVA directory or a built-in name (tiny-llava, small-llava,"
                           " shapes-llava)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument("--recipe", help="recipe.json from calib-mllm to bake into the prefill graph (default: dense)")
    p.add_argument("--routing", default="native", choices=["native", "plugin"],
                   help="routing as standard ONNX ops (native) or mllm_deploy custom ops backed by plugins")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="the bundle's float type (default float32; float16 is for GPUs: ONNX Runtime's CPU provider"
                        " keeps float32 copies of float16 weights)")
    p.add_argument("--opset", type=int, help="ONNX opset (17-21; default 17, or 21 with --quantize)")
    q = p.add_argument_group("weight-only quantization (the decoder's linear layers; TensorRT and ONNX Runtime run"
                             " the same DequantizeLinear form, ONNX Runtime as its MatMulNBits)")
    q.add_argument("--quantize", choices=["int8", "int4"],
                   help="int4: signed 4-bit, one scale per block of input rows; int8: one scale per output channel")
    q.add_argument("--block-size", type=int, choices=[32, 64, 128],
                   help="int4 block (default 64; TensorRT builds 64 and 128, ONNX Runtime all three)")
    q.add_argument("--quant-method", default="rtn", metavar="{rtn,awq,gptq,hqq}",
                   help="how weights are rounded (default rtn, round-to-nearest; the data-aware methods are not"
                        " available yet and say so)")
    q.add_argument("--quantize-lm-head", action="store_true", help="also the LM head (default: kept in float)")
    q.add_argument("--quantize-vision", action="store_true",
                   help="also the CLIP tower's and the projector's linear layers (default: kept in float)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the check of the ONNX graphs against the PyTorch model")
    p.add_argument("--no-ort-graphs", dest="ort_graphs", action="store_false",
                   help="leave out the onnxruntime-target prefill/decode graphs (ONNX Runtime's fused ops, used by"
                        " run/bench/eval on ONNX Runtime; TensorRT builds the portable graphs either way)")
    p.add_argument("--verify-layers", type=int, metavar="N",
                   help="verify on a depth-truncated copy: the first N decoder layers of the same checkpoint, exported"
                        " the same way and compared with the same-depth PyTorch model (for models too big for"
                        " PyTorch in this machine's memory; safetensors checkpoints, not MoD recipes)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--check-trt", metavar="VERSION",
                   help="also fail unless TensorRT VERSION's ONNX parser accepts every graph (10.3, 10.16, 11.4)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse when the export's estimated memory (weights + KV cache + activations) exceeds SIZE,"
                        " e.g. 16GiB or 512MB (the memory available is always checked)")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.core.memory import parse_size

    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    from mllm_deploy.core.progress import bars_enabled

    if bars_enabled(sys.stderr):  # someone watching (a terminal or --progress): the imports take ~10 s
        info(f"export: {args.model}: loading PyTorch, transformers and the model's configuration ...")
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    options = ExportOptions(dtype=args.dtype, opset=args.opset, verify=args.verify, force=args.force,
                            recipe=args.recipe, routing=args.routing, check_trt=args.check_trt, max_memory=max_memory,
                            cache_dir=args.cache_dir, verify_layers=args.verify_layers, ort_graphs=args.ort_graphs,
                            quantize=args.quantize, block_size=args.block_size, quant_method=args.quant_method,
                            quantize_lm_head=args.quantize_lm_head, quantize_vision=args.quantize_vision)
    export_bundle(args.model, args.output, options, log=info)
    return 0


def main(argv=None) -> int:
    return cli.main("export-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
