"""The one small interface every inference backend implements: a float32 batch in, probabilities out.

    python -c "from runtime.backends import open_backend; b = open_backend('model.onnx'); print(b.describe())"

A backend owns one loaded model. `infer` takes the runtime's preprocessed batch, float32
(N, 3, S, S) with S = contract.preprocess.size, and returns float32 (N, C) sigmoid
probabilities in the order of contract.labels. Backends with a fixed batch range
(TensorRT profiles) split larger batches themselves, so callers may pass any N >= 1.
No torch here: the PyTorch backend imports it lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.contract import ModelContract


class BackendError(RuntimeError):
    """The model cannot be loaded or run here (missing/corrupt file, missing package, wrong device).

    The message is one line naming the file or the flag; the CLIs turn it into exit code 2.
    """


class Backend:
    """Base class: subclasses set the attributes in __init__ and implement `_infer`."""

    name: str = "backend"                  # "onnxruntime[CPUExecutionProvider]", "tensorrt", "pytorch[cpu]"
    path: str = ""                         # the model file
    contract: ModelContract
    precision: str = "fp32"                # "fp32" | "fp16" (what the weights/graph compute in)
    max_batch: int | None = None           # largest batch one call can take; None = unlimited
    val_metrics: dict[str, Any] | None = None   # PyTorch's val metrics stored with the model, if any

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) -> float32 (N, C) probabilities."""
        s = self.contract.preprocess.size
        if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != (3, s, s) or batch.shape[0] < 1:
            raise ValueError(f"{self.name}: batch must be float32 (N>=1, 3, {s}, {s}), got {batch.dtype} {batch.shape}")
        out = self._infer(np.ascontiguousarray(batch))
        c = self.contract.labels.num_classes
        if out.shape != (batch.shape[0], c):
            raise BackendError(f"{self.path}: model returned shape {out.shape}, expected ({batch.shape[0]}, {c}) "
                               f"for its {c}-label contract")
        return np.asarray(out, dtype=np.float32)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (and device memory). Safe to call twice."""

    def describe(self) -> str:
        """One line for logs: backend, precision, file."""
        return f"{self.name} {self.precision} {self.path}"

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
