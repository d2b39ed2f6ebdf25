"""serve-mllm: serve a bundle over HTTP with OpenAI's chat-completions API (one image per request; no PyTorch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.core import cli
from mllm_deploy.runtime.cli import add_ort_arguments, ort_options

EPILOG = """endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health, GET /metrics
(Prometheus). Images come inline as data: URLs, or as file:// paths under --allow-file-dir; http(s) image URLs
are never fetched. SIGTERM finishes the requests in flight within --shutdown-timeout, then exits 0."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve-mllm", description=__doc__, epilog=EPILOG)
    p.add_argument("bundle", help="bundle directory written by export-mllm")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="onnxruntime (default) or tensorrt (the engines build-mllm wrote into the bundle)")
    add_ort_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed at start)")
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the bundle's"
                                        " directory name)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait behind the one being generated; more are answered 429 with"
                        " Retry-After (default 16)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require 'Authorization: Bearer KEY' on /v1/*, KEY being this file's content (stripped)")
    p.add_argument("--allow-file-dir", action="append", default=[], metavar="DIR",
                   help="accept file:// image URLs that resolve inside DIR (repeatable; default: none accepted)")
    p.add_argument("--max-image-bytes", default="20MiB", metavar="SIZE",
                   help="largest image file, e.g. 20MiB (default) or a number of bytes; larger ones are answered 413")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, metavar="N",
                   help="most pixels an image may declare in its header (default 50000000); larger ones are"
                        " answered 413 before decoding")
    p.add_argument("--max-body-bytes", metavar="SIZE",
                   help="largest request body (default: room for one --max-image-bytes image in base64, plus 1 MiB)")
    p.add_argument("--max-new-tokens-limit", type=int, default=512, metavar="N",
                   help="max_tokens is capped at N (default 512), and is N when a request gives none (or what the"
                        " context leaves, if less)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, the requests in flight get this long to finish before they are cancelled"
                        " (default 10)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse to start when the estimated memory of a --max-new-tokens-limit request exceeds SIZE")
    p.add_argument("--access-log", action="store_true", help="log every request on stderr (uvicorn's access log)")
    return p


def _options(args: argparse.Namespace) -> dict:
    """Check the options before anything is imported or loaded: a mistake is one line, at once."""
    from mllm_deploy.core.errors import InputFileError, MllmError
    from mllm_deploy.core.memory import parse_size

    for flag, value, least in (("--max-queue", args.max_queue, 0), ("--port", args.port, 0),
                               ("--max-new-tokens-limit", args.max_new_tokens_limit, 1),
                               ("--max-image-pixels", args.max_image_pixels, 1)):
        if value < least:
            raise MllmError(f"{flag} must be at least {least}, got {value}")
    if args.port > 65535:
        raise MllmError(f"--port must be at most 65535, got {args.port}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise MllmError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    image_bytes = parse_size(args.max_image_bytes, "--max-image-bytes")
    body_bytes = (parse_size(args.max_body_bytes, "--max-body-bytes") if args.max_body_bytes
                  else (image_bytes + 2) // 3 * 4 + 2**20)
    api_key = None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip().encode()
        except (OSError, UnicodeDecodeError) as exc:
            problem = getattr(exc, "strerror", None) or exc
            raise InputFileError(f"cannot read --api-key-file {args.api_key_file}: {problem}") from None
        if not api_key:
            raise MllmError(f"--api-key-file {args.api_key_file} is empty")
    dirs = []
    for d in args.allow_file_dir:
        if not Path(d).is_dir():
            raise InputFileError(f"--allow-file-dir {d} is not a directory")
        dirs.append(Path(d).resolve())
    return {"image_bytes": int(image_bytes), "body_bytes": int(body_bytes), "api_key": api_key, "dirs": tuple(dirs)}


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import warnings

    from mllm_deploy.core.errors import DependencyError

    options = _options(args)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        name = (exc.name or "fastapi").split(".")[0]
        raise DependencyError(f"this needs {name}, which is not installed: pip install 'mllm-deploy[serve]'") from None
    from PIL import Image

    from mllm_deploy.core.memory import available_memory, parse_size
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.serve.app import Settings, create_app
    from mllm_deploy.serve.engine import Engine
    from mllm_deploy.serve.images import ImageLimits
    from mllm_deploy.serve.metrics import Metrics
    from mllm_deploy.serve.server import bind, serve

    quiet = getattr(args, "chatter", None) == "never"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="serve-mllm: %(message)s")
    # images.decode_image checks the declared size against --max-image-pixels itself, with a clear message
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    Image.MAX_IMAGE_PIXELS = None

    pipe = Pipeline.load(args.bundle, backend=args.backend, **ort_options(args))
    bundle = pipe.bundle
    # sized for an image, a short question and the longest answer: picks the weights mode and checks memory
    probe = min(bundle.visual_tokens + 64, bundle.max_positions - 1)
    max_memory = parse_size(args.max_memory) if args.max_memory else None
    pipe.check_request(probe, max(1, min(args.max_new_tokens_limit, bundle.max_positions - probe)), max_memory,
                       available_memory())
    sock = bind(args.host, args.port)
    pipe.start()
    name = args.model_name or bundle.path.name
    settings = Settings(model_name=name, backend=args.backend, max_body_bytes=options["body_bytes"],
                        images=ImageLimits(options["image_bytes"], args.max_image_pixels, options["dirs"]),
                        max_new_tokens_limit=args.max_new_tokens_limit, api_key=options["api_key"],
                        created=int((bundle.path / "manifest.json").stat().st_mtime))
    metrics = Metrics(bundle.visual_tokens, bundle.visual_tokens_per_layer)
    engine = Engine(pipe, args.max_queue, metrics)
    app = create_app(pipe, settings, metrics, engine)
    if options["api_key"] is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve-mllm: warning: listening on {args.host} without --api-key-file: anyone who can reach the port"
              " can use the model", file=sys.stderr)
    method = bundle.manifest["recipe"]["method"]["name"]
    ready = f"serve-mllm: serving {name} ({method} recipe, {args.backend}) at {{url}}"
    serve(app, sock, engine, args.shutdown_timeout, args.access_log, ready)
    if not getattr(app.state, "worker_stopped", True):
        # a model call outlived the deadline; its native thread must not hold the process (nor crash its exit)
        print("serve-mllm: the generation in progress did not stop in time; exiting without waiting for it",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    return 0


def main(argv=None) -> int:
    return cli.main("serve-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
