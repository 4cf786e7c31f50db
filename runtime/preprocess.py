"""Image preprocessing with OpenCV: the one function training's evaluation and the runtime share.

    python -c "from runtime.preprocess import preprocess; print(preprocess(['img.jpg']).shape)"

decode (path or encoded bytes) -> RGB uint8 -> resize to S x S -> (x/255 - mean)/std -> float32
CHW, batched as (N, 3, S, S). No torch: this ships to the device.

Interpolation, chosen deliberately: COCO images shrink about 1.1-1.4x to 448, camera frames
3-4x. cv2.INTER_LINEAR samples only 2x2 source pixels per output pixel, so on a 3-4x
downscale it skips most of the input and aliases; PIL/torchvision widen their filter
when shrinking (antialias), and a train/deploy mismatch there has cost measurable accuracy
(torchvision #6506, #7093). cv2.INTER_AREA averages every source pixel under the output
pixel (anti-aliased) and is OpenCV's recommended filter for shrinking; for enlarging it
degenerates towards nearest-neighbour, so we use INTER_LINEAR when the image grows.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence, Union

# Refuse images over this many pixels before OpenCV allocates them: its decoders check
# the header against OPENCV_IO_MAX_IMAGE_PIXELS (default 2^30 pixels, 3 GiB of BGR). 2^28
# (16384 x 16384) is still far beyond any camera frame and keeps one bad file from costing
# gigabytes. OpenCV reads the variable when it loads, so it only takes effect when this
# module is the first to import cv2 (as in probres-infer); the check after decoding below
# holds the same limit either way.
MAX_IMAGE_PIXELS = 1 << 28
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402

from runtime.contract import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec  # noqa: E402

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class ImageDecodeError(ValueError):
    """An input could not be turned into an image; the message names the input."""


def _name(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src)


def read_bytes(src: ImageSource, name: str | None = None) -> np.ndarray:
    """The encoded bytes of `src` as a uint8 array (a path is read from disk)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(src, dtype=np.uint8)
    else:
        path = os.fspath(src)
        try:
            buf = np.fromfile(path, dtype=np.uint8)
        except IsADirectoryError:
            raise ImageDecodeError(f"{_name(src, name)}: is a directory, not an image") from None
        except OSError as e:
            raise ImageDecodeError(f"{_name(src, name)}: cannot read file ({e.strerror or e})") from None
    if buf.size == 0:
        raise ImageDecodeError(f"{_name(src, name)}: empty file")
    return buf


def decode_bgr(src: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode to a 3-channel BGR uint8 HxWx3 array, the right way up.

    IMREAD_COLOR gives 3 channels and 8 bits whatever the file holds: grayscale is
    replicated, palette expanded, alpha dropped, 16-bit scaled to 8, CMYK JPEG converted,
    and the EXIF orientation applied (IMREAD_IGNORE_ORIENTATION is not set).
    """
    buf = read_bytes(src, name)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:
        if "MAX_IMAGE_PIXELS" in str(e):  # the header claims more pixels than the limit
            raise ImageDecodeError(f"{_name(src, name)}: image too large (header claims more than {MAX_IMAGE_PIXELS} pixels)") from None
        raise ImageDecodeError(f"{_name(src, name)}: cannot decode image (OpenCV decoder error)") from None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise ImageDecodeError(f"{_name(src, name)}: not a decodable image (corrupt, truncated or unsupported format)")
    if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{_name(src, name)}: image too large ({img.shape[1]}x{img.shape[0]} pixels)")
    return img


def decode(src: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode to RGB uint8 HxWx3 (for training-time augmentation; the eval path stays BGR)."""
    return cv2.cvtColor(decode_bgr(src, name), cv2.COLOR_BGR2RGB)


def resize_interpolation(h: int, w: int, size: int, interpolation: str = "area") -> int:
    """The cv2 flag used to take an h x w image to size x size (see the module docstring)."""
    if interpolation == "area" and (h > size or w > size):
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


def resize(img: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize an HxWxC uint8 image to size x size with the contract's interpolation."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    return cv2.resize(img, (size, size), interpolation=resize_interpolation(h, w, size, interpolation))


def normalize_coefficients(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-RGB-channel (scale, bias) with (x/255 - mean)/std == x*scale + bias, in float32."""
    std64 = np.asarray(std, dtype=np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    bias = (-np.asarray(mean, dtype=np.float64) / std64).astype(np.float32)
    return scale, bias


def normalize_bgr_into(bgr: np.ndarray, out: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Write (3, S, S) RGB planes of x*scale+bias from an S x S x 3 BGR uint8 image into `out`.

    The channel swap is folded into the plane order, so no cvtColor pass is needed.
    Each output element is float32(x) * scale[c] + bias[c], two float32 roundings;
    the C extension computes the same expression.
    """
    for c in range(3):
        plane = out[c]
        np.multiply(bgr[:, :, 2 - c], scale[c], out=plane, dtype=np.float32)
        plane += bias[c]
    return out


def _spec(spec: PreprocessSpec | None, size: int, mean, std, interpolation: str) -> PreprocessSpec:
    if spec is not None:
        return spec
    return PreprocessSpec(size=int(size), mean=tuple(mean), std=tuple(std), interpolation=interpolation)


def preprocess_into(src: ImageSource, out: np.ndarray, spec: PreprocessSpec, name: str | None = None) -> np.ndarray:
    """Preprocess one image into `out` (3, S, S) float32, e.g. a row of a preallocated batch."""
    bgr = resize(decode_bgr(src, name), spec.size, spec.interpolation)
    scale, bias = normalize_coefficients(spec.mean, spec.std)
    return normalize_bgr_into(bgr, out, scale, bias)


def preprocess_one(src: ImageSource, spec: PreprocessSpec | None = None, name: str | None = None) -> np.ndarray:
    """One image -> (3, S, S) float32."""
    spec = spec or PreprocessSpec()
    out = np.empty((3, spec.size, spec.size), dtype=np.float32)
    return preprocess_into(src, out, spec, name)


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
) -> np.ndarray:
    """Images (paths or encoded bytes) -> float32 (N, 3, S, S), the model's input.

    `spec` (a contract's PreprocessSpec) overrides size/mean/std/interpolation.
    `out`, if given, is a preallocated (>=N, 3, S, S) float32 buffer written in place.
    `threads` > 1 spreads images over a thread pool (OpenCV releases the GIL).
    Raises ImageDecodeError naming the first input that cannot be decoded.
    """
    spec = _spec(spec, size, mean, std, interpolation)
    n, s = len(images), spec.size
    if out is None:
        out = np.empty((n, 3, s, s), dtype=np.float32)
    elif out.dtype != np.float32 or out.ndim != 4 or out.shape[0] < n or out.shape[1:] != (3, s, s):
        raise ValueError(f"out must be float32 (>= {n}, 3, {s}, {s}), got {out.dtype} {out.shape}")
    if threads <= 1 or n <= 1:
        for i, src in enumerate(images):
            preprocess_into(src, out[i], spec)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda i: preprocess_into(images[i], out[i], spec), range(n)))
    return out[:n]
