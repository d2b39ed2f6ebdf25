"""build-mllm's work: parse each ONNX graph of a bundle with TensorRT and write ``BUNDLE/engines/``.

Per graph: one engine with one optimisation profile (prefill: the prompt-length range; decode:
input length 1 and each layer's KV capacity range; vision: static), the routing plugins loaded
from ``--plugins`` when the graph has ``mllm_deploy`` nodes, and a cache key
(``trt/engines.py``) in ``engines/index.json``. Precision: TensorRT 11 networks are strongly
typed (the bundle's dtype is the engine's: export FP16 graphs as FP16); TensorRT 10 builds
float16 bundles strongly typed too, and float32 bundles either exactly (TF32 off) or with the
FP16 builder flag (``--fp16``). The engines directory is written to a temporary folder and
renamed, so a failed build leaves the previous engines (or none) in place.

TensorRT and cuda-python are imported only when a build starts (``trt/env.py``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mllm_deploy.formats.manifest import GRAPHS
from mllm_deploy.trt.engines import (INDEX_FILE, EngineKey, engine_file, engine_key, engines_dir, make_index,
                                      map_tensors, read_index)
from mllm_deploy.core.errors import BundleError, InputFileError, MllmError
from mllm_deploy.core.fsutil import atomic_directory, atomic_write_text
from mllm_deploy.core.hashing import sha256_file
from mllm_deploy.trt.profiles import DEFAULT_PRESET, PRESETS, all_profiles, all_shape_values, profile_settings

PLUGIN_FILE = "libmllm_deploy_trt_plugins.so"  # the copy kept beside the engines
TIMING_CACHE_FILE = "timing.cache"  # TensorRT's tactic timings, kept across rebuilds (seconds instead of minutes)


@dataclass(frozen=True)
class BuildOptions:
    preset: str = DEFAULT_PRESET
    plugins: Path | None = None
    fp16: bool = False
    workspace_mb: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    force: bool = False
    opt_image_start: int = 0  # the image position of a typical prompt (build_cli measures the chat template's)


@dataclass(frozen=True)
class Precision:
    strongly_typed: bool
    fp16_flag: bool
    name: str  # what the engine computes in: "float32", "float16", or "float32+fp16-tactics"

    def to_dict(self) -> dict[str, Any]:
        return {"strongly_typed": self.strongly_typed, "fp16_flag": self.fp16_flag, "precision": self.name}


@dataclass
class BuildResult:
    engines_dir: Path
    keys: list[EngineKey]
    rebuilt: bool
    seconds: dict[str, float] = field(default_factory=dict)
    plugins: Path | None = None


def precision_plan(bundle_dtype: str, trt_major: int, fp16: bool, quantized: bool = False) -> Precision:
    """How to build a bundle of ``bundle_dtype`` on TensorRT ``trt_major`` (pure; see the module doc). A bundle with
    quantized weights (export-mllm --quantize) builds strongly typed, where TensorRT takes each DequantizeLinear's
    INT4/INT8 type from its weights; --fp16's weakly typed network would need the quantized types' builder flags
    on top, which this build does not set, so it is refused."""
    if bundle_dtype not in ("float32", "float16"):
        raise BundleError(f"bundle dtype {bundle_dtype!r} is neither float32 nor float16; re-export the bundle")
    if quantized and fp16 and bundle_dtype == "float32":
        raise MllmError("--fp16 does not lower a bundle with quantized weights (its network is built strongly typed):"
                        " export it with --dtype float16 --quantize ... and build that bundle")
    if bundle_dtype == "float16":
        return Precision(True, False, "float16")
    if fp16 and trt_major >= 11:
        raise MllmError("TensorRT 11 networks are strongly typed, so --fp16 cannot lower a float32 bundle: "
                        "export it with export-mllm --dtype float16 and build that bundle")
    if fp16:
        return Precision(False, True, "float32+fp16-tactics")
    return Precision(True, False, "float32")


def plugin_graphs(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    """graph -> the routing op types it holds (only graphs that hold some)."""
    return {graph: list(manifest["graphs"][graph].get("custom_ops") or []) for graph in GRAPHS
            if manifest["graphs"][graph].get("custom_ops")}


def check_plugins(manifest: Mapping[str, Any], plugins: Path | None) -> Path | None:
    """The plugin library to load, or None when no graph needs one; MllmError when one is needed and missing."""
    needed = plugin_graphs(manifest)
    if plugins is not None and not Path(plugins).is_file():
        raise InputFileError(f"plugin library not found: {plugins}")
    if needed and plugins is None:
        ops = sorted({op for found in needed.values() for op in found})
        raise MllmError(f"the {', '.join(needed)} graph uses routing plugins ({', '.join(ops)}): pass --plugins "
                        f"path/to/{PLUGIN_FILE} (cmake -S plugins -B build/plugins && cmake --build build/plugins)")
    return Path(plugins) if plugins is not None and needed else None


def build_settings(preset_name: str, options: BuildOptions, precision: Precision,
                   profiles: Mapping[str, Any], shape_values: Mapping[str, Any], graph: str) -> dict[str, Any]:
    preset = PRESETS[preset_name]
    return {"preset": preset.name, "workspace_mb": options.workspace_mb or preset.workspace_mb, **precision.to_dict(),
            "profile": {name: [list(s) for s in shapes] for name, shapes in profiles[graph].items()},
            "shape_values": {name: [list(v) for v in values] for name, values in shape_values[graph].items()}}


def planned_keys(manifest: Mapping[str, Any], options: BuildOptions, *, tensorrt: str, gpu: str,
                 compute_capability: str, plugins_sha256: str | None) -> tuple[list[EngineKey], dict[str, Any]]:
    """The keys the engines of this build will carry, and the profile settings (pure given the machine facts)."""
    if options.preset not in PRESETS:
        raise MllmError(f"unknown --preset {options.preset!r}; choose from {', '.join(PRESETS)}")
    if options.workspace_mb is not None and options.workspace_mb < 64:
        raise MllmError(f"--workspace must be at least 64 MB, got {options.workspace_mb}")
    from mllm_deploy.trt.env import tensorrt_major

    precision = precision_plan(str(manifest["dtype"]), tensorrt_major(tensorrt), options.fp16,
                               quantized=bool(manifest.get("quantization")))
    settings = profile_settings(manifest, PRESETS[options.preset], max_prompt_tokens=options.max_prompt_tokens,
                                max_new_tokens=options.max_new_tokens, opt_image_start=options.opt_image_start)
    profiles = all_profiles(manifest, settings)
    shape_values = all_shape_values(manifest, settings)
    needed = plugin_graphs(manifest)
    keys = [engine_key(manifest, graph, tensorrt=tensorrt, gpu=gpu, compute_capability=compute_capability,
                       plugins_sha256=plugins_sha256 if graph in needed else None,
                       settings=build_settings(options.preset, options, precision, profiles, shape_values, graph))
            for graph in GRAPHS]
    return keys, {"profile_settings": settings.to_dict(), "precision": precision.to_dict()}


def up_to_date(bundle_dir: Path, keys: list[EngineKey]) -> bool:
    """Whether engines/ already holds exactly these engines (same digests, files present)."""
    index_path = engines_dir(bundle_dir) / INDEX_FILE
    if not index_path.is_file():
        return False
    try:
        index = read_index(json.loads(index_path.read_text()), str(index_path))
    except (BundleError, ValueError, OSError):
        return False
    for key in keys:
        entry = index["engines"].get(key.graph)
        if entry is None or entry.get("digest") != key.digest or not (engines_dir(bundle_dir) / entry["file"]).is_file():
            return False
    return True


# ---- the TensorRT part ------------------------------------------------------------------------------------
def make_logger(trt, log: Callable[[str], None], verbose: bool = False):
    """A trt.ILogger that keeps errors (for the one-line message) and forwards warnings (all with verbose) to ``log``."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: A003 - TensorRT's name
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(str(msg))
            if int(severity) <= int(trt.ILogger.INFO if verbose else trt.ILogger.WARNING):
                log(f"  [TensorRT] {msg}")

    return Logger()


# Node-name scopes of the ranking arithmetic (export/routing.py, export/mod_prefill.py): scores, their running
# updates, and the TopK pair that selects and sorts (its second TopK sorts indices cast to float, exact in FP32
# up to 2^24 but not in FP16 beyond 2048).
RANKING_SCOPES = ("/VisualScore/", "/TokenSelect/", "/ScatterScores/", "/router/", "/rank/")


def is_ranking_layer(name: str) -> bool:
    return any(scope in name for scope in RANKING_SCOPES)


def pin_ranking_layers(trt, network) -> list[str]:
    """With the FP16 builder flag TensorRT may run any layer of a float32 network in FP16; ranking scores must stay
    FP32 (a near-tie would flip otherwise), so pin the ranking layers and their float outputs. Returns their names."""
    pinned = []
    floats = (trt.float16, trt.float32)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        float_outputs = [slot for slot in range(layer.num_outputs) if layer.get_output_type(slot) in floats]
        if not is_ranking_layer(layer.name) or not float_outputs:
            continue  # integer index arithmetic has no float precision to pin
        layer.precision = trt.float32
        for slot in float_outputs:
            layer.set_output_type(slot, trt.float32)
        pinned.append(layer.name)
    return pinned


def make_progress_monitor(trt, log: Callable[[str], None], graph: str):
    """A trt.IProgressMonitor that reports the builder's top-level phases (None where TensorRT has none)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.depth: dict[str, int] = {}
            self.start = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            if self.depth[phase_name] == 0:
                log(f"  {graph}: {phase_name} ({num_steps} steps, {time.perf_counter() - self.start:.0f} s)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self.depth.pop(phase_name, None)

    return Monitor()


def _build_one(trt, logger, graph: str, onnx_path: Path, io: Mapping[str, Any], key: EngineKey,
               plugins: Path | None, timing_cache: bytes, log: Callable[[str], None]) -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache) of one graph."""
    from mllm_deploy.trt.env import load_plugin_library

    builder = trt.Builder(logger)
    if plugins is not None:
        load_plugin_library(trt, builder.get_plugin_registry(), plugins)
    settings = key.settings
    flags = 0
    if settings["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise MllmError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors[:3]) or 'unknown error'}"
                        " (check-trt-mllm shows what the parser refuses)")
    tensors = [(network.get_input(i).name, True, network.get_input(i).dtype.name) for i in range(network.num_inputs)]
    tensors += [(network.get_output(i).name, False, network.get_output(i).dtype.name)
                for i in range(network.num_outputs)]
    map_tensors(io, tensors, graph)  # the parsed network must be the manifest's graph
    parsed_shape_inputs = {network.get_input(i).name for i in range(network.num_inputs)
                           if network.get_input(i).is_shape_tensor}
    if parsed_shape_inputs != set(settings["shape_values"]):
        raise BundleError(f"TensorRT reads {sorted(parsed_shape_inputs) or 'no input'} of the {graph} graph as shape "
                          f"tensors, the manifest says {sorted(settings['shape_values']) or 'none'}; re-export the bundle")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_mb"]) << 20)
    if settings["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
        if pin_ranking_layers(trt, network):
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if settings["precision"] == "float32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # match ONNX Runtime's float32 within 1e-4
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    monitor = make_progress_monitor(trt, log, graph)
    if monitor is not None:
        config.progress_monitor = monitor
    if settings["profile"] or settings["shape_values"]:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in settings["profile"].items():
            profile.set_shape(name, low, opt, high)
        for name, (low, opt, high) in settings["shape_values"].items():
            profile.set_shape_input(name, low, opt, high)  # shape tensors need values, not only dimensions
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1] if logger.errors else "see the TensorRT log above"
        raise MllmError(f"TensorRT could not build the {graph} engine: {detail}")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(bundle_dir: str | Path, manifest: Mapping[str, Any], options: BuildOptions,
                  log: Callable[[str], None] = print, verbose: bool = False) -> BuildResult:
    """Build (or keep, when up to date and not ``force``) the engines of a bundle whose files were checked."""
    from mllm_deploy.trt.env import import_tensorrt, query_gpu

    bundle_dir = Path(bundle_dir)
    trt = import_tensorrt()  # fails with one line before anything is written
    plugins = check_plugins(manifest, options.plugins)
    gpu, capability = query_gpu()
    plugins_sha = sha256_file(plugins) if plugins is not None else None
    keys, extra = planned_keys(manifest, options, tensorrt=trt.__version__, gpu=gpu, compute_capability=capability,
                               plugins_sha256=plugins_sha)
    target = engines_dir(bundle_dir)
    if not options.force and up_to_date(bundle_dir, keys):
        log(f"engines in {target} are up to date (TensorRT {trt.__version__}, {gpu}, sm_{capability.replace('.', '')})")
        kept = target / PLUGIN_FILE
        return BuildResult(target, keys, rebuilt=False, plugins=kept if kept.is_file() else None)
    logger = make_logger(trt, log, verbose)
    seconds: dict[str, float] = {}
    cache_path = target / TIMING_CACHE_FILE
    timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
    if timing_cache:
        log(f"reusing the TensorRT timing cache {cache_path} ({len(timing_cache) / 2**10:.0f} KiB)")
    with atomic_directory(target) as scratch:
        for number, key in enumerate(keys, 1):
            log(f"building {key.graph} [{number}/{len(keys)}] ({key.settings['precision']}, TensorRT {trt.__version__},"
                f" {gpu})")
            start = time.perf_counter()
            entry = manifest["graphs"][key.graph]
            plan, timing_cache = _build_one(trt, logger, key.graph, bundle_dir / entry["file"],
                                            {"inputs": entry["inputs"], "outputs": entry["outputs"]}, key,
                                            plugins if key.plugins_sha256 else None, timing_cache, log)
            (scratch / engine_file(key.graph)).write_bytes(plan)
            seconds[key.graph] = time.perf_counter() - start
            log(f"  {engine_file(key.graph)}: {len(plan) / 2**20:.1f} MiB in {seconds[key.graph]:.1f} s")
        (scratch / TIMING_CACHE_FILE).write_bytes(timing_cache)
        if plugins is not None:
            shutil.copyfile(plugins, scratch / PLUGIN_FILE)  # engines and their plugins travel together
        index = make_index(keys, {**extra, "tensorrt": trt.__version__, "gpu": gpu, "compute_capability": capability,
                                  "plugins_file": PLUGIN_FILE if plugins is not None else None,
                                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": seconds})
        atomic_write_text(scratch / INDEX_FILE, json.dumps(index, indent=1))
    return BuildResult(target, keys, rebuilt=True, seconds=seconds,
                       plugins=target / PLUGIN_FILE if plugins is not None else None)
