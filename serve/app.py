"""The HTTP routes: POST /v1/chat/completions (plain or Server-Sent Events), GET /v1/models, /health, /metrics.

A request is checked in order of cost, so a bad one is refused before it costs much and never reaches the
model: the API key, the body's size (Content-Length, then as it arrives), JSON, the schema, the model name,
the messages and the image URL's scheme; then it takes a place in the queue (or 429), and only then is its
image read, size-checked from the header and decoded, in a small thread pool, and its prompt tokenised.
Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mllm_deploy.core.errors import MllmError
from mllm_deploy.runtime.sampling import SamplingConfig
from mllm_deploy.serve.engine import Delta, Engine, Failed, Finished, Job, Work
from mllm_deploy.serve.images import ImageLimits, check_url_scheme, decode_image, image_bytes
from mllm_deploy.serve.metrics import Metrics, RequestCounter
from mllm_deploy.serve.protocol import (ApiError, ChatRequest, Conversation, conversation, error_body,
                                        parse_chat_request, stop_strings)

log = logging.getLogger("mllm_deploy.serve")


@dataclass(frozen=True)
class Settings:
    model_name: str
    backend: str
    images: ImageLimits
    max_body_bytes: int
    max_new_tokens_limit: int
    api_key: bytes | None = None
    created: int = 0  # the bundle's export time, as /v1/models' "created"


def create_app(pipe, settings: Settings, metrics: Metrics, engine: Engine) -> FastAPI:
    prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mllm-prepare")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        app.state.worker_stopped = False
        yield
        # uvicorn comes here after the in-flight requests ended (or its own deadline passed)
        app.state.worker_stopped = await asyncio.to_thread(engine.stop, 5.0)
        prep_pool.shutdown(wait=False, cancel_futures=True)
        if app.state.worker_stopped:
            pipe.close()

    app = FastAPI(title="mllm-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):  # FastAPI's own parameter checks
        first = (exc.errors() or [{"loc": (), "msg": "invalid request"}])[0]
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(error_body(422, f"{where}: {first['msg']}", param=where or None), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__})"), status_code=500)

    def authorize(request: Request) -> None:
        """Bearer token, compared in constant time (as digests, so its length does not show either); one answer
        whatever was wrong (the scheme, the token, no header)."""
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
        token_ok = hmac.compare_digest(given, hashlib.sha256(settings.api_key).digest())
        if not (token_ok & (scheme.lower() == "bearer")):
            raise ApiError(401, "invalid or missing API key (send the header Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_card() -> dict:
        bundle = pipe.bundle
        return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "mllm-deploy",
                "bundle": bundle.path.name, "backend": settings.backend, "dtype": bundle.dtype,
                "recipe": {"method": bundle.manifest["recipe"]["method"]["name"],
                           "visual_tokens": bundle.visual_tokens,
                           "visual_tokens_kept": bundle.visual_tokens_per_layer},
                "context_length": bundle.max_positions, "max_new_tokens_limit": settings.max_new_tokens_limit}

    @app.get("/health")
    async def health():
        status = "shutting_down" if engine.closing else "ok"
        return JSONResponse({"status": status, "model": settings.model_name, **engine.snapshot()},
                            status_code=503 if engine.closing else 200)

    @app.get("/metrics")
    async def metrics_text():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id != settings.model_name:
            raise _no_such_model(model_id, settings.model_name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_body(request, settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        chat = parse_chat_request(payload)
        if chat.model != settings.model_name:
            raise _no_such_model(chat.model, settings.model_name)
        conv = conversation(chat)
        check_url_scheme(conv.image_url, settings.images)
        engine.admit()
        try:
            work = await asyncio.get_running_loop().run_in_executor(prep_pool, _prepare, pipe, settings, chat, conv)
            job = engine.submit(work)
        except BaseException:
            engine.withdraw()
            raise
        answer = _Answer(settings.model_name, work.prompt_tokens, pipe.bundle.visual_tokens)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return _JobStream(answer.sse(job, include_usage), engine, job, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(answer, job, engine, request)

    return app


def _no_such_model(asked: str, served: str) -> ApiError:
    return ApiError(404, f"the model {asked!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it is known to pass ``limit``: from Content-Length before reading it, else
    as soon as the bytes read pass it."""
    declared = request.headers.get("content-length")
    too_large = f"more than this server's limit of {limit} bytes (--max-body-bytes)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, {too_large}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is {too_large}", code="body_too_large")
    return bytes(body)


def _prepare(pipe, settings: Settings, chat: ChatRequest, conv: Conversation) -> Work:
    """In the preparation pool: the prompt tokenised (cheap, so first), the image read, checked and
    preprocessed, max_tokens settled against the limit and the context."""
    try:
        ids = pipe.prompt.encode(pipe.prompt.render_messages(conv.messages))
    except MllmError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_prompt") from None
    image = decode_image(image_bytes(conv.image_url, settings.images), settings.images.max_pixels)
    try:
        pixels = pipe.pixel_values(image)
    except Exception as exc:  # an image mode the preprocessing cannot convert
        raise ApiError(400, f"cannot preprocess the image: {exc}", param="messages", code="invalid_image") from None
    finally:
        image.close()
    if getattr(pixels, "visual_tokens", None) is not None:  # LLaVA-NeXT: the image's own count of visual tokens
        ids = pipe.prompt.encode(pipe.prompt.render_messages(conv.messages), visual_tokens=pixels.visual_tokens)
    prompt_tokens, context = int(ids.shape[1]), pipe.bundle.max_positions
    asked = chat.max_completion_tokens or chat.max_tokens
    limit = settings.max_new_tokens_limit
    max_new = min(asked, limit) if asked is not None else min(limit, context - prompt_tokens)
    if max_new < 1 or prompt_tokens + max_new > context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens ({pipe.bundle.visual_tokens} of them the image's);"
                            f" with max_tokens {max(max_new, 1)} that is more than the model's context of {context}",
                       param="max_tokens", code="context_length_exceeded")
    # OpenAI's defaults (temperature 1, top_p 1); the schema already holds the values to SamplingConfig's ranges
    sampling = SamplingConfig(temperature=1.0 if chat.temperature is None else chat.temperature,
                              top_k=chat.top_k or 0, top_p=1.0 if chat.top_p is None else chat.top_p, seed=chat.seed)
    return Work(ids, pixels, max_new, sampling, stop_strings(chat), chat.ignore_eos)


class _Answer:
    """The response bodies of one request: the whole completion, or its chunks."""

    def __init__(self, model: str, prompt_tokens: int, visual_tokens: int):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.prompt_tokens, self.visual_tokens = model, prompt_tokens, visual_tokens

    def usage(self, completion_tokens: int) -> dict:
        """prompt_tokens counts what the model is given: the text tokens plus every visual token the vision
        encoder makes (the recipe drops some of them inside the layers; /v1/models says how many each keeps)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens, "visual_tokens": self.visual_tokens}

    def completion(self, text: str, finished: Finished) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finished.reason,
                  "logprobs": None, "token_ids": finished.token_ids}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(len(finished.token_ids))}

    def chunk(self, delta: dict, finish_reason: str | None = None, token_ids: list[int] | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None,
                  "token_ids": token_ids or []}
        return self._event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [choice]})

    def _event(self, payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"

    async def sse(self, job: Job, include_usage: bool):
        """Server-Sent Events: the role, a chunk per piece of text (with the token ids that made it), the
        finish reason, the usage if asked, then ``data: [DONE]``; an error after the start is one error event."""
        yield self.chunk({"role": "assistant", "content": ""})
        generated = 0
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                generated += len(event.token_ids)
                yield self.chunk({"content": event.text}, token_ids=event.token_ids)
            elif isinstance(event, Finished):
                yield self.chunk({}, finish_reason=event.reason)
                if include_usage:
                    yield self._event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                       "model": self.model, "choices": [], "usage": self.usage(generated)})
                break
            else:
                yield self._event(event.error.body())
                break
        yield "data: [DONE]\n\n"


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job however it ends: finished, the client gone (Starlette cancels
    the body when the client disconnects), or the server shutting down. Cancelling a finished job does nothing."""

    def __init__(self, content, engine: Engine, job: Job, **kwargs):
        super().__init__(content, **kwargs)
        self._engine, self._job = engine, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):  # the client went away while we wrote to it
            pass
        finally:
            self._engine.cancel(self._job)


async def _complete(answer: _Answer, job: Job, engine: Engine, request: Request) -> Response:
    """Wait for the whole answer, watching the connection: a client that leaves frees its place at once."""

    async def collect():
        pieces = []
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return "".join(pieces), event
            elif isinstance(event, Failed):
                raise event.error

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer_task, gone_task = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    client_gone = True
    try:
        await asyncio.wait({answer_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        client_gone = not answer_task.done()
    finally:
        gone_task.cancel()
        engine.cancel(job)
        if client_gone:
            answer_task.cancel()
    if client_gone:
        return Response(status_code=499)  # nobody reads it; counted in the metrics as "client closed request"
    text, finished = answer_task.result()
    return JSONResponse(answer.completion(text, finished))
