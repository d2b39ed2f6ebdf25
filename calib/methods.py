"""The calibration methods by name: ``calib-mllm --method NAME``, its flags and :func:`calibrate`.

Each entry names the method's options dataclass (a :class:`~mllm_deploy.calib.common.CommonOptions`
subclass whose fields are its flags) and the function that turns a model into a recipe,
``fn(options, run: CalibRun) -> Recipe``, both as ``"module:attribute"`` strings: listing the
methods imports nothing, choosing one imports its module only (vLLM's model registry does the same).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, Callable

from mllm_deploy.core.errors import MllmError

_PACKAGE = "mllm_deploy.calib"

# name -> ("module:OptionsClass", "module:function"); the order is calib-mllm's --method choices and --help sections
METHODS: dict[str, tuple[str, str]] = {
    "dense": ("static_methods:DenseOptions", "static_methods:calibrate_dense"),
    "fastv": ("static_methods:FastVOptions", "static_methods:calibrate_fastv"),
    "pdrop": ("static_methods:PDropOptions", "static_methods:calibrate_pdrop"),
    "vtw": ("vtw:VtwOptions", "vtw:calibrate_vtw"),
    "fitprune": ("fitprune:FitPruneOptions", "fitprune:calibrate_fitprune"),
    "mod": ("mod:ModOptions", "mod:calibrate_mod"),
    "cls": ("pre_llm:ClsOptions", "pre_llm:calibrate_cls"),
    "dart": ("pre_llm:DartOptions", "pre_llm:calibrate_dart"),
    "eas": ("eas:EasOptions", "eas:calibrate_eas"),
}


@dataclass(frozen=True)
class Method:
    name: str
    options: type  # a CommonOptions subclass
    calibrate: Callable[..., Any]  # (options, run: CalibRun) -> Recipe


def _load(ref: str):
    module, attribute = ref.split(":")
    return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), attribute)


def names() -> list[str]:
    return list(METHODS)


def options_class(name: str) -> type:
    if name not in METHODS:
        raise MllmError(f"unknown calibration method {name!r}; known: {', '.join(METHODS)}")
    return _load(METHODS[name][0])


def get(name: str) -> Method:
    cls = options_class(name)
    return Method(name, cls, _load(METHODS[name][1]))


def method_of(options) -> Method:
    """The method an options object belongs to (its class's ``method`` name), checked against the registry."""
    name = getattr(type(options), "method", "")
    if name not in METHODS:
        raise TypeError(f"{type(options).__name__} is not the options class of a registered calibration method")
    method = get(name)
    if type(options) is not method.options:
        raise TypeError(f"{type(options).__name__} says method {name!r}, whose options class is {method.options.__name__}")
    return method


def flag_dest(option_field) -> str:
    """argparse's dest of an options field's flag (``--fastv-k`` -> ``fastv_k``)."""
    return option_field.metadata["flag"].lstrip("-").replace("-", "_")


def flag_dests(options_class: type) -> dict[str, str]:
    """argparse dest of each flag -> the options field it sets (``fastv_k`` -> ``k``)."""
    return {flag_dest(f): f.name for f in fields(options_class)}


def options_from_flags(name: str, given: dict[str, Any]) -> Any:
    """A method's options from calib-mllm's parsed flags ({dest: value}): the given flags of the method
    and the common ones set their fields (None: not given); the rest keep the dataclass defaults."""
    cls = options_class(name)
    dests = flag_dests(cls)
    return cls(**{dests[dest]: value for dest, value in given.items() if dest in dests and value is not None})
