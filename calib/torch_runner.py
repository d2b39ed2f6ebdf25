"""The PyTorch reference of a bundle's recipe as a backend (``--backend torch``): the baseline a user of the
research code would have, the Hugging Face modules run layer by layer with the recipe applied
(calib/reference.py's ``RecipeReference``).

Three runners, one per graph, with the graphs' feed and output names and dtypes (the manifest's I/O table,
formats/manifest.py), so the runtime's Generator and its timed loop drive them as they drive onnxruntime
and tensorrt. The three share one ``SharedReference``: the model is loaded at the first ``activate`` (not at
construction, and never at import: torch is imported there too) and freed after the last ``deactivate``.

Device and precision: CUDA in float16 when a GPU is visible (or ``device="cuda"``), else CPU in float32 with
``MLLM_DEPLOY_THREADS`` threads, as onnxruntime. Arrays cross the runner boundary in the bundle's dtypes
(the Generator's KV cache holds them); inside, tensors are in the reference's dtype on its device.

Decode and the static KV buffers. The graph takes each layer's whole buffer ``past.{l}.*`` with
``past_lengths`` and returns only the new entry ``new.{l}.*``. The runner slices the valid part of each
buffer and keeps it as a tensor on its device, the reference's own cache; while it is fed the same host
buffers it copies only the slots it has not seen (between steps the host cache only grows at the end,
runtime/kv.py), so a step costs what the reference's own decode costs, not an upload of the whole cache.
Fresh buffers (a new prefill) are uploaded whole. Its cached entries carry no positions: every one
precedes the decoded token, so the reference's causal mask, the only use of them, masks none.

Prefill returns what the runtime reads (``logits``, ``present.{l}.*``), not a routing graph's
``route.{l}.*`` outputs (the reference keeps no scores; --verify compares those between graph backends).
``image_start`` is implied by ``input_ids``: the reference finds the image run itself.
"""

from __future__ import annotations

from abc import abstractmethod

import os

import numpy as np

from mllm_deploy.core.errors import BundleError, DependencyError
from mllm_deploy.formats.manifest import GRAPHS, new_name, past_name, present_name
from mllm_deploy.runtime.backends.base import NP_DTYPES, Runner


class SharedReference:
    """One ``RecipeReference`` for the runners of one bundle, loaded by the first user, freed by the last."""

    def __init__(self, bundle, device: str | None = None):
        self.bundle = bundle
        self.requested_device = device
        self.users = 0
        self.torch = self.reference = self.device = self.dtype = None

    def acquire(self) -> None:
        if self.users == 0:
            self._load()
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.reference = None

    def _load(self) -> None:
        try:
            import torch
            import transformers  # noqa: F401 - checked here for a clear message
        except ImportError:
            raise DependencyError("--backend torch needs torch and transformers (pip install 'mllm-deploy[export]')"
                                  ) from None
        self.torch = torch
        self.device = self.requested_device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        if not self.is_cuda and os.environ.get("MLLM_DEPLOY_THREADS"):
            torch.set_num_threads(int(os.environ["MLLM_DEPLOY_THREADS"]))  # same thread budget as onnxruntime
        self.reference = self._load_reference()
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats()  # the peak counts the weights, which stay allocated

    def _load_reference(self):
        from mllm_deploy.calib.reference import RecipeReference
        from mllm_deploy.formats.geometry import read_config, spec_from_config
        from mllm_deploy.formats.recipe import Recipe
        from mllm_deploy.models.loading import load_hf_model
        from mllm_deploy.models.registry import resolve_model

        bundle = self.bundle
        source = bundle.manifest.get("source_model")
        if not source:
            raise BundleError(f"{bundle.path} records no source_model; --backend torch needs the Hugging Face model")
        model_dir = resolve_model(source)
        # the weights must be the ones the bundle was exported from, or the baseline measures another model
        if spec_from_config(read_config(model_dir)).fingerprint != bundle.manifest["model"]["fingerprint"]:
            raise BundleError(f"the model at {model_dir} is not the one {bundle.path.name} was exported from"
                              " (config fingerprint differs)")
        model = load_hf_model(model_dir, dtype=self.dtype)
        # base_dir: a mixture-of-depths recipe's router file travels inside the bundle
        recipe = Recipe.from_dict(bundle.manifest["recipe"], base_dir=bundle.path)
        return RecipeReference(model.to(self.device).eval(), recipe)

    @property
    def is_cuda(self) -> bool:
        return self.device is not None and self.device.startswith("cuda")

    def device_facts(self) -> dict:
        torch = self.torch
        return {"device": torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu",
                "run_dtype": "float16" if self.dtype == torch.float16 else "float32",
                "peak_device_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if self.is_cuda else None}


class TorchRunner(Runner):
    """The runner of one graph over a shared reference; ``for_bundle`` makes the three."""

    infer_time_is_backend_time = False  # eager PyTorch: Python dispatch runs inside infer()

    def __init__(self, graph_path, io, name, shared: SharedReference):
        super().__init__(graph_path, io, name)
        self.shared = shared
        self._output_dtypes = {entry["name"]: NP_DTYPES[entry["dtype"]] for entry in io["outputs"]}

    @classmethod
    def for_bundle(cls, bundle, device: str | None = None, **_unused) -> dict[str, Runner]:
        shared = SharedReference(bundle, device)
        runner_of_graph = {"vision": TorchVisionRunner, "prefill": TorchPrefillRunner, "decode": TorchDecodeRunner}
        return {graph: runner_of_graph[graph](bundle.graph_path(graph), bundle.graph_io(graph), graph, shared)
                for graph in GRAPHS}

    def activate_impl(self) -> None:
        self.shared.acquire()

    def deactivate_impl(self) -> None:
        self.shared.release()

    def device_facts(self) -> dict:
        return self.shared.device_facts()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.shared.torch
        # RecipeReference makes its index tensors with torch.arange/torch.tensor: the device context puts
        # them beside the weights
        with torch.device(self.shared.device), torch.inference_mode():
            return self.run(self.shared.reference, feed)

    @abstractmethod
    def run(self, reference, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph's outputs from the shared reference (each of the three graphs' runner defines it)."""

    # ---- the runner boundary: arrays in the bundle's dtypes, tensors in the reference's ----------------
    def tensor(self, array: np.ndarray):
        """A feed array on the reference's device, floats in its dtype (a copy: never a view of the feed)."""
        dtype = self.shared.dtype if np.issubdtype(array.dtype, np.floating) else None
        return self.shared.torch.tensor(np.ascontiguousarray(array), device=self.shared.device, dtype=dtype)

    def array(self, name: str, tensor) -> np.ndarray:
        """An output tensor as the graph returns it: on the host, in the manifest's dtype."""
        return tensor.detach().cpu().numpy().astype(self._output_dtypes[name], copy=False)


class TorchVisionRunner(TorchRunner):
    def run(self, reference, feed):
        return {"image_features": self.array("image_features", reference.image_features(
            self.tensor(feed["pixel_values"])))}


class TorchPrefillRunner(TorchRunner):
    def run(self, reference, feed):
        logits, state = reference.prefill(self.tensor(feed["input_ids"]), self.tensor(feed["image_features"]))
        outputs = {"logits": self.array("logits", logits)}  # [1, V]
        for layer, (key, value) in enumerate(state.cache):  # [1, Hkv, T_l, Dh]
            outputs[present_name(layer, "key")] = self.array(present_name(layer, "key"), key)
            outputs[present_name(layer, "value")] = self.array(present_name(layer, "value"), value)
        return outputs


class TorchDecodeRunner(TorchRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._host_buffers: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: the past.* arrays last fed
        self._state = None  # the reference's PrefillState: per layer the valid entries on the device

    def deactivate_impl(self) -> None:
        self._host_buffers, self._state = [], None
        super().deactivate_impl()

    def run(self, reference, feed):
        from mllm_deploy.calib.reference import PrefillState

        lengths = [int(n) for n in feed["past_lengths"]]
        buffers = [(feed[past_name(l, "key")], feed[past_name(l, "value")]) for l in range(len(lengths))]
        if self._state is None or any(new[0] is not old[0] or new[1] is not old[1]
                                      for new, old in zip(buffers, self._host_buffers)):
            self._state = PrefillState(cache=[self._upload(k, v, 0, n, None) for (k, v), n in zip(buffers, lengths)])
        else:
            self._state.cache = [self._upload(k, v, cached[0].shape[2], n, cached)
                                 for (k, v), n, cached in zip(buffers, lengths, self._state.cache)]
        self._host_buffers = buffers
        zeros = self.shared.torch.zeros
        self._state.kept = [zeros(n, dtype=self.shared.torch.long) for n in lengths]  # positions: see the module doc
        logits = reference.decode(int(feed["input_ids"][0, 0]), int(feed["position_ids"][0, 0]), self._state)
        outputs = {"logits": self.array("logits", logits)}  # [1, V]
        for layer, (key, value) in enumerate(self._state.cache):  # the reference appended the new entry last
            outputs[new_name(layer, "key")] = self.array(new_name(layer, "key"), key[:, :, -1:])
            outputs[new_name(layer, "value")] = self.array(new_name(layer, "value"), value[:, :, -1:])
        return outputs

    def _upload(self, key: np.ndarray, value: np.ndarray, seen: int, length: int, cached):
        """A layer's valid entries [1, Hkv, length, Dh] on the device: what it holds, plus slots seen..length."""
        if cached is not None and length <= seen:
            return cached[0][:, :, :length], cached[1][:, :, :length]
        new_key, new_value = self.tensor(key[:, :, seen:length]), self.tensor(value[:, :, seen:length])
        if cached is None:
            return new_key, new_value
        cat = self.shared.torch.cat
        return cat([cached[0], new_key], dim=2), cat([cached[1], new_value], dim=2)
