"""The error funnel shared by every command-line tool.

A CLI module defines ``build_parser()`` (cheap: argparse only) and ``run(args)`` (does the
work, with heavy imports inside). :func:`main` wires them: user errors become one line on
stderr and exit 1; ``--debug`` re-raises to show the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from mllm_deploy.core.errors import MllmError


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    from mllm_deploy import __version__

    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("--progress", dest="chatter", action="store_const", const="always",
                         help="progress bars on stderr even when it is not a terminal (a log file, CI)")
    chatter.add_argument("--quiet", dest="chatter", action="store_const", const="never",
                         help="no progress bars and no informational lines; results and errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s (mllm-deploy) {__version__}",
                        help="print the version and exit")


def add_json_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json [PATH]``, the same on every command: alone, the JSON replaces the human output on stdout; with a
    path, it is written there (atomically) and the human output stays."""
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help=f"{what} as JSON: on stdout instead of the text (--json), or into PATH (--json PATH)")


def json_to_stdout(args: argparse.Namespace) -> bool:
    return getattr(args, "json", None) == "-"


def emit_json(args: argparse.Namespace, payload, indent: int | None = 2) -> None:
    """Where --json [PATH] asked for it; nothing without --json."""
    import json

    if args.json is None:
        return
    text = json.dumps(payload, indent=indent)
    if args.json == "-":
        print(text)
    else:
        from mllm_deploy.core.fsutil import atomic_write_text

        atomic_write_text(args.json, text + "\n")


def main(
    prog: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    parser = build_parser()
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if getattr(args, "chatter", None):
        from mllm_deploy.core.progress import PROGRESS_ENV

        os.environ[PROGRESS_ENV] = args.chatter  # children (bench-mllm's workers) inherit it
    try:
        code = run(args)
    except MllmError as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    except ImportError as exc:
        # an optional dependency this tool needs is not installed (a runtime-only install running export-mllm):
        # name the extra that brings it
        if args.debug:
            raise
        print(f"{prog}: error: {missing_dependency_message(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`| head`): not an error; keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as shell tools report it
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The file system refused (permission denied, disk full, name too long, read-only): the
        # user's environment to fix, so one line like any user error; --debug shows where.
        if args.debug:
            raise
        print(f"{prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    return int(code or 0)


def os_error_message(exc: OSError) -> str:
    name = str(exc.filename) if exc.filename is not None else ""
    if len(name) > 120:  # a 5,000-character path helps nobody; its ends say which one it was
        name = f"{name[:60]}...{name[-40:]}"
    text = f"{exc.strerror}: {name}" if exc.strerror and name else (exc.strerror or str(exc) or type(exc).__name__)
    return " ".join(text.split())


# top-level module -> the extra of pyproject.toml that installs it
EXTRAS = {
    "torch": "export", "transformers": "export", "safetensors": "export", "onnx": "export", "onnxscript": "export",
    "tqdm": "export", "onnxruntime": "cpu] or [gpu", "onnxruntime_extensions": "ort-plugins", "matplotlib": "report",
    "tensorrt": "trt-cu12] or [trt-cu13", "cuda": "jetpack6] or [jetpack7", "huggingface_hub": "export",
}


def missing_dependency_message(exc: ImportError) -> str:
    name = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return f"cannot import {exc.name or exc}: {' '.join(str(exc).split())}"
    return f"this needs {name}, which is not installed: pip install 'mllm-deploy[{extra}]'"
