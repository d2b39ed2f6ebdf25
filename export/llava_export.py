"""export-mllm's work: HF LLaVA directory -> bundle/ (vision, prefill, decode, tokenizer, manifest).

The bundle is assembled in a temporary directory beside the target and renamed into place
only after it verified, so an interrupted or failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm_deploy import __version__
from mllm_deploy.core.fsutil import atomic_directory
from mllm_deploy.core.errors import InputFileError, MllmError, UnsupportedModelError, VerificationError
from mllm_deploy.models.loading import load_hf_model
from mllm_deploy.models.registry import load_spec
from mllm_deploy.formats.geometry import ModelSpec

SUPPORTED_OPSETS = range(17, 22)
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"
    opset: int | None = None  # None: 17, or 21 with --quantize (block-wise DequantizeLinear needs it)
    verify: bool = True
    force: bool = False
    recipe: str | None = None  # path to recipe.json; None exports the dense model
    routing: str = "native"  # "native" (standard ops) or "plugin" (mllm_deploy custom ops)
    check_trt: str | None = None  # TensorRT version whose ONNX parser must accept every graph
    max_memory: int | None = None  # bytes; refuse when the export's memory estimate exceeds it
    cache_dir: str | None = None  # Hugging Face cache to look --model ids up in (None: HF_HUB_CACHE / HF_HOME)
    ort_graphs: bool = True  # also the onnxruntime-target prefill/decode (fused ops; same weights file)
    verify_layers: int | None = None  # verify on the first N decoder layers (a model too big for PyTorch here)
    quantize: str | None = None  # weight-only "int8" or "int4" (export/quantize.py); None keeps float weights
    block_size: int | None = None  # int4's block (default export/quantize.DEFAULT_BLOCK_SIZE)
    quant_method: str = "rtn"
    quantize_lm_head: bool = False
    quantize_vision: bool = False

    @property
    def resolved_opset(self) -> int:
        return self.opset if self.opset is not None else (21 if self.quantize else 17)

    def quant_scheme(self):
        """export/quantize.QuantScheme of the options, None without --quantize; a one-line error if invalid."""
        from dataclasses import replace

        from mllm_deploy.export.quantize import check_scheme

        if self.quantize is None:
            if self.block_size is not None or self.quantize_lm_head or self.quantize_vision:
                raise MllmError("--block-size, --quantize-lm-head and --quantize-vision need --quantize int4|int8")
            return None
        scheme = check_scheme(self.quantize, self.block_size, self.quant_method)
        if scheme.bits == 4 and self.resolved_opset < 21:
            raise MllmError(f"--quantize int4 needs --opset 21 (INT4 and block-wise DequantizeLinear), got --opset"
                            f" {self.opset}; int8 (per-channel) also exports at 17-20")
        return replace(scheme, lm_head=self.quantize_lm_head, vision=self.quantize_vision, scale_dtype=self.dtype)


def _write_tokenizer(model_dir: Path, target: Path) -> dict:
    """Save a fast tokenizer (tokenizer.json) and the chat template; describe them for the manifest."""
    from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

    target.mkdir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{model_dir} has no loadable tokenizer: {str(exc).splitlines()[0]}") from None
    tokenizer.save_pretrained(target)
    if not (target / "tokenizer.json").is_file():
        raise UnsupportedModelError(f"the tokenizer of {model_dir} has no fast (tokenizer.json) form")
    template = None
    try:
        template = AutoProcessor.from_pretrained(model_dir, local_files_only=True).chat_template
    except (OSError, ValueError, TypeError):
        pass
    template = template or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise UnsupportedModelError(f"{model_dir} has no chat template; add chat_template.jinja to the model directory")
    (target / "chat_template.jinja").write_text(template)
    eos = []
    try:
        gen = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    except OSError:
        pass
    eos = [int(e) for e in eos if e is not None] or [int(tokenizer.eos_token_id)]
    templates = []  # a model trained on fixed question templates says so (shapes-llava): run-mllm warns off them
    if (model_dir / "prompt_templates.json").is_file():
        try:
            templates = [str(t) for t in json.loads((model_dir / "prompt_templates.json").read_text())["templates"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(f"{model_dir}/prompt_templates.json is malformed ({exc})") from None
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {
        "dir": "tokenizer",
        "file": "tokenizer/tokenizer.json",
        "chat_template": "tokenizer/chat_template.jinja",
        "special_tokens": {k: v for k, v in special.items() if v is not None},
        "image_token": "<image>",
        "eos_token_ids": eos,
        **({"prompt_templates": templates} if templates else {}),
    }


def _graphs(spec: ModelSpec, weights: dict, dtype: str, opset: int, out_dir: Path, recipe, routing: str,
            ort_graphs: bool = True, quant=None):
    """The portable vision, prefill and decode graphs and, unless ``ort_graphs`` is off, the onnxruntime-target
    prefill and decode (ONNX Runtime's fused ops), all on one weights file: each weight is written once."""
    import onnx

    from mllm_deploy.export import ort_fused
    from mllm_deploy.formats.manifest import ORT_GRAPHS

    from mllm_deploy.export.graph import GraphBuilder, WeightStore
    from mllm_deploy.export.manifest import graph_entry
    from mllm_deploy.export.prefill import build_prefill_graph
    from mllm_deploy.export.text_graphs import build_decode_graph
    from mllm_deploy.export.vision_graph import build_vision_graph
    from mllm_deploy.export.weights import rope_tables

    ft = onnx.TensorProto.FLOAT if dtype == "float32" else onnx.TensorProto.FLOAT16
    t = spec.text
    cos, sin = rope_tables(t.head_dim, t.rope_theta, t.rope_scaling_factor, t.max_position_embeddings)
    rope = (cos.astype(DTYPES[dtype]), sin.astype(DTYPES[dtype]))
    from mllm_deploy.core.progress import Progress

    bar = Progress(len(weights), "weights", unit="tensors")  # every weight is written once, whichever graph asks
    store = WeightStore(out_dir / "weights.bin", on_new=lambda name, nbytes: bar.update() if name in weights else None)
    entries = {}
    plan = [("vision", "vision", "portable"), ("prefill", "prefill", "portable"), ("decode", "decode", "portable")]
    if ort_graphs and ort_fused.unsupported(spec) is None:
        plan += [(ORT_GRAPHS[role], role, "onnxruntime") for role in ("prefill", "decode")]
    try:
        for name, role, target in plan:
            bar.label = f"weights ({name} graph)"
            g = GraphBuilder(name, opset, store, target=target, quant=quant)
            if role == "vision":
                build_vision_graph(g, spec, weights, ft, recipe.pre_llm, routing)
            elif role == "prefill":
                build_prefill_graph(g, spec, weights, rope, ft, recipe.llm_recipe(), routing)
            else:
                build_decode_graph(g, spec, weights, rope, ft, recipe.skip_attention)
            model = g.make_model()
            file_name = f"{role}.onnx" if target == "portable" else f"{role}.ort.onnx"
            onnx.save(model, out_dir / file_name)
            entries[name] = {**graph_entry(model, file_name), "target": target}
    finally:
        store.close()
        bar.close()
    return entries


def _producer_versions() -> dict:
    import onnx
    import torch
    import transformers

    return {"mllm_deploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__}


def _check_memory(spec: ModelSpec, model: str, options: ExportOptions, streaming: bool, recipe) -> None:
    """Refuse, before the weights load, an export whose estimate exceeds --max-memory or the memory available.
    With --verify-layers the export and the truncated verification come one after the other: the larger counts."""
    from mllm_deploy.core.memory import available_memory, check_memory, export_estimate

    size, prompt = np.dtype(DTYPES[options.dtype]).itemsize, spec.visual_tokens + 12
    estimate = export_estimate(spec, size, prompt, verify=options.verify, streaming=streaming)
    what = f"exporting {model} ({options.dtype})"
    if options.verify and options.verify_layers is not None and options.verify_layers < spec.text.num_layers:
        short, _ = truncated_pair(spec, recipe, options.verify_layers)
        estimate = max(export_estimate(spec, size, prompt, verify=False, streaming=streaming),
                       export_estimate(short, size, prompt, verify=True, streaming=streaming), key=lambda e: e.total)
        what += f", verified on {options.verify_layers} layers"
    check_memory(estimate, what, options.max_memory, available_memory())


def export_bundle(model: str, output: str | Path, options: ExportOptions = ExportOptions(), log=print) -> Path:
    from mllm_deploy.export.checkpoint import has_safetensors
    from mllm_deploy.formats.image import ImagePreprocessConfig

    if options.dtype not in DTYPES:
        raise MllmError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype}")
    if options.routing not in ("native", "plugin"):
        raise MllmError(f"--routing must be native or plugin, got {options.routing}")
    if options.check_trt:
        from mllm_deploy.trt.check import load_support

        load_support(options.check_trt)  # an unknown version fails before any work
    options.quant_scheme()  # bad quantization flags fail before any work
    if options.resolved_opset not in SUPPORTED_OPSETS:
        raise MllmError(f"--opset must be between {SUPPORTED_OPSETS.start} and {SUPPORTED_OPSETS.stop - 1}")
    output = Path(output)
    if output.exists() and not options.force:
        raise InputFileError(f"{output} already exists; choose another -o or pass --force to replace it")
    model_dir, spec = load_spec(model, options.cache_dir)
    from mllm_deploy.models.presets import is_geometry_preset

    if is_geometry_preset(model_dir):
        raise UnsupportedModelError(f"{model} is a geometry preset without weights (for flops-mllm, static"
                                    " calib-mllm methods and report estimates); export a real model directory")
    from mllm_deploy.formats.recipe import dense_recipe, load_recipe

    recipe = load_recipe(options.recipe, spec) if options.recipe else dense_recipe(spec)
    if spec.is_anyres and recipe.method_name != "dense":
        raise UnsupportedModelError(f"{model} is a LLaVA-NeXT (AnyRes) model: it exports dense; recipes per grid bucket"
                                    f" are not built yet (got a {recipe.method_name} recipe)")
    if recipe.pia and options.quantize:
        raise MllmError("--quantize with an EAS recipe holding a fitted stand-in (pia) is not supported yet: the"
                        " stand-in folds into float weights; export it unquantized or calibrate without --pia")
    if recipe.pre_llm is not None and spec.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(f"a {recipe.pre_llm.method} pre-LLM selection ranks patch tokens: it needs"
                                    " vision_feature_select_strategy 'default' (the [CLS] token dropped), this model"
                                    f" uses {spec.vision_feature_select_strategy!r}")
    spec = recipe.llm_spec(spec)  # from here on: the model as its language model sees it (the tower is spec.tower())
    if options.quant_scheme() is not None:
        from mllm_deploy.export.quantize import check_geometry

        check_geometry(spec, options.quant_scheme())
    image_config = ImagePreprocessConfig.from_model_dir(model_dir)
    streaming = has_safetensors(model_dir)
    truncated = options.verify and options.verify_layers is not None and options.verify_layers < spec.text.num_layers
    if options.verify_layers is not None:
        _check_verify_layers(options.verify_layers, spec, recipe, streaming)
    _check_memory(spec, model, options, streaming, recipe)
    # the PyTorch model is loaded only to verify against; the weights stream from the safetensors files
    full_model = options.verify and not truncated or not streaming
    hf_model = load_hf_model(model_dir, attn_implementation="eager") if full_model else None

    with atomic_directory(output) as tmp:
        scheme = options.quant_scheme()
        quant = f", {scheme.weights} weights ({scheme.to_dict()['granularity']})" if scheme else ""
        log(f"export: {model} -> {output} ({options.dtype}{quant}, opset {options.resolved_opset}, recipe"
            f" {recipe.method_name}, {options.routing} routing)")
        from mllm_deploy.export.ort_fused import unsupported

        reason = unsupported(spec) if options.ort_graphs else None
        if reason:  # _graphs leaves them out for the same reason
            log(f"export: no onnxruntime-target graphs ({reason}); ONNX Runtime runs the portable ones")
        _write_bundle(tmp, model, model_dir, spec, recipe, image_config, options, hf_model, streaming)
        if truncated:
            _verify_truncated(model, model_dir, spec, recipe, image_config, options, log, output.parent)
        elif options.verify:
            from mllm_deploy.export.verify import verify_bundle

            _judge(verify_bundle(tmp, hf_model, spec, options.dtype, recipe), log, "")
        if options.check_trt:
            from mllm_deploy.trt.check import check_bundle

            findings = [f for graph in check_bundle(tmp, options.check_trt).values() for f in graph]
            log(f"check-trt {options.check_trt}: {len(findings)} problems")
            if findings:
                raise VerificationError(
                    f"{len(findings)} node(s) would be rejected by TensorRT {options.check_trt}'s ONNX parser, first:"
                    f" {findings[0].line()}; no bundle written"
                )
    from mllm_deploy.core.memory import format_size

    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    checked = ("not verified (--no-verify)" if not options.verify else
               f"verified on {options.verify_layers} layers" if truncated else "verified")
    log(f"export: wrote {output} ({format_size(size)}, {checked})")
    return output


def _write_bundle(tmp: Path, model: str, model_dir: Path, spec: ModelSpec, recipe, image_config, options: ExportOptions,
                  hf_model, streaming: bool) -> dict:
    """Graphs, weights, tokenizer and manifest of (spec, recipe) into tmp; the manifest is returned."""
    from mllm_deploy.export.checkpoint import SafetensorsCheckpoint, StreamingWeights
    from mllm_deploy.export.manifest import BUNDLE_SCHEMA, file_hashes
    from mllm_deploy.export.vision_graph import vision_layers_used
    from mllm_deploy.export.weights import collect_weights
    from mllm_deploy.runtime.bundle import record_verified

    if streaming:
        weights = StreamingWeights(SafetensorsCheckpoint(model_dir), spec, DTYPES[options.dtype],
                                   vision_layers_used(spec), spec.text.tie_word_embeddings)
    else:  # a checkpoint in another format (pytorch_model.bin): from the loaded model
        weights = collect_weights(hf_model, DTYPES[options.dtype], vision_layers_used(spec))
    if recipe.pia:  # EAS's stand-in for the removed attention, folded into those layers' FFN weights
        from mllm_deploy.formats.pia import FoldedWeights, recipe_pia

        weights = FoldedWeights(weights, recipe_pia(recipe))
    scheme = options.quant_scheme()
    graphs = _graphs(spec, weights, options.dtype, options.resolved_opset, tmp, recipe, options.routing,
                     options.ort_graphs, scheme)
    tokenizer = _write_tokenizer(model_dir, tmp / "tokenizer")
    if recipe.router_path() is not None:
        # the routers are baked into prefill.onnx; the copy lets the embedded recipe's PyTorch
        # reference (bench-mllm --backend torch) find them beside the manifest
        import shutil

        shutil.copyfile(recipe.router_path(), tmp / recipe.mod.router_file)
    manifest = {
        "schema": BUNDLE_SCHEMA,
        "producer": _producer_versions(),
        "source_model": str(model),
        "dtype": options.dtype,
        "model": {**spec.to_dict(), "visual_tokens": spec.visual_tokens},
        "recipe": recipe.to_dict(),
        "routing": options.routing,
        "graphs": graphs,
        "weights": "weights.bin",
        **({"quantization": scheme.to_dict()} if scheme else {}),
        "kv_cache": {
            "layout": "[1, num_kv_heads, length, head_dim] per layer",
            "formula": "kv_len[l] = prompt_len - visual_tokens + recipe.visual_tokens[l]",
            "visual_tokens_per_layer": list(recipe.visual_tokens),
            "decode": "static buffers; decode writes new.{l}.* at slot past_lengths[l]",
        },
        "tokenizer": tokenizer,
        "image": image_config.to_dict(),
    }
    manifest["files"] = file_hashes(tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    record_verified(tmp, manifest["files"])  # hashed just now: loads trust them until a file changes
    return manifest


def _judge(comparisons: dict, log, what: str) -> None:
    """One line per graph set; the first set that disagrees fails the export."""
    for graphs, comparison in comparisons.items():
        label = f"{what} ({graphs} graphs)" if what else f" ({graphs} graphs)"
        log(f"verify{label}: {comparison.summary()}")
        if not comparison.ok:
            raise VerificationError(f"exported {graphs} graphs disagree with the PyTorch model{what}"
                                    f" ({comparison.summary()}); no bundle written (--no-verify skips this check)")


def _check_verify_layers(n: int, spec: ModelSpec, recipe, streaming: bool) -> None:
    if n < 1:
        raise MllmError(f"--verify-layers must be at least 1, got {n}")
    if n >= spec.text.num_layers:
        return  # the whole model: the usual verification
    if not streaming:
        raise MllmError("--verify-layers needs a safetensors checkpoint (the truncated copy is read from it)")
    if recipe.is_mod:
        raise MllmError("--verify-layers does not truncate MoD recipes (their routers are per layer);"
                        " verify the whole model or pass --no-verify")


def truncated_pair(spec: ModelSpec, recipe, n: int):
    """The first n decoder layers of (spec, recipe): the same vision tower, embeddings, head and schedule."""
    from dataclasses import replace

    from mllm_deploy.formats.geometry import geometry_fingerprint

    short = replace(spec, text=replace(spec.text, num_layers=n))
    short = replace(short, fingerprint=geometry_fingerprint(short))
    final = recipe.final_visual_tokens
    if recipe.prune_stage != "layer_input":
        final = recipe.mlp_visual_tokens()[n - 1]
    short_recipe = replace(recipe, model=replace(recipe.model, num_layers=n, fingerprint=short.fingerprint),
                           visual_tokens=list(recipe.visual_tokens[:n]), final_visual_tokens=final, flops=None)
    return short, short_recipe


def _verify_truncated(model: str, model_dir: Path, spec: ModelSpec, recipe, image_config, options: ExportOptions,
                      log, scratch_parent: Path) -> None:
    """Export the first --verify-layers decoder layers of the same checkpoint through the same code path into a
    scratch bundle and verify that against the same-depth PyTorch model: what verification can prove when the
    whole model does not fit in memory in PyTorch."""
    import tempfile

    from mllm_deploy.export.verify import verify_bundle
    from mllm_deploy.models.loading import load_hf_model_truncated

    n = options.verify_layers
    short, short_recipe = truncated_pair(spec, recipe, n)
    log(f"verify: on a depth-truncated copy ({n} of {spec.text.num_layers} decoder layers, same checkpoint and"
        " code path); the other layers are not compared with PyTorch")
    hf_short = load_hf_model_truncated(model_dir, n, attn_implementation="eager")
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=scratch_parent) as d:
        scratch = Path(d)
        _write_bundle(scratch, model, model_dir, short, short_recipe, image_config, options, None, True)
        _judge(verify_bundle(scratch, hf_short, short, options.dtype, short_recipe), log, f" ({n} layers)")
