"""A loaded bundle ready to answer questions about images: preprocess, prompt, generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mllm_deploy.core.errors import MllmError
from mllm_deploy.runtime.bundle import Bundle, load_bundle
from mllm_deploy.runtime.generator import Generation, Generator
from mllm_deploy.runtime.prompt import PromptBuilder, TextStreamer
from mllm_deploy.runtime.sampling import SamplingConfig


@dataclass
class Answer:
    text: str
    generation: Generation

    def to_dict(self) -> dict:
        g = self.generation
        return {"text": self.text, "tokens": g.tokens, "prompt_tokens": g.prompt_tokens,
                "stop_reason": g.stop_reason, "timings": g.timings.to_dict()}


class Pipeline:
    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", **backend_options):
        from mllm_deploy.runtime.preprocess import ImagePreprocessConfig

        self.bundle = bundle
        self.prompt = PromptBuilder.from_bundle(bundle)
        self.image_config = ImagePreprocessConfig.from_dict(bundle.manifest["image"])
        self.generator = Generator(bundle, backend, **backend_options)
        self.generator.__enter__()

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", **backend_options) -> "Pipeline":
        return cls(load_bundle(path), backend, **backend_options)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.generator.close()

    def input_ids(self, prompt: str | None = None, raw_prompt: str | None = None):
        if (prompt is None) == (raw_prompt is None):
            raise MllmError("give exactly one of a chat prompt or a raw prompt")
        if raw_prompt is not None:
            return self.prompt.encode(raw_prompt, from_chat_template=False)
        return self.prompt.encode(self.prompt.render_chat(prompt))

    def pixel_values(self, image):
        import numpy as np

        from mllm_deploy.runtime.preprocess import load_image, preprocess

        if isinstance(image, np.ndarray):  # already preprocessed [1, 3, H, W]
            return image
        if isinstance(image, (str, Path)):
            image = load_image(image)
        return preprocess(image, self.image_config)

    def ask(
        self,
        image,
        prompt: str | None = None,
        raw_prompt: str | None = None,
        max_new_tokens: int = 32,
        sampling: SamplingConfig = SamplingConfig(),
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        if max_new_tokens < 1:
            raise MllmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        ids = self.input_ids(prompt, raw_prompt)
        pixels = self.pixel_values(image)
        streamer = TextStreamer(self.prompt)

        def on_token(token: int) -> None:
            delta = streamer.push(token)
            if delta and on_text is not None:
                on_text(delta)

        generation = self.generator.generate(ids, pixels, max_new_tokens, sampling, on_token)
        return Answer(text=self.prompt.decode(generation.tokens), generation=generation)
