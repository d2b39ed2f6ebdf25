"""build-mllm --verify: what a Jetson user runs first, after the engines are built.

1. the routing kernels of the plugin library against the NumPy references (random inputs, several
   sizes, k from 1 to N, FP32/FP16: ``plugins/kernel_checks.py``), through the library's C ABI;
2. TensorRT against ONNX Runtime on the same synthetic prompt with the project's comparator
   (``core/compare.py``): vision features, prefill logits and every layer's KV, then decode
   logits step by step, both backends fed the same tokens;
3. a short bench-mllm measurement on TensorRT;
4. a report, ``engines/verify.json`` and ``engines/verify.md``.
A failed comparison or kernel check fails the command (after the report is written).
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mllm_deploy.core.compare import DEFAULT_TOLERANCES, compare_outputs, compare_selection
from mllm_deploy.core.errors import MllmError, VerificationError
from mllm_deploy.core.fsutil import atomic_write_text
from mllm_deploy.formats.manifest import present_name

REPORT_SCHEMA = "mllm-deploy/trt-verify@1"


@dataclass
class Check:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str
    data: dict = field(default_factory=dict)


def check_kernels(plugins: Path | None, log: Callable[[str], None]) -> Check:
    """The kernel checks through the plugin library itself, or a fresh nvcc build when there is none."""
    from mllm_deploy.plugins.kernel_checks import run_cases
    from mllm_deploy.plugins.kernels import KernelBuildError, RoutingKernels, build_cuda_library

    if plugins is not None:
        library, source = plugins, "the TensorRT plugin library"
    else:
        try:
            library, source = build_cuda_library(("native",)), "an nvcc build of plugins/cuda"
        except KernelBuildError as exc:
            return Check("plugin kernels", "skip", f"no plugin library and no nvcc build ({exc})")
    kernels = RoutingKernels(library)
    if not kernels.is_cuda or kernels.device_count() < 1:
        return Check("plugin kernels", "skip", f"{library} is not a CUDA build or sees no GPU")
    log(f"checking the routing kernels of {source} against the NumPy references")
    results = run_cases(kernels)
    failed = [(name, why) for name, why in results if why]
    detail = f"{len(results) - len(failed)}/{len(results)} cases match ({source})"
    if failed:
        detail += f"; first failure: {failed[0][0]}: {failed[0][1]}"
    return Check("plugin kernels", "fail" if failed else "pass", detail,
                 {"cases": len(results), "failed": [name for name, _ in failed]})


def _compare(name: str, reference: dict, candidate: dict, tolerance) -> Check:
    result = compare_outputs(reference, candidate, tolerance)
    worst = result.worst()
    data = {"outputs": len(result.outputs), "worst": worst.name if worst else None,
            "max_abs_error": worst.max_abs_error if worst else None, "limit": worst.limit if worst else None}
    return Check(name, "pass" if result.ok else "fail", result.summary(), data)


ROUTE_KEPT = re.compile(r"^route\.(\d+)\.kept$")


def compare_selections(ref, trt, ids: np.ndarray, features: np.ndarray, tolerance) -> tuple[Check | None, int | None]:
    """Compare the kept visual tokens of every routing layer (the prefill graph's ``route.{l}.*`` outputs).

    Returns the check (None when the bundle routes nothing) and the first layer where a near-tie was broken
    differently (None when the selections are equal): its later layers, logits and decode steps are not
    comparable, and are not compared.
    """
    feed = {"input_ids": ids, "image_features": features,
            "image_start": np.array([ref.image_start(ids)], dtype=np.int64)}
    ref_out, trt_out = ref.runners["prefill"].infer(feed), trt.runners["prefill"].infer(feed)
    layers = sorted(int(m.group(1)) for m in map(ROUTE_KEPT.match, ref_out) if m)
    if not layers:
        return None, None
    results = [compare_selection(l, ref_out[f"route.{l}.kept"], trt_out[f"route.{l}.kept"],
                                 ref_out[f"route.{l}.scores"], trt_out[f"route.{l}.scores"], tolerance) for l in layers]
    for result in results:  # the first layer that differs decides: later layers saw other tokens
        if result.status == "mismatch":
            return Check("token selection", "fail", result.detail, {"layer": result.layer}), None
        if result.status == "tie":
            return Check("token selection", "pass", f"{result.detail}; later layers, logits and decode not compared",
                         {"layer": result.layer, "tie": True}), result.layer
    return Check("token selection", "pass", f"same tokens kept at layers {', '.join(map(str, layers))}",
                 {"layers": layers}), None


def compare_backends(bundle, precision: str, prompt_tokens: int, steps: int, plugins: Path | None,
                     log: Callable[[str], None]) -> list[Check]:
    """TensorRT vs ONNX Runtime, stage by stage; each stage gets the reference's inputs so errors do not compound."""
    from mllm_deploy.runtime.generator import Generator
    from mllm_deploy.runtime.timing import synthetic_inputs

    half = precision != "float32" or bundle.dtype == "float16"
    tolerance = DEFAULT_TOLERANCES["float16" if half else "float32"]
    ids, pixels = synthetic_inputs(bundle, prompt_tokens)
    checks: list[Check] = []
    options = {"plugins": str(plugins)} if plugins is not None else {}
    log(f"comparing TensorRT with ONNX Runtime ({prompt_tokens}-token prompt, {steps} decode steps)")
    # the reference runs the graphs TensorRT built (the portable ones), not ONNX Runtime's fused variants
    with Generator(bundle, "onnxruntime", graphs="portable") as ref, Generator(bundle, "tensorrt", **options) as trt:
        features = ref.encode_image(pixels)
        checks.append(_compare("vision", {"image_features": features}, {"image_features": trt.encode_image(pixels)},
                               tolerance))
        selection, diverged = compare_selections(ref, trt, ids, features, tolerance)
        if selection is not None:
            checks.append(selection)
            if selection.status == "fail":
                return checks
        logits_ref, cache_ref = ref.prefill(ids, features, capacity_extra=steps)
        logits_trt, cache_trt = trt.prefill(ids, features, capacity_extra=steps)
        if diverged is not None:
            # after a tie the two runs hold different tokens: only the layers before it are comparable
            want = {present_name(l, part): getattr(cache_ref, part + "s")[l][:, :, :int(cache_ref.lengths[l])]
                    for l in range(diverged) for part in ("key", "value")}
            got = {present_name(l, part): getattr(cache_trt, part + "s")[l][:, :, :int(cache_trt.lengths[l])]
                   for l in range(diverged) for part in ("key", "value")}
            checks.append(_compare("prefill", want, got, tolerance) if want else
                          Check("prefill", "skip", f"diverges at layer {diverged} after a tie"))
            return checks
        want, got = {"logits": logits_ref}, {"logits": logits_trt}
        for layer, n in enumerate(int(x) for x in cache_ref.lengths):
            for part, ref_kv, trt_kv in (("key", cache_ref.keys, cache_trt.keys), ("value", cache_ref.values,
                                                                                    cache_trt.values)):
                want[present_name(layer, part)] = ref_kv[layer][:, :, :n]
                got[present_name(layer, part)] = trt_kv[layer][:, :, :n]
        checks.append(_compare("prefill", want, got, tolerance))
        token = int(np.argmax(logits_ref))
        agree = int(token == int(np.argmax(logits_trt)))
        want, got = {}, {}
        for step in range(steps - 1):
            step_ref = ref.decode(token, prompt_tokens + step, cache_ref)
            step_trt = trt.decode(token, prompt_tokens + step, cache_trt)
            want[f"logits[{step + 1}]"], got[f"logits[{step + 1}]"] = step_ref, step_trt
            agree += int(int(np.argmax(step_ref)) == int(np.argmax(step_trt)))
            token = int(np.argmax(step_ref))
        if want:
            checks.append(_compare("decode", want, got, tolerance))
        checks.append(Check("greedy tokens", "pass", f"{agree}/{steps} greedy tokens equal (informative)",
                            {"agree": agree, "steps": steps}))
    return checks


def benchmark(bundle_path: Path, prompt_tokens: int, new_tokens: int, repeats: int) -> Check:
    """bench-mllm's measurement on TensorRT: the runtime's timed loop, one bench@1 result as the check's data."""
    from mllm_deploy.runtime.bundle import load_bundle
    from mllm_deploy.runtime.generator import Generator
    from mllm_deploy.runtime.timing import bench_result, synthetic_inputs, time_generation
    from mllm_deploy.trt.env import query_gpu

    bundle = load_bundle(Path(bundle_path).resolve(), check_hashes=False)  # verify's caller checked them
    ids, pixels = synthetic_inputs(bundle, prompt_tokens)
    with Generator(bundle, "tensorrt") as generator:
        result = bench_result(generator, time_generation(generator, ids, pixels, new_tokens, repeats, warmup=1))
    gpu, capability = query_gpu()
    result["device"] = f"{gpu} (sm_{capability.replace('.', '')})"  # the TensorRT runner does not report it
    decode, ttft = result["decode_ms_per_token"], result["ttft_ms"]
    detail = (f"TTFT {ttft['median']:.1f} ms, prefill {result['prefill_ms']['median']:.1f} ms, decode "
              f"{decode['median']:.2f} ms/token ({result['tokens_per_s']:.1f} tokens/s), median of {repeats}")
    return Check("benchmark", "pass", detail, result)


def markdown(payload: dict) -> str:
    lines = [f"# TensorRT verification of {payload['bundle']}", "",
             f"- TensorRT {payload['tensorrt']}, {payload['gpu']} (sm_{payload['compute_capability'].replace('.', '')}),"
             f" {payload['machine']}", f"- engines: {payload['precision']}, built in "
             f"{sum(payload['build_seconds'].values()):.0f} s" if payload["build_seconds"] else "- engines: reused",
             f"- verdict: **{'PASS' if payload['ok'] else 'FAIL'}**", "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in payload["checks"]]
    return "\n".join(lines) + "\n"


def verify(bundle, build, *, precision: str, prompt_tokens: int | None = None, steps: int = 8, repeats: int = 5,
           log: Callable[[str], None] = print) -> dict:
    """Run every check and write the report beside the engines; VerificationError when one fails."""
    from mllm_deploy.trt.env import import_tensorrt, query_gpu

    trt = import_tensorrt()
    gpu, capability = query_gpu()
    prompt_tokens = prompt_tokens if prompt_tokens is not None else bundle.visual_tokens + 40
    checks = [check_kernels(build.plugins, log)]
    try:
        checks += compare_backends(bundle, precision, prompt_tokens, steps, build.plugins, log)
    except MllmError as exc:
        checks.append(Check("TensorRT vs ONNX Runtime", "fail", " ".join(str(exc).split())))
    if all(c.status != "fail" for c in checks):
        log("benchmarking the TensorRT engines")
        try:
            checks.append(benchmark(bundle.path, prompt_tokens, max(steps, 2), repeats))
        except MllmError as exc:
            checks.append(Check("benchmark", "fail", " ".join(str(exc).split())))
    payload = {"schema": REPORT_SCHEMA, "bundle": str(bundle.path), "tensorrt": trt.__version__, "gpu": gpu,
               "compute_capability": capability, "machine": f"{platform.machine()} {platform.node()}",
               "precision": precision, "build_seconds": build.seconds, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "ok": all(c.status != "fail" for c in checks), "checks": [asdict(c) for c in checks]}
    out_dir = build.engines_dir
    atomic_write_text(out_dir / "verify.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out_dir / "verify.md", markdown(payload))
    for check in checks:
        log(f"  {check.status.upper():4} {check.name}: {check.detail}")
    if not payload["ok"]:
        failed = next(c for c in checks if c.status == "fail")
        raise VerificationError(f"TensorRT verification failed ({failed.name}: {failed.detail}); "
                                f"report: {out_dir / 'verify.md'}")
    return payload
