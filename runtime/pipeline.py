"""Streaming decode + preprocess in a thread pool, feeding a bounded queue of batches to the inference loop.

    python -c "from runtime.pipeline import iter_batches, iter_image_paths; from runtime.contract import PreprocessSpec; \
print(sum(len(b.paths) for b in iter_batches(iter_image_paths(['imgs']), PreprocessSpec(size=64))))"

A producer thread takes the input paths batch_size at a time and spreads each batch's images
over `threads` workers (cv2.imdecode/resize release the GIL, so they use every core), keeping
two batches in flight so the workers never idle at a batch boundary. Finished batches wait in
a queue of `prefetch` slots while the caller runs inference on the previous one. Batch
buffers (batch_size, 3, S, S) float32 are preallocated and recycled, so memory is fixed by
batch_size x (prefetch + 3), never by the number of images.

A bad input never stops the stream: it becomes an error message in its batch and the other
images go on. Before OpenCV sees a file, its header's claimed size is checked against
runtime.preprocess.MAX_IMAGE_PIXELS, so a decompression bomb (a tiny file claiming
30000 x 30000 pixels) is refused without allocating its pixels.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from runtime.contract import PreprocessSpec
from runtime.preprocess import (MAX_IMAGE_PIXELS, STREAM_BYTES, ImageDecodeError, decode_path_reusing,
                                preprocess_array_into, preprocess_into, read_bytes)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff"})
MAX_FILE_BYTES = 256 << 20     # no camera image is this big; refuse before reading it into memory
IN_FLIGHT = 2                  # batches being decoded at once


# ---------------------------------------------------------------------------------------------- inputs

def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(directory: str) -> Iterator[str]:
    """Image paths under `directory`, depth first, entries in sorted name order.

    An entry with an image extension is yielded whatever it is (a directory or FIFO named
    x.jpg then gets an error record rather than vanishing); other directories are descended,
    symlinked ones not (no loops).
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        yield f"{directory}\0{e.strerror or e}"     # reported as an error by load_into
        return
    for e in entries:
        if is_image_name(e.name):
            yield e.path
        elif e.is_dir(follow_symlinks=False):
            yield from _walk(e.path)


def iter_image_paths(paths: Iterable[str]) -> Iterator[str]:
    """Expand the command line: directories are walked recursively in sorted order (image
    extensions only); anything else named explicitly is yielded as is, whatever its extension."""
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            yield from _walk(p)
        else:
            yield p


# ---------------------------------------------------------------------------------------------- headers

def header_size(buf: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) claimed by a PNG, JPEG, BMP, WebP or TIFF header; None when unknown.

    Reads only the first bytes (JPEG: the marker segments up to the frame header).
    """
    b = bytes(buf[:64]) if len(buf) > 64 else bytes(buf)
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
            return struct.unpack(">II", b[16:24])
        if b[:2] == b"BM" and len(b) >= 26:
            if struct.unpack("<I", b[14:18])[0] == 12:              # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", b[18:22])
            w, h = struct.unpack("<ii", b[18:26])
            return abs(w), abs(h)
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            kind = b[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
            if kind == b"VP8L":
                bits = struct.unpack("<I", b[21:25])[0]
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", b[26:30])
                return w & 0x3FFF, h & 0x3FFF
            return None
        if b[:4] in (b"II*\0", b"MM\0*"):
            return _tiff_size(bytes(buf[:1 << 16]))
        if b[:2] == b"\xff\xd8":
            return _jpeg_size(buf)
    except (struct.error, IndexError):
        return None
    return None


def _tiff_size(b: bytes) -> tuple[int, int] | None:
    """Width/height tags (256/257) of a classic TIFF's first IFD."""
    e = "<" if b[:2] == b"II" else ">"
    (ifd,) = struct.unpack(e + "I", b[4:8])
    (n,) = struct.unpack(e + "H", b[ifd:ifd + 2])
    found: dict[int, int] = {}
    for i in range(min(n, 512)):
        tag, typ, _count = struct.unpack(e + "HHI", b[ifd + 2 + 12 * i: ifd + 10 + 12 * i])
        if tag in (256, 257):
            raw = b[ifd + 10 + 12 * i: ifd + 14 + 12 * i]
            found[tag] = struct.unpack(e + "H", raw[:2])[0] if typ == 3 else struct.unpack(e + "I", raw)[0]
    return (found[256], found[257]) if 256 in found and 257 in found else None


def _jpeg_size(buf: bytes | memoryview) -> tuple[int, int] | None:
    """Walk JPEG marker segments to the first SOFn frame header: (width, height)."""
    mv = memoryview(buf)
    pos, n = 2, len(mv)
    for _ in range(10000):
        if pos >= n or mv[pos] != 0xFF:           # not at a marker: malformed, OpenCV will say so
            return None
        while pos < n and mv[pos] == 0xFF:        # marker prefix and fill bytes
            pos += 1
        if pos + 1 >= n:
            return None
        m = mv[pos]
        pos += 1
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:   # standalone markers
            continue
        if m == 0xD9 or pos + 2 > n:
            return None
        (length,) = struct.unpack(">H", mv[pos:pos + 2])
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", mv[pos + 3:pos + 7])
            return w, h
        pos += length
    return None


def check_header(buf: bytes | memoryview, name: str) -> None:
    """ImageDecodeError when the header claims more than MAX_IMAGE_PIXELS pixels."""
    size = header_size(buf)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{name}: image too large ({size[0]}x{size[1]} pixels claimed by its header, "
                               f"limit {MAX_IMAGE_PIXELS} pixels): refusing to decode")


# ---------------------------------------------------------------------------------------------- one image

def load_into(path: str, out: np.ndarray, spec: PreprocessSpec, stream: bool = False) -> None:
    """Read, check, decode and preprocess `path` into `out` (3, S, S); ImageDecodeError naming it on failure.

    stream: non-temporal stores (out is a row of a batch much larger than the CPU cache).
    """
    if "\0" in path:                               # an unreadable directory from _walk
        d, why = path.split("\0", 1)
        raise ImageDecodeError(f"{d}: cannot list directory ({why})")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageDecodeError(f"{path}: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise ImageDecodeError(f"{path}: is a directory, not an image")
    if not os.path.isfile(path):
        raise ImageDecodeError(f"{path}: not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{path}: file too large ({st.st_size} bytes, limit {MAX_FILE_BYTES})")
    # A complete JPEG/PNG within the pixel limit (checked from its header first) is decoded into
    # this thread's reused buffer: no page faults for a fresh ~1 MB array per image. Anything
    # else takes the checked path below, which words every error.
    img = decode_path_reusing(path)
    if img is not None:
        preprocess_array_into(img, out, spec, stream=stream)
        return
    buf = read_bytes(path)
    check_header(buf.data, path)
    preprocess_into(buf.data, out, spec, name=path)


def _load(path: str, out: np.ndarray, spec: PreprocessSpec, stream: bool = False) -> str | None:
    """load_into, with every failure turned into a one-line message (None = ok)."""
    try:
        load_into(path, out, spec, stream)
        return None
    except ImageDecodeError as e:
        return str(e)
    except Exception as e:  # cv2.error, MemoryError...: still this image's problem, not the run's
        text = str(e).strip().splitlines()
        return f"{path}: {e.__class__.__name__}: {text[-1] if text else 'failed'}"


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """One batch of inputs, in input order.

    paths[i] failed when errors[i] is not None; the others' pixels are data's rows, in order.
    `data` (n_ok, 3, S, S) float32 is a recycled buffer: valid until the next batch is requested.
    """

    start: int                    # index of paths[0] in the whole input stream
    paths: list[str]
    errors: list[str | None]
    data: np.ndarray

    @property
    def ok(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is None]


_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def iter_batches(paths: Iterable[str], spec: PreprocessSpec, batch_size: int = 16, threads: int = 4,
                 prefetch: int = 1) -> Iterator[Batch]:
    """Decode + preprocess `paths` in a background thread pool; yield Batch objects in input order."""
    if batch_size < 1 or threads < 1 or prefetch < 1:
        raise ValueError("batch_size, threads and prefetch must be >= 1")
    s = spec.size
    free: queue.Queue = queue.Queue()
    for _ in range(IN_FLIGHT + prefetch + 1):          # in flight + queued + held by the caller
        free.put(np.empty((batch_size, 3, s, s), dtype=np.float32))
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probres-decode")
    source = iter(paths)

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
            inflight: deque[tuple[int, list[str], np.ndarray, list[Future]]] = deque()
            start, more = 0, True
            while not stop.is_set():
                while more and len(inflight) < IN_FLIGHT:
                    chunk = list(islice(source, batch_size))
                    if not chunk:
                        more = False
                        break
                    buf = wait(free.get)
                    if buf is None:
                        return
                    stream = buf.nbytes >= STREAM_BYTES
                    futs = [pool.submit(_load, p, buf[i], spec, stream) for i, p in enumerate(chunk)]
                    inflight.append((start, chunk, buf, futs))
                    start += len(chunk)
                if not inflight:
                    break
                first, chunk, buf, futs = inflight.popleft()
                errors = [f.result() for f in futs]
                ok = [i for i, e in enumerate(errors) if e is None]
                for dst, src in enumerate(ok):         # compact the good rows to the front
                    if dst != src:
                        buf[dst] = buf[src]
                wait(ready.put, (Batch(first, chunk, errors, buf[:len(ok)]), buf))
            wait(ready.put, _END)
        except BaseException as e:  # a bug or a failing path iterator: re-raised in the caller
            wait(ready.put, _Failed(e))

    producer = threading.Thread(target=produce, name="probres-producer", daemon=True)
    producer.start()
    held = None
    try:
        while True:
            if held is not None:
                free.put(held)
                held = None
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            batch, held = item
            yield batch
    finally:
        stop.set()
        producer.join()
        pool.shutdown(wait=True, cancel_futures=True)
