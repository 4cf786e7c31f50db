"""The one small interface every inference backend implements: a preprocessed batch in, probabilities out.

    python -c "from runtime.backends import open_backend; b = open_backend('model.onnx'); print(b.describe())"

A backend owns one loaded model and the host buffers its input is written into:

    bufs = backend.allocate_inputs(batch_size, count)   # once; (B, 3, S, S) of backend.input_dtype
    ... runtime.pipeline preprocesses straight into bufs[i][:n] ...
    pending = backend.submit(bufs[i][:n])               # starts the transfer + compute, returns at once
    probs = pending.wait()                              # float32 (n, C), in contract.labels order

`input_dtype` is what the engine's input tensor takes (float16 for an FP16-input model), so
the pipeline writes that dtype and no batch is cast or copied on the host. On a GPU the
buffers are pinned host memory (cudaMallocHost, pinned torch tensors), so the H2D copy is
truly asynchronous. A batch that is a view of one of the backend's own buffers is used in
place (`owns`); any other array of the right shape is accepted too, cast and copied.

Overlap: a caller may hold two submitted batches at once (submit k+1, then wait k); a
buffer may be rewritten only after the `wait()` of the batch that used it has returned.
`infer(batch)` is `submit(batch).wait()`. Backends with a fixed batch range (TensorRT
profiles) split larger batches themselves, so callers may pass any N >= 1.
No torch here: the PyTorch backend imports it lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.contract import ModelContract
from runtime.errors import ModelError


class BackendError(ModelError, RuntimeError):
    """The model cannot be loaded or run here (missing/corrupt file, missing package, wrong device).

    The message is one line naming the file or the flag; the CLIs turn it into exit code 2.
    """


class Pending:
    """The result of `Backend.submit`: `wait()` blocks until the probabilities are on the host."""

    def __init__(self, probs: np.ndarray) -> None:
        self._probs = probs

    def wait(self) -> np.ndarray:
        """float32 (N, C) probabilities of the submitted batch."""
        return self._probs


class Backend:
    """Base class: subclasses set the attributes in __init__ and implement `_infer` (synchronous)
    or `_submit` (asynchronous), and `_alloc_host` where their engine wants special host memory."""

    name: str = "backend"                  # "onnxruntime[CPUExecutionProvider]", "tensorrt", "pytorch[cpu]"
    path: str = ""                         # the model file
    contract: ModelContract
    precision: str = "fp32"                # "fp32" | "fp16" | "int8" (what the weights/graph compute in)
    input_dtype: np.dtype = np.dtype(np.float32)   # the engine input tensor's dtype
    max_batch: int | None = None           # largest batch one call can take; None = unlimited
    val_metrics: dict[str, Any] | None = None   # PyTorch's val metrics stored with the model, if any

    # ------------------------------------------------------------------------------------ buffers

    def allocate_inputs(self, batch_size: int, count: int) -> list[np.ndarray]:
        """`count` input buffers of shape (batch_size, 3, S, S) and dtype `input_dtype`, owned by this
        backend (kept alive until close). Call once per run, sized by min(batch size, inputs)."""
        if batch_size < 1 or count < 1:
            raise ValueError(f"batch_size and count must be >= 1, got {batch_size}, {count}")
        s = self.contract.preprocess.size
        shape = (int(batch_size), 3, s, s)
        bufs = [self._alloc_host(shape, np.dtype(self.input_dtype)) for _ in range(count)]
        owned = getattr(self, "_owned_inputs", None)
        if owned is None:
            owned = self._owned_inputs = []
        owned.extend(bufs)
        return bufs

    def _alloc_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """One host buffer; pageable numpy memory unless the engine needs pinned memory."""
        return np.empty(shape, dtype=dtype)

    def owns(self, batch: np.ndarray) -> bool:
        """True when `batch` lies inside one of the buffers `allocate_inputs` handed out."""
        return any(np.shares_memory(batch, b) for b in getattr(self, "_owned_inputs", None) or ())

    # ------------------------------------------------------------------------------------ inference

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """The batch as the engine takes it: `input_dtype`, C-contiguous (N>=1, 3, S, S).

        A view of the backend's own buffer passes through untouched; a float32/float16 array
        of the right shape is cast (a copy); anything else is a ValueError.
        """
        s = self.contract.preprocess.size
        if batch.dtype not in (np.float32, np.float16) or batch.ndim != 4 or batch.shape[1:] != (3, s, s) \
                or batch.shape[0] < 1:
            raise ValueError(f"{self.name}: batch must be float32/float16 (N>=1, 3, {s}, {s}), "
                             f"got {batch.dtype} {batch.shape}")
        if batch.dtype != self.input_dtype:
            return batch.astype(self.input_dtype, order="C")
        return np.ascontiguousarray(batch)

    def submit(self, batch: np.ndarray) -> Pending:
        """Start inference on `batch` (N, 3, S, S); `wait()` on the result gives float32 (N, C)."""
        return _Checked(self, self._submit(self.check_batch(batch)), batch.shape[0])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) -> float32 (N, C) probabilities (synchronous)."""
        return self.submit(batch).wait()

    def _submit(self, batch: np.ndarray) -> Pending:
        return Pending(self._infer(batch))

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release the model (and device memory). Safe to call twice."""

    def describe(self) -> str:
        """One line for logs: backend, precision, file."""
        return f"{self.name} {self.precision} {self.path}"

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Checked(Pending):
    """Wraps a backend's Pending: checks the output shape against the contract on wait()."""

    def __init__(self, backend: Backend, inner: Pending, n: int) -> None:
        self._backend, self._inner, self._n = backend, inner, n

    def wait(self) -> np.ndarray:
        out = self._inner.wait()
        c = self._backend.contract.labels.num_classes
        if out.shape != (self._n, c):
            raise BackendError(f"{self._backend.path}: model returned shape {out.shape}, expected ({self._n}, {c}) "
                               f"for its {c}-label contract")
        return np.asarray(out, dtype=np.float32)
