"""The one image path: decode + preprocess in a thread pool, straight into the backend's own input buffers.

    python -c "from runtime.pipeline import iter_batches, iter_image_paths; from runtime.contract import PreprocessSpec; \
print(sum(len(b.paths) for b in iter_batches(iter_image_paths(['imgs']), PreprocessSpec(size=64))))"

One batching engine (`runtime.preprocess.fill_rows`) writes images into the rows of a batch buffer,
one task per worker, each taking the next image (cv2 decode and the C kernel release the GIL, so
workers use every core). `runtime.preprocess.preprocess()` is a single call of it; `iter_batches` streams:
a producer thread takes the input paths batch_size at a time from a reader thread
(`runtime.chunks`: a pause in the input, as on stdin, closes a partial batch instead of holding
back the images before it), keeping two batches in flight so the workers never idle at a batch
boundary, and finished batches wait in a queue of `prefetch` slots while the caller runs
inference. The buffers come from `allocate` (a backend's `allocate_inputs`: its input dtype,
pinned memory on a GPU), once per run, sized min(batch_size, inputs) by reading a few batches of
paths ahead (never the whole list), and recycled: memory is fixed by batch_size x (IN_FLIGHT +
prefetch + hold), never by the number of images.
`classify` is probres-infer's loop over them: batch k+1 is submitted before batch k is waited for.

A bad input never stops the stream: it becomes an error message in its batch and the other
images go on. Every image is decoded by runtime.decode.decode_source: before OpenCV sees a file,
its header's claimed size is checked against MAX_IMAGE_PIXELS, so a decompression bomb (a tiny
file claiming 30000 x 30000 pixels) is refused without allocating its pixels.
Imports point one way: headers <- decode <- preprocess <- pipeline.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from runtime.chunks import Chunks
from runtime.contract import PreprocessSpec
from runtime.decode import ImageDecodeError, ImageSource
from runtime.preprocess import OUT_DTYPES, RowFill, aligned_empty, fill_rows

if TYPE_CHECKING:
    from runtime.backends.base import Backend, Pending

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff"})
IN_FLIGHT = 2                  # batches being decoded at once
FIRST_LINGER_S = 1.0           # a pause before the first batch is full: take it (later ones: chunks.LINGER_S)


# ---------------------------------------------------------------------------------------------- inputs

def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(directory: str, keep: Callable[[str], bool] = is_image_name) -> Iterator[str]:
    """Image paths (names `keep` accepts) under `directory`, depth first, entries in sorted name order.

    An entry with an image extension is yielded whatever it is (a directory or FIFO named
    x.jpg then gets an error record rather than vanishing); other directories are descended,
    symlinked ones not (no loops).
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        yield f"{directory}\0{e.strerror or e}"     # reported as an error by runtime.decode.decode_source
        return
    for e in entries:
        if keep(e.name):
            yield e.path
        elif e.is_dir(follow_symlinks=False):
            yield from _walk(e.path, keep)


def iter_image_paths(paths: Iterable[str], keep: Callable[[str], bool] = is_image_name) -> Iterator[str]:
    """Expand the command line: directories are walked recursively in sorted order (image
    extensions only, or the names `keep` accepts: runtime.video adds videos); anything else
    named explicitly is yielded as is, whatever its extension."""
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            yield from _walk(p, keep)
        else:
            yield p


# ---------------------------------------------------------------------------------------------- errors

def error_message(src: ImageSource, e: BaseException) -> str:
    """One line for a failed input: ImageDecodeError's own message, else the input and the exception."""
    if isinstance(e, ImageDecodeError):
        return str(e)
    text = str(e).strip().splitlines()        # cv2.error, MemoryError...: still this image's problem
    name = (f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else
            f"<array {'x'.join(map(str, src.shape))}>" if isinstance(src, np.ndarray) else os.fspath(src))
    return f"{name}: {e.__class__.__name__}: {text[-1] if text else 'failed'}"


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """One batch of inputs, in input order.

    paths[i] failed when errors[i] is not None; the others' pixels are data's rows, in order.
    `data` (n_ok, 3, S, S) is a view of a recycled buffer (the backend's own when iter_batches got
    its allocate_inputs): valid until `hold` more batches have been requested.
    """

    start: int                    # index of paths[0] in the whole input stream
    paths: list[str]
    errors: list[str | None]
    data: np.ndarray
    next_ready: Callable[[], bool] = field(default=lambda: False, repr=False, compare=False)
    """True when the next batch (or the end of the stream) is already waiting: taking it will not block."""

    @property
    def ok(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is None]


Allocate = Callable[[int, int], "list[np.ndarray]"]
_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def numpy_buffers(spec: PreprocessSpec, dtype: "np.typing.DTypeLike" = np.float32) -> Allocate:
    """allocate(batch_size, count) for callers without a backend: 64-byte aligned numpy buffers."""
    return lambda b, count: [aligned_empty((b, 3, spec.size, spec.size), dtype) for _ in range(count)]


def _allocate(allocate: Allocate, rows: int, count: int, spec: PreprocessSpec) -> list[np.ndarray]:
    """`count` checked buffers of (rows, 3, S, S); MemoryError saying how much and which flag."""
    s = spec.size
    try:
        bufs = list(allocate(rows, count))
    except MemoryError:
        gib = count * rows * 3 * s * s * 4 / 2**30
        raise MemoryError(f"--batch-size {rows}: {count} input buffers of {rows} images ({gib:.1f} GiB as float32) "
                          f"do not fit in memory; use a smaller --batch-size") from None
    for b in bufs:
        if (not isinstance(b, np.ndarray) or b.dtype not in OUT_DTYPES or b.shape != (rows, 3, s, s)
                or not b.flags.c_contiguous):
            raise ValueError(f"allocate gave {getattr(b, 'dtype', type(b).__name__)} {getattr(b, 'shape', '')}, "
                             f"expected C-contiguous float32/float16 ({rows}, 3, {s}, {s})")
    if len(bufs) != count:
        raise ValueError(f"allocate gave {len(bufs)} buffers, expected {count}")
    return bufs


def iter_batches(paths: Iterable[str], spec: PreprocessSpec, batch_size: int = 16, threads: int = 4,
                 prefetch: int = 1, allocate: Allocate | None = None, hold: int = 1) -> Iterator[Batch]:
    """Decode + preprocess `paths` in a background thread pool; yield Batch objects in input order.

    allocate(rows, count): the `count` buffers (rows, 3, S, S) float32/float16 to write into, e.g.
    a backend's allocate_inputs (default: float32 numpy). Called once, with rows = min(batch_size,
    number of inputs): the reader is at most chunks.READ_AHEAD + 1 batches of paths ahead, never
    the whole list.
    hold: batches the caller keeps at once (2 for submit k+1 before wait k); a batch's buffer is
    recycled when `hold` later batches have been requested.
    """
    if batch_size < 1 or threads < 1 or prefetch < 1 or hold < 1:
        raise ValueError("batch_size, threads, prefetch and hold must be >= 1")
    chunks = Chunks(paths, batch_size)
    free: queue.Queue = queue.Queue()
    try:
        # The peek: the first batch of paths (a pause in the input closes it only after FIRST_LINGER_S,
        # so that a short list is always seen whole, whatever the scheduling).
        first = chunks.next(linger=FIRST_LINGER_S)
        if not first:
            return
        # A first batch that is the whole input gets one buffer of its size (--batch-size 100000 on
        # one image allocates one image, not 56 GiB).
        rows, count = (len(first), 1) if chunks.ended() else (batch_size, IN_FLIGHT + prefetch + hold)
        for b in _allocate(allocate or numpy_buffers(spec), rows, count, spec):
            free.put(b)
    except BaseException:
        chunks.close()
        raise
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probres-decode")
    next_ready = lambda: not ready.empty()  # noqa: E731

    def wait(op, *args):
        """A blocking queue op that gives up when the consumer has gone away."""
        while not stop.is_set():
            try:
                return op(*args, timeout=0.1)
            except (queue.Empty, queue.Full):
                continue
        return None

    def produce() -> None:
        try:
            inflight: deque[tuple[int, list[str], np.ndarray, RowFill]] = deque()
            start, more, chunk = 0, True, first
            while not stop.is_set():
                while more and len(inflight) < IN_FLIGHT:
                    # With a batch in flight, only take paths already there: a paused input must not
                    # hold back the batch decoded before it.
                    chunk = chunk or chunks.next(block=not inflight, stop=stop.is_set)
                    if chunk is None:
                        more = False
                        break
                    if not chunk:
                        break
                    buf = wait(free.get)
                    if buf is None:
                        return
                    inflight.append((start, chunk, buf, fill_rows(chunk, buf, spec, pool, threads)))
                    start += len(chunk)
                    chunk = None
                if not inflight:
                    break
                first_index, paths_k, buf, fill = inflight.popleft()
                errors = [None if e is None else error_message(p, e) for p, e in zip(paths_k, fill.result())]
                ok = [i for i, e in enumerate(errors) if e is None]
                for dst, src in enumerate(ok):         # compact the good rows to the front (in place)
                    if dst != src:
                        buf[dst] = buf[src]
                wait(ready.put, (Batch(first_index, paths_k, errors, buf[:len(ok)], next_ready), buf))
            wait(ready.put, _END)
        except BaseException as e:  # a bug or a failing path iterator: re-raised in the caller
            wait(ready.put, _Failed(e))

    producer = threading.Thread(target=produce, name="probres-producer", daemon=True)
    producer.start()
    held: deque[np.ndarray] = deque()
    try:
        while True:
            while len(held) >= hold:
                free.put(held.popleft())
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            batch, buf = item
            held.append(buf)
            yield batch
    finally:
        stop.set()
        chunks.close()
        producer.join()
        pool.shutdown(wait=True, cancel_futures=True)


def classify(backend: "Backend", paths: Iterable[str], batch_size: int = 16, threads: int = 4,
             allocate: Allocate | None = None) -> Iterator[tuple[Batch, np.ndarray | None]]:
    """probres-infer's loop: (batch, probs float32 (len(batch.ok), C) or None if no image decoded), in order.

    Images are preprocessed straight into the backend's own buffers (allocate_inputs: its input
    dtype, pinned on a GPU) and batch k+1 is submitted before batch k's result is waited for, so
    an asynchronous backend transfers k+1 while it computes k. No batch is copied on the host.
    When batch k+1 is not decoded yet (decode is the bound, or inputs stream in slowly on stdin),
    batch k is finished at once instead of held: the engine would idle anyway, and no result
    waits on inputs that have not arrived. allocate: where the buffers come from (default
    backend.allocate_inputs; runtime.video passes views of buffers it reuses across sources).
    """
    def done(b: Batch, p: Pending | None) -> tuple[Batch, np.ndarray | None]:
        return b, (p.wait() if p is not None else None)

    prev: tuple[Batch, Pending | None] | None = None
    batches = iter_batches(paths, backend.contract.preprocess, batch_size, threads,
                           allocate=allocate or backend.allocate_inputs, hold=2)
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except BaseException:      # Ctrl-C or a failing path source: the submitted batch still counts
                if prev is not None:
                    yield done(*prev)
                raise
            pending = backend.submit(batch.data) if len(batch.data) else None
            if prev is not None:
                yield done(*prev)
            prev = (batch, pending)
            if not batch.next_ready():
                yield done(*prev)
                prev = None
        if prev is not None:
            yield done(*prev)
    finally:
        batches.close()                # the caller stopped early: stop the decode threads now
