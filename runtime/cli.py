"""run-mllm: answer a question about an image with an exported bundle (no PyTorch needed)."""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run-mllm", description=__doc__)
    p.add_argument("bundle", help="bundle directory written by export-mllm")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="the user's question; goes through the chat template with the image")
    group.add_argument("--raw-prompt", help="the model input verbatim; must contain the image placeholder once")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="most tokens to generate (default 32; fewer when the model ends its answer)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens (timing runs)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling (default: a fresh one each run); greedy decoding needs none")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="onnxruntime (default) or tensorrt (runs the engines build-mllm wrote into the bundle)")
    add_ort_arguments(p)
    cli.add_json_argument(p, "the answer (text, tokens, prompt_tokens, timings)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse to load when the estimated memory (weights + KV cache + activations) exceeds SIZE,"
                        " e.g. 4GiB or 512MB (the memory available is always checked)")
    p.add_argument("--verify-hashes", action="store_true",
                   help="hash every bundle file against the manifest, even those verified before (by default a file "
                        "whose size and modification time are unchanged since its last check is not hashed again)")
    return p


def add_ort_arguments(p: argparse.ArgumentParser) -> None:
    """The ONNX Runtime backend's choices (run-mllm, bench-mllm, eval-mllm)."""
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"),
                   help="ONNX Runtime execution provider (cuda needs the [gpu] extra: onnxruntime-gpu; default cpu)")
    p.add_argument("--device-id", type=int, default=0, help="the CUDA device for --provider cuda (default 0)")
    p.add_argument("--graphs", default="auto", choices=("auto", "onnxruntime", "portable"),
                   help="the bundle's graphs to run on ONNX Runtime: its fused onnxruntime-target ones (auto: when it"
                        " has them, on the CPU) or the portable ones TensorRT builds")
    p.add_argument("--weights", default="auto", choices=("auto", "shared", "fast", "packed"),
                   help="how the sessions hold the weights: one shared mapping, pre-packed by the decode session"
                        " (fast) or by every session (packed: fastest, one more copy); auto: packed when the"
                        " memory estimate allows it, else shared")
    p.add_argument("--quant-activations", default="int8", choices=("int8", "float"),
                   help="quantized bundles on the CPU: ONNX Runtime's MatMulNBits rounds activations to int8 inside"
                        " each product (default, the fast path) or keeps them float (the quantized model exactly)")


def ort_options(args: argparse.Namespace) -> dict:
    """Backend options from add_ort_arguments' flags, for the onnxruntime backend only."""
    if getattr(args, "backend", "onnxruntime") != "onnxruntime":
        return {}
    options = {"provider": args.provider, "device_id": args.device_id, "graphs": args.graphs, "weights": args.weights}
    if args.quant_activations != "int8":
        options["quant_activations"] = args.quant_activations
    return options


def _warn_about_prompt(pipe, args: argparse.Namespace) -> None:
    """One warning line when the question is one the model cannot have learnt to answer: words its vocabulary
    lacks, or (a model trained on fixed question templates, as shapes-llava) no template it knows."""
    text = args.prompt if args.prompt is not None else args.raw_prompt
    unknown = pipe.prompt.unknown_words(text)
    problem = None
    if unknown:
        problem = f"the model's vocabulary has no {', '.join(repr(w) for w in unknown[:5])}"
    elif args.prompt is not None and pipe.prompt.off_template(args.prompt):
        problem = "the question matches none of the templates the model was trained on"
    if problem:
        templates = pipe.prompt.templates
        examples = "; ".join(repr(t) for t in templates[::max(1, len(templates) // 3)][:3])  # different kinds
        hint = f" (it knows questions like {examples}; README: shapes-vqa)" if examples else ""
        print(f"run-mllm: warning: {problem}: the answer may be empty or wrong{hint}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.core.memory import available_memory, parse_size
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        from mllm_deploy.core.errors import MllmError

        raise MllmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    if args.verify_hashes:
        from mllm_deploy.runtime.bundle import load_bundle

        load_bundle(args.bundle, verify_all=True)  # hashes everything and refreshes the record the load below trusts
    with Pipeline.load(args.bundle, backend=args.backend, **ort_options(args)) as pipe:
        # read the image and the prompt, and check the request, before any output and before the
        # sessions load: a bad image, a too-long prompt or a too-large model print nothing but the error
        pixels_source = pipe.pixel_values(args.image)
        prompt_tokens = int(pipe.input_ids(args.prompt, args.raw_prompt, pixels_source).shape[1])
        _warn_about_prompt(pipe, args)
        pipe.check_request(prompt_tokens, args.max_new_tokens, max_memory, available_memory())
        streamed = []

        def stream(delta: str) -> None:
            streamed.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            answer = pipe.ask(pixels_source, prompt=args.prompt, raw_prompt=args.raw_prompt,
                              max_new_tokens=args.max_new_tokens, sampling=sampling,
                              on_text=None if cli.json_to_stdout(args) else stream, ignore_eos=args.ignore_eos)
        except KeyboardInterrupt:
            if streamed:  # end the half-streamed line so the 'interrupted' message stands on its own
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
    cli.emit_json(args, answer.to_dict(), indent=None)
    if not cli.json_to_stdout(args):
        t = answer.generation.timings
        sys.stdout.write("\n")
        # the first token comes from prefill: a one-token answer has no decode step to report
        decode = (f"decode {sum(t.decode_ms) / len(t.decode_ms):.2f} ms/token" if t.decode_ms
                  else "no decode step")
        print(f"[{len(answer.generation.tokens)} tokens; vision {t.vision_ms:.1f} ms, prefill {t.prefill_ms:.1f} ms,"
              f" {decode}, total {t.total_ms:.1f} ms]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli.main("run-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
