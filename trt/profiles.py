"""Optimisation-profile shapes of a bundle's graphs for TensorRT, from the manifest alone (pure).

The bundle's LLM is two graphs, so it gets one profile per phase: the prefill engine's profile
spans the prompt lengths (``prefill_len`` from the shortest valid prompt to the preset's longest),
and the decode engine's profile has input length 1 and spans each layer's KV capacity
(``past_len_{l}``). A layer's KV holds the tokens it processed: ``kv_len[l] = prompt - visual
tokens + recipe.visual_tokens[l]``, plus the decode headroom the runtime allocates (the new
tokens), so pruned layers get shorter ranges. The vision graph is static.

Inputs that TensorRT reads as shape tensors (the manifest's ``graphs.<g>.shape_inputs``, found by
trt/shape_inputs.py) need min/opt/max *values* as well: ``image_start`` spans 0 (image
first) to the longest prompt minus the visual tokens (everything else before the image).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from mllm_deploy.formats.manifest import GRAPHS  # the portable graphs: what TensorRT builds
from mllm_deploy.core.errors import BundleError, MllmError

PROFILE_DIM = re.compile(r"^(prefill_len|visual_len|past_len_(\d+))$")  # visual_len: LLaVA-NeXT


@dataclass(frozen=True)
class Preset:
    """Build defaults for one kind of target. Text tokens are counted beyond the image's visual tokens."""
    name: str
    workspace_mb: int
    opt_text_tokens: int
    max_text_tokens: int
    opt_new_tokens: int
    max_new_tokens: int
    note: str


# The Jetsons share DRAM between CPU and GPU: smaller workspaces and context ranges leave room for weights.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("jetson-orin-nano", 1024, 64, 512, 32, 256, "Orin Nano / NX, 8-16 GB shared, sm_87, JetPack 6 (TensorRT 10.3)"),
    Preset("jetson-agx-orin", 4096, 128, 1536, 64, 512, "AGX Orin 32/64 GB shared, sm_87"),
    Preset("jetson-thor", 8192, 128, 3072, 64, 1024, "AGX Thor 128 GB shared, sm_110, JetPack 7"),
    Preset("datacenter", 8192, 128, 3072, 64, 1024, "discrete GPU (A100/L4/H100 ...)"),
)}
DEFAULT_PRESET = "datacenter"


@dataclass(frozen=True)
class ProfileSettings:
    """Prompt lengths count every token, image placeholders included; new tokens are decode headroom."""
    min_prompt_tokens: int
    opt_prompt_tokens: int
    max_prompt_tokens: int
    opt_new_tokens: int
    max_new_tokens: int
    opt_image_start: int = 0  # where the bundle's chat template puts the image (build-mllm measures it)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def profile_settings(manifest: Mapping[str, Any], preset: Preset, *, max_prompt_tokens: int | None = None,
                     max_new_tokens: int | None = None, opt_image_start: int = 0) -> ProfileSettings:
    """The prompt and decode ranges for this bundle on this preset, clamped to the model's context."""
    visual = int(manifest["model"]["visual_tokens"])
    context = int(manifest["model"]["text"]["max_position_embeddings"])
    new_max = max_new_tokens if max_new_tokens is not None else preset.max_new_tokens
    if new_max < 1:
        raise MllmError(f"--max-new-tokens must be at least 1, got {new_max}")
    smallest = fewest_visual_tokens(manifest) + 1  # the (shortest) image run and one text token
    prompt_max = max_prompt_tokens if max_prompt_tokens is not None else visual + preset.max_text_tokens
    prompt_max = min(prompt_max, context - new_max)
    if prompt_max < smallest:
        raise MllmError(f"no room for a prompt: the model's context is {context} positions, the image takes {visual} "
                        f"and --max-new-tokens asks {new_max}; lower --max-new-tokens or --max-prompt-tokens")
    prompt_opt = min(max(visual + preset.opt_text_tokens, smallest), prompt_max)
    return ProfileSettings(smallest, prompt_opt, prompt_max, min(preset.opt_new_tokens, new_max), new_max,
                           min(max(int(opt_image_start), 0), prompt_max - visual))


def fewest_visual_tokens(manifest: Mapping[str, Any]) -> int:
    """The shortest image run a prompt can hold: the bundle's fixed count, or for LLaVA-NeXT the base view alone
    (an image so thin that unpadding leaves no grid row; formats/image.anyres_feature_layout)."""
    if not manifest.get("image", {}).get("image_grid_pinpoints"):
        return int(manifest["model"]["visual_tokens"])
    vision = manifest["model"]["vision"]
    return (int(vision["image_size"]) // int(vision["patch_size"])) ** 2


def kv_length(manifest: Mapping[str, Any], layer: int, prompt_tokens: int) -> int:
    """Tokens layer ``layer`` caches after a prefill of ``prompt_tokens`` (runtime/bundle.py's formula)."""
    kept = int(manifest["recipe"]["visual_tokens"][layer])
    return prompt_tokens - int(manifest["model"]["visual_tokens"]) + kept


def dim_ranges(manifest: Mapping[str, Any], settings: ProfileSettings) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic input dimension of the bundle's graphs."""
    s = settings
    ranges = {"prefill_len": (s.min_prompt_tokens, s.opt_prompt_tokens, s.max_prompt_tokens)}
    if manifest.get("image", {}).get("image_grid_pinpoints"):  # LLaVA-NeXT: the image run follows the image
        most = int(manifest["model"]["visual_tokens"])
        ranges["visual_len"] = (fewest_visual_tokens(manifest), most, most)
    layers = int(manifest["model"]["text"]["num_layers"])
    skipped = set(manifest["recipe"].get("skip_attention", []))
    for layer in range(layers):
        if layer in skipped:  # EAS: no attention, no KV input
            continue
        # capacity = kv_len + headroom (Generator.prefill allocates max_new_tokens >= 1 extra slots)
        ranges[f"past_len_{layer}"] = (kv_length(manifest, layer, s.min_prompt_tokens) + 1,
                                       kv_length(manifest, layer, s.opt_prompt_tokens) + s.opt_new_tokens,
                                       kv_length(manifest, layer, s.max_prompt_tokens) + s.max_new_tokens)
    return ranges


def graph_profile(manifest: Mapping[str, Any], graph: str,
                  settings: ProfileSettings) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min shape, opt shape, max shape) for the graph's dynamic inputs (static ones left out)."""
    ranges = dim_ranges(manifest, settings)
    profile = {}
    for entry in manifest["graphs"][graph]["inputs"]:
        shape = entry["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        bounds: list[list[int]] = [[], [], []]
        for dim in shape:
            if isinstance(dim, int):
                values = (dim, dim, dim)
            elif PROFILE_DIM.match(str(dim)) and dim in ranges:
                values = ranges[dim]
            else:
                raise BundleError(f"{graph} input {entry['name']} has dimension {dim!r}, which build-mllm cannot size; "
                                  "re-export the bundle with this version of mllm-deploy")
            for bound, value in zip(bounds, values):
                bound.append(int(value))
        profile[entry["name"]] = (tuple(bounds[0]), tuple(bounds[1]), tuple(bounds[2]))
    return profile


def all_profiles(manifest: Mapping[str, Any], settings: ProfileSettings) -> dict[str, dict]:
    """graph -> its single profile (possibly empty: all shapes static)."""
    return {graph: graph_profile(manifest, graph, settings) for graph in GRAPHS}


Values = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _image_start_values(manifest: Mapping[str, Any], settings: ProfileSettings) -> Values:
    """From the image first to everything but the image before it, in the longest prompt."""
    latest = settings.max_prompt_tokens - fewest_visual_tokens(manifest)  # a NeXT image may be the base view only
    return (0,), (min(settings.opt_image_start, latest),), (latest,)


# shape-tensor input name -> its (min, opt, max) values on a profile
SHAPE_INPUT_VALUES: dict[str, Callable[[Mapping[str, Any], ProfileSettings], Values]] = {
    "image_start": _image_start_values,
}


def shape_inputs_of(manifest: Mapping[str, Any], graph: str) -> list[str]:
    """The graph's shape-tensor inputs as the manifest records them; BundleError for a bundle that predates them."""
    names = manifest["graphs"][graph].get("shape_inputs")
    if names is None:
        raise BundleError(f"the bundle's manifest does not say which {graph} inputs are TensorRT shape tensors "
                          "(exported before mllm-deploy 0.2); re-export the bundle with this version")
    return list(names)


def unsized_shape_inputs(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(graph, input) of every shape-tensor input build-mllm can give no value range."""
    return [(graph, name) for graph in GRAPHS for name in shape_inputs_of(manifest, graph)
            if name not in SHAPE_INPUT_VALUES]


def graph_shape_values(manifest: Mapping[str, Any], graph: str, settings: ProfileSettings) -> dict[str, Values]:
    """shape-tensor input -> (min, opt, max) values for the graph's profile."""
    values = {}
    for name in shape_inputs_of(manifest, graph):
        rule = SHAPE_INPUT_VALUES.get(name)
        if rule is None:
            raise BundleError(f"{graph} input {name} is a TensorRT shape tensor (its values set a shape) and "
                              f"build-mllm knows no value range for it; known: {', '.join(SHAPE_INPUT_VALUES)}")
        values[name] = rule(manifest, settings)
    return values


def all_shape_values(manifest: Mapping[str, Any], settings: ProfileSettings) -> dict[str, dict[str, Values]]:
    return {graph: graph_shape_values(manifest, graph, settings) for graph in GRAPHS}
