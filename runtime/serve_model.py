"""What probres-serve does with one dynamic batch: image bytes or tensors in, probabilities + labels out.

    python -c "from runtime.serve_model import ServeModel; from runtime.backends import open_backend; \
m = ServeModel(open_backend('model.onnx')); print(m.from_bytes([open('a.jpg','rb').read()])['labels'])"

No Triton here (runtime/serve.py binds these calls into PyTriton), so it is tested without a
server. Every image in a request goes through the runtime's own checks before OpenCV sees it:
the request-size cap (`max_bytes`), the decompression-bomb guard on the header
(runtime.decode.check_header, inside preprocess_into) and the checked decode + preprocessing of probres-infer
(runtime.preprocess), so a served image gets exactly the pixels probres-infer gives it.

A bad image, or a preprocessed tensor holding NaN or infinite values, becomes an error for that
item, in the `error` output, and its `probs` row is zeros; the other items of the batch are
unaffected. Every item's `provenance` output is the JSON of runtime.provenance.header's fields
for the model file and decision rule that answered it (model, sha256, threshold, top_k). The `labels` output is the "predictions" list of probres-infer's JSONL record for
the image, written by the same code (runtime.report.Writer), each label with its threshold. (PyTriton turns an exception in the
callable into one error, with a Python traceback, for every request of the dynamic batch: a
corrupt image from one client would fail the other clients' images batched with it.)
"""

from __future__ import annotations

import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from runtime.backends import Backend
from runtime.contract import OUTPUT_NAME, PreprocessSpec
from runtime.preprocess import ImageDecodeError, preprocess_into
from runtime.infer import decision_thresholds
from runtime.provenance import KEY, decision, header
from runtime.report import Writer

MAX_REQUEST_BYTES = 64 << 20       # per image in a request; --max-request-bytes


def decode_item(name: str, data: object, row: np.ndarray, spec: PreprocessSpec, max_bytes: int) -> str | None:
    """Check and preprocess one request item (encoded bytes) called `name` into `row` (3, S, S).

    None when fine, else one line naming the item: over `max_bytes`, a header claiming too
    many pixels (checked before decoding), or not decodable.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return f"{name}: expected encoded image bytes, got {type(data).__name__}"
    if len(data) > max_bytes:
        return f"{name}: request too large ({len(data)} bytes, limit {max_bytes} bytes)"
    try:
        preprocess_into(data, row, spec, name=name)       # checks the header's pixel count before decoding
        return None
    except ImageDecodeError as e:
        return str(e)
    except Exception as e:  # cv2.error, MemoryError: still this item's problem, not the server's
        text = str(e).strip().splitlines()
        return f"{name}: {e.__class__.__name__}: {text[-1] if text else 'failed'}"


class ServeModel:
    """One model instance: a backend, its input buffer for the largest batch, a decode pool."""

    def __init__(self, backend: Backend, max_batch: int = 16, threads: int = 1,
                 max_bytes: int = MAX_REQUEST_BYTES, threshold: str | float | None = None,
                 source: str | os.PathLike[str] | None = None) -> None:
        """threshold: "contract"/None (the contract's per-label thresholds, 0.5 without them) or one
        probability for every label: probres-infer's --threshold. source: the model file the backend
        was opened from; every answer's `provenance` names it (file name, sha256) and the rule."""
        self.backend, self.max_batch, self.max_bytes = backend, int(max_batch), int(max_bytes)
        self.spec = backend.contract.preprocess
        self.labels = backend.contract.labels
        # (C,) float64 and the record's "threshold", exactly as probres-infer decides
        self.thresholds, self.threshold_name = decision_thresholds(backend.contract, threshold, None)
        # probres-infer's provenance header: the same fields, so an answer and a results file compare
        prov = header(source, threshold, None)[KEY] if source is not None else decision(threshold, None)
        self.provenance = json.dumps(prov).encode()
        (self._buf,) = backend.allocate_inputs(self.max_batch, 1)    # (max_batch, 3, S, S) input_dtype
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probres-serve") if threads > 1 else None
        # Triton runs one batch at a time per instance; the lock keeps the one buffer safe even if not.
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------- requests

    def from_bytes(self, images: Sequence[object], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Encoded images (N items, named in errors by `names`) -> outputs, per item; N <= max_batch."""
        n = len(images)
        names = names or [f"image {i}" for i in range(n)]
        with self._lock:
            return self._from_bytes(images, names)

    def _from_bytes(self, images: Sequence[object], names: Sequence[str]) -> dict[str, np.ndarray]:
        n = len(images)
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds max_batch {self.max_batch}")
        buf = self._buf
        jobs = [(names[i], images[i], buf[i]) for i in range(n)]
        if self._pool is not None and n > 1:     # decode + the C kernel release the GIL
            errors = list(self._pool.map(lambda j: decode_item(*j, self.spec, self.max_bytes), jobs))
        else:
            errors = [decode_item(*j, self.spec, self.max_bytes) for j in jobs]
        ok = [i for i, e in enumerate(errors) if e is None]
        for dst, src in enumerate(ok):           # good rows to the front, in order
            if dst != src:
                buf[dst] = buf[src]
        probs = np.zeros((n, self.labels.num_classes), dtype=np.float32)
        if ok:
            probs[ok] = self.backend.infer(buf[:len(ok)])
        return self._outputs(probs, errors)

    def from_tensors(self, images: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Preprocessed (N, 3, S, S) float32/float16 (Triton checked shape and dtype) -> outputs; an item
        with a NaN or infinite value is that item's error (a network would turn it into NaN probabilities)."""
        n = len(images)
        names = names or [f"image {i}" for i in range(n)]
        finite = np.isfinite(images.reshape(n, -1)).all(axis=1)
        errors = [None if ok else f"{name}: the input tensor holds NaN or infinite values"
                  for name, ok in zip(names, finite)]
        probs = np.zeros((n, self.labels.num_classes), dtype=np.float32)
        if finite.all():
            probs = self.backend.infer(images)
        elif finite.any():
            probs[finite] = self.backend.infer(images[finite])
        return self._outputs(probs, errors)

    # ---------------------------------------------------------------------------------- responses

    def labels_json(self, probs: np.ndarray) -> bytes:
        """The labels passing the thresholds, most probable first: the "predictions" of probres-infer's
        JSONL record for these probabilities (label, category_id, probability, threshold)."""
        sink = io.StringIO()
        Writer(sink, "jsonl", self.labels, self.thresholds, threshold_name=self.threshold_name).result("", probs)
        return json.dumps(json.loads(sink.getvalue())["predictions"]).encode()

    def _outputs(self, probs: np.ndarray, errors: list[str | None]) -> dict[str, np.ndarray]:
        """probs (N, C) float32; labels, error and provenance (N, 1) bytes objects (error b"" when the
        item is fine; provenance the same for every item, error items too)."""
        labels = np.array([[b"[]" if e else self.labels_json(p)] for p, e in zip(probs, errors)], dtype=np.object_)
        err = np.array([[(e or "").encode()] for e in errors], dtype=np.object_)
        prov = np.full((len(errors), 1), self.provenance, dtype=np.object_)
        return {OUTPUT_NAME: probs, "labels": labels.reshape(-1, 1), "error": err.reshape(-1, 1), "provenance": prov}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.backend.close()
