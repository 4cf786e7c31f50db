"""Open a model file with the backend its extension names.

    python -c "from runtime.backends import open_backend; print(open_backend('model.onnx').describe())"

    .plan / .engine  -> TensorRT (needs the `tensorrt` and `cuda-python` packages and a GPU)
    .onnx            -> ONNX Runtime
    .pt              -> PyTorch (a training checkpoint; needs the training extra)

Every failure to load is a BackendError with one line naming the file, so the CLIs can exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.backends.base import Backend, BackendError

EXTENSIONS = {".plan": "tensorrt", ".engine": "tensorrt", ".onnx": "onnxruntime", ".pt": "pytorch"}
DEVICES = ("auto", "cpu", "cuda")

__all__ = ["Backend", "BackendError", "open_backend", "EXTENSIONS", "DEVICES"]


def open_backend(path: str | os.PathLike[str], device: str = "auto", threads: int | None = None) -> Backend:
    """Load `path` with the backend for its extension.

    device: "auto" (GPU when the backend has one, else CPU), "cpu" or "cuda".
    threads: CPU threads for inference (ONNX Runtime intra-op / torch); None = physical cores.
    """
    p = Path(path)
    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise BackendError(f"{p}: unknown model type {p.suffix or '(no extension)'!r}; expected one of "
                           f"{', '.join(sorted(EXTENSIONS))}")
    if device not in DEVICES:
        raise BackendError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if not p.is_file():
        raise BackendError(f"{p}: no such model file")
    if kind == "tensorrt":
        if device == "cpu":
            raise BackendError(f"{p}: a TensorRT plan runs on a GPU only; use --device cuda/auto or the .onnx on CPU")
        from runtime.backends.tensorrt import TensorRTBackend
        return TensorRTBackend(p)
    if kind == "onnxruntime":
        from runtime.backends.onnxrt import OnnxRuntimeBackend
        return OnnxRuntimeBackend(p, device=device, threads=threads)
    from runtime.backends.torch_backend import TorchBackend
    return TorchBackend(p, device=device, threads=threads)
