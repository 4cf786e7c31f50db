"""probres as a library: `Classifier` opens a model, `predict` gives one `Prediction` per image.

    python -c "from runtime import Classifier; print(Classifier.open('demo_out/model.onnx').predict('photo.jpg')[0].labels)"

    with Classifier.open("model.onnx") as clf:          # any model probres-infer takes
        for p in clf.predict(["photos/", rgb_array, open("a.jpg", "rb").read()]):
            print(p.source, p.labels, p.scores)

An input is a path (str or PathLike; a directory is walked as probres-infer walks it and its
images take its place, in sorted order), encoded image bytes, a numpy uint8 array H x W x 3
in RGB order (color="bgr" for OpenCV frames as they come), H x W grayscale or H x W x 4 (alpha
dropped), or a PIL image. Images go through probres-infer's own pipeline (runtime.pipeline:
decode in a thread pool straight into the backend's buffers, batch k+1 submitted before k is
waited for), and are decided by the same code (runtime.report), so `Prediction.to_json()` is
the record probres-infer writes for that image. `predict_iter` streams any iterable with
memory fixed by the batch size. A bad input becomes a Prediction with `error` set, and the
others go on, unless raise_errors=True (then an ImageError naming it).
"""

from __future__ import annotations

import json
import os
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from runtime.backends import Backend, BackendError, open_backend
from runtime.contract import LabelSet, ModelContract
from runtime.errors import ImageError, UsageError
from runtime.pipeline import classify, iter_image_paths
from runtime.preprocess import ImageDecodeError
from runtime.report import decision_thresholds, error_record, prediction_rows, record, select
from runtime.video_frames import (FrameClassifier, LiveStats, Smoother, frame_fields, no_frame_error, source_error,
                                  source_name, stream_batches)
from runtime.video_sources import Selector


DEFAULT_BATCH_SIZE = 16         # probres-infer's --batch-size default


def default_threads() -> int:
    """Decode/preprocess workers: every core, at most 8 (beyond that the engine is the bottleneck)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def check_threshold(threshold: Any) -> None:
    """UsageError unless `threshold` is 'contract' or a probability in [0, 1]."""
    if not (threshold == "contract" or isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise UsageError(f"threshold must be 'contract' or a probability in [0, 1], got {threshold!r}")


def check_batch_size(batch_size: int | None) -> int:
    """batch_size, DEFAULT_BATCH_SIZE for None; UsageError unless a positive integer."""
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


@dataclass(frozen=True, eq=False)
class Prediction:
    """One input's result. `labels`: the names that pass the decision, most probable first."""

    source: str                                 # the path, or "<bytes #i>" / "<array #i>" / "<image #i>" (i: input position)
    probabilities: np.ndarray | None            # float32 (C,), in the model's label order; None when error
    labels: list[str]
    scores: dict[str, float]                    # name -> probability, for `labels`
    thresholds: np.ndarray | None               # (C,) what decided; None for top_k alone
    error: str | None = None                    # one line naming the input, when it could not be classified
    decided_by: str | float | None = None       # the record's "threshold": "contract", a number, or None
    _label_set: LabelSet | None = field(default=None, repr=False)
    _index: tuple[int, ...] = field(default=(), repr=False)
    frame: int | None = None                    # a video frame's index in its source (stream); None for an image
    time_s: float | None = None                 # its time in the source, seconds (to the microsecond)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """probres-infer's JSONL record for this input (a video frame's with "frame" and "time_s"), as a dict."""
        fields = None if self.frame is None else {"frame": self.frame, "time_s": self.time_s}
        if self.error is not None:
            return error_record(self.source, self.error, fields)
        return record(self.source, self.probabilities, self._label_set, self.thresholds,
                      threshold_name=self.decided_by, idx=list(self._index), fields=fields)

    def to_json(self) -> str:
        """probres-infer's JSONL line for this input (without the newline)."""
        return json.dumps(self.to_dict())


def _name_of(item: Any, i: int) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<bytes #{i}>"
    if isinstance(item, np.ndarray):
        return f"<array #{i}>"
    return f"<image #{i}>"


def _is_pil(item: Any) -> bool:
    """A PIL image, without importing PIL (not a dependency)."""
    return type(item).__module__.startswith("PIL.") and hasattr(item, "convert") and hasattr(item, "mode")


def to_bgr(image: np.ndarray, color: str = "rgb", name: str = "array") -> np.ndarray:
    """A uint8 H x W, H x W x 1, x 3 (RGB, or BGR with color="bgr") or x 4 array -> BGR uint8 H x W x 3."""
    import cv2

    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or 0 in a.shape:
        raise ImageDecodeError(f"{name}: expected a uint8 array H x W, H x W x 3 or H x W x 4, "
                               f"got {a.dtype} {tuple(a.shape)}")
    if a.ndim == 2 or a.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(a.reshape(a.shape[:2])), cv2.COLOR_GRAY2BGR)
    a = np.ascontiguousarray(a)
    if a.shape[2] == 4:
        return cv2.cvtColor(a, cv2.COLOR_BGRA2BGR if color == "bgr" else cv2.COLOR_RGBA2BGR)
    return a if color == "bgr" else cv2.cvtColor(a, cv2.COLOR_RGB2BGR)


def _as_items(inputs: Any) -> Iterable[Any]:
    """One input, or an iterable of them (a str, bytes, array or PIL image is one input; N x H x W x 3: N)."""
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil(inputs):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        return list(inputs) if inputs.ndim == 4 else [inputs]
    return inputs


class Classifier:
    """A model opened for classification; use `Classifier.open(path)`, ideally in a `with` block."""

    def __init__(self, backend: Backend, threads: int | None = None, threshold: str | float = "contract") -> None:
        """Wrap an open backend (runtime.backends.open_backend); close() closes it. Classifier.open does both."""
        self.backend = backend
        self.contract: ModelContract = backend.contract
        self.labels: list[str] = list(self.contract.labels.names)
        self.category_ids: list[int] = list(self.contract.labels.category_ids)
        self.threshold = threshold
        self.thresholds, self._decided_by = decision_thresholds(self.contract, threshold, None)
        self._threads = threads or default_threads()

    @classmethod
    def open(cls, model: str | os.PathLike[str], device: str = "auto", backend: str | None = None,
             threads: int | None = None, threshold: str | float = "contract", **backend_options: Any) -> "Classifier":
        """Load `model` (.plan/.engine, .onnx, .pt) as probres-infer does (the same backend rules).

        device: "auto", "cpu" or "cuda"; backend: "tensorrt", "onnxruntime", "openvino", "pytorch"
        (default: by extension); threads: CPU threads for decoding and CPU inference (default: all
        cores, decoding at most 8); threshold: the decision, "contract" (the model's per-label
        thresholds, 0.5 without them) or one probability for every label; backend_options: the
        backend's own (provider=, precision=, cuda_graph=, compile=). ModelError (a BackendError)
        naming the file or option when it cannot load.
        """
        check_threshold(threshold)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        return cls(open_backend(model, device=device, threads=threads, backend=backend, **backend_options),
                   threads, threshold)

    def describe(self) -> str:
        """One line: the backend, device and precision that run the model."""
        return self.backend.describe()

    def close(self) -> None:
        """Free the backend's buffers and device memory."""
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Classifier({self.backend.path!r}, {len(self.labels)} labels, {self.describe()})"

    # ------------------------------------------------------------------------------------------ predict

    def predict(self, inputs: Any, batch_size: int | None = None, top_k: int | str | None = None,
                threshold: str | float | None = None, raise_errors: bool = False, color: str = "rgb"
                ) -> list[Prediction]:
        """One Prediction per image, in input order (a directory's images in its place).

        top_k: the K most probable labels ("all": every label); alone it ignores the threshold, as
        probres-infer --top-k does; with threshold, the K most probable of those that pass.
        threshold: "contract" or a probability (default: the one given to open).
        """
        return list(self.predict_iter(inputs, batch_size, top_k, threshold, raise_errors, color))

    def predict_iter(self, inputs: Any, batch_size: int | None = None, top_k: int | str | None = None,
                     threshold: str | float | None = None, raise_errors: bool = False, color: str = "rgb"
                     ) -> Iterator[Prediction]:
        """predict as a generator over an iterable of any length: memory is fixed by batch_size."""
        batch_size = check_batch_size(batch_size)
        if color not in ("rgb", "bgr"):
            raise UsageError(f"color must be 'rgb' or 'bgr', got {color!r}")
        top_k, thresholds, decided_by = self._decision(top_k, threshold)
        names: deque[tuple[str, bool]] = deque()   # (source name, in memory) of each item the pipeline reads
        sources = self._sources(_as_items(inputs), names, color)
        for batch, probs in classify(self.backend, sources, batch_size, self._threads):
            row = 0
            for item, err in zip(batch.paths, batch.errors):
                name, in_memory = names.popleft()
                if err is not None:
                    if in_memory and err.startswith("<"):     # the pipeline's "<N bytes>" -> this input's name
                        err = name + err[err.index(">") + 1:]
                    if raise_errors:
                        raise ImageError(err)
                    yield Prediction(name.partition("\0")[0], None, [], {}, thresholds, err, decided_by)
                    continue
                yield self._prediction(name, probs[row], thresholds, top_k, decided_by)
                row += 1

    def _decision(self, top_k: int | str | None, threshold: str | float | None
                  ) -> tuple[int | None, np.ndarray | None, str | float | None]:
        """(top_k as a number, thresholds, what the records say decided) for a call's top_k and threshold."""
        if top_k == "all":
            top_k = len(self.labels)
        elif top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise UsageError(f"top_k must be a positive integer or 'all', got {top_k!r}")
        if threshold is None and top_k is None:
            return top_k, self.thresholds, self._decided_by
        if threshold is not None:
            check_threshold(threshold)
        return (top_k, *decision_thresholds(self.contract, threshold, top_k))

    def _prediction(self, name: str, probs: np.ndarray, thresholds: np.ndarray | None, top_k: int | None,
                    decided_by: str | float | None, **frame: Any) -> Prediction:
        """The Prediction of one classified input (`frame`: a video frame's frame= and time_s=)."""
        p = probs.copy()                    # not a view: a Prediction must not keep the batch alive
        idx = select(p, thresholds, top_k)
        names = self.contract.labels.names
        return Prediction(name, p, [names[i] for i in idx], {names[i]: float(p[i]) for i in idx}, thresholds, None,
                          decided_by, self.contract.labels, tuple(idx), **frame)

    # ------------------------------------------------------------------------------------------ stream

    def stream(self, source: str | os.PathLike[str] | int, every: int = 1, fps: float | None = None,
               start: float | None = None, end: float | None = None, top_k: int | str | None = None,
               threshold: str | float | None = None, smooth: float | None = None, reconnect: int = 3,
               batch_size: int | None = None, raise_errors: bool = False, stats: LiveStats | None = None
               ) -> Iterator[Prediction]:
        """One Prediction per selected frame of a video, camera or stream, as probres-infer classifies it.

        source: a video file (whatever OpenCV's FFmpeg backend reads), a camera index (int) or
        /dev/videoN, a stream URL (rtsp://, http(s)://, ...) or a GStreamer pipeline string.
        every / fps: every N-th frame, or F frames a second by timestamp; start / end: seconds
        (files). A file gives every selected frame in order; a live source the newest frame each
        time the engine is free (`stats`, a runtime.video_frames.LiveStats, counts what was
        skipped). smooth: decide on each label's probability averaged (EMA) over about K frames.
        reconnect: live sources, how often a dropped stream is reopened in a row. Each Prediction
        has `frame` and `time_s`; to_json() is probres-infer's record for that frame. A source that
        cannot be read (or a file that breaks off) ends with one error Prediction (frame None), or
        an ImageError naming it with raise_errors=True.
        """
        batch_size = check_batch_size(batch_size)
        top_k, thresholds, decided_by = self._decision(top_k, threshold)
        try:
            select = Selector(every, fps, start or 0.0, end)
            if smooth is not None:
                Smoother(smooth)
        except (TypeError, ValueError) as e:
            raise UsageError(f"stream: every >= 1, fps > 0, 0 <= start < end, smooth >= 1 ({e})") from None
        src = source if isinstance(source, int) else os.fspath(source)
        name, stats = source_name(src), stats if stats is not None else LiveStats()
        fc = FrameClassifier(self.backend, batch_size, self._threads)
        done, error = 0, None
        try:
            with closing(stream_batches(fc, src, select, reconnect, smooth, stats, name)) as batches:
                for frames, probs in batches:
                    for f, p in zip(frames, probs):
                        yield self._prediction(name, p, thresholds, top_k, decided_by, **frame_fields(f))
                    done += len(frames)
        except (BackendError, MemoryError):
            raise
        except Exception as e:                  # VideoError, or OpenCV failing on a frame: this source's error
            error = source_error(name, e)
        finally:
            fc.close()
        if error is None and not done and stats.end_reason is not None:     # a live source that gave nothing
            error = no_frame_error(name, stats)
        if error is not None:
            if raise_errors:
                raise ImageError(error)
            yield Prediction(name, None, [], {}, thresholds, error, decided_by)

    def _sources(self, items: Iterable[Any], names: deque, color: str) -> Iterator[Any]:
        """What the pipeline reads for each item (a path, encoded bytes, a BGR array, or the item's
        error), its name appended to `names` first. Runs on the pipeline's reader thread, lazily."""
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                for path in iter_image_paths([item]):
                    names.append((path, False))
                    yield path
                continue
            name = _name_of(item, i)
            names.append((name, True))
            try:
                if isinstance(item, (bytes, bytearray, memoryview)):
                    yield item if isinstance(item, bytes) else bytes(item)
                elif isinstance(item, np.ndarray):
                    yield to_bgr(item, color, name)
                elif _is_pil(item):
                    yield to_bgr(np.asarray(item.convert("RGB")), "rgb", name)
                else:
                    yield ImageDecodeError(f"input #{i}: cannot classify a {type(item).__name__}; give a path, "
                                           f"encoded image bytes, a uint8 numpy array or a PIL image")
            except ImageDecodeError as e:
                yield e
