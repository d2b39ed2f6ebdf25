"""A corpus of bad inputs across the CLIs, run as a user runs them: each exits 1 with exactly one
line on stderr naming the problem, prints nothing on stdout, and leaves no output behind (the -o /
--json path does not exist afterwards and no temporary file or directory is left beside it).

Cases are chosen to fail early (argument checks, file checks, the bundle's integrity check), so each
costs one interpreter start; the bundle cases share one exported tiny bundle and corrupt a copy.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import make_image, run_cli

BOMB_SIDE = 20_000  # 400 Mpx declared in a 100-byte PNG


@dataclass
class Ctx:
    tmp: Path
    bundle_src: Path
    model: Path
    other_model: Path

    @property
    def image(self) -> Path:
        path = self.tmp / "ok.png"
        return path if path.exists() else make_image(path)

    def bundle(self) -> Path:
        """A fresh copy of the shared bundle, to corrupt."""
        target = self.tmp / "bundle"
        if not target.exists():
            shutil.copytree(self.bundle_src, target)
        return target

    def edit_manifest(self, edit: Callable[[dict], object]) -> Path:
        bundle = self.bundle()
        manifest = json.loads((bundle / "manifest.json").read_text())
        edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def recipe(self, model: Path | None = None, **changes) -> Path:
        from mllm_deploy.formats.recipe import dense_recipe
        from mllm_deploy.models.registry import load_spec

        d = dense_recipe(load_spec(str(model or self.model))[1]).to_dict()
        d.update(changes)
        return self.write(f"recipe{len(list(self.tmp.glob('recipe*')))}.json", json.dumps(d))

    def jsonl(self, *lines: str, name: str = "data.jsonl") -> Path:
        self.image  # noqa: B018 - lines refer to ok.png beside the file
        return self.write(name, "\n".join(lines) + "\n")


def _png_header(width: int, height: int) -> bytes:
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", body) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))


def _garbage_graph(ctx: Ctx) -> Path:
    (ctx.bundle() / "decode.onnx").write_bytes(b"\x08garbage")
    return ctx.bundle()


def _truncated_png(ctx: Ctx) -> Path:
    path = make_image(ctx.tmp / "cut.png", size=(200, 150))
    _truncate(path, 0.4)
    return path


@dataclass(frozen=True)
class Case:
    tool: str
    argv: Callable[[Ctx], list[str]]
    needles: tuple[str, ...]
    output: str | None = None  # the output path (relative to tmp) that must not appear


def _run(ctx: Ctx, *args: str) -> list[str]:  # run-mllm with a valid image and prompt unless overridden
    return [str(ctx.bundle_src), "--image", str(ctx.image), "--prompt", "What is it?", *args]


def _run_bundle(bundle: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    return lambda c: [str(bundle(c)), "--image", str(c.image), "--prompt", "hi"]


def _set(path: tuple, value) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _bad_bench(ctx: Ctx) -> Path:
    result = {key: 1 for key in ("name", "backend", "method", "visual_tokens", "prompt_tokens", "new_tokens",
                                 "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s",
                                 "kv_cache_bytes", "kv_tokens_per_layer", "prefill_flops", "dense_prefill_flops",
                                 "flops_reduction", "peak_rss_mb", "model")}
    payload = {"schema": "mllm-deploy/bench@1", "machine": {}, "settings": {}, "results": [result]}
    return ctx.write("bench.json", json.dumps(payload))


CASES: dict[str, Case] = {
    # ---- flops-mllm: model and recipe files ---------------------------------------------------------------
    "flops/missing-model": Case("flops-mllm", lambda c: ["--model", str(c.tmp / "nope")], ("nope", "neither a directory")),
    "flops/model-is-file": Case("flops-mllm", lambda c: ["--model", str(c.write("m.bin", "x"))], ("m.bin", "is a file")),
    "flops/no-config": Case("flops-mllm", lambda c: ["--model", str(c.tmp)], ("has no config.json",)),
    "flops/config-not-json": Case("flops-mllm", lambda c: ["--model", str(c.write("config.json", "{oops").parent)],
                                  ("config.json", "not valid JSON")),
    "flops/config-other-arch": Case("flops-mllm", lambda c: ["--model", str(c.write(
        "config.json", json.dumps({"architectures": ["BertModel"]})).parent)], ("'BertModel' is not supported",)),
    "flops/recipe-missing": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe", str(c.tmp / "r.json")],
                                 ("recipe file not found", "r.json")),
    "flops/recipe-not-json": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                          str(c.write("r.json", '{"schema": '))], ("r.json", "not valid JSON")),
    "flops/recipe-bad-utf8": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                          str(c.write("r.json", b'{"a": "\xff\xfe"}'))], ("r.json", "UTF-8")),
    "flops/recipe-deep-nesting": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                              str(c.write("r.json", "[" * 100_000 + "]" * 100_000))],
                                      ("r.json", "nested too deeply")),
    "flops/recipe-is-list": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe", str(c.write("r.json", "[]"))],
                                 ("a recipe is a JSON object",)),
    "flops/recipe-wrong-schema": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                              str(c.recipe(schema="mllm-deploy/recipe@9"))],
                                      ("recipe schema", "recipe@9")),
    "flops/recipe-tokens-strings": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                                str(c.recipe(visual_tokens=["64"] * 4))],
                                        ("visual_tokens must be a list of integers",)),
    "flops/recipe-too-many-tokens": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                                 str(c.recipe(visual_tokens=[10**9] * 4))],
                                         ("visual_tokens[0]", "outside")),
    "flops/recipe-other-model": Case("flops-mllm", lambda c: ["--model", str(c.model), "--recipe",
                                                             str(c.recipe(model=c.other_model))],
                                     ("does not match the model",)),
    "flops/negative-text-tokens": Case("flops-mllm", lambda c: ["--model", str(c.model), "--text-tokens", "-5"],
                                       ("--text-tokens",)),
    # ---- calib-mllm: options and calibration data --------------------------------------------------------
    "calib/output-is-dir": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "dense", "-o", str(c.tmp)],
                                ("is a directory",)),
    "calib/data-missing": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "vtw", "--data",
                                                        str(c.tmp / "none.jsonl"), "-o", str(c.tmp / "r.json")],
                               ("calibration data not found", "none.jsonl"), "r.json"),
    "calib/synthetic-zero": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "vtw", "--data",
                                                          "builtin:synthetic:0", "-o", str(c.tmp / "r.json")],
                                 ("builtin:synthetic:0", "N must be"), "r.json"),
    "calib/synthetic-huge": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "vtw", "--data",
                                                          "builtin:synthetic:999999999", "-o", str(c.tmp / "r.json")],
                                 ("N must be an integer from 1 to",), "r.json"),
    "calib/unknown-builtin": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "vtw", "--data",
                                                           "builtin:imagenet", "-o", str(c.tmp / "r.json")],
                                  ("unknown built-in data",), "r.json"),
    "calib/vtw-without-data": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "vtw",
                                                            "-o", str(c.tmp / "r.json")], ("needs --data",), "r.json"),
    "calib/fitprune-budget-range": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "fitprune",
                                                                 "--budget", "1.5", "--data", "builtin:synthetic:2",
                                                                 "-o", str(c.tmp / "r.json")], ("--budget",), "r.json"),
    "calib/fastv-k-range": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "fastv", "--fastv-k", "99",
                                                         "-o", str(c.tmp / "r.json")], ("--fastv-k",), "r.json"),
    "calib/data-line-not-json": Case("calib-mllm", lambda c: [
        "--model", str(c.model), "--method", "vtw", "--data", str(c.jsonl('{"image": "ok.png", "prompt": "q"}', "{{")),
        "-o", str(c.tmp / "r.json")], ("data.jsonl line 2", "not valid JSON"), "r.json"),
    "calib/data-image-missing": Case("calib-mllm", lambda c: [
        "--model", str(c.model), "--method", "vtw", "--data", str(c.jsonl('{"image": "gone.png", "prompt": "q"}')),
        "-o", str(c.tmp / "r.json")], ("line 1", "gone.png"), "r.json"),
    "calib/data-prompt-missing": Case("calib-mllm", lambda c: [
        "--model", str(c.model), "--method", "vtw", "--data", str(c.jsonl('{"image": "ok.png", "prompt": 7}')),
        "-o", str(c.tmp / "r.json")], ("line 1", "'prompt'"), "r.json"),
    "calib/data-bad-utf8": Case("calib-mllm", lambda c: [
        "--model", str(c.model), "--method", "vtw", "--data", str(c.write("data.jsonl", b'{"image": "\xc3\x28"}\n')),
        "-o", str(c.tmp / "r.json")], ("cannot read", "data.jsonl"), "r.json"),
    "calib/data-empty": Case("calib-mllm", lambda c: ["--model", str(c.model), "--method", "vtw", "--data",
                                                      str(c.write("data.jsonl", "\n\n")), "-o", str(c.tmp / "r.json")],
                             ("holds no usable samples",), "r.json"),
    "calib/data-image-is-text": Case("calib-mllm", lambda c: [
        "--model", str(c.model), "--method", "vtw", "--data",
        str((c.write("notes.png", "hello"), c.jsonl('{"image": "notes.png", "prompt": "q"}'))[1]),
        "-o", str(c.tmp / "r.json")], ("notes.png", "not a recognised image"), "r.json"),
    "calib/data-image-bomb": Case("calib-mllm", lambda c: [
        "--model", str(c.model), "--method", "vtw", "--data",
        str((c.write("bomb.png", _png_header(BOMB_SIDE, BOMB_SIDE)), c.jsonl('{"image": "bomb.png", "prompt": "q"}'))[1]),
        "-o", str(c.tmp / "r.json")], ("bomb.png", "decompression bomb"), "r.json"),
    # ---- export-mllm ---------------------------------------------------------------------------------------
    "export/opset": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"), "--opset", "12"],
                         ("--opset",), "b"),
    "export/trt-version": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"),
                                                         "--check-trt", "9.9"], ("9.9", "known versions"), "b"),
    "export/recipe-missing": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"), "--recipe",
                                                            str(c.tmp / "r.json")], ("recipe file not found",), "b"),
    "export/recipe-other-model": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"),
                                                                "--recipe", str(c.recipe(model=c.other_model))],
                                      ("does not match the model", "fingerprint"), "b"),
    "export/max-memory-unparsable": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"),
                                                                   "--max-memory", "lots"], ("--max-memory", "'lots'"), "b"),
    "export/max-memory-zero": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"),
                                                             "--max-memory", "0"], ("--max-memory", "at least one byte"), "b"),
    "export/max-memory-exceeded": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.tmp / "b"),
                                                                 "--max-memory", "1MB"],
                                       ("needs an estimated", "more than --max-memory 1MB"), "b"),
    "export/geometry-preset": Case("export-mllm", lambda c: ["--model", "llava-1.5-7b-shape", "-o", str(c.tmp / "b")],
                                   ("geometry preset",), "b"),
    "export/output-is-file": Case("export-mllm", lambda c: ["--model", str(c.model), "-o", str(c.write("b", "x"))],
                                  ("already exists",)),
    # ---- run-mllm: bundle integrity --------------------------------------------------------------------------
    "run/bundle-is-file": Case("run-mllm", _run_bundle(lambda c: c.write("b.zip", "PK")), ("bundle directory not found",)),
    "run/no-manifest": Case("run-mllm", _run_bundle(lambda c: c.tmp), ("has no manifest.json",)),
    "run/weights-truncated": Case("run-mllm", _run_bundle(lambda c: (_truncate(c.bundle() / "weights.bin"), c.bundle())[1]),
                                  ("weights.bin", "sha256")),
    "run/graph-byte-altered": Case("run-mllm", _run_bundle(lambda c: (_flip_byte(c.bundle() / "prefill.onnx", 200),
                                                                      c.bundle())[1]), ("prefill.onnx", "sha256")),
    "run/tokenizer-deleted": Case("run-mllm", _run_bundle(lambda c: ((c.bundle() / "tokenizer" / "tokenizer.json").unlink(),
                                                                     c.bundle())[1]),
                                  ("tokenizer/tokenizer.json", "missing")),
    "run/manifest-truncated": Case("run-mllm", _run_bundle(lambda c: (_truncate(c.bundle() / "manifest.json"), c.bundle())[1]),
                                   ("manifest.json", "not valid JSON")),
    "run/manifest-schema": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(_set(("schema",), "mllm-deploy/bundle@2"))),
                                ("bundle@2", "expected")),
    "run/manifest-unhashed-graph": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        lambda m: m["files"].pop("decode.onnx"))), ("no sha256 for decode.onnx",)),
    "run/manifest-path-escape": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        _set(("graphs", "vision", "file"), "../../etc/passwd"))), ("graphs.vision.file", "../../etc/passwd")),
    "run/manifest-layers-string": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        _set(("model", "text", "num_layers"), "4"))), ("model.text.num_layers",)),
    "run/manifest-dtype": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(_set(("dtype",), "bfloat16"))),
                               ("dtype", "bfloat16")),
    "run/manifest-input-renamed": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        _set(("graphs", "decode", "inputs", 1, "name"), "positions"))), ("'decode'", "position_ids")),
    "run/manifest-recipe-layers": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        _set(("recipe", "visual_tokens"), [64, 64]))), ("recipe", "visual_tokens has 2 entries")),
    "run/manifest-shape-vs-graph": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        _set(("graphs", "vision", "inputs", 0, "shape"), [1, 3, 99, 99]))), ("vision.onnx", "pixel_values", "manifest.json")),
    "run/manifest-image-config": Case("run-mllm", _run_bundle(lambda c: c.edit_manifest(
        _set(("image", "crop_size"), {"height": -3, "width": 56}))), ("manifest.json image", "crop_size")),
    # ---- run-mllm: image, prompt and limits ------------------------------------------------------------------
    "run/image-is-text": Case("run-mllm", lambda c: _run(c, "--image", str(c.write("photo.jpg", "not a jpeg"))),
                              ("photo.jpg", "not a recognised image")),
    "run/image-truncated": Case("run-mllm", lambda c: _run(c, "--image", str(_truncated_png(c))), ("cut.png",)),
    "run/image-empty-file": Case("run-mllm", lambda c: _run(c, "--image", str(c.write("zero.png", b""))), ("zero.png",)),
    "run/image-is-directory": Case("run-mllm", lambda c: _run(c, "--image", str(c.tmp)), ("is a directory",)),
    "run/image-bomb": Case("run-mllm", lambda c: _run(c, "--image", str(c.write("bomb.png", _png_header(10_000, 10_000)))),
                           ("bomb.png", "10000x10000", "decompression bomb")),
    "run/image-zero-width": Case("run-mllm", lambda c: _run(c, "--image", str(c.write("flat.png", _png_header(0, 10)))),
                                 ("flat.png",)),
    "run/image-name-too-long": Case("run-mllm", lambda c: _run(c, "--image", str(c.tmp / ("x" * 5000 + ".png"))),
                                    ("File name too long",)),
    "run/chat-prompt-with-placeholder": Case("run-mllm", lambda c: [str(c.bundle_src), "--image", str(c.image),
                                                                    "--prompt", "look: <image>"], ("<image>", "found 2")),
    "run/max-new-tokens-zero": Case("run-mllm", lambda c: _run(c, "--max-new-tokens", "0"), ("--max-new-tokens",)),
    "run/context-exceeded": Case("run-mllm", lambda c: _run(c, "--max-new-tokens", "100000"),
                                 ("plus --max-new-tokens (100000)", "context of 2048 positions")),
    "run/max-memory-exceeded": Case("run-mllm", lambda c: _run(c, "--max-memory", "64KiB"),
                                    ("needs an estimated", "weights", "KV cache", "more than --max-memory 64KiB")),
    "run/max-memory-unparsable": Case("run-mllm", lambda c: _run(c, "--max-memory", "4XB"), ("--max-memory", "'4XB'")),
    "run/top-p": Case("run-mllm", lambda c: _run(c, "--top-p", "0"), ("--top-p",)),
    "run/temperature": Case("run-mllm", lambda c: _run(c, "--temperature", "-1"), ("--temperature",)),
    # ---- eval-mllm ----------------------------------------------------------------------------------------------
    "eval/dataset-missing": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset", str(c.tmp / "q.jsonl"),
                                                         "--json", str(c.tmp / "e.json")],
                                 ("evaluation data not found",), "e.json"),
    "eval/dataset-split": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset", "shapes-vqa:holdout",
                                                       "--json", str(c.tmp / "e.json")], ("'holdout'",), "e.json"),
    "eval/dataset-count-zero": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset", "shapes-vqa:0",
                                                            "--json", str(c.tmp / "e.json")],
                                    ("count must be at least 1",), "e.json"),
    "eval/jsonl-no-answer": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset",
                                                         str(c.jsonl('{"image": "ok.png", "question": "q"}')),
                                                         "--json", str(c.tmp / "e.json")],
                                 ("line 1", "answer"), "e.json"),
    "eval/jsonl-image-missing": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset",
                                                             str(c.jsonl('{"image": "no.png", "question": "q", "answer": "a"}')),
                                                             "--json", str(c.tmp / "e.json")],
                                     ("image not found", "no.png"), "e.json"),
    "eval/jsonl-bad-utf8": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset",
                                                        str(c.write("q.jsonl", b"\xff\xff\n")), "--json", str(c.tmp / "e.json")],
                                ("q.jsonl", "UTF-8"), "e.json"),
    "eval/altered-bundle": Case("eval-mllm", lambda c: [str((_truncate(c.bundle() / "vision.onnx"), c.bundle())[1]),
                                                        "--dataset", "shapes-vqa:2", "--json", str(c.tmp / "e.json")],
                                ("vision.onnx", "sha256"), "e.json"),
    "eval/max-new-tokens": Case("eval-mllm", lambda c: [str(c.bundle_src), "--dataset", "shapes-vqa:2",
                                                        "--max-new-tokens", "0", "--json", str(c.tmp / "e.json")],
                                ("--max-new-tokens",), "e.json"),
    # ---- bench-mllm ---------------------------------------------------------------------------------------------
    "bench/new-tokens": Case("bench-mllm", lambda c: [str(c.bundle_src), "--new-tokens", "1", "--json", str(c.tmp / "b.json")],
                             ("--new-tokens",), "b.json"),
    "bench/repeats": Case("bench-mllm", lambda c: [str(c.bundle_src), "--repeats", "0", "--json", str(c.tmp / "b.json")],
                          ("--repeats",), "b.json"),
    "bench/prompt-tokens": Case("bench-mllm", lambda c: [str(c.bundle_src), "--prompt-tokens", "-3",
                                                         "--json", str(c.tmp / "b.json")], ("--prompt-tokens",), "b.json"),
    "bench/missing-bundle": Case("bench-mllm", lambda c: [str(c.tmp / "gone"), "--json", str(c.tmp / "b.json")],
                                 ("bundle directory not found",), "b.json"),
    # ---- report-mllm --------------------------------------------------------------------------------------------
    "report/results-missing": Case("report-mllm", lambda c: [str(c.tmp / "r.json"), "-o", str(c.tmp / "rep")],
                                   ("results file not found",), "rep"),
    "report/results-not-json": Case("report-mllm", lambda c: [str(c.write("r.json", "nope")), "-o", str(c.tmp / "rep")],
                                    ("r.json", "not valid JSON"), "rep"),
    "report/results-schema": Case("report-mllm", lambda c: [str(c.write("r.json", '{"schema": "x"}')), "-o", str(c.tmp / "rep")],
                                  ("schema 'x'",), "rep"),
    "report/results-empty": Case("report-mllm", lambda c: [str(c.write("r.json", '{"schema": "mllm-deploy/eval@1", "results": []}')),
                                                           "-o", str(c.tmp / "rep")], ("holds no results",), "rep"),
    "report/results-missing-fields": Case("report-mllm", lambda c: [str(c.write(
        "r.json", '{"schema": "mllm-deploy/eval@1", "results": [{"bundle": "b"}]}')), "-o", str(c.tmp / "rep")],
        ("result 0 lacks", "accuracy"), "rep"),
    "report/results-wrong-types": Case("report-mllm", lambda c: [str(_bad_bench(c)), "-o", str(c.tmp / "rep")],
                                       ("bench.json", "malformed"), "rep"),
    "report/dtype-bytes": Case("report-mllm", lambda c: [str(_bad_bench(c)), "-o", str(c.tmp / "rep"),
                                                         "--device-dtype-bytes", "3"], ("--device-dtype-bytes",), "rep"),
    # ---- demo-mllm -----------------------------------------------------------------------------------------------
    "demo/budget": Case("demo-mllm", lambda c: ["--workdir", str(c.tmp / "demo"), "--budget", "1.5"],
                        ("--budget 1.5", "between 0 and 1"), "demo"),
    "demo/questions": Case("demo-mllm", lambda c: ["--workdir", str(c.tmp / "demo"), "--questions", "0"],
                           ("--questions 0", "at least 1"), "demo"),
    "demo/scene-not-evaluated": Case("demo-mllm", lambda c: ["--workdir", str(c.tmp / "demo"), "--questions", "10",
                                                            "--scene", "10"], ("--scene 10", "0 to 9"), "demo"),
    "demo/missing-model": Case("demo-mllm", lambda c: ["--workdir", str(c.tmp / "demo"), "--model", str(c.tmp / "nope")],
                               ("nope", "neither a directory"), "demo"),
    # ---- check-trt-mllm -----------------------------------------------------------------------------------------
    "trt/version": Case("check-trt-mllm", lambda c: [str(c.bundle_src), "--trt", "7.0"], ("7.0", "known versions")),
    "trt/missing-bundle": Case("check-trt-mllm", lambda c: [str(c.tmp / "gone"), "--trt", "10.3"], ("gone", "not found")),
    "trt/graph-garbage": Case("check-trt-mllm", lambda c: [str(_garbage_graph(c)), "--trt", "10.3"],
                              ("decode.onnx", "ONNX")),
}


@pytest.fixture(scope="module")
def shared(tiny_bundles, tiny_model_dirs):
    return tiny_bundles["gqa56"], tiny_model_dirs["gqa56"], tiny_model_dirs["gqa70"]


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 50
    assert len({case.tool for case in CASES.values()}) >= 8


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, shared, tmp_path):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(work, *shared)
    argv = case.argv(ctx)
    before = set(work.rglob("*"))
    proc = run_cli(case.tool, *argv)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{case.tool}: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == ""
    if case.output is not None:
        out = work / case.output
        assert not out.exists(), f"{out} was left behind"
        leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        assert not leftovers, f"temporary files left behind: {leftovers}"
    assert set(work.rglob("*")) <= before, "the command wrote files"
