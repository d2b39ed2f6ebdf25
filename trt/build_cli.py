"""build-mllm: build TensorRT engines for a bundle on the target (Jetson or datacenter GPU); --verify checks them.

Writes BUNDLE/engines/{vision,prefill,decode}.plan and index.json (cache key: graph and weights
sha256, recipe, TensorRT version, GPU name and compute capability, plugin library, profiles).
Up-to-date engines are kept unless --force. Needs TensorRT, cuda-python and a CUDA GPU; bundles
exported with --routing plugin also need the plugin library (cmake -S plugins -B build/plugins).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli
from mllm_deploy.core.progress import info

PROG = "build-mllm"
PRESET_NAMES = ("jetson-orin-nano", "jetson-agx-orin", "jetson-thor", "datacenter")  # trt/profiles.PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory written by export-mllm")
    p.add_argument("--plugins", metavar="LIB", help="routing plugin library (libmllm_deploy_trt_plugins.so); "
                                                     "needed for bundles exported with --routing plugin")
    p.add_argument("--preset", choices=PRESET_NAMES, default="datacenter",
                   help="workspace and prompt/decode ranges for the target (default datacenter)")
    p.add_argument("--fp16", action="store_true",
                   help="TensorRT 10 only: FP16 tactics for a float32 bundle (TensorRT 11 is strongly typed: "
                        "export with --dtype float16 instead)")
    p.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit (default: the preset's)")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="longest prompt, image tokens included (default: visual tokens + the preset's text range)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens generated per answer (default: preset)")
    p.add_argument("--force", action="store_true", help="rebuild even when the engines are up to date")
    p.add_argument("--verify", action="store_true",
                   help="then check the plugin kernels, compare TensorRT with ONNX Runtime, benchmark, and write "
                        "engines/verify.md (exit 1 if a check fails)")
    p.add_argument("--verify-steps", type=int, default=8, metavar="N", help="decode steps compared by --verify")
    p.add_argument("--verbose", action="store_true", help="show TensorRT's info messages")
    return p


def chat_image_start(bundle) -> int:
    """Where the bundle's chat template puts the image in a one-question prompt: the profile's typical
    value of the ``image_start`` shape tensor."""
    from mllm_deploy.runtime.prompt import PromptBuilder

    prompt = PromptBuilder.from_bundle(bundle)
    ids = prompt.encode(prompt.render_chat("What is in the picture?"))
    return int((ids[0] == prompt.image_token_id).argmax())


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.core.errors import MllmError
    from mllm_deploy.trt.build import BuildOptions, build_engines
    from mllm_deploy.runtime.bundle import load_bundle

    if args.verify_steps < 2:
        raise MllmError(f"--verify-steps must be at least 2, got {args.verify_steps}")
    bundle = load_bundle(args.bundle)  # every file checked against its sha256 before any work
    options = BuildOptions(preset=args.preset, plugins=Path(args.plugins) if args.plugins else None, fp16=args.fp16,
                           workspace_mb=args.workspace, max_prompt_tokens=args.max_prompt_tokens,
                           max_new_tokens=args.max_new_tokens, force=args.force,
                           opt_image_start=chat_image_start(bundle))
    log = info  # progress on stderr (unless --quiet), results on stdout
    result = build_engines(bundle.path, bundle.manifest, options, log=log, verbose=args.verbose)
    print(f"{PROG}: engines {'written to' if result.rebuilt else 'kept in'} {result.engines_dir}")
    if args.verify:
        from mllm_deploy.trt.verify import verify

        payload = verify(bundle, result, precision=result.keys[0].settings["precision"], steps=args.verify_steps,
                         log=log)
        print(f"{PROG}: verification passed; report {result.engines_dir / 'verify.md'}"
              f" ({sum(c['status'] == 'pass' for c in payload['checks'])} checks)")
    return 0


def main(argv=None) -> int:
    return cli.main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
