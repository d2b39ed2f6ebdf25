"""Lazy access to TensorRT and the CUDA runtime (cuda-python), shared by build-mllm and the TensorRT backend.

Nothing is imported until a function here is called, so ``--help`` and every module that merely
mentions TensorRT stay instant and work on machines without it. A missing package is one
DependencyError line that says what to install.
"""

from __future__ import annotations

import os
from typing import Any

from mllm_deploy.core.errors import DependencyError, MllmError

TRT_INSTALL_HINT = ("TensorRT is not installed: this needs the tensorrt Python package (Jetson: it comes with "
                    "JetPack as python3-libnvinfer; x86: pip install 'mllm-deploy[trt-cu12]' or "
                    "'mllm-deploy[trt-cu13]') and a CUDA GPU")
CUDA_INSTALL_HINT = ("cuda-python is not installed: pip install 'mllm-deploy[jetpack6]' (JetPack 6, CUDA 12) or "
                     "'mllm-deploy[jetpack7]' (JetPack 7, CUDA 13)")


def import_tensorrt():
    """The ``tensorrt`` module, or DependencyError (also when only PyPI's stub package is present)."""
    if os.environ.get("MLLM_DEPLOY_NO_TENSORRT"):  # lets tests exercise the missing-TensorRT path anywhere
        raise DependencyError(TRT_INSTALL_HINT)
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except Exception as exc:  # noqa: BLE001 - stubs raise RuntimeError/OSError, not only ImportError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DependencyError(f"{TRT_INSTALL_HINT} ({first})") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise DependencyError(f"{TRT_INSTALL_HINT} (the installed tensorrt package has no Builder/Runtime)")
    return trt


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # noqa: PLC0415
        except ImportError:
            raise DependencyError(CUDA_INSTALL_HINT) from None
    return cudart


def cuda_call(cudart, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; MllmError naming the call on failure."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        try:
            name = cudart.cudaGetErrorName(err)[1].decode()
        except Exception:  # noqa: BLE001 - the name is only for the message
            name = str(err)
        raise MllmError(f"CUDA error in {what}: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def query_gpu(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device."""
    cudart = import_cudart()
    count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise DependencyError("no CUDA GPU is visible (TensorRT needs one)")
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.split("\x00", 1)[0].strip(), f"{props.major}.{props.minor}"


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise MllmError(f"cannot read the TensorRT version {version!r}") from None


def plugin_library_tensorrt_major(path) -> int | None:
    """The TensorRT major version a plugin library was compiled for (its exported
    ``mllm_trt_plugins_tensorrt_major``); None when it cannot say (an older build, or not loadable here)."""
    import ctypes

    try:
        function = ctypes.CDLL(str(path)).mllm_trt_plugins_tensorrt_major
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int32
    return int(function())


# TensorRT keeps one plugin registry per process, and registering creators that are already there fails
# (IPluginRegistry::loadLibrary returns null). build-mllm --verify builds, then runs the engines in the same
# process, and the runtime copy of the library lives in engines/: load each library content once.
_LOADED_PLUGINS: dict[int, tuple[Any, dict[str, tuple[str, Any]]]] = {}


def load_plugin_library(trt, registry, path) -> Any:
    """Load the routing plugin library at ``path`` into TensorRT's registry once per process (by content)."""
    from mllm_deploy.core.hashing import sha256_file

    path = str(path)
    digest = sha256_file(path)
    _, loaded = _LOADED_PLUGINS.setdefault(id(trt), (trt, {}))
    if digest in loaded:
        return loaded[digest][1]
    if loaded:
        other = next(iter(loaded.values()))[0]
        raise MllmError(f"another routing plugin library ({other}) is already loaded in this process and TensorRT "
                        f"cannot register the same plugins twice; run {path}'s engines in a new process")
    built_for = plugin_library_tensorrt_major(path)
    running = tensorrt_major(trt.__version__)
    if built_for is not None and built_for != running:
        raise MllmError(f"{path} was compiled against TensorRT {built_for} headers and this is TensorRT "
                        f"{trt.__version__}; rebuild it here (cmake -S plugins -B build/plugins): the plugin ABI "
                        "differs between major versions")
    handle = registry.load_library(path)
    if handle is None:
        raise MllmError(f"TensorRT could not load the plugin library {path} (see the TensorRT log above; a library "
                        "built for another TensorRT major version or CUDA architecture is refused)")
    loaded[digest] = (path, handle)
    return handle
