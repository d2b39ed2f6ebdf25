"""The OpenAI chat-completions request as pydantic models, the OpenAI error shape, and the turn of a request's
messages into the conversation the bundle's chat template renders.

Unknown fields are ignored (clients send many we have no use for), but fields that would change the answer
and that this server cannot honour (n > 1, tools, logprobs, penalties, JSON mode) are refused by name rather
than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request refused or failed with an HTTP status; the handler answers ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": " ".join(message.split()), "type": kind,
                      "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (as vLLM's): 0 means no limit
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM's): generate exactly max_tokens (load tests)
    # accepted only at the values that change nothing
    n: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None


def parse_chat_request(payload: Any) -> ChatRequest:
    """The validated request; schema problems are 422 naming the field, unsupported options 400."""
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(payload).__name__}")
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        # of a union's failed branches, the one that got deepest into the value says most ("Input tag 'audio' ...
        # does not match", rather than "Input should be a valid string")
        worst = max(exc.errors(), key=lambda e: len(e["loc"]))
        # drop pydantic's branch labels ("list[...]", "str") from the location: the client's field path only
        where = ".".join(str(p) for p in worst["loc"] if not (isinstance(p, str) and ("[" in p or p == "str")))
        raise ApiError(422, f"{where}: {worst['msg']}", param=where or None) from None
    _refuse_unsupported(request)
    return request


def _refuse_unsupported(request: ChatRequest) -> None:
    unsupported = {
        "n": request.n not in (None, 1),
        "logprobs": bool(request.logprobs),
        "tools": bool(request.tools) or bool(request.functions),
        "response_format": request.response_format not in (None, {"type": "text"}),
        "frequency_penalty": request.frequency_penalty not in (None, 0, 0.0),
        "presence_penalty": request.presence_penalty not in (None, 0, 0.0),
        "logit_bias": bool(request.logit_bias),
    }
    for name, refused in unsupported.items():
        if refused:
            raise ApiError(400, f"{name} is not supported by this server (one answer per request, plain text, no"
                                " tool calls, log-probabilities or penalties)", param=name,
                           code="unsupported_parameter")
    stops = stop_strings(request)
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")


def stop_strings(request: ChatRequest) -> tuple[str, ...]:
    if request.stop is None:
        return ()
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)


@dataclass
class Conversation:
    """The request's messages as the chat template takes them, and where its one image comes from."""
    messages: list[dict]
    image_url: str
    texts: list[str] = field(default_factory=list)  # every text part, for the tokenizer's vocabulary check


def conversation(request: ChatRequest) -> Conversation:
    """OpenAI messages -> Hugging Face template messages. The bundle's model sees exactly one image: it must be
    in a user message, and is placed first in that message (as run-mllm places it), the text parts after it in
    their order. System (and "developer") messages and earlier assistant turns go to the template as they are;
    the last message must be the user's, since the answer follows it."""
    out, images, texts = [], [], []
    for index, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            raise ApiError(400, f"messages.{index} has no content (tool calls are not supported)",
                           param=f"messages.{index}.content")
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content: list[dict] = []
        for part in parts:
            if isinstance(part, ImagePart):
                if role != "user":
                    raise ApiError(400, f"messages.{index}: images are accepted in user messages only",
                                   param=f"messages.{index}.content")
                images.append(part.image_url.url)
                content.insert(0, {"type": "image"})
            else:
                content.append({"type": "text", "text": part.text})
                texts.append(part.text)
        out.append({"role": role, "content": content})
    if len(images) != 1:
        raise ApiError(400, f"this model takes exactly one image per request (an image_url part), found {len(images)}",
                       param="messages")
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (the answer follows it)", param="messages")
    return Conversation(out, images[0], texts)
