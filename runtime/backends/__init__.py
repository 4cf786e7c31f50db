"""Open a model file with a named backend (default: the one its extension names) and that backend's options.

    python -c "from runtime.backends import open_backend; print(open_backend('model.onnx').describe())"

    .plan / .engine  -> tensorrt     (needs the `tensorrt` and `cuda-python` packages and a GPU)
    .onnx            -> onnxruntime  (option provider: tensorrt | cuda | cpu); an INT8 .onnx on a CPU run
                        -> openvino when it is installed (auto_onnx_backend); --backend openvino runs any .onnx
    .pt              -> pytorch      (a training checkpoint; options precision, cuda_graph, compile)

A backend is one line of BACKENDS (name -> module, class); a class lists the keyword options
its constructor takes in `options`, and the CLIs' flags (add_backend_args) map onto them, so
every benchmark row is a command line of probres-infer. Every failure to load is a BackendError
with one line naming the file or the flag, so the CLIs can exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

from runtime.backends.base import Backend, BackendError

BACKENDS = {
    "tensorrt": ("runtime.backends.tensorrt", "TensorRTBackend"),
    "onnxruntime": ("runtime.backends.onnxrt", "OnnxRuntimeBackend"),
    "openvino": ("runtime.backends.openvino", "OpenVinoBackend"),
    "pytorch": ("runtime.backends.torch_backend", "TorchBackend"),
}
EXTENSIONS = {".plan": "tensorrt", ".engine": "tensorrt", ".onnx": "onnxruntime", ".pt": "pytorch"}
DEVICES = ("auto", "cpu", "cuda")
GPU_ONLY = ("tensorrt",)
# backend option name -> the CLI flag that sets it (add_backend_args defines them)
OPTION_FLAGS = {"precision": "--precision", "cuda_graph": "--cuda-graph", "compile": "--compile", "provider": "--provider"}

__all__ = ["Backend", "BackendError", "open_backend", "add_backend_args", "backend_options", "OPTION_FLAGS",
           "BACKENDS", "EXTENSIONS", "DEVICES"]


def open_backend(path: str | os.PathLike[str], device: str = "auto", threads: int | None = None,
                 backend: str | None = None, **options: Any) -> Backend:
    """Load `path` with `backend` (default: by its extension), passing the backend's `options`.

    device: "auto" (GPU when the backend has one, else CPU), "cpu" or "cuda".
    threads: CPU threads for inference (ONNX Runtime intra-op / OpenVINO / torch); None = physical cores.
    options: keyword options of that backend (its class's `options`); None values are left out.
    Without backend and options, an INT8 .onnx on a CPU run goes to OpenVINO when installed.
    """
    p = Path(path)
    if backend is None:
        backend = EXTENSIONS.get(p.suffix.lower())
        if backend is None:
            raise BackendError(f"{p}: unknown model type {p.suffix or '(no extension)'!r}; expected one of "
                               f"{', '.join(sorted(EXTENSIONS))} (or name one with --backend)")
        if backend == "onnxruntime" and not any(v is not None for v in options.values()) and p.is_file():
            backend = auto_onnx_backend(p, device)
    if backend not in BACKENDS:
        raise BackendError(f"--backend must be one of {', '.join(sorted(BACKENDS))}, got {backend!r}")
    if device not in DEVICES:
        raise BackendError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if not p.is_file():
        raise BackendError(f"{p}: no such model file")
    if backend in GPU_ONLY and device == "cpu":
        raise BackendError(f"{p}: a TensorRT plan runs on a GPU only; use --device cuda/auto or the .onnx on CPU")
    module, cls_name = BACKENDS[backend]
    cls = getattr(importlib.import_module(module), cls_name)
    given = {k: v for k, v in options.items() if v is not None}
    allowed = tuple(getattr(cls, "options", ()))
    for k in given:
        if k not in allowed:
            raise BackendError(f"{OPTION_FLAGS.get(k, k)}: the {backend} backend has no such option"
                               f" ({', '.join(OPTION_FLAGS.get(o, o) for o in allowed) or 'it takes none'})")
    if backend in GPU_ONLY:
        return cls(p, **given)
    return cls(p, device=device, threads=threads, **given)


# ------------------------------------------------------------------------------------------- CLI flags

def add_backend_args(ap: argparse.ArgumentParser) -> None:
    """--backend and every backend option as a flag (defaults None: the backend's own default)."""
    g = ap.add_argument_group("backend options")
    g.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                   help="backend to open MODEL with (default: by its extension; an INT8 .onnx on CPU: "
                        "openvino when installed)")
    g.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                   help="PyTorch: compute precision (fp16: half weights, FP16 input, channels_last)")
    g.add_argument("--cuda-graph", action="store_true", default=None, help="PyTorch: replay CUDA graphs (GPU)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="PyTorch: torch.compile (Inductor; compiles for minutes before the first batch)")
    g.add_argument("--provider", choices=("tensorrt", "cuda", "cpu"), default=None,
                   help="ONNX Runtime: execution provider (default: the best this build has for --device)")


def backend_options(backend: str | None = None, **flags: Any) -> dict[str, Any]:
    """open_backend's backend= and **options from add_backend_args' flags given as keywords (a command's
    main passes **vars(parsed)): unset options and keys that are not backend options are left out."""
    return {"backend": backend, **{k: flags[k] for k in OPTION_FLAGS if flags.get(k) is not None}}


def auto_onnx_backend(path: Path, device: str) -> str:
    """"openvino" for an INT8 file on a CPU-only run when openvino is installed, else "onnxruntime".

    Why only INT8: on the 2-core VMs OpenVINO ran the NNCF INT8 graph 1.66x (Zen 3) and 2.4x
    (Zen 5) faster than ONNX Runtime ran FP32, but its f32 was slower than ONNX Runtime's (benchmarks/RESULTS.md,
    "INT8 on the CPU"). A GPU build of onnxruntime keeps the file (TensorRT / CUDA execution providers).
    """
    if device == "cuda":
        return "onnxruntime"
    from runtime.backends import openvino
    from runtime.onnx_meta import KEY_PRECISION, OnnxMetaError, metadata_props

    if not openvino.available():
        return "onnxruntime"
    try:
        if metadata_props(path).get(KEY_PRECISION) != "int8":
            return "onnxruntime"
    except OnnxMetaError:
        return "onnxruntime"          # the ONNX Runtime backend reports the error
    if device == "auto":
        try:
            import onnxruntime as ort
        except ImportError:
            return "openvino"
        from runtime.backends.onnxrt import GPU_PROVIDERS
        if any(p in ort.get_available_providers() for p in GPU_PROVIDERS):
            return "onnxruntime"
    return "openvino"
