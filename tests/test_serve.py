"""serve-mllm (issue 23): the real server in a subprocess, talked to with the official openai client and httpx.

Answers equal run-mllm's tokens for the same image, prompt and seed (plain and streamed); bad requests get
their status in OpenAI's error shape and the next request still gets the same tokens; a client that leaves
mid-stream frees the model; a full queue answers 429 while every accepted request completes; SIGTERM exits 0
within the deadline. The main server runs with torch and transformers unimportable.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import VENV_BIN, make_image, run_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-0123456789"
PROMPT = "What is in the image?"


class ServerProcess:
    """`serve-mllm ... --port 0` in a subprocess; its stderr is drained by a thread (kept for failure messages)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([str(VENV_BIN / "serve-mllm"), *args, "--port", "0"], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        ready = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(90) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError(f"serve-mllm did not start: {''.join(self.lines)[-2000:]}")
        self.url = re.search(r"at (http://\S+)/v1", "".join(self.lines)).group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
        return float(match.group(1)) if match else 0.0


def unimportable(root: Path, *names: str) -> Path:
    """A folder to put first on PYTHONPATH: importing any of ``names`` fails as if it were not installed."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ModuleNotFoundError('No module named {name}', name={name!r})\n")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "images"
    allowed.mkdir()
    image = make_image(allowed / "scene.png", seed=11)
    (root / "key.txt").write_text(KEY + "\n")
    blocked = unimportable(root / "blocked", "torch", "transformers")  # for the server process
    return {"root": root, "allowed": allowed, "image": image, "key": root / "key.txt", "blocked": blocked,
            "data_url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()}


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["gqa56"]


@pytest.fixture(scope="module")
def server(bundle, files):
    srv = ServerProcess(str(bundle), "--api-key-file", str(files["key"]), "--allow-file-dir", str(files["allowed"]),
                        "--max-new-tokens-limit", "1900", "--max-image-bytes", "1MiB",
                        env={"PYTHONPATH": str(files["blocked"])})
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(bundle, files):
    """run-mllm --json's greedy answer: the tokens every plain request below must reproduce."""
    proc = run_cli("run-mllm", str(bundle), "--image", str(files["image"]), "--prompt", PROMPT,
                   "--max-new-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def question(url: str, text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def greedy(client, files, bundle, **extra):
    return client.chat.completions.create(model=bundle.name, messages=question(files["data_url"]), max_tokens=24,
                                          temperature=0, **extra)


def assert_still_answers(client, files, bundle, reference) -> None:
    """After a refused or broken request, a normal one gets run-mllm's tokens."""
    assert greedy(client, files, bundle).choices[0].token_ids == reference["tokens"]


def post(server, body, key: str | None = KEY, timeout: float = 60, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **headers, **kwargs.pop("headers", {})}, **kwargs)


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# ---- answers ------------------------------------------------------------------------------
def test_models_lists_the_bundle_its_recipe_and_backend(client, bundle):
    models = client.models.list().data
    assert [m.id for m in models] == [bundle.name]
    card = models[0]
    assert card.backend == "onnxruntime" and card.recipe["method"] == "dense"
    assert card.recipe["visual_tokens_kept"] == [64, 64, 64, 64]
    assert client.models.retrieve(bundle.name).id == bundle.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_plain_answer_equals_run_mllm(client, files, bundle, reference):
    answer = greedy(client, files, bundle)
    choice = answer.choices[0]
    assert choice.token_ids == reference["tokens"]
    assert choice.message.content == reference["text"]
    assert choice.finish_reason == ("stop" if reference["stop_reason"] == "eos" else "length")
    # prompt_tokens: the text tokens plus every visual token the vision encoder makes, as run-mllm counts them
    assert answer.usage.prompt_tokens == reference["prompt_tokens"]
    assert answer.usage.completion_tokens == len(reference["tokens"])
    assert answer.usage.total_tokens == reference["prompt_tokens"] + len(reference["tokens"])


def test_streamed_answer_equals_run_mllm(client, files, bundle, reference):
    stream = greedy(client, files, bundle, stream=True, stream_options={"include_usage": True})
    tokens, text, finish, usage = [], "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            tokens += choice.token_ids
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert tokens == reference["tokens"] and text == reference["text"]
    assert finish == ("stop" if reference["stop_reason"] == "eos" else "length")
    assert usage.prompt_tokens == reference["prompt_tokens"] and usage.completion_tokens == len(tokens)


def test_seeded_sampling_from_a_file_url_equals_the_pipeline(client, files, bundle):
    from mllm_deploy.runtime.pipeline import Pipeline
    from mllm_deploy.runtime.sampling import SamplingConfig

    with Pipeline.load(bundle) as pipe:
        expected = pipe.ask(files["image"], prompt=PROMPT, max_new_tokens=16,
                            sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=7)).generation.tokens
    url = (files["allowed"] / "scene.png").as_uri()
    answers = [client.chat.completions.create(model=bundle.name, messages=question(url), max_tokens=16,
                                              temperature=0.8, top_p=0.9, seed=7).choices[0].token_ids
               for _ in range(2)]
    assert answers == [expected, expected]


def test_a_stop_string_ends_the_answer_before_it(client, files, bundle, reference):
    text = reference["text"]
    at = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalnum())
    stop = text[at:at + 2]
    plain = greedy(client, files, bundle, stop=[stop, "never-there"]).choices[0]
    assert plain.message.content == text[:text.find(stop)] and plain.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy(client, files, bundle, stop=stop, stream=True)
                       if c.choices)
    assert streamed == plain.message.content


def test_system_message_and_earlier_turns_go_through_the_chat_template(client, files, bundle):
    from mllm_deploy.runtime.pipeline import Pipeline

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": files["data_url"]}},
                                             {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": "And its colour?"}]
    answer = client.chat.completions.create(model=bundle.name, messages=messages, max_tokens=8, temperature=0)
    template = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]
    with Pipeline.load(bundle) as pipe:
        ids = pipe.prompt.encode(pipe.prompt.render_messages(template))
        expected = pipe.generator.generate(ids, pipe.pixel_values(files["image"]), 8).tokens
    assert answer.usage.prompt_tokens == ids.shape[1] and answer.choices[0].token_ids == expected


# ---- faults ---------------------------------------------------------------------------------
def test_malformed_json_is_400(server, client, files, bundle, reference):
    error = assert_error(post(server, b'{"model": "x", "messages": [}'), 400)
    assert "JSON" in error["message"] and error["type"] == "invalid_request_error"
    assert_error(post(server, {"model": bundle.name, "messages": "hi"}), 422)
    assert_still_answers(client, files, bundle, reference)


def test_wrong_api_key_is_401_without_saying_which_part_failed(server, client, files, bundle, reference):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=bundle.name, messages=question(files["data_url"]), max_tokens=2)
    assert caught.value.status_code == 401
    bodies = {post(server, {}, key=None).text, post(server, {}, key="wrong").text, post(server, {}, key=KEY + "x").text,
              post(server, {}, key=None, headers={"Authorization": f"Basic {KEY}"}).text}
    assert len(bodies) == 1 and json.loads(bodies.pop())["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open to probes
    assert_still_answers(client, files, bundle, reference)


def png_bomb(side: int = 10_000) -> bytes:
    """A valid {side}x{side} 1-bit PNG of zeros: ~12 KB that would decode to 100 MP (300 MB as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress((b"\0" * (1 + (side + 7) // 8)) * side, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_a_100_megapixel_image_is_refused_before_decoding(server, client, files, bundle, reference):
    bomb = "data:image/png;base64," + base64.b64encode(png_bomb()).decode()
    start = time.perf_counter()
    response = post(server, {"model": bundle.name, "messages": question(bomb), "max_tokens": 2})
    error = assert_error(response, 413)
    assert "10000x10000" in error["message"] and "before decoding" in error["message"]
    assert time.perf_counter() - start < 2.0  # decoding it would take seconds and 300 MB
    assert_still_answers(client, files, bundle, reference)


def test_image_and_body_size_limits_are_413(server, client, files, bundle, reference):
    big = "data:image/png;base64," + base64.b64encode(b"\0" * (1536 * 1024)).decode()  # 1.5 MiB > --max-image-bytes
    error = assert_error(post(server, {"model": bundle.name, "messages": question(big)}), 413)
    assert "--max-image-bytes" in error["message"]
    huge = json.dumps({"model": bundle.name, "messages": question("data:,"), "pad": "x" * (3 * 2**20)}).encode()
    assert "--max-body-bytes" in assert_error(post(server, huge), 413)["message"]
    assert_still_answers(client, files, bundle, reference)


def test_an_http_image_url_is_refused_naming_http(client, files, bundle, reference):
    for url in ("http://127.0.0.1:9/a.png", "https://example.com/a.png"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=bundle.name, messages=question(url), max_tokens=2)
        assert caught.value.status_code == 400 and "http(s) are never fetched" in caught.value.message
    assert_still_answers(client, files, bundle, reference)


def test_other_refusals(server, client, files, bundle, reference):
    outside = files["root"] / "key.txt"
    cases = [
        ({"messages": question(outside.as_uri())}, 400, "--allow-file-dir"),  # a file outside the allowed directory
        ({"messages": question((files["allowed"] / "missing.png").as_uri())}, 400, "not found"),
        ({"messages": [{"role": "user", "content": "no image"}]}, 400, "exactly one image"),
        ({"messages": question(files["data_url"]) + question(files["data_url"])}, 400, "exactly one image"),
        ({"messages": question(files["data_url"], "<image> twice")}, 400, "exactly once"),
        ({"messages": question("data:image/png;base64,AAAA")}, 400, "format"),
        ({"messages": question(files["data_url"], "describe " * 100), "max_tokens": 1900}, 400, "context"),
        ({"messages": question(files["data_url"]), "n": 2}, 400, "n is not supported"),
        ({"messages": question(files["data_url"]), "temperature": -1}, 422, "temperature"),
        ({"messages": question(files["data_url"]), "model": "other"}, 404, "does not exist"),
    ]
    for body, status, words in cases:
        error = assert_error(post(server, {"model": bundle.name, **body}), status)
        assert words in error["message"], (body, error)
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 404)
    assert_still_answers(client, files, bundle, reference)


def assert_cancelled_early(server, cancelled: float, generated: float) -> None:
    deadline = time.time() + 10
    while server.metric('mllm_generations_total{outcome="cancelled"}') == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric('mllm_generations_total{outcome="cancelled"}') == cancelled + 1
    assert server.metric("mllm_generated_tokens_total") - generated < 1800  # stopped well before the end
    assert server.metric("mllm_requests_running") == 0 and server.metric("mllm_queue_depth") == 0


def test_a_client_leaving_mid_stream_frees_the_model_at_the_next_token(server, client, files, bundle, reference):
    body = {"model": bundle.name, "messages": question(files["data_url"]), "max_tokens": 1800, "ignore_eos": True,
            "temperature": 0, "stream": True}
    cancelled = server.metric('mllm_generations_total{outcome="cancelled"}')
    generated = server.metric("mllm_generated_tokens_total")
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first piece of text: leave
    assert_cancelled_early(server, cancelled, generated)
    assert_still_answers(client, files, bundle, reference)


def test_a_client_leaving_a_plain_request_frees_the_model_too(server, client, files, bundle, reference):
    cancelled = server.metric('mllm_generations_total{outcome="cancelled"}')
    generated = server.metric("mllm_generated_tokens_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes) before 1800 tokens can be ready
        post(server, {"model": bundle.name, "messages": question(files["data_url"]), "max_tokens": 1800,
                      "ignore_eos": True, "temperature": 0}, timeout=0.3)
    assert_cancelled_early(server, cancelled, generated)
    assert_still_answers(client, files, bundle, reference)


# ---- the queue and shutdown, on servers of their own ------------------------------------------
def long_request(url: str, data_url: str, model: str, tokens: int, stream: bool = False) -> httpx.Response | dict:
    body = {"model": model, "messages": question(data_url), "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_a_full_queue_answers_429_and_every_accepted_request_completes(bundle, files):
    srv = ServerProcess(str(bundle), "--max-queue", "2", "--max-new-tokens-limit", "1500")
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(long_request, srv.url, files["data_url"], bundle.name, 1500) for _ in range(8)]
            time.sleep(0.3)
            start = time.perf_counter()
            health = httpx.get(f"{srv.url}/health", timeout=10)  # the event loop answers while the model works
            health_seconds = time.perf_counter() - start
            responses = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
        for r in responses:
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 1500
                assert r.json()["choices"][0]["finish_reason"] == "length"
            else:
                assert int(r.headers["Retry-After"]) >= 1
                assert assert_error(r, 429)["type"] == "rate_limit_error"
        assert health.status_code == 200 and health.json()["running"] and health_seconds < 1.0
        assert srv.metric("mllm_rejected_total") == statuses.count(429)
    finally:
        assert srv.stop() == 0, "".join(srv.lines)


def read_stream(response: httpx.Response, first: threading.Event) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append("DONE" if line == "data: [DONE]" else json.loads(line[6:]))
            if any(e != "DONE" and e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[-1:]):
                first.set()
    return events


def streams_during_sigterm(srv: ServerProcess, files, model: str, tokens: list[int]) -> tuple[list, float, int]:
    """Start a stream per entry of ``tokens``, SIGTERM the server once the first streams text; each stream's
    events, the seconds from SIGTERM to the exit, and the exit status."""
    first = threading.Event()

    def one(n: int):
        body = {"model": model, "messages": question(files["data_url"]), "max_tokens": n, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as response:
            return read_stream(response, first)

    try:
        with ThreadPoolExecutor(len(tokens)) as pool:
            futures = [pool.submit(one, n) for n in tokens]
            assert first.wait(30)
            start = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)
            code = srv.proc.wait(30)
            seconds = time.perf_counter() - start
            return [f.result() for f in futures], seconds, code
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_sigterm_lets_a_generation_finish_within_the_deadline(bundle, files):
    srv = ServerProcess(str(bundle), "--shutdown-timeout", "20", "--max-new-tokens-limit", "1500")
    (events,), seconds, code = streams_during_sigterm(srv, files, bundle.name, [1500])
    assert code == 0 and seconds < 20, "".join(srv.lines)
    assert events[-1] == "DONE" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1] if e["choices"]) == 1500


def test_sigterm_cancels_what_the_deadline_does_not_allow_and_exits_0(bundle, files):
    srv = ServerProcess(str(bundle), "--shutdown-timeout", "0.5", "--max-new-tokens-limit", "1800")
    results, seconds, code = streams_during_sigterm(srv, files, bundle.name, [1800] * 4)
    assert code == 0, "".join(srv.lines)
    assert seconds < 0.5 + 4.0  # the deadline, then the worker stops at its next token
    errors = [e for events in results for e in events if e != "DONE" and "error" in e]
    assert errors and all(e["error"]["code"] == "shutting_down" for e in errors)  # 4 x 1800 tokens take longer


# ---- the command and its pieces ----------------------------------------------------------------
def test_without_the_serve_extra_the_error_is_one_line_naming_it(bundle, tmp_path):
    blocked = unimportable(tmp_path, "fastapi", "uvicorn")
    proc = run_cli("serve-mllm", str(bundle), env={"PYTHONPATH": str(blocked)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "mllm-deploy[serve]" in lines[0], proc.stderr


def test_bad_options_are_one_line_errors(bundle, tmp_path):
    (tmp_path / "empty").write_text("\n")
    for args, words in ((["--max-queue", "-1"], "--max-queue"), (["--api-key-file", str(tmp_path / "empty")], "empty"),
                        (["--allow-file-dir", str(tmp_path / "nope")], "not a directory"),
                        (["--max-image-bytes", "lots"], "not a size")):
        proc = run_cli("serve-mllm", str(bundle), *args)
        assert proc.returncode == 1 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_stop_matcher_holds_back_what_may_start_a_stop_string():
    from mllm_deploy.serve.engine import StopMatcher

    matcher = StopMatcher(("END", "xy"))
    assert matcher.push("abc E") == ("abc ", False)  # "E" may begin "END"
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)
    matcher = StopMatcher(("END",))
    assert matcher.push("EN") == ("", False) and matcher.finish("") == ("EN", False)  # the end releases it
    assert StopMatcher(()).push("END") == ("END", False)
