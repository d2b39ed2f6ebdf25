"""A loaded bundle ready to answer questions about images: preprocess, prompt, generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mllm_deploy.core.errors import MllmError
from mllm_deploy.runtime.bundle import Bundle, load_bundle
from mllm_deploy.runtime.generator import Generation, Generator, check_context
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
    """Constructing one reads the tokenizer and the image settings; the inference sessions are
    created on first use (or by :meth:`start`), after the caller had the chance to check the
    request (:meth:`check_request`) against the context and the memory budget."""

    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", **backend_options):
        from mllm_deploy.runtime.backends import runner_class
        from mllm_deploy.formats.image import ImagePreprocessConfig

        runner_class(backend)  # an unknown backend fails now, not at the first request
        self.bundle = bundle
        self.prompt = PromptBuilder.from_bundle(bundle)
        self.image_config = ImagePreprocessConfig.from_dict(bundle.manifest["image"])
        self._backend, self._backend_options = backend, dict(backend_options)
        if backend == "onnxruntime":  # "auto": the faster "packed" when its estimate fits, else "shared"
            self._backend_options.setdefault("weights", "auto")
        self._generator: Generator | None = None

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", **backend_options) -> "Pipeline":
        return cls(load_bundle(path), backend, **backend_options)

    @property
    def weights_mode(self) -> str | None:
        """How the ONNX Runtime sessions hold the weights (runtime/backends/ort.py); None for other backends."""
        return self._backend_options.get("weights")

    def _choose_weights(self, prompt_tokens: int, max_new_tokens: int, max_memory: int | None,
                        available: int | None) -> None:
        """Resolve weights="auto": "packed" (ONNX Runtime pre-packs every session's weights: the fastest, and
        measured at one more resident copy of the text weights) when that estimate fits the budget and the
        memory available, else "shared" (one copy)."""
        from mllm_deploy.core.memory import available_memory

        if self.weights_mode != "auto":
            return
        self._backend_options["weights"] = "packed"
        total = self.memory_estimate(prompt_tokens, max_new_tokens).total
        available = available_memory() if available is None else available
        if (max_memory is not None and total > max_memory) or (available is not None and total > available):
            self._backend_options["weights"] = "shared"

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            if self.weights_mode == "auto":  # no request was checked: size it for a prompt with the image
                self._choose_weights(self.bundle.visual_tokens + 64, 64, None, None)
            generator = Generator(self.bundle, self._backend, **self._backend_options)
            try:
                generator.__enter__()
            except BaseException:  # a failed or interrupted load frees the sessions it made
                generator.close()
                raise
            self._generator = generator
        return self._generator

    def start(self) -> "Pipeline":
        """Create the inference sessions now (they are otherwise created by the first request)."""
        self.generator  # noqa: B018 - the property loads
        return self

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    def memory_estimate(self, prompt_tokens: int, max_new_tokens: int):
        """Weights + KV cache + activations of one request of this length (core/memory.py)."""
        from mllm_deploy.core.memory import runtime_estimate
        from mllm_deploy.formats.geometry import spec_from_manifest

        spec = spec_from_manifest(self.bundle.manifest["model"])
        dtype_bytes = 2 if self.bundle.dtype == "float16" else 4
        kv_tokens = [n + max_new_tokens for n in self.bundle.kv_lengths(prompt_tokens)]
        providers = [p[0] if isinstance(p, tuple) else p for p in self._backend_options.get("providers") or []]
        cpu = self._backend == "onnxruntime" and "CUDAExecutionProvider" not in providers and \
            self._backend_options.get("provider", "cpu") == "cpu"
        packed = 1 if self.weights_mode in ("fast", "packed") else 0  # "auto" is estimated as "shared"
        return runtime_estimate(spec, dtype_bytes, kv_tokens, prompt_tokens, self.bundle.weights_bytes(),
                                float16_on_cpu=cpu, packed_copies=packed, quantized_bytes=self.bundle.quantized_bytes())

    def check_request(self, prompt_tokens: int, max_new_tokens: int, max_memory: int | None = None,
                      available: int | None = None) -> None:
        """Before the sessions are loaded: the context length, then the memory estimate against the
        ``--max-memory`` budget and the ``available`` memory (None: not checked)."""
        from mllm_deploy.core.memory import check_memory

        if max_new_tokens < 1:
            raise MllmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        check_context(prompt_tokens, max_new_tokens, self.bundle.max_positions)
        what = f"running {self.bundle.path.name} ({prompt_tokens} prompt + {max_new_tokens} new tokens)"
        self._choose_weights(prompt_tokens, max_new_tokens, max_memory, available)
        check_memory(self.memory_estimate(prompt_tokens, max_new_tokens), what, max_memory, available)

    def input_ids(self, prompt: str | None = None, raw_prompt: str | None = None, pixels=None):
        """Token ids of the prompt; ``pixels``: a LLaVA-NeXT image (runtime/anyres.AnyresPixels), whose own count
        of visual tokens the image placeholder expands to (LLaVA-1.5: the bundle's fixed count)."""
        if (prompt is None) == (raw_prompt is None):
            raise MllmError("give exactly one of a chat prompt or a raw prompt")
        count = getattr(pixels, "visual_tokens", None)
        if raw_prompt is not None:
            return self.prompt.encode(raw_prompt, from_chat_template=False, visual_tokens=count)
        return self.prompt.encode(self.prompt.render_chat(prompt), visual_tokens=count)

    def pixel_values(self, image):
        import numpy as np

        from mllm_deploy.runtime.preprocess import load_image, preprocess

        from mllm_deploy.runtime.anyres import AnyresPixels, anyres_pixels

        if isinstance(image, (np.ndarray, AnyresPixels)):  # already preprocessed
            return image
        if isinstance(image, (str, Path)):
            image = load_image(image)
        if self.image_config.is_anyres:  # LLaVA-NeXT: views and the packing layout
            return anyres_pixels(image, self.image_config, self.bundle.patch_grid)
        return preprocess(image, self.image_config)

    def ask(
        self,
        image,
        prompt: str | None = None,
        raw_prompt: str | None = None,
        max_new_tokens: int = 32,
        sampling: SamplingConfig = SamplingConfig(),
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Answer:
        if max_new_tokens < 1:
            raise MllmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        pixels = self.pixel_values(image)
        ids = self.input_ids(prompt, raw_prompt, pixels)
        check_context(int(ids.shape[1]), max_new_tokens, self.bundle.max_positions)  # before any session loads
        streamer = TextStreamer(self.prompt)

        def on_token(token: int) -> None:
            delta = streamer.push(token)
            if delta and on_text is not None:
                on_text(delta)

        generation = self.generator.generate(ids, pixels, max_new_tokens, sampling, on_token, ignore_eos=ignore_eos)
        return Answer(text=self.prompt.decode(generation.tokens), generation=generation)
