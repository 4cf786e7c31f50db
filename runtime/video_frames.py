"""Classify frames with a backend: the two policies of runtime.video_sources, the image path's preprocessing.

    python -c "from runtime.backends import open_backend; from runtime.video_frames import FrameClassifier, \
stream_batches; fc = FrameClassifier(open_backend('model.onnx')); \
print(sum(len(f) for f, _ in stream_batches(fc, 'clip.mp4')))"

Frames go through the image path's preprocessing (runtime.preprocess.fill_rows, preprocess_array_into on
the decoded BGR array, straight into the backend's own input buffers), so a frame's
probabilities are those of the same pixels classified as an image. Files: every selected frame
in order, in batches; decoding (one thread, the source's) overlaps preprocessing (a pool) and
inference (batch k+1 submitted before batch k is waited for). Live sources: the newest frame,
one at a time, so a record is about one decode plus one inference behind the camera. The
input buffers are allocated once per FrameClassifier and reused by every source: memory is
fixed by batch size x BUFFERS, never by the number of frames or sources.
`stream_batches` is one source's (frames, probabilities) stream; --smooth K (`Smoother`) is an
exponential moving average of each label's probability over about K frames, alpha 2/(K+1).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from runtime.pipeline import classify
from runtime.preprocess import fill_rows, preprocess_array_into
from runtime.video_sources import Frame, LiveSource, Selector, VideoError, describe_error, is_live, iter_file_frames

if TYPE_CHECKING:
    from runtime.backends.base import Backend

BUFFERS = 4                    # two queued (being preprocessed), two with the engine (submit k+1 before wait k)
_END = object()


# ---------------------------------------------------------------------------------------------- smoothing

class Smoother:
    """Exponential moving average of each label's probability over about `k` frames (alpha = 2 / (k + 1))."""

    def __init__(self, k: float) -> None:
        if k < 1:
            raise ValueError("--smooth K needs K >= 1")
        self.alpha, self.state = 2.0 / (k + 1.0), None

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        """(C,) probabilities of the next frame -> (C,) smoothed, float32."""
        p = np.asarray(probs, dtype=np.float64)
        self.state = p.copy() if self.state is None else self.state + self.alpha * (p - self.state)
        return self.state.astype(np.float32)


# ---------------------------------------------------------------------------------------------- classifying frames

@dataclass
class LiveStats:
    """What a live source did: frames read, skipped (replaced before inference took them), reconnects, why it ended."""

    read: int = 0
    skipped: int = 0
    reconnects: int = 0
    end_reason: str | None = None


class FrameClassifier:
    """Classifies frames (and images) with one backend, in input buffers (the backend's own) allocated
    once per run and reused by every source, so memory does not grow with the number of sources."""

    def __init__(self, backend: "Backend", batch_size: int = 16, threads: int = 2) -> None:
        self.backend, self.batch_size, self.spec = backend, batch_size, backend.contract.preprocess
        self._bufs: list[np.ndarray] = []
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probres-frames")
        self._workers = threads

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def buffers(self, count: int) -> list[np.ndarray]:
        """The first `count` (batch_size, 3, S, S) input buffers, allocated on first need."""
        if len(self._bufs) < count:
            self._bufs += self.backend.allocate_inputs(self.batch_size, count - len(self._bufs))
        return self._bufs[:count]

    def allocate(self, rows: int, count: int) -> list[np.ndarray]:
        """runtime.pipeline's allocate(rows, count) for images, as views of the same buffers."""
        return [b[:rows] for b in self.buffers(count)]

    def images(self, paths: Iterable[str], threads: int) -> Iterator:
        """runtime.pipeline.classify over image paths, in these buffers."""
        return classify(self.backend, paths, self.batch_size, threads, allocate=self.allocate)

    def files(self, frames: Iterable[Frame]) -> Iterator[tuple[list[Frame], np.ndarray]]:
        """(frames, probs (n, C)) batches, every frame in order; the frames' error (VideoError...) is raised
        after the batches decoded before it."""
        ready: queue.Queue = queue.Queue(maxsize=BUFFERS - 2)
        stop = threading.Event()
        free: queue.Queue = queue.Queue()
        for b in self.buffers(BUFFERS):
            free.put(b)

        def take_buffer() -> np.ndarray | None:
            while not stop.is_set():
                try:
                    return free.get(timeout=0.1)
                except queue.Empty:
                    continue
            return None

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    continue

        def produce() -> None:
            batch: list[Frame] = []

            def hand_off() -> bool:
                """Start preprocessing `batch` into a free buffer (runtime.preprocess.fill_rows) and queue it."""
                nonlocal batch
                buf = take_buffer()
                if buf is None:
                    return False
                put((batch, buf, fill_rows([f.image for f in batch], buf, self.spec, self._pool, self._workers)))
                batch = []
                return True

            try:
                for fr in frames:
                    batch.append(fr)
                    if len(batch) == self.batch_size and not hand_off():
                        return
                if not batch or hand_off():
                    put(_END)
            except BaseException as e:              # the source's error, after the frames decoded before it
                if not batch or hand_off():
                    put(e)
            finally:
                getattr(frames, "close", lambda: None)()

        producer = threading.Thread(target=produce, name="probres-video", daemon=True)
        producer.start()
        prev = None

        def done(p: tuple) -> tuple[list[Frame], np.ndarray]:
            batch, buf, pending = p
            try:
                return batch, pending.wait()
            finally:
                free.put(buf)

        try:
            while True:
                item = ready.get()
                if item is _END or isinstance(item, BaseException):
                    break
                batch, buf, fill = item
                error = next((e for e in fill.result() if e is not None), None)
                for f in batch:                     # preprocessed: let their pixels go
                    f.image = None
                item = fill = None
                if error is not None:               # OpenCV refused a frame: this source's error, in order
                    free.put(buf)
                    item = VideoError(f"{batch[0].source}: frames {batch[0].index}-{batch[-1].index}: "
                                      f"{describe_error(error)}")
                    break
                pending = self.backend.submit(buf[:len(batch)])
                if prev is not None:
                    p, prev = prev, None
                    yield done(p)
                prev = (batch, buf, pending)
                if ready.empty():                   # the next batch is not decoded yet: do not hold this one
                    p, prev = prev, None
                    yield done(p)
            if prev is not None:
                p, prev = prev, None
                yield done(p)
            if isinstance(item, BaseException):
                raise item
        finally:
            stop.set()
            producer.join()

    def live(self, source: LiveSource, fps: float | None = None) -> Iterator[tuple[list[Frame], np.ndarray]]:
        """([frame], probs (1, C)) for the newest frame each time the engine is free (at most `fps` a second)."""
        buf = self.buffers(1)[0]
        next_t = 0.0
        while True:
            if fps:
                time.sleep(max(0.0, next_t - time.perf_counter()))
            frame = source.take()
            if frame is None:
                return
            next_t = time.perf_counter() + 1.0 / fps if fps else 0.0
            preprocess_array_into(frame.image, buf[0], self.spec)
            frame.image = None
            yield [frame], self.backend.infer(buf[:1])


def source_name(source: str | int) -> str:
    """A source's name in records: the path or URL as given, "camera:N" for a camera index."""
    return f"camera:{source}" if isinstance(source, int) else source


def frame_fields(frame: Frame) -> dict:
    """A frame's record fields after "image": its index in the source and its time (to the microsecond)."""
    return {"frame": frame.index, "time_s": round(frame.time_s, 6)}


def source_error(name: str, e: Exception) -> str:
    """The one-line error record of a source that failed: a VideoError's own words, else the exception's."""
    return str(e) if isinstance(e, VideoError) else f"{name}: {describe_error(e)}"


def no_frame_error(name: str, stats: LiveStats) -> str:
    """The error record of a live source that ended before a frame was classified."""
    return f"{name}: no frame classified ({stats.end_reason})"


def stream_batches(fc: FrameClassifier, source: str | int, select: Selector | None = None, reconnect: int = 0,
                   smooth: float | None = None, stats: LiveStats | None = None,
                   name: str | None = None) -> Iterator[tuple[list[Frame], np.ndarray]]:
    """One source's (frames, probs) batches: a file's selected frames in order, or a live source's newest frames
    (a camera index, /dev/videoN, URL or GStreamer pipeline; `stats` is filled as it runs). --smooth applies."""
    select = select or Selector()
    smoother = Smoother(smooth) if smooth else None
    if isinstance(source, int) or is_live(source):
        live = LiveSource(source, name, every=select.every, reconnect=reconnect)
        batches = fc.live(live, select.fps)
    else:
        live, batches = None, fc.files(iter_file_frames(source, select))
    try:
        if live is not None:
            live.__enter__()
        for frames, probs in batches:
            if smoother is not None:
                probs = np.stack([smoother(p) for p in probs])
            if live is not None and stats is not None:
                stats.read, stats.skipped, stats.reconnects = live.read, live.skipped, live.reconnects
            yield frames, probs
    finally:
        batches.close()
        if live is not None:
            live.close()
            if stats is not None:
                stats.read, stats.skipped, stats.reconnects = live.read, live.skipped, live.reconnects
                stats.end_reason = live.end_reason
