"""Load test of serve-mllm: a fixed number of requests from a few concurrent clients, bounded in count and time.

    .venv/bin/python benchmarks/serve_load.py [--bundle DIR | --model NAME] [--requests 64] [--concurrency 8]
        [--max-tokens 32] [--stream] [--max-queue 64] [--deadline 600] [--json OUT]

Starts ``serve-mllm BUNDLE --host 127.0.0.1 --port 0`` (default: the built-in ``--model tiny-llava``, exported
into a temporary directory), sends ``--requests`` chat completions from ``--concurrency`` client threads, each
with its own keep-alive connection (one of 8 random images and a random question, greedy, exactly
``--max-tokens`` new tokens through the ``ignore_eos`` extension, so every request costs the same), then stops
the server with SIGTERM.
Only 127.0.0.1 is contacted; no request is sent after ``--deadline`` seconds.

Prints the errors, latency p50 / p95 / max (and time to the first token with ``--stream``), requests/s and
generated tokens/s over the wall time, and the server's own mean prefill and decode step from /metrics. Exits 1
when any request failed (a 429 counts: make ``--max-queue`` at least ``--concurrency``) or the server did not
exit 0.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WORDS = ("what", "colour", "is", "the", "shape", "left", "of", "circle", "square", "how", "many", "are", "there",
         "describe", "image", "red", "blue", "green", "above", "below", "a", "which", "object", "big", "small")


def export_model(model: str, target: Path) -> Path:
    from mllm_deploy.export.llava_export import ExportOptions, export_bundle

    print(f"serve_load: exporting {model} to {target}", file=sys.stderr)
    return export_bundle(model, target, ExportOptions(), log=lambda m: None)


def images(count: int, seed: int) -> list[str]:
    """Random PNGs (random size, colours and rectangles) as data: URLs."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(32, 513, 2))
        image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            draw.rectangle([x, y, x + width // 3, y + height // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def start_server(bundle: Path, max_queue: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    serve = Path(sys.executable).parent / "serve-mllm"
    proc = subprocess.Popen([str(serve), str(bundle), "--host", "127.0.0.1", "--port", "0", "--max-queue",
                             str(max_queue), "--max-new-tokens-limit", str(max_tokens)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write(line)
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if match:
            threading.Thread(target=lambda: [sys.stderr.write(l) for l in proc.stderr], daemon=True).start()
            return proc, match.group(1)
    raise SystemExit(f"serve_load: serve-mllm exited with {proc.wait()} before serving")


def one_request(client, url: str, model: str, image: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                      {"type": "image_url", "image_url": {"url": image}}]}]}
    start = time.perf_counter()
    first = None
    tokens = 0
    if stream:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return {"error": f"{response.status_code} {response.text[:200]}"}
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                for choice in event["choices"]:
                    tokens += len(choice.get("token_ids", []))
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter() - start
    else:
        response = client.post(f"{url}/v1/chat/completions", json=body)
        if response.status_code != 200:
            return {"error": f"{response.status_code} {response.text[:200]}"}
        tokens = response.json()["usage"]["completion_tokens"]
    if tokens != max_tokens:
        return {"error": f"{tokens} tokens instead of {max_tokens}"}
    return {"seconds": time.perf_counter() - start, "first_token": first, "tokens": tokens}


def server_means(url: str) -> dict:
    """Mean prefill and decode step (ms) from the server's histograms."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text

    def value(name):
        match = re.search(rf"^{name} (\S+)$", text, flags=re.M)
        return float(match.group(1)) if match else 0.0

    return {what: 1e3 * value(f"mllm_{what}_seconds_sum") / max(value(f"mllm_{what}_seconds_count"), 1)
            for what in ("prefill", "decode", "queue_wait")}


def load(url: str, model: str, args) -> dict:
    import httpx

    rng = np.random.default_rng(args.seed)
    urls = images(8, args.seed)
    work = [(urls[int(rng.integers(0, len(urls)))], " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))))
            for _ in range(args.requests)]
    lock = threading.Lock()
    deadline = time.monotonic() + args.deadline
    results: list[dict] = []

    def client_thread():
        with httpx.Client(timeout=args.deadline) as client:
            while True:
                with lock:
                    if not work:
                        return
                    image, prompt = work.pop()
                if time.monotonic() > deadline:
                    result = {"error": "not sent: --deadline passed"}
                else:
                    try:
                        result = one_request(client, url, model, image, prompt, args.max_tokens, args.stream)
                    except httpx.HTTPError as exc:
                        result = {"error": f"{type(exc).__name__}: {exc}"}
                with lock:
                    results.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for future in [pool.submit(client_thread) for _ in range(args.concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" in r] == []
    seconds = sorted(r["seconds"] for r in results if "seconds" in r)
    firsts = sorted(r["first_token"] for r in results if r.get("first_token") is not None)

    def pct(values, q):
        return 1e3 * float(np.percentile(values, q)) if values else float("nan")

    return {
        "requests": len(results), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "stream": args.stream, "errors": [r["error"] for r in results if "error" in r], "ok": ok,
        "wall_s": wall, "latency_ms": {"p50": pct(seconds, 50), "p95": pct(seconds, 95), "max": pct(seconds, 100),
                                       "mean": 1e3 * statistics.fmean(seconds) if seconds else float("nan")},
        "first_token_ms": {"p50": pct(firsts, 50), "p95": pct(firsts, 95)} if args.stream else None,
        "requests_per_s": len(seconds) / wall, "tokens_per_s": sum(r.get("tokens", 0) for r in results) / wall,
        "server_ms": server_means(url),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle directory (default: --model exported to a temporary one)")
    p.add_argument("--model", default="tiny-llava", help="built-in model to export when no --bundle is given"
                                                         " (default tiny-llava; shapes-llava is the trained one)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (exactly: ignore_eos)")
    p.add_argument("--stream", action="store_true", help="stream the answers (Server-Sent Events)")
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default 64)")
    p.add_argument("--deadline", type=float, default=600.0, help="send no request after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        p.error("--requests, --concurrency and --max-tokens must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLLM_DEPLOY_CACHE", str(Path(tmp) / "cache"))
        bundle = args.bundle or export_model(args.model, Path(tmp) / args.model)
        method = json.loads((bundle / "manifest.json").read_text())["recipe"]["method"]["name"]
        proc, url = start_server(bundle, args.max_queue, args.max_tokens)
        try:
            result = load(url, bundle.name, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
    result.update({"schema": "mllm-deploy/serve-load@1", "bundle": bundle.name, "method": method,
                   "server_exit": code, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                   "threads": os.environ.get("MLLM_DEPLOY_THREADS")})
    lat, server = result["latency_ms"], result["server_ms"]
    ttft = (f"; first token p50 {result['first_token_ms']['p50']:.1f} ms, p95 {result['first_token_ms']['p95']:.1f} ms"
            if args.stream else "")
    print(f"serve_load: {result['requests']} requests from {args.concurrency} clients, {bundle.name} ({method}),"
          f" {args.max_tokens} new tokens each, {'streamed' if args.stream else 'plain'}")
    print(f"  errors {len(result['errors'])}; latency p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max"
          f" {lat['max']:.1f} ms{ttft}")
    print(f"  {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.1f} generated tokens/s over"
          f" {result['wall_s']:.2f} s; server: prefill {server['prefill']:.2f} ms, decode step {server['decode']:.3f} ms,"
          f" queue wait {server['queue_wait']:.1f} ms (means); server exit {code}")
    for error in result["errors"][:5]:
        print(f"  error: {error}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
