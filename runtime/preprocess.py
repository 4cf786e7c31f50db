"""Image preprocessing with OpenCV: the one function training's evaluation and the runtime share.

    python -c "from runtime.preprocess import preprocess; print(preprocess(['img.jpg']).shape)"

decode (path or encoded bytes: runtime.decode.decode_source, the one decode path) -> resize to
S x S -> RGB (x/255 - mean)/std -> float32 CHW, batched as (N, 3, S, S) by the one batching
engine (fill_rows; runtime.pipeline streams it). No torch: this ships to the device.

Interpolation, chosen deliberately: COCO images shrink about 1.1-1.4x to 448, camera frames
3-4x. cv2.INTER_LINEAR samples only 2x2 source pixels per output pixel, so on a 3-4x
downscale it skips most of the input and aliases; PIL/torchvision widen their filter
when shrinking (antialias), and a train/deploy mismatch there has cost measurable accuracy
(torchvision #6506, #7093). When the image shrinks on either side we use the exact box
("area") filter: each output pixel is the mean of the source over its footprint, fractional
edge pixels weighted by coverage. That is what cv2.INTER_AREA computes when both sides shrink
(up to float rounding and its rounding to uint8), but cv2 falls back to a 2-tap filter when one
side grows (COCO's commonest 640x427 -> 448x448), and its INTER_AREA alone costs more than the
JPEG decode here. Ours is one fused C pass (runtime/_cext/fastnorm.c: resize + BGR->RGB +
normalize + HWC->CHW, straight into the caller's batch buffer, GIL released) with an exact numpy
twin when the extension is not built; both give the same float32 bits. When the image grows on
both sides, cv2.INTER_LINEAR (a box filter would degenerate towards nearest-neighbour).

Reduced-size JPEG decoding (libjpeg DCT scaling, cv2.IMREAD_REDUCED_COLOR_2/4) is not used: it
changes pixels (the DCT-domain downscale is not the area mean) and applies only at >= 2x, which
COCO's ~640 px images never reach at 448 (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

# runtime.decode first: it sets OpenCV's pixel limit before cv2 is imported.
from runtime.decode import (ImageDecodeError, ImageSource, decode, decode_bgr,  # noqa: F401  (re-exported)
                            decode_source)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from runtime.contract import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec  # noqa: E402

OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

try:  # the fused C kernel (runtime/_cext/fastnorm.c), built by `pip install -e .`
    from runtime import _fastnorm
except ImportError:  # not built (no compiler): the numpy twin gives the same float32, slower
    _fastnorm = None


def uses_area(h: int, w: int, size: int, interpolation: str = "area") -> bool:
    """True when an h x w image goes to size x size by the exact area filter (it shrinks on a side)."""
    return interpolation == "area" and (h > size or w > size)


def area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact box-filter taps along one axis: (start (n_out,), weights (n_out, K) float32, denom).

    Output d covers source [d*n_in/n_out, (d+1)*n_in/n_out). In units of gcd(n_in, n_out)/n_out
    source pixels every overlap is a whole number, so output d = sum_k weights[d, k] *
    src[start[d] + k] / denom with integer weights (zero-padded to K) summing to denom = n_in/gcd.
    The C kernel (runtime/_cext/fastnorm.c) builds the same table.
    """
    g = math.gcd(n_in, n_out)
    a = np.arange(n_out, dtype=np.int64) * n_in
    b = a + n_in
    s0, s1 = a // n_out, (b - 1) // n_out
    s = s0[:, None] + np.arange(int((s1 - s0).max()) + 1)[None, :]
    overlap = np.minimum((s + 1) * n_out, b[:, None]) - np.maximum(s * n_out, a[:, None])
    return s0, (np.clip(overlap, 0, None) // g).astype(np.float32), n_in // g


def _area_sums(img: np.ndarray, h: int, w: int) -> tuple[np.ndarray, int]:
    """(h, w, C) float32 weighted sums of the exact area filter and their common denominator.

    The same float32 operations in the same order as the C kernel: horizontal taps then
    vertical taps, each `acc = acc + weight * value` with k ascending (zero weights add +0).
    """
    H, W = img.shape[:2]
    ys, yw, dy = area_taps(H, h)
    xs, xw, dx = area_taps(W, w)
    hs = np.zeros((H, w, img.shape[2]), np.float32)
    for k in range(xw.shape[1]):
        hs += xw[None, :, k, None] * img[:, np.minimum(xs + k, W - 1)]     # (H, w, C)
    acc = np.zeros((h, w, img.shape[2]), np.float32)
    for k in range(yw.shape[1]):
        acc += yw[:, k, None, None] * hs[np.minimum(ys + k, H - 1)]        # (h, w, C)
    return acc, dx * dy


def resize(img: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize an HxWxC uint8 image to size x size as preprocessing does, as uint8.

    "area" while shrinking on either side: the exact box filter (the mean over each output
    pixel's footprint), rounded half to even; otherwise cv2.INTER_LINEAR. `preprocess`
    normalizes the unrounded means, so normalize(resize(x)) differs from it by < 0.5 LSB.
    """
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    if uses_area(h, w, size, interpolation):
        sums, denom = _area_sums(img if img.ndim == 3 else img[:, :, None], size, size)
        out = np.rint(sums.astype(np.float64) / denom).astype(np.uint8)
        return out if img.ndim == 3 else out[:, :, 0]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def normalize_coefficients(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-RGB-channel (scale, bias) with (x/255 - mean)/std == x*scale + bias, in float32."""
    std64 = np.asarray(std, dtype=np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    bias = (-np.asarray(mean, dtype=np.float64) / std64).astype(np.float32)
    return scale, bias


def _check_out(out: np.ndarray) -> None:
    if not isinstance(out, np.ndarray) or out.dtype not in OUT_DTYPES or out.ndim != 3 or out.shape[0] != 3:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a float32 or float16 (3, h, w) array, got {got}")


def resize_normalize_into(bgr: np.ndarray, out: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                          interpolation: str = "area", use_ext: bool | None = None,
                          stream: bool = False) -> np.ndarray:
    """The post-decode half of preprocessing: H x W x 3 BGR uint8 -> out (3, h, w) RGB planes.

    out[c] = area_mean(bgr[..., 2-c]) * float32(scale[c]) + bias[c] when the image shrinks on a
    side (exact box filter, no rounding to uint8 in between); otherwise cv2.INTER_LINEAR to
    (h, w) first. out may be float32 or float16 (rounded from the float32 value) and may be a
    row of a preallocated batch. The C extension does it in one pass without the GIL; the numpy
    twin (use_ext=False, or when the extension is not built) gives bit-identical results.
    stream: non-temporal stores (for batch buffers much larger than the CPU cache).
    """
    _check_out(out)
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"bgr must be a uint8 (H, W, 3) image, got {bgr.dtype} {bgr.shape}")
    h, w = out.shape[1:]
    H, W = bgr.shape[:2]
    if (H, W) != (h, w) and not (interpolation == "area" and (H > h or W > w)):
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    if use_ext is None:
        use_ext = _fastnorm is not None
    if use_ext and out.flags.c_contiguous:
        if bgr.strides[1:] != (3, 1):
            bgr = np.ascontiguousarray(bgr)
        _fastnorm.resize_normalize(bgr, out, tuple(map(float, scale)), tuple(map(float, bias)), stream=stream)
        return out
    if bgr.shape[:2] == (h, w):
        sums, denom = bgr, 1
    else:
        sums, denom = _area_sums(bgr, h, w)
    tmp = out if out.dtype == np.float32 else np.empty(out.shape, np.float32)
    for c in range(3):
        k = np.float32(float(np.float32(scale[c])) / denom)               # float32(scale / (Dx*Dy))
        np.multiply(sums[:, :, 2 - c], k, out=tmp[c], dtype=np.float32)
        tmp[c] += np.float32(bias[c])
    if tmp is not out:
        out[...] = tmp                                                     # float32 -> float16, RNE
    return out


def normalize_bgr_into(bgr: np.ndarray, out: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Write (3, S, S) RGB planes of x*scale+bias from an S x S x 3 BGR uint8 image into `out`.

    The channel swap is folded into the plane order, so no cvtColor pass is needed.
    Each output element is float32(x) * scale[c] + bias[c], two float32 roundings;
    the C extension computes the same expression.
    """
    if bgr.shape[:2] != out.shape[1:]:
        raise ValueError(f"normalize_bgr_into: image {bgr.shape[:2]} does not match out {out.shape[1:]}")
    return resize_normalize_into(bgr, out, scale, bias)


def _spec(spec: PreprocessSpec | None, size: int, mean, std, interpolation: str) -> PreprocessSpec:
    if spec is not None:
        return spec
    return PreprocessSpec(size=int(size), mean=tuple(mean), std=tuple(std), interpolation=interpolation)


def preprocess_array_into(bgr: np.ndarray, out: np.ndarray, spec: PreprocessSpec, stream: bool = False) -> np.ndarray:
    """A decoded BGR uint8 image (e.g. a training crop, any row stride) -> out (3, S, S).

    stream=True: non-temporal stores, for rows of a batch larger than the cache (STREAM_BYTES).
    """
    scale, bias = normalize_coefficients(spec.mean, spec.std)
    return resize_normalize_into(bgr, out, scale, bias, spec.interpolation, stream=stream)


def preprocess_into(src: ImageSource, out: np.ndarray, spec: PreprocessSpec, name: str | None = None,
                    stream: bool = False) -> np.ndarray:
    """Preprocess one path or encoded bytes into `out` (3, S, S) float32 (or float16), e.g. a row of a batch.

    The one decode path (runtime.decode.decode_source: file checks, header pixel limit, reused
    decode buffer) then the one preprocessing (preprocess_array_into).
    """
    return preprocess_array_into(decode_source(src, name), out, spec, stream=stream)


def preprocess_one(src: ImageSource, spec: PreprocessSpec | None = None, name: str | None = None) -> np.ndarray:
    """One image -> (3, S, S) float32."""
    spec = spec or PreprocessSpec()
    out = np.empty((3, spec.size, spec.size), dtype=np.float32)
    return preprocess_into(src, out, spec, name)


# Batches at least this big are written with streaming stores: they cannot stay in the CPU cache
# until the model reads them anyway, and streaming skips reading each line before writing it.
STREAM_BYTES = 16 << 20


def aligned_empty(shape: tuple[int, ...], dtype: "np.typing.DTypeLike" = np.float32, align: int = 64) -> np.ndarray:
    """np.empty with the data `align`-byte aligned (whole-vector and streaming stores need 32)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child (DataLoader worker) must not reuse the parent's dead threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool per thread count, so per-batch calls don't start threads each time."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probres-pre")
        return pool


def load_source(src: ImageSource | np.ndarray | BaseException, out: np.ndarray, spec: PreprocessSpec,
                stream: bool = False) -> None:
    """One source of a batch into `out`: a path or encoded bytes as preprocess_into takes them; a decoded BGR
    uint8 array (runtime.api converts the others) as it is; an exception is raised (an input the
    caller already found bad keeps its place in the batch)."""
    if isinstance(src, np.ndarray):
        preprocess_array_into(src, out, spec, stream=stream)
    elif isinstance(src, BaseException):
        raise src
    else:
        preprocess_into(src, out, spec, stream=stream)


def fill_rows(sources: Sequence[ImageSource], out: np.ndarray, spec: PreprocessSpec,
              pool: ThreadPoolExecutor | None = None, workers: int = 0, caller_works: bool = False) -> "RowFill":
    """Start preprocessing sources[i] into out[i] (the one batching engine); `.result()` waits for it.

    Spread over `workers` tasks of `pool` (one task per worker, each taking the next image, rather
    than one future per image, whose wake-ups contend for the GIL with the workers), plus the
    calling thread when `caller_works` (or when there is no pool). result() gives one exception or
    None per source, in order. Rows are written with streaming stores when `out` is larger than
    STREAM_BYTES (it cannot stay in cache until the model reads it). preprocess() is one call of
    it; runtime.pipeline.iter_batches keeps two in flight.
    """
    return RowFill(sources, out, spec, pool, workers, caller_works)


class RowFill:
    """One batch being filled by fill_rows."""

    def __init__(self, sources: Sequence[ImageSource], out: np.ndarray, spec: PreprocessSpec,
                 pool: ThreadPoolExecutor | None = None, workers: int = 0, caller_works: bool = False) -> None:
        self._sources, self._out, self._spec = sources, out, spec
        self._stream = out[:len(sources)].nbytes >= STREAM_BYTES
        self.errors: list[BaseException | None] = [None] * len(sources)
        self._next, self._take = 0, threading.Lock()
        n_tasks = min(workers, len(sources)) if pool is not None else 0
        self._futs: list[Future] = [pool.submit(self._work) for _ in range(n_tasks)]
        if caller_works or not self._futs:
            self._work()

    def _work(self) -> None:
        while True:
            with self._take:
                i = self._next
                self._next += 1
            if i >= len(self._sources):
                return
            try:
                load_source(self._sources[i], self._out[i], self._spec, self._stream)
            except Exception as e:                   # every image is still attempted
                self.errors[i] = e

    def result(self) -> list[BaseException | None]:
        for f in self._futs:
            f.result()
        return self.errors


def preprocess(
    images: Sequence[ImageSource],
    size: int = 448,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    interpolation: str = "area",
    spec: PreprocessSpec | None = None,
    out: np.ndarray | None = None,
    threads: int = 1,
    dtype: "np.typing.DTypeLike" = np.float32,
) -> np.ndarray:
    """Images (paths or encoded bytes) -> (N, 3, S, S) float32 (or float16), the model's input.

    `spec` (a contract's PreprocessSpec) overrides size/mean/std/interpolation.
    `out`, if given, is a preallocated C-contiguous (>=N, 3, S, S) float32/float16 buffer
    (e.g. pinned host memory from a GPU backend) written in place; else `dtype` picks the type.
    One call of the batching engine (fill_rows), the one probres-infer streams through: paths
    get its checks (file size, header pixel limit) and the per-thread reused decode buffer
    (runtime.decode). `threads` > 1 spreads images over the calling thread
    and threads - 1 pool workers (decode and the C kernel release the GIL). Raises the error
    (ImageDecodeError naming the input) of the first input, in input order, that fails.
    """
    spec = _spec(spec, size, mean, std, interpolation)
    n, s = len(images), spec.size
    if out is None:
        out = aligned_empty((n, 3, s, s), dtype)
    if (not isinstance(out, np.ndarray) or out.dtype not in OUT_DTYPES or out.ndim != 4 or out.shape[0] < n
            or out.shape[1:] != (3, s, s)):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be float32 or float16 (>= {n}, 3, {s}, {s}), got {got}")
    # The calling thread works too, beside threads - 1 pool workers.
    helpers = threads - 1 if n > 1 else 0
    errors = fill_rows(images, out, spec, _pool(helpers) if helpers else None, helpers, caller_works=True).result()
    bad = [e for e in errors if e is not None]
    if bad:                                          # the first failing input, in input order
        raise bad[0]
    return out[:n]
