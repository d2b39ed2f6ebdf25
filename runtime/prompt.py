"""Prompt -> token ids without transformers: the chat template rendered with jinja2 the way
Hugging Face renders it, tokenised with ``tokenizers``, the image placeholder expanded to
the model's number of visual tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from mllm_deploy.core.errors import BundleError, PromptError


def _render_template(template: str, messages: list[dict], special_tokens: dict[str, str]) -> str:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # like HF: no HTML escaping, unlike jinja's built-in filter
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except jinja2.exceptions.TemplateError as exc:
        raise PromptError(f"the bundle's chat template failed to render: {exc}") from None


@dataclass
class PromptBuilder:
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str
    special_tokens: dict[str, str]
    image_token: str
    image_token_id: int
    visual_tokens: int
    templates: tuple[str, ...] = ()  # manifest tokenizer.prompt_templates: the questions a model was trained on

    @classmethod
    def from_bundle(cls, bundle) -> "PromptBuilder":
        from tokenizers import Tokenizer

        info = bundle.manifest["tokenizer"]
        try:
            tokenizer = Tokenizer.from_file(str(bundle.path / info["file"]))
            template = (bundle.path / info["chat_template"]).read_text()
        except (OSError, KeyError, Exception) as exc:  # tokenizers raises plain Exception on bad JSON
            raise BundleError(f"cannot load the bundle's tokenizer: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        model = bundle.manifest["model"]
        return cls(tokenizer, template, dict(info["special_tokens"]), info["image_token"],
                   int(model["image_token_id"]), int(model["visual_tokens"]),
                   tuple(str(t) for t in info.get("prompt_templates") or ()))

    def render_chat(self, user_text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
        return _render_template(self.chat_template, messages, self.special_tokens)

    def render_messages(self, messages: list[dict]) -> str:
        """A whole conversation (system/user/assistant turns, Hugging Face content parts) through the bundle's
        chat template, for serve-mllm; :meth:`render_chat` is the one-question case."""
        return _render_template(self.chat_template, messages, self.special_tokens)

    def off_template(self, text: str) -> bool:
        """Whether a chat prompt matches none of the question templates the bundle's model was trained on (only
        bundles whose model lists some, as shapes-llava does; ``{x}`` in a template is one word)."""
        if not self.templates:
            return False
        words = " ".join(text.split())
        return not any(_template_regex(t).fullmatch(words) for t in self.templates)

    def unknown_words(self, text: str) -> list[str]:
        """The pieces of ``text`` the tokenizer can only spell as its unknown token (a word-level vocabulary, as
        shapes-llava's, meets a word it never saw); empty for byte-fallback tokenizers like Llama's."""
        unk = self.special_tokens.get("unk_token")
        unk_id = self.tokenizer.token_to_id(unk) if unk else None
        if unk_id is None:
            return []
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        words = [text[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets) if token == unk_id]
        return list(dict.fromkeys(w for w in words if w.strip()))

    def encode(self, text: str, from_chat_template: bool = True, visual_tokens: int | None = None) -> np.ndarray:
        """Token ids [1, T] for a prompt holding the image placeholder exactly once, expanded to ``visual_tokens``
        image tokens (default the bundle's count; a LLaVA-NeXT image's own count varies with its size).

        Special tokens follow Hugging Face: a raw prompt is tokenised as the processor does
        (the tokenizer adds BOS); a rendered chat prompt gets none added if it already starts with BOS.
        """
        count = text.count(self.image_token)
        if count != 1:
            raise PromptError(
                f"the prompt must contain the image placeholder {self.image_token} exactly once (found {count})"
            )
        # HF adds special tokens (BOS) unless the rendered prompt already starts with BOS.
        bos = self.special_tokens.get("bos_token")
        add_special = not (from_chat_template and bos and text.startswith(bos))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special).ids
        if ids.count(self.image_token_id) != 1:
            raise PromptError(f"the tokenizer did not keep {self.image_token} as one token; is this the right bundle?")
        at = ids.index(self.image_token_id)
        count = self.visual_tokens if visual_tokens is None else visual_tokens
        expanded = ids[:at] + [self.image_token_id] * count + ids[at + 1:]
        return np.array([expanded], dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStreamer:
    """Turns a growing list of token ids into text increments, holding back incomplete UTF-8."""

    def __init__(self, prompt: PromptBuilder):
        self.prompt = prompt
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.prompt.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def _template_regex(template: str):
    import re

    pieces = re.split(r"(\{[a-z0-9_]+\})", " ".join(template.split()))
    return re.compile("".join(r"\S+?" if re.fullmatch(r"\{[a-z0-9_]+\}", p) else re.escape(p) for p in pieces))
